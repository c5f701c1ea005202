r"""MRI reconstruction trained from undersampled, noisy k-space only, with generalised SURE.

The supervised cascade (``mri_supervised``) needs fully sampled slices. Here
each training slice is what a clinic would store: k-space measured under
ONE mask (``mri_pipeline.make_slice_dataset(fixed_mask_seed=...)``: a slice
never reappears under another mask, whose union would reveal the rest of
k-space), with its noise. The batch's fully sampled ``target`` is removed
before the step (``UndersampledBatches``), which refuses any other key.

Loss: ``sure.gsure_masked_fourier``, Eldar's GSURE in the range of the
measurement operator ``A = M F`` (``P = Fᴴ M F``): an unbiased estimate of
``‖M F (h − x)‖²``, the reconstruction's error on the measured samples. With
data consistency that estimate cannot see the unmeasured samples, and with
noiseless DC fed every sample it is even constant. So the network sees a
random subset of the measured columns in each step (``holdout_split``: each
measured column outside the fully sampled centre is held out with
probability ``mri_gsure.holdout``) and GSURE scores its prediction of the
held-out ones against their independent noisy measurements, plus (noisy DC)
its denoising of the seen ones through the divergence term. At evaluation
the network sees every measured sample, as always. The split is the self-
supervised SSDU idea (Yaman et al., MRM 2020) with GSURE as its loss, so the
seen samples' noise is accounted for, not fitted.

Noise level: GSURE needs the k-space noise std. ``mri_gsure.noise_std``
(complex std per sample, ``E|w|² = σ²``, in the files' k-space units) if
given; else every training file's ``noise_std`` attribute (the built-in data
writes the one it added); else an error. It is KNOWN, not estimated: on the
built-in 128² slices the outer k-space still holds signal (a median estimate
from 4-16 px k-space corners came out 7-55% high, the MNI slices worst), and a
scanner measures it with a noise pre-scan. It is read when the training data is
made (evaluation on other data needs none) and enters each batch in its scaled
units, ``noise_std = σ scale / √2`` per real component; the scale
(``1 / max|x|`` of the zero-filled image) is treated as a constant, which it
is to first order.

Validation during training (checkpoint ranking) uses the validation split's
fully sampled references, as the supervised method's does; the test-split
evaluation is the MRI task's.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from ldct_jax import models
from ldct_jax import sure as sure_lib
from ldct_jax.data import mri_pipeline
from ldct_jax.errors import InputError
from ldct_jax.methods import MethodSpec, bind_denoiser
from ldct_jax.methods.mri_supervised import create_state, make_inference
from ldct_jax.methods.supervised import TrainState, model_variables
from ldct_jax.physics import mri
from ldct_jax.train.loop import Stage
from ldct_jax.train.optim import make_optimizer

BATCH_KEYS = ("x", "k0", "mask", "scale", "noise_std")


class UndersampledBatches:
  """A training stream as GSURE sees it: no fully sampled ``target``, and each
  example's k-space noise std per real component in its scaled units,
  ``noise_std = σ scale / √2`` (σ the complex std in file units).

  Delegates ``get_state``/``set_state`` (exact resume) to the wrapped stream.
  """

  def __init__(self, stream, noise_std: float):
    self._stream = stream
    self._noise_std = float(noise_std)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = {k: v for k, v in next(self._stream).items() if k != "target"}
    batch["noise_std"] = (self._noise_std / np.sqrt(2.0) * batch["scale"]).astype(np.float32)
    return batch

  def get_state(self) -> dict:
    return self._stream.get_state()

  def set_state(self, state) -> None:
    self._stream.set_state(state)

  def close(self) -> None:
    self._stream.close()


def centre_columns(width: int, acceleration: float, center_fraction) -> np.ndarray:
  """``(W,)`` bool: the fully sampled centre columns of the config's masks."""
  cf = center_fraction or mri.default_center_fraction(acceleration)
  count = int(round(width * cf))
  start = (width - count + 1) // 2  # as physics.mri places it
  out = np.zeros(width, bool)
  out[start:start + count] = True
  return out


def holdout_split(mask, key, fraction: float, protected) -> jax.Array:
  """The input mask: ``mask`` minus columns held out with probability ``fraction``.

  Columns (the phase-encode axis, last) are held out whole, per example,
  never those in ``protected`` (the centre). ``mask`` is ``(B, H, W)``.
  """
  draw = jax.random.uniform(key, (mask.shape[0], 1, mask.shape[-1]))
  held = (draw < fraction) & ~jnp.asarray(protected)[None, None, :]
  return mask * (1.0 - held.astype(mask.dtype))


def make_train_step(model, *, holdout: float, protected, eps=None, divergence: str = "fd"):
  """Pure ``(state, batch, rng) -> (state, metrics)`` on ``UndersampledBatches``. Metrics:
  ``loss`` (GSURE per measured real number, scaled units), ``residual``,
  ``trace``, ``noise_var`` (s² per real component) and ``heldout_fraction``
  (measured samples the network did not see).
  """

  def train_step(state: TrainState, batch, rng):
    unknown = set(batch) - set(BATCH_KEYS)
    if unknown:  # trace-time: a fully sampled reference must never reach this step
      raise ValueError(f"GSURE step got batch keys {sorted(unknown)}; it takes {BATCH_KEYS}")
    split_rng, probe_rng = jax.random.split(rng)
    mask = jnp.broadcast_to(batch["mask"], batch["k0"].shape[:-1])
    seen = holdout_split(mask, split_rng, holdout, protected)
    s = batch["noise_std"]

    def apply(params, x, k, m):
      return model.apply({**model_variables(state), "params": params}, x, k, m, train=True)

    def objective(params):
      result = sure_lib.gsure_masked_fourier(apply, params, batch["k0"], mask, seen, s,
                                             probe_rng, eps=eps, method=divergence)
      return jnp.mean(result.risk), result

    (loss, result), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads)
    metrics = {
        "loss": loss,
        "residual": jnp.mean(result.residual),
        "trace": jnp.mean(result.trace),
        "noise_var": jnp.mean(result.noise_var),
        "heldout_fraction": 1.0 - jnp.sum(seen) / jnp.sum(mask),
        "grad_norm": jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(grads))),
    }
    return state, metrics

  return train_step


def training_noise_std(config, dataset) -> float:
  """The complex k-space noise std of the training files (see the module docstring)."""
  given = float(config.mri_gsure.get("noise_std", 0.0) or 0.0)
  if given > 0:
    return given
  files = dataset.split("train") if dataset is not None else []
  values = {f.attrs.get("noise_std") for f in files}
  if files and None not in values and len(values) == 1:
    return float(values.pop())
  if dataset is not None and dataset.is_builtin:
    with open(dataset.root / "dataset.json") as f:
      return float(json.load(f)["spec"]["noise_level"])
  raise InputError(
      "GSURE needs the k-space noise level: the training files carry no (common) "
      "'noise_std' attribute, so give --config.mri_gsure.noise_std=<complex std per k-space "
      "sample, E|w|^2 = std^2, in the files' units> (a noise pre-scan, or the std of k-space "
      "in a signal-free background region)")


def build(config, dataset) -> MethodSpec:
  from ldct_jax.tasks import mri as mri_task  # the task's validation
  model = models.get_model(config.model)
  tx = make_optimizer(config.optim, config.train.num_steps)
  reconstruct, inference_variables = make_inference(model)
  mcfg, gcfg = config.mri, config.mri_gsure
  if mcfg.mask not in mri_pipeline.COLUMN_MASKS:
    raise InputError(f"mri_gsure holds out whole columns: config.mri.mask must be one of "
                     f"{mri_pipeline.COLUMN_MASKS}, got {mcfg.mask!r}")
  holdout = float(gcfg.holdout)
  if not 0.0 < holdout < 1.0:
    raise InputError(f"config.mri_gsure.holdout must be in (0, 1), got {holdout}")
  train_files = dataset.split("train") if dataset is not None else []
  shape = tuple(config.data.get("train_shape", ()) or ())
  if dataset is not None:
    shape = mri_pipeline.training_shape(train_files, shape)
  elif not shape:
    shape = tuple(config.data.get("init_shape", (64, 64)))
  protected = centre_columns(shape[-1], mcfg.acceleration, mcfg.get("center_fraction"))
  eps = float(gcfg.get("eps", 0.0) or 0.0) or None

  def init_state(rng, previous):
    del previous
    return create_state(model, tx, rng, shape)

  def make_data(previous):
    del previous
    return UndersampledBatches(mri_pipeline.make_slice_dataset(
        train_files, shape=shape, mask_kind=mcfg.mask, acceleration=mcfg.acceleration,
        center_fraction=mcfg.get("center_fraction") or None,
        batch_size=config.data.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        fixed_mask_seed=int(gcfg.get("mask_seed", 0))), training_noise_std(config, dataset))

  evaluate = None
  if dataset is not None and dataset.splits.get("val"):
    evaluate = mri_task.make_validation_fn(
        config, dataset.split("val"), bind_denoiser(reconstruct, inference_variables))

  stage = Stage(name="reconstructor", num_steps=config.train.num_steps, init_state=init_state,
                train_step=make_train_step(model, holdout=holdout, protected=protected, eps=eps,
                                           divergence=gcfg.get("divergence", "fd")),
                make_data=make_data, evaluate=evaluate,
                best_metric=config.train.get("best_metric"),
                best_mode=config.train.get("best_mode", "max"))
  return MethodSpec(stages=[stage], denoise=reconstruct,
                    inference_variables=inference_variables,
                    description=f"{config.model.name} (GSURE from undersampled noisy k-space, "
                    f"R={mcfg.acceleration:g} {mcfg.mask} mask, {holdout:g} of the measured "
                    f"columns held out per step)")
