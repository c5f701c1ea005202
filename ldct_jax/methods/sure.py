r"""Training CT denoisers on noisy images alone with Stein's unbiased risk estimate.

No clean image ever reaches the step: the patch stream cuts only the noisy
input ('ld', and for CT noise the noise probes below), never 'nd'. The loss
is ``ldct_jax.sure.sure_from_probe`` of the model on the noisy patch, an
unbiased estimate of its mean squared error to the (unseen) clean patch
when the noise model holds. Validation during training (checkpoint
ranking) uses the validation split's NDCT, as every method's does; the
evaluation is the CT task's, against NDCT. ``config.sure.noise`` picks the
noise model:

* ``'gaussian'``: white Gaussian noise of known σ, the SURE papers' task
  (``configs/dncnn_sure.py``). The data option ``data.gaussian_noise``
  (``ldct_jax.data.gaussian``) makes the noisy images (σ on the [0, 255]
  scale of a HU window); the step converts σ to model units.
* ``'fbp'``: the built-in (or a described) CT scanner's own noise
  (``configs/ct_sure.py``). FBP-domain noise is Gaussian to a good
  approximation (post-log sinogram noise of hundreds of counts per ray,
  then a linear FBP) but neither white nor stationary: its covariance is
  ``Σ = B V Bᵀ``, with ``B`` the FBP and ``V`` the diagonal of post-log ray
  variances ``(λ + σ_e²) / λ²``, ``λ = f I₀ exp(−p)`` the expected counts.
  Plain SURE with one σ replaces ``tr(Σ J)`` by ``σ² tr(J)`` and is biased
  (docs/sure.md measures by how much). Here each training slice gets
  ``sure.num_probes`` independent draws from ``N(0, Σ̂)`` before training
  (``fbp_noise_probes``): the LDCT is re-projected to estimate ``p`` (the
  raw data a scanner has would give it directly), ``V`` follows from the
  scanner's flux, dose and electronic noise, and white sinogram noise of
  that variance is reconstructed by the same FBP. They are cut with the
  patch and augmented with it (a rotated noise field is a draw of the
  rotated covariance), and the step combines them with random unit
  weights ``c`` (``Σ_k c_k n_k ~ N(0, Σ̂)`` for any unit ``c``), so every
  step sees a fresh probe of the right covariance. ``tr(Σ)/N`` per patch
  is the probes' mean square. ``sure.fbp_probe='white'`` instead runs
  plain SURE with that σ̄² (the biased baseline).

Batch norm: the perturbed pass's statistics are discarded (``sure`` docs);
the state's ``batch_stats`` are those of the unperturbed pass only.
"""
from __future__ import annotations

import json
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ldct_jax import models
from ldct_jax import sure as sure_lib
from ldct_jax.data import builtin, gaussian
from ldct_jax.data.pipeline import Normalization, Volume, make_patch_dataset
from ldct_jax.errors import InputError
from ldct_jax.evaluation import make_validation_fn
from ldct_jax.methods import MethodSpec, bind_denoiser
from ldct_jax.methods.supervised import (TrainState, create_train_state, input_shape,
                                         make_inference, model_variables)
from ldct_jax.physics import ct
from ldct_jax.train.loop import Stage
from ldct_jax.train.optim import make_optimizer

NOISE_MODELS = ("gaussian", "fbp")
FBP_PROBES = ("correlated", "white")
PHYSICS_FIELDS = ("incident_flux", "dose_fraction", "electronic_noise_std", "kernel")


def probe_key(k: int) -> str:
  return f"probe{k}"


# ----------------------------------------------------------------------------
# CT noise probes


def fbp_noise_probes(ldct_hu, key, num: int, *, pixel_size: float, incident_flux: float,
                     dose_fraction: float, electronic_noise_std: float, kernel: str = "ramp",
                     min_counts: float = 0.1, mu_water: float = ct.MU_WATER):
  """``num`` independent draws of the FBP noise of each ``(..., H, W)`` LDCT slice, in HU.

  The linearised noise model of ``physics.ct.simulate_dose_levels``
  (parallel beam, ``ParallelBeamGeometry.for_image``): line integrals ``p``
  from re-projecting the LDCT, expected counts ``λ = f I₀ e^{−p}``
  (floored at ``min_counts``), post-log variance ``(λ + σ_e²) / λ²``, white
  Gaussian sinogram noise of that variance, FBP with ``kernel``, to HU.

  Returns:
    ``(num, ..., H, W)`` float32 HU noise fields (mean zero).
  """
  ldct_hu = jnp.asarray(ldct_hu, jnp.float32)
  shape = tuple(ldct_hu.shape[-2:])
  geometry = ct.ParallelBeamGeometry.for_image(shape, float(pixel_size))
  mu = jnp.maximum(ct.hu_to_mu(ldct_hu, mu_water), 0.0)  # below -1000 HU is air
  p = geometry.project(mu, float(pixel_size))
  counts = jnp.maximum(dose_fraction * incident_flux * jnp.exp(-p), min_counts)
  std = jnp.sqrt(counts + electronic_noise_std ** 2) / counts
  white = jax.random.normal(key, (int(num),) + p.shape, jnp.float32)
  noise_mu = geometry.reconstruct(std * white, shape, float(pixel_size), kernel)
  return noise_mu * (1000.0 / mu_water)


def ct_physics(config, dataset) -> dict:
  """The scanner's ``PHYSICS_FIELDS``: ``config.sure.physics``, or the built-in data's spec."""
  given = dict(config.sure.get("physics", {}) or {})
  if all(given.get(k) not in (None, "", 0, 0.0) for k in PHYSICS_FIELDS):
    return {k: given[k] for k in PHYSICS_FIELDS}
  if dataset is not None and dataset.is_builtin:
    with open(dataset.root / "dataset.json") as f:
      # Through BuiltinSpec: specs saved before a field existed get its default.
      spec = builtin.BuiltinSpec.from_config(json.load(f)["spec"])
    return {k: getattr(spec, k) for k in PHYSICS_FIELDS}
  raise InputError(
      "sure.noise='fbp' needs the scanner's noise physics: data.root "
      f"{str(getattr(dataset, 'root', ''))!r} is not the built-in data, so give every one of "
      f"--config.sure.physics.{{{','.join(PHYSICS_FIELDS)}}} (full-dose photons per "
      "detector bin, the LDCT's dose fraction, electronic noise in counts, FBP filter)")


def with_noise_probes(volumes: Sequence[Volume], spacing: dict, physics: dict, num: int,
                      normalization: Normalization, seed: int, chunk: int = 8) -> list:
  """Training volumes holding only 'ld' and ``num`` probe arrays in MODEL units.

  The probes are HU noise divided by ``normalization.scale`` (no shift: they
  are differences), so the patch stream passes them through as raw keys. The
  NDCT is left out here, so it cannot reach the step.
  """
  out = []
  base = jax.random.PRNGKey(seed)
  for index, volume in enumerate(volumes):
    ld = volume.arrays["ld"]
    pixel = float(spacing.get(volume.patient_id, (1.0, ct.DEFAULT_FOV_MM / ld.shape[-1]))[-1])
    draws = []
    for start in range(0, ld.shape[0], chunk):
      key = jax.random.fold_in(jax.random.fold_in(base, index), start)
      draws.append(np.asarray(fbp_noise_probes(
          ld[start:start + chunk], key, num, pixel_size=pixel,
          incident_flux=float(physics["incident_flux"]),
          dose_fraction=float(physics["dose_fraction"]),
          electronic_noise_std=float(physics["electronic_noise_std"]),
          kernel=str(physics["kernel"]))))
    noise = np.concatenate(draws, axis=1) / normalization.scale
    out.append(Volume(volume.patient_id,
                      {"ld": ld, **{probe_key(k): noise[k] for k in range(num)}}))
  return out


# ----------------------------------------------------------------------------
# The step


def make_apply(model, state, rng):
  """``(params, x) -> (out, batch-stat updates)`` in training mode, for ``sure_lib``."""

  def apply(params, x):
    variables = {**model_variables(state), "params": params}
    if state.batch_stats:
      return model.apply(variables, x, train=True, mutable=["batch_stats"],
                         rngs={"dropout": rng})
    # One dropout key for both passes: the finite difference must see one network.
    return model.apply(variables, x, train=True, rngs={"dropout": rng}), {}

  return apply


def combine_probes(probes, key):
  """``(K, B, ...)`` noise draws -> ``(B, ...)`` ``Σ_k c_k n_k`` with per-sample unit ``c``."""
  weights = jax.random.normal(key, probes.shape[:2], probes.dtype)
  weights = weights / jnp.linalg.norm(weights, axis=0, keepdims=True)
  return jnp.einsum("kb,kb...->b...", weights, probes)


def make_train_step(model, *, noise: str, sigma: float = 0.0, num_probes: int = 0,
                    fbp_probe: str = "correlated", eps=None, probe: str = "gaussian",
                    divergence: str = "fd"):
  """Pure ``(state, batch, rng) -> (state, metrics)``; the batch holds no clean image.

  ``noise='gaussian'``: batch ``{'ld'}``, white noise of std ``sigma``
  (model units). ``noise='fbp'``: batch ``{'ld', 'probe0', ...}`` (see the
  module docstring). Metrics: ``loss`` (the batch's mean SURE, an estimate
  of the MSE per pixel in model units), ``residual`` ``‖y − f(y)‖²/N``,
  ``trace`` ``tr(Σ J)/N``, ``noise_var`` and ``grad_norm``.
  """
  if noise not in NOISE_MODELS:
    raise ValueError(f"sure.noise must be one of {NOISE_MODELS}, got {noise!r}")
  if noise == "fbp" and fbp_probe not in FBP_PROBES:
    raise ValueError(f"sure.fbp_probe must be one of {FBP_PROBES}, got {fbp_probe!r}")
  keys = tuple(probe_key(k) for k in range(num_probes))

  def train_step(state: TrainState, batch, rng):
    unknown = set(batch) - {"ld", *keys}
    if unknown:  # trace-time check: a clean target must never reach this step
      raise ValueError(f"SURE step got batch keys {sorted(unknown)} beyond the noisy input")
    y = batch["ld"]
    probe_rng, mix_rng, dropout_rng = jax.random.split(rng, 3)
    apply = make_apply(model, state, dropout_rng)
    if noise == "gaussian":
      noise_var = jnp.full((y.shape[0],), sigma ** 2, jnp.float32)
      u = sigma * sure_lib.draw_probe(probe_rng, y.shape, probe, y.dtype)
    else:
      bank = jnp.stack([batch[k] for k in keys])  # (K, B, p, p, 1)
      noise_var = jnp.mean(jnp.square(bank), axis=(0, 2, 3, 4))
      if fbp_probe == "correlated":
        u = combine_probes(bank, mix_rng)
      else:  # plain SURE: white noise of the same mean variance
        u = jnp.sqrt(noise_var)[:, None, None, None] * sure_lib.draw_probe(
            probe_rng, y.shape, probe, y.dtype)

    def objective(params):
      result = sure_lib.sure_from_probe(apply, params, y, u, noise_var, eps=eps,
                                        has_aux=True, method=divergence)
      return jnp.mean(result.risk), result

    (loss, result), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads)
    if result.aux:
      state = state.replace(batch_stats=result.aux["batch_stats"])
    metrics = {
        "loss": loss,
        "residual": jnp.mean(result.residual),
        "trace": jnp.mean(result.trace),
        "noise_var": jnp.mean(result.noise_var),
        "grad_norm": jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(grads))),
    }
    return state, metrics

  return train_step


# ----------------------------------------------------------------------------
# build


def gaussian_sigma(config, normalization: Normalization) -> float:
  """``data.gaussian_noise.sigma`` ([0, 255] scale of its window) in model units."""
  options = config.data.get("gaussian_noise") or {}
  sigma = float(options.get("sigma", 0.0) or 0.0)
  if not sigma > 0:
    raise InputError("sure.noise='gaussian' trains on the Gaussian-noise task: set "
                     "data.gaussian_noise.sigma > 0 (configs/dncnn_sure.py does)")
  return gaussian.sigma_hu(sigma, options.get("window", "paper")) / normalization.scale


def build(config, dataset) -> MethodSpec:
  scfg = config.sure
  noise = scfg.noise
  if noise not in NOISE_MODELS:
    raise InputError(f"config.sure.noise must be one of {NOISE_MODELS}, got {noise!r}")
  if int(config.data.get("slab", 1)) != 1:
    raise InputError("the SURE method trains 2D denoisers: set data.slab=1")
  model = models.get_model(config.model)
  tx = make_optimizer(config.optim, config.train.num_steps)
  normalization = Normalization.from_config(config.data.normalization)
  denoise, inference_variables = make_inference(model)
  num_probes = int(scfg.get("num_probes", 4)) if noise == "fbp" else 0
  if noise == "fbp" and num_probes < 2:
    raise InputError(f"sure.num_probes must be >= 2 for sure.noise='fbp', got {num_probes}")
  sigma = gaussian_sigma(config, normalization) if noise == "gaussian" else 0.0
  eps = float(scfg.get("eps", 0.0) or 0.0) or None
  train_step = make_train_step(
      model, noise=noise, sigma=sigma, num_probes=num_probes,
      fbp_probe=scfg.get("fbp_probe", "correlated"), eps=eps,
      probe=scfg.get("probe", "gaussian"), divergence=scfg.get("divergence", "fd"))

  def init_state(rng, previous):
    del previous
    return create_train_state(model, tx, rng, input_shape(config.data, config.data.patch_size))

  def make_data(previous):
    del previous
    # The training volumes are rebuilt with the noisy image alone (plus probes):
    # the NDCT of the training patients is not even handed to the stream.
    volumes = [Volume(v.patient_id, {"ld": v.arrays["ld"]}) for v in dataset.split("train")]
    keys = ("ld",)
    if noise == "fbp":
      # Read here, for training only: --mode=eval on another data root needs no scanner.
      volumes = with_noise_probes(volumes, dataset.spacing, ct_physics(config, dataset),
                                  num_probes, normalization, config.seed)
      keys += tuple(probe_key(k) for k in range(num_probes))
    return make_patch_dataset(
        volumes, keys=keys, raw_keys=keys[1:], patch_size=config.data.patch_size,
        batch_size=config.data.batch_size, seed=config.seed, normalization=normalization,
        augment=config.data.augment, skip_air_fraction=config.data.skip_air_fraction)

  evaluate = None
  if dataset is not None and dataset.splits.get("val"):
    evaluate = make_validation_fn(config, dataset.split("val"),
                                  bind_denoiser(denoise, inference_variables), normalization, 1)
  stage = Stage(name="denoiser", num_steps=config.train.num_steps, init_state=init_state,
                train_step=train_step, make_data=make_data, evaluate=evaluate,
                best_metric=config.train.get("best_metric"),
                best_mode=config.train.get("best_mode", "max"))
  if noise == "gaussian":
    what = f"Gaussian sigma={config.data.gaussian_noise.sigma:g}/255"
  else:
    what = f"FBP noise, {scfg.get('fbp_probe', 'correlated')} probes"
  return MethodSpec(stages=[stage], denoise=denoise, inference_variables=inference_variables,
                    description=f"{config.model.name} (SURE on noisy images only, {what})")

