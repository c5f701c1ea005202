"""Checkpoints: one orbax CheckpointManager per training stage.

Each checkpoint holds the stage's state pytree and the data iterator's state
(JSON), so a resumed run continues the exact sample stream. Retention keeps
the latest ``keep`` checkpoints (for resuming) plus the best one by the
validation metric (for evaluation); the best step is also recorded in
``best.json`` so evaluation and humans can find it without orbax.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


class StageCheckpoints:
  """Saves and restores ``(state, data_state)`` for one stage directory."""

  def __init__(self, directory: str, *, keep: int = 3,
               best_metric: Optional[str] = None, best_mode: str = "max"):
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    self.directory = os.path.abspath(directory)
    self.best_metric = best_metric
    self.best_mode = best_mode
    policies = [checkpoint_managers.LatestN(n=keep)]
    if best_metric:
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: metrics[best_metric],
          # BestN keeps the tail of an ascending sort; reverse for "min".
          reverse=(best_mode == "min"), n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: Any = None,
           metrics: Optional[dict] = None) -> None:
    """Asynchronously saves; ``metrics`` (floats) rank the best checkpoint."""
    metrics = {k: float(v) for k, v in (metrics or {}).items()}
    if self.best_metric and self.best_metric not in metrics:
      ranked = None
    else:
      ranked = metrics or None
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state if data_state is not None else {})),
        metrics=ranked, force=True)
    if ranked and self.best_metric:
      self._maybe_record_best(step, ranked[self.best_metric])

  def restore(self, abstract_state: Any, step: Optional[int] = None):
    """Restores ``(state, data_state, step)``; ``step`` defaults to the latest."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"], step

  def best(self) -> Optional[dict]:
    path = os.path.join(self.directory, "best.json")
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def _maybe_record_best(self, step: int, value: float) -> None:
    if not math.isfinite(value) or jax.process_index() != 0:
      return
    current = self.best()
    better = (current is None or
              (value > current["value"] if self.best_mode == "max"
               else value < current["value"]))
    if better:
      record = {"step": int(step), "metric": self.best_metric,
                "value": float(value), "mode": self.best_mode}
      tmp = os.path.join(self.directory, "best.json.tmp")
      with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
      os.replace(tmp, os.path.join(self.directory, "best.json"))
