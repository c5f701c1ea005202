"""Evaluation helpers: noise estimate, classical baseline, scoring conventions, panels."""
import numpy as np
import pytest
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
  report = evaluation.evaluate_volumes(vols, {"zero": evaluation.slice_wise(lambda ld: ld * 0)}, ["abdomen"])
  assert report["num_slices"] == 4
  assert report["mean"]["ldct"]["rmse_hu"] == (3 * 10 + 40) / 4
  assert report["patients"]["b"]["ldct"]["rmse_hu"] == 40
  assert report["mean"]["zero"]["rmse_hu"] == 0


def test_panel_png(tmp_path):
  from PIL import Image
  x = np.zeros((32, 32), np.float32)
  evaluation.save_panel(str(tmp_path / "p.png"), x, x, x, "abdomen")
  assert Image.open(tmp_path / "p.png").size == (128, 32)


def test_picked_slices_of_a_slab_model_read_their_true_neighbours():
  """eval.max_slices subsamples a volume; a 3D model must still see slices z-1 and z+1."""
  norm = Normalization()
  depth = 9
  ld = np.stack([np.full((16, 16), 10.0 * z * z, np.float32) for z in range(depth)])
  nd = np.zeros_like(ld)
  mean_of_ends = lambda x: 0.5 * (x[:, 0] + x[:, 2])  # a slab model: mean of its neighbours
  pick = evaluation.spread_slices(depth, 3)
  assert list(pick) == [0, 4, 8]  # non-adjacent
  # true neighbours: z=0 -> slice 1 twice (reflected), z=4 -> 3 and 5, z=8 -> 7 twice
  want = np.array([10.0, 0.5 * (90 + 250), 490.0])
  out = evaluation.denoise_volume(mean_of_ends, ld, norm, slab=3, batch_size=2, centres=pick)
  np.testing.assert_allclose(out[:, 0, 0], want, atol=1e-2)
  report = evaluation.evaluate_volumes(
      [Volume("a", {"ld": ld, "nd": nd})],
      {"model": evaluation.volume_denoiser(mean_of_ends, norm, slab=3, batch_size=2)},
      ["abdomen"], max_slices=3)
  assert report["mean"]["model"]["rmse_hu"] == pytest.approx(want.mean(), abs=1e-2)
