r"""CPCA-1 (Shan et al. 2017 / IEEE TMI 2018): CPCE-2D trained as a WGAN-GP generator with a VGG loss.

Generator: CPCE-2D, the conveying-path encoder-decoder (4 VALID 3x3 convs,
4 transposed convs, 3 conveying paths with 1x1 reductions, 32 channels, no
bias; models/cpce.py). Critic, losses and schedule as configs/wgan_vgg.py
(methods/wgan.py): L_G = -E[D(G(x))] + 0.1 * L_VGG, gradient penalty 10,
4 critic updates per generator update, best checkpoint by validation LPIPS.
This is also the first stage of the 2D -> 3D transfer of configs/cpca3d.py
(its ':k<k>_tf' variants), which can start from a finished run of this config
(experiments/cpca_transfer.py does).

Default (2-core CPU, built-in data; the paper's generator, the critic at half
width, 48^2 patches, 8 per update; configs/wgan_vgg.py's 1000-step MSE warm
start and 1200 adversarial steps, generator Adam 1e-5, critic 1e-4):
  python -m ldct_jax.main --config=configs/cpca.py --workdir=runs/cpca
  python -m ldct_jax.main --workdir=runs/cpca --mode=eval --checkpoint=latest
Measured (2026-12-01, experiments/cpca_transfer.py at 400 warm-up + 200
adversarial steps, test split, 8 slices per patient; README "Texture"): 35.16
dB abdomen PSNR, LPIPS 0.0469, HF power ratio 0.76 (RED-CNN at the same 600
updates 35.76 / 0.0470 / 0.74). At generator lr 1e-4 the validation PSNR swung
between 15 and 30 dB from one checkpoint to the next (best by LPIPS 32.21 dB,
LPIPS 0.044, HF 0.88; last 16.23 dB). Without the warm start (lr 1e-4), 200
steps validated at 19.3 dB, below the LDCT input.
Seed (Mayo, quarter dose, 512^2): CPCA-1 29.62 dB / SSIM 0.8976 / perceptual
2.37, against RED-CNN 31.39 / 0.9194 / 4.31.

Variants:
  :paper  a GPU run at the paper's settings: full-width critic, 64^2 patches,
          batch 128, Adam lr 1e-4 (b1 0.5, b2 0.9), 10 epochs of the paper's
          128k patches (10k steps). Not run.
"""
import ml_collections

from configs import wgan_vgg


def get_config(variant: str = ""):
  if variant not in ("", "paper"):
    raise ValueError(f"unknown variant {variant!r} of configs/cpca.py (known: paper)")
  # configs/wgan_vgg.py's critic, losses, CPU sizes and checkpointing, with the
  # CPCE-2D generator.
  config = wgan_vgg.get_config(variant)
  config.model = ml_collections.ConfigDict(dict(name="cpce2d", features=32, num_layers=4))
  # Adam with WGAN-GP's moments. :paper: the CPCA paper's 1e-4 for both networks
  # (from random weights, batch 128). CPU: configs/wgan_vgg.py's rates (the
  # generator fine-tunes its MSE warm start at 1e-5, the critic at 1e-4). The 2D
  # stage of a transfer run uses the same (wgan.pretrain_optim).
  if variant == "paper":
    config.optim.lr = 1e-4
    config.wgan.critic_optim.lr = 1e-4
  config.wgan.pretrain_optim = ml_collections.ConfigDict(config.optim.to_dict())
  if variant == "paper":
    config.train.update(dict(num_steps=10_000, eval_every=1000, checkpoint_every=1000))
  return config
