r"""SURE against MSE training (issue 15): Gaussian noise, CT noise and undersampled MRI.

Each row is a full training run in its own resumable workdir under
``--workdir``, scored by its task's evaluator on the held-out test split:

* Gaussian (``configs/dncnn_sure.py``, σ on the [0, 255] scale of the 'paper'
  window, PSNR with data range 255): DnCNN trained with MSE on clean images
  (``:s<σ>_mse``), the same DnCNN trained with SURE on the noisy images
  only (``:s<σ>``), and BM3D given the true σ (``bm3d.bm3d`` on the [0, 255]
  scale, computed here on the same test slices), at each ``--sigmas``.
* CT noise (``configs/ct_sure.py``, the built-in quarter-dose data, abdomen
  window): DnCNN with MSE on true LDCT/NDCT pairs (``:mse``), with SURE for
  FBP noise (correlated probes, the default) and with plain white SURE
  (``:white``). No Noise2Noise row: the built-in data has no two independent
  low-dose draws of one scan (its doses are nested in one set of photons).
* MRI (R = 4, 1D random masks, built-in data): the supervised deep cascade
  with the same noisy data consistency (``configs/mri_cascade.py:noisydc``),
  against the GSURE cascade (``configs/mri_cascade_gsure.py``) trained from
  undersampled noisy k-space only.

Every pair of rows trains for the same number of steps (``--steps``, else the
configs' own); a SURE step costs about two MSE steps. The gap column is
SURE minus MSE, in dB. Writes ``<workdir>/sure_vs_mse.md`` and ``.json``.

  python experiments/sure_vs_mse.py                         # -> runs/sure_vs_mse
  python experiments/sure_vs_mse.py --parts=gaussian --sigmas=25 --variant=paper
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import ct_sure, dncnn_sure, mri_cascade, mri_cascade_gsure  # noqa: E402
from ldct_jax import evaluation, run, windows  # noqa: E402
from ldct_jax.config import set_step_budget  # noqa: E402
from ldct_jax.data import datasets, gaussian  # noqa: E402

PARTS = ("gaussian", "ct", "mri")
# Test-only shrinking (--tiny): data, networks and evaluation a CI machine runs in seconds.
TINY_CT = dict(num_patients=6, num_slices=4, size=64, seed=2)
TINY_MRI = dict(num_phantoms=3, slices_per_subject=3, size=24)


def shrink(config, tiny: bool, steps: int, cache_dir: str):
  if cache_dir:
    config.data.cache_dir = cache_dir
  set_step_budget(config, steps, validations=2)
  if not tiny:
    return config
  config.train.update(dict(log_every=1, tensorboard=False))
  if config.task == "mri_reconstruction":
    config.model.update(dict(num_cascades=2, depth=3, features=8))
    config.data.builtin_mri.update(TINY_MRI)
    config.data.batch_size = 2
    config.eval.update(dict(cs_lambdas=(1e-3,), cs_iters=(5,), batch_size=2))
  else:
    config.data.builtin.update(TINY_CT)
    config.data.update(dict(patch_size=32, batch_size=4))
    config.model.update(dict(depth=3, features=4))
    config.eval.update(dict(val_max_slices=2, classical="none", texture=()))
  return config


def train(name: str, config, args) -> dict:
  workdir = os.path.join(args.workdir, name)
  print(f"\n=== {name} -> {workdir}", flush=True)
  report = run.train_and_evaluate(config, workdir)
  if report is None:
    raise SystemExit(f"{name}: stopped before the end (stop_at or SIGTERM); rerun to resume")
  return report


def bm3d_true_sigma(config, max_slices) -> dict:
  """BM3D with the true σ on the Gaussian task's test split, scored by the CT evaluator."""
  import bm3d
  options = config.data.gaussian_noise
  window = windows.get_window(options.window)
  to_pixels = gaussian.PIXEL_RANGE / window.width

  def denoise(ld_hu):
    out = [bm3d.bm3d((s - window.low) * to_pixels, sigma_psd=float(options.sigma))
           for s in ld_hu.astype(np.float64)]
    return (np.stack(out) / to_pixels + window.low).astype(np.float32)

  volumes = datasets.load_dataset(config.data).split(config.eval.get("split", "test"))
  report = evaluation.evaluate_volumes(volumes, {"bm3d": evaluation.slice_wise(denoise)},
                                       list(config.eval.windows), max_slices=max_slices or None)
  return report["mean"]


def gaussian_part(args) -> list:
  rows = []
  for sigma in (float(s) for s in args.sigmas.split(",")):
    tag = f"s{sigma:g}"
    variant = "_".join(p for p in (tag, args.variant) if p)
    mse = train(f"gaussian_{tag}_mse", shrink(dncnn_sure.get_config(variant + "_mse"),
                                              args.tiny, args.steps, args.cache_dir), args)
    config = shrink(dncnn_sure.get_config(variant), args.tiny, args.steps, args.cache_dir)
    sure = train(f"gaussian_{tag}_sure", config, args)
    bm3d = bm3d_true_sigma(config, args.bm3d_slices)
    metric = "psnr/paper", "ssim/paper"
    for row, mean in (("noisy input", mse["mean"]["ldct"]), ("BM3D (true sigma)", bm3d["bm3d"]),
                      ("DnCNN-MSE (clean targets)", mse["mean"]["model"]),
                      ("DnCNN-SURE (noisy only)", sure["mean"]["model"])):
      rows.append({"part": "gaussian", "setting": f"sigma={sigma:g}", "row": row,
                   "psnr": mean[metric[0]], "ssim": mean[metric[1]]})
    rows[-1]["gap_db"] = sure["mean"]["model"][metric[0]] - mse["mean"]["model"][metric[0]]
  return rows


def ct_part(args) -> list:
  variant = args.variant
  runs = {}
  for name, v in (("mse", "mse"), ("sure", ""), ("white", "white")):
    full = "_".join(p for p in (v, variant) if p)
    runs[name] = train(f"ct_{name}", shrink(ct_sure.get_config(full), args.tiny, args.steps,
                                            args.cache_dir), args)
  metric = "psnr/abdomen", "ssim/abdomen"
  rows = []
  for row, mean in (("quarter-dose input", runs["mse"]["mean"]["ldct"]),
                    ("DnCNN-MSE (true pairs)", runs["mse"]["mean"]["model"]),
                    ("DnCNN-SURE, FBP-noise probes", runs["sure"]["mean"]["model"]),
                    ("DnCNN-SURE, white (plain)", runs["white"]["mean"]["model"])):
    rows.append({"part": "ct", "setting": "dose 0.25", "row": row, "psnr": mean[metric[0]],
                 "ssim": mean[metric[1]], "rmse_hu": mean["rmse_hu"]})
  reference = runs["mse"]["mean"]["model"][metric[0]]
  rows[-2]["gap_db"] = runs["sure"]["mean"]["model"][metric[0]] - reference
  rows[-1]["gap_db"] = runs["white"]["mean"]["model"][metric[0]] - reference
  return rows


def mri_part(args) -> list:
  variant = "_".join(p for p in ("noisydc", args.variant) if p)
  supervised_config = shrink(mri_cascade.get_config(variant), args.tiny, args.steps,
                             args.cache_dir)
  gsure_config = mri_cascade_gsure.get_config(args.variant)
  # The same number of steps as the supervised row unless --steps says otherwise.
  gsure_config.train.update(dict(num_steps=supervised_config.train.num_steps,
                                 eval_every=supervised_config.train.eval_every,
                                 checkpoint_every=supervised_config.train.checkpoint_every))
  gsure_config = shrink(gsure_config, args.tiny, args.steps, args.cache_dir)
  supervised = train("mri_supervised", supervised_config, args)
  gsure = train("mri_gsure", gsure_config, args)
  rows = []
  for row, mean in (("zero-filled", supervised["mean"]["zero_filled"]),
                    ("cascade, supervised (fully sampled targets)", supervised["mean"]["model"]),
                    ("cascade, GSURE (undersampled noisy k-space only)", gsure["mean"]["model"])):
    rows.append({"part": "mri", "setting": "R=4", "row": row, "psnr": mean["psnr"],
                 "ssim": mean["ssim"], "nmse": mean["nmse"]})
  rows[-1]["gap_db"] = gsure["mean"]["model"]["psnr"] - supervised["mean"]["model"]["psnr"]
  return rows


def table(rows: list) -> str:
  lines = ["| part | setting | row | PSNR (dB) | SSIM | SURE - MSE (dB) |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    gap = f"{r['gap_db']:+.2f}" if "gap_db" in r else ""
    lines.append(f"| {r['part']} | {r['setting']} | {r['row']} | {r['psnr']:.2f} | "
                 f"{r['ssim']:.4f} | {gap} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="runs/sure_vs_mse")
  parser.add_argument("--parts", default=",".join(PARTS))
  parser.add_argument("--sigmas", default="15,25,50")
  parser.add_argument("--steps", type=int, default=0, help="training steps (0: the configs')")
  parser.add_argument("--variant", default="", help="e.g. 'paper' (GPU sizes)")
  parser.add_argument("--bm3d_slices", type=int, default=0,
                      help="test slices per patient for BM3D (0: all)")
  parser.add_argument("--cache_dir", default="")
  parser.add_argument("--tiny", action="store_true", help="tests only: tiny data and networks")
  args = parser.parse_args(argv)
  parts = [p for p in args.parts.split(",") if p]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    parser.error(f"unknown parts {unknown}; known: {PARTS}")
  rows = []
  for part in parts:
    rows += {"gaussian": gaussian_part, "ct": ct_part, "mri": mri_part}[part](args)
  text = ("## SURE against MSE training, test split\n\n"
          "Gaussian: PSNR/SSIM on the [0, 255] scale of the 'paper' window [-160, 240] HU "
          "(data range 255, outputs clipped to it). CT: abdomen window [-160, 240] HU against "
          "NDCT, data range 1. MRI: fastMRI volume metrics on magnitudes (data range = volume "
          "max). Gap: the SURE row minus the MSE/supervised row of its setting.\n\n"
          f"{table(rows)}\n")
  print("\n" + text, flush=True)
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, "sure_vs_mse.md"), "w") as f:
    f.write(text)
  with open(os.path.join(args.workdir, "sure_vs_mse.json"), "w") as f:
    json.dump({"rows": rows, "args": vars(args)}, f, indent=2)
  return rows


if __name__ == "__main__":
  main()
