r"""Stein's unbiased risk estimate (SURE) as training losses that need no clean image.

For ``y = x + n`` with Gaussian noise ``n ~ N(0, Σ)`` and a weakly
differentiable denoiser ``f``, Stein's lemma ``E[nᵀ g(y)] = E[tr(Σ J_g(y))]``
turns the unknown cross term of the squared error into a divergence, so

  ``SURE = ‖y − f(y)‖²/N − tr(Σ)/N + (2/N) tr(Σ J_f(y))``

has the expectation (over the noise) of the mean squared error
``‖f(y) − x‖²/N``. For white noise ``Σ = σ² I`` this is the familiar
``‖y − f(y)‖²/N − σ² + (2σ²/N) div f(y)`` (Stein 1981; Soltanayev & Chun,
NeurIPS 2018, for training networks).

The trace is estimated by Monte Carlo with one probe per image: for
``u ~ N(0, Σ)``, ``E[uᵀ J u] = tr(Σ J)``. Two ways to get ``uᵀ J u``:

* ``'fd'`` (the papers'): ``uᵀ (f(y + ε u) − f(y)) / ε``, a second forward
  pass at a perturbed input;
* ``'exact'``: ``uᵀ J u`` exactly, as ``uᵀ (Jᵀ u)`` from one vector-Jacobian
  product (``jax.vjp``): no ε, so none of the papers' sensitivity to it, for
  about the cost of the second forward pass (its parameter gradient is a
  second-order reverse pass). Forward mode (``jax.jvp``) would give ``J u``
  directly, but the project's CPU convolutions (``models.layers``) define a
  custom VJP and so admit no forward mode; the transpose gives the same number.

The probe need not be white: ``sure_from_probe`` takes any draw ``u`` of
the noise's own distribution. White Gaussian noise uses ``σ b`` with ``b``
Gaussian (or Rademacher, ``E[bbᵀ] = I`` too, with a lower-variance trace
estimate, Hutchinson 1990); a per-pixel variance map uses ``σ(x) ⊙ b``; and
correlated noise such as CT's FBP-domain noise uses a sample of the noise
itself (``methods/sure.py`` draws it from the scanner physics). The same
formula then estimates the risk without bias (and plain white-noise SURE on
correlated noise does not: it replaces ``tr(Σ J)`` by ``σ² tr(J)``).

ε. The finite-difference step is ``ε`` times a unit-variance probe, in the
image's units. Its default ``default_epsilon(σ, N) = σ / √N`` ties it to
the noise level and the image size, for three measured reasons
(``tests/test_sure.py``, ``tests/test_sure_methods.py``, docs/sure.md):
a difference quotient of a piecewise-linear (ReLU, soft-threshold) denoiser
is biased by the kinks the step crosses, in proportion to ε (0.9% of the
trace term at ε = 0.2σ on a soft-threshold denoiser, none detectable at
0.036σ and below); the one-probe Monte-Carlo error of the trace falls as
1/√N, so a step ∝ 1/√N keeps that bias below it as images grow; and
float32 round-off stays harmless down to 1e-4 σ. At Soltanayev & Chun's
40² DnCNN patches it is 0.025σ, next to their tuned ``1.4e-4 σ₂₅₅`` on
[0, 1] images (0.036σ); at 64² patches 0.016σ. (The larger
``2σ / N^0.3``, recalled from Deledalle et al.'s SUGAR paper, is 0.2σ at
32²: biased on the soft-threshold denoiser.) ``'exact'`` needs no ε.

Batch norm. In training mode a network's forward pass updates its running
statistics; the perturbed pass must not (it would feed them the statistics
of ``y + ε u``). With ``has_aux=True``, ``apply_fn`` returns ``(f(y), aux)``
(e.g. Flax's ``(out, {'batch_stats': ...})`` from ``mutable=``), and only the
unperturbed pass's ``aux`` is returned; the perturbed pass's is dropped.

GSURE (Eldar, IEEE TSP 2009) for undersampled MRI is in
``gsure_masked_fourier``: SURE in the range of the measurement operator.

Units: every function works in the units of its input (normalised model
units in this project); σ, ε and the returned risk are in those units
(risk in their square). All functions are pure and jit-able.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from ldct_jax.physics import mri

PROBES = ("gaussian", "rademacher")
DIVERGENCES = ("fd", "exact")


class SureResult(NamedTuple):
  """Per-sample risk estimate and what it was made of.

  Attributes:
    risk: ``(B,)`` SURE, an unbiased estimate of each sample's mean squared
      error per element.
    output: ``f(y)``, the unperturbed pass.
    residual: ``(B,)`` ``‖y − f(y)‖² / N``.
    trace: ``(B,)`` the Monte-Carlo estimate of ``tr(Σ J) / N``.
    noise_var: ``(B,)`` ``tr(Σ) / N`` as used.
    aux: the unperturbed pass's auxiliary output (None without ``has_aux``).
  """

  risk: jax.Array
  output: jax.Array
  residual: jax.Array
  trace: jax.Array
  noise_var: jax.Array
  aux: Any = None


def default_epsilon(sigma, num_elements):
  """The finite-difference step ``σ / √N`` (see the module docstring)."""
  return jnp.asarray(sigma, jnp.float32) / jnp.sqrt(jnp.asarray(num_elements, jnp.float32))


def draw_probe(key, shape, kind: str = "gaussian", dtype=jnp.float32) -> jax.Array:
  """A probe ``b`` with ``E[b bᵀ] = I``: standard Gaussian or Rademacher (±1)."""
  if kind == "gaussian":
    return jax.random.normal(key, shape, dtype)
  if kind == "rademacher":
    return jax.random.rademacher(key, shape, dtype)
  raise ValueError(f"unknown SURE probe {kind!r}; use one of {PROBES}")


def _per_sample(value, batch: int) -> jax.Array:
  """A scalar or ``(B,)`` value as ``(B,)`` float32."""
  value = jnp.asarray(value, jnp.float32)
  if value.ndim == 0:
    return jnp.full((batch,), value)
  if value.shape != (batch,):
    raise ValueError(f"expected a scalar or one value per sample ({batch},), got {value.shape}")
  return value


def _expand(v, like):
  return v.reshape((-1,) + (1,) * (like.ndim - 1))


def _sum(x):
  return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def directional_derivative(fn: Callable, y, probe, eps, *, has_aux: bool = False,
                           method: str = "fd"):
  """``(f(y), per-sample probeᵀ J_f(y) probe, aux)`` of a batched ``fn``.

  ``'fd'``: ``probeᵀ (f(y + ε probe) − f(y)) / ε`` with ``eps`` scalar or
  per sample; ``'exact'``: ``probeᵀ (Jᵀ probe)`` by ``jax.vjp``, ``eps``
  unused. With ``has_aux``, ``fn`` returns ``(out, aux)`` and only the
  unperturbed pass's ``aux`` is kept.
  """
  if method == "exact":
    if has_aux:
      out, vjp_fn, aux = jax.vjp(fn, y, has_aux=True)
    else:
      (out, vjp_fn), aux = jax.vjp(fn, y), None
    return out, _sum(probe * vjp_fn(probe)[0]), aux
  if method != "fd":
    raise ValueError(f"unknown divergence method {method!r}; use one of {DIVERGENCES}")
  eps = _per_sample(eps, y.shape[0])
  if has_aux:
    out, aux = fn(y)
    perturbed, _ = fn(y + _expand(eps, y) * probe)  # its aux (batch statistics) is dropped
  else:
    out, aux = fn(y), None
    perturbed = fn(y + _expand(eps, y) * probe)
  return out, _sum(probe * (perturbed - out)) / eps, aux


def sure_from_probe(apply_fn: Callable, params, y, probe, noise_var, *,
                    eps=None, has_aux: bool = False, method: str = "fd") -> SureResult:
  """SURE for Gaussian noise of any covariance Σ, given one draw ``probe ~ N(0, Σ)``.

  ``SURE = ‖y − f(y)‖²/N − noise_var + (2/N) probeᵀ J probe``, per sample,
  with ``noise_var = tr(Σ)/N`` (scalar or per sample), N the elements per
  sample. The finite difference perturbs along the probe rescaled to unit
  mean variance (``probe / sqrt(noise_var)``), so ``eps`` means the same as
  in ``mc_sure`` (a step in the image's units); default
  ``default_epsilon(sqrt(noise_var), N)``.

  Args:
    apply_fn: ``(params, y) -> f(y)`` (or ``(f(y), aux)`` with ``has_aux``),
      batched over the leading axis.
    params: passed through to ``apply_fn``.
    y: ``(B, ...)`` noisy inputs.
    probe: ``(B, ...)`` a draw of the noise distribution, independent of y.
    noise_var: ``tr(Σ)/N``, scalar or ``(B,)``.
    eps: finite-difference step (scalar or ``(B,)``), None for the default.
    has_aux: see ``directional_derivative``.
    method: ``'fd'`` or ``'exact'``.
  """
  batch = y.shape[0]
  if probe.shape != y.shape:
    raise ValueError(f"probe shape {probe.shape} differs from the input's {y.shape}")
  num = int(y[0].size)
  noise_var = _per_sample(noise_var, batch)
  # Floored: a noise-free sample (e.g. a patch outside a scanner's field of view,
  # all-zero probe) must give a zero trace term, not 0/0.
  scale = jnp.sqrt(jnp.maximum(noise_var, jnp.finfo(jnp.float32).tiny))
  if eps is None:
    eps = default_epsilon(scale, num)
  unit = probe / _expand(scale, y)
  out, quad, aux = directional_derivative(lambda v: apply_fn(params, v), y, unit, eps,
                                          has_aux=has_aux, method=method)
  residual = _sum(jnp.square(y - out)) / num
  trace = noise_var * quad / num  # (σ̄ u)ᵀ J (σ̄ u) = probeᵀ J probe
  return SureResult(risk=residual - noise_var + 2.0 * trace, output=out, residual=residual,
                    trace=trace, noise_var=noise_var, aux=aux)


def mc_sure(apply_fn: Callable, params, y, sigma, key, *, eps=None, probe: str = "gaussian",
            has_aux: bool = False, method: str = "fd") -> SureResult:
  """Monte-Carlo SURE for white Gaussian noise of std ``sigma`` (scalar or per sample).

  ``‖y − f(y)‖²/N − σ² + (2σ²/N) div``, ``div ≈ bᵀ(f(y + ε b) − f(y))/ε``
  with one probe ``b`` per sample (``probe`` 'gaussian' or 'rademacher'),
  or ``bᵀ J b`` exactly with ``method='exact'``. ``eps`` defaults to
  ``default_epsilon(σ, N)``. See ``sure_from_probe`` for the arguments.
  """
  sigma = _per_sample(sigma, y.shape[0])
  b = draw_probe(key, y.shape, probe, y.dtype)
  return sure_from_probe(apply_fn, params, y, _expand(sigma, y) * b, jnp.square(sigma),
                         eps=eps, has_aux=has_aux, method=method)


# ----------------------------------------------------------------------------
# GSURE for single-coil Cartesian MRI


def gsure_masked_fourier(apply_fn: Callable, params, k0, mask, input_mask, noise_std, key, *,
                         eps=None, has_aux: bool = False, method: str = "fd") -> SureResult:
  r"""Generalised SURE (Eldar 2009) of a reconstruction from masked, noisy k-space.

  Measurement ``y = M F x + w`` (``F`` the centred orthonormal DFT, ``M``
  the 0/1 mask, ``w`` complex white Gaussian noise with ``noise_std`` per
  real component), in the real view with ``m = 2 Σ M`` measured real
  numbers. For a reconstruction ``h`` the GSURE

    ``‖M F h − y‖²/m − s² + (2 s²/m) div_y(M F h)``

  is an unbiased estimate of ``‖M F (h − x)‖²/m``, the error in the range
  of the measurement operator (``P = Fᴴ M F``): the only part of the error
  the data can see. With noiseless data consistency and ``h`` fed all of
  ``y`` this is the constant ``s²`` (``M F h = y``), so the network here sees
  only the samples of ``input_mask`` ⊂ ``mask``: the held-out samples
  ``mask − input_mask`` enter only the residual, with independent noise, and
  make GSURE an honest prediction error there (the divergence has no terms
  on them, as ``h`` does not depend on them). The divergence is estimated
  with one Gaussian probe on the input samples.

  Args:
    apply_fn: ``(params, x, k, mask) -> image`` (or ``(image, aux)``), all
      ``(B, H, W, 2)`` (real, imag) channels and the ``(B, H, W)`` mask:
      the zero-filled image ``x = Fᴴ k`` and the k-space ``k`` it was made
      from, as ``models.cascade.DeepCascade`` takes them.
    params: passed through.
    k0: ``(B, H, W, 2)`` measured k-space, zero off ``mask``.
    mask: ``(B, H, W)`` or broadcastable 0/1 sampling mask ``M``.
    input_mask: 0/1 mask of the samples the network sees, a subset of ``mask``.
    noise_std: per real component of the k-space noise (``E|w|² = 2 s²``),
      scalar or ``(B,)``, in the units of ``k0``.
    key: PRNG key of the probe.
    eps: finite-difference step in k-space units (scalar or ``(B,)``);
      default ``default_epsilon(s, m)``, m per sample.
    has_aux, method: as in ``sure_from_probe``.

  Returns:
    ``SureResult`` with ``output`` the network's image (B, H, W, 2) and the
    other fields per measured real number.
  """
  batch = k0.shape[0]
  mask = jnp.broadcast_to(jnp.asarray(mask, k0.dtype), k0.shape[:-1])[..., None]
  seen = jnp.broadcast_to(jnp.asarray(input_mask, k0.dtype), k0.shape[:-1])[..., None] * mask
  s = _per_sample(noise_std, batch)
  count = 2.0 * _sum(mask)  # measured real numbers per sample
  if eps is None:
    eps = default_epsilon(s, count)
  k_in = k0 * seen
  seen_mask = seen[..., 0]

  def measured(k):
    """k-space input -> (M F h, aux): the reconstruction's measured samples."""
    x = mri.complex_to_channels(mri.ifft2c(mri.channels_to_complex(k)))
    result = apply_fn(params, x, k, seen_mask)
    image, aux = result if has_aux else (result, None)
    k_out = mri.complex_to_channels(mri.fft2c(mri.channels_to_complex(image))) * mask
    return k_out, (image, aux)

  probe = draw_probe(key, k0.shape, "gaussian", k0.dtype) * seen
  if method == "exact":
    k_out, vjp_fn, (image, aux) = jax.vjp(measured, k_in, has_aux=True)
    quad = _sum(probe * vjp_fn(probe)[0])
  elif method == "fd":
    eps = _per_sample(eps, batch)
    k_out, (image, aux) = measured(k_in)
    perturbed, _ = measured(k_in + _expand(eps, k_in) * probe)
    quad = _sum(probe * (perturbed - k_out)) / eps
  else:
    raise ValueError(f"unknown divergence method {method!r}; use one of {DIVERGENCES}")
  noise_var = jnp.square(s)
  residual = _sum(jnp.square(k_out - k0 * mask)) / count
  trace = noise_var * quad / count
  return SureResult(risk=residual - noise_var + 2.0 * trace, output=image, residual=residual,
                    trace=trace, noise_var=noise_var, aux=aux)
