"""What ``ldct_jax.main`` hands off to: train (then evaluate), evaluate, denoise a series.

Importable from notebooks and tests: ``run.train_and_evaluate(config, workdir)``.
"""
from __future__ import annotations

import datetime
import os
import pathlib
from typing import Any, Mapping, Optional

import jax

from ldct_jax import evaluation
from ldct_jax.data import dicom
from ldct_jax.data.datasets import load_dataset
from ldct_jax.data.pipeline import Normalization
from ldct_jax.errors import InputError
from ldct_jax.methods import build_method
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
  dataset = load_dataset(config.data)
  log(f"data: {dataset.root} ({dataset.layout} layout), patients per split "
      f"{ {k: len(v) for k, v in dataset.splits.items()} }")
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
  """Evaluates the trained denoiser on ``config.eval.split``; writes ``<workdir>/eval/``.

  ``config`` should be the run's own (``workdir.run_config(workdir, overrides)``).
  """
  _require_trained(workdir)
  enable_compilation_cache(workdir)
  dataset = dataset or load_dataset(config.data)
  method = method or build_method(config, dataset)
  states, step = restore_all_stages(config, workdir, method, checkpoint)
  extra = {name: make_report(states, dataset)
           for name, make_report in method.extra_reports.items()}
  for name, value in extra.items():
    log(f"{name}:\n{value.get('markdown', value)}")
  report = evaluation.run_evaluation(config, workdir, method, dataset,
                                     states[method.denoiser_stage.name], step, extra)
  if jax.process_index() == 0:
    print(f"\nEvaluation on {report['split']} split ({report['num_slices']} slices), "
          f"checkpoint step {step}:\n{evaluation.format_table(report)}\n"
          f"Conventions: {report['conventions']['psnr_ssim']}; windows "
          f"{list(report['conventions']['windows'])}. Written to {workdir}/eval/", flush=True)
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


def check_output_dir(src: pathlib.Path, dst: pathlib.Path, allow_nonempty: bool) -> str:
  """Refuses an output inside the input, or a non-empty one unless allowed.

  Returns the file-name prefix to write with: '' for a new or empty folder,
  a unique one when writing beside existing files (nothing is overwritten).
  """
  if dst == src or src in dst.parents:
    raise InputError(f"--output {dst} is inside the input series folder {src}; "
                     "choose a new folder (inputs are never written to)")
  if dst.exists() and not dst.is_dir():
    raise InputError(f"--output {dst} exists and is not a folder")
  if dst.is_dir() and any(dst.iterdir()):
    if not allow_nonempty:
      raise InputError(f"--output {dst} is not empty; choose a new folder, or pass "
                       "--allow_nonempty_output to add the series beside its files")
    return "denoised_" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f") + "_"
  return ""


def denoise_series(config, workdir: str, input_dir: str, output_dir: str, *,
                   checkpoint: str = "best", allow_nonempty_output: bool = False) -> list:
  """Denoises a DICOM series with a trained model and writes a new series.

  The series must be what the model was trained on: CT, grayscale
  (MONOCHROME2, or MONOCHROME1), HU through RescaleSlope/Intercept
  (``dicom.check_ct_series``). On several processes only process 0 denoises
  and writes (the others return ``[]``).
  """
  _require_trained(workdir)
  enable_compilation_cache(workdir)
  src, dst = pathlib.Path(input_dir).resolve(), pathlib.Path(output_dir).resolve()
  prefix = check_output_dir(src, dst, allow_nonempty_output)
  series = dicom.read_series(src)
  dicom.check_ct_series(series)
  method = build_method(config, None)
  # Every process restores (a collective read); one series is one process's job.
  states, step = restore_all_stages(config, workdir, method, checkpoint)
  if jax.process_index() != 0:
    return []
  state = evaluation.process_local(states[method.denoiser_stage.name])
  normalization = Normalization.from_config(config.data.normalization)
  denoised = evaluation.denoise_volume(
      method.denoiser(state), series.hu, normalization, slab=method.input_slab,
      batch_size=int(config.eval.get("batch_size", 8)))
  original = series.meta.get("SeriesDescription", "")
  description = f"{original} denoised: ldct_jax {method.description} step {step}".strip()
  files = dicom.write_series(denoised, dst, spacing=series.spacing, template=series,
                             series_description=description[:64], filename_prefix=prefix)
  print(f"wrote {len(files)} denoised slices to {dst}", flush=True)
  return files


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
  if mode not in ("eval", "denoise"):
    raise ValueError(f"unknown mode {mode!r}")
  _require_trained(workdir)
  enable_compilation_cache(workdir)  # before anything compiles
  if mode == "eval":
    return evaluate(run_config(workdir, overrides, action="evaluate"), workdir,
                    checkpoint=checkpoint)
  if not input_dir or not output_dir:
    raise InputError("--mode=denoise needs --input=<DICOM series folder> and --output=<new folder>")
  return denoise_series(run_config(workdir, overrides, action="denoise with"), workdir,
                        input_dir, output_dir, checkpoint=checkpoint,
                        allow_nonempty_output=allow_nonempty_output)
