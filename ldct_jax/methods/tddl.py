"""TDDL: task-driven deep learning for LDCT denoising (Chen, Huang, Sun, Ren, Qiu, ISICDM 2020).

Clinical LDCT noise is not the Poisson/Gaussian noise most papers inject, and
paired LDCT/NDCT scans rarely exist. TDDL learns the noise of real LDCT
images with a VAE (from LDCT only), adds learnt noise to NDCT images of
*other* patients to make pseudo-LDCT/NDCT pairs, and trains a denoiser
(a GCN by default, Chen et al. ICONIP 2020) on those pairs.

Stages, each checkpointed by the generic loop (a crashed run resumes in the
stage it was in):

1. ``noise_model``: the conditional noise VAE (``ldct_jax.models.vae``) on
   LDCT patches of the *noise patients* -- the first ``tddl.noise_fraction``
   of the training patients (sorted ids). Only their LDCT is read.
2. synthesis: pseudo-LDCT = NDCT + VAE noise, drawn *online* inside the
   denoiser's jitted step from the frozen VAE of stage 1. Every step sees
   fresh noise on its NDCT patches (unlimited pseudo pairs, nothing to cache
   or go stale), and the per-step RNG keeps resumes exact.
3. ``denoiser``: the denoiser on pseudo pairs built from the NDCT of the
   *clean patients* -- the other training patients (the unpaired setting;
   ``tddl.paired=True`` uses every training patient for both, an ablation).
   Validation uses true LDCT/NDCT pairs of the validation patients, as a
   research benchmark does for model selection.
4. evaluation on true test pairs (``ldct_jax.evaluation``), plus a noise
   fidelity report: the synthetic noise against the real LDCT noise of the
   test patients, next to i.i.d. Gaussian and image-domain Poisson noise of
   matched variance (``ldct_jax.noise_stats``).

``tddl.noise_source`` selects what stage 2 adds: 'vae' (TDDL), or the
baselines TDDL argues against, 'gaussian' / 'poisson' (matched to the noise
level estimated from the noise patients' LDCT; no VAE stage is trained).
"""
from __future__ import annotations

import functools
from typing import Dict

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax.training import train_state

from ldct_jax import models, noise_stats
from ldct_jax.evaluation import make_validation_fn, spread_slices
from ldct_jax.data.pipeline import Normalization, Volume, make_patch_dataset
from ldct_jax.methods import MethodSpec, supervised
from ldct_jax.models import vae as vae_lib
from ldct_jax.train.loop import Stage
from ldct_jax.train.optim import make_optimizer

NOISE_SOURCES = ("vae", "gaussian", "poisson")


def partition_train_patients(train_ids, noise_fraction: float, paired: bool):
  """(noise patients, clean patients): disjoint halves of the training patients."""
  ids = sorted(train_ids)
  if paired:
    return ids, ids
  if len(ids) < 2:
    raise ValueError(f"unpaired TDDL needs >= 2 training patients, got {ids}")
  cut = min(max(1, int(round(noise_fraction * len(ids)))), len(ids) - 1)
  return ids[:cut], ids[cut:]


def estimate_noise_level_hu(volumes, normalization: Normalization, max_slices: int = 8,
                            range_factor: float = 5.0) -> float:
  """Body noise std (HU) of LDCT from LDCT alone, via the VAE's noise extraction."""
  stds = []
  for volume in volumes:
    ld = volume.arrays["ld"]
    x = jnp.asarray(normalization.normalize(ld[spread_slices(ld.shape[0], max_slices)]))[..., None]
    noise, _ = vae_lib.extract_noise(x, range_factor=range_factor)
    body = np.asarray(x[..., 0]) > float(normalization.normalize(-900.0))
    stds.append(float(np.std(np.asarray(noise[..., 0])[body])) * normalization.scale)
  return float(np.mean(stds))


def make_noise_fn(source: str, normalization: Normalization, noise_std_hu: float, vae_model=None,
                  *, noise_gain: float = 1.0, range_factor: float = 5.0):
  """``(aux, nd_norm, rng) -> pseudo_ld_norm`` for a batch (NHWC or NDHWC slabs).

  ``aux`` holds the frozen VAE parameters for 'vae' (a jit argument, not a
  baked-in constant) and is ignored otherwise.
  """
  std = noise_std_hu / normalization.scale

  def per_slice(fn, nd, rng):
    if nd.ndim == 5:  # slabs: noise every slice independently
      b, k = nd.shape[:2]
      flat = nd.reshape((b * k,) + nd.shape[2:])
      return fn(flat, rng).reshape(nd.shape)
    return fn(nd, rng)

  if source == "vae":
    def add(aux, nd, rng):
      return per_slice(lambda x, r: vae_lib.synthesize(
          aux, x, r, model=vae_model, noise_gain=noise_gain, range_factor=range_factor), nd, rng)
  elif source == "gaussian":
    def add(aux, nd, rng):
      del aux
      return nd + noise_stats.gaussian_noise_like(nd, std, rng)
  elif source == "poisson":
    def add(aux, nd, rng):
      del aux
      def one(x, r):
        hu = normalization.denormalize(x)
        mask = hu > -900.0
        return x + noise_stats.image_poisson_noise_like(hu, noise_std_hu, r, mask) / normalization.scale
      return per_slice(one, nd, rng)
  else:
    raise ValueError(f"tddl.noise_source must be one of {NOISE_SOURCES}, got {source!r}")
  return add


class DenoiserState(supervised.TrainState):
  """The denoiser's train state plus the frozen noise-model parameters it samples from."""
  noise_params: flax.core.FrozenDict = flax.core.FrozenDict()


def build(config, dataset) -> MethodSpec:
  cfg = config.tddl
  source = cfg.noise_source
  range_factor = float(cfg.range_factor)
  normalization = Normalization.from_config(config.data.normalization)
  slab = int(config.data.get("slab", 1))
  denoiser = models.get_model(config.model)
  vae_model = vae_lib.NoiseVAE(**dict(cfg.vae.model))
  make_denoiser = supervised.make_denoiser(denoiser)

  noise_ids = clean_ids = ()
  if dataset is not None:
    noise_ids, clean_ids = partition_train_patients(dataset.splits["train"], cfg.noise_fraction,
                                                    cfg.paired)

  def volumes(patients, key):
    """The training scans of ``patients``, keeping only the ``key`` images."""
    wanted = set(patients)
    return [Volume(v.patient_id, {key: v.arrays[key]}) for v in dataset.split("train")
            if dataset.patient_of.get(v.patient_id, v.patient_id) in wanted]

  # ---- stage 1: the noise VAE on LDCT of the noise patients ----
  vae_steps = int(cfg.vae.num_steps)
  vae_tx = make_optimizer(cfg.vae.optim, vae_steps)
  patch = int(cfg.vae.patch_size)

  def vae_init(rng, previous):
    del previous
    x = jnp.zeros((1, patch, patch, 1), jnp.float32)
    params = vae_model.init(rng, x, x, rng, train=True)["params"]
    return train_state.TrainState.create(apply_fn=vae_model.apply, params=params, tx=vae_tx)

  def vae_step(state, batch, rng):
    vae_batch = vae_lib.noise_batch(batch["ld"], range_factor=range_factor)
    kl_weight = vae_lib.kl_weight_schedule(state.step, int(cfg.vae.kl_warmup_steps),
                                           float(cfg.vae.kl_weight))
    loss_fn = functools.partial(vae_lib.elbo_loss, model=vae_model,
                                free_bits=float(cfg.vae.free_bits))
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        {"params": state.params}, vae_batch, rng, kl_weight)
    return state.apply_gradients(grads=grads["params"]), {**metrics, "kl_weight": kl_weight}

  def vae_data(previous):
    del previous
    return make_patch_dataset(volumes(noise_ids, "ld"), keys=("ld",), patch_size=patch,
                              batch_size=int(cfg.vae.batch_size), seed=config.seed,
                              normalization=normalization, augment=True,
                              skip_air_fraction=config.data.skip_air_fraction)

  stages = []
  if source == "vae":
    stages.append(Stage(name="noise_model", num_steps=vae_steps, init_state=vae_init,
                        train_step=vae_step, make_data=vae_data))

  # ---- stages 2+3: online synthesis + denoiser on pseudo pairs ----
  noise_std_hu = float(cfg.get("noise_std_hu", 0.0))
  if source != "vae" and noise_std_hu <= 0 and dataset is not None:
    noise_std_hu = cfg.noise_gain * estimate_noise_level_hu(
        volumes(noise_ids, "ld"), normalization, range_factor=range_factor)
  add_noise = make_noise_fn(source, normalization, noise_std_hu, vae_model,
                            noise_gain=float(cfg.noise_gain), range_factor=range_factor)
  loss_fn = supervised.make_loss_fn(config.loss)
  tx = make_optimizer(config.optim, config.train.num_steps)
  paired_step = supervised.make_train_step(denoiser, loss_fn)

  def denoiser_init(rng, previous):
    base = supervised.create_train_state(
        denoiser, tx, rng, supervised.input_shape(config.data, config.data.patch_size))
    noise_params = ({"params": previous["noise_model"].params} if source == "vae"
                    else flax.core.FrozenDict())
    return DenoiserState(step=base.step, apply_fn=base.apply_fn, params=base.params, tx=tx,
                         opt_state=base.opt_state, batch_stats=base.batch_stats,
                         noise_params=noise_params)

  def denoiser_step(state, batch, rng):
    synth_rng, step_rng = jax.random.split(rng)
    pseudo = {"ld": add_noise(state.noise_params, batch["nd"], synth_rng), "nd": batch["nd"]}
    return paired_step(state, pseudo, step_rng)

  def denoiser_data(previous):
    del previous
    return make_patch_dataset(volumes(clean_ids, "nd"), keys=("nd",),
                              patch_size=config.data.patch_size, slab=slab,
                              batch_size=config.data.batch_size, seed=config.seed + 1,
                              normalization=normalization, augment=config.data.augment,
                              skip_air_fraction=config.data.skip_air_fraction)

  evaluate = None
  if dataset is not None and dataset.splits.get("val"):
    evaluate = make_validation_fn(config, dataset.split("val"), make_denoiser, normalization, slab)
  stages.append(Stage(name="denoiser", num_steps=config.train.num_steps, init_state=denoiser_init,
                      train_step=denoiser_step, make_data=denoiser_data, evaluate=evaluate,
                      best_metric=config.train.get("best_metric"),
                      best_mode=config.train.get("best_mode", "max")))

  def noise_report(states: Dict, dataset) -> dict:
    """Synthetic vs real LDCT noise on the test patients (and the two baselines)."""
    return noise_fidelity(states, dataset, add_noise, normalization, noise_std_hu,
                          int(config.eval.get("noise_max_slices", 8)), config.seed)

  description = (f"TDDL ({source} noise) + {config.model.name}"
                 f"{', paired' if cfg.paired else ''}")
  return MethodSpec(stages=stages, make_denoiser=make_denoiser, input_slab=slab,
                    description=description, extra_reports={"noise_fidelity": noise_report})


def noise_fidelity(states, dataset, add_noise, normalization, noise_std_hu, max_slices, seed):
  """Compares (pseudo-LDCT - NDCT) with (LDCT - NDCT) on test patients.

  The reference is the NDCT: the real LDCT noise relative to it is LD - ND,
  and the synthetic noise is what stage 2 adds to an NDCT image. Gaussian and
  image-domain Poisson noise are matched to the real std of LD - ND.
  """
  volumes = dataset.split("test")
  picks = [spread_slices(v.num_slices, max_slices) for v in volumes]
  nd = np.concatenate([v.arrays["nd"][pick] for v, pick in zip(volumes, picks)])
  ld = np.concatenate([v.arrays["ld"][pick] for v, pick in zip(volumes, picks)])
  state = states["denoiser"]
  x = jnp.asarray(normalization.normalize(nd))[..., None]
  synth = jax.jit(add_noise)(state.noise_params, x, jax.random.PRNGKey(seed + 17))
  pseudo_hu = np.asarray(normalization.denormalize(synth[..., 0]))
  real_std = float(np.std((ld - nd)[nd > -900]))
  key_g, key_p = jax.random.split(jax.random.PRNGKey(seed + 29))
  gaussian = nd + np.asarray(noise_stats.gaussian_noise_like(nd, real_std, key_g))
  poisson = nd + np.asarray(noise_stats.image_poisson_noise_like(nd, real_std, key_p, nd > -900))
  spacing = dataset.spacing[volumes[0].patient_id][1]
  candidates = {"synthetic": pseudo_hu, "gaussian": gaussian, "image_poisson": poisson}
  table = noise_stats.noise_fidelity_table(candidates, ld, nd, spacing)
  return {"reference": "NDCT; real noise = LDCT - NDCT; baselines matched to its std",
          "num_slices": int(nd.shape[0]), "candidates": table,
          "markdown": noise_stats.fidelity_markdown(table)}
