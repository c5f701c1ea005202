"""Train-step and inference speed of the denoisers, optionally against PyTorch.

Run by hand, never in CI (minutes per model on 2 CPU cores):

  python experiments/benchmark.py                          # JAX table
  python experiments/benchmark.py --torch --json out.json  # + PyTorch, ratios
  python experiments/benchmark.py --models redcnn --lowering xla,im2col,rows,taps
  python experiments/benchmark.py --models dncnn --devices 1,2,4

The first line of the output (and the JSON's ``backend``, ``jax_devices``
and ``device_kind``; each measurement's own ``backend`` and ``jax_devices``)
says which JAX backend and devices the numbers come from. GPU install:
``pip install -e ".[cuda]"`` (README).

Per model (RED-CNN paper size, DnCNN 17x64 with BN, U-Net 32 wide depth 4,
CPCE-3D on 9-slice slabs) it prints: the time of one train step of the
project's real ``supervised.make_train_step`` (batch 16 of 64^2 patches, Adam,
MSE), its compile time cold and from the persistent compilation cache, the
inference time of one full 512^2 slice, images/s for both, peak RSS and XLA's
memory analysis, and the achieved GFLOP/s (XLA's cost analysis of the
compiled step) as a fraction of the float32 matmul peak measured at the
start of the same run (best of a 4096^2 matmul).

Every measurement runs in its own subprocess, so peak RSS is the
measurement's own, compile caches start empty, and JAX's and PyTorch's
thread pools never compete. Times are best-of-``--repeats`` after a warm-up
call, wall clock; the 1-minute load average is printed next to them. On a
shared machine they are upper bounds: compare ratios taken in one run.
``--devices`` fakes N CPU devices (XLA_FLAGS=
--xla_force_host_platform_device_count=N) and shards the batch over a
('data',) mesh as the training loop does; on one physical CPU this shows the
partitioning overhead, not a speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

BATCH, PATCH, SLICE, SLAB = 16, 64, 512, 9
MODELS = ("redcnn", "dncnn", "unet", "cpce3d")
# Constructor arguments, explicit so that changes of the models' defaults do
# not silently change what is benchmarked: the paper sizes.
JAX_MODELS = {
    "redcnn": ("redcnn", {"features": 96, "kernel_size": 5, "num_layers": 5}),
    "dncnn": ("dncnn", {"depth": 17, "features": 64}),
    "unet": ("unet", {"features": 32, "depth": 4}),
    "cpce3d": ("cpce3d", {"features": 32, "num_layers": 4}),
}


def _load() -> float:
  return os.getloadavg()[0]


def _peak_rss_mb() -> float:
  # ru_maxrss is in KiB on Linux.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _best_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def _input_shape(name: str, batch: int, size: int) -> tuple:
  """Model input: NHWC images, or NDHWC 9-slice slabs for CPCE-3D."""
  if name == "cpce3d":
    return (batch, SLAB, size, size, 1)
  return (batch, size, size, 1)


# --------------------------------------------------------------------- JAX --

def jax_matmul_peak(repeats: int = 5, n: int = 4096) -> float:
  """Float32 GFLOP/s of a large jitted matmul: the CPU's practical peak."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  matmul = jax.jit(lambda a, b: a @ b)
  matmul(a, a).block_until_ready()
  seconds = _best_seconds(lambda: matmul(a, a).block_until_ready(), repeats)
  return 2 * n ** 3 / seconds / 1e9


def _compile_seconds(jitted, *args):
  """(compiled, seconds) of lowering + XLA compilation."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def _cost(compiled) -> dict:
  """XLA's FLOP count and memory analysis of a compiled computation."""
  out = {}
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX returned one per device
    cost = cost[0] if cost else None
  if cost and "flops" in cost:
    out["xla_gflop"] = float(cost["flops"]) / 1e9
  try:
    memory = compiled.memory_analysis()
  except NotImplementedError:
    memory = None
  if memory is not None:
    out["xla_temp_mb"] = memory.temp_size_in_bytes / 2 ** 20
    out["xla_args_mb"] = memory.argument_size_in_bytes / 2 ** 20
  return out


def run_jax(name: str, lowering: str, repeats: int, inference: bool,
            devices: int) -> dict:
  """Measures one model in this process (a worker subprocess)."""
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np
  from ldct_jax import models
  from ldct_jax.data.pipeline import make_mesh, to_global_batch
  from ldct_jax.methods import supervised
  from ldct_jax.train.optim import make_optimizer

  registry_name, kwargs = JAX_MODELS[name]
  model = models.get_model_class(registry_name)(conv_lowering=lowering,
                                                **kwargs)
  tx = make_optimizer(ml_collections.ConfigDict({"name": "adam", "lr": 1e-4}),
                      num_steps=1)
  loss_fn = supervised.make_loss_fn(ml_collections.ConfigDict({"name": "l2"}))
  state = supervised.create_train_state(
      model, tx, jax.random.PRNGKey(0), _input_shape(name, 1, PATCH))
  params = sum(leaf.size for leaf in jax.tree.leaves(state.params))
  rng = jax.random.PRNGKey(1)
  ld = jax.random.uniform(rng, _input_shape(name, BATCH, PATCH))
  nd = jax.random.uniform(jax.random.fold_in(rng, 1), (BATCH, PATCH, PATCH, 1))
  mesh = make_mesh()
  batch = to_global_batch({"ld": np.asarray(ld), "nd": np.asarray(nd)}, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = jax.device_put(state, replicated)
  step = jax.jit(supervised.make_train_step(model, loss_fn),
                 donate_argnums=(0,), out_shardings=(replicated, replicated))

  compiled, cold = _compile_seconds(step, state, batch, rng)
  # Drop the in-memory executables; the second compile reads the on-disk
  # cache written by the first.
  jax.clear_caches()
  compiled, cached = _compile_seconds(step, state, batch, rng)
  result = {"model": name, "lowering": lowering, "devices": devices,
            "backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()],
            "params": params, "compile_cold_s": cold,
            "compile_cached_s": cached, **_cost(compiled)}

  def train_once():
    nonlocal state
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics)

  train_once()
  result["step_s"] = _best_seconds(train_once, repeats)
  result["load_step"] = _load()
  result["train_img_s"] = BATCH / result["step_s"]
  if "xla_gflop" in result:
    result["gflop_s"] = result["xla_gflop"] / result["step_s"]

  if inference:
    variables = supervised.model_variables(state)
    denoise = jax.jit(lambda x: model.apply(variables, x, train=False))
    image = jnp.ones(_input_shape(name, 1, SLICE), jnp.float32) * 0.5
    compiled_infer, result["infer_compile_s"] = _compile_seconds(denoise,
                                                                 image)
    result.update({"infer_" + k: v
                   for k, v in _cost(compiled_infer).items()})
    compiled_infer(image).block_until_ready()
    result["infer_s"] = _best_seconds(
        lambda: compiled_infer(image).block_until_ready(), repeats)
    result["infer_img_s"] = 1.0 / result["infer_s"]
  result["peak_rss_mb"] = _peak_rss_mb()
  return result


# ----------------------------------------------------------------- PyTorch --

def _torch_models():
  """PyTorch twins of the JAX models (same layers, widths and wiring)."""
  try:
    import torch
    from torch import nn
  except ImportError as error:
    raise SystemExit(
        "--torch needs PyTorch; install the CPU wheel for benchmarking only "
        "with: pip install torch==2.13.0") from error

  class REDCNN(nn.Module):
    """Paper RED-CNN: 5 VALID 5x5 convs, 5 transposed convs, 3 shortcuts."""

    def __init__(self):
      super().__init__()
      self.convs = nn.ModuleList(
          nn.Conv2d(1 if i == 0 else 96, 96, 5) for i in range(5))
      self.deconvs = nn.ModuleList(
          nn.ConvTranspose2d(96, 96 if i < 4 else 1, 5) for i in range(5))

    def forward(self, x):
      skips, h = {0: x}, x
      for depth, conv in enumerate(self.convs, start=1):
        h = torch.relu(conv(h))
        if depth % 2 == 0:
          skips[depth] = h
      for layer, deconv in enumerate(self.deconvs, start=1):
        h = deconv(h)
        if 5 - layer in skips:
          h = h + skips[5 - layer]
        h = torch.relu(h)
      return h

  class DnCNN(nn.Module):
    """17 3x3 'same' convs, BN + ReLU in the middle, residual output."""

    def __init__(self, depth=17, features=64):
      super().__init__()
      layers = [nn.Conv2d(1, features, 3, padding=1), nn.ReLU()]
      for _ in range(depth - 2):
        layers += [nn.Conv2d(features, features, 3, padding=1, bias=False),
                   nn.BatchNorm2d(features, momentum=0.1, eps=1e-5),
                   nn.ReLU()]
      layers.append(nn.Conv2d(features, 1, 3, padding=1))
      self.body = nn.Sequential(*layers)

    def forward(self, x):
      return x - self.body(x)

  def double_conv(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU())

  class UNet(nn.Module):
    """Residual U-Net, 2x2 max pool / 2x2 stride-2 transposed conv."""

    def __init__(self, features=32, depth=4):
      super().__init__()
      widths = [features * 2 ** level for level in range(depth + 1)]
      self.down = nn.ModuleList(
          double_conv(1 if level == 0 else widths[level - 1], widths[level])
          for level in range(depth))
      self.bottleneck = double_conv(widths[depth - 1], widths[depth])
      self.up = nn.ModuleList(
          nn.ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2)
          for level in range(depth))
      self.up_conv = nn.ModuleList(
          double_conv(2 * widths[level], widths[level])
          for level in range(depth))
      self.out = nn.Conv2d(features, 1, 1)

    def forward(self, x):
      skips, h = [], x
      for block in self.down:
        h = block(h)
        skips.append(h)
        h = nn.functional.max_pool2d(h, 2)
      h = self.bottleneck(h)
      for level in reversed(range(len(self.up))):
        h = self.up[level](h)
        h = self.up_conv[level](torch.cat([skips[level], h], dim=1))
      return x + self.out(h)

  class CPCE3D(nn.Module):
    """9-slice CPCE-3D: four VALID 3x3x3 convs, 2D decoder, no biases."""

    def __init__(self, features=32, num_layers=4):
      super().__init__()
      f = features
      self.convs = nn.ModuleList(
          nn.Conv3d(1 if i == 0 else f, f, 3, bias=False)
          for i in range(num_layers))
      self.deconvs = nn.ModuleList(
          nn.ConvTranspose2d(f, f if i < num_layers - 1 else 1, 3, bias=False)
          for i in range(num_layers))
      self.reduces = nn.ModuleList(
          nn.Conv2d(2 * f, f, 1, bias=False) for _ in range(num_layers - 1))

    def forward(self, x):
      skips, h = {}, x
      for depth, conv in enumerate(self.convs, start=1):
        h = torch.relu(conv(h))
        skips[depth] = h[:, :, h.shape[2] // 2]
      h = h[:, :, 0]
      n = len(self.deconvs)
      for layer, deconv in enumerate(self.deconvs, start=1):
        h = torch.relu(deconv(h))
        if layer < n:
          h = torch.cat([h, skips[n - layer]], dim=1)
          h = torch.relu(self.reduces[layer - 1](h))
      return h

  return torch, {"redcnn": REDCNN, "dncnn": DnCNN, "unet": UNet,
                 "cpce3d": CPCE3D}


def run_torch(name: str, repeats: int, inference: bool) -> dict:
  """Train step and inference of the PyTorch twin (a worker subprocess)."""
  torch, builders = _torch_models()
  model = builders[name]()
  params = sum(p.numel() for p in model.parameters())
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

  def nchw(shape):  # our NHWC / NDHWC shapes -> PyTorch channels-first
    return (shape[0], shape[-1]) + shape[1:-1]

  ld = torch.rand(nchw(_input_shape(name, BATCH, PATCH)))
  nd = torch.rand(BATCH, 1, PATCH, PATCH)

  def train_once():
    optimizer.zero_grad(set_to_none=True)
    loss = torch.mean((model(ld) - nd) ** 2)
    loss.backward()
    optimizer.step()

  model.train()
  train_once()
  result = {"model": name, "params": params, "threads":
            torch.get_num_threads(), "version": torch.__version__}
  result["step_s"] = _best_seconds(train_once, repeats)
  result["load_step"] = _load()
  result["train_img_s"] = BATCH / result["step_s"]
  if inference:
    model.eval()
    image = torch.full(nchw(_input_shape(name, 1, SLICE)), 0.5)
    with torch.inference_mode():
      model(image)
      result["infer_s"] = _best_seconds(lambda: model(image), repeats)
    result["infer_img_s"] = 1.0 / result["infer_s"]
  result["peak_rss_mb"] = _peak_rss_mb()
  return result


# ------------------------------------------------------------------ driver --

def _worker(args) -> None:
  if args.worker == "torch":
    result = run_torch(args.models, args.repeats, not args.no_inference)
  else:
    import jax
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    # Cache every executable: the point is to time a cache hit.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    result = run_jax(args.models, args.lowering, args.repeats,
                     not args.no_inference, args.devices_count)
  print("RESULT " + json.dumps(result), flush=True)


# XLA_PYTHON_CLIENT_PREALLOCATE as the user set it (None: unset); main()
# turns preallocation off for its own process only.
_USER_PREALLOCATE = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")


def _spawn(args, kind: str, model: str, lowering: str = "auto",
           devices: int = 1, inference: bool = True) -> dict:
  """Runs one measurement in a fresh interpreter; returns its result dict."""
  env = dict(os.environ)
  if _USER_PREALLOCATE is None:
    env.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)
  if devices > 1:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}")
  command = [sys.executable, os.path.abspath(__file__), "--worker", kind,
             "--models", model, "--lowering", lowering, "--repeats",
             str(args.repeats), "--devices-count", str(devices),
             "--cache-dir", args.cache_dir]
  if not inference:
    command.append("--no-inference")
  done = subprocess.run(command, env=env, capture_output=True, text=True,
                        check=False)
  for line in done.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  raise RuntimeError(f"{kind} worker for {model} failed:\n"
                     f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


def _fmt(value, spec):
  return format(value, spec) if value is not None else "-"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default=",".join(MODELS),
                      help=f"comma-separated, from {MODELS}")
  parser.add_argument("--lowering", default="auto",
                      help="comma-separated conv lowerings to compare "
                      "(auto, xla, matmul, im2col, rows, taps)")
  parser.add_argument("--torch", action="store_true",
                      help="also time the PyTorch CPU twins and print ratios")
  parser.add_argument("--devices", default="",
                      help="comma-separated fake CPU device counts, e.g. "
                      "1,2,4: train-step time data-parallel over them")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no-inference", action="store_true",
                      help="skip the 512^2 inference timing")
  parser.add_argument("--json", help="write all results to this file")
  parser.add_argument("--cache-dir", default=None,
                      help="persistent compilation cache (default: a fresh "
                      "temporary directory, so 'cold' really is cold)")
  parser.add_argument("--worker", choices=("jax", "torch"),
                      help=argparse.SUPPRESS)
  parser.add_argument("--devices-count", type=int, default=1,
                      help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    _worker(args)
    return
  if args.torch:
    _torch_models()  # fail now, with the install hint, not after JAX runs
  args.cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="ldct_xla_")
  names = [m for m in args.models.split(",") if m]
  unknown = set(names) - set(MODELS)
  if unknown:
    parser.error(f"unknown models {sorted(unknown)}; known: {MODELS}")
  lowerings = [low for low in args.lowering.split(",") if low]

  # On a GPU, JAX would otherwise reserve 75% of its memory for this process
  # (which only times the matmul peak) and starve the measured workers.
  if _USER_PREALLOCATE is None:
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  import jax
  jax_devices = jax.devices()
  report = {"jax_version": jax.__version__, "backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax_devices],
            "device_kind": jax_devices[0].device_kind,
            "cpus": os.cpu_count(), "load_start": _load(), "jax": [],
            "torch": [], "devices": []}
  # First line of the output: what every number below ran on.
  print(f"JAX {jax.__version__}, backend {report['backend']}, "
        f"{len(jax_devices)} device(s) of kind {report['device_kind']!r}: "
        f"{', '.join(report['jax_devices'])}", flush=True)
  peak = report["matmul_peak_gflop_s"] = jax_matmul_peak()
  print(f"{os.cpu_count()} CPUs, load {report['load_start']:.2f}; "
        f"float32 matmul peak {peak:.1f} GFLOP/s (4096^2)")
  header = (f"{'model':<8} {'lowering':<8} {'params':>9} {'step s':>7} "
            f"{'img/s':>6} {'GF/step':>8} {'GF/s':>6} {'%peak':>5} "
            f"{'comp cold':>9} {'cached':>6} {'512^2 s':>8} {'img/s':>6} "
            f"{'RSS MB':>7} {'XLA tmp MB':>10} {'load':>5}")
  print(header)
  for name in names:
    for lowering in lowerings:
      r = _spawn(args, "jax", name, lowering, inference=not args.no_inference)
      report["jax"].append(r)
      gf = r.get("gflop_s")
      print(f"{name:<8} {lowering:<8} {r['params']:>9,d} {r['step_s']:>7.2f} "
            f"{r['train_img_s']:>6.1f} {_fmt(r.get('xla_gflop'), '8.1f')} "
            f"{_fmt(gf, '6.1f')} {_fmt(gf and 100 * gf / peak, '5.0f')} "
            f"{r['compile_cold_s']:>9.1f} {r['compile_cached_s']:>6.1f} "
            f"{_fmt(r.get('infer_s'), '8.2f')} "
            f"{_fmt(r.get('infer_img_s'), '6.2f')} {r['peak_rss_mb']:>7.0f} "
            f"{_fmt(r.get('xla_temp_mb'), '10.0f')} {r['load_step']:>5.1f}",
            flush=True)

  if args.torch:
    print("\nPyTorch CPU (same architectures, batch, optimiser and loss)")
    print(f"{'model':<8} {'params':>9} {'step s':>7} {'512^2 s':>8} "
          f"{'RSS MB':>7} {'JAX/PT step':>11} {'JAX/PT 512^2':>12} "
          f"{'load':>5}")
    for name in names:
      r = _spawn(args, "torch", name, inference=not args.no_inference)
      report["torch"].append(r)
      ours = next(j for j in report["jax"] if j["model"] == name)
      r["jax_over_torch_step"] = ours["step_s"] / r["step_s"]
      if "infer_s" in r and "infer_s" in ours:
        r["jax_over_torch_infer"] = ours["infer_s"] / r["infer_s"]
      print(f"{name:<8} {r['params']:>9,d} {r['step_s']:>7.2f} "
            f"{_fmt(r.get('infer_s'), '8.2f')} {r['peak_rss_mb']:>7.0f} "
            f"{r['jax_over_torch_step']:>11.2f} "
            f"{_fmt(r.get('jax_over_torch_infer'), '12.2f')} "
            f"{r['load_step']:>5.1f}", flush=True)

  counts = [int(n) for n in args.devices.split(",") if n]
  if counts:
    print("\nData parallel over fake CPU devices (train step, batch "
          f"{BATCH} split over the ('data',) mesh)")
    print(f"{'model':<8} {'devices':>7} {'step s':>7} {'comp cold':>9} "
          f"{'load':>5}")
    for name in names:
      for count in counts:
        r = _spawn(args, "jax", name, lowerings[0], devices=count,
                   inference=False)
        report["devices"].append(r)
        print(f"{name:<8} {count:>7d} {r['step_s']:>7.2f} "
              f"{r['compile_cold_s']:>9.1f} {r['load_step']:>5.1f}",
              flush=True)

  report["load_end"] = _load()
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
  main()
