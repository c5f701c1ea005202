"""What ``ldct_jax.main`` hands off to: train (then evaluate), evaluate, predict.

Task-agnostic: the run's task (``ldct_jax.tasks``: CT denoising, MRI
reconstruction) supplies the dataset reader, the evaluator and the predict
command (``--mode=denoise`` for CT, ``--mode=reconstruct`` for MRI); the
method (``ldct_jax.methods``) supplies the stages the one loop trains.

Importable from notebooks and tests: ``run.train_and_evaluate(config, workdir)``.
"""
from __future__ import annotations

import datetime
import os
import pathlib
from typing import Any, Mapping, Optional

import jax

from ldct_jax import evaluation
from ldct_jax.errors import InputError
from ldct_jax.methods import build_method
from ldct_jax.tasks import get_task, predict_modes
from ldct_jax.train.logging import log
from ldct_jax.train.loop import LoopConfig, restore_stage_state, run_stages
from ldct_jax.workdir import (check_resume_compatible, enable_compilation_cache,  # noqa: F401
                              prepare_workdir, run_config)


def maybe_initialize_distributed() -> bool:
  """Joins a multi-process job when the environment describes one; True if it did.

  Single-process runs (a laptop, one GPU box) need nothing. A multi-process job
  is described either explicitly, for any launcher, on every process::

    JAX_COORDINATOR_ADDRESS=<host of process 0>:<port> JAX_NUM_PROCESSES=<n> JAX_PROCESS_ID=<i>

  (jax reads the first, this function the other two), or by a cluster that
  ``jax.distributed.initialize`` detects itself: SLURM with several tasks, or
  (with ``LDCT_JAX_DISTRIBUTED=1``) Open MPI, Kubernetes, TPU pods. On CPU the
  processes run collectives through gloo, jax's default. Must run before any
  other JAX call.
  """
  if jax.distributed.is_initialized():
    return True
  num_processes = os.environ.get("JAX_NUM_PROCESSES")
  process_id = os.environ.get("JAX_PROCESS_ID")
  slurm_multi = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  if not (os.environ.get("JAX_COORDINATOR_ADDRESS") or slurm_multi
          or os.environ.get("LDCT_JAX_DISTRIBUTED")):
    return False
  if (num_processes is None) != (process_id is None):
    raise ValueError("set both JAX_NUM_PROCESSES and JAX_PROCESS_ID, or neither "
                     "(to let jax detect them from the cluster)")
  kwargs = {}
  if num_processes is not None:
    kwargs = dict(num_processes=int(num_processes), process_id=int(process_id))
  jax.distributed.initialize(**kwargs)
  return True


def default_workdir(config_path: Optional[str]) -> str:
  name = pathlib.Path(config_path.split(":")[0]).stem if config_path else "run"
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  return os.path.join("runs", f"{name}-{stamp}")


def train_and_evaluate(config, workdir: str) -> Optional[dict]:
  """Trains every stage (resuming if the workdir has checkpoints), then evaluates."""
  prepare_workdir(config, workdir)
  task = get_task(config)
  dataset = task.load_dataset(config)
  log(f"data: {dataset.root} ({dataset.layout} layout), "
      f"{task.name}, subjects per split { {k: len(v) for k, v in dataset.splits.items()} }")
  method = build_method(config, dataset)
  finals = run_stages(method.stages, workdir, seed=config.seed,
                      loop_cfg=LoopConfig.from_config(config.train))
  if method.denoiser_stage.name not in finals:
    print(f"stopped before the end; resume with --workdir={workdir}", flush=True)
    return None
  if not config.eval.get("after_training", True):
    return None
  return evaluate(config, workdir, dataset=dataset, method=method)


def evaluate(config, workdir: str, *, checkpoint: str = "best", dataset=None,
             method=None) -> dict:
  """Evaluates the trained model on ``config.eval.split`` with its task's evaluator.

  Writes ``<workdir>/eval/``. ``config`` should be the run's own
  (``workdir.run_config(workdir, overrides)``).
  """
  _require_trained(workdir)
  enable_compilation_cache(workdir)
  task = get_task(config)
  dataset = dataset or task.load_dataset(config)
  method = method or build_method(config, dataset)
  states, step = restore_all_stages(config, workdir, method, checkpoint)
  extra = {name: make_report(states, dataset)
           for name, make_report in method.extra_reports.items()}
  for name, value in extra.items():
    log(f"{name}:\n{value.get('markdown', value)}")
  report = task.evaluate(config, workdir, method, dataset,
                         states[method.denoiser_stage.name], step, extra)
  if jax.process_index() == 0:
    print(f"\nEvaluation on {report['split']} split ({report['num_slices']} slices), "
          f"checkpoint step {step}:\n{task.format_report(report)}\n"
          f"Written to {workdir}/eval/", flush=True)
  return report


def restore_all_stages(config, workdir: str, method, checkpoint: str = "best"):
  """Every stage's trained state (earlier stages: final; the denoiser: ``checkpoint``).

  Returns ``(states by stage name, step of the denoiser checkpoint)``.
  """
  states, step = {}, None
  for stage in method.stages:
    which = checkpoint if stage is method.denoiser_stage else "latest"
    states[stage.name], step = restore_stage_state(workdir, stage, which=which,
                                                    previous=states, seed=config.seed)
  return states, step


def predict(config, workdir: str, input_path: str, output_path: str, *,
            checkpoint: str = "best", allow_nonempty_output: bool = False) -> list:
  """The task's predict command (CT: denoise a DICOM series; MRI: reconstruct k-space).

  The task checks its input and output, then this restores the trained
  model (every process: a collective read); only process 0 predicts and
  writes (the others return ``[]``).
  """
  _require_trained(workdir)
  enable_compilation_cache(workdir)
  task = get_task(config)
  method = build_method(config, None)

  def load_state():
    states, step = restore_all_stages(config, workdir, method, checkpoint)
    if jax.process_index() != 0:
      return None
    return evaluation.process_local(states[method.denoiser_stage.name]), step

  return task.predict(config, method, load_state, input_path, output_path,
                      allow_nonempty_output=allow_nonempty_output)


def denoise_series(config, workdir: str, input_dir: str, output_dir: str, *,
                   checkpoint: str = "best", allow_nonempty_output: bool = False) -> list:
  """CT: denoises a DICOM series with a trained model and writes a new series
  (``tasks.ct.denoise_series``; the series must be CT in HU, grayscale)."""
  return predict(config, workdir, input_dir, output_dir, checkpoint=checkpoint,
                 allow_nonempty_output=allow_nonempty_output)


def _require_trained(workdir: Optional[str]) -> None:
  if not workdir or not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise InputError(f"--workdir={workdir!r} holds no trained run (no checkpoints/); "
                     "pass the workdir of a training run")


def main(config, *, mode: str, workdir: Optional[str], config_path: Optional[str] = None,
         overrides: Optional[Mapping[str, Any]] = None, input_dir: Optional[str] = None,
         output_dir: Optional[str] = None, checkpoint: str = "best",
         allow_nonempty_output: bool = False):
  """Train with ``config``; or eval/denoise ``workdir`` with its own config + ``overrides``.

  For eval/denoise ``config`` is ignored (pass None): the run's
  ``config.json`` is the base and ``overrides`` (``{'data.root': ...}``) the
  only changes, refused if they change the trained model (``run_config``).
  """
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  maybe_initialize_distributed()
  if jax.process_index() == 0:
    print(f"ldct_jax: {jax.process_count()} process(es), {jax.device_count()} device(s) "
          f"[{jax.default_backend()}]", flush=True)
  if mode == "train":
    workdir = workdir or default_workdir(config_path)
    print(f"ldct_jax: workdir {os.path.abspath(workdir)}", flush=True)
    return train_and_evaluate(config, workdir)
  if mode != "eval" and mode not in predict_modes():
    raise ValueError(f"unknown mode {mode!r}")
  _require_trained(workdir)
  enable_compilation_cache(workdir)  # before anything compiles
  if mode == "eval":
    return evaluate(run_config(workdir, overrides, action="evaluate"), workdir,
                    checkpoint=checkpoint)
  config = run_config(workdir, overrides, action=f"{mode} with")
  task = get_task(config)
  if mode != task.predict_mode:
    raise InputError(f"--mode={mode} is not a command of this run's task {task.name!r}; "
                     f"use --mode={task.predict_mode} {task.predict_help}")
  if not input_dir or not output_dir:
    raise InputError(f"--mode={mode} needs {task.predict_help}")
  return predict(config, workdir, input_dir, output_dir, checkpoint=checkpoint,
                 allow_nonempty_output=allow_nonempty_output)
