"""Conditional VAE over low-dose CT noise, for TDDL (Chen et al., ISICDM 2020).

TDDL learns the noise of real low-dose CT (LDCT) from LDCT images alone, then
adds sampled noise to normal-dose (NDCT) images of other patients to make
pseudo-LDCT/NDCT training pairs. This module holds the pieces:
``extract_noise`` splits an LDCT image into ``structure + noise`` with no
paired NDCT (an edge-preserving bilateral filter, because a linear low-pass
would take anatomy edges for noise); ``NoiseVAE`` is a VAE over the noise
field, conditioned on the slice's physics noise map and its local content,
with a fixed white residual and a decoder linear in ``z`` so that it cannot
collapse to white noise; ``elbo_loss``, ``level_moments`` and ``synthesize``
train it, calibrate the level of its samples on the training LDCT, and make
pseudo-LDCT images.

Arrays are NHWC with one channel in network units, i.e. the data's
``data.pipeline.Normalization`` (``config.data.normalization``). Every
conversion between HU and network units here takes that normalisation as an
argument (``NoiseVAE.normalization``, or ``normalization=`` of the free
functions) and the model's own scales are in HU, so a run with another
normalisation learns the same noise in HU. The design choices and the
measurements behind them are in docs/noise_vae.md.
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from ldct_jax.models.layers import Conv
from ldct_jax.windows import BODY_THRESHOLD_HU

if TYPE_CHECKING:
  from ldct_jax.data.pipeline import Normalization

Array = jax.Array

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


def estimate_noise_std(image: Array, normalization: "Normalization",
                       body_threshold_hu: float = BODY_THRESHOLD_HU) -> Array:
  """Robust per-image noise std from adjacent-pixel differences in the body.

  ``1.4826 median(|x[i, j+1] - x[i, j]|) / sqrt(2)`` over pairs whose both
  pixels exceed ``body_threshold_hu``. For white noise this is the noise std;
  FBP noise is anti-correlated at one pixel lag, so it overestimates it by a
  constant factor (~1.3 on the built-in data), which ``range_factor`` in
  ``extract_noise`` absorbs. Edges are a small fraction of pairs and do not
  move the median.

  Args:
    image: ``(B, H, W, 1)`` network units.
    normalization: the HU <-> network units map of ``image``.
    body_threshold_hu: pixels at or below it (air) are ignored, HU.

  Returns:
    ``(B, 1, 1, 1)`` noise std estimate, network units. Images without body
    pixels fall back to all pixels.
  """
  _check_nhwc1(image, "image")
  body_threshold = normalization.normalize(body_threshold_hu)
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
  # Floor at the smallest normal float, so the filter needs no unit: a
  # noise-free image has a zero noise estimate, and 0.5 / 0 would turn the
  # weights into NaN (0 x inf). With the floor every neighbour that differs
  # from the centre gets weight 0 and the centre (weight 1) keeps its value.
  dtype = jnp.result_type(image.dtype, jnp.float32)
  inv_two_var = 0.5 / jnp.maximum(jnp.square(range_sigma), jnp.finfo(dtype).tiny)
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


@functools.partial(jax.jit, static_argnames=("normalization", "radius", "spatial_sigma"))
def extract_noise(ld_norm: Array, noise_std: Optional[Array] = None, *,
                  normalization: "Normalization", range_factor: float = 3.0, radius: int = 3,
                  spatial_sigma: float = 1.5,
                  body_threshold_hu: float = BODY_THRESHOLD_HU) -> Tuple[Array, Array]:
  """Splits LDCT images into ``(noise, structure)`` with no paired NDCT.

  ``structure`` is the bilateral filter of the image (docs/noise_vae.md says
  why), ``noise = ld_norm - structure``.

  Args:
    ld_norm: ``(B, H, W, 1)`` LDCT images, network units.
    noise_std: optional known noise std (network units, scalar or
      ``(B, 1, 1, 1)``); default ``estimate_noise_std`` per image.
    normalization: the HU <-> network units map of ``ld_norm`` (static).
    range_factor: range sigma of the bilateral = ``range_factor *
      noise_std``. Larger removes more noise but lets weaker edges through.
      TDDL passes ``config.tddl.range_factor`` (5 in configs/tddl.py).
    radius: bilateral window half-width, pixels.
    spatial_sigma: bilateral spatial sigma, pixels.
    body_threshold_hu: air threshold of the noise estimate, HU.

  Returns:
    ``(noise, structure)``, both ``(B, H, W, 1)`` network units, summing to
    ``ld_norm``.
  """
  _check_nhwc1(ld_norm, "ld_norm")
  if noise_std is None:
    noise_std = estimate_noise_std(ld_norm, normalization, body_threshold_hu)
  structure = bilateral_filter(ld_norm, range_factor * noise_std, radius,
                               spatial_sigma)
  return ld_norm - structure, structure


def flat_weight(structure: Array, edge_hu: float = 40.0, radius: int = 3, *,
                normalization: "Normalization",
                body_threshold_hu: float = BODY_THRESHOLD_HU) -> Array:
  """1 where the extracted noise can be trusted, else 0: ``(B, H, W, 1)`` float32.

  A pixel counts when it is inside the body (structure above
  ``body_threshold_hu``) and, within ``radius`` pixels, the structure
  estimate's gradient (central differences) stays below ``edge_hu`` HU per
  pixel. Near edges and in fine texture (lung vessels) the bilateral
  residual holds structure as well as noise (measured in docs/noise_vae.md).
  ``edge_hu <= 0`` trusts every pixel.

  Args:
    structure: ``(B, H, W, 1)`` structure estimate, network units.
    edge_hu: gradient limit, HU per pixel.
    radius: pixels around an edge that do not count.
    normalization: the HU <-> network units map of ``structure``.
    body_threshold_hu: air threshold, HU.
  """
  _check_nhwc1(structure, "structure")
  if edge_hu <= 0:
    return jnp.ones_like(structure)
  hu = normalization.denormalize(structure[..., 0])
  padded = jnp.pad(hu, ((0, 0), (1, 1), (1, 1)), mode="edge")
  grad_y = 0.5 * (padded[:, 2:, 1:-1] - padded[:, :-2, 1:-1])
  grad_x = 0.5 * (padded[:, 1:-1, 2:] - padded[:, 1:-1, :-2])
  steepest = jax.lax.reduce_window(
      jnp.hypot(grad_y, grad_x), -jnp.inf, jax.lax.max, (1, 2 * radius + 1, 2 * radius + 1),
      (1, 1, 1), ((0, 0), (radius, radius), (radius, radius)))
  flat = (steepest < edge_hu) & (hu > body_threshold_hu)
  return flat.astype(jnp.float32)[..., None]


def noise_batch(ld_norm: Array, noise_map: Optional[Array] = None, *,
                normalization: "Normalization", flat_edge_hu: float = 0.0,
                **extract_kwargs) -> dict:
  """A VAE training batch from LDCT images: ``{'noise', 'condition', 'weight'}``.

  The condition is the structure estimate, as ``synthesize`` uses the
  structure estimate of the NDCT image, so the two see the same kind of
  smooth input; ``noise_map`` (``(B, H, W, 1)``, ``fbp_noise_log_std`` of
  the whole slices the patches come from) is appended as a second channel.
  ``weight`` is ``flat_weight(structure, flat_edge_hu)``: the pixels whose
  noise the likelihood sees (0 = all pixels). ``normalization`` is the
  images' HU <-> network units map; ``extract_kwargs`` go to
  ``extract_noise``.
  """
  noise, structure = extract_noise(ld_norm, normalization=normalization, **extract_kwargs)
  return {"noise": noise, "condition": make_condition(structure, noise_map),
          "weight": flat_weight(structure, flat_edge_hu, normalization=normalization)}


class NoiseVAE(nn.Module):
  """Conditional VAE over noise fields (docs/noise_vae.md has the design).

  ``p(n | z, c) = N(s(c) g(z, c), sigma^2)`` per pixel: ``g`` the decoder,
  ``s(c)`` a local noise scale computed from the condition only (so the
  level follows attenuation), ``sigma`` a white residual. Latent: a ``(H /
  2**num_down, W / 2**num_down, latent_channels)`` map, so each latent
  vector describes a neighbourhood and the decoder turns it into spatially
  correlated noise.

  Attributes:
    normalization: the HU <-> network units map of every image, noise and
      structure the model sees or makes (``config.data.normalization``);
      the scales below are in HU and converted through it.
    latent_channels: channels of the latent map.
    features: channels of the hidden conv layers.
    num_down: stride-2 downsamplings in the encoder (latent stride
      ``2**num_down``); images are padded to a multiple of it where needed.
    noise_scale_hu: typical noise std, HU (16, the body noise of the
      built-in quarter-dose data); the networks see and produce noise in
      units of it (``noise_scale`` in network units), so their activations
      are O(1).
    condition_center_hu: HU subtracted from the structure before the
      networks see it (0: water).
    condition_scale_hu: HU per unit of the structure the networks see
      (1024).
    sigma_mode: ``'fixed'`` (residual std ``fixed_sigma * noise_scale``) or
      ``'learned'`` (one learnt scalar in units of ``s(c)``, the old
      sigma-VAE, which collapses on CT noise).
    fixed_sigma: residual std in units of ``noise_scale`` for ``'fixed'``.
    linear_decoder: no nonlinearity on the ``z`` path of the decoder, so
      ``p(noise | c)`` is Gaussian.
    use_noise_map: the condition has a second channel,
      ``fbp_noise_log_std`` of the slice.
    level_from_map: the local scale is the physics alone, ``log s(c) =
      log noise_scale + b + (map - NOISE_MAP_OFFSET)`` with one learnt
      scalar ``b``: no learnt dependence on the structure channel and a
      map weight fixed at 1 (needs ``use_noise_map``).
    structure_film: the decoder's FiLM sees the structure channel; False:
      only the noise map (needs ``use_noise_map``), so nothing the VAE
      learns can tie the noise's amplitude or texture to local HU.
    conv_lowering: conv lowering passed to every conv (see ``layers``).
  """

  normalization: Any
  latent_channels: int = 16
  features: int = 32
  num_down: int = 2
  noise_scale_hu: float = 16.0
  condition_center_hu: float = 0.0
  condition_scale_hu: float = 1024.0
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
  def noise_scale(self) -> float:
    """``noise_scale_hu`` in network units."""
    return self.noise_scale_hu / self.normalization.scale

  @property
  def stride(self) -> int:
    return 2**self.num_down

  @property
  def condition_channels(self) -> int:
    return 2 if self.use_noise_map else 1

  def _normalize_condition(self, condition: Array) -> Array:
    structure_hu = self.normalization.denormalize(condition[..., :1])
    structure = (structure_hu - self.condition_center_hu) / self.condition_scale_hu
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
    (nats per latent element), ``recon_rmse_hu`` (of the decoder mean, HU),
    ``sigma_hu`` (mean std of the likelihood, HU).
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
  hu_per_unit = model.normalization.scale
  metrics = {
      "loss": loss,
      "nll": nll_pixel,
      "kl": kl_pixel,
      "kl_per_latent": jnp.mean(kl),
      "observed_fraction": pixels / noise.size,
      "recon_rmse_hu": hu_per_unit * jnp.sqrt(jnp.sum(weight * jnp.square(noise - recon))
                                              / pixels),
      "sigma_hu": hu_per_unit * jnp.mean(jnp.exp(log_std)),
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
    weight = flat_weight(batch["condition"][..., :1], edge_hu,
                         normalization=model.normalization)
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
      its training noise (docs/noise_vae.md), so their amplitude is matched
      to the training LDCT's noise.
    **extract_kwargs: forwarded to ``extract_noise`` for the condition.

  Returns:
    ``(B, H, W, 1)`` pseudo-LDCT, network units. The NDCT's own noise stays
    in it, so the pseudo-LDCT noise is the NDCT noise plus the sampled one.
  """
  _check_nhwc1(ndct_norm, "ndct_norm")
  if model.use_noise_map and noise_map is None:
    raise ValueError("this NoiseVAE is conditioned on a noise map; pass noise_map")
  structure = (extract_noise(ndct_norm, normalization=model.normalization,
                             **extract_kwargs)[1] if smooth_condition
               else ndct_norm)
  condition = make_condition(structure, noise_map if model.use_noise_map else None)
  noise = model.apply(params, condition, rng, temperature, method=NoiseVAE.sample)
  return ndct_norm + noise_gain * noise
