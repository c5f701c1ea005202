"""Image-quality metrics for LDCT / MRI denoising, as pure ``jax.numpy`` functions.

Conventions (read these before comparing numbers with a paper):

* Images are NHWC float arrays ``(B, H, W, C)``; every image metric returns one
  value per image, shape ``(B,)``, so evaluation code can sum values and count
  images per patient and across devices and get exact means.
* Every metric that depends on an intensity scale takes ``data_range``
  explicitly (no guessing from the dtype or from the image maximum). It is a
  scalar or a ``(B,)`` array (e.g. fastMRI's per-volume maximum).
* ``psnr`` and ``ssim`` equal ``skimage.metrics.peak_signal_noise_ratio`` and
  ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=...)`` (Wang et al. 2004 settings,
  scipy 'reflect' borders, mean over the map cropped by ``(win_size - 1) // 2``).
* HU images: ``window_metrics`` maps both images through a named HU window
  (``ldct_jax.windows``) to ``[0, 1]`` and uses ``data_range = 1``; the returned
  dict carries the window and data range so a stored number can be reproduced.
  ``rmse(pred_hu, target_hu)`` on un-windowed images is the RMSE in HU.

How this maps to published evaluation code:

* SSinyu RED-CNN / WGAN-VGG (``measure.py``): images truncated to
  [-160, 240] HU, ``data_range = 400``. Their PSNR equals ours with
  ``window='paper'`` and ``data_range = 1`` (PSNR is invariant to the affine map
  HU -> [0, 1] when the data range is mapped with it). Their SSIM does NOT:
  SSIM's luminance term ``(2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)`` is not
  invariant to the -160 HU offset, and their filter zero-pads the borders and
  averages the whole map. To get SSIM on their intensity scale call
  ``ssim(jnp.clip(hu, -160, 240), ..., data_range=400)`` (still with skimage's
  border handling, so close to but not equal to theirs). Measured on pydicom's
  128x128 CT_small slice with 25 HU white noise: 0.822 with their method
  (re-derived in NumPy), 0.817 with ours on truncated HU, 0.836 with ours on
  the 'paper' window; PSNR agrees to 1e-4 dB.
* ldct-benchmark (Eulig et al. 2024): PSNR/SSIM after a per-exam window mapped
  to [0, 1] with data range 1, i.e. ``window_metrics(..., window)``. Their SSIM
  is skimage's default (uniform 7x7 window, sample covariance): pass
  ``gaussian_weights=False, win_size=7, use_sample_covariance=True``. Their
  window uses the DICOM ``(center - 0.5, width - 1)`` formula, which changes
  the [0, 1] images by at most ``1 / (width - 1)`` relative to ours.

All functions here are jit-able (shapes and Python options are static) and,
except the GLCM quantisation, differentiable.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ldct_jax import windows

# Wang, Simoncelli & Bovik 2003, Table/Eq. for 5 scales (they sum to 0.9999).
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)

# skimage/scipy cut the Gaussian at 3.5 sigma: an 11-tap filter for sigma 1.5.
_GAUSSIAN_TRUNCATE = 3.5

DataRange = Union[float, jnp.ndarray]


def _as_float(x) -> jnp.ndarray:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_nhwc_pair(x, ref, name: str):
  if x.ndim != 4 or x.shape != ref.shape:
    raise ValueError(
        f"{name} expects two NHWC (B, H, W, C) arrays of equal shape, "
        f"got {x.shape} and {ref.shape}")


def _per_image(value: DataRange, ndim: int) -> jnp.ndarray:
  """Shapes a scalar or ``(B,)`` value to broadcast against rank-``ndim`` arrays."""
  value = _as_float(value)
  if value.ndim == 0:
    return value
  if value.ndim != 1:
    raise ValueError(f"data_range must be a scalar or shape (B,), got {value.shape}")
  return value.reshape((-1,) + (1,) * (ndim - 1))


def _mean_squared_error(x, ref) -> jnp.ndarray:
  return jnp.mean(jnp.square(x - ref), axis=(1, 2, 3))


def psnr(x, ref, data_range: DataRange) -> jnp.ndarray:
  """Peak signal-to-noise ratio in dB, ``10 log10(data_range^2 / MSE)``.

  Args:
    x: test images, NHWC ``(B, H, W, C)``, any intensity scale.
    ref: reference images, same shape and scale as ``x``.
    data_range: max - min of the intensity scale (1 for windowed [0, 1]
      images; the window width for HU); scalar or shape ``(B,)``.

  Returns:
    ``(B,)`` PSNR per image; ``+inf`` where ``x == ref``.
  """
  x, ref = _as_float(x), _as_float(ref)
  _check_nhwc_pair(x, ref, "psnr")
  data_range = _per_image(data_range, 1)
  return 10.0 * jnp.log10(jnp.square(data_range) / _mean_squared_error(x, ref))


def rmse(x, ref) -> jnp.ndarray:
  """Root-mean-square error per NHWC image, ``(B,)``, in the units of the inputs.

  On raw HU images this is the RMSE in HU; on windowed images it is a fraction
  of the window width.
  """
  x, ref = _as_float(x), _as_float(ref)
  _check_nhwc_pair(x, ref, "rmse")
  return jnp.sqrt(_mean_squared_error(x, ref))


def snr(x, ref) -> jnp.ndarray:
  """Signal-to-noise ratio in dB, ``10 log10(sum ref^2 / sum (x - ref)^2)``, ``(B,)``.

  Depends on the zero of the intensity scale (HU and HU + 1024 give different
  values); state which one you used.
  """
  x, ref = _as_float(x), _as_float(ref)
  _check_nhwc_pair(x, ref, "snr")
  signal = jnp.sum(jnp.square(ref), axis=(1, 2, 3))
  noise = jnp.sum(jnp.square(x - ref), axis=(1, 2, 3))
  return 10.0 * jnp.log10(signal / noise)


def _gaussian_taps(sigma: float) -> np.ndarray:
  """1-D Gaussian weights as scipy.ndimage.gaussian_filter builds them (float64)."""
  radius = int(_GAUSSIAN_TRUNCATE * sigma + 0.5)
  offsets = np.arange(-radius, radius + 1, dtype=np.float64)
  taps = np.exp(-0.5 * (offsets / sigma) ** 2)
  return taps / taps.sum()


def _filter_2d(images, taps: np.ndarray) -> jnp.ndarray:
  """Separable filter over H and W of NHWC images, scipy 'reflect' borders.

  scipy's 'reflect' (d c b a | a b c d | d c b a) is NumPy's 'symmetric' pad.
  Shifted slices keep the arithmetic a plain weighted sum, which is exact in
  the same way as scipy's correlate1d and cheap for 11 taps.
  """
  radius = (len(taps) - 1) // 2
  for axis in (1, 2):
    pad = [(0, 0)] * images.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(images, pad, mode="symmetric")
    size = images.shape[axis]
    images = sum(
        float(tap) * jax.lax.slice_in_dim(padded, k, k + size, axis=axis)
        for k, tap in enumerate(taps))
  return images


def gaussian_blur(images, sigma: float) -> jnp.ndarray:
  """Gaussian filter over H and W of NHWC images, as SSIM uses it.

  Equals ``scipy.ndimage.gaussian_filter(images, (0, sigma, sigma, 0),
  mode='reflect', truncate=3.5)``; ``sigma`` in pixels. The reflect border
  keeps the image sum unchanged when the filter is shorter than the image.
  """
  return _filter_2d(_as_float(images), _gaussian_taps(sigma))


def _crop(images, border: int) -> jnp.ndarray:
  if border == 0:
    return images
  return images[:, border:-border, border:-border, :]


def _ssim_maps(x, ref, data_range, *, win_size: int, sigma: float, k1: float,
               k2: float, gaussian_weights: bool, use_sample_covariance: bool):
  """Luminance and contrast-structure maps, cropped as skimage crops SSIM.

  Returns ``(luminance, contrast_structure)``, each ``(B, H - 2p, W - 2p, C)``
  with ``p = (win_size - 1) // 2``; SSIM is their product.
  """
  if win_size % 2 != 1:
    raise ValueError(f"win_size must be odd, got {win_size}")
  if min(x.shape[1:3]) < win_size:
    raise ValueError(
        f"images of size {x.shape[1:3]} are smaller than win_size={win_size}")
  if gaussian_weights:
    taps = _gaussian_taps(sigma)
  else:
    taps = np.full(win_size, 1.0 / win_size)
  # Variances are shift invariant, so compute them on mean-free images: in
  # float32, E[x^2] - E[x]^2 cancels digits when intensities sit far from 0
  # (SSIM off by ~1e-5 at a +3000 offset with data range 100; ~3e-7 shifted).
  # The filters' weights sum to one, so the local means shift back exactly.
  x_shift = jax.lax.stop_gradient(jnp.mean(x, axis=(1, 2), keepdims=True))
  ref_shift = jax.lax.stop_gradient(jnp.mean(ref, axis=(1, 2), keepdims=True))
  x0, ref0 = x - x_shift, ref - ref_shift
  channels = x.shape[-1]
  stacked = jnp.concatenate([x0, ref0, x0 * x0, ref0 * ref0, x0 * ref0], axis=-1)
  filtered = _filter_2d(stacked, taps)
  mu_x0, mu_ref0, mu_xx, mu_rr, mu_xr = (
      filtered[..., i * channels:(i + 1) * channels] for i in range(5))
  # skimage's normalisation: population (Wang et al.) or unbiased sample.
  cov_norm = win_size**2 / (win_size**2 - 1.0) if use_sample_covariance else 1.0
  var_x = cov_norm * (mu_xx - mu_x0 * mu_x0)
  var_ref = cov_norm * (mu_rr - mu_ref0 * mu_ref0)
  cov = cov_norm * (mu_xr - mu_x0 * mu_ref0)
  mu_x, mu_ref = mu_x0 + x_shift, mu_ref0 + ref_shift
  data_range = _per_image(data_range, 4)
  c1 = jnp.square(k1 * data_range)
  c2 = jnp.square(k2 * data_range)
  luminance = (2.0 * mu_x * mu_ref + c1) / (mu_x * mu_x + mu_ref * mu_ref + c1)
  contrast_structure = (2.0 * cov + c2) / (var_x + var_ref + c2)
  border = (win_size - 1) // 2
  return _crop(luminance, border), _crop(contrast_structure, border)


def ssim(x, ref, data_range: DataRange, *, win_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03, gaussian_weights: bool = True,
         use_sample_covariance: bool = False) -> jnp.ndarray:
  """Structural similarity (Wang et al. 2004), one value per image.

  Defaults reproduce ``skimage.metrics.structural_similarity(x, ref,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=data_range, channel_axis=-1)``: local statistics under a Gaussian
  (sigma 1.5, cut at 3.5 sigma, scipy 'reflect' borders), ``C1 = (k1 R)^2``,
  ``C2 = (k2 R)^2``, and the mean of the SSIM map over the image cropped by
  ``(win_size - 1) // 2`` pixels on each side, averaged over channels.

  Args:
    x: test images, NHWC ``(B, H, W, C)``; H and W at least ``win_size``.
    ref: reference images, same shape and intensity scale.
    data_range: R, max - min of the intensity scale; scalar or ``(B,)``.
    win_size: odd window size. With Gaussian weights it only sets the crop (the
      filter length follows from sigma), exactly as in skimage.
    sigma: Gaussian standard deviation in pixels.
    k1: luminance stabiliser constant.
    k2: contrast stabiliser constant.
    gaussian_weights: False uses a uniform ``win_size`` x ``win_size`` window
      (skimage's default, used by ldct-benchmark).
    use_sample_covariance: True scales (co)variances by ``N / (N - 1)``,
      ``N = win_size^2`` (skimage's default).

  Returns:
    ``(B,)`` mean SSIM per image, in [-1, 1].
  """
  x, ref = _as_float(x), _as_float(ref)
  _check_nhwc_pair(x, ref, "ssim")
  luminance, contrast_structure = _ssim_maps(
      x, ref, data_range, win_size=win_size, sigma=sigma, k1=k1, k2=k2,
      gaussian_weights=gaussian_weights,
      use_sample_covariance=use_sample_covariance)
  return jnp.mean(luminance * contrast_structure, axis=(1, 2, 3))


def _average_pool_2x2(images) -> jnp.ndarray:
  """2x2 mean pooling of NHWC images; an odd last row/column is dropped."""
  b, h, w, c = images.shape
  images = images[:, :2 * (h // 2), :2 * (w // 2), :]
  return images.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def ms_ssim_min_size(num_scales: int, win_size: int = 11) -> int:
  """Smallest H and W that ``ms_ssim`` accepts: ``win_size * 2**(num_scales - 1)``.

  The coarsest scale must still hold one SSIM window (176 px for the default
  5 scales and 11-pixel window, 44 px for 3 scales).
  """
  return win_size * 2**(num_scales - 1)


def ms_ssim(x, ref, data_range: DataRange, weights: Sequence[float] = MS_SSIM_WEIGHTS,
            *, win_size: int = 11, sigma: float = 1.5, k1: float = 0.01,
            k2: float = 0.03) -> jnp.ndarray:
  """Multi-scale SSIM (Wang, Simoncelli & Bovik 2003), one value per image.

  ``MS-SSIM = l_M^{w_M} * prod_{j=1..M} cs_j^{w_j}``, computed as in Wang's
  reference code: at scales ``1..M-1`` the mean contrast-structure term
  ``cs_j``, at the last scale the mean SSIM map (luminance times
  contrast-structure), images reduced by 2x2 average pooling between scales.
  Each scale uses the same Gaussian window, crop and constants as ``ssim``.
  Negative ``cs_j`` (anti-correlated noise) are clipped to 0 before the
  fractional powers, as TensorFlow and pytorch-msssim do, to avoid NaN.

  Args:
    x: test images, NHWC ``(B, H, W, C)`` with ``H, W >=
      ms_ssim_min_size(len(weights), win_size)`` (176 px for 5 scales).
    ref: reference images, same shape and intensity scale.
    data_range: max - min of the intensity scale; scalar or ``(B,)``.
    weights: one exponent per scale, finest first; its length is the number of
      scales. Used as given (not renormalised): for three scales with Wang's
      relative weights pass ``w[:3] / sum(w[:3])``. Python floats, static
      under ``jax.jit`` (``static_argnames=('weights',)``).
    win_size: odd window size of the crop at every scale.
    sigma: Gaussian standard deviation in pixels at every scale.
    k1: luminance stabiliser constant.
    k2: contrast stabiliser constant.

  Returns:
    ``(B,)`` MS-SSIM per image; 1 for identical images.

  Raises:
    ValueError: if the images are too small for ``len(weights)`` scales.
  """
  x, ref = _as_float(x), _as_float(ref)
  _check_nhwc_pair(x, ref, "ms_ssim")
  weights = tuple(float(w) for w in weights)
  if not weights:
    raise ValueError("ms_ssim needs at least one scale weight")
  min_size = ms_ssim_min_size(len(weights), win_size)
  if min(x.shape[1:3]) < min_size:
    raise ValueError(
        f"ms_ssim with {len(weights)} scales and win_size={win_size} needs H, W "
        f">= {min_size}, got {x.shape[1:3]}; pass fewer weights (e.g. 3 scales "
        f"need {ms_ssim_min_size(3, win_size)} px)")
  per_scale = []
  for scale in range(len(weights)):
    luminance, contrast_structure = _ssim_maps(
        x, ref, data_range, win_size=win_size, sigma=sigma, k1=k1, k2=k2,
        gaussian_weights=True, use_sample_covariance=False)
    if scale < len(weights) - 1:
      per_scale.append(jnp.mean(contrast_structure, axis=(1, 2, 3)))
      x, ref = _average_pool_2x2(x), _average_pool_2x2(ref)
    else:
      per_scale.append(jnp.mean(luminance * contrast_structure, axis=(1, 2, 3)))
  per_scale = jnp.maximum(jnp.stack(per_scale, axis=-1), 0.0)
  return jnp.prod(per_scale ** jnp.asarray(weights, per_scale.dtype), axis=-1)


def _pearson(a, b) -> jnp.ndarray:
  """Pearson correlation per image over all pixels and channels, ``(B,)``."""
  a = a.reshape(a.shape[0], -1)
  b = b.reshape(b.shape[0], -1)
  a = a - jnp.mean(a, axis=1, keepdims=True)
  b = b - jnp.mean(b, axis=1, keepdims=True)
  return jnp.sum(a * b, axis=1) / jnp.sqrt(
      jnp.sum(a * a, axis=1) * jnp.sum(b * b, axis=1))


def coc(x, ref) -> jnp.ndarray:
  """Pearson correlation coefficient between each image pair, ``(B,)``.

  Computed over all pixels and channels; NaN if either image is constant.
  """
  x, ref = _as_float(x), _as_float(ref)
  _check_nhwc_pair(x, ref, "coc")
  return _pearson(x, ref)


def _laplacian_valid(images) -> jnp.ndarray:
  """4-neighbour Laplacian ``[[0,1,0],[1,-4,1],[0,1,0]]`` on interior pixels only."""
  centre = images[:, 1:-1, 1:-1]
  return (images[:, :-2, 1:-1] + images[:, 2:, 1:-1] + images[:, 1:-1, :-2]
          + images[:, 1:-1, 2:] - 4.0 * centre)


def epi(x, ref) -> jnp.ndarray:
  """Edge preservation index (Sattar et al. 1997), ``(B,)``.

  ``EPI = sum((D s - mean D s)(D x - mean D x)) /
  sqrt(sum (D s - mean D s)^2 * sum (D x - mean D x)^2)``, the Pearson
  correlation of the high-pass (4-neighbour Laplacian, ``D``) filtered
  reference ``s`` and test ``x``. The Laplacian is evaluated on interior pixels
  only (no border padding, which would create false edges); channels are
  pooled. 1 means edges are perfectly preserved; invariant to intensity offset
  and scale.
  """
  x, ref = _as_float(x), _as_float(ref)
  _check_nhwc_pair(x, ref, "epi")
  return _pearson(_laplacian_valid(x), _laplacian_valid(ref))


def _pixel_spacing(pixel_size_mm) -> tuple:
  spacing = np.broadcast_to(np.asarray(pixel_size_mm, dtype=np.float64), (2,))
  return float(spacing[0]), float(spacing[1])


def nps_frequencies(shape: Sequence[int], pixel_size_mm) -> tuple:
  """Spatial-frequency axes of ``noise_power_spectrum`` output, in mm^-1.

  Args:
    shape: ``(Ny, Nx)`` ROI size in pixels.
    pixel_size_mm: pixel spacing in mm, a scalar or ``(dy, dx)``.

  Returns:
    ``(fy, fx)`` NumPy arrays, zero frequency in the centre (fftshift order).
  """
  dy, dx = _pixel_spacing(pixel_size_mm)
  fy = np.fft.fftshift(np.fft.fftfreq(shape[0], d=dy))
  fx = np.fft.fftshift(np.fft.fftfreq(shape[1], d=dx))
  return fy, fx


def noise_power_spectrum(rois, pixel_size_mm, *, detrend: str = "mean") -> jnp.ndarray:
  """2-D noise power spectrum from a stack of noise-only ROIs.

  ``NPS(u, v) = (dx dy / (Nx Ny)) < |DFT(roi - trend)|^2 >`` with the
  unnormalised DFT and ``< >`` the mean over ROIs. By Parseval, the NPS
  integrated over frequency (``sum NPS * du dv``, ``du = 1 / (Nx dx)``) equals
  the mean per-ROI variance of the detrended pixels (divisor ``Nx Ny``). Units:
  (input units)^2 mm^2, e.g. HU^2 mm^2; white noise of variance sigma^2 has a
  flat NPS of ``sigma^2 dx dy``.

  Args:
    rois: ``(N, Ny, Nx)`` or ``(N, Ny, Nx, 1)`` noise-only ROIs, e.g. the
      difference of two repeated scans (then halve the NPS) or a uniform
      phantom region.
    pixel_size_mm: pixel spacing in mm, a scalar or ``(dy, dx)``.
    detrend: ``'mean'`` subtracts each ROI's mean; ``'plane'`` subtracts each
      ROI's least-squares plane ``a + b y + c x``, removing slow gradients
      (cupping, heel effect) that would otherwise pile up at low frequencies.

  Returns:
    ``(Ny, Nx)`` NPS with zero frequency at index ``(Ny // 2, Nx // 2)``
    (fftshift order; axes from ``nps_frequencies``).
  """
  rois = _as_float(rois)
  if rois.ndim == 4 and rois.shape[-1] == 1:
    rois = rois[..., 0]
  if rois.ndim != 3:
    raise ValueError(f"rois must be (N, Ny, Nx) or (N, Ny, Nx, 1), got {rois.shape}")
  num_rois, ny, nx = rois.shape
  dy, dx = _pixel_spacing(pixel_size_mm)
  if detrend == "mean":
    residual = rois - jnp.mean(rois, axis=(1, 2), keepdims=True)
  elif detrend == "plane":
    rows, cols = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    design = np.stack([np.ones(ny * nx), rows.ravel(), cols.ravel()], axis=1)
    fit = np.linalg.pinv(design)  # (3, Ny Nx), float64 and static
    flat = rois.reshape(num_rois, ny * nx)
    coefficients = flat @ jnp.asarray(fit.T, flat.dtype)
    trend = coefficients @ jnp.asarray(design.T, flat.dtype)
    residual = (flat - trend).reshape(rois.shape)
  else:
    raise ValueError(f"detrend must be 'mean' or 'plane', got {detrend!r}")
  power = jnp.square(jnp.abs(jnp.fft.fft2(residual, axes=(1, 2))))
  nps = (dx * dy / (nx * ny)) * jnp.mean(power, axis=0)
  return jnp.fft.fftshift(nps)


def radial_nps(nps2d, pixel_size_mm, num_bins: int) -> tuple:
  """Radially averaged NPS on equal-width frequency bins up to Nyquist.

  Bins span ``[0, f_N]`` with ``f_N = 1 / (2 max(dx, dy))`` (frequencies past
  it, in the corners of the 2-D NPS, are left out). The zero-frequency sample
  is left out too: mean subtraction forces it to 0, which says nothing about
  the noise.

  Args:
    nps2d: ``(Ny, Nx)`` NPS in fftshift order, as ``noise_power_spectrum``
      returns it.
    pixel_size_mm: pixel spacing in mm, a scalar or ``(dy, dx)``.
    num_bins: number of radial bins.

  Returns:
    ``(frequencies, nps)``: bin-centre frequencies in mm^-1 ``(num_bins,)`` and
    the mean NPS over the samples in each bin ``(num_bins,)``.

  Raises:
    ValueError: if some bin holds no frequency sample (too many bins for the
      ROI size).
  """
  nps2d = _as_float(nps2d)
  fy, fx = nps_frequencies(nps2d.shape, pixel_size_mm)
  radius = np.hypot(fy[:, None], fx[None, :]).ravel()
  nyquist = 0.5 / max(_pixel_spacing(pixel_size_mm))
  bin_index = np.minimum((radius / nyquist * num_bins).astype(np.int64), num_bins - 1)
  keep = (radius > 0) & (radius <= nyquist)
  membership = np.zeros((radius.size, num_bins))
  membership[np.flatnonzero(keep), bin_index[keep]] = 1.0
  counts = membership.sum(axis=0)
  if np.any(counts == 0):
    raise ValueError(
        f"num_bins={num_bins} leaves empty radial bins for a {nps2d.shape} NPS; "
        "use fewer bins")
  averaging = jnp.asarray(membership / counts, nps2d.dtype)
  edges = np.linspace(0.0, nyquist, num_bins + 1)
  centres = 0.5 * (edges[:-1] + edges[1:])
  return jnp.asarray(centres, nps2d.dtype), nps2d.ravel() @ averaging


def _c_round(value: float) -> int:
  """Round half away from zero, as the C ``round`` in skimage's GLCM loop."""
  return int(math.copysign(math.floor(abs(value) + 0.5), value))


GLCM_PROPERTIES = ("contrast", "dissimilarity", "homogeneity", "energy",
                   "correlation", "ASM")


def glcm_features(image01, levels: int = 32, distances: Sequence[int] = (1,),
                  angles: Sequence[float] = (0.0, math.pi / 4, math.pi / 2,
                                             3 * math.pi / 4)) -> dict:
  """Gray-level co-occurrence texture features (Haralick), in ``jnp``.

  Matches ``skimage.feature.graycomatrix(q, distances, angles, levels,
  symmetric=True, normed=True)`` followed by ``graycoprops`` for the
  quantised image ``q = clip(floor(image01 * levels), 0, levels - 1)``
  (so 1.0 falls in the top level). A pixel pair is ``(q[r, c], q[r + dr,
  c + dc])`` with ``dr = round(sin(angle) d)``, ``dc = round(cos(angle) d)``
  (rows grow downwards). Counts are one-hot matmuls, exact in float32 for
  images below 2^23 pixel pairs. Not differentiable (quantisation).

  Args:
    image01: NHWC ``(B, H, W, 1)`` images in [0, 1] (e.g. windowed CT ROIs);
      values outside are clipped to the end levels.
    levels: number of gray levels.
    distances: pixel-pair distances in pixels.
    angles: pixel-pair angles in radians.

  Returns:
    dict with keys ``GLCM_PROPERTIES`` (contrast, dissimilarity, homogeneity,
    energy, correlation, ASM), each ``(B, len(distances), len(angles))``;
    average the last two axes for a rotation-averaged value. Correlation is 1
    where a GLCM has zero variance, as in skimage.
  """
  image01 = _as_float(image01)
  if image01.ndim != 4 or image01.shape[-1] != 1:
    raise ValueError(f"glcm_features expects (B, H, W, 1) images, got {image01.shape}")
  _, height, width, _ = image01.shape
  quantised = jnp.clip(jnp.floor(image01[..., 0] * levels), 0, levels - 1)
  one_hot = jax.nn.one_hot(quantised.astype(jnp.int32), levels, dtype=jnp.float32)
  per_distance = []
  for distance in distances:
    per_angle = []
    for angle in angles:
      d_row = _c_round(math.sin(angle) * distance)
      d_col = _c_round(math.cos(angle) * distance)
      rows = slice(max(0, -d_row), min(height, height - d_row))
      cols = slice(max(0, -d_col), min(width, width - d_col))
      shifted_rows = slice(rows.start + d_row, rows.stop + d_row)
      shifted_cols = slice(cols.start + d_col, cols.stop + d_col)
      per_angle.append(jnp.einsum(
          "bhwi,bhwj->bij", one_hot[:, rows, cols],
          one_hot[:, shifted_rows, shifted_cols]))
    per_distance.append(jnp.stack(per_angle, axis=-1))
  counts = jnp.stack(per_distance, axis=-2)  # (B, L, L, D, A)
  counts = counts + jnp.swapaxes(counts, 1, 2)
  totals = jnp.sum(counts, axis=(1, 2), keepdims=True)
  glcm = counts / jnp.where(totals == 0, 1.0, totals)

  level_i = jnp.arange(levels, dtype=glcm.dtype)[None, :, None, None, None]
  level_j = jnp.arange(levels, dtype=glcm.dtype)[None, None, :, None, None]
  difference = level_i - level_j

  def weighted_sum(weights):
    return jnp.sum(glcm * weights, axis=(1, 2))

  mean_i = weighted_sum(level_i)[:, None, None]
  mean_j = weighted_sum(level_j)[:, None, None]
  std_i = jnp.sqrt(weighted_sum(jnp.square(level_i - mean_i)))
  std_j = jnp.sqrt(weighted_sum(jnp.square(level_j - mean_j)))
  covariance = weighted_sum((level_i - mean_i) * (level_j - mean_j))
  flat = (std_i < 1e-15) | (std_j < 1e-15)
  correlation = jnp.where(
      flat, 1.0, covariance / jnp.where(flat, 1.0, std_i * std_j))
  asm = weighted_sum(glcm)
  return {
      "contrast": weighted_sum(jnp.square(difference)),
      "dissimilarity": weighted_sum(jnp.abs(difference)),
      "homogeneity": weighted_sum(1.0 / (1.0 + jnp.square(difference))),
      "energy": jnp.sqrt(asm),
      "correlation": correlation,
      "ASM": asm,
  }


# Metrics window_metrics can compute, and whether each takes a data range.
_WINDOWED_METRICS = {
    "psnr": (psnr, True),
    "ssim": (ssim, True),
    "ms_ssim": (ms_ssim, True),
    "rmse": (rmse, False),
    "snr": (snr, False),
    "epi": (epi, False),
    "coc": (coc, False),
}


def window_metrics(pred_hu, target_hu, window: windows.WindowLike,
                   metrics: Sequence[str] = ("psnr", "ssim", "rmse"),
                   data_range: float | None = None) -> dict:
  """Metrics on HU images seen through a HU window, with the settings used.

  Both images are mapped with ``ldct_jax.windows.apply_window`` (clip to the
  window, rescale to [0, 1]) and compared there. ``rmse`` here is therefore a
  fraction of the window width (times ``width`` gives HU of the clipped
  images); the RMSE in HU of the un-windowed images is ``rmse(pred_hu,
  target_hu)``. Not jit-able as a whole (it returns Python metadata); each
  metric inside is.

  Args:
    pred_hu: predicted images in HU, NHWC ``(B, H, W, C)``.
    target_hu: reference images in HU, same shape.
    window: a preset name (e.g. ``'paper'``, ``'abdomen'``), ``(center,
      width)`` in HU, a dict or a ``Window``.
    metrics: names among psnr, ssim, ms_ssim, rmse, snr, epi, coc.
    data_range: data range on the windowed [0, 1] scale; None means 1.0, the
      full window.

  Returns:
    ``{name: (B,) array for each metric, 'window': Window.as_dict(),
    'data_range': float}``.
  """
  unknown = [name for name in metrics if name not in _WINDOWED_METRICS]
  if unknown:
    raise ValueError(f"unknown metrics {unknown}; known: {sorted(_WINDOWED_METRICS)}")
  window = windows.get_window(window)
  data_range = 1.0 if data_range is None else float(data_range)
  pred01 = windows.apply_window(_as_float(pred_hu), window)
  target01 = windows.apply_window(_as_float(target_hu), window)
  results = {}
  for name in metrics:
    metric_fn, takes_data_range = _WINDOWED_METRICS[name]
    if takes_data_range:
      results[name] = metric_fn(pred01, target01, data_range)
    else:
      results[name] = metric_fn(pred01, target01)
  results["window"] = window.as_dict()
  results["data_range"] = data_range
  return results


# --------------------------------------------------------------------------
# MRI reconstruction metrics, in the fastMRI convention (facebookresearch/
# fastMRI, ``fastmri/evaluate.py``): on MAGNITUDE images, per VOLUME (all
# slices of one file), with the data range set to the ground-truth volume's
# maximum. SSIM is skimage's default (uniform 7x7 window, sample covariance,
# K1 = 0.01, K2 = 0.03) per slice, averaged over the slices; PSNR uses the MSE
# over the whole volume.

MRI_METRIC_CONVENTIONS = {
    "source": "fastMRI evaluate.py",
    "images": "magnitude, centre-cropped to the reconstruction size",
    "per": "volume",
    "data_range": "max of the ground-truth volume",
    "nmse": "||gt - pred||^2 / ||gt||^2 over the volume",
    "psnr": "10 log10(data_range^2 / MSE over the volume)",
    "ssim": "mean over slices of skimage structural_similarity (7x7 uniform window, "
            "sample covariance, K1=0.01, K2=0.03)",
}
_FASTMRI_SSIM = dict(win_size=7, gaussian_weights=False, use_sample_covariance=True)


def _mri_volumes(gt, pred, name: str):
  gt, pred = _as_float(gt), _as_float(pred)
  if gt.ndim != 3 or gt.shape != pred.shape:
    raise ValueError(f"{name} expects two magnitude volumes (slices, H, W) of equal shape, "
                     f"got {gt.shape} and {pred.shape}")
  return gt, pred


def mri_nmse(gt, pred) -> jnp.ndarray:
  """fastMRI NMSE of a volume, ``||gt - pred||^2 / ||gt||^2`` (scalar)."""
  gt, pred = _mri_volumes(gt, pred, "mri_nmse")
  return jnp.sum(jnp.square(gt - pred)) / jnp.sum(jnp.square(gt))


def mri_psnr(gt, pred, data_range=None) -> jnp.ndarray:
  """fastMRI PSNR of a volume in dB; ``data_range`` defaults to ``gt.max()`` (scalar)."""
  gt, pred = _mri_volumes(gt, pred, "mri_psnr")
  data_range = jnp.max(gt) if data_range is None else _as_float(data_range)
  return 10.0 * jnp.log10(jnp.square(data_range) / jnp.mean(jnp.square(gt - pred)))


def mri_ssim(gt, pred, data_range=None) -> jnp.ndarray:
  """fastMRI SSIM of a volume: the mean of per-slice skimage-default SSIMs, data range ``gt.max()``."""
  gt, pred = _mri_volumes(gt, pred, "mri_ssim")
  data_range = jnp.max(gt) if data_range is None else _as_float(data_range)
  return jnp.mean(ssim(pred[..., None], gt[..., None], data_range, **_FASTMRI_SSIM))


def mri_volume_metrics(gt, pred) -> dict:
  """``{'nmse', 'psnr', 'ssim'}`` (floats) of one volume, plus the data range used."""
  data_range = float(jnp.max(_as_float(gt)))
  return {"nmse": float(mri_nmse(gt, pred)), "psnr": float(mri_psnr(gt, pred, data_range)),
          "ssim": float(mri_ssim(gt, pred, data_range)), "data_range": data_range}
