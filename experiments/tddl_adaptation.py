r"""TDDL adaptation: a denoiser meets a scanner (dose, kernel) it never saw.

The site workflow of ``configs/tddl.py:site``, measured on built-in data. The
target scanner reconstructs at another dose and with another kernel than the
built-in default (quarter dose, ramp filter); its held-out test patients are
scored, next to the training condition and doses outside every training
range, for:

  adapted_kernel  the same with the NDCT source reconstructed with the target's
              kernel (a site whose open NDCT matches its own kernel);
  single      the default TDDL run (``configs/tddl.py``): NDCT + VAE noise of the
              default quarter-dose ramp LDCT; never sees the target scanner;
  adapted     ``configs/tddl.py:site``: the VAE learns the target scanner's
              noise from its LDCT only (the training patients' low-dose series;
              no target NDCT is read), the GCN trains on the built-in NDCT plus
              that noise; ``tddl.noise_gain = sqrt(1 - target dose)`` (the
              protocol's dose ratio to the full-dose NDCT);
  true_pairs  the GCN trained on true target-scanner LDCT/NDCT pairs of the
              same training patients (the upper bound no site has);
  blind       (``--arms=...,blind`` once ``data.blind_doses`` exists) the GCN
              on true default-kernel pairs with the dose drawn per patch;
  <arm>+local the same arm with the GCN's local control (``gcn_local``: every
              graph convolution local, equal depth, width and parameters), to
              measure what the non-local branch adds at each noise level;
  <arm>+wide  (TDDL arms) the LDCT noise extraction's bilateral twice as wide
              (radius 6, sigma 3 px), for correlated noise of smooth kernels;
              ``+mid``: 1.5x as wide (radius 4, sigma 2.25 px);
plus the LDCT input and BM3D (or NLM) with the noise level estimated per slice;
``--extra_classical=nlm`` adds an NLM row to every condition (scored on the
same slices, through the first arm's workdir).
Every arm uses the same GCN size and steps; every row is scored on the same
slices (``--max_slices`` per test patient). Same built-in seed everywhere, so
every condition has the same patients and phantoms (different photons only
where the dose or kernel differ).

  python experiments/tddl_adaptation.py                    # -> runs/tddl_adaptation
  python experiments/tddl_adaptation.py --arms=single,adapted --steps=300
  python experiments/tddl_adaptation.py --arms=blind+local,true_pairs+local@d0.10_ramp

Each arm is an ordinary ``run.train_and_evaluate`` workdir (resumable); the
evaluation on each condition is ``--mode=eval`` with data overrides
(``run.main(None, mode='eval', overrides=...)``), so each arm's ``eval/``
holds its last condition; the table is in ``adaptation.md``/``.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import tddl as tddl_config  # noqa: E402
from ldct_jax import run  # noqa: E402
from ldct_jax.config import set_step_budget  # noqa: E402
from ldct_jax.data import builtin  # noqa: E402
from ldct_jax.data.datasets import load_dataset  # noqa: E402

# Test conditions: built-in overrides. The first is the default's own.
CONDITIONS = {
    "d0.25_ramp": dict(dose_fraction=0.25, kernel="ramp"),
    "d0.10_ramp": dict(dose_fraction=0.10, kernel="ramp"),
    "d0.10_hann": dict(dose_fraction=0.10, kernel="hann"),
    "d0.05_hann": dict(dose_fraction=0.05, kernel="hann"),
}
TARGET = "d0.10_hann"
ARMS = ("single", "adapted", "true_pairs")


def base_config(steps: int, cache_dir: str):
  config = tddl_config.get_config()
  set_step_budget(config, steps, validations=2)
  if cache_dir:
    config.data.cache_dir = cache_dir
  config.eval.classical = "none"  # one classical row per condition, scored separately
  return config


def target_ldct_tree(config, condition: dict, out_dir: str) -> str:
  """An LDCT-only tree of the target scanner's TRAINING patients (symlinks).

  Only ``quarter_1mm`` folders are linked: the site has no full-dose scans,
  and the test patients are left out.
  """
  data = config.data
  spec = builtin.BuiltinSpec.from_config({**dict(data.builtin), **condition})
  root = builtin.ensure_builtin_dataset(spec, data.get("cache_dir") or None)
  dataset_cfg = config.data.to_dict()
  dataset_cfg["builtin"] = {**dict(data.builtin), **condition}
  train = load_dataset(dataset_cfg).splits["train"]
  os.makedirs(out_dir, exist_ok=True)
  for patient in train:
    link = os.path.join(out_dir, patient)
    if not os.path.exists(link):
      os.makedirs(link)
      os.symlink(root / patient / "quarter_1mm", os.path.join(link, "quarter_1mm"))
  return out_dir


LOCAL_MODEL = dict(name="gcn_local", features=16, num_blocks=2, rank=11)  # configs/gcn.py:local
# A noise extraction that sees correlated (smooth-kernel) noise: the bilateral
# twice as wide (default radius 3, sigma 1.5 px).
WIDE_EXTRACTION = dict(bilateral_radius=6, bilateral_sigma=3.0)
MID_EXTRACTION = dict(bilateral_radius=4, bilateral_sigma=2.25)  # between default and wide
MODIFIERS = {"local": "the GCN's local control", "wide": "the wide noise extraction",
             "mid": "the noise extraction 1.5x as wide"}


def arm_config(arm: str, args, workdir: str):
  """``arm`` is a name of ARMS or 'blind', optionally '+local' (the GCN's local
  control) and '@<condition>' for the condition 'adapted' / 'true_pairs'
  target (default ``TARGET``)."""
  arm, _, target_name = arm.partition("@")
  arm, *modifiers = arm.split("+")
  unknown = set(modifiers) - set(MODIFIERS)
  if unknown:
    raise ValueError(f"unknown arm modifier(s) {sorted(unknown)} (known: {sorted(MODIFIERS)})")
  config = _arm_config(arm, target_name, args, workdir)
  if "local" in modifiers:
    assert config.model.name == "gcn", config.model.name
    config.model = type(config.model)(LOCAL_MODEL)
  if "wide" in modifiers:
    config.tddl.update(WIDE_EXTRACTION)
  if "mid" in modifiers:
    config.tddl.update(MID_EXTRACTION)
  return config


def _arm_config(arm: str, target_name: str, args, workdir: str):
  config = base_config(args.steps, args.cache_dir)
  target = CONDITIONS[target_name or TARGET]
  if arm == "single":
    return config
  if arm == "adapted_kernel":  # the same, with an NDCT source of the site's kernel
    config.data.builtin.kernel = target["kernel"]
    arm = "adapted"
  if arm == "adapted":  # configs/tddl.py:site on the base sizes
    config.tddl.site = True
    config.train.best_metric = ""
    config.data.noise_root = target_ldct_tree(config, target,
                                              os.path.join(workdir, "site_ldct"))
    config.tddl.noise_gain = math.sqrt(1.0 - target["dose_fraction"])
    return config
  if arm == "true_pairs":
    config.method = "supervised"
    config.data.builtin.update(target)
    return config
  if arm == "blind":
    config.method = "supervised"
    config.data.blind_doses = tuple(args.blind_doses)
    extra = tuple(d for d in args.blind_doses if abs(d - 0.25) > 1e-6)
    config.data.builtin.extra_doses = extra
    return config
  raise ValueError(f"unknown arm {arm!r} (known: {', '.join(ARMS)}, blind)")


def evaluate_on(workdir: str, condition: dict, max_slices: int, classical: str) -> dict:
  overrides = {"data.builtin.dose_fraction": condition["dose_fraction"],
               "data.builtin.kernel": condition["kernel"],
               "data.builtin.extra_doses": (), "data.blind_doses": (),
               "eval.max_slices": max_slices, "eval.classical": classical,
               "eval.split": "test"}
  saved = run.run_config(workdir, {})
  overrides = {k: v for k, v in overrides.items() if _has(saved, k)}
  overrides["eval.texture"] = ()  # PSNR/SSIM/RMSE only here (LPIPS costs ~2 s a slice on CPU)
  return run.main(None, mode="eval", workdir=workdir, overrides=overrides)


def _has(config, dotted: str) -> bool:
  node = config
  for name in dotted.split("."):
    if name not in node:
      return False
    node = node[name]
  return True


METRICS = ("psnr/abdomen", "ssim/abdomen", "psnr/lung", "rmse_hu")


def table(results: dict) -> str:
  lines = ["| test condition | row | " + " | ".join(METRICS) + " |",
           "|---" * (len(METRICS) + 2) + "|"]
  for condition, rows in results.items():
    for row, values in rows.items():
      lines.append(f"| {condition} | {row} | " +
                   " | ".join(f"{values[m]:.3f}" for m in METRICS) + " |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="runs/tddl_adaptation")
  parser.add_argument("--arms", default=",".join(ARMS))
  parser.add_argument("--conditions", default=",".join(CONDITIONS))
  parser.add_argument("--steps", type=int, default=0, help="denoiser steps (0: config default)")
  parser.add_argument("--max_slices", type=int, default=16, help="test slices per patient")
  parser.add_argument("--classical", default="auto", help="'auto' (BM3D if installed) | 'nlm'")
  parser.add_argument("--extra_classical", default="",
                      help="e.g. 'nlm': add that classical row to every condition")
  parser.add_argument("--blind_doses", type=float, nargs="+", default=[0.15, 0.25, 0.5])
  parser.add_argument("--cache_dir", default="")
  args = parser.parse_args(argv)
  results: dict = {c: {} for c in args.conditions.split(",")}
  saved = os.path.join(args.workdir, "adaptation.json")
  if os.path.exists(saved):  # rows of arms run earlier (e.g. --arms=blind later)
    with open(saved) as f:
      for name, rows in json.load(f).items():
        results.setdefault(name, {}).update(rows)
  noise_reports = {}
  saved_noise = os.path.join(args.workdir, "noise_reports.json")
  if os.path.exists(saved_noise):
    with open(saved_noise) as f:
      noise_reports.update(json.load(f))
  arms = [a for a in args.arms.split(",") if a]
  for arm in arms:
    workdir = os.path.join(args.workdir, arm.replace("@", "_").replace("+", "_"))
    config = arm_config(arm, args, workdir)
    print(f"\n=== {arm} -> {workdir}", flush=True)
    config.eval.after_training = False
    run.train_and_evaluate(config, workdir)
    for name in args.conditions.split(","):
      first = arm == arms[0] and "ldct" not in results[name]
      report = evaluate_on(workdir, CONDITIONS[name], args.max_slices,
                           args.classical if first else "none")
      for row, values in report["mean"].items():
        label = arm if row == "model" else row
        if row == "model" or first:
          results[name][label] = values
      if arm.startswith("adapted") and name == (arm.partition("@")[2] or TARGET) \
          and "noise_fidelity" in report:
        noise_reports[f"{arm} on {name}"] = report["noise_fidelity"].get("markdown", "")
  if args.extra_classical:  # scored through any trained arm's workdir (same slices)
    workdir = os.path.join(args.workdir, (arms or ARMS)[0].replace("@", "_").replace("+", "_"))
    for name in args.conditions.split(","):
      report = evaluate_on(workdir, CONDITIONS[name], args.max_slices, args.extra_classical)
      results[name][args.extra_classical] = report["mean"][args.extra_classical]
  text = (f"## TDDL adaptation to an unseen scanner (target {TARGET}; test patients, "
          f"{args.max_slices} slices each; PSNR/SSIM: HU through the window to [0, 1], "
          f"data range 1; RMSE in HU)\n\n{table(results)}\n")
  for name, markdown in noise_reports.items():
    text += f"\n## Noise fidelity: {name}\n\n{markdown}\n"
  print("\n" + text, flush=True)
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, "adaptation.md"), "w") as f:
    f.write(text)
  with open(os.path.join(args.workdir, "adaptation.json"), "w") as f:
    json.dump(results, f, indent=2)
  with open(saved_noise, "w") as f:
    json.dump(noise_reports, f, indent=2)


if __name__ == "__main__":
  main()
