"""Texture metrics against closed forms, NumPy float64 and scikit-image; their evaluation columns."""
import numpy as np
import pytest

from ldct_jax import evaluation, texture
from ldct_jax.data.pipeline import Volume
from ldct_jax.errors import InputError

N = texture.ROI


def np_detrended(roi):
  """ROI minus its least-squares plane a + b y + c x (NumPy lstsq, float64)."""
  yy, xx = np.mgrid[:roi.shape[0], :roi.shape[1]]
  design = np.stack([np.ones(roi.size), yy.ravel(), xx.ravel()], 1)
  coef = np.linalg.lstsq(design, roi.ravel().astype(np.float64), rcond=None)[0]
  return roi - (design @ coef).reshape(roi.shape)


def phantom(size=96, seed=0):
  """Air, a 40 HU body disc whose left half is flat and right half striped, a bone block; + noise."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  image = np.full((size, size), -1000.0)
  body = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.46 * size) ** 2
  image[body] = 40.0
  stripes = body & (xx >= size // 2)
  image[stripes] += 70.0 * np.sin(2 * np.pi * yy[stripes] / 12.0)
  image[size // 2 - 8:size // 2 + 8, size // 2 + 20:size // 2 + 34] = 900.0
  clean = image.copy()
  return clean, (image + rng.normal(0, 12, image.shape)).astype(np.float32)


def test_soft_tissue_rois_lie_in_soft_tissue_and_flat_ones_in_the_flat_half():
  clean, nd = phantom()
  corners, flatness = texture.soft_tissue_rois(nd)
  assert len(corners) >= 8
  for y, x in corners:
    patch = clean[y:y + N, x:x + N]
    assert patch.min() > -160 and patch.max() < 240  # no air, no bone
  flattest = corners[np.argsort(flatness)[:texture.FLAT_ROIS]]
  assert np.all(flattest[:, 1] + N <= nd.shape[1] // 2 + 2)  # the unstriped half
  empty_corners, _ = texture.soft_tissue_rois(np.full((64, 64), -1000.0, np.float32))
  assert empty_corners.shape == (0, 2)


def test_roi_spectra_is_the_detrended_periodogram():
  rois = np.random.default_rng(1).normal(5.0, 10.0, (5, N, N)) \
      + np.linspace(0, 40, N)[None, :, None]  # a slope the detrending removes
  got = texture.roi_spectra(rois)
  want = np.stack([np.fft.fftshift(np.abs(np.fft.fft2(np_detrended(r))) ** 2) / N ** 2
                   for r in rois])
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * want.max())
  # Parseval: the spectrum sums to N^2 times the detrended variance.
  np.testing.assert_allclose(got.sum(axis=(1, 2)) / N ** 2,
                             [np.mean(np_detrended(r) ** 2) for r in rois], rtol=1e-4)


def test_nps_error_and_hf_ratio_closed_forms():
  rng = np.random.default_rng(2)
  nd = 40.0 + rng.normal(0, 12, (6, N, N))
  yy, xx = np.mgrid[:N, :N]
  plane = 3.0 + 0.7 * yy - 1.1 * xx
  for a in (0.5, 2.0):  # an affine map scales the detrended spectra by a^2
    pred = a * nd + 17.0
    assert texture.nps_error(pred, nd) == pytest.approx(abs(a * a - 1), rel=1e-4)
    assert texture.hf_ratio(pred, nd) == pytest.approx(a * a, rel=1e-4)
  assert texture.nps_error(nd + plane, nd) == pytest.approx(0.0, abs=1e-4)
  # A product of cosines at (2/16, 2/16) cycles/px is orthogonal to every plane
  # and lies below the cutoff: no high-frequency power at all. A checkerboard
  # (0.5, 0.5) cycles/px of amplitude A has all its power, A^2 N^2, above it.
  low = 30.0 * np.cos(2 * np.pi * 2 * yy / N) * np.cos(2 * np.pi * 2 * xx / N)
  assert texture.high_frequency_power(texture.roi_spectra(low[None])) == pytest.approx(
      0.0, abs=1e-6 * 30.0 ** 2 * N ** 2)
  assert texture.hf_ratio(nd + low, nd) == pytest.approx(1.0, rel=1e-4)
  checker = 5.0 * (-1.0) ** (yy + xx)
  assert texture.high_frequency_power(texture.roi_spectra(checker[None])) == pytest.approx(
      25.0 * N ** 2, rel=1e-5)


def skimage_glcm(rois_hu, low, high, levels):
  from skimage.feature import graycomatrix, graycoprops
  out = {p: [] for p in texture.GLCM_PROPERTIES}
  for roi in rois_hu:
    q = np.clip(np.floor(np.clip((roi.astype(np.float64) - low) / (high - low), 0, 1) * levels),
                0, levels - 1).astype(np.uint8)
    glcm = graycomatrix(q, [1], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=levels,
                        symmetric=True, normed=True)
    for p in texture.GLCM_PROPERTIES:
      out[p].append(graycoprops(glcm, p).mean())
  return {p: np.array(v) for p, v in out.items()}


def test_roi_glcm_matches_skimage():
  rois = np.random.default_rng(3).normal(40, 60, (7, N, N)).astype(np.float32)
  got = texture.roi_glcm(rois, "abdomen")
  want = skimage_glcm(rois, -160, 240, texture.GLCM_LEVELS)
  for p in texture.GLCM_PROPERTIES:
    np.testing.assert_allclose(got[p], want[p], rtol=1e-4, atol=1e-6, err_msg=p)


def test_scorer_columns_per_slice():
  clean, nd0 = phantom(seed=4)
  _, nd1 = phantom(seed=5)
  nd = np.stack([nd0, nd1, np.full_like(nd0, -1000.0)])  # the last slice: air only
  a = 0.5
  outputs = {"same": nd.copy(), "scaled": a * nd + 20.0,
             "noisy": nd + np.random.default_rng(6).normal(0, 20, nd.shape).astype(np.float32)}
  scorer = texture.TextureScorer(("glcm", "nps", "hf_ratio"), "abdomen")
  assert scorer.columns() == ("nps_error", "glcm_contrast_diff", "glcm_correlation_diff",
                              "glcm_homogeneity_diff", "glcm_energy_diff", "hf_ratio")
  got = scorer.score_rows(outputs, nd)
  for z in (0, 1):
    np.testing.assert_allclose([got["same"][c][z] for c in scorer.columns()],
                               [0, 0, 0, 0, 0, 1], atol=1e-6)
    assert got["scaled"]["nps_error"][z] == pytest.approx(1 - a * a, rel=1e-4)
    assert got["scaled"]["hf_ratio"][z] == pytest.approx(a * a, rel=1e-4)
    assert got["noisy"]["hf_ratio"][z] > 2  # 12 HU of grain + 20 HU more
    corners, flatness = texture.soft_tissue_rois(nd[z])
    want_nd = skimage_glcm(texture.crop_rois(nd[z], corners), -160, 240, 32)
    want = skimage_glcm(texture.crop_rois(outputs["noisy"][z], corners), -160, 240, 32)
    for p in texture.GLCM_PROPERTIES:
      assert got["noisy"][f"glcm_{p}_diff"][z] == pytest.approx(
          want[p].mean() - want_nd[p].mean(), rel=1e-4, abs=1e-6)
    flat = corners[np.argsort(flatness, kind="stable")[:texture.FLAT_ROIS]]
    assert got["noisy"]["nps_error"][z] == pytest.approx(texture.nps_error(
        texture.crop_rois(outputs["noisy"][z], flat), texture.crop_rois(nd[z], flat)), rel=1e-6)
  for row in outputs:
    assert all(np.isnan(got[row][c][2]) for c in scorer.columns())
  with pytest.raises(InputError, match="eval.texture: unknown texture metrics \\['psnr'\\]"):
    texture.TextureScorer(("psnr",), "abdomen")


def test_evaluate_volumes_texture_columns_and_lpips():
  """LPIPS through the scorer equals features.make_lpips on the same slices; the
  report's means skip NaN slices and its conventions state every definition."""
  from ldct_jax.models import features
  _, nd0 = phantom(size=32, seed=7)
  nd = np.stack([nd0, np.full_like(nd0, -1000.0)])
  ld = nd + np.random.default_rng(8).normal(0, 25, nd.shape).astype(np.float32)
  volume = Volume("p0", {"ld": ld, "nd": nd})
  scorer = texture.TextureScorer(texture.TEXTURE_METRICS, "abdomen", roi=8)
  report = evaluation.evaluate_volumes([volume], {"half": lambda x, pick: 0.5 * (x[pick] + nd[pick])},
                                       ["abdomen"], texture=scorer)
  lpips, variables = features.make_lpips("abdomen")
  half = 0.5 * (ld + nd)
  want = np.mean([np.asarray(lpips(variables, np.stack([ld[z], half[z]]), nd[z:z + 1]))
                  for z in range(2)], axis=0)
  for row, value in zip(("ldct", "half"), want):
    assert report["mean"][row]["lpips"] == pytest.approx(value, rel=1e-5)
    assert np.isfinite(report["mean"][row]["nps_error"])  # slice 0 only: slice 1 is air
  assert report["mean"]["half"]["hf_ratio"] < report["mean"]["ldct"]["hf_ratio"]
  assert set(evaluation.conventions(["abdomen"], scorer)["texture"]) == {
      "lpips", "nps_error", "hf_ratio", "glcm", "rois"}
