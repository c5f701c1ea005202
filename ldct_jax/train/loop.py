"""The one training loop shared by every method.

A method contributes ``Stage`` objects: a state initialiser, a pure jit-able
``train_step(state, batch, rng) -> (state, metrics)``, a factory for its data
iterator and, optionally, a validation function. The loop owns everything
else: the device mesh and sharding, jit with buffer donation, per-step RNG,
logging, checkpoints, resume, NaN detection and preemption.

Data parallelism is jit + ``NamedSharding`` over a one-axis ``('data',)`` mesh
spanning every device of every host: batches are sharded along their leading
axis, the state is replicated, and XLA inserts the gradient all-reduce. This
is what ``pmap`` used to provide (``pmap`` is itself now built on jit and
shard_map); the same code runs on 1 CPU, 8 GPUs or a TPU pod.

Multi-stage methods (TDDL: noise model -> synthesis -> denoiser) list several
stages. Each stage checkpoints under ``<workdir>/checkpoints/<stage>/`` and is
marked complete when done, so a killed run resumes inside the stage it was in.
Later stages see the final states of earlier ones through ``previous``.

Logged training metrics are means over the log window: the jitted step adds
each step's metrics to a running sum on the device (no host sync per step),
and at a log step the loop divides by the window's length. A NaN/inf in any
step of the window makes the sum non-finite, so NaN detection still sees
every step, and no checkpoint is saved while the window holds one.

Multi-host: every host runs this same loop in lockstep (SPMD), so every
decision that leads to a collective (checkpoint save, validation, stopping)
must be taken identically on all hosts. Step counts, ``stop_at``, NaN checks
(on replicated metrics) and validation results (gathered to every host, see
``ldct_jax.evaluation``) are. SIGTERM is not: a scheduler may signal one host,
or all hosts at slightly different steps. The local flag set by the handler is
therefore OR-reduced over processes (``multihost_utils.process_allgather`` of
one int, a tiny collective and a host sync) every
``LoopConfig.preemption_check_every`` steps, and all hosts stop, checkpoint and
exit at the first such step after any host was signalled. We chose this over
``multihost_utils.reached_preemption_sync_point`` because that relies on the
C++ preemption notifier owning SIGTERM (a Python handler replaces it) and on
the scheduler's notice reaching the coordination service; the all-reduced flag
works with whatever delivers SIGTERM to any subset of hosts. A single-process
run checks its flag every step and never runs the collective.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
from typing import Any, Callable, Dict, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ldct_jax.data.pipeline import make_mesh, to_global_batch
from ldct_jax.train.checkpoint import StageCheckpoints
from ldct_jax.train.logging import MetricWriter, ProgressBar, log

State = Any
Previous = Mapping[str, State]


class NonFiniteLossError(RuntimeError):
  """Raised when training produces NaN/inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class Stage:
  """One trainable stage of a method.

  Attributes:
    name: directory-safe stage name (checkpoints/<name>).
    num_steps: optimisation steps in this stage.
    init_state: ``(rng, previous) -> state`` pytree; must be traceable by
      ``jax.eval_shape`` (restores use its abstract shapes).
    train_step: pure ``(state, batch, rng) -> (state, metrics)``; metrics are
      scalars averaged over the global batch.
    make_data: ``previous -> iterator`` of host-local NumPy batches, with
      JSON-serialisable ``get_state()``/``set_state()`` for exact resume.
    evaluate: optional host-side ``(state) -> {name: float}`` validation.
    best_metric / best_mode: which validation scalar ranks checkpoints.
    eval_every: steps between validations of this stage; None = the loop's
      ``eval_every`` (a stage that is only a starting point validates once).
  """

  name: str
  num_steps: int
  init_state: Callable[[jax.Array, Previous], State]
  train_step: Callable[[State, Any, jax.Array], tuple]
  make_data: Callable[[Previous], Iterator]
  evaluate: Optional[Callable[[State], Dict[str, float]]] = None
  best_metric: Optional[str] = None
  best_mode: str = "max"
  eval_every: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  log_every: int = 50
  eval_every: int = 500
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  # Stop (with a checkpoint) once this global step is reached, as a scheduler
  # preemption would; 0 = never. Used to test and to time-slice long runs.
  stop_at: int = 0
  tensorboard: bool = True
  # Multi-host only: steps between the all-host checks of the SIGTERM flag
  # (each is a tiny collective and a host sync). A signalled run stops at the
  # next multiple of this, so keep it well inside the scheduler's grace period.
  preemption_check_every: int = 10

  @classmethod
  def from_config(cls, cfg) -> "LoopConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(cfg).items() if k in fields})


def _is_complete(stage_dir: str) -> bool:
  return os.path.exists(os.path.join(stage_dir, "COMPLETED"))


def _mark_complete(stage_dir: str, step: int) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(stage_dir, "COMPLETED"), "w") as f:
      json.dump({"step": step}, f)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def abstract_state(stage: Stage, rng: jax.Array, previous: Previous, mesh: Mesh):
  """Shape/dtype/sharding skeleton of a stage's state, for orbax restores."""
  shapes = jax.eval_shape(stage.init_state, rng, previous)
  sharding = replicated(mesh)
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def restore_stage_state(workdir: str, stage: Stage, *, which: str = "best",
                        previous: Previous = None, mesh: Optional[Mesh] = None,
                        seed: int = 0) -> tuple:
  """Loads a stage's trained state (``which`` = 'best' or 'latest') for eval/denoise.

  Returns ``(state, step)``. 'best' falls back to 'latest' when no validation
  ran (or its checkpoint was not kept).
  """
  mesh = mesh or make_mesh()
  ckpt = StageCheckpoints(os.path.join(workdir, "checkpoints", stage.name))
  step = None
  if which == "best":
    best = ckpt.best()
    if best is not None and best["step"] in ckpt.all_steps():
      step = best["step"]
  elif which != "latest":
    raise ValueError(f"checkpoint selection must be 'best' or 'latest', got {which!r}")
  rng = jax.random.PRNGKey(seed)
  state, _, step = ckpt.restore(abstract_state(stage, rng, previous or {}, mesh), step)
  ckpt.close()
  return state, step


class _Preemption:
  """Turns SIGTERM (cluster preemption) into a clean checkpoint-and-exit.

  ``should_stop(step)`` is the only query; on several processes it is a
  collective and must be called at the same steps on every host.
  """

  def __init__(self, check_every: int = 10):
    if check_every < 1:
      raise ValueError(f"preemption_check_every must be >= 1, got {check_every}")
    self.requested = False  # this process received SIGTERM
    self.check_every = int(check_every)
    self._multi_process = jax.process_count() > 1
    self._installed = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    except ValueError:  # not in the main thread (e.g. some notebooks)
      pass
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def should_stop(self, step: int) -> bool:
    """Whether any process has been signalled, agreed by all processes."""
    if not self._multi_process:
      return self.requested
    if step % self.check_every:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.any(flags))

  def __exit__(self, *exc):
    if self._installed:
      # None: the previous handler was not set from Python (e.g. the XLA
      # preemption notifier's); fall back to the default, terminate.
      signal.signal(signal.SIGTERM,
                    self._previous if self._previous is not None else signal.SIG_DFL)


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _summing_step(train_step):
  """``(state, sums, batch, rng) -> (state, sums + metrics)``, metrics as float32."""

  def step(state, sums, batch, rng):
    state, metrics = train_step(state, batch, rng)
    return state, jax.tree.map(lambda s, m: s + jnp.asarray(m, jnp.float32), sums, metrics)

  return step


def run_stages(stages, workdir: str, *, seed: int, loop_cfg: LoopConfig,
               mesh: Optional[Mesh] = None) -> Dict[str, State]:
  """Trains ``stages`` in order, resuming from ``workdir``; returns final states.

  Returns early (without error) if ``loop_cfg.stop_at`` or SIGTERM stopped
  the run; a later call with the same arguments continues it.
  """
  mesh = mesh or make_mesh()
  writer = MetricWriter(os.path.join(workdir, "logs"), tensorboard=loop_cfg.tensorboard)
  finals: Dict[str, State] = {}
  global_offset = 0
  try:
    with _Preemption(loop_cfg.preemption_check_every) as preemption:
      for index, stage in enumerate(stages):
        if index and preemption.should_stop(0):  # signalled as the last stage ended
          log(f"run stopped (SIGTERM) before stage {stage.name!r}; rerun the same "
              "command to resume")
          return finals
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), index)
        state, finished = _run_stage(stage, workdir, rng, finals, mesh, writer,
                                     loop_cfg, preemption, global_offset)
        if not finished:
          log(f"run stopped in stage {stage.name!r}; rerun the same command to resume")
          return finals
        finals[stage.name] = state
        global_offset += stage.num_steps
  finally:
    writer.close()
  return finals


def _run_stage(stage: Stage, workdir: str, rng: jax.Array, previous: Previous,
               mesh: Mesh, writer: MetricWriter, cfg: LoopConfig,
               preemption: _Preemption, global_offset: int):
  stage_dir = os.path.join(workdir, "checkpoints", stage.name)
  ckpt = StageCheckpoints(stage_dir, keep=cfg.keep_checkpoints,
                          best_metric=stage.best_metric, best_mode=stage.best_mode)
  repl = replicated(mesh)
  try:
    init_rng, step_rng = jax.random.split(rng)
    if ckpt.latest_step() is not None:
      state, data_state, step = ckpt.restore(abstract_state(stage, init_rng, previous, mesh))
      log(f"stage {stage.name!r}: resumed from step {step} ({stage_dir})")
      if _is_complete(stage_dir) or step >= stage.num_steps:
        return state, True
      data = stage.make_data(previous)
      data.set_state(data_state)
    else:
      state = jax.jit(stage.init_state, out_shardings=repl)(init_rng, previous)
      step = 0
      data = stage.make_data(previous)

    train_step = jax.jit(_summing_step(stage.train_step), donate_argnums=(0, 1),
                         out_shardings=(repl, repl))
    zero_sums = None  # jitted (metric shapes known after the first batch)
    sums, window_start = None, step
    last_good = ckpt.latest_step()
    bar = ProgressBar(stage.num_steps, step, desc=stage.name)
    val_metrics: Dict[str, float] = {}
    try:
      while step < stage.num_steps:
        batch = to_global_batch(next(data), mesh)
        rng_t = jax.random.fold_in(step_rng, step)
        if zero_sums is None:
          shapes = jax.eval_shape(stage.train_step, state, batch, rng_t)[1]
          zero_sums = jax.jit(
              lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), shapes),
              out_shardings=repl)
        if sums is None:
          sums, window_start = zero_sums(), step
        state, sums = train_step(state, sums, batch, rng_t)
        step += 1
        # Every host asks at every step (a collective at multi-host check steps).
        stop_requested = preemption.should_stop(step)
        stopping = bool(cfg.stop_at and global_offset + step >= cfg.stop_at) or stop_requested
        last = step == stage.num_steps
        if step % cfg.log_every == 0 or last or stopping:
          count = step - window_start
          means = {k: v / count for k, v in jax.device_get(sums).items()}
          first = global_offset + window_start + 1
          if not all(np.isfinite(v) for v in jax.tree.leaves(means)):
            raise NonFiniteLossError(
                f"stage {stage.name!r}: non-finite training metrics in steps "
                f"{window_start + 1}..{step} (stage steps): means "
                f"{ {k: float(v) for k, v in means.items()} }. The last good checkpoint "
                f"(step {last_good}) is kept in {stage_dir}; lower the learning rate or "
                "enable optim.grad_clip, then rerun to resume from it.")
          writer.write(global_offset + step, means, stage=stage.name, stage_step=step,
                       window=(first, global_offset + step))
          bar.update_to(step, means)
          sums = None
        val_metrics = {}
        if stage.evaluate is not None and (step % (stage.eval_every or cfg.eval_every) == 0
                                           or last):
          val_metrics = stage.evaluate(state)
          writer.write(global_offset + step, val_metrics, stage=stage.name, stage_step=step)
        if step % cfg.checkpoint_every == 0 or last or stopping or val_metrics:
          # The open window's sums too: a NaN since the last log must not be saved.
          if not bool(_all_finite((state, sums) if sums is not None else state)):
            raise NonFiniteLossError(
                f"stage {stage.name!r}: state or training metrics non-finite by step "
                f"{step}; not saved. The last good checkpoint (step {last_good}) is kept "
                f"in {stage_dir}.")
          ckpt.save(step, state, data.get_state(), metrics=val_metrics)
          last_good = step
        if stopping and not last:
          ckpt.wait()
          log(f"stage {stage.name!r}: stopped at step {step}"
              + (" (SIGTERM)" if stop_requested else " (stop_at)"))
          return state, False
    finally:
      bar.close()
    ckpt.wait()
    _mark_complete(stage_dir, step)
    return state, True
  finally:
    ckpt.close()
