r"""CPCA 2D -> 3D transfer against MSE training and from-scratch 3D, at one step budget.

The structure of the seed's table (Shan et al. 2017/2018) on the built-in data:
rows RED-CNN (MSE), WGAN-VGG, CPCA-1 (CPCE-2D), CPCA-k from scratch and
CPCA_TF-k transferred from CPCA-1 (k = 3, 5, 7 by default); columns PSNR and
SSIM (first eval window), LPIPS-VGG, NPS error and high-frequency power
ratio against the NDCT (``ldct_jax.texture``), on the held-out test patients.
Every WGAN row is scored at its best checkpoint (validation LPIPS) AND its
last one: adversarial training oscillates, and the table shows by how much.
Plus a PNG of the validation curves (LPIPS and PSNR against 3D steps) of
scratch-k against TF-k.

  python experiments/cpca_transfer.py                    # -> runs/cpca_transfer
  python experiments/cpca_transfer.py --slabs=3,5 --steps=600
  python experiments/cpca_transfer.py --rows=cpca1,cpca3,cpca_tf3 --summarise_only
  python experiments/cpca_transfer.py --variant=paper    # GPU -> runs/cpca_transfer_paper

Equal budget: every WGAN row trains ``wgan.warmup_steps`` MSE warm-up
updates (the configs' 1000 on the CPU, ``--set=wgan.warmup_steps=N``;
methods/wgan.py says why) and then ``--steps`` adversarial generator updates
(default: the configs' 1200); RED-CNN trains the sum with MSE. All rows use
the same patch size and generator batch (the WGAN configs'; RED-CNN is
configs/redcnn.py otherwise). A WGAN step also makes 4 critic updates; that
is the method, not extra budget for the generator.
TF-k fine-tunes the finished CPCA-1 for the same ``--steps`` 3D updates
that CPCA-k trains from random weights (the seed's comparison: equal 3D
training; counting its 2D stage, TF-k has seen twice the steps, which the
table says). CPCA-1 is trained once: each TF-k run is the two-stage run of
``configs/cpca3d.py:k<k>_tf``, and its 2D stages (MSE warm-up and
``generator_2d``), which are configs/cpca.py's run exactly
(``methods.wgan.stage_fingerprint``), are copied from the CPCA-1 workdir
instead of being retrained. CPCA-k from scratch warms its 3D generator up.

Cost: each row is one config's run (about 25 minutes on 2 idle CPU cores at
the default steps, by the configs' sizing; TF rows skip their 2D stages),
so the default experiment is about 4 hours of CPU.

Every row is an ordinary run (``ldct_jax.run.train_and_evaluate``) in its
own sub-workdir: a killed experiment resumes where it stopped, and each
row's logs, checkpoints and panels stay inspectable. The best checkpoint's
evaluation is ``<row>/eval/``, the last one's ``<row>/eval_latest/``.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import cpca as cpca_config  # noqa: E402
from configs import cpca3d as cpca3d_config  # noqa: E402
from configs import redcnn as redcnn_config  # noqa: E402
from configs import wgan_vgg as wgan_vgg_config  # noqa: E402
from ldct_jax import run  # noqa: E402
from ldct_jax.config import set_step_budget  # noqa: E402
from ldct_jax.methods import wgan  # noqa: E402
from ldct_jax.windows import get_window  # noqa: E402

DEFAULT_SLABS = (3, 5, 7)
COLUMNS = ("psnr", "ssim", "lpips", "nps_error", "hf_ratio")
LABELS = {"redcnn": "RED-CNN (MSE)", "wgan_vgg": "WGAN-VGG", "cpca1": "CPCA-1 (2D)"}


def row_names(slabs) -> list:
  return (["redcnn", "wgan_vgg", "cpca1"] + [f"cpca{k}" for k in slabs]
          + [f"cpca_tf{k}" for k in slabs])


def label(row: str) -> str:
  if row in LABELS:
    return LABELS[row]
  if row.startswith("cpca_tf"):
    return f"CPCA_TF-{row[len('cpca_tf'):]}"
  return f"CPCA-{row[len('cpca'):]} (scratch)"


def apply_overrides(config, overrides: dict):
  """Sets ``{'data.patch_size': 32, ...}`` on ``config``; a field the row's config
  does not have (``wgan.*`` or ``model.kernel_size`` on some rows) is skipped."""
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for parent in parents:
      node = node.get(parent) if hasattr(node, "get") else None
      if node is None:
        break
    if node is not None and leaf in node:
      node[leaf] = value
  return config


def row_config(row: str, steps: int = 0, cache_dir: str = "", variant: str = "",
               overrides: dict = None):
  """The config of one row, at the shared step budget and generator batch."""
  paper = "paper" if variant == "paper" else ""
  if row == "redcnn":
    config = redcnn_config.get_config(paper)
  elif row == "wgan_vgg":
    config = wgan_vgg_config.get_config(paper)
  elif row == "cpca1":
    config = cpca_config.get_config(paper)
  elif row.startswith("cpca_tf"):
    config = cpca3d_config.get_config(f"k{row[len('cpca_tf'):]}_tf" + ("_paper" if paper else ""))
  elif row.startswith("cpca"):
    config = cpca3d_config.get_config(f"k{row[len('cpca'):]}" + ("_paper" if paper else ""))
  else:
    raise ValueError(f"unknown row {row!r}")
  reference = cpca_config.get_config(paper)  # the shared patch size and generator batch
  config.data.update(dict(patch_size=reference.data.patch_size,
                          batch_size=reference.data.batch_size))
  apply_overrides(config, overrides or {})
  set_step_budget(config, steps, validations=5)
  if int(config.get("wgan", {}).get("pretrain_2d_steps", 0)):
    config.wgan.pretrain_2d_steps = config.train.num_steps
  if row == "redcnn":  # as many updates as a WGAN generator's warm-up + adversarial ones
    reference = apply_overrides(reference, overrides or {})
    config.train.num_steps += int(reference.wgan.get("warmup_steps", 0))
  if cache_dir:
    config.data.cache_dir = cache_dir
  # The classical baseline does not depend on the row: RED-CNN's run scores it.
  config.eval.classical = config.eval.classical if row == "redcnn" else "none"
  return config


def share_2d_stage(config, workdir: str, cpca1_config, cpca1_workdir: str) -> bool:
  """Seeds a TF run's ``generator_2d`` stage with the finished CPCA-1 run if it is the same.

  Returns whether it copied. Refuses nothing: a different 2D stage is simply
  trained in the TF run itself.
  """
  # CPCA-1's stages -> the TF run's: its MSE warm-up (if any) and its adversarial stage.
  pairs = [(wgan.DENOISER_STAGE, wgan.PRETRAIN_STAGE)]
  if int(config.wgan.get("warmup_steps", 0)):
    pairs.insert(0, (wgan.WARMUP_STAGE, wgan.WARMUP_STAGE))
  checkpoints = lambda root, stage: os.path.join(root, "checkpoints", stage)
  if any(os.path.exists(checkpoints(workdir, target)) for _, target in pairs) or not all(
      os.path.exists(os.path.join(checkpoints(cpca1_workdir, source), "COMPLETED"))
      for source, _ in pairs):
    return False
  if wgan.stage_fingerprint(wgan.pretrain_config(config)) != wgan.stage_fingerprint(cpca1_config):
    print("CPCA-1's run differs from this TF run's 2D stage: training it here", flush=True)
    return False
  for source, target in pairs:
    shutil.copytree(checkpoints(cpca1_workdir, source), checkpoints(workdir, target))
  print(f"2D stage: reusing the identical finished CPCA-1 run {cpca1_workdir}", flush=True)
  return True


def evaluate_latest(config, workdir: str) -> dict:
  """Scores the last checkpoint into ``<workdir>/eval_latest/`` (``eval/`` keeps the best)."""
  latest = os.path.join(workdir, "eval_latest", "metrics.json")
  if os.path.exists(latest):
    with open(latest) as f:
      return json.load(f)
  best_dir, keep = os.path.join(workdir, "eval"), os.path.join(workdir, "eval_best.tmp")
  with open(os.path.join(best_dir, "metrics.json")) as f:
    best = json.load(f)
  stage_dir = os.path.join(workdir, "checkpoints", wgan.DENOISER_STAGE)
  last = max(int(name) for name in os.listdir(stage_dir) if name.isdigit())
  if best["checkpoint_step"] == last:  # the best is the last: nothing more to score
    shutil.copytree(best_dir, os.path.join(workdir, "eval_latest"), dirs_exist_ok=True)
    return best
  if os.path.exists(keep):
    shutil.rmtree(keep)
  shutil.copytree(best_dir, keep)
  try:
    report = run.evaluate(config, workdir, checkpoint="latest")
    shutil.rmtree(os.path.join(workdir, "eval_latest"), ignore_errors=True)
    os.replace(best_dir, os.path.join(workdir, "eval_latest"))
  finally:
    if not os.path.exists(best_dir):
      os.replace(keep, best_dir)
    else:
      shutil.rmtree(keep)
  return report


def _value(report: dict, row: str, column: str, window: str):
  values = report["mean"][row]
  key = f"{column}/{window}" if column in ("psnr", "ssim") else column
  return values.get(key)


def summarise(results: dict, window: str, steps: dict) -> str:
  """Markdown: one line per row and checkpoint, plus the LDCT input and the classical row."""
  lines = ["| row | checkpoint (step) | steps | " + " | ".join(COLUMNS) + " |",
           "|---" * (len(COLUMNS) + 3) + "|"]
  # Undefined scores (no flat soft tissue for the NPS, say) are NaN in memory
  # and null in metrics.json: both print as n/a.
  fmt = lambda v: "n/a" if v is None or not math.isfinite(v) else f"{v:.4f}"
  first = next(iter(results.values()), None)
  if first is not None:
    for row in first["best"]["mean"]:
      if row != "model":
        name = {"ldct": "LDCT input"}.get(row, row)
        lines.append(f"| {name} | - | - | " + " | ".join(
            fmt(_value(first["best"], row, c, window)) for c in COLUMNS) + " |")
  for row, reports in results.items():
    for which in ("best", "latest"):
      if which not in reports:
        continue
      report = reports[which]
      lines.append(f"| {label(row)} | {which} ({report['checkpoint_step']}) | {steps[row]} | "
                   + " | ".join(fmt(_value(report, "model", c, window)) for c in COLUMNS) + " |")
  return "\n".join(lines)


def validation_curves(workdir: str, rows, path: str) -> bool:
  """PNG: validation LPIPS and PSNR against 3D steps, CPCA-k (scratch) vs CPCA_TF-k."""
  curves = {}
  for row in rows:
    log = os.path.join(workdir, row, "logs", "metrics.jsonl")
    if not os.path.exists(log):
      continue
    points = [json.loads(line) for line in open(log)]
    curves[row] = [p for p in points if "val/psnr" in p
                   and p.get("stage", wgan.DENOISER_STAGE) == wgan.DENOISER_STAGE]
  if not any(curves.values()):
    return False
  panels = []
  for metric in ("val/lpips", "val/psnr"):
    series = {label(row): [(p.get("stage_step", p["step"]), p[metric]) for p in points
                           if metric in p] for row, points in sorted(curves.items())}
    panels.append((metric, {name: xy for name, xy in series.items() if xy}))
  line_plot(panels, path, "3D generator steps",
            "validation: CPCA-k from scratch (thin) vs CPCA_TF-k from CPCA-1 (thick)")
  return True


def line_plot(panels, path: str, xlabel: str, title: str, size=(420, 320)) -> None:
  """Side-by-side line charts with PIL (no plotting library is a dependency).

  ``panels``: ``[(y label, {series name: [(x, y), ...]})]``. A series named
  ``CPCA_TF-k`` is drawn thick, others thin; one colour per k.
  """
  from PIL import Image, ImageDraw
  width, height = size
  margin_l, margin_r, margin_t, margin_b = 60, 10, 30, 40
  names = sorted({n for _, series in panels for n in series})
  image = Image.new("RGB", (width * len(panels), height + 24 + 14 * len(names)), "white")
  draw = ImageDraw.Draw(image)
  draw.text((6, 4), title, fill="black")
  palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
  ks = sorted({n.split("-")[-1].split(" ")[0] for n in names})
  colour = {n: palette[ks.index(n.split("-")[-1].split(" ")[0]) % len(palette)] for n in names}
  for index, (ylabel, series) in enumerate(panels):
    x0, y0 = index * width + margin_l, 20 + margin_t
    x1, y1 = (index + 1) * width - margin_r, 20 + height - margin_b
    draw.rectangle([x0, y0, x1, y1], outline="black")
    points = [xy for xy in series.values() for xy in xy]
    if not points:
      continue
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xmin, xmax = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    ymin, ymax = min(ys), max(ys)
    pad = (ymax - ymin) * 0.05 or abs(ymax) * 0.05 or 1.0
    ymin, ymax = ymin - pad, ymax + pad
    to_px = lambda x, y: (x0 + (x - xmin) / (xmax - xmin) * (x1 - x0),
                          y1 - (y - ymin) / (ymax - ymin) * (y1 - y0))
    for frac in (0.0, 0.5, 1.0):
      yv, xv = ymin + frac * (ymax - ymin), xmin + frac * (xmax - xmin)
      draw.text((index * width + 4, to_px(xmin, yv)[1] - 6), f"{yv:.4g}", fill="black")
      draw.text((to_px(xv, ymin)[0] - 10, y1 + 4), f"{xv:.4g}", fill="black")
    draw.text((x0 + 4, y0 + 4), ylabel, fill="black")
    draw.text(((x0 + x1) // 2 - 40, y1 + 20), xlabel, fill="black")
    for name, xy in series.items():
      pixels = [to_px(x, y) for x, y in sorted(xy)]
      thick = name.startswith("CPCA_TF")
      if len(pixels) > 1:
        draw.line(pixels, fill=colour[name], width=3 if thick else 1)
      for px, py in pixels:
        draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour[name])
  for i, name in enumerate(names):  # legend under the panels
    y = 20 + height + 14 * i
    draw.line([(10, y + 6), (40, y + 6)], fill=colour[name],
              width=3 if name.startswith("CPCA_TF") else 1)
    draw.text((46, y), name, fill="black")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  image.save(path)


def default_workdir(variant: str = "") -> str:
  """Variants train models of other shapes: they get their own workdir."""
  return "runs/cpca_transfer" + (f"_{variant}" if variant else "")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="", help="root of the rows' workdirs (default: "
                      "runs/cpca_transfer, or runs/cpca_transfer_<variant>)")
  parser.add_argument("--slabs", default=",".join(map(str, DEFAULT_SLABS)),
                      help="k of the 3D rows (3, 5, 7, 9)")
  parser.add_argument("--rows", default="", help="comma-separated subset of the rows "
                      "(redcnn, wgan_vgg, cpca1, cpca<k>, cpca_tf<k>); default all")
  parser.add_argument("--steps", type=int, default=0,
                      help="generator steps of every row (0: the configs' default)")
  parser.add_argument("--cache_dir", default="", help="built-in dataset cache")
  parser.add_argument("--variant", default="", help="'paper': the configs' GPU variants")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a config field of every row that has it, e.g. "
                           "--set=model.features=16 (values parsed as Python literals)")
  parser.add_argument("--summarise_only", action="store_true",
                      help="train nothing: read each row's eval/ and eval_latest/")
  args = parser.parse_args(argv)
  args.workdir = args.workdir or default_workdir(args.variant)
  return args


def _parse_overrides(items) -> dict:
  out = {}
  for item in items:
    key, _, text = item.partition("=")
    try:
      out[key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      out[key] = text
  return out


def _steps(config: dict) -> str:
  """The training budget of a row's config (a dict), as the table states it."""
  steps = int(config["train"]["num_steps"])
  pretrain = int(config.get("wgan", {}).get("pretrain_2d_steps", 0))
  warmup = int(config.get("wgan", {}).get("warmup_steps", 0))
  text = f"{pretrain} 2D + {steps} 3D" if pretrain else str(steps)
  return f"{warmup} MSE + {text}" if warmup else text


def main(argv=None) -> dict:
  args = parse_args(argv)
  slabs = tuple(int(k) for k in args.slabs.split(","))
  rows = args.rows.split(",") if args.rows else row_names(slabs)
  overrides = _parse_overrides(args.set)
  # TF rows start from CPCA-1: train it first.
  rows = sorted(rows, key=lambda r: (r.startswith("cpca_tf"), 0))
  results, steps, missing = {}, {}, []
  configs = {row: row_config(row, args.steps, args.cache_dir, args.variant, overrides)
             for row in set(rows) | {"cpca1"}}
  window = get_window(configs[rows[0]].eval.windows[0]).name
  os.makedirs(args.workdir, exist_ok=True)
  for row in rows:
    config, workdir = configs[row], os.path.join(args.workdir, row)
    steps[row] = _steps(config.to_dict())
    if args.summarise_only:
      if os.path.exists(os.path.join(workdir, "config.json")):  # what the row trained with
        with open(os.path.join(workdir, "config.json")) as f:
          steps[row] = _steps(json.load(f))
      path = os.path.join(workdir, "eval", "metrics.json")
      if not os.path.exists(path):
        missing.append(row)
        continue
      with open(path) as f:
        results[row] = {"best": json.load(f)}
      latest = os.path.join(workdir, "eval_latest", "metrics.json")
      if os.path.exists(latest):
        with open(latest) as f:
          results[row]["latest"] = json.load(f)
      continue
    print(f"\n=== {label(row)} -> {workdir}", flush=True)
    run.check_resume_compatible(config, workdir)
    if row.startswith("cpca_tf"):
      share_2d_stage(config, workdir, configs["cpca1"], os.path.join(args.workdir, "cpca1"))
    # Resumes an interrupted row; a finished one is only re-evaluated.
    results[row] = {"best": run.train_and_evaluate(config, workdir)}
    if config.method == "wgan":
      results[row]["latest"] = evaluate_latest(config, workdir)
  table = summarise(results, window, steps)
  curves = os.path.join(args.workdir, "validation_curves.png")
  tf_rows = [r for r in rows if r.startswith("cpca") and r != "cpca1"]
  drew = validation_curves(args.workdir, tf_rows, curves)
  text = (f"## CPCA transfer (test split; PSNR/SSIM/LPIPS in the {window} window, data range 1; "
          f"NPS error and HF power ratio against NDCT; best = validation LPIPS)\n\n{table}\n"
          + (f"\nValidation curves: {curves}\n" if drew else ""))
  if missing:
    text += f"\nNot run (no eval/metrics.json): {', '.join(missing)}\n"
  print("\n" + text)
  with open(os.path.join(args.workdir, "cpca_transfer.md"), "w") as f:
    f.write(text)
  with open(os.path.join(args.workdir, "cpca_transfer.json"), "w") as f:
    json.dump({row: {which: {k: v for k, v in r.items() if k != "images"}
                     for which, r in reports.items()} for row, reports in results.items()},
              f, indent=2, default=str)
  return results


if __name__ == "__main__":
  main()
