"""Conditional VAE over low-dose CT noise, for TDDL (Chen et al., ISICDM 2020).

TDDL learns the noise of real low-dose CT (LDCT) from LDCT images alone,
then adds sampled noise to normal-dose (NDCT) images of other patients to make
pseudo-LDCT/NDCT training pairs. This module holds the three pieces:

1. ``extract_noise``: splits an LDCT image into ``structure + noise`` with no
   paired NDCT.
2. ``NoiseVAE``: a VAE over the noise field, conditioned on the local image
   content so that the noise level and texture follow attenuation.
3. ``elbo_loss`` / ``kl_weight_schedule`` for training, ``synthesize`` for
   making pseudo-LDCT images.

All arrays are NHWC with one channel, in network units (HU + 1024) / 4096
(``data.pipeline.Normalization``'s default): a noise of d HU is d / 4096.

Noise extraction: why a bilateral filter. FBP noise in LDCT is mostly high
frequency (the ramp filter lifts it; on the built-in data a Gaussian blur of
sigma 1.5 px keeps ~99% of the noise's correlation with itself in its
residual), while anatomy has edges of hundreds of HU. A linear low-pass
``S`` would move those edges into ``LDCT - S(LDCT)``: on the built-in data the
residual of a Gaussian blur correlates 0.96 with the edges of the noise-free
image and only 0.21 with the noise. The bilateral filter (Tomasi & Manduchi,
1998) averages a pixel only with neighbours of similar value, so it smooths
noise (tens of HU) but not edges; its residual correlates ~0.74 with the true
noise (0.80-0.84 in the abdomen, 0.60-0.67 in the chest, where lung vessels
are small, low-noise structures) and ~0.0 with the edges. A guided/joint
bilateral (range weights from a pre-smoothed image) was tried and leaks edges
(correlation 0.2-0.4); a median filter would remove the noise's sign
structure. What the bilateral cannot separate: noise at frequencies below its
spatial kernel (small for FBP noise), and fine texture of contrast below the
range scale, which ends up as "noise".

Which pixels teach the VAE (``flat_weight``): the likelihood sees only
body pixels far from edges of the structure estimate (gradient below 40
HU/px within 3 px); the KL still covers every latent, so the loss is the
ELBO of the observed pixels. On the built-in data the residual over those
pixels has the true LDCT noise's std in the chest (16.0 vs 16.0 HU) and
0.93x it in the abdomen (the bilateral's flat-region low-pass), while over
the whole chest body it is 1.27x (20.0 vs 15.7 HU: lung vessels leak in).

The level, and why TDDL's default takes it from the physics map
(``level_from_map``), keeps local HU out of the generative path
(``structure_film=False``) and learns from flat pixels only. Three things
set how strong the samples are: the local scale ``s(c)``, the decoder's
amplitude (its FiLM), and the ``sample_gain`` calibration (``level_moments``
over ``tddl.vae.level_edge_hu`` pixels). Measured on the test patients of
the TDDL default run (SIM007 abdomen / SIM008 chest, 500 VAE steps; body
std of synthetic / real LD - ND noise, then std-vs-HU error, NPS rel. L2,
NPS peak (real: 0.206 mm^-1) and W1; 2026-11-21):

  likelihood  s(c)          FiLM sees   gain   abdomen  chest       HU     NPS    peak   W1
  all         learnt (map)  structure   all    -        1.32-1.48x  0.110  0.360  0.251  3.12
  all         learnt (map)  structure   flat   0.95x    1.33x       0.108  0.247  0.251  1.62
  all         map only      structure   flat   0.95x    1.30x       0.108  0.251  0.251  1.51
  all         map only      structure   all    1.05x    1.45x       0.112  0.361  0.251  3.00
  flat        map only      structure   flat   0.95x    0.90x       0.191  0.240  0.206  1.59
  all         map only      map only    flat   -        -           0.196  0.271  0.251  1.84
  flat        map only      map only    flat   0.92x    1.03x       0.089  0.199  0.206  0.50

Whenever the likelihood sees the lung's texture the chest comes out ~1.3x
too strong and the NPS peaks too high: the decoder learns "lung looks
noisier" (through its structure FiLM, or, without it, by making all noise
more textured). On flat pixels alone the texture stays out, but a FiLM that
sees the structure must then extrapolate to the edges and lung it never
saw; with the map as the only condition of the generative path nothing
needs extrapolating, and every statistic is best (last row; Gaussian and
image-Poisson noise at the real std score 0.323/0.325/1.29 and
0.219/0.350/0.50). The GCN trained on the FiLM-on-structure flat variant
(row 5) denoised worse than on the all-pixel default of row 1 (test
abdomen/lung PSNR 35.70/43.06 vs 35.97/44.13 dB). The remaining ~5% deficit
is the bilateral's flat-region low-pass; a wider bilateral (spatial sigma 3
px, radius 6) put smooth anatomy into the "noise" instead (NPS peak at 0.023
mm^-1, rel. L2 1.16), so sigma stays 1.5 px. What the map-only path cannot
learn: noise texture tied to local anatomy (e.g. streaks from bone), which
the map's per-slice ray physics only captures as a level.

Range scale: ``range_factor`` (default 3) times a robust per-image noise
estimate, the median absolute difference of horizontally adjacent body pixels
(Gaussian-consistent MAD, divided by sqrt(2)). Pixels outside the body (air
below ``body_threshold``) are left out of the estimate: their noise is lower
and would dominate it in a mostly-air image.

The VAE's output distribution: ``p(n | z, c) = N(s(c) g(z, c), sigma^2)``
per pixel, with ``g`` the decoder, ``s(c) = noise_scale exp(h(c))`` a local
noise scale computed from the condition only (so the noise level follows
attenuation), and ``sigma`` the white residual.

The condition. Channel 0 is the structure estimate (local HU). With
``use_noise_map`` a second channel holds ``physics.ct.fbp_noise_log_std`` of
the whole slice: the log of the FBP noise std implied by the line integrals
through each pixel. It enters ``log s(c)`` additively with a learnt weight
that starts at 1 (the physics), plus the learnt local correction ``h(c)``.
Why: CT noise is set by the attenuation along every ray through a pixel,
i.e. by the whole slice, not by the pixel's HU. Trained on 64^2 patches of
two patients with the structure alone, the VAE got the noise level of two
other patients 26% too low (18.3 vs 25.2 HU body std; their bodies attenuate
more), while the map predicts the std of simulated FBP noise within ~4%
across a phantom (tests/test_physics_noise_map.py).

Why ``sigma`` is fixed (``sigma_mode='fixed'``, the default). The first
version learnt ``sigma`` (the sigma-VAE of Rybkin et al., ICML 2021) and
collapsed on the built-in noise: in the linear-Gaussian view ``n = A z +
eps``, ``eps ~ N(0, sigma^2 I)``, maximum likelihood may put all the
variance in ``sigma`` (white), KL -> 0, ``z`` unused, samples white noise.
With ``sigma`` fixed well below the noise, the ELBO optimum needs ``A A^T ~
Sigma_n - sigma^2 I``: the decoder becomes the colouring filter of the noise
(FBP noise is filtered white sinogram noise) and prior samples are correlated
like the data. ``sigma = fixed_sigma * noise_scale`` is absolute, NOT in
units of the learnt ``s(c)``: tied to ``s(c)`` it was not fixed at all --
the model inflated ``s(c)`` ~15x and the "fixed" residual carried the noise
again (25 HU residual std, decoder 14 HU reconstruction error, on 16 HU
noise). ``fixed_sigma = 0.3`` (4.8 HU) rather than 0.1: both reconstruct, but
at 0.1 the KL is ~3x higher (4 vs 1.5 nats/pixel) and the prior samples
reach the data's level more slowly (sample/data std after 200 steps on the
built-in LDCT patches: 0.55 at 0.1 with lr 2e-3, 0.87 at 0.3 with lr 3e-3;
on the tiny test problem at one lr, 0.41 vs 0.52 after 100 steps). ``'learned'`` keeps the
old behaviour for comparison.

Why the decoder is linear in ``z`` (``linear_decoder=True``): for a fixed
condition ``p(n | c)`` is then exactly Gaussian with covariance ``A(c) A(c)^T
+ sigma^2 I``, so prior samples carry the covariance the ELBO fitted, with no
"holes" between posterior codes; FBP noise, a sum over many rays, is close to
Gaussian, so nothing is lost. The condition still enters the decoder through
``s(c)`` and a multiplicative FiLM (no shift), so it never adds signal and
spatial noise structure has to come from ``z``.

Other guards: the KL weight may be annealed from 0 (``kl_weight_schedule``;
with a fixed ``sigma`` collapse is impossible and no warm-up trained best) and
optional free bits keep a floor of KL per latent channel; ``sample`` draws
from the full model, ``s(c) g(z, c) + sigma eps``.

Known limitation (measured): prior samples are under-dispersed -- 0.55x the
training noise's std after 200 steps, 0.85x after 500 on the built-in data,
and no closer by 500 steps. Matching the per-channel variance of the
aggregate posterior (an "ex-post" prior) does not help: it is already ~1
(measured 0.998-1.014). What the decoder relies on and N(0, I) lacks is the
spatial correlation of posterior codes (the encoder sees overlapping 7x7
windows). TDDL therefore calibrates the sample level on its training LDCT
(``level_moments``; ``methods/tddl.py``); the spectrum's shape is the VAE's.
Also tried and dropped: undoing the extraction's low-pass on the samples
(``1 / |1 - g^(f)|``, the bilateral's flat-region response) -- the low
frequencies of the extracted noise are mostly leaked texture, not lost
noise, and boosting them tripled the NPS error.

The decoder upsamples by nearest-neighbour repetition followed by a 3x3 conv
rather than a strided transposed conv: transposed convs leave checkerboard
artefacts, which would appear as a spurious peak in the noise power spectrum
-- exactly the statistic the synthetic noise is judged on.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from ldct_jax.models.layers import Conv

Array = jax.Array

# Default body threshold: -900 HU in network units ((HU + 1024) / 4096).
# Air is -1000 HU; lung parenchyma (~-850 HU) still counts as body.
BODY_THRESHOLD = (-900.0 + 1024.0) / 4096.0
# Gaussian consistency constant of the median absolute deviation.
_MAD_TO_STD = 1.4826
SIGMA_MODES = ("fixed", "learned")


# fbp_noise_log_std subtracted from the map before the networks see it:
# its value at the centre of a ~26 cm water-equivalent body (mu_water x 13 cm).
NOISE_MAP_OFFSET = 2.5


def _check_nhwc1(x: Array, name: str) -> None:
  if x.ndim != 4 or x.shape[-1] != 1:
    raise ValueError(f"{name} must be (batch, height, width, 1), got {x.shape}")


def make_condition(structure: Array, noise_map: Optional[Array] = None) -> Array:
  """The VAE's condition: the structure estimate, plus the noise map channel if given."""
  _check_nhwc1(structure, "structure")
  if noise_map is None:
    return structure
  _check_nhwc1(noise_map, "noise_map")
  if noise_map.shape != structure.shape:
    raise ValueError(f"noise_map {noise_map.shape} does not match the image {structure.shape}")
  return jnp.concatenate([structure, noise_map.astype(structure.dtype)], axis=-1)


def estimate_noise_std(image: Array, body_threshold: float = BODY_THRESHOLD) -> Array:
  """Robust per-image noise std from adjacent-pixel differences in the body.

  ``1.4826 median(|x[i, j+1] - x[i, j]|) / sqrt(2)`` over pairs whose both
  pixels exceed ``body_threshold``. For white noise this is the noise std;
  FBP noise is anti-correlated at one pixel lag, so it overestimates it by a
  constant factor (~1.3 on the built-in data), which ``range_factor`` in
  ``extract_noise`` absorbs. Edges are a small fraction of pairs and do not
  move the median.

  Args:
    image: ``(B, H, W, 1)`` network units.
    body_threshold: pixels at or below it (air) are ignored, network units.

  Returns:
    ``(B, 1, 1, 1)`` noise std estimate, network units. Images without body
    pixels fall back to all pixels.
  """
  _check_nhwc1(image, "image")
  diff = image[:, :, 1:] - image[:, :, :-1]
  inside = (image[:, :, 1:] > body_threshold) & (image[:, :, :-1] > body_threshold)
  has_body = jnp.any(inside, axis=(1, 2, 3), keepdims=True)
  inside = inside | ~has_body
  mad = jnp.nanmedian(jnp.where(inside, jnp.abs(diff), jnp.nan), axis=(1, 2, 3),
                      keepdims=True)
  return _MAD_TO_STD * mad / math.sqrt(2.0)


def bilateral_filter(image: Array, range_sigma: Array, radius: int = 3,
                     spatial_sigma: float = 1.5) -> Array:
  """Edge-preserving bilateral filter (Tomasi & Manduchi 1998), NHWC.

  ``S(x)_p = sum_q w_pq x_q / sum_q w_pq`` over the ``(2 radius + 1)^2``
  window, ``w_pq = exp(-|p - q|^2 / (2 spatial_sigma^2)) exp(-(x_q - x_p)^2 /
  (2 range_sigma^2))``. Borders are reflected.

  Args:
    image: ``(B, H, W, C)``.
    range_sigma: scalar or broadcastable to ``(B, 1, 1, 1)``, same units as
      ``image``.
    radius: window half-width, pixels.
    spatial_sigma: pixels.

  Returns:
    The filtered image, same shape.
  """
  height, width = image.shape[1:3]
  padded = jnp.pad(image, ((0, 0), (radius, radius), (radius, radius), (0, 0)),
                   mode="reflect")
  # Floor (1e-6 network units = 0.004 HU): a noise-free image has a zero
  # noise estimate, and 0.5 / 0 would turn the weights into NaN.
  inv_two_var = 0.5 / jnp.maximum(jnp.square(range_sigma), 1e-12)
  numerator = jnp.zeros_like(image)
  denominator = jnp.zeros_like(image)
  # A static loop over taps: each is a shifted slice, no gather; XLA fuses
  # the whole loop into one elementwise kernel.
  for dy in range(-radius, radius + 1):
    for dx in range(-radius, radius + 1):
      spatial = math.exp(-(dy * dy + dx * dx) / (2.0 * spatial_sigma**2))
      neighbour = padded[:, radius + dy:radius + dy + height,
                         radius + dx:radius + dx + width]
      weight = spatial * jnp.exp(-jnp.square(neighbour - image) * inv_two_var)
      numerator = numerator + weight * neighbour
      denominator = denominator + weight
  return numerator / denominator


@functools.partial(jax.jit, static_argnames=("radius", "spatial_sigma"))
def extract_noise(ld_norm: Array, noise_std: Optional[Array] = None, *,
                  range_factor: float = 3.0, radius: int = 3,
                  spatial_sigma: float = 1.5,
                  body_threshold: float = BODY_THRESHOLD) -> Tuple[Array, Array]:
  """Splits LDCT images into ``(noise, structure)`` with no paired NDCT.

  ``structure`` is the bilateral filter of the image (see the module
  docstring for why), ``noise = ld_norm - structure``.

  Args:
    ld_norm: ``(B, H, W, 1)`` LDCT images, network units.
    noise_std: optional known noise std (network units, scalar or
      ``(B, 1, 1, 1)``); default ``estimate_noise_std`` per image.
    range_factor: range sigma of the bilateral = ``range_factor *
      noise_std``. Larger removes more noise but lets weaker edges through.
    radius: bilateral window half-width, pixels.
    spatial_sigma: bilateral spatial sigma, pixels.
    body_threshold: air threshold for the noise estimate, network units.

  Returns:
    ``(noise, structure)``, both ``(B, H, W, 1)`` network units, summing to
    ``ld_norm``.
  """
  _check_nhwc1(ld_norm, "ld_norm")
  if noise_std is None:
    noise_std = estimate_noise_std(ld_norm, body_threshold)
  structure = bilateral_filter(ld_norm, range_factor * noise_std, radius,
                               spatial_sigma)
  return ld_norm - structure, structure


def flat_weight(structure: Array, edge_hu: float = 40.0, radius: int = 3,
                body_threshold: float = BODY_THRESHOLD) -> Array:
  """1 where the extracted noise can be trusted, else 0: ``(B, H, W, 1)`` float32.

  A pixel counts when it is inside the body and, within ``radius`` pixels,
  the structure estimate's gradient (central differences) stays below
  ``edge_hu`` HU per pixel. Near edges and in fine texture (lung vessels)
  the bilateral residual holds structure as well as noise; measured on the
  built-in chest patients, the residual's std over the whole body is 27%
  above the true LDCT noise's (20.0 vs 15.7 HU), over these flat pixels
  equal to it (16.0 vs 16.0; 35-70% of the body qualifies at 40 HU/px).
  ``edge_hu <= 0`` trusts every pixel.
  """
  _check_nhwc1(structure, "structure")
  if edge_hu <= 0:
    return jnp.ones_like(structure)
  hu = 4096.0 * structure[..., 0]
  padded = jnp.pad(hu, ((0, 0), (1, 1), (1, 1)), mode="edge")
  grad_y = 0.5 * (padded[:, 2:, 1:-1] - padded[:, :-2, 1:-1])
  grad_x = 0.5 * (padded[:, 1:-1, 2:] - padded[:, 1:-1, :-2])
  steepest = jax.lax.reduce_window(
      jnp.hypot(grad_y, grad_x), -jnp.inf, jax.lax.max, (1, 2 * radius + 1, 2 * radius + 1),
      (1, 1, 1), ((0, 0), (radius, radius), (radius, radius)))
  flat = (steepest < edge_hu) & (structure[..., 0] > body_threshold)
  return flat.astype(jnp.float32)[..., None]


def noise_batch(ld_norm: Array, noise_map: Optional[Array] = None, *, flat_edge_hu: float = 0.0,
                **extract_kwargs) -> dict:
  """A VAE training batch from LDCT images: ``{'noise', 'condition', 'weight'}``.

  The condition is the structure estimate, as ``synthesize`` uses the
  structure estimate of the NDCT image, so the two see the same kind of
  smooth input; ``noise_map`` (``(B, H, W, 1)``, ``fbp_noise_log_std`` of
  the whole slices the patches come from) is appended as a second channel.
  ``weight`` is ``flat_weight(structure, flat_edge_hu)``: the pixels whose
  noise the likelihood sees (0 = all pixels).
  """
  noise, structure = extract_noise(ld_norm, **extract_kwargs)
  return {"noise": noise, "condition": make_condition(structure, noise_map),
          "weight": flat_weight(structure, flat_edge_hu)}


class NoiseVAE(nn.Module):
  """Conditional VAE over noise fields; see the module docstring.

  Latent: a ``(H / 2**num_down, W / 2**num_down, latent_channels)`` map, so
  each latent vector describes a neighbourhood and the decoder turns it into
  spatially correlated noise.

  Attributes:
    latent_channels: channels of the latent map.
    features: channels of the hidden conv layers.
    num_down: stride-2 downsamplings in the encoder (latent stride
      ``2**num_down``); images are padded to a multiple of it where needed.
    noise_scale: typical noise std, network units (16 HU by default, the
      body noise of the built-in quarter-dose data); the networks see and
      produce noise in these units, so their activations are O(1).
    condition_offset: network value subtracted from the condition (0.25,
    ~0 HU, water).
    condition_scale: factor applied to the condition after the offset (4:
      1 unit per 1024 HU).
    sigma_mode: ``'fixed'`` (residual std ``fixed_sigma * noise_scale``) or
      ``'learned'`` (one learnt scalar in units of ``s(c)``, the old
      sigma-VAE, which collapses on CT noise); see the module docstring.
    fixed_sigma: residual std in units of ``noise_scale`` for ``'fixed'``.
    linear_decoder: no nonlinearity on the ``z`` path of the decoder, so
      ``p(noise | c)`` is Gaussian (see the module docstring).
    use_noise_map: the condition has a second channel,
      ``fbp_noise_log_std`` of the slice (see the module docstring).
    level_from_map: the local scale is the physics alone, ``log s(c) =
      log noise_scale + b + (map - NOISE_MAP_OFFSET)`` with one learnt
      scalar ``b``: no learnt dependence on the structure channel and a
      map weight fixed at 1 (needs ``use_noise_map``; see the module
      docstring for why).
    structure_film: the decoder's FiLM sees the structure channel; False:
      only the noise map (needs ``use_noise_map``), so nothing the VAE
      learns can tie the noise's amplitude or texture to local HU.
    conv_lowering: conv lowering passed to every conv (see ``layers``).
  """

  latent_channels: int = 16
  features: int = 32
  num_down: int = 2
  noise_scale: float = 16.0 / 4096.0
  condition_offset: float = 0.25
  condition_scale: float = 4.0
  sigma_mode: str = "fixed"
  fixed_sigma: float = 0.3
  linear_decoder: bool = True
  use_noise_map: bool = False
  level_from_map: bool = False
  structure_film: bool = True
  conv_lowering: str = "auto"

  def setup(self):
    conv = functools.partial(Conv, lowering=self.conv_lowering)
    feats = self.features
    self.enc_in = conv(feats, (3, 3))
    self.enc_down = [conv(feats, (3, 3), strides=2) for _ in range(self.num_down)]
    # A 3x3 conv and 3x3 statistics after the last downsampling (a 7x7
    # receptive field at full resolution): the posterior mean of a coloured
    # noise is a deconvolution of it, wider than one 3x3 conv.
    self.enc_mid = conv(feats, (3, 3))
    self.enc_stats = conv(2 * self.latent_channels, (3, 3))
    self.cond_net = [conv(feats, (3, 3)), conv(feats, (3, 3))]
    # Starting at zero makes the initial local scale noise_scale everywhere
    # and the initial FiLM the identity.
    self.cond_log_scale = conv(1, (3, 3), kernel_init=nn.initializers.zeros)
    self.cond_film = conv(feats, (1, 1), kernel_init=nn.initializers.zeros)
    self.dec_in = conv(feats, (3, 3))
    self.dec_up = [conv(feats, (3, 3)) for _ in range(self.num_down)]
    self.dec_mix = conv(feats, (3, 3))
    self.dec_out = conv(1, (3, 3))
    if self.sigma_mode not in SIGMA_MODES:
      raise ValueError(f"sigma_mode must be one of {SIGMA_MODES}, got {self.sigma_mode!r}")
    if not self.fixed_sigma > 0:
      raise ValueError(f"fixed_sigma must be positive, got {self.fixed_sigma}")
    if self.level_from_map and not self.use_noise_map:
      raise ValueError("level_from_map needs use_noise_map=True")
    if not self.structure_film and not self.use_noise_map:
      raise ValueError("structure_film=False needs use_noise_map=True (the map is then the "
                       "only condition)")
    if self.level_from_map:
      # One global log-offset: the level's shape across pixels and patients
      # is the physics map's.
      self.level_offset = self.param("level_offset", nn.initializers.zeros, ())
    elif self.use_noise_map:
      # d log s / d log std_FBP: 1 is the physics (std proportional to the
      # map's exp), learnt so that a miscalibrated map can be corrected.
      self.noise_map_weight = self.param("noise_map_weight", nn.initializers.ones, ())
    if self.sigma_mode == "learned":
      # log sigma of the white residual, in units of the local scale s(c).
      self.log_sigma = self.param("log_sigma", nn.initializers.constant(math.log(0.1)), ())

  @property
  def stride(self) -> int:
    return 2**self.num_down

  @property
  def condition_channels(self) -> int:
    return 2 if self.use_noise_map else 1

  def _normalize_condition(self, condition: Array) -> Array:
    structure = (condition[..., :1] - self.condition_offset) * self.condition_scale
    if not self.use_noise_map:
      return structure
    return jnp.concatenate([structure, condition[..., 1:] - NOISE_MAP_OFFSET], axis=-1)

  def _condition_features(self, condition: Array) -> Array:
    h = self._normalize_condition(condition)
    if not self.structure_film:
      h = h[..., 1:]
    for layer in self.cond_net:
      h = nn.relu(layer(h))
    return h

  def _check_condition(self, condition: Array) -> None:
    if condition.ndim != 4 or condition.shape[-1] != self.condition_channels:
      raise ValueError(
          f"condition must be (batch, height, width, {self.condition_channels}) "
          f"(use_noise_map={self.use_noise_map}), got {condition.shape}")

  def _check_size(self, x: Array, name: str) -> None:
    if name == "condition":
      self._check_condition(x)
    else:
      _check_nhwc1(x, name)
    if x.shape[1] % self.stride or x.shape[2] % self.stride:
      raise ValueError(f"{name} height and width must be multiples of "
                       f"{self.stride} (2**num_down), got {x.shape[1:3]}")

  def encode(self, noise: Array, condition: Array) -> Tuple[Array, Array]:
    """Posterior ``q(z | noise, condition)``.

    Args:
      noise: ``(B, H, W, 1)`` network units; H, W multiples of ``stride``.
      condition: ``(B, H, W, C)`` local image content, network units (and
        the noise map, see ``make_condition``).

    Returns:
      ``(mean, logvar)``, each ``(B, H / stride, W / stride,
      latent_channels)``.
    """
    self._check_size(noise, "noise")
    self._check_size(condition, "condition")
    h = jnp.concatenate([noise / self.noise_scale, self._normalize_condition(condition)],
                        axis=-1)
    h = nn.relu(self.enc_in(h))
    for layer in self.enc_down:
      h = nn.relu(layer(h))
    h = nn.relu(self.enc_mid(h))
    mean, logvar = jnp.split(self.enc_stats(h), 2, axis=-1)
    # Bounded log-variance: exp overflow or a zero-variance posterior would
    # make the KL infinite early in training.
    return mean, jnp.clip(logvar, -12.0, 6.0)

  def likelihood(self, z: Array, condition: Array) -> Tuple[Array, Array]:
    """``p(noise | z, condition)`` per pixel: ``(mean, log_std)``.

    Args:
      z: ``(B, H / stride, W / stride, latent_channels)``.
      condition: ``(B, H, W, C)`` (``make_condition``), network units.

    Returns:
      ``(mean, log_std)``, each ``(B, H, W, 1)``; mean in network units,
      log_std the log of a std in network units.
    """
    self._check_size(condition, "condition")
    cond = self._condition_features(condition)
    act = (lambda x: x) if self.linear_decoder else nn.relu
    h = act(self.dec_in(z))
    for layer in self.dec_up:
      h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
      h = act(layer(h))
    # FiLM without shift: the condition modulates texture, never adds signal.
    h = h * (1.0 + self.cond_film(cond))
    h = act(self.dec_mix(h))
    # Bounded to noise_scale x [e^-3, e^3] (0.8 to 320 HU by default): an
    # unbounded exp let one bad step blow the scale up by orders of magnitude.
    if self.level_from_map:
      log_scale = (math.log(self.noise_scale) + self.level_offset
                   + condition[..., 1:] - NOISE_MAP_OFFSET)
    else:
      log_scale = (math.log(self.noise_scale)
                   + 3.0 * jnp.tanh(self.cond_log_scale(cond) / 3.0))
      if self.use_noise_map:
        log_scale = log_scale + self.noise_map_weight * (condition[..., 1:] - NOISE_MAP_OFFSET)
    mean = jnp.exp(log_scale) * self.dec_out(h)
    # Floor at 1% of the local scale so the NLL cannot run to -inf on a
    # perfectly reconstructed batch.
    if self.sigma_mode == "fixed":
      # Absolute, not in units of s(c): a residual tied to the learnt s(c)
      # is not fixed at all -- the model inflated s(c) ~15x and let the
      # "fixed" residual carry the noise again (sigma 25 HU, recon 14 HU).
      log_std = jnp.full_like(mean, math.log(self.fixed_sigma * self.noise_scale))
    else:
      log_std = log_scale + jnp.maximum(self.log_sigma, math.log(0.01))
    return mean, log_std

  def decode(self, z: Array, condition: Array) -> Array:
    """Decoder mean ``s(c) g(z, c)``: the z-driven part of the noise.

    Args:
      z: ``(B, H / stride, W / stride, latent_channels)``.
      condition: ``(B, H, W, C)`` (``make_condition``), network units.

    Returns:
      ``(B, H, W, 1)`` noise, network units, without the white residual
      (``sample`` adds it).
    """
    return self.likelihood(z, condition)[0]

  def __call__(self, noise: Array, condition: Array, rng: Optional[Array] = None,
               train: bool = False) -> Tuple[Array, Array, Array]:
    """Encodes and decodes ``noise``.

    Args:
      noise: ``(B, H, W, 1)`` network units.
      condition: ``(B, H, W, C)`` (``make_condition``), network units.
      rng: key for the reparameterised posterior sample; used when
        ``train``.
      train: sample ``z ~ q(z | noise, c)``; otherwise ``z`` is the posterior
        mean (deterministic reconstruction).

    Returns:
      ``(recon, mean, logvar)``: the decoder mean ``(B, H, W, 1)`` and the
      posterior parameters.
    """
    mean, logvar = self.encode(noise, condition)
    if train:
      if rng is None:
        raise ValueError("train=True needs an rng for the posterior sample")
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    else:
      z = mean
    return self.decode(z, condition), mean, logvar

  def sample(self, condition: Array, rng: Array, temperature: float = 1.0) -> Array:
    """Draws noise from the model: ``z ~ N(0, I)``, then ``p(noise | z, c)``.

    Any H, W: the condition is edge-padded to a multiple of ``stride`` and
    the sample cropped back.

    Args:
      condition: ``(B, H, W, C)`` (``make_condition``), network units.
      rng: PRNG key; the same key gives the same sample.
      temperature: std multiplier of both the latent prior and the white
        residual (1 = the model's distribution, 0 = deterministic).

    Returns:
      ``(B, H, W, 1)`` noise, network units.
    """
    self._check_condition(condition)
    height, width = condition.shape[1:3]
    pad_h, pad_w = -height % self.stride, -width % self.stride
    padded = jnp.pad(condition, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    latent_shape = (condition.shape[0], (height + pad_h) // self.stride,
                    (width + pad_w) // self.stride, self.latent_channels)
    key_z, key_eps = jax.random.split(rng)
    z = temperature * jax.random.normal(key_z, latent_shape, condition.dtype)
    mean, log_std = self.likelihood(z, padded)
    eps = jax.random.normal(key_eps, mean.shape, mean.dtype)
    noise = mean + temperature * jnp.exp(log_std) * eps
    return noise[:, :height, :width]


def gaussian_kl(mean: Array, logvar: Array) -> Array:
  """Elementwise ``KL(N(mean, exp(logvar)) || N(0, 1))``, nats."""
  return 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def elbo_loss(params, batch: dict, rng: Array, kl_weight, *, model: NoiseVAE,
              free_bits: float = 0.0) -> Tuple[Array, dict]:
  """Negative ELBO per pixel: reconstruction NLL + ``kl_weight`` x KL.

  ``loss = (sum NLL + kl_weight * sum KL') / (B H W)`` with the Gaussian NLL
  of ``NoiseVAE.likelihood`` (nats, network units, so it is negative for
  noise stds << 1) and ``KL'`` the KL of each latent channel, averaged over
  batch and positions, raised to at least ``free_bits`` nats ("free bits",
  Kingma et al. 2016) before summing. ``kl_weight = 1`` and ``free_bits = 0``
  give the true negative ELBO.

  Args:
    params: the model variables (``{'params': ...}``).
    batch: ``{'noise', 'condition'}`` and optionally ``'weight'`` (1 for
      the pixels the likelihood sees, default all), ``(B, H, W, C)``
      network units (``noise_batch`` makes it from LDCT images).
    rng: key for the posterior sample.
    kl_weight: scalar (may be traced; see ``kl_weight_schedule``).
    model: the ``NoiseVAE`` (static: close over it or use
      ``functools.partial``).
    free_bits: KL floor per latent element (nats), averaged per channel.

  Returns:
    ``(loss, metrics)``; metrics (per pixel unless named otherwise):
    ``loss``, ``nll``, ``kl`` (unfloored, nats/pixel), ``kl_per_latent``
    (nats per latent element), ``recon_rmse_hu`` (of the decoder mean,
    x 4096), ``sigma_hu`` (mean std of the likelihood, x 4096).
  """
  noise, condition = batch["noise"], batch["condition"]
  weight = batch.get("weight")
  weight = jnp.ones_like(noise) if weight is None else weight
  mean_z, logvar_z = model.apply(params, noise, condition, method=NoiseVAE.encode)
  z = mean_z + jnp.exp(0.5 * logvar_z) * jax.random.normal(rng, mean_z.shape, mean_z.dtype)
  recon, log_std = model.apply(params, z, condition, method=NoiseVAE.likelihood)
  nll = (0.5 * jnp.square((noise - recon) * jnp.exp(-log_std)) + log_std
         + 0.5 * math.log(2.0 * math.pi))
  # The observed pixels: every latent still pays its KL, so codes where no
  # pixel is observed fall back to the prior at no cost (the ELBO of the
  # observed pixels).
  pixels = jnp.maximum(jnp.sum(weight), 1.0)
  kl = gaussian_kl(mean_z, logvar_z)
  positions = kl.size // kl.shape[-1]
  kl_channel = jnp.mean(kl, axis=(0, 1, 2))
  kl_floored = jnp.maximum(kl_channel, free_bits) * positions
  nll_pixel = jnp.sum(weight * nll) / pixels
  kl_pixel = jnp.sum(kl) / pixels
  loss = nll_pixel + kl_weight * jnp.sum(kl_floored) / pixels
  metrics = {
      "loss": loss,
      "nll": nll_pixel,
      "kl": kl_pixel,
      "kl_per_latent": jnp.mean(kl),
      "observed_fraction": pixels / noise.size,
      "recon_rmse_hu": 4096.0 * jnp.sqrt(jnp.sum(weight * jnp.square(noise - recon)) / pixels),
      "sigma_hu": 4096.0 * jnp.mean(jnp.exp(log_std)),
  }
  return loss, metrics


def level_moments(params, batch: dict, rng: Array, *, model: NoiseVAE,
                  edge_hu: Optional[float] = None) -> Tuple[Array, Array]:
  """Mean squares of the training noise and of a model sample on the same conditions.

  ``sample_gain = sqrt(EMA(data) / EMA(sample))`` over training is the
  factor that gives samples the noise level of the training LDCT (see
  ``synthesize``). It only uses the training batch (LDCT), never paired
  data.

  Args:
    params, batch, rng, model: as ``elbo_loss``.
    edge_hu: average over ``flat_weight(structure, edge_hu)`` pixels (0:
      all), where the extracted noise can be trusted; None uses the batch's
      own ``'weight'`` (the likelihood's pixels).

  Returns:
    ``(data_mean_square, sample_mean_square)``, scalars in network units^2.
  """
  draw = model.apply(params, batch["condition"], rng, method=NoiseVAE.sample)
  if edge_hu is None:
    weight = batch.get("weight")
  else:
    weight = flat_weight(batch["condition"][..., :1], edge_hu)
  weight = jnp.ones_like(draw) if weight is None else weight
  pixels = jnp.maximum(jnp.sum(weight), 1.0)
  return (jnp.sum(weight * jnp.square(batch["noise"])) / pixels,
          jnp.sum(weight * jnp.square(draw)) / pixels)


# EMA decay of the level moments: averages about the last 50 steps.
LEVEL_EMA_DECAY = 0.98


def update_level_moments(moments: Tuple[Array, Array], new: Tuple[Array, Array],
                         first) -> Tuple[Array, Array]:
  """EMA of ``level_moments`` over training; ``first`` (may be traced) takes ``new`` as is."""
  decay = jnp.where(first, 0.0, LEVEL_EMA_DECAY)
  return tuple(decay * old + (1.0 - decay) * value for old, value in zip(moments, new))


def sample_gain(moments: Tuple[Array, Array]) -> Array:
  """``sqrt(data / sample)`` of EMA'd ``level_moments``: the factor on samples."""
  data_mean_square, sample_mean_square = moments
  return jnp.sqrt(data_mean_square / jnp.maximum(sample_mean_square, 1e-20))


def kl_weight_schedule(step, warmup_steps: int, final_weight: float = 1.0):
  """Linear KL annealing: 0 at step 0, ``final_weight`` from ``warmup_steps`` on.

  Starting at 0 lets the decoder learn to use ``z`` before the KL pulls the
  posterior to the prior (Bowman et al., 2016). jit-able (``step`` may be
  traced); ``warmup_steps <= 0`` gives ``final_weight`` at every step.
  """
  if warmup_steps <= 0:
    return jnp.asarray(final_weight, jnp.float32)
  fraction = jnp.clip(jnp.asarray(step, jnp.float32) / warmup_steps, 0.0, 1.0)
  return final_weight * fraction


def synthesize(params, ndct_norm: Array, rng: Array, *, model: NoiseVAE,
               noise_map: Optional[Array] = None, temperature: float = 1.0,
               smooth_condition: bool = True, noise_gain: float = 1.0,
               **extract_kwargs) -> Array:
  """Pseudo-LDCT images: NDCT + noise sampled from the VAE.

  Args:
    params: the model variables.
    ndct_norm: ``(B, H, W, 1)`` NDCT images, network units.
    rng: PRNG key (same key, same pseudo-LDCT).
    model: the ``NoiseVAE`` (static).
    noise_map: ``(B, H, W, 1)`` ``fbp_noise_log_std`` of the NDCT slices;
      required when ``model.use_noise_map``.
    temperature: see ``NoiseVAE.sample``.
    smooth_condition: condition on the NDCT's structure estimate
      (``extract_noise``), as in training, rather than on the NDCT itself,
      whose own noise the VAE never saw in its condition.
    noise_gain: factor on the sampled noise. The VAE learns the whole LDCT
      noise, but the NDCT already carries its own; with noise variance
      inversely proportional to dose, ``sqrt(1 - dose_LD / dose_ND)`` (0.866
      for quarter dose) gives the pseudo-LDCT the LDCT's total variance.
      TDDL also folds in the level calibration ``sample_gain`` (see
      ``level_moments``): prior samples of the trained VAE are weaker than
      its training noise (measured 0.85x after 500 steps on the built-in
      data, for 0.5-0.9 throughout training: the ELBO converges slowly in
      the prior's direction), so their amplitude is matched to the
      training LDCT's noise.
    **extract_kwargs: forwarded to ``extract_noise`` for the condition.

  Returns:
    ``(B, H, W, 1)`` pseudo-LDCT, network units. The NDCT's own noise stays
    in it, so the pseudo-LDCT noise is the NDCT noise plus the sampled one.
  """
  _check_nhwc1(ndct_norm, "ndct_norm")
  if model.use_noise_map and noise_map is None:
    raise ValueError("this NoiseVAE is conditioned on a noise map; pass noise_map")
  structure = (extract_noise(ndct_norm, **extract_kwargs)[1] if smooth_condition
               else ndct_norm)
  condition = make_condition(structure, noise_map if model.use_noise_map else None)
  noise = model.apply(params, condition, rng, temperature, method=NoiseVAE.sample)
  return ndct_norm + noise_gain * noise
