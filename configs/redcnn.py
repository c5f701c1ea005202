r"""RED-CNN (Chen et al., IEEE TMI 2017): supervised LDCT -> NDCT on 64x64 patches, MSE loss.

Default (sized for a 2-core CPU: ~13 min with the dataset cached, 0.32 s/step on
an idle machine; built-in simulated quarter-dose data):
  python -m ldct_jax.main --config=configs/redcnn.py --workdir=runs/redcnn
Expected: on the held-out built-in patients, RED-CNN beats the LDCT input by
~3.1 dB PSNR in the abdomen window [-160, 240] HU (33.56 -> 36.71 dB) and
non-local means by ~1 dB (README has the measured table).

Paper settings (96 channels, 5x5 kernels, lr 1e-4, long schedule; needs a GPU):
  python -m ldct_jax.main --config=configs/redcnn.py:paper --config.data.root=/data/mayo2016

Blind across doses (issue #12; built-in data only): the default RED-CNN, but each
training patch takes its LDCT from one of the doses 0.05, 0.1, 0.25 and 0.5 of the
full dose, drawn uniformly per patch (data.blind_doses; the built-in data gains
dose0.050/0.100/0.500 series made from the same full-dose photons, a new cached
dataset whose quarter-dose and full-dose images equal the default one's).
Validation and evaluation use the quarter dose, as the default run's do:
  python -m ldct_jax.main --config=configs/redcnn.py:blind --workdir=runs/redcnn_blind
Other doses: --config.data.blind_doses='(0.1,0.25)' with every dose but 0.25 in
--config.data.builtin.extra_doses. No measured result yet.
"""
from ldct_jax.config import base_config


def get_config(variant: str = ""):
  config = base_config()
  # Sized for a 2-core CPU: 32 channels and 3x3 kernels (the paper: 96, 5x5)
  # on 48^2 patches; same 5 conv + 5 deconv wiring and shortcuts.
  config.model.update(dict(name="redcnn", features=32, kernel_size=3, num_layers=5))
  config.data.patch_size = 48
  config.optim.update(dict(lr=1e-3, schedule="cosine", end_lr_factor=0.05, grad_clip=1.0))
  config.train.update(dict(num_steps=2000, log_every=50, eval_every=500, checkpoint_every=500))
  if variant == "paper":
    config.model.update(dict(features=96, kernel_size=5))
    config.data.patch_size = 64
    config.optim.update(dict(lr=1e-4, end_lr_factor=1e-1, grad_clip=0.0))
    config.data.batch_size = 128
    config.train.update(dict(num_steps=100_000, eval_every=2000, checkpoint_every=2000))
  elif variant == "blind":
    config.data.blind_doses = (0.05, 0.1, 0.25, 0.5)
    config.data.builtin.extra_doses = (0.05, 0.1, 0.5)  # 0.25 is dose_fraction
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of configs/redcnn.py (known: paper, blind)")
  return config
