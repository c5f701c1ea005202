"""SURE training methods (methods/sure.py, methods/mri_gsure.py), their data and configs.

The CT noise model is checked against the dose simulator it stands for, and
its SURE against the true error on data drawn from that model; the training
steps are shown never to read a clean image (poisoned NDCT, refused keys);
the three configs and the experiment run end to end at tiny settings.
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldct_jax import sure
from ldct_jax.data import datasets, gaussian, mri_pipeline
from ldct_jax.data.pipeline import Volume
from ldct_jax.methods import build_method
from ldct_jax.methods import mri_gsure
from ldct_jax.methods import sure as sure_method
from ldct_jax.models.dncnn import DnCNN
from ldct_jax.physics import ct

from conftest import TINY_BUILTIN, windowed_psnr

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import ct_sure, dncnn_sure, mri_cascade_gsure  # noqa: E402

TINY_MRI = dict(num_phantoms=3, slices_per_subject=3, size=24)
# The built-in scanner (BuiltinSpec defaults).
PHYSICS = dict(incident_flux=5e5, dose_fraction=0.25, electronic_noise_std=float(np.sqrt(11.0)),
               kernel="ramp")


def tiny_ct(config, cache):
  config.data.cache_dir = str(cache)
  config.data.builtin.update(TINY_BUILTIN)
  config.data.update(dict(patch_size=32, batch_size=4))
  config.model.update(dict(depth=3, features=4))
  config.train.update(dict(num_steps=2, log_every=1, eval_every=2, checkpoint_every=2,
                           tensorboard=False))
  config.eval.update(dict(val_max_slices=2, classical="none", texture=()))
  return config


def tiny_mri(config, cache):
  config.data.cache_dir = str(cache)
  config.data.builtin_mri.update(TINY_MRI)
  config.data.batch_size = 2
  config.model.update(dict(num_cascades=2, depth=3, features=8))
  config.train.update(dict(num_steps=2, log_every=1, eval_every=2, checkpoint_every=2,
                           tensorboard=False))
  config.eval.update(dict(cs_lambdas=(1e-3,), cs_iters=(5,), batch_size=2))
  return config


def water_disc(size, radius_px, hu=0.0):
  yy, xx = np.mgrid[:size, :size] - size // 2
  inside = yy ** 2 + xx ** 2 < radius_px ** 2
  return np.where(inside, hu, -1000.0).astype(np.float32), inside


# --------------------------------------------------------------------------- the data


def test_gaussian_noise_option_poses_the_papers_task(builtin_cache):
  config = tiny_ct(dncnn_sure.get_config("s50"), builtin_cache)
  data = datasets.load_dataset(config.data)
  again = datasets.load_dataset(config.data)
  std = 50 * 400 / 255  # 78.4 HU on the 'paper' window [-160, 240]
  noise = []
  for key, volume in data.volumes.items():
    nd, ld = volume.arrays["nd"], volume.arrays["ld"]
    assert nd.min() >= -160 and nd.max() <= 240
    noise.append((ld - nd).ravel())
    np.testing.assert_array_equal(ld, again.volumes[key].arrays["ld"])  # drawn once, seeded
  noise = np.concatenate(noise)
  assert abs(noise.mean()) < 3 * std / np.sqrt(noise.size)
  assert noise.std() == pytest.approx(std, rel=0.02)
  assert data.splits == again.splits and data.dose == "paired"
  # The stated PSNR convention: 'paper' window PSNR (data range 1) = PSNR on the
  # [0, 255] scale (data range 255) of the clipped images, by scikit-image.
  from skimage.metrics import peak_signal_noise_ratio
  volume = next(iter(data.volumes.values()))
  to255 = lambda hu: np.clip((hu.astype(np.float64) + 160) / 400 * 255, 0, 255)
  want = [peak_signal_noise_ratio(to255(n), to255(l), data_range=255)
          for l, n in zip(volume.arrays["ld"], volume.arrays["nd"])]
  np.testing.assert_allclose(windowed_psnr(volume.arrays["ld"], volume.arrays["nd"]), want,
                             rtol=1e-6)
  assert gaussian.sigma_hu(25, "paper") == pytest.approx(39.2157, rel=1e-4)
  with pytest.raises(ValueError, match="positive"):
    gaussian.with_gaussian_noise(data, sigma=0.0)


def test_fbp_noise_probes_match_the_dose_simulators_noise():
  """Variance and neighbour correlation of the probes vs the simulator's own LDCT noise."""
  size, pixel = 64, 350.0 / 64
  disc, inside = water_disc(size, 22)
  draws = 24
  keys = jax.random.split(jax.random.PRNGKey(0), draws)
  ldct = np.stack([np.asarray(ct.simulate_low_dose(
      disc, 0.25, k, incident_flux=PHYSICS["incident_flux"],
      electronic_noise_std=PHYSICS["electronic_noise_std"], pixel_size=pixel)) for k in keys])
  simulated = ldct - ldct.mean(axis=0)
  # Probes made from ONE noisy LDCT (the plug-in the method uses).
  probes = np.asarray(sure_method.fbp_noise_probes(ldct[0], jax.random.PRNGKey(1), draws,
                                                   pixel_size=pixel, **PHYSICS))
  body = inside & (np.hypot(*(np.mgrid[:size, :size] - size // 2)) < 18)

  def stats(noise, ddof):
    var = np.sum(noise ** 2, axis=0) / (noise.shape[0] - ddof)
    lag = np.sum(noise[:, :, 1:] * noise[:, :, :-1], axis=0) / (noise.shape[0] - ddof)
    return var[body].mean(), (lag[body[:, 1:]] / var[:, 1:][body[:, 1:]]).mean()

  sim_var, sim_corr = stats(simulated, 1)
  probe_var, probe_corr = stats(probes, 0)
  assert probe_var == pytest.approx(sim_var, rel=0.15)
  assert abs(probe_corr - sim_corr) < 0.1
  assert abs(sim_corr) > 0.1  # correlated neighbours: not white noise


def test_ct_sure_is_unbiased_where_its_noise_model_holds_and_white_sure_is_not():
  """y = x + n, n drawn from the FBP noise model of x; SURE from probes of the noisy y.

  x is a water square, so the denoiser (a blur plus a soft-thresholded
  detail, nonlinear, exact on x) has no signal error to add variance: what
  is left is the noise terms SURE must get right.
  """
  size, pixel = 32, 350.0 / 64
  water = np.zeros((size, size), np.float32)
  scale, level = 4096.0, 1024.0 / 4096.0  # the CT configs' normalisation of 0 HU
  x = jnp.full((1, size, size, 1), level)
  taps = np.exp(-0.5 * np.arange(-3, 4) ** 2)
  blur = jnp.asarray(np.outer(taps, taps) / np.outer(taps, taps).sum(), jnp.float32)

  def apply(params, v):
    del params
    d = v - level
    smooth = jax.lax.conv_general_dilated(d, blur[:, :, None, None], (1, 1), "SAME",
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    detail = d - smooth
    return level + smooth + 0.3 * jnp.sign(detail) * jnp.maximum(jnp.abs(detail) - 0.003, 0.0)

  draws = 480
  noise = sure_method.fbp_noise_probes(water, jax.random.PRNGKey(1), draws, pixel_size=pixel,
                                       **PHYSICS) / scale
  y = x + noise[..., None]
  bank = sure_method.fbp_noise_probes(np.asarray(y[..., 0]) * scale - 1024.0,
                                      jax.random.PRNGKey(2), 4, pixel_size=pixel,
                                      **PHYSICS)[..., None] / scale
  noise_var = jnp.mean(jnp.square(bank), axis=(0, 2, 3, 4))
  probe = sure_method.combine_probes(bank, jax.random.PRNGKey(3))
  white = jnp.sqrt(noise_var)[:, None, None, None] * jax.random.normal(
      jax.random.PRNGKey(4), y.shape)
  true = jnp.mean(jnp.square(apply(None, y) - x), axis=(1, 2, 3))
  for u, unbiased in ((probe, True), (white, False)):
    gaps = np.asarray(sure.sure_from_probe(apply, None, y, u, noise_var).risk - true, np.float64)
    mean, se = gaps.mean(), gaps.std(ddof=1) / np.sqrt(draws)
    if unbiased:
      assert abs(mean) < 3.5 * se, (mean, se)
    else:
      assert abs(mean) > 6 * se, (mean, se)


# --------------------------------------------------------------------------- the steps


def poison_ndct(dataset):
  """The dataset with every training patient's NDCT replaced by NaN."""
  train = set(dataset.splits["train"])
  for key, volume in list(dataset.volumes.items()):
    if dataset.patient_of.get(key, key) in train:
      arrays = dict(volume.arrays)
      arrays["nd"] = np.full_like(arrays["nd"], np.nan)
      dataset.volumes[key] = Volume(volume.patient_id, arrays)
  return dataset


def run_steps(method, steps=2):
  stage = method.stages[0]
  data = stage.make_data({})
  try:
    batches = [next(data) for _ in range(steps)]
  finally:
    data.close()
  state = jax.jit(stage.init_state)(jax.random.PRNGKey(0), {})
  step = jax.jit(stage.train_step)
  first = state
  for i, batch in enumerate(batches):
    state, metrics = step(state, batch, jax.random.PRNGKey(10 + i))
    assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
  return stage, first, state, batches


@pytest.mark.parametrize("variant", ["gaussian", "fbp"])
def test_sure_training_never_reads_a_clean_image(builtin_cache, variant):
  config = (dncnn_sure.get_config() if variant == "gaussian" else ct_sure.get_config())
  config = tiny_ct(config, builtin_cache)
  dataset = poison_ndct(datasets.load_dataset(config.data))
  method = build_method(config, dataset)
  stage, first, state, batches = run_steps(method)
  expected = {"ld"} | ({f"probe{k}" for k in range(4)} if variant == "fbp" else set())
  assert set(batches[0]) == expected
  changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(first.params),
                                                    jax.tree.leaves(state.params))]
  assert any(changed)
  with pytest.raises(ValueError, match="beyond the noisy input"):
    stage.train_step(state, {**batches[0], "nd": batches[0]["ld"]}, jax.random.PRNGKey(0))


def test_sure_step_keeps_the_batch_statistics_of_the_unperturbed_pass(builtin_cache):
  config = tiny_ct(dncnn_sure.get_config(), builtin_cache)
  method = build_method(config, datasets.load_dataset(config.data))
  stage, first, _, batches = run_steps(method, steps=1)
  state, _ = stage.train_step(first, batches[0], jax.random.PRNGKey(10))
  model = DnCNN(**{k: v for k, v in config.model.items() if k != "name"})
  _, updates = model.apply({"params": first.params, "batch_stats": first.batch_stats},
                           batches[0]["ld"], train=True, mutable=["batch_stats"])
  assert jax.tree.leaves(state.batch_stats)
  for got, want in zip(jax.tree.leaves(state.batch_stats), jax.tree.leaves(updates)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)


def test_ct_sure_needs_the_scanner_physics_for_other_data(builtin_cache):
  config = tiny_ct(ct_sure.get_config(), builtin_cache)
  dataset = datasets.load_dataset(config.data)
  assert sure_method.ct_physics(config, dataset) == pytest.approx(PHYSICS)
  dataset.is_builtin = False
  stage = build_method(config, dataset).stages[0]  # evaluation on other data needs none
  with pytest.raises(ValueError, match="sure.physics"):
    stage.make_data({})  # training does
  config.sure.physics.update(PHYSICS)
  assert sure_method.ct_physics(config, dataset) == PHYSICS


@pytest.fixture(scope="module")
def mri_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("mri_gsure_cache")


def test_gsure_training_never_reads_a_fully_sampled_slice(mri_cache):
  from ldct_jax.tasks import mri as mri_task
  config = tiny_mri(mri_cascade_gsure.get_config(), mri_cache)
  dataset = mri_task.load_dataset(config)
  method = build_method(config, dataset)
  stage, _, state, batches = run_steps(method)
  assert set(batches[0]) == set(mri_gsure.BATCH_KEYS)
  with pytest.raises(ValueError, match="target"):
    stage.train_step(state, {**batches[0], "target": batches[0]["x"]}, jax.random.PRNGKey(0))
  assert mri_gsure.training_noise_std(config, dataset) == pytest.approx(0.01)
  np.testing.assert_allclose(batches[0]["noise_std"], 0.01 / np.sqrt(2) * batches[0]["scale"],
                             rtol=1e-6)
  # One mask per training slice: the same slice drawn twice has the same mask.
  files = dataset.split("train")
  shape = mri_pipeline.training_shape(files)
  fixed = mri_pipeline._SliceSampler(files, shape, "random", 4.0, None, fixed_mask_seed=0)
  fresh = mri_pipeline._SliceSampler(files, shape, "random", 4.0, None)
  masks = {}
  for seed in range(12):
    rng = np.random.default_rng(seed)
    slice_index = int(np.random.default_rng(seed).integers(fixed.offsets[-1]))
    masks.setdefault(slice_index, []).append(fixed(0, rng)["mask"])
  repeated = [m for m in masks.values() if len(m) > 1]
  assert repeated and all(np.array_equal(m[0], other) for m in repeated for other in m)
  draws = [fresh(0, np.random.default_rng(s))["mask"] for s in range(6)]
  assert not all(np.array_equal(draws[0], d) for d in draws)


def test_holdout_split_keeps_the_centre_and_hides_whole_measured_columns():
  mask = jnp.ones((64, 8, 32))
  protected = mri_gsure.centre_columns(32, 4.0, 0.0)
  assert protected.sum() == round(32 * 0.08) and protected[16]
  seen = np.asarray(mri_gsure.holdout_split(mask, jax.random.PRNGKey(0), 0.4, protected))
  assert np.all(seen[:, :, protected] == 1)
  assert np.all(seen == seen[:, :1, :])  # whole columns
  hidden = 1 - seen[:, 0, ~protected]
  assert hidden.mean() == pytest.approx(0.4, abs=0.03)


# --------------------------------------------------------------------------- end to end


def cli(args, cwd):
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  result = subprocess.run([sys.executable, "-m", "ldct_jax.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


CT_FLAGS = [f"--config.data.builtin.{k}={v}" for k, v in TINY_BUILTIN.items()] + [
    "--config.data.patch_size=32", "--config.data.batch_size=4", "--config.model.depth=3",
    "--config.model.features=4", "--config.train.num_steps=2", "--config.train.eval_every=2",
    "--config.train.checkpoint_every=2", "--config.train.tensorboard=False",
    "--config.eval.val_max_slices=2", "--config.eval.classical=none", "--config.eval.texture=()"]
MRI_FLAGS = [f"--config.data.builtin_mri.{k}={v}" for k, v in TINY_MRI.items()] + [
    "--config.data.batch_size=2", "--config.model.num_cascades=2", "--config.model.depth=3",
    "--config.model.features=8", "--config.train.num_steps=2", "--config.train.eval_every=2",
    "--config.train.checkpoint_every=2", "--config.train.tensorboard=False",
    "--config.eval.cs_lambdas=(0.001,)", "--config.eval.cs_iters=(5,)",
    "--config.eval.batch_size=2"]


@pytest.mark.parametrize("config,flags,rows", [
    ("configs/dncnn_sure.py:s15", CT_FLAGS, {"ldct", "model"}),
    ("configs/ct_sure.py", CT_FLAGS, {"ldct", "model"}),
    ("configs/mri_cascade_gsure.py", MRI_FLAGS, {"zero_filled", "cs_tv", "model"}),
])
def test_configs_train_and_evaluate_through_the_command_line(builtin_cache, mri_cache, tmp_path,
                                                             config, flags, rows):
  cache = mri_cache if "mri" in config else builtin_cache
  workdir = tmp_path / "run"
  cli([f"--config={REPO / config}", f"--workdir={workdir}",
       f"--config.data.cache_dir={cache}", *flags], cwd=tmp_path)
  report = json.loads((workdir / "eval" / "metrics.json").read_text())
  assert set(report["mean"]) == rows
  assert "SURE" in report["model"] or "GSURE" in report["model"]
  if "dncnn_sure" in config:  # the evaluator's 'ldct' row is the Gaussian-noisy input
    assert set(report["conventions"]["windows"]) == {"paper"}
    assert report["mean"]["ldct"]["rmse_hu"] == pytest.approx(15 * 400 / 255, rel=0.1)


def test_sure_vs_mse_experiment_runs_end_to_end_at_tiny_settings(builtin_cache, mri_cache,
                                                                  tmp_path):
  import importlib
  experiment = importlib.import_module("experiments.sure_vs_mse")
  rows = experiment.main(["--tiny", "--steps=1", "--sigmas=25", f"--workdir={tmp_path}",
                          f"--cache_dir={builtin_cache}"])
  parts = [r["part"] for r in rows]
  assert parts.count("gaussian") == 4 and parts.count("ct") == 4 and parts.count("mri") == 3
  assert sum("gap_db" in r for r in rows) == 4
  assert all(np.isfinite(r["psnr"]) and 0 < r["ssim"] <= 1 for r in rows)
  text = (tmp_path / "sure_vs_mse.md").read_text()
  assert "SURE - MSE (dB)" in text and "BM3D (true sigma)" in text
