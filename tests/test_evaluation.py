"""Evaluation helpers: noise estimate, classical baseline, scoring conventions, panels."""
import numpy as np
from skimage.metrics import peak_signal_noise_ratio

from ldct_jax import evaluation
from ldct_jax.data.pipeline import Normalization, Volume


def test_noise_sigma_estimate_on_white_noise_with_edges():
  rng = np.random.default_rng(0)
  image = np.zeros((256, 256))
  image[:, 128:] = 50.0  # a strong edge the MAD rule must ignore
  noisy = image + 3.0 * rng.normal(size=image.shape)
  assert abs(evaluation.estimate_noise_sigma(noisy) - 3.0) < 0.15


def test_nlm_baseline_reduces_error():
  rng = np.random.default_rng(1)
  yy, xx = np.mgrid[:64, :64]
  clean = np.where((yy - 32) ** 2 + (xx - 32) ** 2 < 400, 60.0, -1000.0)[None]
  noisy = clean + 40.0 * rng.normal(size=clean.shape)
  den = evaluation.classical_denoise(noisy.astype(np.float32), "nlm")
  assert np.sqrt(np.mean((den - clean) ** 2)) < 0.6 * np.sqrt(np.mean((noisy - clean) ** 2))


def test_scores_use_window_and_match_skimage():
  rng = np.random.default_rng(2)
  nd = rng.uniform(-300, 300, size=(2, 32, 32)).astype(np.float32)
  pred = nd + rng.normal(0, 20, size=nd.shape).astype(np.float32)
  scores = evaluation.score_volume(pred, nd, ["paper"])
  clip = lambda x: np.clip(x, -160, 240)
  expected = [peak_signal_noise_ratio(clip(nd[i]), clip(pred[i]), data_range=400) for i in range(2)]
  np.testing.assert_allclose(scores["psnr/paper"], expected, atol=1e-3)
  np.testing.assert_allclose(scores["rmse_hu"], np.sqrt(np.mean((pred - nd) ** 2, axis=(1, 2))),
                             rtol=1e-4)


def test_denoise_volume_covers_every_slice_with_identity_model():
  norm = Normalization()
  ld = np.random.default_rng(3).uniform(-1000, 1000, size=(5, 16, 16)).astype(np.float32)
  central = lambda x: x[:, x.shape[1] // 2]  # a slab model returns its centre slice
  out = evaluation.denoise_volume(central, ld, norm, slab=3, batch_size=2)
  np.testing.assert_allclose(out, ld, atol=1e-3)


def test_evaluate_volumes_slice_weighted_means_and_rows():
  nd = np.zeros((3, 16, 16), np.float32)
  vols = [Volume("a", {"ld": nd + 10, "nd": nd}), Volume("b", {"ld": nd[:1] + 40, "nd": nd[:1]})]
  report = evaluation.evaluate_volumes(vols, {"zero": lambda ld: ld * 0}, ["abdomen"])
  assert report["num_slices"] == 4
  assert report["mean"]["ldct"]["rmse_hu"] == (3 * 10 + 40) / 4
  assert report["patients"]["b"]["ldct"]["rmse_hu"] == 40
  assert report["mean"]["zero"]["rmse_hu"] == 0


def test_panel_png(tmp_path):
  from PIL import Image
  x = np.zeros((32, 32), np.float32)
  evaluation.save_panel(str(tmp_path / "p.png"), x, x, x, "abdomen")
  assert Image.open(tmp_path / "p.png").size == (128, 32)
