"""The generic loop on toy stages: exact resume, stages, NaN handling, best checkpoint."""
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldct_jax.train.loop import (LoopConfig, NonFiniteLossError, Stage, restore_stage_state,
                                 run_stages)


class CountingData:
  """Deterministic batches from a counter; checkpointable like the grain iterator."""

  def __init__(self, seed=0, scale=1.0):
    self.seed, self.scale, self.position = seed, scale, 0

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.position])
    self.position += 1
    return {"x": (self.scale * rng.normal(size=(4, 3))).astype(np.float32)}

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = int(state["position"])


class SignallingData(CountingData):
  """Sends this process SIGTERM while fetching batch ``kill_at`` (0-based)."""

  def __init__(self, kill_at, **kwargs):
    super().__init__(**kwargs)
    self.kill_at = kill_at

  def __next__(self):
    if self.position == self.kill_at:
      os.kill(os.getpid(), signal.SIGTERM)
    return super().__next__()


def toy_stage(name="fit", num_steps=8, nan_at=None, offset_from=None, evaluate=None,
              best_mode="max", nan_only_at=None, kill_at=None):
  def init_state(rng, previous):
    w = jax.random.normal(rng, (3,))
    if offset_from:
      w = w + previous[offset_from]["w"]
    return {"w": w, "count": jnp.zeros((), jnp.int32)}

  def train_step(state, batch, rng):
    target = jnp.mean(batch["x"], axis=0) + 0.01 * jax.random.normal(rng, (3,))
    loss = jnp.mean(jnp.square(state["w"] - target))
    if nan_at is not None:
      loss = jnp.where(state["count"] + 1 >= nan_at, jnp.nan, loss)
    if nan_only_at is not None:
      loss = jnp.where(state["count"] + 1 == nan_only_at, jnp.nan, loss)
    w = state["w"] - 0.2 * (state["w"] - target)
    # 'n' is the (1-based) stage step, so its logged window means are known exactly.
    return {"w": w, "count": state["count"] + 1}, {"loss": loss, "n": state["count"] + 1}

  return Stage(name=name, num_steps=num_steps, init_state=init_state, train_step=train_step,
               make_data=lambda previous: (CountingData(seed=len(name)) if kill_at is None
                                           else SignallingData(kill_at, seed=len(name))),
               evaluate=evaluate,
               best_metric="val/score" if evaluate else None, best_mode=best_mode)


CFG = LoopConfig(log_every=1, eval_every=2, checkpoint_every=2, keep_checkpoints=2,
                 tensorboard=False)


def test_resume_after_stop_matches_uninterrupted_run(tmp_path):
  full = run_stages([toy_stage()], str(tmp_path / "a"), seed=3, loop_cfg=CFG)
  partial = run_stages([toy_stage()], str(tmp_path / "b"), seed=3,
                       loop_cfg=LoopConfig(**{**CFG.__dict__, "stop_at": 5}))
  assert partial == {}  # stopped inside the only stage
  resumed = run_stages([toy_stage()], str(tmp_path / "b"), seed=3, loop_cfg=CFG)
  np.testing.assert_array_equal(np.asarray(full["fit"]["w"]), np.asarray(resumed["fit"]["w"]))
  assert int(resumed["fit"]["count"]) == 8
  # The JSON-lines log holds every step once per run segment.
  steps = [json.loads(l)["step"] for l in open(tmp_path / "b" / "logs" / "metrics.jsonl")]
  assert steps == list(range(1, 9))


def test_completed_stage_is_not_retrained_and_feeds_the_next(tmp_path):
  stages = [toy_stage("first", 4), toy_stage("second", 6, offset_from="first")]
  stop = LoopConfig(**{**CFG.__dict__, "stop_at": 7})  # inside the second stage
  assert "first" in run_stages(stages, str(tmp_path), seed=0, loop_cfg=stop)
  assert os.path.exists(tmp_path / "checkpoints" / "first" / "COMPLETED")
  assert not os.path.exists(tmp_path / "checkpoints" / "second" / "COMPLETED")
  first_mtime = os.path.getmtime(tmp_path / "checkpoints" / "first" / "COMPLETED")
  finals = run_stages(stages, str(tmp_path), seed=0, loop_cfg=CFG)
  assert os.path.getmtime(tmp_path / "checkpoints" / "first" / "COMPLETED") == first_mtime
  assert int(finals["second"]["count"]) == 6
  # Global steps run on across stages; stage_step is the checkpoints' numbering.
  records = [json.loads(l) for l in open(tmp_path / "logs" / "metrics.jsonl")]
  second = [r for r in records if r["stage"] == "second" and "loss" in r]
  assert [r["step"] - r["stage_step"] for r in second] == [4] * len(second)
  assert second[-1]["stage_step"] == 6
  uninterrupted = run_stages(stages, str(tmp_path / "clean"), seed=0, loop_cfg=CFG)
  np.testing.assert_array_equal(np.asarray(uninterrupted["second"]["w"]),
                                np.asarray(finals["second"]["w"]))


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path):
  with pytest.raises(NonFiniteLossError, match=r"non-finite training metrics in steps 5..5.*step 4"):
    run_stages([toy_stage(nan_at=5)], str(tmp_path), seed=0, loop_cfg=CFG)
  state, step = restore_stage_state(str(tmp_path), toy_stage(), which="latest")
  assert step == 4 and int(state["count"]) == 4
  assert np.all(np.isfinite(np.asarray(state["w"])))


def test_best_checkpoint_follows_validation_metric(tmp_path):
  scores = {2: 0.5, 4: 0.9, 6: 0.1, 8: 0.2}

  def evaluate(state):
    return {"val/score": scores[int(state["count"])]}

  run_stages([toy_stage(evaluate=evaluate)], str(tmp_path), seed=0, loop_cfg=CFG)
  best = json.load(open(tmp_path / "checkpoints" / "fit" / "best.json"))
  assert best["step"] == 4 and best["value"] == 0.9
  state, step = restore_stage_state(str(tmp_path), toy_stage(), which="best")
  assert step == 4 and int(state["count"]) == 4
  _, latest = restore_stage_state(str(tmp_path), toy_stage(), which="latest")
  assert latest == 8


def test_best_mode_min_keeps_and_restores_the_minimum(tmp_path):
  # Lowest at step 2, so only the 'min' policy can keep it (latest 2 are 6 and 8);
  # the highest (step 4) must be dropped.
  scores = {2: 0.1, 4: 0.9, 6: 0.5, 8: 0.3}

  def evaluate(state):
    return {"val/score": scores[int(state["count"])]}

  run_stages([toy_stage(evaluate=evaluate, best_mode="min")], str(tmp_path), seed=0,
             loop_cfg=CFG)
  best = json.load(open(tmp_path / "checkpoints" / "fit" / "best.json"))
  assert best == {"step": 2, "metric": "val/score", "value": 0.1, "mode": "min"}
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints" / "fit") if d.isdigit())
  assert steps == [2, 6, 8]
  state, step = restore_stage_state(str(tmp_path), toy_stage(), which="best")
  assert step == 2 and int(state["count"]) == 2


def test_logged_training_metrics_are_window_means(tmp_path):
  cfg = LoopConfig(log_every=3, eval_every=100, checkpoint_every=100, tensorboard=True)
  stages = [toy_stage("first", 4), toy_stage("second", 8)]
  run_stages(stages, str(tmp_path), seed=0,
             loop_cfg=LoopConfig(**{**cfg.__dict__, "stop_at": 4 + 5}))
  run_stages(stages, str(tmp_path), seed=0, loop_cfg=cfg)  # resumes at stage step 5
  records = [json.loads(l) for l in open(tmp_path / "logs" / "metrics.jsonl")]
  # Windows close every 3 stage steps, at a stage's end, at the stop (global
  # step 9), and a new one opens after the resume. Global = stage step + 4 in 'second'.
  windows = [("first", 1, 3), ("first", 4, 4), ("second", 5, 7), ("second", 8, 9),
             ("second", 10, 10), ("second", 11, 12)]
  assert [(r["stage"], *r["window"]) for r in records] == windows
  assert [r["step"] for r in records] == [b for _, _, b in windows]
  assert [r["train_metrics"] for r in records] == [f"mean over steps {a}..{b}"
                                                   for _, a, b in windows]
  # 'n' is the stage step, so each logged value is the mean of the window's stage steps.
  offset = {"first": 0, "second": 4}
  expected = [np.mean(np.arange(a, b + 1)) - offset[s] for s, a, b in windows]
  np.testing.assert_allclose([r["n"] for r in records], expected, rtol=0, atol=1e-6)
  assert expected[3] == 4.5  # not the window's last value (5)
  # TensorBoard tags say the same.
  events = b"".join(open(tmp_path / "logs" / f, "rb").read()
                    for f in os.listdir(tmp_path / "logs") if f.startswith("events"))
  assert b"second/train_mean/n" in events and b"first/train_mean/loss" in events


def test_nan_in_any_step_of_a_log_window_is_caught(tmp_path):
  # NaN at step 3 only; logs every 4 steps, checkpoints every 2: the save at
  # step 4 must not happen, and the error names the window.
  cfg = LoopConfig(log_every=4, eval_every=100, checkpoint_every=2, tensorboard=False)
  with pytest.raises(NonFiniteLossError, match=r"in steps 1..4.*step 2"):
    run_stages([toy_stage(nan_only_at=3)], str(tmp_path / "log"), seed=0, loop_cfg=cfg)
  _, step = restore_stage_state(str(tmp_path / "log"), toy_stage(), which="latest")
  assert step == 2
  # Checkpoints more often than logs: the save at step 4 sees the open window's NaN.
  cfg = LoopConfig(log_every=8, eval_every=100, checkpoint_every=2, tensorboard=False)
  with pytest.raises(NonFiniteLossError, match=r"non-finite by step 4.*step 2"):
    run_stages([toy_stage(nan_only_at=3)], str(tmp_path / "ckpt"), seed=0, loop_cfg=cfg)


def test_sigterm_checkpoints_and_stops_in_a_stage_or_between_stages(tmp_path):
  def stages(kill_in_first=None):
    return [toy_stage("first", 4, kill_at=kill_in_first), toy_stage("second", 6, offset_from="first")]

  seen = []
  previous = signal.signal(signal.SIGTERM, lambda *a: seen.append(a))
  try:
    # Signalled while fetching batch 1: step 2 finishes, is checkpointed, and the run returns.
    assert run_stages(stages(kill_in_first=1), str(tmp_path / "mid"), seed=0, loop_cfg=CFG) == {}
    _, step = restore_stage_state(str(tmp_path / "mid"), toy_stage("first"), which="latest")
    assert step == 2
    # Signalled during the first stage's last step: it completes, the second never starts.
    finals = run_stages(stages(kill_in_first=3), str(tmp_path / "end"), seed=0, loop_cfg=CFG)
    assert list(finals) == ["first"]
    assert os.path.exists(tmp_path / "end" / "checkpoints" / "first" / "COMPLETED")
    assert not os.path.exists(tmp_path / "end" / "checkpoints" / "second")
    # The loop's handler is gone again: SIGTERM reaches the one installed before.
    os.kill(os.getpid(), signal.SIGTERM)
    assert len(seen) == 1
  finally:
    signal.signal(signal.SIGTERM, previous)
  clean = run_stages(stages(), str(tmp_path / "clean"), seed=0, loop_cfg=CFG)
  for name in ("mid", "end"):
    resumed = run_stages(stages(), str(tmp_path / name), seed=0, loop_cfg=CFG)
    np.testing.assert_array_equal(np.asarray(resumed["second"]["w"]),
                                  np.asarray(clean["second"]["w"]))


def test_step_budget_spaces_validations_evenly_and_zero_keeps_the_config():
  from ldct_jax.config import base_config, set_step_budget
  config = set_step_budget(base_config(), 300, validations=5)
  assert (config.train.num_steps, config.train.eval_every, config.train.checkpoint_every) == \
      (300, 60, 60)
  assert set_step_budget(base_config(), 3, validations=5).train.eval_every == 1
  default = base_config()
  kept = set_step_budget(base_config(), 0, validations=5)
  assert kept.train.to_dict() == default.train.to_dict()
