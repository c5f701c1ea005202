"""SURE losses (ldct_jax/sure.py) against closed forms and the true error of known images.

Unbiasedness is checked the way it is defined: over many noise draws of a
fixed clean image, the mean of SURE minus the true squared error must be
zero within its standard error (and a wrong sigma must fail the same test).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldct_jax import sure
from ldct_jax.models.cascade import DeepCascade
from ldct_jax.models.dncnn import DnCNN
from ldct_jax.physics import mri


def smooth_image(size=16, seed=0):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size] / size
  image = 0.5 + 0.3 * np.sin(6 * xx + rng.uniform()) * np.cos(4 * yy) + 0.2 * (xx > 0.5)
  return image.astype(np.float32)


def tiny_cnn(use_bn=False):
  return DnCNN(depth=3, features=8, use_bn=use_bn, identity_init=False)


def within_standard_error(values, z=3.5):
  values = np.asarray(values, np.float64)
  mean, se = values.mean(), values.std(ddof=1) / np.sqrt(len(values))
  return abs(mean) < z * se, mean, se


@pytest.mark.parametrize("probe,method", [("gaussian", "fd"), ("rademacher", "fd"),
                                          ("gaussian", "exact")])
def test_mc_estimate_converges_to_exact_sure_of_a_linear_denoiser(probe, method):
  """f(y) = A y: exact SURE = ||y - Ay||^2/N - s^2 + 2 s^2 tr(A)/N (NumPy float64)."""
  rng = np.random.default_rng(1)
  n = 48
  a = rng.normal(size=(n, n)) / 6 + np.eye(n) * 0.3
  y = rng.normal(size=(1, n))
  sigma = 0.7
  exact = (np.sum((y - y @ a.T) ** 2) / n - sigma ** 2 + 2 * sigma ** 2 * np.trace(a) / n)
  apply = lambda p, v: v @ p.T
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  estimates = np.asarray(jax.vmap(lambda k: sure.mc_sure(
      apply, jnp.asarray(a, jnp.float32), jnp.asarray(y, jnp.float32), sigma, k,
      probe=probe, method=method).risk[0])(keys), np.float64)
  ok, mean, se = within_standard_error(estimates - exact)
  assert ok, (mean, se)
  # Converging: the error of the mean of 4000 is far below one probe's spread.
  assert abs(estimates.mean() - exact) < 0.1 * estimates.std()


@pytest.mark.parametrize("method", ["fd", "exact"])
def test_sure_equals_the_true_mse_over_noise_draws_with_per_sample_sigma(method):
  image = jnp.asarray(smooth_image())[None, :, :, None]
  model = tiny_cnn()
  params = model.init(jax.random.PRNGKey(3), image)["params"]
  apply = lambda p, v: model.apply({"params": p}, v)
  sigmas = jnp.array([0.05, 0.2])  # one per sample
  draws = 300

  def one(key):
    noise_key, probe_key = jax.random.split(key)
    x = jnp.concatenate([image, image])
    y = x + sigmas[:, None, None, None] * jax.random.normal(noise_key, x.shape)
    result = sure.mc_sure(apply, params, y, sigmas, probe_key, method=method)
    true = jnp.mean(jnp.square(result.output - x), axis=(1, 2, 3))
    wrong = sure.mc_sure(apply, params, y, 1.25 * sigmas, probe_key, method=method).risk
    return result.risk - true, wrong - true

  gaps, wrong_gaps = jax.lax.map(one, jax.random.split(jax.random.PRNGKey(4), draws))
  for i in range(2):
    ok, mean, se = within_standard_error(gaps[:, i])
    assert ok, (float(sigmas[i]), mean, se)
    # The same test fails with a wrong sigma (the pitfall the issue names).
    assert not within_standard_error(wrong_gaps[:, i], z=5)[0]


def test_finite_difference_matches_the_exact_divergence_for_steps_around_the_default():
  """'fd' vs 'exact' with one probe, for steps around the default sigma / sqrt(N)."""
  image = jnp.asarray(smooth_image(32))[None, :, :, None]
  model = tiny_cnn()
  params = model.init(jax.random.PRNGKey(5), image)["params"]
  apply = lambda p, v: model.apply({"params": p}, v)
  sigma = 0.1
  y = image + sigma * jax.random.normal(jax.random.PRNGKey(6), image.shape)
  key = jax.random.PRNGKey(7)
  exact = float(sure.mc_sure(apply, params, y, sigma, key, method="exact").trace[0])
  fd_trace = jax.jit(lambda eps: sure.mc_sure(apply, params, y, sigma, key, eps=eps).trace[0])
  default = float(sure.default_epsilon(sigma, y[0].size))
  assert default == pytest.approx(sigma / 32)
  # Soltanayev & Chun's DnCNN value, 1.4e-4 x sigma on [0, 255] for [0, 1] images: 0.0357 sigma.
  for eps in (default * 1e-2, default * 0.1, default, 0.0357 * sigma):
    fd = float(fd_trace(eps))
    assert fd == pytest.approx(exact, rel=0.03), eps


@pytest.mark.parametrize("method", ["fd", "exact"])
def test_batch_statistics_come_from_the_unperturbed_pass_only(method):
  model = tiny_cnn(use_bn=True)
  y = jnp.asarray(smooth_image())[None, :, :, None] + 0.1 * jax.random.normal(
      jax.random.PRNGKey(0), (2, 16, 16, 1))
  variables = model.init(jax.random.PRNGKey(1), y)

  def apply(params, v):
    return model.apply({**variables, "params": params}, v, train=True, mutable=["batch_stats"])

  result = jax.jit(lambda p: sure.mc_sure(apply, p, y, 0.1, jax.random.PRNGKey(2), eps=0.05,
                                          has_aux=True, method=method))(variables["params"])
  _, clean_pass = apply(variables["params"], y)
  _, shifted_pass = apply(variables["params"], y + 0.05 * jax.random.normal(
      jax.random.PRNGKey(3), y.shape))
  for got, want, other in zip(jax.tree.leaves(result.aux), jax.tree.leaves(clean_pass),
                              jax.tree.leaves(shifted_pass)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not np.allclose(np.asarray(got), np.asarray(other))


@pytest.mark.parametrize("method", ["fd", "exact"])
def test_a_noise_free_sample_gets_its_plain_squared_residual(method):
  y = jnp.ones((2, 4, 4, 1))
  result = sure.sure_from_probe(lambda p, v: 0.5 * v, None, y, jnp.zeros_like(y), 0.0,
                                method=method)
  np.testing.assert_allclose(np.asarray(result.risk), [0.25, 0.25])


def test_probe_of_another_shape_and_unknown_options_are_refused():
  apply = lambda p, v: v
  y = jnp.zeros((2, 4, 4, 1))
  with pytest.raises(ValueError, match="probe shape"):
    sure.sure_from_probe(apply, None, y, jnp.zeros((2, 4, 4, 2)), 1.0)
  with pytest.raises(ValueError, match="rademacher"):
    sure.mc_sure(apply, None, y, 1.0, jax.random.PRNGKey(0), probe="uniform")
  with pytest.raises(ValueError, match="one value per sample"):
    sure.mc_sure(apply, None, y, jnp.ones(3), jax.random.PRNGKey(0))


# --------------------------------------------------------------------------- GSURE


def mri_setup(size=16, seed=0):
  rng = np.random.default_rng(seed)
  image = smooth_image(size, seed) * np.exp(1j * rng.uniform(-1, 1) * np.linspace(0, 1, size))
  x = mri.complex_to_channels(jnp.asarray(image, jnp.complex64))[None]
  mask = jnp.asarray(mri.make_mask("random", (size, size), 2.0, 0.25, seed=seed))[None]
  return x, mask


def cascade(noisy_dc=True):
  return DeepCascade(num_cascades=2, depth=3, features=8, noisy_dc=noisy_dc,
                     identity_init=False, lam_init=1.0)


@pytest.mark.parametrize("method", ["fd", "exact"])
def test_gsure_equals_the_projected_error_over_noise_draws(method):
  x, mask = mri_setup()
  model = cascade()
  seen = mask * jnp.asarray(np.arange(16) % 3 != 0, jnp.float32)[None, None, :]
  params = model.init(jax.random.PRNGKey(0), x, x, mask)["params"]
  apply = lambda p, xi, k, m: model.apply({"params": p}, xi, k, m)
  s = 0.05
  kx = mri.complex_to_channels(mri.fft2c(mri.channels_to_complex(x)))

  def one(key):
    noise_key, probe_key = jax.random.split(key)
    k0 = (kx + s * jax.random.normal(noise_key, kx.shape)) * mask[..., None]
    result = sure.gsure_masked_fourier(apply, params, k0, mask, seen, s, probe_key,
                                       method=method)
    k_out = mri.complex_to_channels(mri.fft2c(mri.channels_to_complex(result.output)))
    true = jnp.sum(jnp.square((k_out - kx) * mask[..., None])) / (2 * jnp.sum(mask))
    return result.risk[0] - true

  gaps = jax.lax.map(one, jax.random.split(jax.random.PRNGKey(1), 300))
  ok, mean, se = within_standard_error(gaps)
  assert ok, (mean, se)


def test_gsure_of_noiseless_dc_fed_every_sample_does_not_depend_on_the_network():
  """Why the method holds samples out: otherwise GSURE cannot train a hard-DC cascade."""
  x, mask = mri_setup()
  model = cascade(noisy_dc=False)
  apply = lambda p, xi, k, m: model.apply({"params": p}, xi, k, m)
  kx = mri.complex_to_channels(mri.fft2c(mri.channels_to_complex(x)))
  k0 = (kx + 0.05 * jax.random.normal(jax.random.PRNGKey(2), kx.shape)) * mask[..., None]

  @jax.jit
  def loss(p, key=jax.random.PRNGKey(3)):
    return sure.gsure_masked_fourier(apply, p, k0, mask, mask, 0.05, key,
                                     method="exact").risk[0]

  params = [model.init(jax.random.PRNGKey(i), x, x, mask)["params"] for i in (0, 1)]
  assert float(loss(params[0])) == pytest.approx(float(loss(params[1])), rel=1e-5)
  grads = jax.jit(jax.grad(loss))(params[0])
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-6
  # Over probes its mean is the noise variance s^2 (M F h = y: only the noise is left).
  values = jax.vmap(lambda k: loss(params[0], k))(jax.random.split(jax.random.PRNGKey(4), 100))
  ok, mean, se = within_standard_error(np.asarray(values) - 0.05 ** 2)
  assert ok, (mean, se)
