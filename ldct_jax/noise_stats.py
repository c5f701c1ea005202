"""Does synthetic CT noise look like real low-dose CT noise?

Statistics of a noise field against a reference image, a comparison of a
candidate noise to the real one, and the baseline noise generators TDDL
argues against (i.i.d. Gaussian, image-domain Poisson).

Conventions:
  * Images are ``(N, H, W)`` in HU unless a name says otherwise; a trailing
    channel axis of 1 is accepted and dropped.
  * "Noise" is ``noisy - reference``. With the built-in data use a
    noise-free FBP of the phantom or the NDCT as the reference, NOT the
    phantom itself: ``LDCT - phantom`` also holds the FBP blur of every edge
    (35.7 HU rms in the body on the built-in 256^2 data, against 15.7 HU of
    quarter-dose noise). With an NDCT reference the noise is the LDCT noise
    minus the NDCT's (for nested doses: variance ``var_LD - var_ND``).
  * The body is where the Gaussian-smoothed (sigma 2 px) reference exceeds
    ``BODY_THRESHOLD_HU`` (-900 HU: air excluded, lung included).
  * Frequencies in mm^-1, NPS in HU^2 mm^2 (``metrics.noise_power_spectrum``).
  * Pixel spacing (``pixel_size_mm``): square pixels, one scalar for every
    slice or one value per slice (``(N,)``: e.g. test patients scanned at
    different fields of view). Spacing matters only for the NPS; slices of
    different spacings are pooled on common frequency bins in mm^-1
    (``radial_noise_nps``).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from ldct_jax import metrics
from ldct_jax.windows import BODY_THRESHOLD_HU

# Default reference-HU bins for std-vs-HU: air, lung, fat, soft tissue,
# contrast-enhanced tissue, bone.
DEFAULT_HU_BINS = (-1100.0, -900.0, -700.0, -500.0, -200.0, -50.0, 20.0, 60.0,
                   100.0, 200.0, 400.0, 700.0, 1100.0, 2000.0)


def _as_stack(images, name: str) -> np.ndarray:
  x = np.asarray(images, np.float32)
  if x.ndim == 4 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim == 2:
    x = x[None]
  if x.ndim != 3:
    raise ValueError(f"{name} must be (N, H, W), (H, W) or (N, H, W, 1), got {x.shape}")
  return x


def _smooth(images: np.ndarray, sigma: float) -> np.ndarray:
  return np.asarray(metrics.gaussian_blur(jnp.asarray(images)[..., None], sigma))[..., 0]


def _window_max(images: np.ndarray, radius: int) -> np.ndarray:
  """Max over a ``(2 radius + 1)^2`` window (edge-padded), per image."""
  out = jax.lax.reduce_window(jnp.asarray(images), -jnp.inf, jax.lax.max,
                              (1, 2 * radius + 1, 2 * radius + 1), (1, 1, 1),
                              ((0, 0), (radius, radius), (radius, radius)))
  return np.asarray(out)


def body_mask(reference_hu) -> np.ndarray:
  """Boolean ``(N, H, W)``: smoothed reference above ``BODY_THRESHOLD_HU``."""
  reference = _as_stack(reference_hu, "reference_hu")
  return _smooth(reference, 2.0) > BODY_THRESHOLD_HU


def flat_mask(reference_hu, *, edge_hu: float = 20.0, edge_radius: int = 3) -> np.ndarray:
  """Pixels far from edges of the reference: boolean ``(N, H, W)``.

  A pixel is flat when, within ``edge_radius`` pixels, the gradient
  magnitude of the reference (smoothed with sigma 1 px, so NDCT noise is not
  taken for edges) stays below ``edge_hu`` HU per pixel.
  """
  reference = _smooth(_as_stack(reference_hu, "reference_hu"), 1.0)
  grad_y = np.zeros_like(reference)
  grad_x = np.zeros_like(reference)
  grad_y[:, 1:-1] = 0.5 * (reference[:, 2:] - reference[:, :-2])
  grad_x[:, :, 1:-1] = 0.5 * (reference[:, :, 2:] - reference[:, :, :-2])
  magnitude = np.hypot(grad_y, grad_x)
  return _window_max(magnitude, edge_radius) < edge_hu


def noise_std_vs_hu(noisy_hu, reference_hu, bins: Union[Sequence[float], int] = DEFAULT_HU_BINS,
                    *, edge_hu: float = 20.0, edge_radius: int = 3,
                    min_count: int = 50) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Noise std as a function of the reference HU, in flat regions only.

  The noise ``noisy - reference`` is grouped by the reference value of each
  flat pixel (``flat_mask``); the std is taken around each bin's own mean,
  so a bias between the images does not count as noise.

  Args:
    noisy_hu: ``(N, H, W)`` noisy images, HU.
    reference_hu: ``(N, H, W)`` clean(er) images of the same scene, HU.
    bins: bin edges in HU (increasing), or a number of equal bins over
      [-1100, 2000] HU.
    edge_hu, edge_radius: see ``flat_mask``.
    min_count: bins with fewer flat pixels get std NaN.

  Returns:
    ``(bin_centers_hu, std_per_bin, counts)``, each ``(num_bins,)``; std in
    HU, counts the number of flat pixels per bin.
  """
  noisy = _as_stack(noisy_hu, "noisy_hu")
  reference = _as_stack(reference_hu, "reference_hu")
  if noisy.shape != reference.shape:
    raise ValueError(f"shapes differ: {noisy.shape} vs {reference.shape}")
  edges = (np.linspace(-1100.0, 2000.0, int(bins) + 1) if np.isscalar(bins)
           else np.asarray(bins, np.float64))
  if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
    raise ValueError(f"bins must be increasing edges, got {bins}")
  keep = flat_mask(reference, edge_hu=edge_hu, edge_radius=edge_radius)
  noise = (noisy - reference)[keep].astype(np.float64)
  index = np.digitize(reference[keep], edges) - 1
  inside = (index >= 0) & (index < edges.size - 1)
  index, noise = index[inside], noise[inside]
  num_bins = edges.size - 1
  counts = np.bincount(index, minlength=num_bins)
  sums = np.bincount(index, noise, minlength=num_bins)
  squares = np.bincount(index, noise * noise, minlength=num_bins)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean = sums / counts
    std = np.sqrt(np.maximum(squares / counts - mean * mean, 0.0))
  std[counts < min_count] = np.nan
  centers = 0.5 * (edges[:-1] + edges[1:])
  return centers, std, counts


def _slice_spacings(pixel_size_mm, num_slices: int) -> np.ndarray:
  """``(num_slices,)`` float64 spacings from a scalar or a per-slice sequence."""
  spacing = np.asarray(pixel_size_mm, np.float64)
  if spacing.ndim == 0:
    spacing = np.full(num_slices, float(spacing))
  if spacing.shape != (num_slices,):
    raise ValueError(f"pixel_size_mm must be a scalar or one value per slice ({num_slices}), "
                     f"got shape {spacing.shape}")
  if not np.all(np.isfinite(spacing) & (spacing > 0)):
    raise ValueError(f"pixel_size_mm must be positive, got {np.unique(spacing)}")
  return spacing


def _body_rois(noise: np.ndarray, reference_hu, roi: int,
               stride: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
  """``body_rois`` plus the slice index of every ROI."""
  inside = body_mask(reference_hu)
  if inside.shape != noise.shape:
    raise ValueError(f"shapes differ: {noise.shape} vs {inside.shape}")
  stride = stride or roi // 2
  rois, owners = [], []
  for n in range(noise.shape[0]):
    for y in range(0, noise.shape[1] - roi + 1, stride):
      for x in range(0, noise.shape[2] - roi + 1, stride):
        if inside[n, y:y + roi, x:x + roi].all():
          rois.append(noise[n, y:y + roi, x:x + roi])
          owners.append(n)
  if not rois:
    raise ValueError(f"no {roi}x{roi} ROI lies inside the body")
  return np.stack(rois), np.asarray(owners)


def body_rois(noise_hu, reference_hu, roi: int = 32, stride: Optional[int] = None) -> np.ndarray:
  """ROIs of a noise field lying wholly inside the body: ``(num_rois, roi, roi)``.

  ROIs sit on a grid of step ``stride`` (default ``roi // 2``: half
  overlapping); one is kept when all its pixels are in ``body_mask``.
  """
  return _body_rois(_as_stack(noise_hu, "noise_hu"), reference_hu, roi, stride)[0]


def _pooled_radial_nps(rois: np.ndarray, spacings: np.ndarray,
                       num_bins: int) -> Tuple[np.ndarray, np.ndarray]:
  """Radial NPS of ROIs of several pixel spacings on common bins in mm^-1.

  Each spacing's ROIs give a 2-D NPS (``metrics.noise_power_spectrum``, HU^2
  mm^2, comparable across spacings); its frequency samples go to equal-width
  radial bins up to the Nyquist frequency of the coarsest spacing (finer
  spacings' higher frequencies are left out), by the bin rule of
  ``metrics.radial_nps``. A bin's value is the mean over every ROI's
  samples in it, so one spacing alone gives ``metrics.radial_nps``.
  """
  nyquist = 0.5 / float(spacings.max())
  sums, counts = np.zeros(num_bins), np.zeros(num_bins)
  for spacing in np.unique(spacings):
    members = rois[spacings == spacing]
    nps2d = np.asarray(metrics.noise_power_spectrum(members, spacing), np.float64)
    fy, fx = metrics.nps_frequencies(nps2d.shape, spacing)
    radius = np.hypot(fy[:, None], fx[None, :])
    keep = (radius > 0) & (radius <= nyquist)
    index = np.minimum((radius[keep] / nyquist * num_bins).astype(np.int64), num_bins - 1)
    sums += members.shape[0] * np.bincount(index, nps2d[keep], minlength=num_bins)
    counts += members.shape[0] * np.bincount(index, minlength=num_bins)
  if np.any(counts == 0):
    raise ValueError(f"num_bins={num_bins} leaves empty radial bins for {rois.shape[1:]} ROIs; "
                     "use fewer bins")
  edges = np.linspace(0.0, nyquist, num_bins + 1)
  return 0.5 * (edges[:-1] + edges[1:]), sums / counts


def radial_noise_nps(noise_hu, pixel_size_mm, reference_hu=None, *, roi: int = 32,
                     stride: Optional[int] = None,
                     num_bins: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray, int]:
  """Radially averaged NPS of a noise field from ROIs inside the body.

  Args:
    noise_hu: ``(N, H, W)`` noise, HU.
    pixel_size_mm: pixel spacing, mm: a scalar, or ``(N,)`` per slice. With
      several spacings the NPS of their ROIs is pooled on common bins in
      mm^-1 up to the coarsest spacing's Nyquist frequency.
    reference_hu: ``(N, H, W)`` image that defines the body (``body_rois``);
      None uses every ROI of the grid (for noise-only fields).
    roi: ROI side, pixels.
    stride: ROI grid step, pixels (default ``roi // 2``).
    num_bins: radial bins up to Nyquist (default ``roi // 4``).

  Returns:
    ``(frequencies_per_mm, nps, num_rois)``: bin centres ``(num_bins,)``,
    NPS in HU^2 mm^2 ``(num_bins,)`` (mean-detrended ROIs), ROI count.
  """
  noise = _as_stack(noise_hu, "noise_hu")
  spacings = _slice_spacings(pixel_size_mm, noise.shape[0])
  reference = np.zeros_like(noise) if reference_hu is None else reference_hu
  rois, owners = _body_rois(noise, reference, roi, stride)
  num_bins = num_bins or roi // 4
  roi_spacings = spacings[owners]
  if np.all(roi_spacings == roi_spacings[0]):
    spacing = float(roi_spacings[0])
    nps2d = metrics.noise_power_spectrum(rois, spacing)
    frequencies, nps = metrics.radial_nps(nps2d, spacing, num_bins)
  else:
    frequencies, nps = _pooled_radial_nps(rois, roi_spacings, num_bins)
  return np.asarray(frequencies), np.asarray(nps), rois.shape[0]


def histogram_distance(a, b) -> float:
  """Wasserstein-1 distance between the value distributions of ``a`` and ``b``.

  ``W1 = integral |F_a(t) - F_b(t)| dt`` of the empirical CDFs, computed
  exactly (float64) over the merged sorted samples; sizes may differ. In the
  units of the inputs (HU for noise in HU): the mean distance a unit of
  probability mass moves. Two Gaussians of equal std shifted by d are at
  W1 = d; it also grows with std mismatches (N(0, s1) vs N(0, s2): |s1 - s2|
  sqrt(2/pi)), so it mixes shape and level -- compare stds separately.
  """
  a = np.sort(np.asarray(a, np.float64).ravel())
  b = np.sort(np.asarray(b, np.float64).ravel())
  if a.size == 0 or b.size == 0:
    raise ValueError("histogram_distance needs non-empty samples")
  values = np.concatenate([a, b])
  values.sort(kind="mergesort")
  widths = np.diff(values)
  cdf_a = np.searchsorted(a, values[:-1], side="right") / a.size
  cdf_b = np.searchsorted(b, values[:-1], side="right") / b.size
  return float(np.sum(np.abs(cdf_a - cdf_b) * widths))


def compare_noise(candidate_noisy_hu, real_noisy_hu, reference_hu, pixel_size_mm, *,
                  roi: int = 32, bins: Union[Sequence[float], int] = DEFAULT_HU_BINS,
                  min_count: int = 50, return_curves: bool = False) -> dict:
  """Distance of a candidate noisy image set to the real noisy one.

  Both noises are taken against the same reference (``noisy - reference``)
  and measured on the same pixels and ROIs.

  Args:
    candidate_noisy_hu: ``(N, H, W)`` e.g. NDCT + synthetic noise, HU.
    real_noisy_hu: ``(N, H, W)`` real LDCT, HU.
    reference_hu: ``(N, H, W)`` the shared reference, HU.
    pixel_size_mm: mm, a scalar or ``(N,)`` per slice (``radial_noise_nps``).
    roi: NPS ROI side, pixels.
    bins: std-vs-HU bins (``noise_std_vs_hu``).
    min_count: flat pixels a bin needs in both sets to count.
    return_curves: also return the curves under ``'curves'``.

  Returns:
    A dict of floats:
      * ``std_vs_hu_rel_error``: mean over bins populated in both of
        ``|std_c - std_r| / std_r``;
      * ``nps_rel_l2``: ``||NPS_c - NPS_r||_2 / ||NPS_r||_2`` over radial bins;
      * ``nps_peak_freq_candidate`` / ``nps_peak_freq_real``: mm^-1;
      * ``histogram_w1_hu``: ``histogram_distance`` of body noise values;
      * ``noise_std_candidate_hu`` / ``noise_std_real_hu``: body noise std.
  """
  candidate = _as_stack(candidate_noisy_hu, "candidate_noisy_hu")
  real = _as_stack(real_noisy_hu, "real_noisy_hu")
  reference = _as_stack(reference_hu, "reference_hu")
  centers, std_c, count_c = noise_std_vs_hu(candidate, reference, bins, min_count=min_count)
  _, std_r, _ = noise_std_vs_hu(real, reference, bins, min_count=min_count)
  populated = np.isfinite(std_c) & np.isfinite(std_r) & (std_r > 0)
  if not populated.any():
    raise ValueError("no std-vs-HU bin has enough flat pixels in both sets")
  std_error = float(np.mean(np.abs(std_c[populated] - std_r[populated]) / std_r[populated]))
  noise_c, noise_r = candidate - reference, real - reference
  freqs, nps_c, num_rois = radial_noise_nps(noise_c, pixel_size_mm, reference, roi=roi)
  _, nps_r, _ = radial_noise_nps(noise_r, pixel_size_mm, reference, roi=roi)
  inside = body_mask(reference)
  result = {
      "std_vs_hu_rel_error": std_error,
      "nps_rel_l2": float(np.linalg.norm(nps_c - nps_r) / np.linalg.norm(nps_r)),
      "nps_peak_freq_candidate": float(freqs[np.argmax(nps_c)]),
      "nps_peak_freq_real": float(freqs[np.argmax(nps_r)]),
      "histogram_w1_hu": histogram_distance(noise_c[inside], noise_r[inside]),
      "noise_std_candidate_hu": float(noise_c[inside].std()),
      "noise_std_real_hu": float(noise_r[inside].std()),
      "num_rois": num_rois,
  }
  if return_curves:
    result["curves"] = {"hu_bins": centers, "std_candidate": std_c, "std_real": std_r,
                        "counts_candidate": count_c, "frequencies": freqs,
                        "nps_candidate": nps_c, "nps_real": nps_r}
  return result


# Columns of ``fidelity_markdown``: (metrics key, header, format).
FIDELITY_COLUMNS = (
    ("std_vs_hu_rel_error", "std-vs-HU rel. error", "{:.3f}"),
    ("nps_rel_l2", "NPS rel. L2", "{:.3f}"),
    ("nps_peak_freq_candidate", "NPS peak (mm^-1)", "{:.3f}"),
    ("histogram_w1_hu", "W1 (HU)", "{:.2f}"),
    ("noise_std_candidate_hu", "body std (HU)", "{:.1f}"),
)


def noise_fidelity_table(candidates: Mapping[str, object], real_noisy_hu, reference_hu,
                         pixel_size_mm, **compare_kwargs) -> dict:
  """``compare_noise`` of several candidate noisy image sets to one real set.

  Every candidate is measured against the same real images, reference,
  pixels and ROIs, so the rows of the table are comparable with each other
  (e.g. NDCT + VAE noise against NDCT + matched Gaussian / image-Poisson
  noise, all against real LDCT with the NDCT as reference).

  Args:
    candidates: name -> ``(N, H, W)`` candidate noisy images, HU.
    real_noisy_hu: ``(N, H, W)`` real noisy images (e.g. LDCT), HU.
    reference_hu: ``(N, H, W)`` shared reference (noise = image - reference).
    pixel_size_mm: mm, a scalar or ``(N,)`` per slice.
    **compare_kwargs: forwarded to ``compare_noise`` (``roi``, ``bins``,
      ``min_count``, ``return_curves``).

  Returns:
    ``{name: compare_noise(...) dict}`` in the order of ``candidates``; the
    real set's own values are in every row (``nps_peak_freq_real``,
    ``noise_std_real_hu``).
  """
  if not candidates:
    raise ValueError("noise_fidelity_table needs at least one candidate")
  real = _as_stack(real_noisy_hu, "real_noisy_hu")
  reference = _as_stack(reference_hu, "reference_hu")
  return {name: compare_noise(images, real, reference, pixel_size_mm, **compare_kwargs)
          for name, images in candidates.items()}


def fidelity_markdown(table: Mapping[str, Mapping[str, float]]) -> str:
  """A markdown table of ``noise_fidelity_table``'s result, plus a "real" row.

  The "real" row holds the real noise's own NPS peak and body std (its
  distances are 0 by definition).
  """
  header = "| noise | " + " | ".join(title for _, title, _ in FIDELITY_COLUMNS) + " |"
  lines = [header, "|" + "---|" * (len(FIDELITY_COLUMNS) + 1)]
  for name, row in table.items():
    cells = [fmt.format(row[key]) for key, _, fmt in FIDELITY_COLUMNS]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  any_row = next(iter(table.values()))
  real = {"std_vs_hu_rel_error": 0.0, "nps_rel_l2": 0.0, "histogram_w1_hu": 0.0,
          "nps_peak_freq_candidate": any_row["nps_peak_freq_real"],
          "noise_std_candidate_hu": any_row["noise_std_real_hu"]}
  lines.append("| real | " + " | ".join(fmt.format(real[key]) for key, _, fmt in FIDELITY_COLUMNS)
               + " |")
  return "\n".join(lines)


def gaussian_noise_like(reference, std, rng) -> jax.Array:
  """i.i.d. Gaussian noise of std ``std``, shaped like ``reference``.

  Returns the noise only (add it to the image yourself); any units, as
  ``std``'s. jit-able.
  """
  reference = jnp.asarray(reference)
  dtype = jnp.result_type(reference.dtype, jnp.float32)
  return std * jax.random.normal(rng, reference.shape, dtype)


def image_poisson_noise_like(reference_hu, target_std, rng, mask=None, *,
                             hu_offset: float = 1024.0) -> jax.Array:
  """Image-domain Poisson noise, scaled to a target overall std.

  The pixel intensity ``I = max(HU + hu_offset, 0)`` (proportional to
  attenuation; 4096 x network units with the default normalisation) is taken
  as ``I / a`` photon counts, so the noise ``a (Poisson(I / a) - I / a)`` has
  variance ``a I``: noisier where denser. ``a`` is set so that the mean
  variance over ``mask`` equals ``target_std^2``. Counts are large
  (``I / a`` ~ 1e3 for tissue), so the Poisson draw is its moment-matched
  Gaussian ``sqrt(a I) N(0, 1)``, exact in mean and variance and ~100x cheaper
  than ``jax.random.poisson``'s rejection sampler on CPU. This is the
  "Poisson noise on the image" that ignores projection and FBP: white, and
  with the wrong dependence on attenuation (real CT noise depends on the
  line integrals through the pixel, not on the pixel).

  Args:
    reference_hu: clean image(s), HU, any shape.
    target_std: wanted overall noise std, HU.
    rng: PRNG key.
    mask: optional boolean, shape of ``reference_hu``: the pixels over which
      the variance is matched (e.g. ``body_mask``); default all.
    hu_offset: HU of zero intensity.

  Returns:
    The noise in HU, shaped like ``reference_hu``. jit-able.
  """
  reference = jnp.asarray(reference_hu)
  dtype = jnp.result_type(reference.dtype, jnp.float32)
  intensity = jnp.maximum(reference.astype(dtype) + hu_offset, 0.0)
  if mask is None:
    mean_intensity = jnp.mean(intensity)
  else:
    mask = jnp.asarray(mask, dtype)
    mean_intensity = jnp.sum(intensity * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  scale = jnp.square(target_std) / jnp.maximum(mean_intensity, 1e-6)
  return jnp.sqrt(scale * intensity) * jax.random.normal(rng, reference.shape, dtype)
