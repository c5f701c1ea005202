r"""MRI acceleration table: zero-filled, CS-TV and the deep cascade at R = 4 and 8.

For each acceleration, trains ``configs/mri_cascade.py`` (a 1D random mask,
the built-in data unless ``--root``) in its own workdir (resumable), and
evaluates it on the held-out test subjects; the evaluation also runs the
zero-filled and CS-TV rows (CS λ and iterations from a sweep on the
validation subjects) on the same slices and masks. Writes
``<workdir>/acceleration.md`` and ``.json``.

  python experiments/mri_acceleration.py                       # -> runs/mri_acceleration
  python experiments/mri_acceleration.py --accelerations=4 --steps=200 --variant=paper

Rows of accelerations run earlier into the same workdir are kept (merged).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import mri_cascade  # noqa: E402
from ldct_jax import run  # noqa: E402
from ldct_jax.config import set_step_budget  # noqa: E402

COLUMNS = ("psnr", "ssim", "nmse", "seconds_per_slice")


def table(results: dict) -> str:
  lines = ["| R | row | PSNR (dB) | SSIM | NMSE | s / slice |", "|---|---|---|---|---|---|"]
  for r, rows in results.items():
    for row, v in rows.items():
      lines.append(f"| {r} | {row} | {v['psnr']:.2f} | {v['ssim']:.4f} | {v['nmse']:.4f} | "
                   f"{v['seconds_per_slice']:.3g} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="runs/mri_acceleration")
  parser.add_argument("--accelerations", default="4,8")
  parser.add_argument("--variant", default="", help="configs/mri_cascade.py variant")
  parser.add_argument("--steps", type=int, default=0, help="training steps (0: the config's)")
  parser.add_argument("--root", default="", help="fastMRI single-coil folder ('' = built-in)")
  parser.add_argument("--cache_dir", default="")
  args = parser.parse_args(argv)
  results, described = {}, {}
  saved = os.path.join(args.workdir, "acceleration.json")
  if os.path.exists(saved):  # rows of accelerations run earlier (e.g. --accelerations=8 later)
    with open(saved) as f:
      earlier = json.load(f)
    results.update(earlier["mean"])
    described.update(earlier["runs"])
  for r in (float(a) for a in args.accelerations.split(",")):
    config = mri_cascade.get_config(args.variant)
    config.mri.acceleration = r
    set_step_budget(config, args.steps, validations=2)
    if args.root:
      config.data.root = args.root
    if args.cache_dir:
      config.data.cache_dir = args.cache_dir
    workdir = os.path.join(args.workdir, f"R{r:g}")
    print(f"\n=== R = {r:g} -> {workdir}", flush=True)
    report = run.train_and_evaluate(config, workdir)
    if report is None:  # stopped early (stop_at / preemption): resume by rerunning
      return None
    results[f"{r:g}"] = report["mean"]
    described[f"{r:g}"] = {"model": report["model"], "conventions": report["conventions"],
                           "num_slices": report["num_slices"], "split": report["split"]}
  text = (f"## MRI reconstruction, test split (fastMRI metrics on magnitudes, data range = "
          f"volume max)\n\n{table(results)}\n")
  print("\n" + text, flush=True)
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, "acceleration.md"), "w") as f:
    f.write(text)
  with open(saved, "w") as f:
    json.dump({"mean": results, "runs": described}, f, indent=2)
  return results


if __name__ == "__main__":
  main()
