"""Tasks: what a run is about (CT denoising, MRI reconstruction, later detection).

The training loop (``ldct_jax.train.loop``) and checkpoints are shared and
know no task; a method (``ldct_jax.methods``) knows its networks and steps. A
task owns everything that depends on the kind of data:

  * its dataset reader (``load_dataset(config)``: DICOM trees for CT, fastMRI
    HDF5 files for MRI), whose splits the methods read their batches from
    (whole slices or patches, the task's pipeline decides);
  * its evaluator (``evaluate``): which rows and columns its metrics table
    has, with the conventions stored next to the numbers, and its panels,
    all written under ``<workdir>/eval/``;
  * its predict command (``predict``, run by ``--mode=<predict_mode>``):
    DICOM series in, denoised DICOM series out for CT; fastMRI files in,
    reconstructions out for MRI.

``config.task`` names the task (default ``'ct_denoising'``, which configs
saved before tasks existed also get). A detection task (LIDnet) fits the
same shape: its reader adds box annotations to each volume, its evaluator
scores boxes, its predict writes them.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib
import pathlib
from typing import Any, Callable

from ldct_jax.errors import InputError

DEFAULT_TASK = "ct_denoising"

# name -> module defining ``TASK``; imported lazily (MRI code never loads for CT runs).
TASKS = {
    "ct_denoising": "ldct_jax.tasks.ct",
    "mri_reconstruction": "ldct_jax.tasks.mri",
}


@dataclasses.dataclass(frozen=True)
class Task:
  """One kind of run.

  Attributes:
    name: the ``config.task`` value.
    predict_mode: the ``--mode`` of its predict command ('denoise', 'reconstruct').
    load_dataset: ``config -> dataset`` with ``.splits`` (name -> ids),
      ``.split(name)`` and ``.root``.
    evaluate: ``(config, workdir, method, dataset, state, step, extra_reports)
      -> report``; scores the trained state on ``config.eval.split``, writes
      ``<workdir>/eval/metrics.json`` (``report['mean'][row][column]``) and
      panels, and returns the report (the same on every process).
    format_report: ``report -> text``: the markdown table of its means and
      the conventions they were computed with.
    predict: ``(config, method, load_state, input_path, output_path, *,
      allow_nonempty_output) -> list of written files``. It checks its
      input and output first (cheap errors before the restore), then calls
      ``load_state()`` on every process (restoring is collective), which
      returns ``(process-local trained state, step)`` on process 0 and None
      elsewhere (return ``[]`` there). Never writes into its input, never
      overwrites.
    predict_help: what ``--input``/``--output`` are, for error messages.
  """

  name: str
  predict_mode: str
  load_dataset: Callable[[Any], Any]
  evaluate: Callable[..., dict]
  format_report: Callable[[dict], str]
  predict: Callable[..., list]
  predict_help: str = ""


def task_name(config) -> str:
  return config.get("task", DEFAULT_TASK) or DEFAULT_TASK


def get_task(config) -> Task:
  name = task_name(config)
  try:
    module = TASKS[name]
  except KeyError:
    raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}") from None
  return importlib.import_module(module).TASK


def check_output_dir(src: pathlib.Path, dst: pathlib.Path, allow_nonempty: bool,
                     what: str = "input", label: str = "ldct_jax") -> str:
  """Refuses an output inside (or equal to) the input, or a non-empty one unless allowed.

  ``src`` is the input folder (or the folder of an input file). Returns the
  file-name prefix to write with: '' for a new or empty folder, a unique one
  when writing beside existing files (nothing is overwritten).
  """
  if dst == src or src in dst.parents:
    raise InputError(f"--output {dst} is inside the {what} folder {src}; "
                     "choose a new folder (inputs are never written to)")
  if dst.exists() and not dst.is_dir():
    raise InputError(f"--output {dst} exists and is not a folder")
  if dst.is_dir() and any(dst.iterdir()):
    if not allow_nonempty:
      raise InputError(f"--output {dst} is not empty; choose a new folder, or pass "
                       "--allow_nonempty_output to add the results beside its files")
    return f"{label}_" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f") + "_"
  return ""


def predict_modes() -> tuple:
  """Every task's predict ``--mode`` (for the CLI's enum), without importing the tasks."""
  return ("denoise", "reconstruct")
