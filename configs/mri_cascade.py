r"""Deep cascade CNN for undersampled MRI (Schlemper et al., IEEE TMI 2017).

  python -m ldct_jax.main --config=configs/mri_cascade.py
  python -m ldct_jax.main --config=configs/mri_cascade.py --config.mri.acceleration=8
  python -m ldct_jax.main --config=configs/mri_cascade.py --config.data.root=/data/singlecoil_train
  python -m ldct_jax.main --workdir=runs/<run> --mode=eval --config.data.root=DIR \
      --config.eval.split=all
  python -m ldct_jax.main --workdir=runs/<run> --mode=reconstruct --input=FILE_OR_DIR \
      --output=DIR

Trains at R = 4 with a 1D random (fastMRI RandomMaskFunc) mask on the
built-in data (MNI152 T1 slices and MR phantoms as noisy single-coil k-space
in the fastMRI format, split by subject), then evaluates zero-filled, CS-TV
(λ and iterations from a validation sweep) and the cascade on the test
subjects. The CPU default is a D5-C5 cascade (n_c = 5 cascades of n_d = 5
conv layers, noiseless data consistency) with 32 filters instead of the
paper's 64, sized to about 20 minutes on 2 CPU cores (measured 1.17 s/step on
an idle 2-core CPU: ~20 min of training, then the evaluation); ``:paper`` is D5-C5
at 64 filters with more steps, for a GPU.

Measured (2026-12-01, experiments/mri_acceleration.py, 4 test subjects, loaded
2-core CPU, ~70 min per run there): R=4 PSNR 24.58 dB / SSIM 0.760 (CS-TV
23.07 / 0.730, zero-filled 19.45 / 0.473); R=8 20.26 / 0.607 (CS-TV 19.40 /
0.552). CS-TV still wins on the MNI brain, the one real anatomy (README, "MRI").

Variants: ``:paper`` (GPU size), ``:shared`` (one CNN shared by every
cascade), ``:noisy_dc`` (the noisy data-consistency layer, λ learnt).
"""
import ml_collections

from ldct_jax.config import base_config

VARIANTS = ("paper", "shared", "noisydc")


def get_config(variant: str = ""):
  parts = [p for p in variant.split("_") if p]
  unknown = [p for p in parts if p not in VARIANTS]
  if unknown:
    raise ValueError(f"unknown variant {variant!r} of configs/mri_cascade.py (known: "
                     f"{', '.join(VARIANTS)}, combined with '_')")
  config = base_config()
  config.task = "mri_reconstruction"
  config.method = "mri_supervised"
  config.mri = ml_collections.ConfigDict(dict(
      acceleration=4.0,
      mask="random",           # 'random' (fastMRI RandomMaskFunc) | 'equispaced' | 'variable_density_2d'
      center_fraction=0.0,     # fully sampled centre; 0 = fastMRI's (0.08 at R=4, 0.04 at R=8)
      eval_mask_seed=0,        # evaluation masks: one per volume, seeded by its file name and this
  ))
  config.model = ml_collections.ConfigDict(dict(
      name="deep_cascade", num_cascades=5, depth=5, features=32, share_weights=False,
      remat=False, noisy_dc=False))
  config.loss = ml_collections.ConfigDict(dict(name="l2", kwargs={}))
  config.data.batch_size = 4
  config.data.train_shape = ()  # (H, W) to fit slices of differently sized files to
  # The built-in data (ldct_jax/data/builtin_mri.py): the MNI152 brain (always a
  # test subject) and 15 T1/T2/PD phantoms, 16 slices each at 128x128, complex
  # noise of 1% of the volume max; split by subject 9/3/4.
  config.data.builtin_mri = ml_collections.ConfigDict(dict(
      num_phantoms=15, slices_per_subject=16, size=128, noise_level=0.01, include_mni=True,
      readout_oversampling=1, seed=0))
  config.optim.update(dict(lr=1e-3, schedule="cosine", end_lr_factor=0.05, grad_clip=1.0))
  config.train.update(dict(num_steps=1000, log_every=50, eval_every=250, checkpoint_every=250))
  config.eval.update(dict(
      classical="cs_tv",       # 'cs_tv' | 'none'
      # CS-TV grid, swept on validation slices (the best PSNR is used on the test split).
      cs_lambdas=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
      cs_iters=(25, 50, 100, 200),
      cs_sweep_volumes=2, cs_sweep_slices=4,
      batch_size=4, val_max_slices=4, max_slices=0))
  if "paper" in parts:
    config.model.features = 64
    config.data.batch_size = 8
    config.train.update(dict(num_steps=20000, eval_every=1000, checkpoint_every=1000))
    config.optim.lr = 1e-4
  if "shared" in parts:
    config.model.share_weights = True
  if "noisydc" in parts:
    config.model.noisy_dc = True
  return config
