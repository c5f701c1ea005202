"""TDDL end to end on tiny built-in data: stages, unpaired partition, stage resume, reports.

Also: the noise wiring of the denoiser stage (calibrated VAE level x dose
gain), the same noise in HU under another normalisation, and the noise
fidelity report with patients of different pixel spacing.
"""
import json
import os
import types

import jax
import numpy as np
import pytest

from configs import tddl as tddl_config
from ldct_jax import noise_stats, run
from ldct_jax.data.datasets import load_dataset
from ldct_jax.data.pipeline import Normalization, Volume
from ldct_jax.evaluation import spread_slices
from ldct_jax.methods import build_method, supervised, tddl
from ldct_jax.models import vae as vae_lib
from ldct_jax.train.loop import restore_stage_state

from conftest import TINY_BUILTIN as TINY_DATA, windowed_psnr

# A normalisation other than the default (HU + 1024) / 4096: a constant
# hard-coded for the default would show up as a different noise in HU.
OTHER_NORMALIZATION = dict(kind="affine", shift=-1000.0, scale=2000.0)


def tiny_config(cache_dir, variant="", **train):
  config = tddl_config.get_config(variant)
  config.data.cache_dir = str(cache_dir)
  config.data.builtin.update(TINY_DATA)
  config.data.update(dict(patch_size=32, batch_size=4))
  config.tddl.vae.update(dict(num_steps=3, batch_size=4, patch_size=32))
  config.tddl.vae.model.update(dict(latent_channels=2, features=4))
  config.model.update(dict(features=4, num_blocks=1, k=4, search_window=7))
  config.train.update(dict(num_steps=4, log_every=1, eval_every=2, checkpoint_every=2,
                           tensorboard=False, **train))
  config.eval.update(dict(windows=("abdomen",), val_max_slices=1, classical="none",
                          noise_max_slices=2))
  return config


@pytest.fixture(scope="module")
def uninterrupted(builtin_cache, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tddl"))
  return workdir, run.train_and_evaluate(tiny_config(builtin_cache), workdir)


def test_partition_is_disjoint_unless_paired():
  noise, clean = tddl.partition_train_patients(["d", "a", "c", "b"], 0.5, paired=False)
  assert noise == ["a", "b"] and clean == ["c", "d"]
  assert tddl.partition_train_patients(["a", "b"], 0.9, paired=False) == (["a"], ["b"])
  assert tddl.partition_train_patients(["a", "b"], 0.5, paired=True) == (["a", "b"], ["a", "b"])
  with pytest.raises(ValueError, match=">= 2 training patients"):
    tddl.partition_train_patients(["a"], 0.5, paired=False)


def test_pipeline_runs_all_stages_and_reports_true_numbers(uninterrupted, builtin_cache):
  workdir, report = uninterrupted
  for stage in ("noise_model", "denoiser"):
    assert os.path.exists(os.path.join(workdir, "checkpoints", stage, "COMPLETED"))
  assert report["model"].startswith("TDDL (vae noise) + gcn")
  saved = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
  assert set(saved["mean"]) == {"ldct", "model"}  # classical='none'
  for row in saved["mean"].values():
    # psnr/ssim/rmse always finite; a texture column is null (JSON) when the tiny
    # test slices hold no soft-tissue region to measure it in.
    assert row and all(np.isfinite(v) for k, v in row.items()
                       if k.split("/")[0] in ("psnr", "ssim", "rmse_hu")), row
    assert all(v is None or np.isfinite(v) for v in row.values()), row
  # The LDCT row against an independent computation on the test slices
  # (every slice: eval.max_slices is 0): windowed PSNR and HU RMSE per
  # slice, then the mean over slices.
  config = tiny_config(builtin_cache)
  dataset = load_dataset(config.data)
  test = dataset.split("test")
  ld = np.concatenate([v.arrays["ld"] for v in test])
  nd = np.concatenate([v.arrays["nd"] for v in test])
  assert saved["num_slices"] == ld.shape[0]
  ldct = saved["mean"]["ldct"]
  assert ldct["psnr/abdomen"] == pytest.approx(np.mean(windowed_psnr(ld, nd)), abs=1e-3)
  rmse = np.sqrt(np.mean(np.square(ld.astype(np.float64) - nd), axis=(1, 2)))
  assert ldct["rmse_hu"] == pytest.approx(np.mean(rmse), rel=1e-4)
  # The GCN starts as the identity and trained 4 steps: it must not be worse
  # than its input by more than a little (a wrong normalisation or wrong
  # variables at inference would cost many dB).
  assert saved["mean"]["model"]["psnr/abdomen"] > ldct["psnr/abdomen"] - 0.3

  # Noise fidelity: the real noise's body std per test patient and pooled,
  # recomputed from the data on the report's slices (eval.noise_max_slices).
  fidelity = saved["noise_fidelity"]
  assert {"synthetic", "synthetic_matched", "gaussian", "image_poisson", "gaussian_ldct_level",
          "image_poisson_ldct_level"} == set(fidelity["candidates"])
  picks = [spread_slices(v.num_slices, config.eval.noise_max_slices) for v in test]
  per_patient = fidelity["per_patient_body_std"]
  assert set(per_patient) == {v.patient_id for v in test}
  real, bodies = [], []
  for volume, pick in zip(test, picks):
    noise = (volume.arrays["ld"] - volume.arrays["nd"])[pick].astype(np.float64)
    body = noise_stats.body_mask(volume.arrays["nd"][pick])
    row = per_patient[volume.patient_id]
    assert row["real_std_hu"] == pytest.approx(np.std(noise[body]), rel=1e-4)
    assert 1.0 < row["synthetic_std_hu"] < 200.0
    real.append(noise[body])
  pooled = fidelity["candidates"]["synthetic"]["noise_std_real_hu"]
  assert pooled == pytest.approx(np.std(np.concatenate(real)), rel=1e-4)
  for row in fidelity["candidates"].values():
    assert all(np.isfinite(v) for k, v in row.items() if k != "num_rois"), row


def test_noise_fidelity_rescales_matched_rows_to_the_real_body_std():
  # Two phantom "patients" whose real noise levels differ; the synthetic
  # noise is white at a known level, so every row's body std is predictable.
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:96, :96]
  body = ((yy - 48) ** 2 + (xx - 48) ** 2) < 40 ** 2
  nd = np.where(body, 40.0, -1000.0)[None].repeat(3, 0).astype(np.float32)
  volumes = [Volume(pid, {"nd": nd, "ld": nd + rng.normal(0, std, nd.shape).astype(np.float32)})
             for pid, std in (("P1", 10.0), ("P2", 20.0))]
  dataset = types.SimpleNamespace(split=lambda name: volumes,
                                  spacing={"P1": (1.0, 0.7, 0.7), "P2": (1.0, 0.7, 0.7)})
  normalization = Normalization()
  synthetic_std_hu = 30.0

  def add_noise(params, x, key, noise_map):
    return x + jax.random.normal(key, x.shape) * synthetic_std_hu / normalization.scale

  states = {"denoiser": types.SimpleNamespace(noise_params=None)}
  report = tddl.noise_fidelity(states, dataset, add_noise, normalization, noise_std_hu=25.0,
                               max_slices=3, seed=0, use_map=False)
  rows = report["candidates"]
  real_std = rows["synthetic"]["noise_std_real_hu"]
  assert real_std == pytest.approx(np.sqrt((10.0 ** 2 + 20.0 ** 2) / 2), rel=0.03)
  for name in ("synthetic_matched", "gaussian", "image_poisson"):
    assert rows[name]["noise_std_candidate_hu"] == pytest.approx(real_std, rel=0.02), name
  assert rows["synthetic"]["noise_std_candidate_hu"] == pytest.approx(synthetic_std_hu, rel=0.03)
  assert rows["gaussian_ldct_level"]["noise_std_candidate_hu"] == pytest.approx(25.0, rel=0.03)
  # White noise both: at the matched level the spectra agree, at 30 HU they do not.
  assert rows["synthetic_matched"]["nps_rel_l2"] < 0.15 < 1.0 < rows["synthetic"]["nps_rel_l2"]
  per_patient = report["per_patient_body_std"]
  assert per_patient["P1"]["real_std_hu"] == pytest.approx(10.0, rel=0.05)
  assert per_patient["P2"]["real_std_hu"] == pytest.approx(20.0, rel=0.05)
  for row in per_patient.values():
    assert row["synthetic_std_hu"] == pytest.approx(synthetic_std_hu, rel=0.05)


def _ring_noise(rng, shape, pixel_size_mm, peak_per_mm=0.28, width_per_mm=0.04):
  """Noise whose NPS is the ring ``exp(-((f - peak) / width)^2)`` HU^2 mm^2 at any spacing."""
  f = np.fft.fftfreq(shape[-1], d=pixel_size_mm)
  radius = np.hypot(f[:, None], f[None, :])
  ring = np.exp(-0.5 * ((radius - peak_per_mm) / width_per_mm) ** 2)
  field = np.fft.ifft2(np.fft.fft2(rng.normal(size=shape)) * ring).real
  return (field / pixel_size_mm).astype(np.float32)


def test_noise_fidelity_uses_each_patients_pixel_spacing():
  # Two patients with the same physical noise (an NPS ring at 0.28 mm^-1)
  # scanned at 1.0 and 0.5 mm pixels. Read with the first patient's spacing,
  # the second's ring would sit at 0.14 mm^-1 with 4x the power and the
  # pooled NPS would peak there; with each patient's own spacing it peaks at
  # 0.28 (bins of 0.5 / 8 mm^-1 up to the coarser Nyquist).
  rng = np.random.default_rng(1)
  yy, xx = np.mgrid[:96, :96]
  body = ((yy - 48) ** 2 + (xx - 48) ** 2) < 40 ** 2
  nd = np.where(body, 40.0, -1000.0)[None].repeat(3, 0).astype(np.float32)
  spacing = {"P1": 1.0, "P2": 0.5}
  volumes = [Volume(pid, {"nd": nd, "ld": nd + 20.0 * _ring_noise(rng, nd.shape, dx)})
             for pid, dx in spacing.items()]
  dataset = types.SimpleNamespace(split=lambda name: volumes,
                                  spacing={pid: (1.0, dx, dx) for pid, dx in spacing.items()})
  normalization = Normalization()

  # The synthetic noise: the same kind, another realisation, per patient's
  # spacing (the report stacks 3 slices of P1, then 3 of P2).
  synthetic = np.concatenate([20.0 * _ring_noise(rng, (3, 96, 96), dx)
                              for dx in spacing.values()])[..., None] / normalization.scale

  def add_noise(params, x, key, noise_map):
    del params, key, noise_map
    return x + synthetic

  states = {"denoiser": types.SimpleNamespace(noise_params=None)}
  rows = tddl.noise_fidelity(states, dataset, add_noise, normalization, noise_std_hu=25.0,
                             max_slices=3, seed=0, use_map=False)["candidates"]
  bin_width = 0.5 / 8
  assert abs(rows["synthetic"]["nps_peak_freq_real"] - 0.28) <= bin_width
  assert abs(rows["synthetic"]["nps_peak_freq_candidate"] - 0.28) <= bin_width
  assert rows["synthetic"]["nps_rel_l2"] < 0.3
  # White noise of the same std has no such peak: its NPS is flat.
  assert rows["gaussian"]["nps_rel_l2"] > 2 * rows["synthetic"]["nps_rel_l2"]


def _noise_stages(config, dataset, vae_steps=3, draws=4):
  """Runs TDDL's noise-model stage by hand, then the denoiser stage's step.

  The denoiser's paired step is replaced by one that returns the pseudo
  pair's noise (pseudo-LDCT - NDCT), so what comes back is exactly the noise
  the denoiser would train on: built by the stage's own ``add_noise`` from
  the state the stage initialises from the finished VAE stage.
  """
  def capture(model, loss_fn):
    del model, loss_fn
    return lambda state, batch, rng: (state, {"added": batch["ld"] - batch["nd"]})

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(supervised, "make_train_step", capture)
    method = build_method(config, dataset)
  vae_stage, denoiser_stage = method.stages
  key = jax.random.PRNGKey(config.seed)
  # Jitted, as the training loop does: eager Flax init costs ~4x the time.
  state = jax.jit(vae_stage.init_state)(key, {})
  step = jax.jit(vae_stage.train_step)
  stream = vae_stage.make_data({})
  try:
    for i in range(vae_steps):
      state, metrics = step(state, next(stream), jax.random.fold_in(key, i))
  finally:
    stream.close()
  previous = {"noise_model": state}
  denoiser_state = jax.jit(denoiser_stage.init_state)(key, previous)
  stream = denoiser_stage.make_data(previous)
  try:
    batch = next(stream)
  finally:
    stream.close()
  synth = jax.jit(denoiser_stage.train_step)
  added = np.stack([np.asarray(synth(denoiser_state, batch, jax.random.PRNGKey(100 + i))[1]["added"])
                    for i in range(draws)])
  return types.SimpleNamespace(
      normalization=Normalization.from_config(config.data.normalization), vae_state=state,
      vae_metrics={k: float(v) for k, v in metrics.items()}, denoiser_state=denoiser_state,
      batch=batch, added=added, synth=synth)


@pytest.fixture(scope="module")
def noise_stages(builtin_cache):
  """``_noise_stages`` under the default and under another normalisation."""
  out = {}
  for name, normalization in (("default", None), ("other", OTHER_NORMALIZATION)):
    config = tiny_config(builtin_cache)
    if normalization:
      config.data.normalization = normalization
    out[name] = _noise_stages(config, load_dataset(config.data))
  return out


def test_denoiser_step_adds_the_calibrated_noise_level(noise_stages, builtin_cache):
  # pseudo-LDCT - NDCT = noise_gain x sample_gain x VAE sample: its std must
  # equal the dose gain times the VAE's calibrated level on the same NDCT
  # conditions, drawn here independently from the VAE's own parameters.
  # Tolerance 5%: sampling error of 4 draws against 8, on 4 x 32^2 pixels.
  config = tiny_config(builtin_cache)
  run_ = noise_stages["default"]
  gain = float(run_.denoiser_state.noise_params["sample_gain"])
  assert gain == pytest.approx(float(run_.vae_state.sample_gain()), rel=1e-6)
  assert gain == pytest.approx(run_.vae_metrics["sample_gain"], rel=1e-5)
  # Discriminating: a missing or doubled calibration would be > 5% off.
  assert abs(gain - 1.0) > 0.15, gain
  model = vae_lib.NoiseVAE(normalization=run_.normalization, **dict(config.tddl.vae.model))
  nd = run_.batch["nd"]
  structure = vae_lib.extract_noise(nd, normalization=run_.normalization,
                                    **tddl.extract_settings(config.tddl))[1]
  condition = vae_lib.make_condition(structure, run_.batch["noise_map"])
  sample = jax.jit(lambda key: model.apply({"params": run_.vae_state.params}, condition, key,
                                          method=vae_lib.NoiseVAE.sample))
  draws = np.stack([np.asarray(sample(jax.random.PRNGKey(200 + i))) for i in range(8)])
  expected_hu = config.tddl.noise_gain * gain * draws.std() * run_.normalization.scale
  added_hu = run_.added.std() * run_.normalization.scale
  assert 1.0 < expected_hu < 200.0
  assert added_hu == pytest.approx(expected_hu, rel=0.05)
  # The calibration is read from the stage's state, not fixed at build time:
  # the same key with twice the gain gives exactly twice the noise.
  params = run_.denoiser_state.noise_params
  doubled = run_.denoiser_state.replace(noise_params={**params,
                                                     "sample_gain": 2.0 * params["sample_gain"]})
  twice = np.asarray(run_.synth(doubled, run_.batch, jax.random.PRNGKey(100))[1]["added"])
  np.testing.assert_allclose(twice, 2.0 * run_.added[0], rtol=1e-4, atol=1e-7)


def test_noise_model_is_the_same_in_hu_under_another_normalization(noise_stages, builtin_cache):
  # Same data, seeds and HU scales, inputs mapped by (HU + 1000) / 2000
  # instead of (HU + 1024) / 4096: the VAE's training, calibration and the
  # pseudo-LDCT noise must agree in HU (a default-normalisation constant
  # left anywhere -- body threshold, edge threshold, noise scale, condition
  # offset -- changes them by far more than the tolerances).
  a, b = noise_stages["default"], noise_stages["other"]
  assert b.normalization.scale == 2000.0
  np.testing.assert_allclose(np.asarray(a.batch["nd"]) * a.normalization.scale - 1024.0,
                             np.asarray(b.batch["nd"]) * b.normalization.scale - 1000.0,
                             atol=1e-3)
  for key in ("recon_rmse_hu", "sigma_hu", "kl", "sample_gain", "observed_fraction"):
    assert a.vae_metrics[key] == pytest.approx(b.vae_metrics[key], rel=1e-3), key
  # The NLL is a log-density in network units: it moves by log(4096 / 2000).
  assert b.vae_metrics["nll"] - a.vae_metrics["nll"] == pytest.approx(np.log(4096 / 2000),
                                                                      rel=1e-3)
  level = lambda run_: float(run_.vae_state.data_mean_square) * run_.normalization.scale ** 2
  assert level(a) == pytest.approx(level(b), rel=1e-3)
  added_a, added_b = a.added * a.normalization.scale, b.added * b.normalization.scale
  assert 1.0 < added_a.std() < 200.0
  np.testing.assert_allclose(added_a, added_b, atol=0.02 * added_a.std())
  # The baselines' level estimate from the noise patients' LDCT, in HU.
  config = tiny_config(builtin_cache)
  dataset = load_dataset(config.data)
  volumes = [v for v in dataset.split("train")]
  extract = tddl.extract_settings(config.tddl)
  levels = [tddl.estimate_noise_level_hu(volumes, run_.normalization, **extract)
            for run_ in (a, b)]
  assert 1.0 < levels[0] < 200.0
  assert levels[0] == pytest.approx(levels[1], rel=1e-4)


def test_resume_inside_denoiser_keeps_noise_model_and_matches(builtin_cache, uninterrupted,
                                                             tmp_path):
  stopped = tiny_config(builtin_cache, stop_at=3 + 2)  # 3 VAE steps, then 2 denoiser steps
  stopped.eval.after_training = False
  assert run.train_and_evaluate(stopped, str(tmp_path)) is None
  vae_done = os.path.getmtime(tmp_path / "checkpoints" / "noise_model" / "COMPLETED")
  resumed = tiny_config(builtin_cache)
  resumed.eval.after_training = False
  run.train_and_evaluate(resumed, str(tmp_path))
  assert os.path.getmtime(tmp_path / "checkpoints" / "noise_model" / "COMPLETED") == vae_done
  method = build_method(resumed, None)
  states = {}
  for name, workdir in (("a", uninterrupted[0]), ("b", str(tmp_path))):
    previous = {}
    for stage in method.stages:
      previous[stage.name], _ = restore_stage_state(workdir, stage, which="latest",
                                                    previous=previous)
    states[name] = previous["denoiser"]
  for x, y in zip(jax.tree.leaves(states["a"].params), jax.tree.leaves(states["b"].params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_baseline_noise_sources_skip_the_vae_and_add_matched_noise(builtin_cache):
  from ldct_jax.data.datasets import load_dataset
  from ldct_jax.data.pipeline import Normalization
  config = tiny_config(builtin_cache, "gaussian")
  method = build_method(config, load_dataset(config.data))
  assert [s.name for s in method.stages] == ["denoiser"]
  norm = Normalization()
  nd = np.full((2, 32, 32, 1), norm.normalize(40.0), np.float32)
  for source in ("gaussian", "poisson"):
    add = tddl.make_noise_fn(source, norm, 25.0)
    noise_hu = (np.asarray(add({}, nd, jax.random.PRNGKey(0))) - nd) * norm.scale
    assert abs(noise_hu.std() - 25.0) < 2.5, source
