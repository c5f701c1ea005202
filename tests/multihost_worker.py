"""One training process for tests/test_multihost.py: a tiny denoiser through ``run_stages``.

Run as ``python tests/multihost_worker.py '<json>'`` with the JSON fields
``workdir``, ``out`` (folder for this process's results), ``num_steps`` and
``delay`` (seconds slept per batch, so a test's SIGTERM lands mid-run). The
environment decides the rest: ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/
``JAX_PROCESS_ID`` make it one process of a ``jax.distributed`` job (through
``run.maybe_initialize_distributed``, as ``ldct_jax.main`` does), and
``XLA_FLAGS=--xla_force_host_platform_device_count=n`` gives a single process
``n`` CPU devices.

Everything a real run uses is real here: the patch pipeline hands each process
its share of every global batch, the loop shards it over a mesh spanning both
processes, validation goes through ``evaluation.make_validation_fn`` (each
process scores its share of the volumes, the scores are gathered), and
checkpoints are orbax's multi-process saves. Only the model is tiny.

Writes ``<out>/result_<process>.json`` (finished or stopped, the data
position = steps trained, validation results, device counts, how many
inference calls this process made) and, when the stage finished,
``<out>/params_<process>.npz`` and an evaluation through
``evaluation.run_evaluation`` (``<workdir>/eval/``), as ``--mode=eval`` runs it.
"""
import json
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ldct_jax import evaluation, run
from ldct_jax.data.pipeline import Normalization, Volume, make_patch_dataset
from ldct_jax.train.loop import LoopConfig, Stage, run_stages
from ldct_jax.train.optim import make_optimizer

LOOP = dict(log_every=2, eval_every=8, checkpoint_every=8, keep_checkpoints=2,
            tensorboard=False, preemption_check_every=3)


class TinyDenoiser(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3, 3))(x))
    return x + nn.Conv(1, (3, 3))(h)


def volumes(count, depth, seed):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(count):
    nd = rng.normal(40.0, 60.0, size=(depth, 24, 24)).astype(np.float32)
    out.append(Volume(f"p{seed}_{i}", {"nd": nd, "ld": nd + rng.normal(0, 40.0, nd.shape)}))
  return out


class SlowStream:
  """The real patch stream, slowed down and reporting how far it has got."""

  def __init__(self, stream, delay, progress_path):
    self.stream, self.delay, self.progress_path = stream, delay, progress_path

  def __next__(self):
    batch = next(self.stream)
    time.sleep(self.delay)
    with open(self.progress_path + ".tmp", "w") as f:
      f.write(str(self.stream.get_state()["batches_consumed"]))
    os.replace(self.progress_path + ".tmp", self.progress_path)
    return batch

  def get_state(self):
    return self.stream.get_state()

  def set_state(self, state):
    self.stream.set_state(state)


def denoiser_for(model, counter):
  """``state -> fn(x)`` on the once-jitted apply, counting this process's calls."""
  denoise = jax.jit(model.apply)

  def bind(state):
    def fn(x):
      counter["denoise_calls"] += 1
      return denoise({"params": state["params"]}, x)
    return fn

  return bind


def tiny_stage(args, streams, val_history, counter):
  model = TinyDenoiser()
  normalization = Normalization()
  tx = make_optimizer(ml_collections.ConfigDict(dict(
      name="adam", lr=3e-3, schedule="cosine", warmup_steps=2, end_lr_factor=0.1)),
      args["num_steps"])

  def init_state(rng, previous):
    params = model.init(rng, jnp.zeros((1, 16, 16, 1)))["params"]
    return {"params": params, "opt_state": tx.init(params)}

  def train_step(state, batch, rng):
    noisy = batch["ld"] + 0.01 * jax.random.normal(rng, batch["ld"].shape)

    def loss_fn(params):
      return jnp.mean(jnp.square(model.apply({"params": params}, noisy) - batch["nd"]))

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return ({"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state},
            {"loss": loss})

  def make_data(previous):
    stream = make_patch_dataset(
        volumes(2, 6, seed=1), patch_size=16, batch_size=4, seed=0,
        normalization=normalization, skip_air_fraction=None, num_threads=1, prefetch=2)
    streams.append(stream)
    return SlowStream(stream, args["delay"],
                      os.path.join(args["out"], f"progress_{jax.process_index()}"))

  config = ml_collections.ConfigDict(dict(eval=dict(
      windows=("abdomen",), val_max_slices=2, batch_size=2)))
  # Three volumes: two processes get an unequal share (2 and 1).
  validate = evaluation.make_validation_fn(config, volumes(3, 3, seed=2),
                                           denoiser_for(model, counter), normalization, slab=1)

  def evaluate(state):
    metrics = validate(state)
    val_history.append(metrics)
    return metrics

  return Stage(name="tiny", num_steps=args["num_steps"], init_state=init_state,
               train_step=train_step, make_data=make_data, evaluate=evaluate,
               best_metric="val/psnr")


EVAL_CONFIG = ml_collections.ConfigDict(dict(
    data=dict(normalization={}),
    eval=dict(windows=("abdomen", "lung"), batch_size=4, classical="nlm", split="test",
              max_slices=0)))


class TinyMethod:
  input_slab = 1
  description = "tiny test denoiser"

  def __init__(self, bind):
    self.denoiser = bind


class TinyDataset:
  root = "synthetic"
  splits = {"test": ["p3_0", "p3_1", "p3_2"]}

  def split(self, name):
    return volumes(3, 3, seed=3)


def main():
  args = json.loads(sys.argv[1])
  run.maybe_initialize_distributed()
  cache = os.environ.get("LDCT_JAX_COMPILATION_CACHE")
  if cache:  # the test session's cache: later launches skip most compilation
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  index = jax.process_index()
  streams, val_history, counter = [], [], {"denoise_calls": 0}
  finals = run_stages([tiny_stage(args, streams, val_history, counter)], args["workdir"],
                      seed=7, loop_cfg=LoopConfig(**LOOP))
  val_calls = counter["denoise_calls"]
  result = {"finished": "tiny" in finals, "process_index": index,
            "process_count": jax.process_count(), "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(),
            "position": streams[-1].get_state()["batches_consumed"] if streams else None,
            "val": val_history, "val_denoise_calls": val_calls}
  if "tiny" in finals:
    # Replicated over every process's devices: this process's copy is the value.
    params = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), finals["tiny"]["params"])
    flat = {"/".join(str(k.key) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(os.path.join(args["out"], f"params_{index}.npz"), **flat)
    # --mode=eval's path: scores, a classical row, panels written by process 0.
    report = evaluation.run_evaluation(
        EVAL_CONFIG, args["workdir"], TinyMethod(denoiser_for(TinyDenoiser(), counter)),
        TinyDataset(), finals["tiny"], args["num_steps"])
    result["eval_mean"] = report["mean"]
    result["eval_denoise_calls"] = counter["denoise_calls"] - val_calls
  with open(os.path.join(args["out"], f"result_{index}.json"), "w") as f:
    json.dump(result, f)
  for stream in streams:
    stream.close()


if __name__ == "__main__":
  main()
