"""End to end on tiny built-in data: CLI train -> eval -> denoise, and exact resume with real data."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import redcnn as redcnn_config
from ldct_jax import run
from ldct_jax.data import builtin, dicom
from ldct_jax.train.loop import restore_stage_state
from ldct_jax.methods import build_method

from conftest import TINY_BUILTIN as TINY_DATA


def tiny_config(cache_dir, **train):
  config = redcnn_config.get_config()
  config.data.cache_dir = str(cache_dir)
  config.data.builtin.update(TINY_DATA)
  config.data.update(dict(patch_size=32, batch_size=4))
  config.model.update(dict(features=4, kernel_size=3, num_layers=2))
  config.train.update(dict(num_steps=4, log_every=1, eval_every=2, checkpoint_every=2,
                           tensorboard=True, **train))
  config.eval.update(dict(windows=("abdomen", "paper"), val_max_slices=2, classical="nlm"))
  return config


@pytest.fixture(scope="module")
def trained(builtin_cache, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  report = run.train_and_evaluate(tiny_config(builtin_cache), workdir)
  return workdir, report


def test_training_writes_logs_checkpoints_and_a_stated_metrics_report(trained):
  workdir, report = trained
  assert os.path.exists(os.path.join(workdir, "config.json"))
  lines = [json.loads(l) for l in open(os.path.join(workdir, "logs", "metrics.jsonl"))]
  assert [l["step"] for l in lines if "loss" in l] == [1, 2, 3, 4]
  assert any("val/psnr" in l for l in lines)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "logs")))
  saved = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
  assert saved["conventions"]["windows"]["paper"]["low"] == -160.0
  assert "data range 1" in saved["conventions"]["psnr_ssim"]
  assert set(saved["mean"]) == {"ldct", "model", "nlm"}
  assert {"psnr/abdomen", "ssim/paper", "rmse_hu"} <= set(saved["mean"]["model"])
  assert set(saved["patients"]) == set(report["patients"])
  panels = os.listdir(os.path.join(workdir, "eval", "panels"))
  assert any(p.endswith("_abdomen.png") for p in panels)


def test_stop_and_resume_reaches_the_same_parameters(builtin_cache, trained, tmp_path):
  config = tiny_config(builtin_cache)
  config.eval.after_training = False
  workdir = str(tmp_path / "resumed")
  stopped = tiny_config(builtin_cache, stop_at=3)
  stopped.eval.after_training = False
  assert run.train_and_evaluate(stopped, workdir) is None
  run.train_and_evaluate(config, workdir)
  method = build_method(config, None)
  a, step_a = restore_stage_state(trained[0], method.denoiser_stage, which="latest")
  b, step_b = restore_stage_state(workdir, method.denoiser_stage, which="latest")
  assert step_a == step_b == 4
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_denoise_writes_a_new_series_and_never_touches_inputs(builtin_cache, trained,
                                                             tmp_path):
  workdir, _ = trained
  config = tiny_config(builtin_cache)
  spec = builtin.BuiltinSpec.from_config(config.data.builtin)
  root = builtin.builtin_root(spec, builtin_cache)
  source = root / "SIM001" / "quarter_1mm"
  before = {p: p.stat().st_mtime_ns for p in source.iterdir()}
  out = tmp_path / "denoised"
  files = run.denoise_series(config, workdir, str(source), str(out))
  assert len(files) == TINY_DATA["num_slices"]
  original, denoised = dicom.read_series(source), dicom.read_series(out)
  assert denoised.hu.shape == original.hu.shape
  np.testing.assert_allclose(denoised.positions, original.positions)
  assert denoised.meta["PatientID"] == original.meta["PatientID"]
  assert denoised.meta["SeriesInstanceUID"] != original.meta["SeriesInstanceUID"]
  assert "denoised" in denoised.meta["SeriesDescription"]
  with pytest.raises((ValueError, FileExistsError)):
    run.denoise_series(config, workdir, str(source), str(out))  # would overwrite
  with pytest.raises(ValueError, match="inside the input"):
    run.denoise_series(config, workdir, str(source), str(source / "sub"))
  assert {p: p.stat().st_mtime_ns for p in source.iterdir()} == before


def test_cli_trains_and_evaluates_with_overrides(builtin_cache, tmp_path):
  workdir = tmp_path / "cli"
  overrides = [f"--config.data.cache_dir={builtin_cache}", "--config.data.patch_size=32",
               "--config.data.batch_size=4", "--config.model.features=4",
               "--config.model.kernel_size=3", "--config.model.num_layers=2",
               "--config.train.num_steps=2", "--config.train.eval_every=2",
               "--config.eval.classical=none", "--config.eval.val_max_slices=1"]
  overrides += [f"--config.data.builtin.{k}={v}" for k, v in TINY_DATA.items()]
  cmd = [sys.executable, "-m", "ldct_jax.main", "--config=configs/redcnn.py",
         f"--workdir={workdir}", *overrides]
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  assert f"workdir {workdir}" in result.stdout
  assert "psnr/abdomen" in result.stdout
  result = subprocess.run(cmd[:5] + ["--mode=eval"] + overrides, cwd=repo, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  assert os.path.exists(workdir / "eval" / "metrics.json")
