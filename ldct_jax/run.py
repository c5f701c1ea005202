"""What ``ldct_jax.main`` hands off to: train (then evaluate), evaluate, denoise a series.

Importable from notebooks and tests: ``run.train_and_evaluate(config, workdir)``.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
from typing import Optional

import jax

from ldct_jax import evaluation
from ldct_jax.data import dicom
from ldct_jax.data.datasets import load_dataset
from ldct_jax.data.pipeline import Normalization
from ldct_jax.methods import build_method
from ldct_jax.train.logging import log
from ldct_jax.train.loop import LoopConfig, restore_stage_state, run_stages


def maybe_initialize_distributed() -> None:
  """Joins a multi-process job when the environment describes one.

  Single-process runs (a laptop, one GPU box) need nothing. Multi-host jobs set
  the coordinator through the usual variables (or run on a TPU pod / SLURM,
  which ``jax.distributed.initialize`` detects itself).
  """
  markers = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
  slurm_multi = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  if any(os.environ.get(m) for m in markers) or slurm_multi or os.environ.get("LDCT_JAX_DISTRIBUTED"):
    jax.distributed.initialize()


def default_workdir(config_path: Optional[str]) -> str:
  name = pathlib.Path(config_path.split(":")[0]).stem if config_path else "run"
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  return os.path.join("runs", f"{name}-{stamp}")


def prepare_workdir(config, workdir: str) -> None:
  """Creates the workdir, records the config, and enables the compilation cache.

  An existing ``config.json`` is never overwritten: resuming with a different
  config is allowed (e.g. more steps) but the differences are logged and the
  new config is stored beside the old one.
  """
  os.makedirs(workdir, exist_ok=True)
  # Persistent XLA cache: a rerun (resume, eval) skips compilation. Runs can
  # share one cache through $LDCT_JAX_COMPILATION_CACHE.
  cache = os.environ.get("LDCT_JAX_COMPILATION_CACHE") or os.path.join(workdir, ".jax_cache")
  jax.config.update("jax_compilation_cache_dir", cache)
  if jax.process_index() != 0:
    return
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    with open(path, "w") as f:
      f.write(text)
    return
  with open(path) as f:
    previous = f.read()
  if previous != text:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    changed = sorted(k for k, v in _flatten(json.loads(text)).items()
                     if _flatten(json.loads(previous)).get(k) != v)
    log(f"config differs from {path} in {changed}; saved as config.{stamp}.json")
    with open(os.path.join(workdir, f"config.{stamp}.json"), "w") as f:
      f.write(text)


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix.rstrip("."): tree}


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
  """Evaluates the trained denoiser on ``config.eval.split``; writes ``<workdir>/eval/``."""
  _require_trained(workdir)
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


def denoise_series(config, workdir: str, input_dir: str, output_dir: str, *,
                   checkpoint: str = "best") -> list:
  """Denoises a DICOM series with a trained model and writes a new series."""
  _require_trained(workdir)
  src, dst = pathlib.Path(input_dir).resolve(), pathlib.Path(output_dir).resolve()
  if dst == src or src in dst.parents:
    raise ValueError(f"--output {dst} is inside the input series folder {src}; "
                     "choose a new folder (inputs are never written to)")
  series = dicom.read_series(src)
  method = build_method(config, None)
  states, step = restore_all_stages(config, workdir, method, checkpoint)
  state = states[method.denoiser_stage.name]
  normalization = Normalization.from_config(config.data.normalization)
  denoised = evaluation.denoise_volume(
      method.make_denoiser(state), series.hu, normalization, slab=method.input_slab,
      batch_size=int(config.eval.get("batch_size", 8)))
  original = series.meta.get("SeriesDescription", "")
  description = f"{original} denoised: ldct_jax {method.description} step {step}".strip()
  files = dicom.write_series(denoised, dst, spacing=series.spacing, template=series,
                             series_description=description[:64])
  print(f"wrote {len(files)} denoised slices to {dst}", flush=True)
  return files


def _require_trained(workdir: Optional[str]) -> None:
  if not workdir or not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise ValueError(f"--workdir={workdir!r} holds no trained run (no checkpoints/); "
                     "pass the workdir of a training run")


def main(config, *, mode: str, workdir: Optional[str], config_path: Optional[str] = None,
         input_dir: Optional[str] = None, output_dir: Optional[str] = None,
         checkpoint: str = "best"):
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
  if mode == "eval":
    return evaluate(config, workdir, checkpoint=checkpoint)
  if mode == "denoise":
    if not input_dir or not output_dir:
      raise ValueError("--mode=denoise needs --input=<DICOM series folder> and --output=<new folder>")
    return denoise_series(config, workdir, input_dir, output_dir, checkpoint=checkpoint)
  raise ValueError(f"unknown mode {mode!r}")
