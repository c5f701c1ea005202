"""The built-in MRI dataset: brain slices made into noisy single-coil k-space, written as fastMRI files.

A newcomer has no raw k-space (no package ships any), so the project makes
its own from magnitude images and feeds it through the same fastMRI reader
as real data (``data.fastmri``), as ``data.builtin`` does for CT:

* ONE real anatomy: the MNI152 T1 template (ICBM 2009a nonlinear symmetric,
  197 x 233 x 189 at 1 mm, skull-stripped, 8-bit) shipped inside the
  ``nilearn`` wheel. Its file is located with ``importlib.util.find_spec``
  (nilearn itself is never imported) and read with ``nibabel``. Axial slices
  are taken evenly through the slab where the brain covers at least 60% of
  its largest cross-section, oriented anterior-up (233 rows x 197 columns);
* ``num_phantoms`` MR brain phantoms of our own (``make_phantom``): 3D
  ellipsoid heads (scalp fat, skull, CSF rim, gray matter with a folded
  gray/white boundary, white matter, ventricles, deep gray nuclei, 0-3
  lesions), random per subject seed, in T1-, T2- or PD-weighted contrast
  (``TISSUE_INTENSITY``, cycled over the subjects, intensities jittered by
  +-10%), with a smooth multiplicative bias field and a fine texture.

Every subject's magnitude volume is scaled to a maximum of 1 and made into
k-space slice by slice: ``k = fft2c(image * exp(i phi)) + n`` with a smooth
synthetic phase ``phi`` (a random quadratic polynomial plus a Gaussian bump
in the image coordinates, up to a few radians) and complex white Gaussian
noise with ``E|n|^2 = sigma^2``, ``sigma = noise_level`` (relative to the
volume's maximum magnitude, 1; the orthonormal FFT gives image-domain noise
of the same sigma). With ``readout_oversampling = 2`` the image is zero
padded to twice its rows first, like the fastMRI knee data.

The target (``reconstruction_esc``) follows fastMRI: the magnitude of the
FULLY SAMPLED, NOISY k-space's inverse FFT, centre-cropped to the image size,
so the scores mean what fastMRI's mean. The noise-free magnitudes are saved
next to the files as ``ground_truth/<subject>.npy`` (``load_ground_truth``),
which real data never has.

Layout: ``<root>/<subject>.h5`` (``mni152.h5``, ``phantom001.h5``, ...),
``dataset.json`` (spec, versions, subjects and their contrasts, the MNI
slice indices, conventions), ``splits.json`` (by subject, never by slice):
the MNI brain, the one real anatomy, is always held out for TEST; the
phantoms are split per contrast by ``SPLIT_FRACTIONS`` (train/val/test),
so every split sees every contrast. The default (15 phantoms) gives 9
train, 3 val and 3 test phantoms, plus the MNI brain in test.

Size: ``size = 128`` (the default) resamples every slice to 128 x 128 (the
MNI slices cropped to the brain's bounding box over the subject plus 6
voxels, zero-padded to a square, then linearly interpolated, so the brain
fills the field of view as the phantoms' heads do): CPU training stays fast. ``size = 0`` keeps the template's native 233 x 197
grid (non-square; phantoms are made on the same grid).

Cached under ``$LDCT_JAX_CACHE`` (default ``~/.cache/ldct_jax``) as
``builtin_mri_<hash of the spec>``, built in a temporary folder and renamed
into place, so concurrent runs never see a half-written dataset.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import pathlib
from typing import Optional, Tuple

import numpy as np
from scipy import ndimage

from ldct_jax.data import fastmri
from ldct_jax.data.builtin import build_cached_dataset, default_cache_dir
from ldct_jax.data.pipeline import save_split_file, split_patients
from ldct_jax.errors import InputError

# Bump when the generator changes in a way that changes the data.
GENERATOR_VERSION = 1

MNI_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
MNI_ID = "mni152"
MNI_NATIVE_SHAPE = (233, 197)  # rows (posterior-anterior, anterior up) x columns (left-right)
# Slices come from the slab whose brain area is at least this fraction of the largest.
MNI_SLAB_AREA = 0.6

CONTRASTS = ("T1", "T2", "PD")
# Relative tissue intensities of each weighting (typical orderings at 1.5-3 T:
# T1w WM > GM > CSF with bright fat; T2w CSF brightest, WM darkest; PDw
# flat, CSF ~ GM > WM). Lesions are T1-hypo, T2/PD-hyperintense.
TISSUES = ("background", "scalp", "skull", "csf", "gray", "white", "lesion")
TISSUE_INTENSITY = {
    "T1": {"scalp": 0.95, "skull": 0.08, "csf": 0.15, "gray": 0.55, "white": 0.80, "lesion": 0.35},
    "T2": {"scalp": 0.55, "skull": 0.05, "csf": 1.00, "gray": 0.65, "white": 0.45, "lesion": 0.90},
    "PD": {"scalp": 0.90, "skull": 0.10, "csf": 0.90, "gray": 0.80, "white": 0.65, "lesion": 0.85},
}

# Subject-level train/val/test fractions of the phantoms, per contrast.
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)


@dataclasses.dataclass(frozen=True)
class BuiltinMRISpec:
  """What the built-in MRI dataset contains. Every field changes the cache key.

  Attributes:
    num_phantoms: phantom subjects (contrasts cycle T1, T2, PD).
    slices_per_subject: axial slices per subject (one file each).
    size: slices resampled to ``size x size``; 0 keeps the MNI template's
      native 233 x 197 grid.
    noise_level: complex k-space noise std relative to the volume maximum.
    include_mni: add the MNI152 T1 template as a subject (needs nilearn's
      wheel, which ships it, and nibabel).
    readout_oversampling: k-space rows per image row (2 = fastMRI knee-like).
    seed: seed of the phantoms, phases, noise and split.
  """

  num_phantoms: int = 15
  slices_per_subject: int = 16
  size: int = 128
  noise_level: float = 0.01
  include_mni: bool = True
  readout_oversampling: int = 1
  seed: int = 0

  def __post_init__(self):
    if self.num_phantoms < 0 or self.slices_per_subject < 1:
      raise ValueError(f"BuiltinMRISpec needs num_phantoms >= 0 and slices_per_subject >= 1, "
                       f"got {self.num_phantoms} and {self.slices_per_subject}")
    if self.size != 0 and self.size < 16:
      raise ValueError(f"BuiltinMRISpec.size must be 0 (native) or >= 16, got {self.size}")
    if self.readout_oversampling < 1 or self.noise_level < 0:
      raise ValueError("BuiltinMRISpec: readout_oversampling >= 1 and noise_level >= 0 needed")
    if self.num_phantoms + int(self.include_mni) == 0:
      raise ValueError("BuiltinMRISpec: no subjects (num_phantoms=0, include_mni=False)")

  @classmethod
  def from_config(cls, cfg) -> "BuiltinMRISpec":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(dict(cfg)) - fields)
    if unknown:
      raise InputError(f"data.builtin_mri: unknown fields {unknown}; known: {sorted(fields)}")
    return cls(**dict(cfg))

  @property
  def shape(self) -> Tuple[int, int]:
    """(H, W) of every image (before readout oversampling)."""
    return MNI_NATIVE_SHAPE if self.size == 0 else (self.size, self.size)

  def key(self) -> str:
    payload = {**dataclasses.asdict(self), "version": GENERATOR_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]

  def subject_ids(self) -> list:
    return ([MNI_ID] if self.include_mni else []) + [
        f"phantom{i + 1:03d}" for i in range(self.num_phantoms)]

  def contrast(self, subject_id: str) -> str:
    if subject_id == MNI_ID:
      return "T1"
    return CONTRASTS[(int(subject_id[len("phantom"):]) - 1) % len(CONTRASTS)]


def builtin_mri_root(spec: BuiltinMRISpec, cache_dir=None) -> pathlib.Path:
  base = pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
  return base / f"builtin_mri_{spec.key()}"


def ensure_builtin_mri(spec: BuiltinMRISpec = BuiltinMRISpec(), cache_dir=None, *,
                       verbose: bool = True) -> pathlib.Path:
  """Returns the root of the built-in MRI dataset, generating it on first use."""

  def generate(out: pathlib.Path) -> dict:
    meta = _generate(spec, out)
    return {**meta, "spec": dataclasses.asdict(spec), "generator_version": GENERATOR_VERSION,
            "layout": "fastMRI single-coil"}

  return build_cached_dataset(
      builtin_mri_root(spec, cache_dir), generate, verbose=verbose,
      what="built-in MRI dataset",
      details=f"{len(spec.subject_ids())} subjects x {spec.slices_per_subject} slices of "
              f"{spec.shape[0]}x{spec.shape[1]}")


def load_ground_truth(root, subject_id: str) -> Optional[np.ndarray]:
  """Noise-free magnitudes ``(slices, H, W)`` of a built-in subject, or None for real data."""
  path = pathlib.Path(root) / "ground_truth" / f"{subject_id}.npy"
  return np.load(path) if path.exists() else None


# ----------------------------------------------------------------------- MNI152


def mni_template_path() -> pathlib.Path:
  """The MNI152 T1 template inside the installed nilearn package (nilearn is not imported)."""
  spec = importlib.util.find_spec("nilearn")
  if spec is None or not spec.submodule_search_locations:
    raise InputError("the built-in MRI data reads the MNI152 template shipped with nilearn: "
                     "pip install nilearn==0.14.1, or set data.builtin_mri.include_mni=False")
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / MNI_FILE
  if not path.is_file():
    raise InputError(f"{path}: the MNI152 template is missing from this nilearn install "
                     "(nilearn==0.14.1 ships it)")
  return path


def mni_slice_indices(volume: np.ndarray, num_slices: int) -> np.ndarray:
  """Axial indices (last axis) spread evenly over the slab of large brain cross-sections."""
  area = (volume > 0.1 * volume.max()).sum(axis=(0, 1))
  slab = np.flatnonzero(area >= MNI_SLAB_AREA * area.max())
  return np.unique(np.round(np.linspace(slab[0], slab[-1], num_slices)).astype(int))


def mni_slices(num_slices: int) -> Tuple[np.ndarray, np.ndarray]:
  """``(indices, images)``: native ``(n, 233, 197)`` axial slices in [0, 1], anterior up."""
  import nibabel  # only the built-in MRI data needs it
  volume = np.asarray(nibabel.load(str(mni_template_path())).dataobj, np.float32)
  indices = mni_slice_indices(volume, num_slices)
  # (x, y, z) RAS voxels -> rows = y reversed (anterior at the top), columns = x.
  images = np.stack([volume[:, :, z].T[::-1] for z in indices]) / volume.max()
  return indices, np.ascontiguousarray(images, np.float32)


def crop_to_content(images: np.ndarray, margin: int = 6) -> np.ndarray:
  """Crops ``(n, h, w)`` to the bounding box of non-zero pixels over all slices, plus ``margin``."""
  rows = np.flatnonzero(images.max(axis=(0, 2)) > 0)
  cols = np.flatnonzero(images.max(axis=(0, 1)) > 0)
  top, bottom = max(rows[0] - margin, 0), min(rows[-1] + margin + 1, images.shape[1])
  left, right = max(cols[0] - margin, 0), min(cols[-1] + margin + 1, images.shape[2])
  return images[:, top:bottom, left:right]


def fit_to_shape(images: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
  """Zero-pads ``(n, h, w)`` images to a square, then linearly resamples them to ``shape``."""
  if images.shape[1:] == tuple(shape):
    return images
  n, h, w = images.shape
  side = max(h, w)
  square = np.zeros((n, side, side), np.float32)
  top, left = (side - h) // 2, (side - w) // 2
  square[:, top:top + h, left:left + w] = images
  zoom = (1.0, shape[0] / side, shape[1] / side)
  return np.clip(ndimage.zoom(square, zoom, order=1, grid_mode=True, mode="grid-constant"),
                 0.0, None).astype(np.float32)


# --------------------------------------------------------------------- phantoms


def make_phantom(seed: int, shape: Tuple[int, int], num_slices: int,
                 contrast: str) -> Tuple[np.ndarray, np.ndarray]:
  """A random brain phantom: ``(image, labels)``, each ``(num_slices, H, W)``.

  ``labels`` index ``TISSUES``; ``image`` is the contrast's tissue intensities
  (jittered by +-10% per subject) times a smooth bias field (+-10%) plus a
  fine texture (2% of the tissue intensity), slightly blurred (partial
  volume), scaled to a maximum of 1. Slices are axial cuts of one 3D head
  at heights spread over [-0.3, 0.3] of its half-height, so neighbouring
  slices are correlated like a real volume's.
  """
  if contrast not in TISSUE_INTENSITY:
    raise ValueError(f"contrast must be one of {CONTRASTS}, got {contrast!r}")
  rng = np.random.default_rng(seed)
  height, width = shape
  # Normalised coordinates: the longer side spans [-1, 1], pixels square.
  scale = max(height, width) / 2.0
  yy = (np.arange(height) - (height - 1) / 2.0) / scale
  xx = (np.arange(width) - (width - 1) / 2.0) / scale
  zz = np.linspace(-0.3, 0.3, num_slices)
  z, y, x = np.meshgrid(zz, yy, xx, indexing="ij")
  angle = rng.uniform(-0.2, 0.2)
  x, y = (np.cos(angle) * x - np.sin(angle) * y + rng.uniform(-0.04, 0.04),
          np.sin(angle) * x + np.cos(angle) * y + rng.uniform(-0.04, 0.04))

  def rho(cx, cy, cz, ax, ay, az):
    return np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2)

  head_ax, head_ay = rng.uniform(0.68, 0.80), rng.uniform(0.84, 0.94)
  head = rho(0, 0, 0, head_ax, head_ay, 1.0)
  scalp, skull = rng.uniform(0.05, 0.08), rng.uniform(0.05, 0.08)
  brain = head / (1.0 - scalp - skull)
  labels = np.zeros(x.shape, np.int8)
  labels[head <= 1.0] = TISSUES.index("scalp")
  labels[head <= 1.0 - scalp] = TISSUES.index("skull")
  labels[brain <= 1.0] = TISSUES.index("csf")
  # Cortex: a gray band under a folded pial surface, over white matter folded
  # the same way but deeper (gyri); CSF fills the sulci up to the skull. The
  # folds are a smooth random field (correlation ~4% of the head) on the
  # radial coordinate, so the boundaries meander as cortex does.
  pixels = max(height, width)
  field = ndimage.gaussian_filter(rng.standard_normal(x.shape),
                                  (1.0, 0.02 * pixels, 0.02 * pixels), mode="wrap")
  folds = 0.035 * field / (field.std() + 1e-12)
  pial = 0.93 + folds
  labels[brain <= pial] = TISSUES.index("gray")
  labels[brain <= pial - rng.uniform(0.08, 0.11) + 1.5 * folds] = TISSUES.index("white")
  # Deep gray nuclei and the lateral ventricles, mirrored about the midline.
  dy = rng.uniform(-0.08, 0.04)
  for side in (-1, 1):
    nuclei = rho(side * rng.uniform(0.17, 0.22), dy + 0.05, 0, 0.07, 0.12, 0.2)
    labels[nuclei <= 1.0] = TISSUES.index("gray")
    ventricle = rho(side * rng.uniform(0.05, 0.08), dy, 0, rng.uniform(0.04, 0.07),
                    rng.uniform(0.18, 0.26), 0.35)
    labels[ventricle <= 1.0] = TISSUES.index("csf")
  for _ in range(rng.integers(0, 4)):
    r = rng.uniform(0.02, 0.06)
    cx, cy, cz = rng.uniform(-0.35, 0.35), rng.uniform(-0.4, 0.4), rng.uniform(-0.3, 0.3)
    lesion = rho(cx, cy, cz, r, r * rng.uniform(0.7, 1.4), r * 2)
    labels[(lesion <= 1.0) & (labels == TISSUES.index("white"))] = TISSUES.index("lesion")

  values = np.zeros(len(TISSUES))
  for i, tissue in enumerate(TISSUES[1:], start=1):
    values[i] = TISSUE_INTENSITY[contrast][tissue] * rng.uniform(0.9, 1.1)
  image = values[labels]
  coefficients = rng.uniform(-0.1, 0.1, size=3)
  bias = 1.0 + coefficients[0] * x + coefficients[1] * y + coefficients[2] * (x * x - y * y)
  texture = ndimage.gaussian_filter(rng.standard_normal(x.shape), (0, 1.0, 1.0))
  texture /= texture.std() + 1e-12
  image = image * bias * (1.0 + 0.02 * texture) * (labels > 0)
  image = ndimage.gaussian_filter(image, (0, 0.6, 0.6))
  return (image / image.max()).astype(np.float32), labels


# -------------------------------------------------------------------- k-space


def smooth_phase(rng: np.random.Generator, shape: Tuple[int, int], num_slices: int) -> np.ndarray:
  """``(num_slices, H, W)`` smooth phase: a random quadratic polynomial plus a Gaussian bump."""
  height, width = shape
  scale = max(height, width) / 2.0
  y, x = np.meshgrid((np.arange(height) - height / 2) / scale,
                     (np.arange(width) - width / 2) / scale, indexing="ij")
  c = rng.uniform(-1.0, 1.0, size=6) * np.array([np.pi, 1.5, 1.5, 0.8, 0.8, 0.8])
  base = c[0] + c[1] * x + c[2] * y + c[3] * x * x + c[4] * y * y + c[5] * x * y
  bump_y, bump_x, width_bump = rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5), rng.uniform(0.2, 0.5)
  bump = rng.uniform(-1.5, 1.5) * np.exp(-((x - bump_x) ** 2 + (y - bump_y) ** 2) /
                                         (2 * width_bump ** 2))
  drift = rng.uniform(-0.3, 0.3) * np.linspace(-1, 1, num_slices)  # slow change across slices
  return base[None] + bump[None] + drift[:, None, None] * x[None]


def to_kspace(image: np.ndarray, phase: np.ndarray, noise_std: float,
              rng: np.random.Generator, oversampling: int = 1) -> np.ndarray:
  """``fft2c(pad(image e^{i phase})) + n``, ``E|n|^2 = noise_std^2``; rows zero-padded x oversampling."""
  complex_image = image.astype(np.float64) * np.exp(1j * phase)
  if oversampling > 1:
    rows = image.shape[-2]
    pad = (oversampling - 1) * rows
    complex_image = np.pad(complex_image, ((0, 0), (pad // 2, pad - pad // 2), (0, 0)))
  axes = (-2, -1)
  k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(complex_image, axes=axes), axes=axes,
                                  norm="ortho"), axes=axes)
  noise = rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape)
  return (k + noise_std / np.sqrt(2.0) * noise).astype(np.complex64)


def _generate(spec: BuiltinMRISpec, out: pathlib.Path) -> dict:
  ground_truth_dir = out / "ground_truth"
  ground_truth_dir.mkdir()
  shape, subjects = spec.shape, {}
  mni_indices = None
  for subject in spec.subject_ids():
    contrast = spec.contrast(subject)
    if subject == MNI_ID:
      mni_indices, native = mni_slices(spec.slices_per_subject)
      image = native if spec.size == 0 else fit_to_shape(crop_to_content(native), shape)
      image /= image.max()
      source = f"MNI152 T1 template (nilearn {MNI_FILE}), axial slices {mni_indices.tolist()}"
    else:
      image, _ = make_phantom(_seed(spec, subject, "anatomy"), shape, spec.slices_per_subject,
                              contrast)
      source = f"phantom ({contrast}-weighted)"
    rng = np.random.default_rng(_seed(spec, subject, "acquisition"))
    phase = smooth_phase(rng, shape, image.shape[0])
    kspace = to_kspace(image, phase, spec.noise_level, rng, spec.readout_oversampling)
    axes = (-2, -1)
    full = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(kspace, axes=axes), axes=axes,
                                        norm="ortho"), axes=axes)
    top = (full.shape[-2] - shape[0]) // 2
    target = np.abs(full[:, top:top + shape[0], :]).astype(np.float32)
    fastmri.write_fastmri_file(
        out / f"{subject}.h5", kspace, target, recon_key="reconstruction_esc",
        attrs={"acquisition": f"SIMULATED_{contrast}", "patient_id": subject,
               "contrast": contrast, "noise_std": float(spec.noise_level),
               "source": source})
    np.save(ground_truth_dir / f"{subject}.npy", image.astype(np.float32))
    subjects[subject] = {"contrast": contrast, "source": source, "slices": int(image.shape[0])}
  splits = subject_split(spec)
  save_split_file(out / "splits.json", splits,
                  metadata={"by": "subject", "mni152": "always test (the one real anatomy)",
                            "phantoms": f"per contrast, fractions {list(SPLIT_FRACTIONS)}, "
                                        f"seed {spec.seed}"})
  return {
      "subjects": subjects,
      "mni_slice_indices": None if mni_indices is None else mni_indices.tolist(),
      "conventions": {
          "kspace": "fft2c(image * exp(i phase)) + complex Gaussian noise, centred orthonormal "
                    "FFT, phase-encode = last axis",
          "noise": f"E|n|^2 = noise_level^2 = {spec.noise_level ** 2:g}; each volume's "
                   "noise-free magnitude has maximum 1",
          "target": "reconstruction_esc = |ifft2c(fully sampled noisy k-space)|, centre-cropped "
                    "(fastMRI); noise-free magnitudes in ground_truth/<subject>.npy",
      },
  }


def _seed(spec: BuiltinMRISpec, subject: str, stream: str) -> int:
  """A 32-bit seed per (dataset seed, subject, stream): a subject's data do not depend on
  which other subjects the dataset has."""
  digest = hashlib.sha256(f"{spec.seed}:{subject}:{stream}".encode()).digest()
  return int.from_bytes(digest[:4], "little")


def subject_split(spec: BuiltinMRISpec) -> dict:
  """The MNI brain in test; phantoms split per contrast by ``SPLIT_FRACTIONS`` (see the docstring).

  With fewer than 3 phantoms of some contrast, the phantoms are split
  together instead (per-contrast splits of 1-2 subjects would leave splits
  empty).
  """
  phantoms = [s for s in spec.subject_ids() if s != MNI_ID]
  groups = {}
  for subject in phantoms:
    groups.setdefault(spec.contrast(subject), []).append(subject)
  if not groups or min(len(g) for g in groups.values()) < 3:
    groups = {"all": phantoms}
  merged = {"train": [], "val": [], "test": []}
  for offset, (_, ids) in enumerate(sorted(groups.items())):
    if not ids:
      continue
    part = split_patients(ids, SPLIT_FRACTIONS, spec.seed + offset)
    for name in merged:
      merged[name] += part[name]
  if spec.include_mni:
    merged["test"].append(MNI_ID)
  return {name: sorted(ids) for name, ids in merged.items()}
