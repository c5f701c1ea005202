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
import json
from typing import Dict

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax.training import train_state

from ldct_jax import models, noise_stats
from ldct_jax.evaluation import make_validation_fn, spread_slices
from ldct_jax.data.pipeline import Normalization, Volume, make_patch_dataset
from ldct_jax.errors import InputError
from ldct_jax.methods import MethodSpec, bind_denoiser, supervised
from ldct_jax.models import vae as vae_lib
from ldct_jax.physics import ct
from ldct_jax.train.logging import log
from ldct_jax.train.loop import Stage
from ldct_jax.train.optim import make_optimizer
from ldct_jax.windows import BODY_THRESHOLD_HU

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
                            **extract_kwargs) -> float:
  """Body noise std (HU) of LDCT from LDCT alone, via the VAE's noise extraction.

  ``extract_kwargs`` go to ``vae.extract_noise`` (TDDL passes its bilateral
  settings, ``extract_settings``).
  """
  stds = []
  for volume in volumes:
    ld = volume.arrays["ld"][spread_slices(volume.num_slices, max_slices)]
    x = jnp.asarray(normalization.normalize(ld))[..., None]
    noise, _ = vae_lib.extract_noise(x, normalization=normalization, **extract_kwargs)
    body = ld > BODY_THRESHOLD_HU
    stds.append(float(np.std(np.asarray(noise[..., 0])[body])) * normalization.scale)
  return float(np.mean(stds))


def noise_map_of(hu: np.ndarray, pixel_size: float, chunk: int = 16) -> np.ndarray:
  """``fbp_noise_log_std`` of ``(D, H, W)`` HU slices: ``(D, H, W)`` float32."""
  return np.concatenate([np.asarray(ct.fbp_noise_log_std(hu[i:i + chunk], pixel_size=pixel_size))
                         for i in range(0, hu.shape[0], chunk)])


def in_plane_pixel_size(dataset, patient_id: str) -> float:
  """Mean of the row and column spacing (mm) of a scan."""
  return float(np.mean(dataset.spacing[patient_id][1:]))


def make_noise_fn(source: str, normalization: Normalization, noise_std_hu: float, vae_model=None,
                  *, noise_gain: float = 1.0, extract_kwargs=None):
  """``(aux, nd_norm, rng, noise_map=None) -> pseudo_ld_norm`` for a batch.

  Batches are NHWC or NDHWC slabs. ``aux`` holds, for 'vae', the frozen VAE
  ``{'variables', 'sample_gain'}`` (jit arguments, not baked-in constants)
  and is ignored otherwise; ``noise_map`` (shaped like the batch) is the VAE's physics
  condition (``vae_model.use_noise_map``), ignored by the baselines.
  """
  std = noise_std_hu / normalization.scale

  def per_slice(fn, nd, noise_map, rng):
    if nd.ndim == 5:  # slabs: noise every slice independently
      b, k = nd.shape[:2]
      flat = lambda x: None if x is None else x.reshape((b * k,) + x.shape[2:])
      return fn(flat(nd), flat(noise_map), rng).reshape(nd.shape)
    return fn(nd, noise_map, rng)

  if source == "vae":
    def add(aux, nd, rng, noise_map=None):
      return per_slice(lambda x, m, r: vae_lib.synthesize(
          aux["variables"], x, r, model=vae_model, noise_map=m,
          noise_gain=noise_gain * aux["sample_gain"], **(extract_kwargs or {})),
          nd, noise_map, rng)
  elif source == "gaussian":
    def add(aux, nd, rng, noise_map=None):
      del aux, noise_map
      return nd + noise_stats.gaussian_noise_like(nd, std, rng)
  elif source == "poisson":
    def add(aux, nd, rng, noise_map=None):
      del aux
      def one(x, m, r):
        del m
        hu = normalization.denormalize(x)
        mask = hu > BODY_THRESHOLD_HU
        return x + noise_stats.image_poisson_noise_like(hu, noise_std_hu, r, mask) / normalization.scale
      return per_slice(one, nd, None, rng)
  else:
    raise ValueError(f"tddl.noise_source must be one of {NOISE_SOURCES}, got {source!r}")
  return add


def extract_settings(cfg) -> dict:
  """``vae.extract_noise`` keywords from the ``config.tddl`` section."""
  return {"range_factor": float(cfg.range_factor),
          "radius": int(cfg.get("bilateral_radius", 3)),
          "spatial_sigma": float(cfg.get("bilateral_sigma", 1.5))}


class NoiseModelState(train_state.TrainState):
  """The VAE's train state plus EMAs of the training noise's and the samples' mean squares."""
  data_mean_square: jax.Array = None
  sample_mean_square: jax.Array = None

  def sample_gain(self) -> jax.Array:
    return vae_lib.sample_gain((self.data_mean_square, self.sample_mean_square))


class DenoiserState(supervised.TrainState):
  """The denoiser's train state plus the frozen noise-model parameters it samples from."""
  noise_params: flax.core.FrozenDict = flax.core.FrozenDict()


# Fields of ``config.data`` read only by the denoiser's patch stream, not by
# the noise model (whose patch size and batch are in ``config.tddl.vae``).
_DENOISER_ONLY_DATA_FIELDS = ("patch_size", "batch_size", "augment", "slab")


def noise_model_fingerprint(config) -> str:
  """What the noise-model stage's result depends on, as a canonical JSON string.

  Stage 1 reads ``config.tddl``, ``config.data`` (patients, splits,
  normalisation, air skipping) except the denoiser's patch-stream fields, and
  ``config.seed`` (it is always stage 0). Runs with equal fingerprints train
  the identical VAE, so a finished one can be reused: the ablation shares it
  between denoisers instead of retraining it per arm.
  """
  data = {k: v for k, v in config.data.to_dict().items() if k not in _DENOISER_ONLY_DATA_FIELDS}
  return json.dumps({"tddl": config.tddl.to_dict(), "data": data, "seed": int(config.seed)},
                    sort_keys=True, default=str)


def build(config, dataset) -> MethodSpec:
  cfg = config.tddl
  source = cfg.noise_source
  extract = extract_settings(cfg)
  normalization = Normalization.from_config(config.data.normalization)
  slab = int(config.data.get("slab", 1))
  denoiser = models.get_model(config.model)
  # The VAE's scales are in HU; the normalisation says what its inputs mean.
  vae_model = vae_lib.NoiseVAE(normalization=normalization, **dict(cfg.vae.model))
  # The physics condition exists only for the VAE; the baselines need none.
  use_map = source == "vae" and vae_model.use_noise_map
  map_keys = ("noise_map",) if use_map else ()
  denoise, inference_variables = supervised.make_inference(denoiser)

  if tuple(config.data.get("blind_doses", ()) or ()):
    raise InputError("data.blind_doses trains on true pairs at several doses (the supervised "
                     "method); TDDL's pseudo pairs take the dose from tddl.noise_gain")
  noise_root = str(config.data.get("noise_root", "") or "")
  if cfg.get("site", False) and not noise_root:
    raise InputError("configs/tddl.py:site learns the noise of your scanner's low-dose "
                     "series: give their folder as --config.data.noise_root=/path/to/ldct")
  if noise_root and cfg.paired:
    raise InputError("tddl.paired=True takes noise and NDCT from the same patients; it "
                     f"cannot be combined with data.noise_root={noise_root!r}")
  noise_ids = clean_ids = ()
  if dataset is not None and noise_root:
    # The site workflow: every training patient of data.root gives NDCT;
    # the noise patients are the series of the noise root (read lazily).
    clean_ids = tuple(sorted(dataset.splits["train"]))
  elif dataset is not None:
    noise_ids, clean_ids = partition_train_patients(dataset.splits["train"], cfg.noise_fraction,
                                                    cfg.paired)
  loaded_noise_data = []

  def noise_dataset():
    """Where the noise patients' LDCT lives: ``data.noise_root`` (low-dose
    series only; nothing else of that tree is read) or ``data.root``."""
    if not noise_root:
      return dataset
    if not loaded_noise_data:
      from ldct_jax.data import datasets, dicom  # deferred: the DICOM stack
      layout = config.data.get("noise_layout", "auto")
      if layout == "auto":
        layout = dicom.detect_layout(noise_root)
      # Mayo folders are named by thickness (quarter_1mm); a site's own TCIA
      # tree or folder of series is taken at whatever thickness it has.
      thickness = config.data.get("thickness", "1mm") if layout == "mayo" else None
      loaded = datasets.load_unpaired(noise_root, dose="low", layout=layout, thickness=thickness)
      log(f"TDDL noise patients: {len(loaded.volumes)} low-dose scan(s) from {noise_root} "
          f"({loaded.layout} layout)")
      loaded_noise_data.append(loaded)
    return loaded_noise_data[0]

  def volumes(patients, key, with_map=False, source=None):
    """The training scans of ``patients`` in ``source`` (default ``dataset``),
    keeping only the ``key`` images.

    ``with_map`` adds each slice's ``noise_map`` (``fbp_noise_log_std`` of
    the ``key`` image itself, by reprojection with the scan's own pixel size:
    LDCT for the noise patients, NDCT for the clean ones; no other scan is used).
    """
    source = dataset if source is None else source
    wanted = set(patients)
    out = []
    for v in source.split("train"):
      if source.patient_of.get(v.patient_id, v.patient_id) in wanted:
        arrays = {key: v.arrays[key]}
        if with_map:
          arrays["noise_map"] = noise_map_of(v.arrays[key], in_plane_pixel_size(source, v.patient_id))
        out.append(Volume(v.patient_id, arrays))
    return out

  def noise_volumes(with_map=False):
    """LDCT scans of the noise patients (all of ``data.noise_root`` when set)."""
    source = noise_dataset()
    ids = source.splits["train"] if noise_root else noise_ids
    return volumes(ids, "ld", with_map, source=source)

  # ---- stage 1: the noise VAE on LDCT of the noise patients ----
  vae_steps = int(cfg.vae.num_steps)
  vae_tx = make_optimizer(cfg.vae.optim, vae_steps)
  patch = int(cfg.vae.patch_size)

  def vae_init(rng, previous):
    del previous
    x = jnp.zeros((1, patch, patch, 1), jnp.float32)
    condition = jnp.zeros((1, patch, patch, vae_model.condition_channels), jnp.float32)
    params = vae_model.init(rng, x, condition, rng, train=True)["params"]
    return NoiseModelState.create(apply_fn=vae_model.apply, params=params, tx=vae_tx,
                                  data_mean_square=jnp.ones((), jnp.float32),
                                  sample_mean_square=jnp.ones((), jnp.float32))

  def vae_step(state, batch, rng):
    vae_batch = vae_lib.noise_batch(batch["ld"], batch.get("noise_map"),
                                    normalization=normalization,
                                    flat_edge_hu=float(cfg.vae.flat_edge_hu), **extract)
    kl_weight = vae_lib.kl_weight_schedule(state.step, int(cfg.vae.kl_warmup_steps),
                                           float(cfg.vae.kl_weight))
    loss_fn = functools.partial(vae_lib.elbo_loss, model=vae_model,
                                free_bits=float(cfg.vae.free_bits))
    loss_rng, level_rng = jax.random.split(rng)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        {"params": state.params}, vae_batch, loss_rng, kl_weight)
    state = state.apply_gradients(grads=grads["params"])
    # The level is calibrated on pixels whose extracted noise can be trusted
    # (``tddl.vae.level_edge_hu``), which need not be the likelihood's.
    new = vae_lib.level_moments({"params": state.params}, vae_batch, level_rng, model=vae_model,
                                edge_hu=float(cfg.vae.get("level_edge_hu", 0.0)))
    # The first step (state.step is 1 after it) replaces the placeholder 1s.
    data_ms, sample_ms = vae_lib.update_level_moments(
        (state.data_mean_square, state.sample_mean_square), new, state.step == 1)
    state = state.replace(data_mean_square=data_ms, sample_mean_square=sample_ms)
    return state, {**metrics, "kl_weight": kl_weight, "sample_gain": state.sample_gain()}

  def vae_data(previous):
    del previous
    return make_patch_dataset(noise_volumes(use_map), keys=("ld",) + map_keys,
                              raw_keys=map_keys, patch_size=patch,
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
        noise_volumes(), normalization, **extract)
  add_noise = make_noise_fn(source, normalization, noise_std_hu, vae_model,
                            noise_gain=float(cfg.noise_gain), extract_kwargs=extract)
  loss_fn = supervised.make_loss_fn(config.loss)
  tx = make_optimizer(config.optim, config.train.num_steps)
  paired_step = supervised.make_train_step(denoiser, loss_fn)

  def denoiser_init(rng, previous):
    base = supervised.create_train_state(
        denoiser, tx, rng, supervised.input_shape(config.data, config.data.patch_size))
    if source == "vae":
      noise_state = previous["noise_model"]
      noise_params = {"variables": {"params": noise_state.params},
                      "sample_gain": noise_state.sample_gain()}
    else:
      noise_params = flax.core.FrozenDict()
    return DenoiserState(step=base.step, apply_fn=base.apply_fn, params=base.params, tx=tx,
                         opt_state=base.opt_state, batch_stats=base.batch_stats,
                         noise_params=noise_params)

  def denoiser_step(state, batch, rng):
    synth_rng, step_rng = jax.random.split(rng)
    pseudo = {"ld": add_noise(state.noise_params, batch["nd"], synth_rng, batch.get("noise_map")),
              "nd": batch["nd"]}
    return paired_step(state, pseudo, step_rng)

  def denoiser_data(previous):
    del previous
    return make_patch_dataset(volumes(clean_ids, "nd", use_map), keys=("nd",) + map_keys,
                              raw_keys=map_keys,
                              patch_size=config.data.patch_size, slab=slab,
                              batch_size=config.data.batch_size, seed=config.seed + 1,
                              normalization=normalization, augment=config.data.augment,
                              skip_air_fraction=config.data.skip_air_fraction)

  evaluate = None
  if dataset is not None and _paired(dataset.split("val")):
    evaluate = make_validation_fn(config, dataset.split("val"),
                                  bind_denoiser(denoise, inference_variables), normalization, slab)
  stages.append(Stage(name="denoiser", num_steps=config.train.num_steps, init_state=denoiser_init,
                      train_step=denoiser_step, make_data=denoiser_data, evaluate=evaluate,
                      best_metric=config.train.get("best_metric"),
                      best_mode=config.train.get("best_mode", "max")))

  def noise_report(states: Dict, dataset) -> dict:
    """Synthetic vs real LDCT noise on the test patients (and the two baselines)."""
    # The level the baseline arms train with (their noise_std_hu), also for
    # a VAE run, so that every report shows the same baseline rows.
    split = "test" if dataset.splits.get("test") else config.eval.get("split", "test")
    if not _paired(dataset.split(split)):
      return {"skipped": f"no LDCT/NDCT pairs in the {split!r} split of {dataset.root}",
              "markdown": "(no paired test scans: noise fidelity not measured)"}
    level_hu = noise_std_hu
    if level_hu <= 0:
      level_hu = cfg.noise_gain * estimate_noise_level_hu(noise_volumes(), normalization,
                                                         **extract)
    return noise_fidelity(states, dataset, add_noise, normalization, level_hu,
                          int(config.eval.get("noise_max_slices", 8)), config.seed, use_map,
                          split=split)

  description = (f"TDDL ({source} noise) + {config.model.name}"
                 f"{', paired' if cfg.paired else ''}")
  return MethodSpec(stages=stages, denoise=denoise, inference_variables=inference_variables,
                    input_slab=slab,
                    description=description, extra_reports={"noise_fidelity": noise_report})


def _paired(volumes) -> bool:
  """Whether ``volumes`` is non-empty and every scan has both LDCT and NDCT."""
  return bool(volumes) and all({"ld", "nd"} <= set(v.arrays) for v in volumes)


def noise_fidelity(states, dataset, add_noise, normalization, noise_std_hu, max_slices, seed,
                   use_map, split: str = "test"):
  """Compares (pseudo-LDCT - NDCT) with (LDCT - NDCT) on the ``split`` patients.

  The reference is the NDCT: the real LDCT noise relative to it is LD - ND,
  and the synthetic noise is what stage 2 adds to an NDCT image. Gaussian and
  image-domain Poisson noise appear twice: matched to the real std of the
  test patients' LD - ND ('gaussian', 'image_poisson': an oracle level, from
  the paired test data no method has), and at ``noise_std_hu``, the level
  estimated from the noise patients' LDCT that the baseline arms train with
  ('*_ldct_level'). The synthetic noise gets no paired data at all; its
  'synthetic_matched' row rescales it to the oracle std like the baselines,
  to compare shapes at equal variance.

  Each patient's slices keep their own pixel spacing (``in_plane_pixel_size``,
  as for the noise map): the noise power spectra of patients scanned at
  different fields of view are pooled on common frequency bins in mm^-1
  (``noise_stats.radial_noise_nps``).
  """
  volumes = dataset.split(split)
  picks = [spread_slices(v.num_slices, max_slices) for v in volumes]
  nd = np.concatenate([v.arrays["nd"][pick] for v, pick in zip(volumes, picks)])
  ld = np.concatenate([v.arrays["ld"][pick] for v, pick in zip(volumes, picks)])
  state = states["denoiser"]
  x = jnp.asarray(normalization.normalize(nd))[..., None]
  spacing = np.concatenate([np.full(len(pick), in_plane_pixel_size(dataset, v.patient_id))
                            for v, pick in zip(volumes, picks)])
  noise_map = (jnp.asarray(np.concatenate([
      noise_map_of(v.arrays["nd"][pick], in_plane_pixel_size(dataset, v.patient_id))
      for v, pick in zip(volumes, picks)]))[..., None] if use_map else None)
  synth = jax.jit(add_noise)(state.noise_params, x, jax.random.PRNGKey(seed + 17), noise_map)
  pseudo_hu = np.asarray(normalization.denormalize(synth[..., 0]))
  # The table's own body mask: the rows matched to the real std then show
  # exactly the real body std, and per-patient stds agree with the pooled one.
  body = noise_stats.body_mask(nd)
  real_noise, added = ld - nd, pseudo_hu - nd
  real_std = float(np.std(real_noise[body]))
  key_g, key_p = jax.random.split(jax.random.PRNGKey(seed + 29))
  candidates = {"synthetic": pseudo_hu}
  # The synthetic noise rescaled to the real std, as the baselines are: at
  # equal variance the rows compare the noise's shape (spectrum, histogram,
  # HU dependence) alone.
  candidates["synthetic_matched"] = nd + added * (real_std / float(np.std(added[body])))
  for suffix, std in (("", real_std), ("_ldct_level", noise_std_hu)):
    candidates["gaussian" + suffix] = nd + np.asarray(
        noise_stats.gaussian_noise_like(nd, std, key_g))
    candidates["image_poisson" + suffix] = nd + np.asarray(
        noise_stats.image_poisson_noise_like(nd, std, key_p, body))
  table = noise_stats.noise_fidelity_table(candidates, ld, nd, spacing)
  # Body noise std per patient: a level error specific to one anatomy (e.g.
  # lung texture taken for noise) averages out in the pooled rows.
  per_patient, start = {}, 0
  for volume, pick in zip(volumes, picks):
    rows = slice(start, start + len(pick))
    start += len(pick)
    per_patient[volume.patient_id] = {
        "synthetic_std_hu": float(np.std(added[rows][body[rows]])),
        "real_std_hu": float(np.std(real_noise[rows][body[rows]]))}
  return {"per_patient_body_std": per_patient,
          "reference": ("NDCT; real noise = LDCT - NDCT; 'gaussian'/'image_poisson' matched to "
                        f"its std ({real_std:.1f} HU, oracle), '*_ldct_level' at the level "
                        f"estimated from the noise patients' LDCT ({noise_std_hu:.1f} HU)"),
          "num_slices": int(nd.shape[0]), "candidates": table,
          "markdown": noise_stats.fidelity_markdown(table)}
