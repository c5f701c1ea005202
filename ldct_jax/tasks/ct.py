"""The CT denoising task: DICOM trees in HU, whole-slice evaluation, DICOM series out.

Reader: ``ldct_jax.data.datasets.load_dataset`` (Mayo/TCIA/flat DICOM trees
or the built-in simulated data; volumes in HU). Batches: HU patches or slabs
(``ldct_jax.data.pipeline``). Evaluator: ``ldct_jax.evaluation`` (PSNR/SSIM
per stated window, RMSE in HU; rows 'ldct', the model, a classical
baseline). Predict (``--mode=denoise``): a DICOM CT series in, a new
denoised series out (``denoise_series``).
"""
from __future__ import annotations

import pathlib

from ldct_jax import evaluation
from ldct_jax.data import dicom
from ldct_jax.data.datasets import load_dataset as load_ct_dataset
from ldct_jax.data.pipeline import Normalization
from ldct_jax.tasks import Task, check_output_dir


def load_dataset(config):
  return load_ct_dataset(config.data)


def denoise_series(config, method, load_state, input_dir: str, output_dir: str, *,
                   allow_nonempty_output: bool = False) -> list:
  """Denoises a DICOM series with a trained model and writes a new series.

  The series must be what the model was trained on: CT, grayscale
  (MONOCHROME2, or MONOCHROME1), HU through RescaleSlope/Intercept
  (``dicom.check_ct_series``). Only process 0 denoises and writes.
  """
  src, dst = pathlib.Path(input_dir).resolve(), pathlib.Path(output_dir).resolve()
  prefix = check_output_dir(src, dst, allow_nonempty_output, what="input series",
                            label="denoised")
  series = dicom.read_series(src)
  dicom.check_ct_series(series)
  loaded = load_state()
  if loaded is None:
    return []
  state, step = loaded
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


def format_report(report: dict) -> str:
  """The means table and the conventions it was computed with."""
  return (f"{evaluation.format_table(report)}\n"
          f"Conventions: {report['conventions']['psnr_ssim']}; windows "
          f"{list(report['conventions']['windows'])}.")


TASK = Task(
    name="ct_denoising",
    predict_mode="denoise",
    load_dataset=load_dataset,
    evaluate=evaluation.run_evaluation,
    format_report=format_report,
    predict=denoise_series,
    predict_help="--input=<DICOM series folder> --output=<new folder>",
)
