"""TDDL end to end on tiny built-in data: stages, unpaired partition, stage resume, reports."""
import json
import os
import types

import jax
import numpy as np
import pytest

from configs import tddl as tddl_config
from ldct_jax import run
from ldct_jax.data.pipeline import Normalization, Volume
from ldct_jax.methods import build_method, tddl
from ldct_jax.train.loop import restore_stage_state

from conftest import TINY_BUILTIN as TINY_DATA


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


def test_pipeline_runs_all_stages_and_reports_noise_fidelity(uninterrupted):
  workdir, report = uninterrupted
  for stage in ("noise_model", "denoiser"):
    assert os.path.exists(os.path.join(workdir, "checkpoints", stage, "COMPLETED"))
  saved = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
  assert {"ldct", "model"} <= set(saved["mean"])
  fidelity = saved["noise_fidelity"]
  assert {"synthetic", "gaussian", "image_poisson"} <= set(fidelity["candidates"])
  per_patient = fidelity["per_patient_body_std"]
  assert per_patient and all(row["synthetic_std_hu"] > 0 for row in per_patient.values())
  if len(per_patient) == 1:  # then the pooled real std is this patient's
    (row,) = per_patient.values()
    assert row["real_std_hu"] == pytest.approx(
        fidelity["candidates"]["synthetic"]["noise_std_real_hu"], rel=1e-5)
  assert report["model"].startswith("TDDL (vae noise) + gcn")


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
