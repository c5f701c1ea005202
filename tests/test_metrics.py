"""Metrics against independent references: scikit-image, SciPy/NumPy float64, closed forms."""
import math

import jax
import numpy as np
import pytest
from scipy import ndimage
from skimage.data import shepp_logan_phantom
from skimage.feature import graycomatrix, graycoprops
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ldct_jax import metrics
from ldct_jax.windows import WINDOWS, apply_window

SKIMAGE_SSIM = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
# Eager MS-SSIM compiles each small op per scale (~10 s); one jit is ~3 s.
ms_ssim_jit = jax.jit(metrics.ms_ssim, static_argnames=("weights",))


def _ct_slice_hu():
  """The 128x128 CT slice shipped with pydicom, in HU via RescaleSlope/Intercept."""
  pydicom = pytest.importorskip("pydicom")
  from pydicom.data import get_testdata_file
  dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
  return (dataset.pixel_array.astype(np.float64) * float(dataset.RescaleSlope)
          + float(dataset.RescaleIntercept))


def _skimage_per_image(fn, x, ref, **kwargs):
  return np.array([fn(ref[i], x[i], channel_axis=-1, **kwargs)
                   if fn is structural_similarity else fn(ref[i], x[i], **kwargs)
                   for i in range(x.shape[0])])


@pytest.fixture(scope="module")
def random_pair():
  rng = np.random.default_rng(0)
  ref = rng.random((2, 40, 37, 3))
  x = np.clip(ref + 0.1 * rng.standard_normal(ref.shape), 0, 1)
  return x, ref


@pytest.fixture(scope="module")
def phantom_pair():
  rng = np.random.default_rng(1)
  ref = shepp_logan_phantom()[::4, ::4][None, ..., None]  # 100x100, [0, 1]
  x = ref + 0.05 * rng.standard_normal(ref.shape)
  return x, ref


@pytest.fixture(scope="module")
def ct_pair_hu():
  rng = np.random.default_rng(2)
  ref = _ct_slice_hu()[None, ..., None]
  x = ref + 25.0 * rng.standard_normal(ref.shape)  # ~LDCT-level noise in HU
  return x, ref


def test_psnr_matches_skimage_random_and_per_image_range(random_pair):
  x, ref = random_pair
  expected = _skimage_per_image(peak_signal_noise_ratio, x, ref, data_range=1.0)
  np.testing.assert_allclose(metrics.psnr(x, ref, 1.0), expected, atol=1e-4)
  ranges = np.array([1.0, 2.5])
  expected = [peak_signal_noise_ratio(ref[i], x[i], data_range=ranges[i]) for i in range(2)]
  np.testing.assert_allclose(metrics.psnr(x, ref, ranges), expected, atol=1e-4)


def test_rmse_and_snr_closed_forms(random_pair):
  x, ref = random_pair
  err = (x - ref).reshape(2, -1)
  np.testing.assert_allclose(metrics.rmse(x, ref), np.sqrt(np.mean(err**2, 1)), rtol=1e-5)
  expected_snr = 10 * np.log10(np.sum(ref.reshape(2, -1)**2, 1) / np.sum(err**2, 1))
  np.testing.assert_allclose(metrics.snr(x, ref), expected_snr, atol=1e-4)


@pytest.mark.parametrize("win_size", [11, 7])
def test_ssim_matches_skimage_random_multichannel(random_pair, win_size):
  x, ref = random_pair
  expected = _skimage_per_image(structural_similarity, x, ref, data_range=1.0,
                                win_size=win_size, **SKIMAGE_SSIM)
  np.testing.assert_allclose(metrics.ssim(x, ref, 1.0, win_size=win_size), expected,
                             atol=1e-4)


def test_ssim_border_handling_matches_skimage_when_filter_outgrows_crop():
  # win_size 3 crops 1 pixel but the sigma-1.5 filter reaches 5: borders count.
  rng = np.random.default_rng(9)
  ref = rng.random((1, 16, 16, 1))
  x = ref + 0.2 * rng.standard_normal(ref.shape)
  expected = _skimage_per_image(structural_similarity, x, ref, data_range=1.0,
                                win_size=3, **SKIMAGE_SSIM)
  np.testing.assert_allclose(metrics.ssim(x, ref, 1.0, win_size=3), expected, atol=1e-5)


def test_ssim_uniform_window_matches_skimage_default(random_pair):
  x, ref = random_pair  # skimage's defaults are what ldct-benchmark reports
  expected = _skimage_per_image(structural_similarity, x, ref, data_range=1.0)
  got = metrics.ssim(x, ref, 1.0, gaussian_weights=False, win_size=7,
                     use_sample_covariance=True)
  np.testing.assert_allclose(got, expected, atol=1e-4)


def test_psnr_ssim_match_skimage_on_noisy_shepp_logan(phantom_pair):
  x, ref = phantom_pair
  np.testing.assert_allclose(
      metrics.psnr(x, ref, 1.0),
      _skimage_per_image(peak_signal_noise_ratio, x, ref, data_range=1.0), atol=1e-4)
  expected = _skimage_per_image(structural_similarity, x, ref, data_range=1.0,
                                **SKIMAGE_SSIM)
  np.testing.assert_allclose(metrics.ssim(x, ref, 1.0), expected, atol=1e-4)


@pytest.mark.parametrize("window", ["abdomen", "lung", "paper"])
def test_ssim_psnr_match_skimage_on_windowed_real_ct(ct_pair_hu, window):
  x_hu, ref_hu = ct_pair_hu
  x, ref = apply_window(x_hu, window), apply_window(ref_hu, window)
  np.testing.assert_allclose(
      metrics.ssim(x, ref, 1.0),
      _skimage_per_image(structural_similarity, x, ref, data_range=1.0, **SKIMAGE_SSIM),
      atol=1e-4)
  np.testing.assert_allclose(
      metrics.psnr(x, ref, 1.0),
      _skimage_per_image(peak_signal_noise_ratio, x, ref, data_range=1.0), atol=1e-4)


def test_ssim_float32_with_large_offset_matches_float64_skimage():
  # Large offset, small data range: the worst case for float32 E[x^2] - E[x]^2.
  # Unshifted statistics are off by ~1e-5 here; mean-shifted ones by ~3e-7.
  rng = np.random.default_rng(10)
  ref = _ct_slice_hu()[None, ..., None] + 3000.0
  x = ref + 2.0 * rng.standard_normal(ref.shape)
  expected = _skimage_per_image(structural_similarity, x, ref, data_range=100.0,
                                **SKIMAGE_SSIM)
  got = metrics.ssim(x.astype(np.float32), ref.astype(np.float32), 100.0)
  np.testing.assert_allclose(got, expected, atol=2e-6)


def test_ssim_on_raw_hu_matches_skimage(ct_pair_hu):
  x, ref = ct_pair_hu
  expected = _skimage_per_image(structural_similarity, x, ref, data_range=4096.0,
                                **SKIMAGE_SSIM)
  np.testing.assert_allclose(metrics.ssim(x, ref, 4096.0), expected, atol=1e-4)


def test_gaussian_blur_matches_scipy_and_keeps_the_sum():
  images = np.random.default_rng(11).random((2, 20, 23, 2))
  blurred = np.asarray(metrics.gaussian_blur(images, 2.0), np.float64)
  expected = ndimage.gaussian_filter(images, (0, 2, 2, 0), mode="reflect", truncate=3.5)
  np.testing.assert_allclose(blurred, expected, atol=1e-6)
  np.testing.assert_allclose(blurred.sum(axis=(1, 2)), images.sum(axis=(1, 2)), rtol=1e-6)


def test_ssim_is_jittable_and_rejects_bad_shapes(random_pair):
  x, ref = random_pair
  jitted = jax.jit(metrics.ssim, static_argnames=("win_size",))
  np.testing.assert_allclose(jitted(x, ref, 1.0), metrics.ssim(x, ref, 1.0), atol=1e-6)
  with pytest.raises(ValueError, match="NHWC"):
    metrics.ssim(x[0], ref[0], 1.0)
  with pytest.raises(ValueError, match="win_size"):
    metrics.ssim(x[:, :5, :5], ref[:, :5, :5], 1.0)


def _ms_ssim_float64(x, ref, data_range, weights):
  """Wang et al. 2003 MS-SSIM on 2-D float64 arrays via scipy, written independently."""
  c1, c2 = (0.01 * data_range)**2, (0.03 * data_range)**2
  blur = lambda a: ndimage.gaussian_filter(a, 1.5, mode="reflect", truncate=3.5)
  values = []
  for scale, _ in enumerate(weights):
    mx, my = blur(x), blur(ref)
    vx, vy = blur(x * x) - mx**2, blur(ref * ref) - my**2
    cxy = blur(x * ref) - mx * my
    cs = (2 * cxy + c2) / (vx + vy + c2)
    lum = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
    inner = (slice(5, -5), slice(5, -5))
    if scale == len(weights) - 1:
      values.append((lum * cs)[inner].mean())
    else:
      values.append(cs[inner].mean())
      h, w = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2
      x = x[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
      ref = ref[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
  return np.prod(np.array(values)**np.array(weights))


@pytest.mark.parametrize("size,weights", [
    (181, metrics.MS_SSIM_WEIGHTS),
    (45, tuple(np.array(metrics.MS_SSIM_WEIGHTS[:3]) / sum(metrics.MS_SSIM_WEIGHTS[:3]))),
])
def test_ms_ssim_matches_float64_reference(size, weights):
  rng = np.random.default_rng(3)
  ref = ndimage.gaussian_filter(rng.random((2, size, size + 2, 1)), (0, 2, 2, 0))
  # Contrast and brightness change: luminance matters at the last scale.
  x = 0.8 * ref + 0.15 + 0.05 * rng.standard_normal(ref.shape)
  expected = [_ms_ssim_float64(x[i, ..., 0], ref[i, ..., 0], 1.0, weights) for i in range(2)]
  np.testing.assert_allclose(ms_ssim_jit(x, ref, 1.0, weights), expected, atol=1e-4)


def test_ms_ssim_identity_monotone_and_size_check():
  rng = np.random.default_rng(4)
  ref = ndimage.gaussian_filter(rng.random((1, 176, 176, 1)), (0, 3, 3, 0))
  noise = rng.standard_normal(ref.shape)
  np.testing.assert_allclose(ms_ssim_jit(ref, ref, 1.0), [1.0], atol=1e-6)
  values = [float(ms_ssim_jit(ref + s * noise, ref, 1.0)[0])
            for s in (0.01, 0.03, 0.1, 0.3)]
  assert all(a > b for a, b in zip(values, values[1:])), values
  with pytest.raises(ValueError, match="needs H, W >= 176"):
    metrics.ms_ssim(ref[:, :175], ref[:, :175], 1.0)


def test_epi_and_coc_match_scipy_numpy(phantom_pair):
  x, ref = phantom_pair
  # scipy's reflect-border Laplacian agrees with ours on interior pixels.
  lap = lambda a: ndimage.laplace(a[0, ..., 0])[1:-1, 1:-1].ravel()
  np.testing.assert_allclose(metrics.epi(x, ref), [np.corrcoef(lap(x), lap(ref))[0, 1]],
                             atol=1e-5)
  np.testing.assert_allclose(metrics.coc(x, ref), [np.corrcoef(x.ravel(), ref.ravel())[0, 1]],
                             atol=1e-5)
  np.testing.assert_allclose(metrics.epi(3 * ref + 7, ref), [1.0], atol=1e-5)
  assert float(metrics.epi(ndimage.gaussian_filter(ref, (0, 2, 2, 0)), ref)[0]) < 0.9


def test_nps_parseval_integral_equals_pixel_variance():
  rng = np.random.default_rng(5)
  rois = ndimage.gaussian_filter(rng.standard_normal((8, 32, 48)), (0, 1, 1)) * 30 + 40
  dy, dx = 0.6, 0.8
  nps = np.asarray(metrics.noise_power_spectrum(rois, (dy, dx)), np.float64)
  integral = nps.sum() / (32 * dy * 48 * dx)
  np.testing.assert_allclose(integral, np.mean(np.var(rois, axis=(1, 2))), rtol=1e-5)


def test_nps_white_noise_is_flat_at_sigma2_dxdy():
  rng = np.random.default_rng(6)
  sigma, dx = 12.0, 0.7
  rois = sigma * rng.standard_normal((64, 64, 64, 1))
  nps = np.asarray(metrics.noise_power_spectrum(rois, dx))
  level = sigma**2 * dx * dx
  off_dc = np.delete(nps.ravel(), 32 * 64 + 32)
  np.testing.assert_allclose(off_dc.mean(), level, rtol=0.01)
  frequencies, radial = metrics.radial_nps(nps, dx, num_bins=8)
  np.testing.assert_allclose(radial, level, rtol=0.06)
  np.testing.assert_allclose(frequencies, (np.arange(8) + 0.5) / 8 * 0.5 / dx, rtol=1e-6)


def test_nps_peak_at_cosine_frequency_and_plane_detrend():
  dx, cycles = 0.5, 5
  cols = np.arange(64)
  wave = np.cos(2 * np.pi * cycles * cols / 64)[None, None, :].repeat(64, axis=1)
  nps = np.asarray(metrics.noise_power_spectrum(wave, dx))
  fy, fx = metrics.nps_frequencies(nps.shape, dx)
  peak_row, peak_col = np.unravel_index(np.argmax(nps), nps.shape)
  assert fy[peak_row] == 0 and abs(fx[peak_col]) == pytest.approx(cycles / (64 * dx))
  # A linear ramp (heel effect) vanishes under plane detrending, not under mean.
  rng = np.random.default_rng(7)
  noise = rng.standard_normal((4, 32, 32))
  rows, cols = np.mgrid[:32, :32]
  ramped = noise + 0.5 * rows + 0.2 * cols
  plane_noise = metrics.noise_power_spectrum(noise, 1.0, detrend="plane")
  np.testing.assert_allclose(metrics.noise_power_spectrum(ramped, 1.0, detrend="plane"),
                             plane_noise, rtol=1e-3, atol=1e-5)
  assert float(metrics.noise_power_spectrum(ramped, 1.0)[16, 15]) > 10 * float(
      plane_noise[16, 15])
  with pytest.raises(ValueError, match="empty radial bins"):
    metrics.radial_nps(plane_noise, 1.0, num_bins=40)


@pytest.mark.parametrize("source", ["random", "ct"])
def test_glcm_matches_skimage(source):
  if source == "random":
    images = np.random.default_rng(8).random((2, 30, 31, 1))
  else:
    images = apply_window(_ct_slice_hu()[None, 32:96, 32:96, None], "abdomen")
  distances = (1, 2)
  angles = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4)
  features = metrics.glcm_features(images, levels=32, distances=distances, angles=angles)
  quantised = np.clip(np.floor(images * 32), 0, 31).astype(np.uint8)
  for i in range(images.shape[0]):
    glcm = graycomatrix(quantised[i, ..., 0], distances, angles, levels=32,
                        symmetric=True, normed=True)
    for prop in metrics.GLCM_PROPERTIES:
      np.testing.assert_allclose(features[prop][i], graycoprops(glcm, prop),
                                 rtol=1e-5, atol=1e-6, err_msg=prop)


def test_glcm_constant_image_has_unit_correlation_and_energy():
  features = metrics.glcm_features(np.full((1, 8, 8, 1), 0.5), levels=8)
  np.testing.assert_allclose(features["correlation"], 1.0)
  np.testing.assert_allclose(features["energy"], 1.0)
  np.testing.assert_allclose(features["contrast"], 0.0)


def test_window_metrics_paper_psnr_equals_ssinyu_convention(ct_pair_hu):
  x_hu, ref_hu = ct_pair_hu
  result = metrics.window_metrics(x_hu, ref_hu, "paper")
  # SSinyu measure.py: truncate to [-160, 240] HU, data range 400, in NumPy.
  truncated_mse = np.mean((np.clip(x_hu, -160, 240) - np.clip(ref_hu, -160, 240))**2)
  np.testing.assert_allclose(result["psnr"], [10 * np.log10(400.0**2 / truncated_mse)],
                             atol=1e-4)
  assert result["window"] == WINDOWS["paper"].as_dict() and result["data_range"] == 1.0
  np.testing.assert_allclose(result["rmse"] * 400, [np.sqrt(truncated_mse)], rtol=1e-5)


def test_ssim_on_truncated_hu_is_not_paper_window_ssim(ct_pair_hu):
  # The luminance term is not offset invariant: the two conventions disagree.
  x_hu, ref_hu = ct_pair_hu
  on_hu = metrics.ssim(np.clip(x_hu, -160, 240), np.clip(ref_hu, -160, 240), 400.0)
  windowed = metrics.window_metrics(x_hu, ref_hu, "paper", metrics=("ssim",))["ssim"]
  assert abs(float(on_hu[0]) - float(windowed[0])) > 1e-3


def test_window_metrics_match_direct_calls_and_reject_unknown(ct_pair_hu):
  x_hu, ref_hu = ct_pair_hu
  result = metrics.window_metrics(x_hu, ref_hu, (40, 400), metrics=("ssim", "coc"),
                                  data_range=0.5)
  x, ref = apply_window(x_hu, (40, 400)), apply_window(ref_hu, (40, 400))
  np.testing.assert_allclose(
      result["ssim"],
      _skimage_per_image(structural_similarity, x, ref, data_range=0.5, **SKIMAGE_SSIM),
      atol=1e-4)
  np.testing.assert_allclose(result["coc"], metrics.coc(x, ref), atol=1e-6)
  assert result["window"]["center"] == 40.0 and result["data_range"] == 0.5
  with pytest.raises(ValueError, match="unknown metrics"):
    metrics.window_metrics(x_hu, ref_hu, "paper", metrics=("psnr", "lpips"))
