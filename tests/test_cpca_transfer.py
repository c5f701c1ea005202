"""CPCA 2D -> 3D: short-series slab padding in denoise, the two-stage transfer, the experiment.

Tiny shapes throughout: compilation dominates the run time. The experiment
(experiments/cpca_transfer.py) runs end to end once per session on the tiny
built-in data, every row type at k = 3; its workdirs then serve the checks
of the 2D -> 3D handover.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_BUILTIN
from ldct_jax import models, run
from ldct_jax.data import dicom
from ldct_jax.data import pipeline as pl
from ldct_jax.evaluation import denoise_volume
from ldct_jax.methods import build_method, wgan
from ldct_jax.models.cpce import CPCE3D

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "experiments"))
import cpca_transfer  # noqa: E402

NORM = pl.Normalization()


# ------------------------------------------------------- short-series padding


@pytest.mark.parametrize("depth,slab,expected", [
    (1, 3, [[0, 0, 0]]),
    (1, 5, [[0, 0, 0, 0, 0]]),
    (2, 3, [[0, 0, 1], [0, 1, 1]]),
    (2, 5, [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]),
    (4, 5, [[0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [0, 1, 2, 3, 3], [1, 2, 3, 3, 3]]),
])
def test_series_shorter_than_the_slab_repeat_their_edge_slices(depth, slab, expected):
  """Every slab of a volume with fewer slices than the slab, written out by hand."""
  hu = np.arange(depth, dtype=np.float32)[:, None, None] * 10.0 + np.zeros((1, 4, 4), np.float32)
  volume = pl.Volume("short", {"ld": hu})
  (indices, batch), = list(pl.iterate_slices(volume, keys=("ld",), normalization=NORM,
                                             slab=slab, batch_size=8))
  assert indices.tolist() == list(range(depth))
  got = NORM.denormalize(batch["ld"][:, :, 0, 0, 0]) / 10.0
  np.testing.assert_array_equal(got, np.asarray(expected, np.float32))


def test_long_series_keep_reflected_neighbours():
  """Padding changes only for short series: 5 slices, slab 5, slice 0 reads 2 1 0 1 2."""
  hu = np.arange(5, dtype=np.float32)[:, None, None] + np.zeros((1, 4, 4), np.float32)
  (_, batch), = list(pl.iterate_slices(pl.Volume("v", {"ld": hu}), keys=("ld",),
                                       normalization=NORM, slab=5, batch_size=8))
  np.testing.assert_array_equal(NORM.denormalize(batch["ld"][0, :, 0, 0, 0]), [2, 1, 0, 1, 2])


@pytest.mark.parametrize("depth,slab", [(1, 3), (2, 3), (1, 5), (2, 5)])
def test_denoise_pads_a_short_series_for_a_3d_model_and_says_so(depth, slab, capsys):
  """A k = 3 / 5 CPCE-3D denoises a 1- and 2-slice series: each output slice is the
  model applied to the slab built here by repeating the series' edge slices."""
  model = CPCE3D(features=2, num_layers=2)
  rng = np.random.default_rng(depth * 10 + slab)
  hu = rng.uniform(-200.0, 200.0, (depth, 12, 12)).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, slab, 12, 12, 1)))
  fn = jax.jit(lambda x: model.apply(variables, x))
  out = denoise_volume(fn, hu, NORM, slab=slab, batch_size=2)
  assert out.shape == hu.shape
  assert "padded by edge replication" in capsys.readouterr().out
  for z in range(depth):
    neighbours = [min(max(z + d, 0), depth - 1) for d in range(-(slab // 2), slab // 2 + 1)]
    x = ((hu[neighbours] + 1024.0) / 4096.0)[None, ..., None]
    expected = np.asarray(model.apply(variables, x))[0, ..., 0] * 4096.0 - 1024.0
    np.testing.assert_allclose(out[z], expected, atol=1e-3)


# ------------------------------------------------ the experiment, end to end


STEPS = 2
WARMUP = 2  # MSE warm-up steps of every WGAN row (stage generator_mse)
# Every row tiny: 32^2 patches, 2 per update, 4-channel 2-layer generators, a
# 2-8 channel critic, 2 critic updates, the shipped VGG at conv1_2.
TINY = {"data.patch_size": 32, "data.batch_size": 2, "model.features": 4,
        "model.num_layers": 2, "model.kernel_size": 3,
        "wgan.critic.features": (2, 2, 4, 4, 8, 8), "wgan.critic.dense": 8, "wgan.n_critic": 2,
        "wgan.perceptual.layer": "conv1_2", "wgan.warmup_steps": WARMUP,
        "eval.val_max_slices": 2, "eval.classical": "nlm",
        "train.log_every": 1, "train.tensorboard": False,
        **{f"data.builtin.{k}": v for k, v in TINY_BUILTIN.items()}}


def _args(builtin_cache, workdir, *extra):
  return [f"--workdir={workdir}", "--slabs=3", f"--steps={STEPS}",
          f"--cache_dir={builtin_cache}"] + [f"--set={k}={v!r}" for k, v in TINY.items()] + list(extra)


@pytest.fixture(scope="module")
def experiment(builtin_cache, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("cpca_transfer")
  results = cpca_transfer.main(_args(builtin_cache, workdir))
  return workdir, results


def _tiny_config(builtin_cache, row):
  return cpca_transfer.row_config(row, STEPS, str(builtin_cache), "", TINY)


def _handover_is_exact(config, state_2d, seed=0):
  """The transfer stage's initial 3D generator on a random slab equals the trained
  2D generator on its central slice; the critic and the VGG are carried over."""
  method = build_method(config, None)
  stage_3d = method.stages[-1]
  start = jax.jit(stage_3d.init_state)(jax.random.PRNGKey(seed), {wgan.PRETRAIN_STAGE: state_2d})
  k = config.data.slab
  slab = jax.random.uniform(jax.random.PRNGKey(1), (2, k, 20, 20, 1), minval=0.2, maxval=0.4)
  model_2d = models.get_model(wgan.pretrain_config(config).model)
  model_3d = models.get_model(config.model)
  out_3d = model_3d.apply({"params": start.generator.params}, slab)
  out_2d = model_2d.apply({"params": state_2d.generator.params}, slab[:, k // 2])
  np.testing.assert_allclose(np.asarray(out_3d), np.asarray(out_2d), rtol=1e-5, atol=1e-6)
  assert float(jnp.max(out_2d)) > 0  # a trained net that is not dead: the match means something
  assert int(start.generator.step) == 0 and int(start.critic.step) == 0  # fresh optimisers
  for a, b in zip(jax.tree.leaves((start.critic.params, start.features)),
                  jax.tree.leaves((state_2d.critic.params, state_2d.features))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_experiment_table_has_every_row_at_its_best_and_last_checkpoint(experiment):
  workdir, results = experiment
  rows = ["redcnn", "wgan_vgg", "cpca1", "cpca3", "cpca_tf3"]
  assert sorted(results) == sorted(rows)
  text = open(workdir / "cpca_transfer.md").read()
  for row in rows:
    assert np.isfinite(results[row]["best"]["mean"]["model"]["psnr/abdomen"])
    if row != "redcnn":
      assert set(results[row]) == {"best", "latest"}
      assert results[row]["latest"]["checkpoint_step"] == STEPS
      assert f"| {cpca_transfer.label(row)} | latest ({STEPS}) |" in text
      best = json.load(open(workdir / row / "checkpoints" / "denoiser" / "best.json"))
      assert best["metric"] == "val/lpips" and best["mode"] == "min"
      assert results[row]["best"]["checkpoint_step"] == best["step"]
  # Equal generator updates: RED-CNN trains the WGAN rows' warm-up + adversarial steps.
  assert json.load(open(workdir / "redcnn" / "config.json"))["train"]["num_steps"] == \
      STEPS + WARMUP
  assert f"| {cpca_transfer.label('redcnn')} | best (" in text
  assert f"| {WARMUP} MSE + {STEPS} |" in text and f"| {WARMUP} MSE + {STEPS} 2D + {STEPS} 3D |" \
      in text
  assert "| LDCT input |" in text and "| nlm |" in text
  assert (workdir / "validation_curves.png").stat().st_size > 0
  saved = json.load(open(workdir / "cpca_transfer.json"))
  assert saved["cpca_tf3"]["best"]["model"].startswith("cpce3d (WGAN-GP")
  # Re-reading the finished rows trains nothing and gives the same table.
  again = cpca_transfer.main([f"--workdir={workdir}", "--slabs=3", "--summarise_only"])
  for row in rows:
    assert again[row]["best"]["mean"]["model"]["psnr/abdomen"] == \
        results[row]["best"]["mean"]["model"]["psnr/abdomen"]
  assert open(workdir / "cpca_transfer.md").read() == text


def test_tf_run_starts_from_the_cpca1_run_exactly(builtin_cache, experiment):
  """The TF row's 2D stage is CPCA-1's finished run (copied), and its handover to
  3D is exact: the 3D net at stage start is the trained 2D net on the central slice."""
  workdir, _ = experiment
  config = _tiny_config(builtin_cache, "cpca_tf3")
  method = build_method(config, None)
  states, _ = run.restore_all_stages(config, str(workdir / "cpca_tf3"), method, "latest")
  state_2d = states[wgan.PRETRAIN_STAGE]
  step = int(state_2d.generator.step)
  cpca1_config = _tiny_config(builtin_cache, "cpca1")
  cpca1 = build_method(cpca1_config, None)
  state_cpca1 = run.restore_all_stages(cpca1_config, str(workdir / "cpca1"), cpca1,
                                       "latest")[0][wgan.DENOISER_STAGE]
  assert step == STEPS
  for a, b in zip(jax.tree.leaves(state_2d.generator), jax.tree.leaves(state_cpca1.generator)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _handover_is_exact(config, state_2d)


def test_two_stage_run_trains_2d_inflates_and_denoises_short_series(builtin_cache, experiment,
                                                                   tmp_path, capsys):
  """configs/cpca3d.py:k3_tf as one run, the 2D stage trained in it: that stage ends
  exactly where the separate CPCA-1 run did (the fingerprint's promise), the
  handover is exact, and the trained 3D model denoises a 2-slice DICOM series."""
  config = _tiny_config(builtin_cache, "cpca_tf3")
  config.eval.after_training = False
  workdir = str(tmp_path / "two_stage")
  run.train_and_evaluate(config, workdir)
  method = build_method(config, None)
  state_2d = run.restore_all_stages(config, workdir, method, "latest")[0][wgan.PRETRAIN_STAGE]
  cpca1_config = _tiny_config(builtin_cache, "cpca1")
  cpca1 = build_method(cpca1_config, None)
  state_cpca1 = run.restore_all_stages(cpca1_config, str(experiment[0] / "cpca1"), cpca1,
                                       "latest")[0][wgan.DENOISER_STAGE]
  for a, b in zip(jax.tree.leaves(state_2d), jax.tree.leaves(state_cpca1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)
  _handover_is_exact(config, state_2d)
  log = [json.loads(line) for line in open(os.path.join(workdir, "logs", "metrics.jsonl"))]
  assert {l.get("stage") for l in log} == {wgan.WARMUP_STAGE, wgan.PRETRAIN_STAGE,
                                          wgan.DENOISER_STAGE}
  # The warm-up is a starting point: validated once, at its end.
  assert [l["stage_step"] for l in log if l["stage"] == wgan.WARMUP_STAGE
          and "val/psnr" in l] == [WARMUP]
  assert any("critic/gp" in l and l["stage"] == wgan.DENOISER_STAGE for l in log)
  # --mode=denoise on a series shorter than the slab.
  rng = np.random.default_rng(0)
  series = tmp_path / "short"
  dicom.write_series(rng.uniform(-100, 100, (2, 40, 40)).astype(np.float32), series,
                     spacing=(1.0, 0.8, 0.8))
  capsys.readouterr()
  files = run.predict(config, workdir, str(series), str(tmp_path / "out"))
  assert len(files) == 2
  assert "padded by edge replication" in capsys.readouterr().out
  assert dicom.read_series(tmp_path / "out").hu.shape == (2, 40, 40)
