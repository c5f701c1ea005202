"""MRI metrics in the fastMRI convention against scikit-image and NumPy float64 (fastMRI's evaluate.py, re-derived)."""
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ldct_jax import metrics


@pytest.fixture(scope="module")
def volumes():
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:40, :36]
  gt = np.stack([np.exp(-((yy - 20) ** 2 + (xx - 18 + s) ** 2) / 150.0) * (3.0 + s) for s in range(3)])
  pred = np.abs(gt + 0.05 * rng.standard_normal(gt.shape))
  return gt.astype(np.float32), pred.astype(np.float32)


def test_nmse_psnr_ssim_match_fastmri_evaluate(volumes):
  gt, pred = volumes
  g, p = gt.astype(np.float64), pred.astype(np.float64)
  maxval = g.max()
  nmse = np.linalg.norm(g - p) ** 2 / np.linalg.norm(g) ** 2
  psnr = peak_signal_noise_ratio(g, p, data_range=maxval)
  ssim = np.mean([structural_similarity(g[s], p[s], data_range=maxval) for s in range(len(g))])
  assert float(metrics.mri_nmse(gt, pred)) == pytest.approx(nmse, rel=1e-5)
  assert float(metrics.mri_psnr(gt, pred)) == pytest.approx(psnr, abs=1e-4)
  assert float(metrics.mri_ssim(gt, pred)) == pytest.approx(ssim, abs=1e-5)
  result = metrics.mri_volume_metrics(gt, pred)
  assert result["data_range"] == pytest.approx(maxval, rel=1e-6)
  assert result["psnr"] == pytest.approx(psnr, abs=1e-4)
  assert result["ssim"] == pytest.approx(ssim, abs=1e-5)
  # The range is the VOLUME maximum, not each slice's: a per-slice range gives other SSIMs.
  per_slice = np.mean([structural_similarity(g[s], p[s], data_range=g[s].max()) for s in range(3)])
  assert abs(per_slice - ssim) > 1e-4


def test_mri_metrics_reject_bad_shapes(volumes):
  gt, pred = volumes
  with pytest.raises(ValueError, match="volumes"):
    metrics.mri_psnr(gt[0], pred[0])
  with pytest.raises(ValueError, match="equal shape"):
    metrics.mri_nmse(gt, pred[:, :-1])
