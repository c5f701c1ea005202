"""Does TDDL's noise VAE make pseudo-LDCT whose noise looks like real LDCT noise?

Run by hand (CPU, one process):

  python experiments/tddl_noise_check.py --out /tmp/tddl_noise_check.json

What it does, on the built-in data (4 patients x 16 slices, 256^2, nested
full/quarter dose):

1. Trains a ``NoiseVAE`` on 64^2 LDCT patches of two "noise" patients
   (SIM001 abdomen, SIM002 chest), LDCT only: each batch goes through
   ``vae.noise_batch`` (bilateral noise extraction), as the TDDL method does.
2. On the two other patients (SIM003, SIM004) makes pseudo-LDCT =
   ``vae.synthesize(NDCT)`` for every slice.
3. Compares noises with ``noise_stats.noise_fidelity_table``.

The fair comparison. The NDCT is not noise-free, and the VAE noise is added on
top of the NDCT's own noise; the real LDCT is nested in the NDCT (the same
photons thinned), so the noise that turns this NDCT into this LDCT is
``LD - ND``, of variance ``var_LD - var_ND``. So every candidate is
``ND + added noise`` and every noise is taken against the NDCT as reference:
the candidate's ``pseudo - ND`` (the added noise) against ``LD - ND``.

* VAE: ``synthesize(..., noise_gain=sqrt(1 - 0.25) * sample_gain)``; the
  first factor follows from the dose ratio alone (noise variance ~ 1 / dose),
  the second is TDDL's level calibration (the training LDCT noise's rms over
  the VAE samples' rms, EMAs over training: LDCT of the noise patients
  only), never from the paired data. The VAE is conditioned on
  ``physics.ct.fbp_noise_log_std`` of each slice (``--noise_map 0`` drops
  it; ``--calibrate 0`` drops the calibration). The defaults mirror
  configs/tddl.py: likelihood and calibration on flat pixels
  (``--flat_edge_hu``/``--level_edge_hu`` 40), level from the map
  (``--level_from_map 1``), no structure in the decoder's FiLM
  (``--structure_film 0``).
* Gaussian and image-Poisson baselines: std matched to ``std(LD - ND)`` in
  the body, which uses the paired data, so they get the overall level for
  free; the VAE has to find it.
* "independent scan" (a floor, not a candidate): ``ND + (LD' - ND')`` with
  ``(ND', LD')`` a second simulation of the same phantoms, i.e. real noise of
  the right kind that is not the reference's own realisation. No method can
  be expected to beat it; it shows the metrics' sampling noise.

Printed: a markdown table (std-vs-HU relative error, radial NPS relative L2,
NPS peak frequency, Wasserstein-1 of body noise values, body std) and the
training time; everything goes to ``--out`` as JSON.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ldct_jax import noise_stats as ns
from ldct_jax.data import builtin, datasets, pipeline
from ldct_jax.methods import tddl
from ldct_jax.models import vae
from ldct_jax.physics import ct

# The default normalisation, as configs/tddl.py uses; the VAE takes it as an
# argument (its own scales are in HU).
NORM = pipeline.Normalization()
NOISE_PATIENTS = ("SIM001", "SIM002")
EVAL_PATIENTS = ("SIM003", "SIM004")
DOSE_FRACTION = 0.25


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="tddl_noise_check.json", help="JSON results path")
  parser.add_argument("--steps", type=int, default=500)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--patch", type=int, default=64)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--kl_warmup", type=int, default=0)
  parser.add_argument("--free_bits", type=float, default=0.0)
  parser.add_argument("--latent_channels", type=int, default=4)
  parser.add_argument("--features", type=int, default=16)
  parser.add_argument("--num_down", type=int, default=0)
  parser.add_argument("--sigma_mode", default="fixed", choices=vae.SIGMA_MODES)
  parser.add_argument("--fixed_sigma", type=float, default=0.3)
  parser.add_argument("--range_factor", type=float, default=5.0,
                      help="bilateral range scale of vae.extract_noise")
  parser.add_argument("--noise_map", type=int, default=1,
                      help="1: condition the VAE on physics.ct.fbp_noise_log_std of the slice")
  parser.add_argument("--calibrate", type=int, default=1,
                      help="1: scale samples to the training noise level (TDDL's sample_gain)")
  parser.add_argument("--flat_edge_hu", type=float, default=40.0,
                      help="VAE likelihood on pixels whose structure gradient < this (0: all)")
  parser.add_argument("--level_edge_hu", type=float, default=40.0,
                      help="level calibration on pixels whose structure gradient < this (0: all)")
  parser.add_argument("--level_from_map", type=int, default=1,
                      help="1: the VAE's local scale is the physics map's (NoiseVAE.level_from_map)")
  parser.add_argument("--structure_film", type=int, default=0,
                      help="1: the decoder's FiLM also sees the structure (NoiseVAE.structure_film)")
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args()


def load_data():
  """The built-in dataset (volumes in HU, per-patient spacing)."""
  data_cfg = ml_collections.ConfigDict(
      {"builtin": {"num_patients": 4, "num_slices": 16},
       "patients": list(NOISE_PATIENTS + EVAL_PATIENTS)})
  return datasets.load_dataset(data_cfg)


def train_vae(model, dataset, patients, args):
  """Adam on the negative ELBO over LDCT patches; returns params and a log."""
  keys = ("ld", "noise_map") if args.noise_map else ("ld",)
  volumes = [dataset.volumes[p] for p in patients]
  stream = pipeline.make_patch_dataset(
      [pipeline.Volume(v.patient_id, {
          "ld": v.arrays["ld"],
          "noise_map": tddl.noise_map_of(v.arrays["ld"],
                                         tddl.in_plane_pixel_size(dataset, v.patient_id))})
       for v in volumes],
      keys=keys, raw_keys=keys[1:], patch_size=args.patch, batch_size=args.batch,
      seed=args.seed, normalization=NORM, num_threads=1)
  optimizer = optax.adam(args.lr)
  loss_fn = functools.partial(vae.elbo_loss, model=model, free_bits=args.free_bits)

  @jax.jit
  def step(params, opt_state, moments, ld, nmap, key, step_index):
    batch = vae.noise_batch(ld, nmap, normalization=NORM, range_factor=args.range_factor,
                            flat_edge_hu=args.flat_edge_hu)
    kl_weight = vae.kl_weight_schedule(step_index, args.kl_warmup, 1.0)
    loss_key, level_key = jax.random.split(key)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch, loss_key, kl_weight)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    # The level calibration of methods/tddl.py: EMAs of the mean squares.
    new = vae.level_moments(params, batch, level_key, model=model, edge_hu=args.level_edge_hu)
    moments = vae.update_level_moments(moments, new, step_index == 0)
    return params, opt_state, moments, metrics

  @jax.jit
  def sample_std_hu(params, ld, nmap, key):
    # Prior samples vs the data: a decoder that only reconstructs posterior
    # codes shows a good ELBO but draws noise of the wrong level.
    batch = vae.noise_batch(ld, nmap, normalization=NORM, range_factor=args.range_factor)
    draw = model.apply(params, batch["condition"], key, method=vae.NoiseVAE.sample)
    return NORM.scale * jnp.std(draw), NORM.scale * jnp.std(batch["noise"])

  key = jax.random.PRNGKey(args.seed)
  first = next(stream)
  first_batch = vae.noise_batch(first["ld"], first.get("noise_map"), normalization=NORM)
  params = model.init(key, first_batch["noise"], first_batch["condition"], key, train=True)
  opt_state = optimizer.init(params)
  moments = (jnp.ones(()), jnp.ones(()))
  log, start = [], time.time()
  for i in range(args.steps):
    batch = first if i == 0 else next(stream)
    ld, nmap = batch["ld"], batch.get("noise_map")
    params, opt_state, moments, metrics = step(params, opt_state, moments, ld, nmap,
                                               jax.random.fold_in(key, i), i)
    if i % 50 == 0 or i == args.steps - 1:
      metrics = {k: float(v) for k, v in metrics.items()}
      metrics["sample_std_hu"], metrics["data_std_hu"] = map(
          float, sample_std_hu(params, ld, nmap, jax.random.fold_in(key, 1_000_000 + i)))
      metrics.update(step=i, seconds=round(time.time() - start, 1))
      log.append(metrics)
      print(f"step {i:5d}  loss {metrics['loss']:8.3f}  kl/px {metrics['kl']:.3f}  "
            f"recon rmse {metrics['recon_rmse_hu']:.1f} HU  sigma {metrics['sigma_hu']:.1f} HU  "
            f"sample/data std {metrics['sample_std_hu']:.1f}/{metrics['data_std_hu']:.1f} HU  "
            f"({metrics['seconds']:.0f} s)", flush=True)
  stream.close()
  sample_gain = float(vae.sample_gain(moments)) if args.calibrate else 1.0
  print(f"sample level calibration: x{sample_gain:.3f}", flush=True)
  return params, sample_gain, log, time.time() - start


def pseudo_ldct(model, params, nd_hu, pixel_size, key, noise_gain, range_factor, batch=8):
  """NDCT (D, H, W) HU -> pseudo-LDCT (D, H, W) HU through ``vae.synthesize``."""
  norm = model.normalization
  synth = jax.jit(functools.partial(vae.synthesize, model=model, noise_gain=noise_gain,
                                    range_factor=range_factor))
  out = []
  for start in range(0, nd_hu.shape[0], batch):
    nd = jnp.asarray(norm.normalize(nd_hu[start:start + batch]))[..., None]
    nmap = jnp.asarray(tddl.noise_map_of(nd_hu[start:start + batch], pixel_size))[..., None]
    out.append(np.asarray(norm.denormalize(
        synth(params, nd, jax.random.fold_in(key, start), noise_map=nmap)))[..., 0])
  return np.concatenate(out)


def independent_scan_noise(dataset, key):
  """``LD' - ND'`` of a second simulation of the evaluation phantoms, HU."""
  spec = builtin.BuiltinSpec(num_patients=4, num_slices=16)
  noises = []
  for i, patient in enumerate(EVAL_PATIENTS):
    truth = dataset.ground_truth(patient)
    full, low = np.asarray(ct.simulate_dose_levels(
        truth, (1.0, spec.dose_fraction), jax.random.fold_in(key, i),
        incident_flux=spec.incident_flux, electronic_noise_std=spec.electronic_noise_std,
        pixel_size=tddl.in_plane_pixel_size(dataset, patient)))
    noises.append(low - full)
  return np.concatenate(noises)


def main():
  args = parse_args()
  dataset = load_data()
  model = vae.NoiseVAE(normalization=NORM, latent_channels=args.latent_channels, features=args.features,
                       num_down=args.num_down, sigma_mode=args.sigma_mode,
                       fixed_sigma=args.fixed_sigma, use_noise_map=bool(args.noise_map),
                       level_from_map=bool(args.noise_map and args.level_from_map),
                       structure_film=bool(args.structure_film or not args.noise_map))
  params, sample_gain, log, train_seconds = train_vae(model, dataset, NOISE_PATIENTS, args)
  print(f"trained {args.steps} steps in {train_seconds:.0f} s", flush=True)

  nd = np.concatenate([dataset.volumes[p].arrays["nd"] for p in EVAL_PATIENTS])
  ld = np.concatenate([dataset.volumes[p].arrays["ld"] for p in EVAL_PATIENTS])
  key = jax.random.PRNGKey(args.seed + 1)
  keys = jax.random.split(key, 4)
  body = ns.body_mask(nd)
  target_std = float((ld - nd)[body].std())
  gain = math.sqrt(1.0 - DOSE_FRACTION) * sample_gain
  # Per-slice pixel spacing of the evaluation patients (the NPS needs it).
  pixel_size = np.concatenate([
      np.full(dataset.volumes[p].num_slices, tddl.in_plane_pixel_size(dataset, p))
      for p in EVAL_PATIENTS])
  vae_noisy = np.concatenate([
      pseudo_ldct(model, params, dataset.volumes[p].arrays["nd"],
                  tddl.in_plane_pixel_size(dataset, p), jax.random.fold_in(keys[0], i), gain,
                  args.range_factor)
      for i, p in enumerate(EVAL_PATIENTS)])
  candidates = {
      "VAE": vae_noisy,
      "Gaussian (matched std)": nd + np.asarray(ns.gaussian_noise_like(nd, target_std, keys[1])),
      "image Poisson (matched std)": nd + np.asarray(
          ns.image_poisson_noise_like(nd, target_std, keys[2], body)),
      "independent scan (floor)": nd + independent_scan_noise(dataset, keys[3]),
  }
  table = ns.noise_fidelity_table(candidates, ld, nd, pixel_size)
  print(f"\nnoise = image - NDCT, eval patients {EVAL_PATIENTS}, {nd.shape[0]} slices, "
        f"pixel {np.unique(pixel_size).round(3).tolist()} mm; VAE noise gain {gain:.3f}\n")
  print(ns.fidelity_markdown(table))
  result = {"args": vars(args), "pixel_size_mm": np.unique(pixel_size).tolist(),
            "normalization": NORM.to_config(), "train_seconds": train_seconds,
            "train_log": log, "noise_gain": gain, "target_std_hu": target_std,
            "table": table}
  pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
