"""MRI batches: whole slices of fastMRI single-coil files, undersampled by a mask.

A cascade needs the whole field of view (data consistency acts on all of
k-space), so MRI batches are whole slices, never patches, and no air is
rejected. Each example is built from one fully sampled k-space slice ``k``:

  * ``readout_crop``: when k-space is taller than the reconstruction
    (fastMRI knee: 640 readout samples for a 320-row image, 2x readout
    oversampling), the image is cropped along the readout (row) axis to the
    reconstruction height and transformed back. For masks that select whole
    columns (phase-encode lines: 'random', 'equispaced') this is exact: the
    2D FFT is separable and the mask acts on each row's column frequencies
    only, so cropping rows commutes with undersampling, zero filling and
    data consistency. It is refused for 2D masks, which it would change.
  * ``k0 = m * k`` with a mask ``m`` (training: a new mask per example, drawn
    from the step's seed; evaluation: one mask per volume, seeded by its file
    name, as fastMRI's validation masks are); ``x = F^H k0`` zero-filled.
  * every complex array is scaled by ``s = 1 / max|x|`` (the zero-filled
    image, which is available at inference: the measurement alone fixes the
    scale), so a network sees O(1) values whatever the scanner's units; the
    scale is linear, so data consistency is unchanged, and outputs are divided
    by ``s`` before any metric.

Batch arrays (float32; complex as 2 trailing channels, NHWC): ``x`` and
``k0`` (B, H, W, 2), ``mask`` (B, H, W), ``target`` (B, H, W, 2): the fully
sampled complex image ``F^H k`` (the only complex reference a real fully
sampled file has), ``scale`` (B,).
"""
from __future__ import annotations

import hashlib
import pathlib
import sys
from typing import Any, Mapping, Optional, Sequence

import grain
import numpy as np

from ldct_jax.data.pipeline import PatchStream
from ldct_jax.physics import mri

COLUMN_MASKS = ("random", "equispaced")
_AXES = (-2, -1)


# NumPy twins of physics.mri's centred orthonormal FFTs: batches are built on
# the host in loader threads, where a JAX call per slice would dispatch to the
# device. tests/test_mri_task.py checks they agree with physics.mri.
def fft2c(x: np.ndarray) -> np.ndarray:
  return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=_AXES), axes=_AXES,
                                     norm="ortho"), axes=_AXES).astype(np.complex64)


def ifft2c(k: np.ndarray) -> np.ndarray:
  return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=_AXES), axes=_AXES,
                                      norm="ortho"), axes=_AXES).astype(np.complex64)


def readout_crop(kspace: np.ndarray, height: int) -> np.ndarray:
  """k-space of the image cropped to ``height`` rows (centred), as fastMRI crops."""
  if kspace.shape[-2] <= height:
    return kspace
  image = ifft2c(kspace)
  return fft2c(mri.center_crop(image, (height, image.shape[-1])))


def fit_image(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """Centre crop and/or zero pad a complex image to ``shape`` (training only:
  a fully sampled slice is undersampled after this, on the new grid)."""
  out = np.zeros(tuple(shape), image.dtype)
  h, w = min(shape[0], image.shape[0]), min(shape[1], image.shape[1])
  top, left = (image.shape[0] - h) // 2, (image.shape[1] - w) // 2
  otop, oleft = (shape[0] - h) // 2, (shape[1] - w) // 2
  out[otop:otop + h, oleft:oleft + w] = image[top:top + h, left:left + w]
  return out


def to_channels(z: np.ndarray) -> np.ndarray:
  return np.stack([z.real, z.imag], axis=-1).astype(np.float32)


def from_channels(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  return x[..., 0] + 1j * x[..., 1]


def make_example(kspace: np.ndarray, mask: np.ndarray, *, measured: bool = False) -> dict:
  """One example from a k-space slice and a (H, W) mask (see the module docstring).

  ``measured``: ``kspace`` is already undersampled (a file with its own
  mask); there is then no fully sampled target (``target`` is the
  zero-filled image, never scored).
  """
  k0 = kspace * mask
  x = ifft2c(k0)
  peak = float(np.abs(x).max())
  scale = 1.0 / peak if peak > 0 else 1.0
  full = x if measured else ifft2c(kspace)
  return {"x": to_channels(x * scale), "k0": to_channels(k0 * scale),
          "mask": np.asarray(mask, np.float32), "target": to_channels(full * scale),
          "scale": np.float32(scale)}


def volume_mask(kind: str, shape: Sequence[int], acceleration: float,
                center_fraction: Optional[float], name: str, seed: int = 0) -> np.ndarray:
  """The evaluation mask of one volume: reproducible from its file name and ``seed``."""
  digest = hashlib.sha256(f"{name}:{seed}".encode()).digest()
  return mri.make_mask(kind, shape, acceleration, center_fraction or None,
                       seed=int.from_bytes(digest[:4], "little"))


def check_mask_kind(kind: str, kspace_height: int, recon_height: int, where: str) -> None:
  if kind not in COLUMN_MASKS and kspace_height > recon_height:
    raise ValueError(f"{where}: k-space has {kspace_height} readout rows for a "
                     f"{recon_height}-row reconstruction; the readout crop is exact only for "
                     f"column masks {COLUMN_MASKS}, not {kind!r}")


class _SliceSampler:
  """Global example index + rng -> one training example (a random slice, a new mask).

  With ``fixed_mask_seed`` every slice keeps ONE mask for the whole training
  (seeded by its file name, slice index and this seed, as an acquisition
  would have sampled it once): training without fully sampled data must not
  see a slice under many masks, whose union would cover all of k-space.
  """

  def __init__(self, files: Sequence[Any], shape: Sequence[int], mask_kind: str,
               acceleration: float, center_fraction: Optional[float],
               fixed_mask_seed: Optional[int] = None):
    self.fixed_mask_seed = fixed_mask_seed
    self.files = list(files)
    self.shape = tuple(int(s) for s in shape)
    self.mask_kind, self.acceleration = mask_kind, float(acceleration)
    self.center_fraction = center_fraction
    counts = np.array([f.num_slices for f in self.files], np.int64)
    self.offsets = np.concatenate([[0], np.cumsum(counts)])

  def __call__(self, index: int, rng: np.random.Generator) -> dict:
    del index  # the example is a function of the rng grain derives from (seed, index)
    flat = int(rng.integers(self.offsets[-1]))
    j = int(np.searchsorted(self.offsets, flat, side="right") - 1)
    f = self.files[j]
    k = readout_crop(f.read_kspace(flat - int(self.offsets[j])), f.recon_size[0])
    image = ifft2c(k)
    if image.shape != self.shape:
      image = fit_image(image, self.shape)
    if rng.random() < 0.5:  # up-down flip of the image, before the mask is applied
      image = image[::-1]
    k = fft2c(image)
    z = flat - int(self.offsets[j])
    if self.fixed_mask_seed is not None:
      mask = volume_mask(self.mask_kind, self.shape, self.acceleration, self.center_fraction,
                         f"{pathlib.Path(f.path).name}:{z}", self.fixed_mask_seed)
    else:
      mask = mri.make_mask(self.mask_kind, self.shape, self.acceleration,
                           self.center_fraction or None, seed=int(rng.integers(2**31 - 1)))
    return make_example(k, mask)


def training_shape(files: Sequence[Any], shape: Sequence[int] = ()) -> tuple:
  """The (H, W) every training slice is fitted to: ``shape`` if given, else the
  files' common (readout-cropped) shape; differing shapes need ``shape``."""
  if shape:
    return tuple(int(s) for s in shape)
  shapes = sorted({(f.recon_size[0], f.kspace_shape[-1]) for f in files})
  if len(shapes) != 1:
    raise ValueError(f"training files have different k-space shapes {shapes} (after the "
                     "readout crop); set data.train_shape=(H, W) to fit every slice to one")
  return shapes[0]


def make_slice_dataset(files: Sequence[Any], *, shape: Sequence[int], mask_kind: str,
                       acceleration: float, center_fraction: Optional[float],
                       batch_size: int, seed: int, process_index: int = 0,
                       process_count: int = 1, num_threads: int = 2,
                       prefetch: int = 4, fixed_mask_seed: Optional[int] = None) -> PatchStream:
  """Endless, resumable stream of host-local MRI training batches (see module docstring).

  ``fixed_mask_seed``: one mask per training slice instead of a new one per
  example (``_SliceSampler``), for training from undersampled data only.
  """
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes")
  for f in files:
    check_mask_kind(mask_kind, f.kspace_shape[-2], f.recon_size[0], str(f.path))
  local_batch_size = batch_size // process_count
  sampler = _SliceSampler(files, shape, mask_kind, acceleration, center_fraction,
                          fixed_mask_seed)

  def stack(examples):
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}

  samples = grain.MapDataset.range(sys.maxsize).random_map(sampler, seed=seed)
  local_batches = samples.batch(local_batch_size, batch_fn=stack)[process_index::process_count]
  fingerprint = {
      "seed": int(seed), "batch_size": int(batch_size), "shape": list(sampler.shape),
      "mask": [mask_kind, float(acceleration), center_fraction or 0.0]
              + ([] if fixed_mask_seed is None else ["fixed", int(fixed_mask_seed)]),
      "files": hashlib.sha256(repr([(str(f.path), f.num_slices) for f in files])
                              .encode()).hexdigest()[:16],
  }
  return PatchStream(local_batches, grain.ReadOptions(num_threads=num_threads,
                                                      prefetch_buffer_size=prefetch),
                     fingerprint, global_batch_size=batch_size,
                     local_batch_size=local_batch_size)


def volume_examples(f, mask: Optional[np.ndarray], slices: Sequence[int]) -> dict:
  """Stacked examples of ``slices`` of one file: with the file's own mask when
  it has one (already undersampled), else with ``mask`` (the volume's)."""
  own = f.mask is not None
  examples = []
  for z in slices:
    k = readout_crop(f.read_kspace(int(z)), f.recon_size[0])
    m = np.broadcast_to(np.asarray(f.mask, np.float32), k.shape) if own else mask
    examples.append(make_example(k, m, measured=own))
  return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


def as_mapping(batch: Mapping[str, np.ndarray], keys=("x", "k0", "mask")) -> dict:
  """The network inputs of a batch."""
  return {key: batch[key] for key in keys}
