"""Input pipeline: patient splits, HU normalisation, patch streams, slices.

Everything here works on volumes already in memory (``Volume``: arrays of
shape (D, H, W), float32, Hounsfield units). The readers that build them live
elsewhere in ``ldct_jax.data``.

Conventions:
  * Arrays handed to models are normalised (see ``Normalization``), float32,
    NHWC for 2D (slab=1: ``(B, p, p, 1)``) and NDHWC for slabs of ``k``
    adjacent slices (``(B, k, p, p, 1)``), the slab centred on the sampled
    slice.
  * Slabs at the ends of a volume use reflected neighbours (slice -1 is slice
    1, slice D is slice D-2, no repeated edge slice), in training and in
    ``iterate_slices`` alike, so every slice can be sampled during training and
    gets an output at evaluation, and both see the same kind of edge slab.
    A volume with fewer slices than the slab (down to one slice) is padded by
    edge replication instead (slice -1 is slice 0, slice D is slice D-1):
    reflection would bounce back and forth through so short a volume, putting
    far slices next to the centre (``short_volume_padding``).
  * ``batch_size`` is always the GLOBAL batch size. Each host produces its
    share ``batch_size // jax.process_count()`` and ``to_global_batch``
    assembles the global ``jax.Array`` sharded over the mesh axis ``'data'``.

Why grain is used the way it is: the patch stream is a ``grain.MapDataset``
over an (effectively) infinite range of global sample indices. ``random_map``
gives each index its own Philox stream keyed by ``(seed, index)``, so sample
``i`` is a pure function of ``(volumes, settings, seed, i)``: no state lives in
the sampler, any element can be recomputed, and order does not depend on
thread timing. The samples are grouped into per-host batches of
``B_local`` consecutive indices, and host ``h`` of ``H`` keeps every
``H``-th of those groups starting at ``h``. Global batch ``n`` therefore holds
samples ``[n * B, (n + 1) * B)`` whatever the number of hosts, and the
iterator state is one integer (global batches consumed), valid across restarts
and even across a change of host count. ``to_iter_dataset`` adds thread-based
prefetch (threads, not processes: JAX and ``fork`` do not mix); each thread
builds whole batches, so several batches are built in parallel. ``shuffle``
and ``repeat`` are not used: sampling with replacement from a per-index
generator already is an endless, reproducible, uniformly random stream.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ldct_jax import windows

SPLIT_NAMES = ("train", "val", "test")
# Patient-level (train, val, test) fractions: the one default, also
# ``config.data.split.fractions`` (``ldct_jax.config``) and ``load_dataset``'s.
DEFAULT_SPLIT_FRACTIONS = (0.5, 0.25, 0.25)
DATA_AXIS = "data"

Array = Any  # np.ndarray or jax.Array


# ----------------------------------------------------------------------------
# Volumes


@dataclasses.dataclass(frozen=True)
class Volume:
  """One patient (or one series) held in memory.

  Attributes:
    patient_id: identifier used for patient-level splits.
    arrays: images of the same (D, H, W) shape in HU, e.g. ``{'ld': ..., 'nd':
      ...}`` for paired data or a single key for unpaired methods. Stored as
      float32 (converted on construction when needed).
  """

  patient_id: str
  arrays: Mapping[str, np.ndarray]

  def __post_init__(self):
    if not self.arrays:
      raise ValueError(f"volume {self.patient_id!r} has no arrays")
    arrays = {key: np.asarray(value, dtype=np.float32)
              for key, value in self.arrays.items()}
    shapes = {key: value.shape for key, value in arrays.items()}
    if any(len(shape) != 3 for shape in shapes.values()):
      raise ValueError(
          f"volume {self.patient_id!r}: arrays must be (D, H, W), got {shapes}")
    if len(set(shapes.values())) != 1:
      raise ValueError(
          f"volume {self.patient_id!r}: arrays differ in shape: {shapes}")
    # Frozen dataclass: the float32 copy replaces the caller's mapping once.
    object.__setattr__(self, "arrays", arrays)

  @property
  def shape(self) -> tuple:
    """(D, H, W) shared by all arrays."""
    return next(iter(self.arrays.values())).shape

  @property
  def num_slices(self) -> int:
    return self.shape[0]


# ----------------------------------------------------------------------------
# Patient splits


def split_patients(
    patient_ids: Sequence[str],
    fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = 0,
    *,
    counts: Optional[Sequence[int]] = None,
) -> dict:
  """Splits patients (never slices) into train/val/test.

  The ids are sorted before a seeded permutation, so the result depends only on
  the set of ids, the fractions (or counts) and the seed, not on input order.
  Fractions become counts by the largest-remainder rule; with 3 or more
  patients every split with a positive fraction gets at least one patient
  (taken from the largest split). For a paper's published split, ship the lists
  with ``save_split_file`` rather than relying on a seed.

  Args:
    patient_ids: unique patient identifiers.
    fractions: (train, val, test) fractions summing to 1.
    seed: seed of the permutation.
    counts: (train, val, test) patient counts summing to ``len(patient_ids)``;
      replaces ``fractions`` (giving both is an error).

  Returns:
    ``{'train': [...], 'val': [...], 'test': [...]}``, each list sorted.
  """
  ids = sorted(str(patient_id) for patient_id in patient_ids)
  if len(set(ids)) != len(ids):
    raise ValueError("patient ids must be unique")
  n = len(ids)
  if counts is not None:
    if fractions is not DEFAULT_SPLIT_FRACTIONS:
      raise ValueError("give either fractions or counts, not both")
    sizes = [int(c) for c in counts]
    if len(sizes) != 3 or min(sizes) < 0 or sum(sizes) != n:
      raise ValueError(
          f"counts must be 3 non-negative ints summing to {n}, got {counts}")
  else:
    sizes = _fractions_to_counts(fractions, n)
  order = np.random.default_rng(seed).permutation(n)
  shuffled = [ids[i] for i in order]
  bounds = np.cumsum([0] + sizes)
  return {name: sorted(shuffled[bounds[i]:bounds[i + 1]])
          for i, name in enumerate(SPLIT_NAMES)}


def _fractions_to_counts(fractions: Sequence[float], n: int) -> list:
  fractions = [float(f) for f in fractions]
  if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
    raise ValueError(
        f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
  exact = [f * n for f in fractions]
  sizes = [math.floor(e) for e in exact]
  # Largest remainder; ties go to the earlier split (train, then val).
  by_remainder = sorted(range(3), key=lambda i: (-(exact[i] - sizes[i]), i))
  for i in by_remainder[:n - sum(sizes)]:
    sizes[i] += 1
  if n >= 3:
    for i in range(3):
      if fractions[i] > 0 and sizes[i] == 0:
        sizes[int(np.argmax(sizes))] -= 1
        sizes[i] = 1
  return sizes


def save_split_file(path: Union[str, os.PathLike], splits: Mapping[str, Sequence[str]],
                    metadata: Optional[Mapping[str, Any]] = None) -> None:
  """Writes a split as JSON: ``{"train": [...], "val": [...], "test": [...]}``.

  ``metadata`` (e.g. the source paper, seed, dataset version) is stored under
  the key ``"metadata"`` and ignored by ``load_split_file``.
  """
  content = {name: sorted(str(p) for p in splits.get(name, ()))
             for name in SPLIT_NAMES}
  _check_disjoint(content, str(path))
  if metadata is not None:
    content["metadata"] = dict(metadata)
  with open(path, "w") as f:
    json.dump(content, f, indent=2, sort_keys=True)
    f.write("\n")


def load_split_file(path: Union[str, os.PathLike]) -> dict:
  """Reads a JSON split file; missing splits are empty, overlaps are an error."""
  with open(path) as f:
    content = json.load(f)
  unknown = set(content) - set(SPLIT_NAMES) - {"metadata"}
  if unknown:
    raise ValueError(f"{path}: unknown split names {sorted(unknown)}")
  splits = {name: [str(p) for p in content.get(name, [])]
            for name in SPLIT_NAMES}
  _check_disjoint(splits, str(path))
  return splits


def _check_disjoint(splits: Mapping[str, Sequence[str]], where: str) -> None:
  seen = {}
  for name in SPLIT_NAMES:
    for patient in splits[name]:
      if patient in seen:
        raise ValueError(
            f"{where}: patient {patient!r} is in both {seen[patient]!r} and "
            f"{name!r}")
      seen[patient] = name


# ----------------------------------------------------------------------------
# Normalisation


@dataclasses.dataclass(frozen=True)
class Normalization:
  """Affine HU <-> model-input mapping ``x = (hu - shift) / scale``.

  Two kinds, both unclipped so that ``denormalize`` inverts ``normalize``:
    * ``'affine'`` with explicit ``shift``/``scale`` (HU).
    * ``'window'``: HU ``low`` -> 0 and ``high`` -> 1 (``shift=low``,
      ``scale=high-low``); values outside the window go below 0 / above 1.

  The default, ``affine`` with ``shift=-1024, scale=4096``, maps the full CT
  range [-1024, 3072] HU (``windows.WINDOWS['full']``) to [0, 1] as the public
  RED-CNN / WGAN-VGG code does, so the papers' loss magnitudes and learning
  rates carry over. Soft tissue sits near 0.26 and the metric window
  [-160, 240] HU spans 0.098; a HU difference ``d`` is ``d / 4096``. The scale
  is a power of two and the shift an integer, so the float32 round trip is
  bit-exact for integer HU values (|HU| < 2**23); for fractional HU it is exact
  up to float32 rounding of ``hu - shift`` (~1e-4 HU near 0 HU).
  """

  kind: str = "affine"
  shift: float = -1024.0
  scale: float = 4096.0

  def __post_init__(self):
    if self.kind not in ("affine", "window"):
      raise ValueError(f"normalization kind must be 'affine' or 'window', "
                       f"got {self.kind!r}")
    if not self.scale > 0:
      raise ValueError(f"normalization scale must be positive, got {self.scale}")

  @classmethod
  def window(cls, low: float, high: float) -> "Normalization":
    """Maps HU ``low`` -> 0 and ``high`` -> 1, unclipped."""
    return cls(kind="window", shift=float(low), scale=float(high) - float(low))

  @classmethod
  def from_config(cls, config: Optional[Mapping[str, Any]]) -> "Normalization":
    """Builds from a dict / ConfigDict; ``None`` or ``{}`` gives the default.

    Accepted forms: ``{'kind': 'affine', 'shift': s, 'scale': c}``;
    ``{'kind': 'window', 'low': l, 'high': h}``; ``{'kind': 'window',
    'window': w}`` with ``w`` a preset name of ``ldct_jax.windows`` or a
    (center, width) pair.
    """
    if config is None:
      return cls()
    config = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    kind = config.pop("kind", "affine")
    if kind == "affine":
      default = cls()
      normalization = cls(shift=float(config.pop("shift", default.shift)),
                          scale=float(config.pop("scale", default.scale)))
    elif kind == "window":
      if "window" in config:
        window = windows.get_window(config.pop("window"))
        low, high = window.low, window.high
      else:
        low, high = config.pop("low"), config.pop("high")
      normalization = cls.window(low, high)
    else:
      raise ValueError(f"unknown normalization kind {kind!r}")
    if config:
      raise ValueError(f"unused normalization config keys: {sorted(config)}")
    return normalization

  def to_config(self) -> dict:
    """Inverse of ``from_config``; stored with checkpoints and results."""
    if self.kind == "window":
      return {"kind": "window", "low": self.shift,
              "high": self.shift + self.scale}
    return {"kind": "affine", "shift": self.shift, "scale": self.scale}

  def normalize(self, hu: Array) -> Array:
    """HU -> model units. NumPy or jnp (also under jit); integer NumPy -> float32."""
    return (_as_float(hu) - self.shift) / self.scale

  def denormalize(self, x: Array) -> Array:
    """Model units -> HU; exact inverse of ``normalize`` (see class docstring)."""
    return _as_float(x) * self.scale + self.shift

  def describe(self) -> str:
    return (f"{self.kind}: x = (HU - ({self.shift:g})) / {self.scale:g}")


def _as_float(x: Array) -> Array:
  if isinstance(x, np.ndarray) and not np.issubdtype(x.dtype, np.floating):
    return x.astype(np.float32)
  return x


# ----------------------------------------------------------------------------
# Slab indexing


def _reflect(index: np.ndarray, depth: int) -> np.ndarray:
  """Reflects slice indices into [0, depth) without repeating the edge slice."""
  if depth == 1:
    return np.zeros_like(index)
  period = 2 * (depth - 1)
  folded = np.abs(index) % period
  return np.where(folded >= depth, period - folded, folded)


def short_volume_padding(depth: int, slab: int) -> bool:
  """Whether a ``depth``-slice volume is edge-padded (not reflected) for ``slab``.

  Fewer slices than the slab: reflection would have to bounce (a 2-slice
  volume read as a 5-slab would be 0 1 0 1 0), so such a volume repeats its
  first and last slices instead (0 0 0 1 1), the way a scanner's thin series
  is extended; a single slice becomes a slab of copies of itself.
  """
  return depth < slab


def _slab_indices(centers: np.ndarray, slab: int, depth: int) -> np.ndarray:
  """(n,) centre slices -> (n, slab) neighbour indices: reflected, or edge-
  replicated for volumes shorter than the slab (``short_volume_padding``)."""
  offsets = np.arange(slab) - slab // 2
  index = np.asarray(centers)[:, None] + offsets[None, :]
  if short_volume_padding(depth, slab):
    return np.clip(index, 0, depth - 1)
  return _reflect(index, depth)


def _check_slab(slab: int) -> None:
  if not (isinstance(slab, (int, np.integer)) and slab >= 1 and slab % 2 == 1):
    raise ValueError(f"slab must be a positive odd int (1, 3, 5, 7), got {slab}")


# ----------------------------------------------------------------------------
# Random patch stream


class _PatchSampler:
  """Draws one training sample (HU, not yet normalised) from its generator.

  Pure given ``rng``: the same generator state yields the same sample, which is
  what makes the stream reproducible and resumable. Normalisation happens once
  per stacked batch (one vectorised op instead of one per patch).
  """

  def __init__(self, volumes, keys, patch_size, slab, augment,
               skip_air_fraction, air_threshold_hu, max_air_retries):
    self._arrays = [[volume.arrays[key] for key in keys] for volume in volumes]
    self._shapes = [volume.shape for volume in volumes]
    # Slice-uniform sampling: volume v owns flat slice ids [starts[v], starts[v+1]).
    self._starts = np.cumsum([0] + [shape[0] for shape in self._shapes])
    self._keys = tuple(keys)
    self._patch = patch_size
    self._slab = slab
    self._augment = augment
    self._skip_air_fraction = skip_air_fraction
    self._air_threshold_hu = air_threshold_hu
    self._max_air_retries = max_air_retries

  def _draw_location(self, rng: np.random.Generator) -> tuple:
    flat = int(rng.integers(self._starts[-1]))
    volume = int(np.searchsorted(self._starts, flat, side="right")) - 1
    _, height, width = self._shapes[volume]
    z = flat - int(self._starts[volume])
    y = int(rng.integers(height - self._patch + 1))
    x = int(rng.integers(width - self._patch + 1))
    return volume, z, y, x

  def _is_air(self, volume: int, z: int, y: int, x: int) -> bool:
    # Air is judged on the centre slice of the first key only, so every key
    # gets the same location whatever its noise level.
    p = self._patch
    centre = self._arrays[volume][0][z, y:y + p, x:x + p]
    num_air = np.count_nonzero(centre < self._air_threshold_hu)
    return num_air > self._skip_air_fraction * p * p

  def __call__(self, index: int, rng: np.random.Generator) -> dict:
    del index  # The element's identity is carried by rng (seeded by index).
    location = self._draw_location(rng)
    if self._skip_air_fraction is not None:
      retries = 0
      while self._is_air(*location) and retries < self._max_air_retries:
        location = self._draw_location(rng)
        retries += 1
    volume, z, y, x = location
    p = self._patch
    slices = _slab_indices(np.array([z]), self._slab, self._shapes[volume][0])[0]
    if self._augment:
      quarter_turns = int(rng.integers(4))
      flip = bool(rng.integers(2))
    sample = {}
    for key, array in zip(self._keys, self._arrays[volume]):
      patch = array[slices, y:y + p, x:x + p]  # (slab, p, p) HU
      if self._augment:
        # One draw for all keys keeps inputs and targets aligned.
        patch = np.rot90(patch, quarter_turns, axes=(1, 2))
        if flip:
          patch = patch[:, :, ::-1]
      sample[key] = patch[0] if self._slab == 1 else patch
    return sample


class PatchStream:
  """Endless iterator of host-local training batches with checkpointable state.

  ``next(stream)`` returns ``{key: np.ndarray float32}`` with shape
  ``(B_local, p, p, 1)`` (slab 1) or ``(B_local, k, p, p, 1)`` (slab k),
  normalised. ``get_state()`` is a JSON-serialisable dict; ``set_state`` of a
  state taken after ``n`` batches makes the stream continue exactly as an
  uninterrupted one would from batch ``n``. The state counts global batches, so
  it stays valid when the number of hosts changes (same global batch size).
  """

  def __init__(self, local_batches: grain.MapDataset,
               read_options: grain.ReadOptions, fingerprint: dict,
               global_batch_size: int, local_batch_size: int):
    self._local_batches = local_batches
    self._iterator = local_batches.to_iter_dataset(read_options).__iter__()
    self._fingerprint = fingerprint
    self.global_batch_size = global_batch_size
    self.local_batch_size = local_batch_size

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    return next(self._iterator)

  def batch_at(self, step: int) -> dict:
    """This host's batch number ``step``, computed directly (no prefetch)."""
    return self._local_batches[step]

  def get_state(self) -> dict:
    """``{'batches_consumed': n, 'fingerprint': {...}}``, JSON-serialisable."""
    return {"batches_consumed": int(self._iterator.get_state()["next_index"]),
            "fingerprint": dict(self._fingerprint)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Resumes from ``get_state()``; refuses a state from other data/settings."""
    if dict(state["fingerprint"]) != self._fingerprint:
      differing = sorted(
          key for key in set(state["fingerprint"]) | set(self._fingerprint)
          if state["fingerprint"].get(key) != self._fingerprint.get(key))
      raise ValueError(
          "patch stream state was saved with different data or settings "
          f"(differs in {differing}); resuming would silently change the data")
    self._iterator.set_state({"next_index": int(state["batches_consumed"])})

  def close(self) -> None:
    """Stops the prefetch threads."""
    self._iterator.close()


def make_patch_dataset(
    volumes: Sequence[Volume],
    *,
    keys: Sequence[str] = ("ld", "nd"),
    patch_size: int = 64,
    slab: int = 1,
    batch_size: int,
    seed: int,
    normalization: Normalization,
    raw_keys: Sequence[str] = (),
    augment: bool = True,
    skip_air_fraction: Optional[float] = 0.9,
    air_threshold_hu: float = windows.BODY_THRESHOLD_HU,
    max_air_retries: int = 10,
    num_threads: int = 2,
    prefetch: int = 4,
    num_devices: Optional[int] = None,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
) -> PatchStream:
  """Builds the endless, reproducible stream of random training patches.

  Each sample: a slice drawn uniformly from all slices of all volumes (so
  volumes weigh by slice count), a patch position drawn uniformly inside it,
  the same location for every key; optionally re-drawn while it is mostly air;
  then the same random rot90 and left-right flip (8 dihedral orientations) for
  all keys; then normalisation.

  Args:
    volumes: training volumes (HU); each must hold every key in ``keys``.
    keys: arrays to cut; air rejection looks at ``keys[0]``.
    patch_size: side ``p`` of square patches, in pixels.
    slab: number ``k`` of adjacent slices (odd); 1 gives 2D NHWC batches,
      ``k > 1`` NDHWC ``(B, k, p, p, 1)`` centred on the sampled slice, with
      reflected neighbours at volume ends.
    batch_size: GLOBAL batch size; must be divisible by ``num_devices`` and by
      the process count.
    seed: determines the whole stream.
    normalization: HU -> model units (the evaluation inverts the same one).
    raw_keys: keys among ``keys`` that are not images in HU (e.g. a noise
      map) and pass through unnormalised; they are cut and augmented like the
      others.
    augment: random flips and rot90, identical across keys.
    skip_air_fraction: re-draw a location while the fraction of centre-slice
      pixels of ``keys[0]`` below ``air_threshold_hu`` exceeds this; ``None``
      disables rejection. The default 0.9 drops patches (almost) outside the
      body and keeps those on the body outline.
    air_threshold_hu: HU below which a pixel counts as air
      (``windows.BODY_THRESHOLD_HU``, -900: most lung parenchyma, about -850
      HU, counts as tissue).
    max_air_retries: after this many re-draws the last location is kept, so a
      sample always terminates (e.g. on an all-air volume).
    num_threads: prefetch threads; each builds whole batches.
    prefetch: batches prepared ahead of the consumer.
    num_devices: devices the global batch is sharded over; default
      ``jax.device_count()``.
    process_index: this host's index; default ``jax.process_index()``.
    process_count: number of hosts; default ``jax.process_count()``.

  Returns:
    A ``PatchStream`` yielding ``{key: (B_local, p, p, 1)}`` or
    ``{key: (B_local, k, p, p, 1)}`` float32 batches, ``B_local = batch_size //
    process_count``; host ``h`` gets rows ``[h * B_local, (h + 1) * B_local)``
    of each global batch.
  """
  keys = tuple(keys)
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not volumes:
    raise ValueError("make_patch_dataset needs at least one volume")
  if not keys:
    raise ValueError("keys must name at least one array")
  _check_slab(slab)
  if batch_size <= 0 or batch_size % num_devices:
    raise ValueError(
        f"global batch_size {batch_size} must be a positive multiple of the "
        f"number of devices ({num_devices}) to shard it over the "
        f"'{DATA_AXIS}' axis")
  if batch_size % process_count:
    raise ValueError(f"global batch_size {batch_size} must be divisible by the "
                     f"number of processes ({process_count})")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  for volume in volumes:
    missing = set(keys) - set(volume.arrays)
    if missing:
      raise ValueError(f"volume {volume.patient_id!r} lacks {sorted(missing)}")
    if min(volume.shape[1:]) < patch_size:
      raise ValueError(f"volume {volume.patient_id!r} of shape {volume.shape} "
                       f"is smaller than patch_size {patch_size}")
  if skip_air_fraction is not None and not 0 <= skip_air_fraction < 1:
    raise ValueError(f"skip_air_fraction must be in [0, 1) or None, "
                     f"got {skip_air_fraction}")

  local_batch_size = batch_size // process_count
  sampler = _PatchSampler(volumes, keys, patch_size, slab, augment,
                          skip_air_fraction, air_threshold_hu, max_air_retries)

  raw_keys = frozenset(raw_keys)
  if not raw_keys <= set(keys):
    raise ValueError(f"raw_keys {sorted(raw_keys - set(keys))} are not among keys {keys}")
  if keys[0] in raw_keys:
    raise ValueError(f"keys[0] ({keys[0]!r}) drives air rejection and must be an image in HU")

  def stack_and_normalize(samples):
    batch = {key: np.stack([sample[key] for sample in samples]) for key in keys}
    return {key: (value.astype(np.float32) if key in raw_keys
                  else normalization.normalize(value))[..., None]
            for key, value in batch.items()}

  # Global sample index -> sample; chunks of B_local consecutive samples;
  # this host keeps chunks h, h + H, h + 2H, ... (see module docstring).
  samples = grain.MapDataset.range(sys.maxsize).random_map(sampler, seed=seed)
  local_batches = samples.batch(local_batch_size, batch_fn=stack_and_normalize)[
      process_index::process_count]
  read_options = grain.ReadOptions(num_threads=num_threads,
                                   prefetch_buffer_size=prefetch)
  fingerprint = {
      "seed": int(seed),
      "batch_size": int(batch_size),
      "keys": list(keys),
      "patch_size": int(patch_size),
      "slab": int(slab),
      "normalization": normalization.to_config(),
      "raw_keys": sorted(raw_keys),
      "augment": bool(augment),
      "skip_air_fraction": (None if skip_air_fraction is None
                            else float(skip_air_fraction)),
      "air_threshold_hu": float(air_threshold_hu),
      "max_air_retries": int(max_air_retries),
      "volumes_sha256": _volumes_digest(volumes),
  }
  return PatchStream(local_batches, read_options, fingerprint,
                     global_batch_size=batch_size,
                     local_batch_size=local_batch_size)


def _volumes_digest(volumes: Sequence[Volume]) -> str:
  """Hash of the ordered (patient id, shape) list: cheap, catches wrong data."""
  described = json.dumps([[v.patient_id, list(v.shape)] for v in volumes])
  return hashlib.sha256(described.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------
# Whole slices (evaluation, denoising a series)


def iterate_slices(
    volume: Volume,
    *,
    keys: Sequence[str],
    normalization: Normalization,
    slab: int = 1,
    batch_size: int,
    pad_to_batch: bool = False,
    centres: Optional[Sequence[int]] = None,
) -> Iterator[tuple]:
  """Yields every slice (or every slice of ``centres``) once, in order, in batches.

  Args:
    volume: the volume (HU).
    keys: arrays to return.
    normalization: HU -> model units.
    slab: 1 for 2D ``(n, H, W, 1)``; odd ``k`` for ``(n, k, H, W, 1)`` centred
      on each slice, reflected neighbours at the ends (edge-replicated when
      the volume has fewer than ``k`` slices, ``short_volume_padding``).
    batch_size: slices per batch; the last batch may be smaller.
    pad_to_batch: repeat the last slice so every batch has ``batch_size`` rows
      (one compiled shape; divisible by the device count if ``batch_size`` is).
      The returned indices still list only real slices: keep the first
      ``len(indices)`` outputs.
    centres: only these slices (ascending or not), each with its true
      neighbours from the whole volume (a slab model must never see a
      subsample's slices as neighbours); None = every slice.

  Yields:
    ``(slice_indices, {key: batch})``: ``slice_indices`` an int array of the
    (centre) slices in this batch; batches float32, normalised.
  """
  _check_slab(slab)
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  depth = volume.num_slices
  wanted = np.arange(depth) if centres is None else np.asarray(centres, dtype=int)
  if wanted.size and (wanted.min() < 0 or wanted.max() >= depth):
    raise ValueError(f"centres {wanted} outside a volume of {depth} slices")
  for start in range(0, len(wanted), batch_size):
    indices = wanted[start:start + batch_size]
    rows = indices
    if pad_to_batch and len(rows) < batch_size:
      rows = np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])])
    slices = _slab_indices(rows, slab, depth)
    batch = {}
    for key in keys:
      images = normalization.normalize(volume.arrays[key][slices])  # (n, k, H, W)
      if slab == 1:
        images = images[:, 0]
      batch[key] = np.ascontiguousarray(images[..., None], dtype=np.float32)
    yield indices, batch


# ----------------------------------------------------------------------------
# Sharding


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """1-D data-parallel mesh over all (or the given) devices, axis ``'data'``.

  Devices are ordered by process, then id, so each host's devices hold one
  contiguous block of the batch axis: the global batch is then the hosts'
  local batches concatenated in process order (``to_global_batch``), which is
  what ``make_patch_dataset``'s per-host shares assume.
  """
  devices = jax.devices() if devices is None else devices
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def to_global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Host-local NumPy batch pytree -> global ``jax.Array`` pytree.

  Each leaf's leading (batch) axis is sharded over the mesh axis ``'data'``;
  the global batch is the concatenation of all hosts' local batches in process
  order, so one code path serves 1 CPU, one multi-GPU host and a pod.
  """
  sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
  return jax.tree.map(
      lambda leaf: jax.make_array_from_process_local_data(sharding, leaf),
      local_batch)
