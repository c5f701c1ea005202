"""Supervised MRI reconstruction: an unrolled network (the deep cascade) trained on
fully sampled slices, retrospectively undersampled (Schlemper et al. 2017).

State: ``TrainState`` (params, optimiser state). Batch: whole slices from
``ldct_jax.data.mri_pipeline`` (zero-filled image ``x``, measured k-space
``k0``, ``mask``, the fully sampled complex ``target``). Step: the config's
loss (default L2, the paper's) between the network's complex output and the
target, both as 2 real channels, one optimiser update. The network is any
model called as ``model(x, k0, mask)`` (``models.cascade.DeepCascade``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ldct_jax import models
from ldct_jax.data import mri_pipeline
from ldct_jax.methods import MethodSpec, bind_denoiser
from ldct_jax.methods.supervised import TrainState, make_loss_fn, model_variables
from ldct_jax.train.loop import Stage
from ldct_jax.train.optim import make_optimizer

INPUT_KEYS = ("x", "k0", "mask")


def create_state(model, tx, rng, shape) -> TrainState:
  h, w = shape
  variables = model.init(rng, jnp.zeros((1, h, w, 2)), jnp.zeros((1, h, w, 2)),
                         jnp.ones((1, h, w)), train=False)
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)


def make_train_step(model, loss_fn):
  """Pure ``(state, batch, rng) -> (state, metrics)`` on MRI slice batches."""

  def train_step(state: TrainState, batch, rng):
    del rng  # no dropout or sampling inside the step: masks come with the batch
    target = batch["target"]

    def objective(params):
      out = model.apply({**model_variables(state), "params": params},
                        *(batch[k] for k in INPUT_KEYS), train=True)
      return loss_fn(out, target), out

    (loss, out), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads)
    error = jnp.sum(jnp.square(out - target), axis=(1, 2, 3))
    metrics = {
        "loss": loss,
        # NMSE of the complex image, per slice then averaged (scale-free).
        "nmse": jnp.mean(error / jnp.sum(jnp.square(target), axis=(1, 2, 3))),
        "grad_norm": jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(grads))),
    }
    return state, metrics

  return train_step


def make_inference(model):
  """``(reconstruct, inference_variables)``: ``reconstruct(variables, inputs)`` maps
  ``{'x', 'k0', 'mask'}`` (scaled, see ``mri_pipeline``) to the complex image
  (B, H, W, 2); jitted once here, the variables an argument."""

  @jax.jit
  def reconstruct(variables, inputs):
    return model.apply(variables, *(inputs[k] for k in INPUT_KEYS), train=False)

  return reconstruct, model_variables


def build(config, dataset) -> MethodSpec:
  from ldct_jax.tasks import mri as mri_task  # the task's reader and evaluator
  model = models.get_model(config.model)
  loss_fn = make_loss_fn(config.loss)
  tx = make_optimizer(config.optim, config.train.num_steps)
  reconstruct, inference_variables = make_inference(model)
  mcfg = config.mri
  train_files = dataset.split("train") if dataset is not None else []
  shape = tuple(config.data.get("train_shape", ()) or ())
  if dataset is not None:
    shape = mri_pipeline.training_shape(train_files, shape)
  elif not shape:
    shape = tuple(config.data.get("init_shape", (64, 64)))  # parameter shapes only

  def init_state(rng, previous):
    del previous
    return create_state(model, tx, rng, shape)

  def make_data(previous):
    del previous
    return mri_pipeline.make_slice_dataset(
        train_files, shape=shape, mask_kind=mcfg.mask, acceleration=mcfg.acceleration,
        center_fraction=mcfg.get("center_fraction") or None,
        batch_size=config.data.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count())

  evaluate = None
  if dataset is not None and dataset.splits.get("val"):
    evaluate = mri_task.make_validation_fn(
        config, dataset.split("val"), bind_denoiser(reconstruct, inference_variables))

  stage = Stage(name="reconstructor", num_steps=config.train.num_steps, init_state=init_state,
                train_step=make_train_step(model, loss_fn), make_data=make_data,
                evaluate=evaluate, best_metric=config.train.get("best_metric"),
                best_mode=config.train.get("best_mode", "max"))
  return MethodSpec(stages=[stage], denoise=reconstruct,
                    inference_variables=inference_variables,
                    description=f"{config.model.name} (supervised MRI reconstruction, "
                    f"{config.loss.name} loss, R={mcfg.acceleration:g} {mcfg.mask} mask)")
