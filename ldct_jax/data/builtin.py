"""The built-in dataset: simulated patients written as DICOM in the Mayo 2016 layout.

A newcomer has no CT data, so the project makes its own, with real physics,
and feeds it through the same DICOM reader as real data:

1. ``phantoms.make_volume`` draws a seeded anatomical volume (HU, 1 mm slices)
   with lesions, alternating abdomen and chest patients;
2. ``physics.ct.simulate_dose_levels`` projects every slice, draws ONE set of
   full-dose photon counts and thins it binomially to the low dose, then
   reconstructs both by FBP. The normal-dose image therefore carries realistic
   full-dose noise (like real NDCT) and the low-dose scan is nested in it, as
   the Mayo quarter-dose scans were made by noise insertion into the full dose;
3. both series are written with ``dicom.write_series`` as
   ``<root>/<patient>/full_1mm/*.IMA`` and ``<root>/<patient>/quarter_1mm/*.IMA``.

Two fields make dose and texture variants for blind and dose-adaptation
experiments (issue #12):

- ``extra_doses``: more low-dose series per patient, from the SAME full-dose
  photons, written as ``<root>/<patient>/dose{f:.3f}_1mm/`` (e.g.
  ``dose0.100_1mm``) and read with :func:`load_extra_doses`. The paired
  loaders see only ``full_1mm``/``quarter_1mm`` and ignore them.
- ``kernel``: the FBP filter (``physics.ct.FILTERS``) that reconstructs every
  series, NDCT included; smoother kernels than ``'ramp'`` lower the
  high-frequency noise power and reshape the NPS.

The doses are drawn with ``thinning='tree'`` (see
``physics.ct.sample_dose_level_counts``): every series is a function of the
seed, the patient, its own dose and the kernel alone. So, with one seed and
kernel, datasets that differ in ``dose_fraction`` or ``extra_doses`` share the
phantoms and the NDCT exactly, a ``dose0.100_1mm`` series equals the
``quarter_1mm`` series of the ``dose_fraction=0.1`` dataset, and adding extra
doses never changes the other series; every lower dose is nested in every
higher one. At the default dose (0.25) this draws the same numbers as the
generator always did, so the default dataset and its cache key are unchanged.

Next to the DICOM tree, ``dataset.json`` records how it was made (spec and
versions), ``splits.json`` a patient split stratified by body region (so the
held-out patients include every region; loaders use it unless told
otherwise), ``lesions.json`` the lesion boxes per slice (for detection-aware
methods), and ``ground_truth/<patient>.npy`` the noise-free phantom (for noise
statistics: real data has no such thing, the simulation does).

The dataset is cached under ``$LDCT_JAX_CACHE`` (default
``~/.cache/ldct_jax``) in a folder named by a hash of its spec, built in a
temporary folder and renamed into place, so concurrent runs never see a
half-written dataset.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from ldct_jax.data import dicom, phantoms
from ldct_jax.data.pipeline import save_split_file, split_patients
from ldct_jax.physics import ct

# Bump when the generator changes in a way that changes the images.
GENERATOR_VERSION = 2


@dataclasses.dataclass(frozen=True)
class BuiltinSpec:
  """What the built-in dataset contains. Every field changes the cache key.

  ``kernel`` (default ``'ramp'``) is the FBP filter of both series, one of
  ``physics.ct.FILTERS``. ``extra_doses`` (default ``()``) are more dose
  fractions in (0, 1), each written as ``<patient>/dose{f:.3f}_1mm/``; they
  must differ from ``dose_fraction`` and from each other at three decimals.
  At their defaults these two fields are left out of the cache key, so
  existing datasets keep theirs.
  """

  num_patients: int = 8
  num_slices: int = 32
  size: int = 256
  dose_fraction: float = 0.25      # Mayo 2016 quarter dose
  seed: int = 0
  regions: Sequence[str] = ("abdomen", "chest")
  fov_mm: float = 350.0
  slice_thickness_mm: float = 1.0
  # Full-dose photons per detector bin (bins are 1.37 mm at 256^2, ~2x a
  # clinical scanner's, so this is ~2.5e5 per clinical bin: inside Zeng et
  # al.'s 1e5-1e6). Calibrated on the published task difficulty: quarter- vs
  # full-dose PSNR in the abdomen window [-160, 240] HU is 27-29 dB on the
  # abdomen phantoms, as on the Mayo abdomen scans (29.1 dB in ldct-benchmark,
  # 26.1 dB over the RED-CNN papers' test set); see tests/test_builtin.py.
  incident_flux: float = 5e5
  electronic_noise_std: float = float(np.sqrt(11.0))
  kernel: str = "ramp"
  extra_doses: Sequence[float] = ()

  def __post_init__(self):
    if self.kernel not in ct.FILTERS:
      raise ValueError(f"BuiltinSpec.kernel must be one of {ct.FILTERS}, got {self.kernel!r}")
    if not 0.0 < float(self.dose_fraction) <= 1.0:
      raise ValueError(f"BuiltinSpec.dose_fraction must be in (0, 1], got {self.dose_fraction}")
    extra = tuple(float(f) for f in np.atleast_1d(np.asarray(self.extra_doses, np.float64)))
    names = [dose_folder(f) for f in extra]
    if not all(0.0 < f < 1.0 for f in extra):
      raise ValueError(f"BuiltinSpec.extra_doses must be in (0, 1), got {extra}")
    if len(set(names)) != len(names) or dose_folder(self.dose_fraction) in names:
      raise ValueError(f"BuiltinSpec.extra_doses {extra} repeat a dose (or dose_fraction "
                       f"{self.dose_fraction}) at three decimals, the folder names' precision")
    object.__setattr__(self, "extra_doses", extra)

  @classmethod
  def from_config(cls, cfg) -> "BuiltinSpec":
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(cfg).items() if k in fields}
    if "regions" in values:
      values["regions"] = tuple(values["regions"])
    return cls(**values)

  def key(self) -> str:
    payload = {**dataclasses.asdict(self), "regions": list(self.regions),
               "extra_doses": list(self.extra_doses), "version": GENERATOR_VERSION}
    # Fields and markers at their old values stay out, so datasets made before
    # they existed keep their keys (and caches).
    if self.kernel == "ramp":
      del payload["kernel"]
    if not self.extra_doses:
      del payload["extra_doses"]
    if self.extra_doses or self.dose_fraction != _SAME_AS_SEQUENTIAL:
      # Tree thinning draws other numbers than the old sequential one here.
      payload["thinning"] = "tree"
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]

  def patient_ids(self):
    return [f"SIM{i + 1:03d}" for i in range(self.num_patients)]


# The one low dose at which tree thinning (with the full dose) draws exactly what
# the sequential thinning of generator version 2 drew.
_SAME_AS_SEQUENTIAL = 0.25


def dose_folder(fraction: float, thickness: str = "1mm") -> str:
  """The series folder of an extra dose: ``dose0.100_1mm`` for 0.1."""
  return f"dose{float(fraction):.3f}_{thickness}"


def default_cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("LDCT_JAX_CACHE", "~/.cache/ldct_jax")).expanduser()


def builtin_root(spec: BuiltinSpec, cache_dir=None) -> pathlib.Path:
  base = pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
  return base / f"builtin_{spec.key()}"


def ensure_builtin_dataset(spec: BuiltinSpec = BuiltinSpec(), cache_dir=None,
                           *, verbose: bool = True) -> pathlib.Path:
  """Returns the root of the built-in dataset, generating it on first use."""

  def generate(out: pathlib.Path) -> dict:
    _generate(spec, out)
    return {"spec": {**dataclasses.asdict(spec), "regions": list(spec.regions),
                     "extra_doses": list(spec.extra_doses)},
            "generator_version": GENERATOR_VERSION, "layout": "mayo",
            "kernel": spec.kernel,
            "doses": {name: dose for name, dose in _series(spec)},
            "patients": spec.patient_ids()}

  return build_cached_dataset(
      builtin_root(spec, cache_dir), generate, verbose=verbose, what="built-in dataset",
      details=f"{spec.num_patients} patients x {spec.num_slices} slices of {spec.size}^2")


def build_cached_dataset(root: pathlib.Path, generate: Callable[[pathlib.Path], dict], *,
                         what: str, details: str, verbose: bool = True) -> pathlib.Path:
  """Generates a dataset at ``root`` once (the CT and MRI built-in data).

  ``generate(folder)`` writes the files into a fresh temporary sibling of
  ``root`` and returns the contents of its ``dataset.json`` (written last,
  with the generation time); the folder is then renamed into place, so a
  killed generation leaves no half dataset and concurrent processes building
  the same dataset are safe (the first rename wins; theirs is identical).
  """
  if (root / "dataset.json").exists():
    return root
  root.parent.mkdir(parents=True, exist_ok=True)
  start = time.time()
  if verbose:
    print(f"ldct_jax: generating the {what} ({details}) in {root}", flush=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=root.parent))
  try:
    meta = generate(tmp)
    with open(tmp / "dataset.json", "w") as f:
      json.dump({**meta, "generation_seconds": round(time.time() - start, 2)}, f, indent=2)
    try:
      os.rename(tmp, root)
    except OSError:
      if not (root / "dataset.json").exists():
        raise
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  if verbose:
    print(f"ldct_jax: {what} ready in {time.time() - start:.1f} s", flush=True)
  return root


def _generate(spec: BuiltinSpec, out: pathlib.Path) -> None:
  lesions, ground_truth_dir = {}, out / "ground_truth"
  ground_truth_dir.mkdir()
  key = jax.random.PRNGKey(spec.seed)
  for index, patient_id in enumerate(spec.patient_ids()):
    region = spec.regions[index % len(spec.regions)]
    volume = phantoms.make_volume(
        spec.seed * 100_003 + index, region=region, size=spec.size,
        num_slices=spec.num_slices, slice_thickness_mm=spec.slice_thickness_mm,
        fov_mm=spec.fov_mm)
    # One full-dose photon draw (its key depends on seed and patient only),
    # every dose thinned from it (see the module docstring).
    series = _series(spec)
    images = np.asarray(ct.simulate_dose_levels(
        volume.hu, tuple(dose for _, dose in series), jax.random.fold_in(key, index),
        incident_flux=spec.incident_flux, electronic_noise_std=spec.electronic_noise_std,
        pixel_size=float(volume.pixel_spacing_mm), filter=spec.kernel, thinning="tree"))
    spacing = (spec.slice_thickness_mm, volume.pixel_spacing_mm, volume.pixel_spacing_mm)
    for (dose_dir, dose), volume_hu in zip(series, images):
      if dose_dir == "full_1mm":
        tag, description = "FD", "Full Dose Images (simulated)"
      elif dose_dir == "quarter_1mm":
        tag, description = "QD", f"Low Dose Images (simulated, {dose:g} dose)"
      else:
        tag, description = f"D{dose:.3f}", f"Low Dose Images (simulated, {dose:g} dose)"
      # The filter goes in ConvolutionKernel only when it is not the default,
      # so the default dataset's files carry the same tags as before.
      tags = {"BodyPartExamined": region.upper()}
      if spec.kernel != "ramp":
        tags["ConvolutionKernel"] = spec.kernel
      dicom.write_series(
          volume_hu, out / patient_id / dose_dir, spacing=spacing, patient_id=patient_id,
          series_description=description, filename_prefix=f"{patient_id}_{tag}_1_1.CT.",
          extension=".IMA", extra_tags=tags)
    np.save(ground_truth_dir / f"{patient_id}.npy", volume.hu.astype(np.float32))
    lesions[patient_id] = {
        "region": region,
        "lesions": [{"label": l.label, "kind": l.kind, "box_zyx": list(map(int, l.box)),
                     "radius_mm": float(l.radius_mm), "contrast_hu": float(l.contrast_hu)}
                    for l in volume.lesions]}
  with open(out / "lesions.json", "w") as f:
    json.dump(lesions, f, indent=1)
  save_split_file(out / "splits.json", stratified_split(spec),
                  metadata={"stratified_by": "region", "fractions": list(SPLIT_FRACTIONS)})


def _series(spec: BuiltinSpec):
  """``[(folder, dose fraction)]``: full, quarter (the paired low dose), extras."""
  return ([("full_1mm", 1.0), ("quarter_1mm", float(spec.dose_fraction))] +
          [(dose_folder(f), f) for f in spec.extra_doses])


# Patient-level train/val/test fractions of the shipped split.
SPLIT_FRACTIONS = (0.5, 0.25, 0.25)


def stratified_split(spec: BuiltinSpec) -> dict:
  """Splits each region's patients by ``SPLIT_FRACTIONS`` and merges the splits."""
  by_region = {}
  for index, patient_id in enumerate(spec.patient_ids()):
    by_region.setdefault(spec.regions[index % len(spec.regions)], []).append(patient_id)
  merged = {"train": [], "val": [], "test": []}
  for region_index, ids in enumerate(sorted(by_region.values())):
    part = split_patients(ids, SPLIT_FRACTIONS, spec.seed + region_index)
    for name in merged:
      merged[name] += part[name]
  return {name: sorted(ids) for name, ids in merged.items()}


def load_extra_doses(root, patient_id: str) -> dict:
  """``{dose fraction: (D, H, W) float32 HU}`` of a built-in patient's extra doses.

  Reads the ``dose*_1mm`` series that ``dataset.json`` lists (``{}`` when it
  lists none, e.g. a dataset made without ``extra_doses``).
  """
  root = pathlib.Path(root)
  meta_path = root / "dataset.json"
  if not meta_path.exists():
    raise FileNotFoundError(f"{meta_path} not found: {root} is not a built-in dataset")
  with open(meta_path) as f:
    meta = json.load(f)
  if patient_id not in meta.get("patients", []):
    raise KeyError(f"{root}: no built-in patient {patient_id!r} (has {meta.get('patients')})")
  out = {}
  for name, dose in meta.get("doses", {}).items():
    if name in ("full_1mm", "quarter_1mm"):
      continue
    folder = root / patient_id / name
    if not folder.is_dir():
      raise FileNotFoundError(f"{folder}: dataset.json lists dose {dose} but the folder is missing")
    out[float(dose)] = dicom.read_series(folder).hu.astype(np.float32)
  return out


def load_ground_truth(root, patient_id: str) -> Optional[np.ndarray]:
  """The noise-free phantom (D, H, W) HU of a built-in patient, or None for real data."""
  path = pathlib.Path(root) / "ground_truth" / f"{patient_id}.npy"
  return np.load(path) if path.exists() else None
