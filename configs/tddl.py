r"""TDDL (Chen et al., ISICDM 2020): VAE-learnt LDCT noise -> pseudo pairs -> GCN denoiser.

The main job. Default (built-in data, 2-core CPU, about 7 min):
  python -m ldct_jax.main --config=configs/tddl.py
Stages: noise VAE on the LDCT of half the training patients (LDCT only), then
a GCN denoiser (Chen et al., ICONIP 2020) on pseudo-LDCT made online from the
NDCT of the other half, then evaluation on true test pairs plus a noise
fidelity report (synthetic vs real LDCT noise, with Gaussian/Poisson baselines).
Measured (2026-12-01, this command in a fresh clone; test patients SIM007/SIM008,
data range 1): abdomen window [-160, 240] HU 33.56 -> 36.67 dB, lung 41.30 ->
44.79 dB, RMSE 13.66 -> 9.18 HU, in 7:10 (dataset cached);
`experiments/tddl_ablation.py` compares noise sources and denoisers (README).

Variants:
  :paper     paper-scale GCN (32 ch, 3 blocks, 16 neighbours, 49x49 search) and
             long schedules; needs a GPU.
  :redcnn    the same pipeline with a RED-CNN denoiser.
  :gaussian / :poisson   the baselines TDDL argues against (no VAE stage).
  :paired    noise and NDCT patients are the same (ablation).
  :site      a site's own scanner, no pairs: the VAE learns the noise of the
             low-dose series under data.noise_root (Mayo or TCIA tree, or a
             folder of series; full-dose series there are never read), the
             denoiser trains on data.root's NDCT (built-in by default) plus that
             noise, and the last checkpoint is kept (no site pairs to select by):
               python -m ldct_jax.main --config=configs/tddl.py:site \
                   --config.data.noise_root=/data/my_ldct
               python -m ldct_jax.main --workdir=<printed workdir> --mode=denoise \
                   --input=/data/my_ldct/<series> --output=/data/denoised/<series>
             tddl.noise_gain (0.866 = a quarter-dose LDCT over a full-dose
             NDCT) should be sqrt(1 - LDCT dose / NDCT dose) of the protocols.
"""
import ml_collections

from ldct_jax.config import base_config


def get_config(variant: str = ""):
  config = base_config()
  config.method = "tddl"
  config.tddl = tddl = ml_collections.ConfigDict()
  tddl.noise_source = "vae"    # 'vae' | 'gaussian' | 'poisson'
  tddl.noise_fraction = 0.5    # share of training patients whose LDCT teaches the noise
  tddl.paired = False          # True: the same patients give LDCT and NDCT (ablation)
  tddl.noise_std_hu = 0.0      # baselines' noise std; 0 = estimate from the noise patients' LDCT
  tddl.site = False            # True (':site'): data.noise_root is required
  # The NDCT already carries full-dose noise, so the added noise is scaled by
  # sqrt(1 - dose_LD / dose_ND) (quarter dose: 0.866) to give LDCT-level noise
  # in total; it uses the protocol's dose ratio, not paired data.
  tddl.noise_gain = 0.866
  tddl.range_factor = 5.0      # bilateral range (x noise std) of the LDCT noise extraction
  tddl.bilateral_radius = 3    # bilateral window half-width (px) of the extraction
  tddl.bilateral_sigma = 1.5   # bilateral spatial sigma (px)
  # Noise VAE: full-resolution linear-in-z decoder with a fixed residual
  # sigma, so the latent must carry the (spatially correlated) noise; see
  # docs/noise_vae.md for why a learned sigma collapses to white noise.
  # use_noise_map conditions it on the slice's FBP noise map
  # (physics.ct.fbp_noise_log_std), which sets the noise level from the
  # attenuation along every ray, not from the local HU alone; samples are
  # scaled to the training LDCT's noise level (methods/tddl.py,
  # NoiseModelState.sample_gain).
  tddl.vae = ml_collections.ConfigDict(dict(
      model=dict(latent_channels=4, features=16, num_down=0, fixed_sigma=0.3,
                 use_noise_map=True, level_from_map=True,
                 structure_film=False),
      num_steps=500, batch_size=16, patch_size=64,
      # The likelihood sees only pixels far from edges (structure gradient
      # < flat_edge_hu HU/px; 0 = all), the level is the physics map's
      # (level_from_map) calibrated on the same pixels (level_edge_hu), and
      # the generative path sees the map only (structure_film=False): trained
      # on every pixel the VAE took lung texture for noise (test chest
      # 1.3-1.5x too strong); this way abdomen/chest come out 0.92x/1.03x and
      # the NPS peak matches (table in docs/noise_vae.md).
      flat_edge_hu=40.0,
      level_edge_hu=40.0,
      kl_warmup_steps=0, kl_weight=1.0, free_bits=0.0,
      optim=dict(name="adam", lr=3e-3, schedule="cosine", end_lr_factor=0.1, grad_clip=1.0)))

  # The denoiser: GCN sized for a 2-core CPU (the paper's is 32 ch, 3 blocks).
  config.model = ml_collections.ConfigDict(dict(
      name="gcn", features=16, num_blocks=2, k=8, search_window=11, rank=11, search_patch=0))
  config.data.update(dict(patch_size=32, batch_size=16))
  config.optim.update(dict(lr=1e-3, schedule="cosine", end_lr_factor=0.05, grad_clip=1.0))
  config.train.update(dict(num_steps=1000, log_every=50, eval_every=500, checkpoint_every=250))
  config.eval.noise_max_slices = 8  # test slices per patient for the noise fidelity report

  if variant == "paper":
    config.model.update(dict(features=32, num_blocks=3, k=16, search_window=49))
    config.data.update(dict(patch_size=64, batch_size=32))
    config.tddl.vae.update(dict(num_steps=20_000))
    config.tddl.vae.model.update(dict(features=32))
    config.optim.update(dict(lr=1e-4, end_lr_factor=0.1))
    config.train.update(dict(num_steps=100_000, eval_every=2000, checkpoint_every=2000))
  elif variant == "redcnn":
    config.model = ml_collections.ConfigDict(dict(name="redcnn", features=32, kernel_size=3,
                                                  num_layers=5))
    config.data.patch_size = 48
  elif variant in ("gaussian", "poisson"):
    config.tddl.noise_source = variant
  elif variant == "paired":
    config.tddl.paired = True
  elif variant == "site":
    # "I have LDCT folders from my scanner and no pairs": the VAE learns the
    # noise of every low-dose series under data.noise_root (required), the
    # NDCT of every training patient of data.root (built-in by default) make
    # the pseudo pairs. No pairs of the site exist, so no checkpoint is picked
    # by another scanner's validation pairs: eval/denoise use the last one.
    config.tddl.site = True
    config.train.best_metric = ""
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of configs/tddl.py "
                     "(known: paper, redcnn, gaussian, poisson, paired, site)")
  return config
