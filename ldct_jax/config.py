"""The shared default config that every ``configs/*.py`` starts from.

Each experiment file calls ``base_config()`` and overrides what its method
needs. Fields are commented where their meaning or unit is not obvious.
"""
import ml_collections

from ldct_jax.data.pipeline import DEFAULT_SPLIT_FRACTIONS


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # What the run is about (ldct_jax.tasks): its reader, evaluator and predict
  # command. 'ct_denoising' | 'mri_reconstruction'.
  config.task = "ct_denoising"
  config.method = "supervised"
  config.seed = 0

  # ---- data ----
  config.data = data = ml_collections.ConfigDict()
  data.root = ""               # '' = built-in simulated dataset; else a Mayo or TCIA tree
  data.layout = "auto"         # 'auto' | 'mayo' | 'tcia'
  # TDDL only: a tree of LOW-DOSE series (no full-dose partner needed; its
  # full-dose series, if any, are never read) whose noise the VAE learns,
  # while the NDCT comes from data.root. '' = the noise patients of data.root.
  data.noise_root = ""
  data.noise_layout = "auto"   # 'auto' | 'mayo' | 'tcia' | 'flat' (a folder of series)
  data.thickness = "1mm"       # Mayo: '1mm' or '3mm' series
  data.patients = ()           # restrict to these patient ids (empty = all)
  data.cache_dir = ""          # built-in dataset cache ('' = $LDCT_JAX_CACHE or ~/.cache/ldct_jax)
  # extra_doses: more low-dose series per patient (dose0.100_1mm, ...) from the
  # same full-dose photons; kernel: the FBP filter of every series (ramp,
  # shepp-logan, cosine, hamming, hann: another noise texture).
  data.builtin = ml_collections.ConfigDict(dict(
      num_patients=8, num_slices=32, size=256, dose_fraction=0.25, seed=0,
      kernel="ramp", extra_doses=()))
  # Blind training (supervised method, built-in data): each training patch
  # takes its LDCT from one of these dose fractions, drawn uniformly per patch;
  # each must be builtin.dose_fraction or in builtin.extra_doses. () = off;
  # validation and evaluation stay on the dose_fraction series.
  data.blind_doses = ()
  data.split = ml_collections.ConfigDict(dict(
      fractions=DEFAULT_SPLIT_FRACTIONS,  # patient-level train/val/test
      seed=0,
      # JSON split list. 'auto': the root's splits.json if it ships one (the
      # built-in data does, stratified by region), else the fractions above;
      # '' forces the fractions.
      file="auto"))
  data.patch_size = 64         # the papers' 64x64 patches
  data.slab = 1                # adjacent slices per input (1 = 2D; 3/5/7 for 3D models)
  data.batch_size = 16         # GLOBAL batch; divisible by the device count
  data.augment = True          # random flips / rot90
  data.skip_air_fraction = 0.9  # resample patches with more than this fraction of air
  # Network inputs are (HU + 1024) / 4096: [-1024, 3072] HU -> [0, 1], as in the
  # public RED-CNN / WGAN-VGG code, so the papers' learning rates carry over.
  # The map is inverted exactly before any metric is computed.
  data.normalization = ml_collections.ConfigDict(dict(kind="affine", shift=-1024.0, scale=4096.0))

  # ---- model / loss / optimiser ----
  config.model = ml_collections.ConfigDict(dict(name="redcnn"))
  config.loss = ml_collections.ConfigDict(dict(name="l2", kwargs={}))
  config.optim = ml_collections.ConfigDict(dict(
      name="adam", lr=1e-4, schedule="cosine", warmup_steps=0, end_lr_factor=0.1,
      grad_clip=0.0, b1=0.9, b2=0.999))

  # ---- training loop ----
  config.train = ml_collections.ConfigDict(dict(
      num_steps=1000, log_every=50, eval_every=250, checkpoint_every=250,
      keep_checkpoints=3, stop_at=0, tensorboard=True,
      best_metric="val/psnr", best_mode="max",
      # Multi-host: steps between all-host checks of SIGTERM (train/loop.py).
      preemption_check_every=10))

  # ---- evaluation ----
  config.eval = ml_collections.ConfigDict(dict(
      # PSNR/SSIM per window; the first drives validation. 'abdomen' (C40/W400)
      # is [-160, 240] HU, the RED-CNN/WGAN-VGG papers' metric range.
      windows=("abdomen", "lung"),
      split="test",              # 'test' | 'val' | 'train' | 'all' (e.g. another data root)
      batch_size=8,              # whole slices per inference batch
      max_slices=0,              # 0 = every slice
      val_max_slices=8,          # slices per validation patient during training
      classical="auto",          # 'auto' (BM3D if installed, else NLM) | 'bm3d' | 'nlm' | 'none'
      # Texture columns against NDCT (ldct_jax/texture.py), in the first window:
      # 'lpips' (LPIPS-VGG), 'nps' (NPS error in flat soft tissue), 'glcm' (GLCM
      # property differences), 'hf_ratio' (high-frequency power ratio); () = none.
      # Cost per 256^2 slice with 3 rows, 2 busy CPU cores: LPIPS 1.8 s (a VGG16
      # pass per row plus one for the NDCT), the other three 0.06 s together.
      texture=("lpips", "nps", "glcm", "hf_ratio"),
      after_training=True))
  return config


def set_step_budget(config: ml_collections.ConfigDict, steps: int,
                    validations: int) -> ml_collections.ConfigDict:
  """An experiment's step budget: ``steps`` training steps with ``validations``
  evenly spaced validations and checkpoints (the last at the end). 0 keeps the
  config's own schedule. Returns ``config`` (changed in place)."""
  if steps:
    every = max(1, steps // validations)
    config.train.update(dict(num_steps=steps, eval_every=every, checkpoint_every=every))
  return config
