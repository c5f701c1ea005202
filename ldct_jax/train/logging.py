"""Run logging: scalars to TensorBoard event files and a JSON-lines file, and a progress bar.

TensorBoard events are written by ``tensorboardX`` (no TensorFlow). Only
process 0 writes; other hosts get a writer that drops everything, so the loop
needs no ``if process_index == 0`` of its own.

Training metrics arrive as means over a window of steps (see
``ldct_jax.train.loop``): their JSON line says which steps (``"window": [first,
last]`` global steps, and ``"train_metrics": "mean over steps first..last"``)
and their TensorBoard tags read ``<stage>/train_mean/<name>``. Validation
scalars are logged as given, under ``<stage>/<name>``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Mapping, Optional, Tuple

import jax
import numpy as np


def log(message: str) -> None:
  """A one-line progress message from process 0 (stdout, flushed)."""
  if jax.process_index() == 0:
    print(f"ldct_jax: {message}", flush=True)


class MetricWriter:
  """Writes scalar dicts to ``<logdir>/metrics.jsonl`` and TensorBoard events."""

  def __init__(self, logdir: str, *, tensorboard: bool = True):
    self._enabled = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if not self._enabled:
      return
    os.makedirs(logdir, exist_ok=True)
    self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a")
    if tensorboard:
      from tensorboardX import SummaryWriter  # deferred: heavy import
      # tensorboardX names the file by the second and host only: a resumed run
      # started within the same second would overwrite the earlier file.
      self._tb = SummaryWriter(logdir=logdir,
                               filename_suffix=f".{os.getpid()}.{time.time_ns()}")

  def write(self, step: int, scalars: Mapping[str, float], *, stage: str = "",
            stage_step: Optional[int] = None,
            window: Optional[Tuple[int, int]] = None) -> None:
    """Logs ``scalars`` at global ``step``.

    ``stage_step`` is the step within ``stage``, the number its checkpoints
    carry (JSON lines only). ``window = (first, last)`` marks ``scalars`` as
    training means over global steps ``first..last`` inclusive.
    """
    reserved = set(scalars) & _RESERVED
    if reserved:
      raise ValueError(f"metric names {sorted(reserved)} clash with the log's own fields "
                       f"{sorted(_RESERVED)}; rename them")
    if not self._enabled:
      return
    clean = {k: _to_float(v) for k, v in scalars.items()}
    record = {"step": int(step), "time": time.time(), **({"stage": stage} if stage else {}),
              **({"stage_step": int(stage_step)} if stage_step is not None else {})}
    if window is not None:
      first, last = int(window[0]), int(window[1])
      record.update(window=[first, last], train_metrics=f"mean over steps {first}..{last}")
    record.update(clean)
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      prefix = (f"{stage}/" if stage else "") + ("train_mean/" if window is not None else "")
      for k, v in clean.items():
        self._tb.add_scalar(prefix + k, v, global_step=int(step))

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


_RESERVED = frozenset({"step", "time", "stage", "stage_step", "window", "train_metrics"})


def _to_float(v) -> float:
  return float(np.asarray(v))


class ProgressBar:
  """A tqdm bar on process 0 showing step rate, ETA and the latest scalars."""

  def __init__(self, total: int, initial: int, desc: str):
    self._bar = None
    if jax.process_index() == 0:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step",
                       dynamic_ncols=True, file=sys.stderr, mininterval=1.0,
                       disable=None if os.environ.get("CI") else False)

  def update_to(self, step: int, scalars: Optional[Mapping[str, float]] = None) -> None:
    """Advances the bar to ``step`` (the loop only syncs with the device at log steps)."""
    if self._bar is None:
      return
    if scalars:
      self._bar.set_postfix({k: f"{_to_float(v):.4g}" for k, v in scalars.items()},
                            refresh=False)
    self._bar.update(step - self._bar.n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
