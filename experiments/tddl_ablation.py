r"""TDDL ablation: what the denoiser learns from true pairs, TDDL pseudo pairs and injected noise.

One table (markdown + JSON) of held-out test metrics for each denoiser (GCN;
``gcn_local``, the GCN with every graph conv replaced by a local path of the
same depth and parameter count, ``models.gcn.LocalCNN``; RED-CNN) trained on
  (a) true LDCT/NDCT pairs of all training patients (upper bound),
  (b) TDDL pseudo pairs: NDCT + VAE-learnt noise (unpaired halves),
  (c) pseudo pairs with i.i.d. Gaussian / image-domain Poisson noise of the
      noise level estimated from the LDCT (what TDDL argues against),
plus (d) BM3D/NLM and (e) the LDCT input, and the noise-fidelity numbers of
each noise source against the real LDCT noise.

  python experiments/tddl_ablation.py                      # -> runs/tddl_ablation
  python experiments/tddl_ablation.py --denoisers=gcn --steps=300
  python experiments/tddl_ablation.py --denoisers=gcn,gcn_local --arms=a_true_pairs,b_tddl_vae
  python experiments/tddl_ablation.py --variant=paper --denoisers=gcn,gcn_local   # GPU
                                                           # -> runs/tddl_ablation_paper

Every arm is an ordinary run of ``ldct_jax.run.train_and_evaluate`` in its own
sub-workdir, so a killed ablation resumes where it stopped, and each arm's
logs, checkpoints and panels stay inspectable. Each variant has its own
default workdir (``default_workdir``), and an arm workdir whose saved config
has other model shapes (e.g. the CPU-size GCN's, given ``--variant=paper``
and the CPU run's ``--workdir``) is refused before anything is written to it
(``run.check_resume_compatible``). The b arms of the different denoisers need
the same noise VAE: it is trained once and copied into the later arms
(``tddl.noise_model_fingerprint``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import tddl as tddl_config  # noqa: E402
from ldct_jax import run  # noqa: E402
from ldct_jax.config import set_step_budget  # noqa: E402
from ldct_jax.methods import tddl as tddl_method  # noqa: E402
from ldct_jax.windows import get_window  # noqa: E402

ARMS = {
    "a_true_pairs": dict(method="supervised"),
    "b_tddl_vae": dict(method="tddl", noise_source="vae"),
    "c_gaussian": dict(method="tddl", noise_source="gaussian"),
    "c_poisson": dict(method="tddl", noise_source="poisson"),
}


DENOISERS = ("gcn", "gcn_local", "redcnn")
# The local control only needs the arms where the GCN's claim is tested.
ARMS_OF = {"gcn_local": ("a_true_pairs", "b_tddl_vae")}


def arm_config(arm: str, denoiser: str, steps: int, cache_dir: str, variant: str = ""):
  """``variant`` (e.g. 'paper') picks the GCN's ``configs/tddl.py`` variant."""
  if denoiser not in DENOISERS:
    raise ValueError(f"unknown denoiser {denoiser!r} (known: {', '.join(DENOISERS)})")
  config = tddl_config.get_config("redcnn" if denoiser == "redcnn" else variant)
  if denoiser == "gcn_local":
    # The control of Chen et al.'s claim: same depth, width, fusion and
    # (within 0.3%) parameters as the GCN, every graph conv made local.
    gcn = config.model
    config.model = type(gcn)(dict(name="gcn_local", features=gcn.features,
                                  num_blocks=gcn.num_blocks, rank=gcn.rank))
  spec = ARMS[arm]
  config.method = spec["method"]
  if "noise_source" in spec:
    config.tddl.noise_source = spec["noise_source"]
  set_step_budget(config, steps, validations=3)
  if cache_dir:
    config.data.cache_dir = cache_dir
  # Only arm (a) scores the classical baseline: it does not depend on the arm.
  config.eval.classical = "auto" if arm == "a_true_pairs" else "none"
  return config


def _trains_vae(config) -> bool:
  return config.method == "tddl" and config.tddl.noise_source == "vae"


def share_noise_model(config, workdir: str, finished: dict) -> None:
  """Seeds ``workdir`` with an earlier arm's finished noise VAE if it is the same one.

  The b arms of different denoisers train the identical VAE (equal
  ``tddl.noise_model_fingerprint``); the run then resumes after that stage.
  """
  if not _trains_vae(config):
    return
  source = finished.get(tddl_method.noise_model_fingerprint(config))
  target = os.path.join(workdir, "checkpoints", "noise_model")
  if source and not os.path.exists(target):
    shutil.copytree(source, target)
    print(f"noise model: reusing the identical finished stage {source}", flush=True)


def default_workdir(variant: str = "") -> str:
  """``runs/tddl_ablation`` for the default (CPU) sizes, ``runs/tddl_ablation_<variant>`` else.

  Variants train models of other shapes: sharing a workdir would make the
  second resume the first's checkpoints.
  """
  return "runs/tddl_ablation" + (f"_{variant}" if variant else "")


def prepare_arm(config, workdir: str, finished: dict) -> None:
  """Refuses a workdir trained with other model shapes, then shares a finished noise VAE.

  The check runs before ``share_noise_model`` writes anything into the
  workdir (``run.train_and_evaluate`` repeats it when it prepares the
  workdir).
  """
  run.check_resume_compatible(config, workdir)
  share_noise_model(config, workdir, finished)


def remember_noise_model(config, workdir: str, finished: dict) -> None:
  stage_dir = os.path.join(workdir, "checkpoints", "noise_model")
  if _trains_vae(config) and os.path.exists(os.path.join(stage_dir, "COMPLETED")):
    finished.setdefault(tddl_method.noise_model_fingerprint(config), stage_dir)


def summarise(results: dict, windows) -> str:
  metrics = [f"psnr/{get_window(w).name}" for w in windows] + \
            [f"ssim/{get_window(w).name}" for w in windows] + ["rmse_hu"]
  lines = ["| denoiser | training data | " + " | ".join(metrics) + " |",
           "|---" * (len(metrics) + 2) + "|"]
  for denoiser, arms in results.items():
    for arm, report in arms.items():
      for row, values in report["mean"].items():
        if row == "model":
          label = arm
        elif denoiser == next(iter(results)) and arm == "a_true_pairs":
          label = {"ldct": "e_ldct_input"}.get(row, f"d_{row}")
        else:
          continue
        name = denoiser if row == "model" else "-"
        lines.append(f"| {name} | {label} | " +
                     " | ".join(f"{values[m]:.3f}" for m in metrics) + " |")
  return "\n".join(lines)


def noise_table(results: dict) -> str:
  for arms in results.values():
    if "b_tddl_vae" in arms and "noise_fidelity" in arms["b_tddl_vae"]:
      return arms["b_tddl_vae"]["noise_fidelity"]["markdown"]
  return "(no TDDL arm run)"


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="",
                      help="root of the arms' workdirs (default: default_workdir(variant), "
                           "runs/tddl_ablation or runs/tddl_ablation_<variant>)")
  parser.add_argument("--denoisers", default=",".join(DENOISERS))
  parser.add_argument("--arms", default=",".join(ARMS))
  parser.add_argument("--steps", type=int, default=0, help="denoiser steps (0: config default)")
  parser.add_argument("--cache_dir", default="", help="built-in dataset cache")
  parser.add_argument("--variant", default="",
                      help="configs/tddl.py variant for the GCN and its control, e.g. 'paper' "
                           "(a GPU job)")
  parser.add_argument("--summarise_only", action="store_true",
                      help="train nothing: read each arm's eval/metrics.json (e.g. after "
                           "running groups of arms in parallel processes)")
  args = parser.parse_args(argv)
  args.workdir = args.workdir or default_workdir(args.variant)
  return args


def main(argv=None):
  args = parse_args(argv)
  results, windows, missing, noise_models = {}, None, [], {}
  for denoiser in args.denoisers.split(","):
    for arm in args.arms.split(","):
      if arm not in ARMS_OF.get(denoiser, ARMS):
        continue
      config = arm_config(arm, denoiser, args.steps, args.cache_dir, args.variant)
      windows = config.eval.windows
      workdir = os.path.join(args.workdir, f"{denoiser}_{arm}")
      if args.summarise_only:
        path = os.path.join(workdir, "eval", "metrics.json")
        if not os.path.exists(path):
          missing.append(f"{denoiser}/{arm}")
          continue
        with open(path) as f:
          report = json.load(f)
      else:
        print(f"\n=== {denoiser} / {arm} -> {workdir}", flush=True)
        prepare_arm(config, workdir, noise_models)
        # Resumes an interrupted arm; a finished one is only re-evaluated.
        report = run.train_and_evaluate(config, workdir)
        remember_noise_model(config, workdir, noise_models)
      results.setdefault(denoiser, {})[arm] = report
  table = summarise(results, windows)
  text = (f"## TDDL ablation (test split; PSNR/SSIM in windows {list(windows)}, data range 1; "
          f"RMSE in HU)\n\n{table}\n\n## Noise fidelity (vs real LDCT - NDCT)\n\n"
          f"{noise_table(results)}\n")
  if missing:
    text += f"\nNot run (no eval/metrics.json): {', '.join(missing)}\n"
  print("\n" + text)
  with open(os.path.join(args.workdir, "ablation.md"), "w") as f:
    f.write(text)
  with open(os.path.join(args.workdir, "ablation.json"), "w") as f:
    json.dump({d: {a: {k: v for k, v in r.items() if k != "images"} for a, r in arms.items()}
               for d, arms in results.items()}, f, indent=2, default=str)


if __name__ == "__main__":
  main()
