"""Whole-slice evaluation: denoise test patients, score them, write metrics.json and panels.

Conventions (stored with every number in ``metrics.json``):
  * PSNR and SSIM are computed after mapping HU through each configured window
    to [0, 1], with data range 1 (``ldct_jax.metrics.window_metrics``). In the
    'paper' window [-160, 240] HU our PSNR equals the RED-CNN/WGAN-VGG code's
    (truncate to [-160, 240] HU, data range 400); their SSIM does not match
    ours (zero-padded borders, no offset), see ``ldct_jax.metrics``.
  * RMSE is in HU on the unwindowed images.
  * Means are over slices (every slice of every patient weighs the same), as
    in the papers' tables; per-patient means are stored too.
  * Texture columns (``config.eval.texture``, ``ldct_jax.texture``): LPIPS-VGG,
    NPS error, GLCM property differences and the high-frequency power ratio,
    each against the NDCT, on every row alike (LPIPS and GLCM see HU through
    the first window; NPS and HF power use HU); their exact definitions are
    stored under ``conventions['texture']``.
  * The rows are: 'ldct' (the input), the model, and a classical baseline
    (BM3D if the ``bm3d`` package is installed, otherwise non-local means).

Several processes (multi-host): each process denoises and scores its share of
the volumes (every ``process_count``-th, from its ``process_index``) on its own
first device with a process-local view of the replicated parameters
(``process_local``), so no collective runs inside inference and no volume is
scored twice; the per-slice scores are then gathered to every process, which
all return the same report (validation ranks checkpoints identically on every
host), and only process 0 writes files.
"""
from __future__ import annotations

import json
import os
import pickle
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import jax
import numpy as np

from ldct_jax import metrics as metrics_lib
from ldct_jax import texture as texture_lib
from ldct_jax.data.pipeline import (Normalization, Volume, iterate_slices,
                                    short_volume_padding)
from ldct_jax.train.logging import log
from ldct_jax.windows import apply_window, get_window

IMAGE_METRICS = ("psnr", "ssim")


def spread_slices(depth: int, max_slices: Optional[int]) -> np.ndarray:
  """Indices of at most ``max_slices`` slices evenly spread over ``depth`` (all if falsy)."""
  if not max_slices or depth <= max_slices:
    return np.arange(depth)
  return np.linspace(0, depth - 1, max_slices).round().astype(int)


def denoise_volume(denoise_fn: Callable, ld_hu: np.ndarray, normalization: Normalization,
                   *, slab: int = 1, batch_size: int = 8,
                   centres: Optional[Sequence[int]] = None) -> np.ndarray:
  """Denoises every slice of a (D, H, W) HU volume; returns (D, H, W) HU float32.

  With ``centres``, only those slices, as ``(len(centres), H, W)``: a slab
  model still reads each one's true neighbours from the whole volume.

  Batches are padded to ``batch_size`` so the jitted denoiser compiles once.
  A series with fewer slices than a slab model reads (down to one slice) is
  padded by edge replication (``pipeline.short_volume_padding``), and the log
  says so.
  """
  if short_volume_padding(ld_hu.shape[0], slab):
    log(f"series of {ld_hu.shape[0]} slice(s) is shorter than the model's slab of {slab}: "
        "padded by edge replication (its first/last slice repeated)")
  wanted = np.arange(ld_hu.shape[0]) if centres is None else np.asarray(centres, dtype=int)
  out = np.empty((len(wanted),) + ld_hu.shape[1:], np.float32)
  volume = Volume("eval", {"ld": ld_hu})
  done = 0
  for indices, batch in iterate_slices(volume, keys=("ld",), normalization=normalization,
                                       slab=slab, batch_size=batch_size, pad_to_batch=True,
                                       centres=wanted):
    y = np.asarray(denoise_fn(batch["ld"]))[:len(indices), ..., 0]
    out[done:done + len(indices)] = normalization.denormalize(y)
    done += len(indices)
  return out


def slice_wise(fn: Callable) -> Callable:
  """A predictor for ``evaluate_volumes`` from ``fn(ld slices) -> slices`` that
  treats every slice on its own (2D models, classical filters)."""
  return lambda ld, pick: fn(ld[pick])


def volume_denoiser(denoise_fn: Callable, normalization: Normalization, *, slab: int = 1,
                    batch_size: int = 8) -> Callable:
  """The predictor of a bound model ``fn(x)``: the picked slices, each with its
  true neighbours when ``slab > 1``."""
  return lambda ld, pick: denoise_volume(denoise_fn, ld, normalization, slab=slab,
                                         batch_size=batch_size, centres=pick)


def estimate_noise_sigma(image: np.ndarray) -> float:
  """Donoho's MAD estimate of the noise std from Haar diagonal detail coefficients.

  Same rule as ``skimage.restoration.estimate_sigma`` (which needs PyWavelets)
  with the Haar instead of the db2 wavelet: for white noise of std s the
  orthonormal 2x2 diagonal detail has std s, and median(|d|)/0.6745 ignores
  the few large coefficients at edges. CT noise is correlated, so this is the
  level a white-noise denoiser should assume, not the true pixel std.
  """
  h, w = (image.shape[0] // 2) * 2, (image.shape[1] // 2) * 2
  x = image[:h, :w].astype(np.float64)
  detail = (x[0::2, 0::2] - x[0::2, 1::2] - x[1::2, 0::2] + x[1::2, 1::2]) / 2.0
  return float(np.median(np.abs(detail)) / 0.6745)


def classical_denoise(ld_hu: np.ndarray, method: str) -> np.ndarray:
  """Slice-wise BM3D or non-local means on HU, with the noise level estimated per slice."""
  from skimage.restoration import denoise_nl_means
  scale = 1000.0  # work in units of 1000 HU so the filters see O(1) values
  out = np.empty_like(ld_hu, dtype=np.float32)
  for z, hu_slice in enumerate(ld_hu):
    x = hu_slice.astype(np.float64) / scale
    sigma = estimate_noise_sigma(x)
    if method == "bm3d":
      import bm3d
      y = bm3d.bm3d(x, sigma_psd=sigma)
    elif method == "nlm":
      y = denoise_nl_means(x, h=0.8 * sigma, sigma=sigma, patch_size=5, patch_distance=6,
                           fast_mode=True)
    else:
      raise ValueError(f"unknown classical baseline {method!r}: use 'bm3d', 'nlm' or 'none'")
    out[z] = y * scale
  return out


def resolve_classical(name: str) -> Optional[str]:
  """'auto' -> BM3D when installed, else NLM; 'none' -> None."""
  if name in (None, "", "none"):
    return None
  if name == "auto":
    try:
      import bm3d  # noqa: F401
      return "bm3d"
    except ImportError:
      return "nlm"
  return name


def score_volume(pred_hu: np.ndarray, nd_hu: np.ndarray, windows) -> Dict[str, np.ndarray]:
  """Per-slice metrics of a (D, H, W) prediction: '<metric>/<window>' and 'rmse_hu'."""
  pred, ref = pred_hu[..., None], nd_hu[..., None]
  scores = {}
  for window in windows:
    w = get_window(window)
    result = metrics_lib.window_metrics(pred, ref, w, metrics=IMAGE_METRICS)
    for name in IMAGE_METRICS:
      scores[f"{name}/{w.name or w.describe()}"] = np.asarray(result[name], np.float64)
  scores["rmse_hu"] = np.asarray(metrics_lib.rmse(pred, ref), np.float64)
  return scores


def _mean(rows: List[Dict[str, np.ndarray]]) -> Dict[str, float]:
  # Texture columns are NaN on slices without soft tissue: means skip them
  # (all-NaN stays NaN, without NumPy's warning).
  keys = rows[0].keys()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return {k: float(np.nanmean(np.concatenate([r[k] for r in rows]))) for k in keys}


def process_local(tree):
  """This process's single-device view of every replicated array in ``tree``.

  A trained state is replicated over every device of every process; a jitted
  function called on it would be one computation over all processes, which
  every process must enter with the same inputs. Evaluation gives processes
  different volumes, so it runs on each process's own first device instead.
  The view shares the local replica's buffer (no copy).
  """
  def local(x):
    if not isinstance(x, jax.Array) or len(x.sharding.device_set) == 1:
      return x
    if not x.is_fully_replicated:
      raise ValueError(f"evaluation needs replicated parameters, got an array of shape "
                       f"{x.shape} sharded as {x.sharding}")
    return x.addressable_data(0)

  return jax.tree.map(local, tree)


def gather_from_processes(obj) -> list:
  """Every process's picklable ``obj``, in process order, returned on every process.

  A collective: all processes must call it. One process returns ``[obj]``.
  """
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils
  data = np.frombuffer(pickle.dumps(obj), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [pickle.loads(rows[p, :sizes[p]].tobytes()) for p in range(len(sizes))]


def evaluate_volumes(volumes: Sequence[Volume], predictors: Dict[str, Callable], windows,
                     *, max_slices: Optional[int] = None, keep_images: bool = False,
                     texture: Optional[texture_lib.TextureScorer] = None) -> dict:
  """Scores each predictor and the LDCT input on (at most ``max_slices``) slices.

  A predictor is ``fn(ld_hu volume (D, H, W), pick) -> (len(pick), H, W) HU``:
  it gets the whole volume and the picked slice indices, so a slab model
  reads each picked slice's true neighbours (``volume_denoiser``; a
  slice-by-slice ``fn`` is wrapped with ``slice_wise``).

  Returns ``{'patients': {id: {row: means}}, 'mean': {row: slice-weighted means},
  'num_slices': n}``; with ``keep_images`` also, under 'images', each patient's
  middle scored slice ``{'z': index among the scored slices, 'nd': (H, W),
  row: (H, W), ...}`` for panels.

  On several processes, each scores its share of ``volumes`` (predictors must
  not run collectives: bind them to ``process_local`` parameters) and all
  return the same report; every process must call this with the same volumes.
  """
  index, count = jax.process_index(), jax.process_count()
  local = {}
  for i in range(index, len(volumes), count):
    volume = volumes[i]
    ld, nd = volume.arrays["ld"], volume.arrays["nd"]
    pick = spread_slices(ld.shape[0], max_slices)
    outputs = {"ldct": ld[pick], **{name: fn(ld, pick) for name, fn in predictors.items()}}
    nd = nd[pick]
    scores = {row: score_volume(pred, nd, windows) for row, pred in outputs.items()}
    if texture is not None:  # all rows at once: the NDCT's side is computed once
      for row, columns in texture.score_rows(outputs, nd).items():
        scores[row].update(columns)
    images = None
    if keep_images:
      z = nd.shape[0] // 2
      images = {"z": z, "nd": nd[z], **{row: pred[z] for row, pred in outputs.items()}}
    local[i] = (scores, images)
  results = {}
  for part in gather_from_processes(local):
    results.update(part)
  per_row: Dict[str, List[Dict[str, np.ndarray]]] = {}
  patients, images = {}, {}
  total = 0
  for i, volume in enumerate(volumes):  # volume order, whichever process scored it
    scores, kept = results[i]
    patients[volume.patient_id] = {}
    for row, row_scores in scores.items():
      per_row.setdefault(row, []).append(row_scores)
      patients[volume.patient_id][row] = {k: float(np.mean(v)) for k, v in row_scores.items()}
    total += len(next(iter(scores["ldct"].values())))
    if keep_images:
      images[volume.patient_id] = kept
  report = {"patients": patients, "mean": {row: _mean(rows) for row, rows in per_row.items()},
            "num_slices": total}
  if keep_images:
    report["images"] = images
  return report


def conventions(windows, texture: Optional[texture_lib.TextureScorer] = None) -> dict:
  extra = {"texture": texture.conventions()} if texture is not None and texture.metrics else {}
  return {
      "windows": {get_window(w).name or get_window(w).describe(): get_window(w).as_dict()
                  for w in windows},
      "psnr_ssim": "HU mapped to [0, 1] through each window (clipped), data range 1; "
                   "SSIM Gaussian 11x11, sigma 1.5, K1 0.01, K2 0.03",
      "rmse_hu": "RMSE in HU on unwindowed images",
      "mean": "over slices, every slice of every patient weighs the same",
      **extra,
  }


def make_validation_fn(config, volumes: Sequence[Volume], denoiser_for: Callable, normalization,
                       slab: int):
  """Host-side validation for the loop: PSNR/SSIM in the first eval window.

  ``denoiser_for(state) -> fn(x)`` must bind the state to an already jitted
  function (``methods.bind_denoiser``), so validations compile nothing new.
  """
  window = get_window(config.eval.windows[0])
  max_slices = int(config.eval.get("val_max_slices", 8))
  batch_size = int(config.eval.get("batch_size", 8))

  def evaluate(state) -> Dict[str, float]:
    fn = denoiser_for(process_local(state))
    report = evaluate_volumes(
        volumes, {"model": volume_denoiser(fn, normalization, slab=slab, batch_size=batch_size)},
        [window], max_slices=max_slices)
    mean = report["mean"]["model"]
    return {"val/psnr": mean[f"psnr/{window.name}"], "val/ssim": mean[f"ssim/{window.name}"],
            "val/rmse_hu": mean["rmse_hu"]}

  return evaluate


def save_panel(path: str, ld: np.ndarray, pred: np.ndarray, nd: np.ndarray, window,
               labels=("LDCT", "denoised", "NDCT", "denoised - NDCT")) -> None:
  """PNG: LDCT | denoised | NDCT in ``window``, and the difference in +-width/4 HU."""
  from PIL import Image, ImageDraw
  w = get_window(window)
  diff_range = w.width / 4.0
  tiles = [apply_window(ld, w), apply_window(pred, w), apply_window(nd, w),
           np.clip((pred - nd) / (2 * diff_range) + 0.5, 0.0, 1.0)]
  strip = np.concatenate([(t * 255).round().astype(np.uint8) for t in tiles], axis=1)
  image = Image.fromarray(strip, mode="L").convert("RGB")
  draw = ImageDraw.Draw(image)
  width = ld.shape[1]
  captions = list(labels[:3]) + [f"{labels[3]} (+-{diff_range:g} HU)"]
  for i, text in enumerate(captions):
    draw.text((i * width + 4, 4), text, fill=(255, 255, 0))
  draw.text((4, ld.shape[0] - 14), w.describe(), fill=(255, 255, 0))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path)


def _json_safe(value):
  """NaN/inf -> None (JSON null): strict JSON has no NaN, and a metric that could
  not be computed (a texture column of a slice without soft tissue) is missing."""
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if isinstance(value, float) and not np.isfinite(value):
    return None
  return value


def write_report(report: dict, path: str) -> None:
  """``report`` minus its images as strict JSON (non-finite numbers as null), atomically."""
  serialisable = _json_safe({k: v for k, v in report.items() if k != "images"})
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(serialisable, f, indent=2, allow_nan=False)
  os.replace(tmp, path)


def format_table(report: dict) -> str:
  """Markdown table of the slice-weighted means."""
  rows = report["mean"]
  columns = list(next(iter(rows.values())).keys())
  lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
  for row, values in rows.items():
    lines.append(f"| {row} | " + " | ".join(f"{values[c]:.4f}" for c in columns) + " |")
  return "\n".join(lines)


def run_evaluation(config, workdir: str, method, dataset, state, step: int,
                   extra_reports: Optional[dict] = None) -> dict:
  """``--mode=eval``: scores the model on ``config.eval.split`` and writes the results.

  ``extra_reports`` (name -> dict, e.g. TDDL's noise fidelity) are stored in
  the same ``metrics.json``.
  """
  windows = list(config.eval.windows)
  normalization = Normalization.from_config(config.data.normalization)
  batch_size = int(config.eval.get("batch_size", 8))
  fn = method.denoiser(process_local(state))
  predictors = {"model": volume_denoiser(fn, normalization, slab=method.input_slab,
                                          batch_size=batch_size)}
  classical = resolve_classical(config.eval.get("classical", "auto"))
  if classical:
    predictors[classical] = slice_wise(lambda ld: classical_denoise(ld, classical))
  split = config.eval.get("split", "test")
  volumes = dataset.split(split)
  if not volumes:
    raise ValueError(f"eval split {split!r} has no patients (splits: "
                     f"{ {k: len(v) for k, v in dataset.splits.items()} }); use more patients "
                     "or --config.eval.split=all")
  # Texture in the first window; configs saved before eval.texture existed get all of it.
  texture = texture_lib.TextureScorer(
      tuple(config.eval.get("texture", texture_lib.TEXTURE_METRICS)), windows[0])
  report = evaluate_volumes(volumes, predictors, windows,
                            max_slices=config.eval.get("max_slices") or None, keep_images=True,
                            texture=texture if texture.metrics else None)
  def panels(out_dir: str, images_by_id: dict) -> None:
    for patient_id, images in images_by_id.items():
      for window in windows[:2]:
        w = get_window(window)
        save_panel(os.path.join(out_dir, "panels", f"{patient_id}_z{images['z']:03d}_{w.name}.png"),
                   images["ldct"], images["model"], images["nd"], w)

  return publish_report(workdir, report, conventions=conventions(windows, texture), split=split,
                        dataset=dataset, method=method, step=step,
                        extra_reports=extra_reports, save_panels=panels)


def publish_report(workdir: str, report: dict, *, conventions: dict, split: str, dataset,
                   method, step: int, extra_reports: Optional[dict],
                   save_panels: Callable[[str, dict], None]) -> dict:
  """Any task's evaluation report, completed with what was scored, written to
  ``<workdir>/eval/`` by process 0 (``metrics.json`` and ``save_panels(eval dir,
  report['images'])``); returns it (the same on every process)."""
  report = {"conventions": conventions, "split": split, "data_root": str(dataset.root),
            "model": method.description, "checkpoint_step": int(step), **report,
            **(extra_reports or {})}
  out_dir = os.path.join(workdir, "eval")
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    write_report(report, os.path.join(out_dir, "metrics.json"))
    save_panels(out_dir, report.get("images", {}))
  return report
