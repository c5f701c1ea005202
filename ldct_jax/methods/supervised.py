"""Supervised denoising on paired LDCT/NDCT patches (RED-CNN, DnCNN, U-Net, ...).

State: ``TrainState`` (params, optimiser state, BatchNorm statistics).
Step: ``loss(model(ld), nd)`` with the config's loss, one optimiser update.
With ``data.slab = k > 1`` the model sees k adjacent LDCT slices (NDHWC) and
is trained against the central NDCT slice.

Blind training (``data.blind_doses``, built-in data): the patch stream crops
'nd' and every dose's LDCT (``'ld@0.100'``, ...) at one location, and the
step picks one dose per patch at random (``select_dose``), so one model sees
a range of noise levels; validation and evaluation use the ordinary 'ld'.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax.training import train_state

from ldct_jax import losses, models
from ldct_jax.data import datasets
from ldct_jax.evaluation import make_validation_fn
from ldct_jax.data.pipeline import Normalization, make_patch_dataset
from ldct_jax.methods import MethodSpec, bind_denoiser
from ldct_jax.train.loop import Stage
from ldct_jax.train.optim import make_optimizer


class TrainState(train_state.TrainState):
  batch_stats: Any = flax.core.FrozenDict()


def model_variables(state: TrainState) -> dict:
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return variables


def central_slice(x: jax.Array) -> jax.Array:
  """(B, k, H, W, C) slab -> (B, H, W, C) middle slice; 2D batches pass through."""
  return x[:, x.shape[1] // 2] if x.ndim == 5 else x


def input_shape(data_cfg, patch_size: int) -> tuple:
  slab = int(data_cfg.get("slab", 1))
  return (1, slab, patch_size, patch_size, 1) if slab > 1 else (1, patch_size, patch_size, 1)


def make_loss_fn(loss_cfg):
  return losses.get_loss(loss_cfg.name, **dict(loss_cfg.get("kwargs", {})))


def create_train_state(model, tx, rng, shape) -> TrainState:
  variables = model.init(rng, jnp.zeros(shape, jnp.float32), train=False)
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables.get("batch_stats", flax.core.FrozenDict()))


def select_dose(batch, dose_keys, doses, rng) -> tuple:
  """Per sample, the LDCT of one dose drawn uniformly from ``dose_keys``.

  Args:
    batch: ``{'nd': ..., dose_keys[i]: ...}``, arrays of one shape, batch first.
    dose_keys: the batch's LDCT keys, one per dose.
    doses: their dose fractions (for the returned draw).
    rng: a JAX key; the draw is a pure function of it.

  Returns:
    ``({'ld': chosen LDCT, 'nd': batch['nd']}, (B,) float32 chosen fractions)``.
  """
  # Per patch, not per batch: a batch then mixes noise levels, so the model
  # cannot read the level off batch statistics (BatchNorm's batch mean and
  # variance would carry it in training and not at inference), and every
  # step's gradient covers the whole dose range instead of one dose at a time.
  stacked = jnp.stack([batch[key] for key in dose_keys])  # (K, B, ...)
  size = stacked.shape[1]
  index = jax.random.randint(rng, (size,), 0, len(dose_keys))
  chosen = jnp.take_along_axis(
      stacked, index.reshape((1, size) + (1,) * (stacked.ndim - 2)), axis=0)[0]
  return {"ld": chosen, "nd": batch["nd"]}, jnp.asarray(doses, jnp.float32)[index]


def make_train_step(model, loss_fn, *, dose_keys=(), doses=()):
  """Pure ``(state, batch, rng) -> (state, metrics)`` for paired batches {'ld', 'nd'}.

  With ``dose_keys`` (blind training) the batch holds 'nd' and one LDCT per
  dose instead of 'ld'; each sample's LDCT is drawn by ``select_dose`` from
  the step's rng and the metric ``dose_mean`` is the batch's mean drawn dose.
  """
  dose_keys, doses = tuple(dose_keys), tuple(float(f) for f in doses)
  if len(dose_keys) != len(doses):
    raise ValueError(f"dose_keys {dose_keys} and doses {doses} differ in length")

  def train_step(state: TrainState, batch, rng):
    extra = {}
    if dose_keys:
      rng, dose_rng = jax.random.split(rng)
      batch, chosen = select_dose(batch, dose_keys, doses, dose_rng)
      extra["dose_mean"] = jnp.mean(chosen)
    target = central_slice(batch["nd"])

    def objective(params):
      variables = {**model_variables(state), "params": params}
      if state.batch_stats:
        out, updates = model.apply(variables, batch["ld"], train=True,
                                   mutable=["batch_stats"], rngs={"dropout": rng})
      else:
        out, updates = model.apply(variables, batch["ld"], train=True,
                                   rngs={"dropout": rng}), {}
      return loss_fn(out, target), (out, updates)

    (loss, (out, updates)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads)
    if updates:
      state = state.replace(batch_stats=updates["batch_stats"])
    metrics = {
        "loss": loss,
        "mse": jnp.mean(jnp.square(out - target)),
        "grad_norm": jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(grads))),
        **extra,
    }
    return state, metrics

  return train_step


def make_inference(model):
  """``(denoise, inference_variables)`` for a model trained with ``TrainState``.

  ``denoise(variables, x)`` is jitted here, once per method; the variables are
  an argument (see ``MethodSpec.denoise``).
  """

  @jax.jit
  def denoise(variables, x):
    return model.apply(variables, x, train=False)

  return denoise, model_variables


def build(config, dataset) -> MethodSpec:
  model = models.get_model(config.model)
  loss_fn = make_loss_fn(config.loss)
  tx = make_optimizer(config.optim, config.train.num_steps)
  normalization = Normalization.from_config(config.data.normalization)
  slab = int(config.data.get("slab", 1))
  denoise, inference_variables = make_inference(model)
  blind_doses = tuple(float(f) for f in config.data.get("blind_doses", ()))
  dose_keys = datasets.blind_dose_keys(blind_doses)

  def init_state(rng, previous):
    del previous
    return create_train_state(model, tx, rng, input_shape(config.data, config.data.patch_size))

  def make_data(previous):
    del previous
    volumes, keys = dataset.split("train"), ("ld", "nd")
    if dose_keys:  # read here, for training only: eval/denoise never need the doses
      volumes = datasets.with_dose_series(dataset, blind_doses)
      keys = ("nd",) + dose_keys  # air rejection on the NDCT, the same for every dose
    return make_patch_dataset(
        volumes, keys=keys, patch_size=config.data.patch_size,
        slab=slab, batch_size=config.data.batch_size, seed=config.seed,
        normalization=normalization, augment=config.data.augment,
        skip_air_fraction=config.data.skip_air_fraction)

  evaluate = None
  if dataset is not None and dataset.splits.get("val"):
    evaluate = make_validation_fn(config, dataset.split("val"),
                                  bind_denoiser(denoise, inference_variables), normalization, slab)

  stage = Stage(name="denoiser", num_steps=config.train.num_steps, init_state=init_state,
                train_step=make_train_step(model, loss_fn, dose_keys=dose_keys,
                                           doses=blind_doses),
                make_data=make_data,
                evaluate=evaluate, best_metric=config.train.get("best_metric"),
                best_mode=config.train.get("best_mode", "max"))
  return MethodSpec(stages=[stage], denoise=denoise, inference_variables=inference_variables,
                    input_slab=slab,
                    description=f"{config.model.name} (supervised, {config.loss.name} loss"
                    + (f", blind {min(blind_doses):g}-{max(blind_doses):g} dose)"
                       if blind_doses else ")"))
