"""The MRI reconstruction task: fastMRI single-coil HDF5 in, reconstructions out.

Reader: every ``*.h5`` file of ``config.data.root`` (``data.fastmri``), or
the built-in data (``data.builtin_mri``: MNI152 T1 slices and phantoms made
into noisy k-space and written in the same format); one file is one subject,
and subjects (never slices) are split into train/val/test.

Evaluator (fastMRI conventions, stored in ``metrics.json``): per volume,
NMSE, PSNR and SSIM of magnitude images centre-cropped to the file's
reconstruction size, data range = the reference volume's maximum; means over
volumes. The reference is the file's own reconstruction
(``reconstruction_esc``/``_rss``) when it has one, else the magnitude of its
fully sampled k-space. Each volume is undersampled by one mask seeded by its
file name (``mri.eval_mask_seed``), the same for every row. Rows:
``zero_filled``, ``cs_tv`` (λ and iterations chosen by a sweep on the
validation split, stated in the report) and ``model``; columns ``psnr``,
``ssim``, ``nmse`` and ``seconds_per_slice`` (wall time of the jitted
reconstruction per slice on this machine, compile excluded).

Predict (``--mode=reconstruct --input=FILE_OR_DIR --output=DIR``): one
HDF5 file per input file, under the input's file name, holding
``reconstruction`` (slices, h, w) float32 magnitudes at the reconstruction
size. A file with its own ``mask`` (already undersampled, as fastMRI's test
set) is reconstructed from its own samples; a fully sampled file is
undersampled with the run's mask (retrospective), and the output says which.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from typing import Callable, Dict, List, Optional, Sequence

import h5py
import jax
import numpy as np

from ldct_jax import metrics as metrics_lib
from ldct_jax.data import builtin_mri, fastmri, mri_pipeline
from ldct_jax.data.datasets import split_subjects
from ldct_jax.errors import InputError
from ldct_jax.evaluation import (gather_from_processes, process_local, publish_report,
                                 spread_slices)
from ldct_jax.physics import mri
from ldct_jax.recon import cs
from ldct_jax.tasks import Task, check_output_dir

ROWS = ("zero_filled", "cs_tv", "model")
COLUMNS = ("psnr", "ssim", "nmse", "seconds_per_slice")


@dataclasses.dataclass
class MRIDataset:
  """fastMRI files by id (the file stem), split by file (= subject)."""

  root: pathlib.Path
  files: Dict[str, "fastmri.FastMRIFile"]
  splits: Dict[str, List[str]]
  is_builtin: bool = False
  layout: str = "fastMRI single-coil"

  def split(self, name: str) -> list:
    if name == "all":
      return [self.files[k] for k in sorted(self.files)]
    if name not in self.splits:
      raise ValueError(f"unknown split {name!r}; have {sorted(self.splits)} and 'all'")
    return [self.files[k] for k in sorted(self.splits[name])]


def load_dataset(config) -> MRIDataset:
  data = config.data
  is_builtin = not data.get("root")
  if is_builtin:
    spec = builtin_mri.BuiltinMRISpec.from_config(data.get("builtin_mri", {}))
    root = builtin_mri.ensure_builtin_mri(spec, data.get("cache_dir") or None)
  else:
    root = pathlib.Path(data.root).expanduser()
  paths = fastmri.find_fastmri_files(root)
  files = {}
  for path in paths:
    key = pathlib.Path(path).stem
    if key in files:
      raise InputError(f"two files named {key}.h5 under {root}; file names identify subjects")
    files[key] = fastmri.FastMRIFile(path)
  splits = split_subjects(data, pathlib.Path(root), sorted(files))
  return MRIDataset(root=pathlib.Path(root), files=files, splits=splits, is_builtin=is_builtin)


# ----------------------------------------------------------------- reconstruction


def _batched(fn: Callable, inputs: dict, batch_size: int) -> tuple:
  """``fn`` over the leading axis in padded batches (one compile per shape).

  Returns ``(outputs, seconds per slice)``; the first batch is run twice and
  timed the second time, so compilation is never counted.
  """
  n = len(next(iter(inputs.values())))
  outputs, seconds = [], 0.0
  for start in range(0, n, batch_size):
    chunk = {k: v[start:start + batch_size] for k, v in inputs.items()}
    size = len(next(iter(chunk.values())))
    if size < batch_size:
      chunk = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - size, axis=0)])
               for k, v in chunk.items()}
    if start == 0:
      jax.block_until_ready(fn(chunk))
    t0 = time.perf_counter()
    out = np.asarray(jax.block_until_ready(fn(chunk)))
    seconds += time.perf_counter() - t0
    outputs.append(out[:size])
  return np.concatenate(outputs), seconds / max(n, 1)


@jax.jit
def zero_filled_channels(inputs):
  """The zero-filled row as a predictor (timed like the others)."""
  k0 = mri.channels_to_complex(inputs["k0"])
  return mri.complex_to_channels(mri.zero_filled(k0, inputs["mask"]))


def _magnitude(channels: np.ndarray, scale: np.ndarray, size) -> np.ndarray:
  image = np.abs(mri_pipeline.from_channels(channels)) / scale[:, None, None]
  return np.asarray(mri.center_crop(image, size), np.float32)


def eval_mask(config, f) -> Optional[np.ndarray]:
  """The volume's evaluation mask (None when the file carries its own)."""
  if f.mask is not None:
    return None
  mcfg = config.mri
  shape = (min(f.kspace_shape[-2], f.recon_size[0]), f.kspace_shape[-1])
  mri_pipeline.check_mask_kind(mcfg.mask, f.kspace_shape[-2], f.recon_size[0], str(f.path))
  return mri_pipeline.volume_mask(mcfg.mask, shape, mcfg.acceleration,
                                  mcfg.get("center_fraction") or None,
                                  pathlib.Path(f.path).name, mcfg.get("eval_mask_seed", 0))


def reconstruct_volume(config, f, predictors: Dict[str, Callable], slices: Sequence[int],
                       batch_size: int) -> dict:
  """Magnitudes (D, h, w) of every predictor on ``slices`` of file ``f``.

  ``predictors``: row -> ``fn(inputs) -> (B, H, W, 2)`` on scaled inputs
  (``mri_pipeline``), each called in padded batches of ``batch_size``.
  Returns ``{'rows': {row: magnitudes}, 'seconds': {row: s/slice},
  'reference': magnitudes or None, 'own_mask': bool}``; 'zero_filled' is
  always a row.
  """
  examples = mri_pipeline.volume_examples(f, eval_mask(config, f), slices)
  inputs = mri_pipeline.as_mapping(examples)
  size, scale = f.recon_size, examples["scale"]
  rows, seconds = {}, {}
  for row, fn in {"zero_filled": zero_filled_channels, **predictors}.items():
    out, seconds[row] = _batched(fn, inputs, batch_size)
    rows[row] = _magnitude(out, scale, size)
  own = f.mask is not None
  reference = None
  if f.has_target:
    reference = np.stack([np.asarray(f.read_target(int(z)), np.float32) for z in slices])
  elif not own:
    reference = _magnitude(examples["target"], scale, size)
  return {"rows": rows, "seconds": seconds, "reference": reference, "own_mask": own}


def score(pred: np.ndarray, reference: np.ndarray) -> Dict[str, float]:
  """fastMRI's volume metrics on magnitudes, data range = the reference's maximum."""
  return {"psnr": float(metrics_lib.mri_psnr(reference, pred)),
          "ssim": float(metrics_lib.mri_ssim(reference, pred)),
          "nmse": float(metrics_lib.mri_nmse(reference, pred))}


def cs_predictor(lam: float, num_iters: int) -> Callable:
  def fn(inputs):
    return cs.cs_tv_channels(inputs["k0"], inputs["mask"], lam=lam, num_iters=num_iters)
  return fn


def choose_cs(config, dataset) -> dict:
  """CS-TV's λ and iteration count: the best validation PSNR over the configured grid."""
  ecfg = config.eval
  # The validation subjects; a data root without any (one file, say) sweeps on
  # its training split, and the report names the split used: when that is
  # also the scored split, CS-TV's lambda was tuned on the test data.
  sweep_split = "val" if dataset.split("val") else "train"
  volumes = dataset.split(sweep_split)
  examples = []
  for f in volumes[:int(ecfg.get("cs_sweep_volumes", 2))]:
    pick = spread_slices(f.num_slices, int(ecfg.get("cs_sweep_slices", 4)))
    ex = mri_pipeline.volume_examples(f, eval_mask(config, f), pick)
    examples.append(ex)
  stacked = {k: np.concatenate([e[k] for e in examples]) for k in examples[0]}
  best = cs.sweep_cs_tv(stacked, lambdas=tuple(ecfg.cs_lambdas), iterations=tuple(ecfg.cs_iters))
  return {**best, "sweep_split": sweep_split,
          "sweep_volumes": [pathlib.Path(f.path).stem for f in volumes[:len(examples)]]}


def evaluate_files(config, files: Sequence, predictors: Dict[str, Callable], *,
                   max_slices: Optional[int], batch_size: int,
                   keep_images: bool = False) -> dict:
  """Scores every row on ``files``; the same report on every process (see
  ``ldct_jax.evaluation``: each process reconstructs its share)."""
  index, count = jax.process_index(), jax.process_count()
  local = {}
  for i in range(index, len(files), count):
    f = files[i]
    pick = spread_slices(f.num_slices, max_slices)
    result = reconstruct_volume(config, f, predictors, pick, batch_size)
    if result["reference"] is None:
      raise InputError(f"{f.path}: carries its own mask and no reconstruction, so it cannot "
                       "be scored; use --mode=reconstruct for it")
    scores = {row: {**score(pred, result["reference"]),
                    "seconds_per_slice": result["seconds"][row]}
              for row, pred in result["rows"].items()}
    images = None
    if keep_images:
      z = len(pick) // 2
      images = {"z": int(pick[z]), "reference": result["reference"][z],
                **{row: pred[z] for row, pred in result["rows"].items()}}
    local[i] = (scores, images, len(pick))
  gathered = {}
  for part in gather_from_processes(local):
    gathered.update(part)
  volumes, images, total = {}, {}, 0
  for i, f in enumerate(files):
    scores, kept, n = gathered[i]
    volumes[pathlib.Path(f.path).stem] = scores
    images[pathlib.Path(f.path).stem] = kept
    total += n
  rows = list(next(iter(volumes.values())))
  mean = {row: {c: float(np.mean([v[row][c] for v in volumes.values()])) for c in COLUMNS}
          for row in rows}
  report = {"volumes": volumes, "mean": mean, "num_slices": total}
  if keep_images:
    report["images"] = images
  return report


def conventions(config, cs_choice: Optional[dict]) -> dict:
  mcfg = config.mri
  return {
      "metrics": dict(metrics_lib.MRI_METRIC_CONVENTIONS),
      "reference": "the file's reconstruction_esc/_rss, else |IFFT| of its fully sampled k-space",
      "mean": "over volumes (every volume weighs the same), as fastMRI",
      "mask": {"kind": mcfg.mask, "acceleration": float(mcfg.acceleration),
               "center_fraction": mcfg.get("center_fraction") or "fastMRI default",
               "per_volume_seed": "sha256(file name, mri.eval_mask_seed)"},
      "seconds_per_slice": f"wall time per slice of the jitted reconstruction on "
                           f"{jax.default_backend()} (batch of {config.eval.batch_size}), "
                           "compilation excluded",
      "cs_tv": cs_choice,
  }


def make_validation_fn(config, files: Sequence, reconstructor_for: Callable):
  """Validation for the loop: mean PSNR/SSIM/NMSE of the model on ``files``."""
  max_slices = int(config.eval.get("val_max_slices", 8))
  batch_size = int(config.eval.get("batch_size", 8))

  def evaluate(state) -> Dict[str, float]:
    fn = reconstructor_for(process_local(state))
    report = evaluate_files(config, files, {"model": fn}, max_slices=max_slices,
                            batch_size=batch_size)
    mean = report["mean"]["model"]
    return {"val/psnr": mean["psnr"], "val/ssim": mean["ssim"], "val/nmse": mean["nmse"]}

  return evaluate


def run_evaluation(config, workdir: str, method, dataset, state, step: int,
                   extra_reports: Optional[dict] = None) -> dict:
  """``--mode=eval``: scores zero-filled, CS-TV and the model on ``config.eval.split``."""
  split = config.eval.get("split", "test")
  files = dataset.split(split)
  if not files:
    raise ValueError(f"eval split {split!r} has no files (splits: "
                     f"{ {k: len(v) for k, v in dataset.splits.items()} }); use "
                     "--config.eval.split=all")
  batch_size = int(config.eval.get("batch_size", 8))
  predictors = {}
  cs_choice = None
  if config.eval.get("classical", "cs_tv") == "cs_tv":
    cs_choice = choose_cs(config, dataset)
    predictors["cs_tv"] = cs_predictor(cs_choice["lam"], cs_choice["num_iters"])
  predictors["model"] = method.denoiser(process_local(state))
  report = evaluate_files(config, files, predictors,
                          max_slices=config.eval.get("max_slices") or None,
                          batch_size=batch_size, keep_images=True)
  def panels(out_dir: str, images_by_id: dict) -> None:
    for name, images in images_by_id.items():
      save_panel(os.path.join(out_dir, "panels", f"{name}_z{images['z']:03d}.png"), images)

  return publish_report(workdir, report, conventions=conventions(config, cs_choice), split=split,
                        dataset=dataset, method=method, step=step,
                        extra_reports=extra_reports, save_panels=panels)


def save_panel(path: str, images: dict) -> None:
  """PNG: each row's magnitude, the reference, and |model - reference| x 5,
  all on the reference's [0, max] scale."""
  from PIL import Image, ImageDraw
  ref = images["reference"]
  top = float(ref.max()) or 1.0
  names = [r for r in ROWS if r in images] + ["reference"]
  tiles = [np.clip(images[n] / top, 0, 1) for n in names]
  tiles.append(np.clip(5 * np.abs(images["model"] - ref) / top, 0, 1))
  strip = np.concatenate([(t * 255).round().astype(np.uint8) for t in tiles], axis=1)
  image = Image.fromarray(strip, mode="L").convert("RGB")
  draw = ImageDraw.Draw(image)
  for i, text in enumerate(names + ["|model - ref| x5"]):
    draw.text((i * ref.shape[1] + 2, 2), text, fill=(255, 255, 0))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path)


def format_report(report: dict) -> str:
  rows = report["mean"]
  lines = ["| | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
  for row, values in rows.items():
    lines.append(f"| {row} | " + " | ".join(
        f"{values[c]:.3g}" if c == "seconds_per_slice" else f"{values[c]:.4f}"
        for c in COLUMNS) + " |")
  conv = report["conventions"]
  cs_text = (f"; CS-TV lambda {conv['cs_tv']['lam']:g}, {conv['cs_tv']['num_iters']} iterations "
             "(validation sweep)") if conv.get("cs_tv") else ""
  return ("\n".join(lines) + f"\nConventions: fastMRI per-volume metrics on magnitudes cropped "
          f"to the reconstruction size, data range = {conv['metrics']['data_range']}; mask "
          f"{conv['mask']['kind']} "
          f"R={conv['mask']['acceleration']:g}{cs_text}.")


# --------------------------------------------------------------------- predict


def input_files(input_path: str) -> list:
  path = pathlib.Path(input_path)
  if path.is_file():
    return [fastmri.FastMRIFile(path)]
  if path.is_dir():
    return [fastmri.FastMRIFile(p) for p in fastmri.find_fastmri_files(path)]
  raise InputError(f"--input {input_path} is neither a fastMRI .h5 file nor a folder")


def reconstruct_files(config, method, load_state, input_path: str, output_dir: str, *,
                      allow_nonempty_output: bool = False) -> list:
  """Writes ``<output_dir>/<input file name>`` with ``reconstruction`` per input file."""
  src = pathlib.Path(input_path).resolve()
  dst = pathlib.Path(output_dir).resolve()
  # A folder input: no output inside it (its files would be read as inputs next
  # time). A file input: any new or empty folder; its own folder only with
  # --allow_nonempty_output, under a unique prefix (never over the input).
  prefix = check_output_dir(src, dst, allow_nonempty_output, what="input", label="recon")
  files = input_files(input_path)
  loaded = load_state()
  if loaded is None:
    return []
  state, step = loaded
  fn = method.denoiser(state)
  batch_size = int(config.eval.get("batch_size", 8))
  dst.mkdir(parents=True, exist_ok=True)
  written = []
  for f in files:
    out_path = dst / (prefix + pathlib.Path(f.path).name)
    if out_path.exists():
      raise InputError(f"{out_path} exists; outputs are never overwritten")
    result = reconstruct_volume(config, f, {"model": fn}, np.arange(f.num_slices), batch_size)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with h5py.File(tmp, "w") as h:
      h.create_dataset("reconstruction", data=result["rows"]["model"])
      h.attrs["model"] = method.description
      h.attrs["checkpoint_step"] = int(step)
      h.attrs["undersampling"] = ("the file's own mask" if result["own_mask"] else
                                  f"retrospective: {config.mri.mask} mask, "
                                  f"R={config.mri.acceleration:g}")
      h.attrs["source"] = str(f.path)
    os.replace(tmp, out_path)
    written.append(str(out_path))
    print(f"reconstructed {f.num_slices} slices of {f.path} -> {out_path}", flush=True)
  return written


TASK = Task(
    name="mri_reconstruction",
    predict_mode="reconstruct",
    load_dataset=load_dataset,
    evaluate=run_evaluation,
    format_report=format_report,
    predict=reconstruct_files,
    predict_help="--input=<fastMRI .h5 file or folder> --output=<new folder>",
)
