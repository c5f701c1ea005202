"""DeepCascade: shapes, data consistency enforced in the output (NumPy FFT), weight sharing, remat, learning."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ldct_jax.models import get_model
from ldct_jax.models.cascade import DeepCascade, dc_lambdas
from ldct_jax.physics import mri
from conftest import np_fft2c

SIZE = 32
TINY = dict(num_cascades=2, depth=3, features=8)


def phantom_batch(batch=2, seed=0, acceleration=4):
  """Smooth complex blobs, their R-fold undersampled k-space and the zero-filled images."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE - 0.5
  images = []
  for _ in range(batch):
    image = np.zeros((SIZE, SIZE))
    for _ in range(4):
      cy, cx, r = rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(0.05, 0.2)
      image += rng.uniform(0.3, 1.0) * ((yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2)
    images.append(image * np.exp(1j * rng.uniform(-1, 1) * (xx + yy)))
  images = np.stack(images)
  mask = np.stack([mri.make_mask("random", (SIZE, SIZE), acceleration, seed=seed + b)
                   for b in range(batch)])
  k0 = mask * np_fft2c(images)
  zero_filled = np.fft.ifftshift(np.fft.ifft2(np.fft.fftshift(k0, axes=(-2, -1)), norm="ortho"),
                                 axes=(-2, -1))
  to_channels = lambda z: np.stack([z.real, z.imag], -1).astype(np.float32)
  return to_channels(zero_filled), to_channels(k0), mask.astype(np.float32), to_channels(images)


def count(params):
  return sum(np.size(p) for p in jax.tree_util.tree_leaves(params))


def test_output_shape_and_registry():
  x, k0, mask, _ = phantom_batch()
  model = get_model({"name": "deep_cascade", **TINY})
  assert isinstance(model, DeepCascade)
  params = model.init(jax.random.PRNGKey(0), x, k0, mask)["params"]
  assert model.apply({"params": params}, x, k0, mask).shape == x.shape
  # A column mask (B, 1, W) broadcasts like the full one.
  columns = mask[:, :1, :]
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, x, k0, columns)),
                             np.asarray(model.apply({"params": params}, x, k0, mask)), atol=1e-6)
  with pytest.raises(ValueError, match="broadcast"):
    model.apply({"params": params}, x, k0, mask[:, :5])


def test_noiseless_dc_is_enforced_in_the_output():
  x, k0, mask, _ = phantom_batch()
  model = DeepCascade(**TINY, identity_init=False)  # a random CNN really changes the image
  params = model.init(jax.random.PRNGKey(1), x, k0, mask)["params"]
  out = np.asarray(model.apply({"params": params}, x, k0, mask))
  k_out = np_fft2c(out[..., 0].astype(np.float64) + 1j * out[..., 1])
  k_meas = k0[..., 0] + 1j * k0[..., 1]
  sampled = mask > 0
  np.testing.assert_allclose(k_out[sampled], k_meas[sampled], atol=1e-5 * np.abs(k_meas).max())
  # ... and the CNN did change the unsampled k-space.
  assert np.abs(k_out[~sampled]).max() > 1e-2 * np.abs(k_meas).max()


def test_noisy_dc_closed_form_and_positive_learnt_lambda():
  """Identity-initialised CNNs: after n_c noisy DC layers, sampled k = k0 + (k_x - k0) / (1 + lam)^n_c."""
  x, k0, mask, _ = phantom_batch()
  rng = np.random.default_rng(3)
  x_any = rng.standard_normal(x.shape).astype(np.float32)  # not consistent with k0
  model = DeepCascade(**TINY, noisy_dc=True, lam_init=0.5)
  params = model.init(jax.random.PRNGKey(0), x_any, k0, mask)["params"]
  assert dc_lambdas(params) == pytest.approx({"cascade0": 0.5, "cascade1": 0.5}, rel=1e-5)
  out = np.asarray(model.apply({"params": params}, x_any, k0, mask))
  k_out = np_fft2c(out[..., 0].astype(np.float64) + 1j * out[..., 1])
  k_x = np_fft2c(x_any[..., 0].astype(np.float64) + 1j * x_any[..., 1])
  k_meas = k0[..., 0] + 1j * k0[..., 1]
  expected = np.where(mask > 0, k_meas + (k_x - k_meas) / 1.5 ** 2, k_x)
  np.testing.assert_allclose(k_out, expected, atol=1e-4)
  # lam gets a gradient, and stays positive however negative its raw parameter goes.
  loss = lambda p: jnp.sum(model.apply({"params": p}, x_any, k0, mask) ** 2)
  grads = jax.grad(loss)(params)
  assert abs(float(grads["cascade0"]["dc_lambda_raw"])) > 0
  params["cascade0"]["dc_lambda_raw"] = jnp.float32(-30.0)
  assert 0 < dc_lambdas(params)["cascade0"] < 1e-12


def test_weight_sharing_divides_parameters_by_num_cascades():
  x, k0, mask, _ = phantom_batch(batch=1)
  for noisy in (False, True):
    separate = DeepCascade(**{**TINY, "num_cascades": 3}, noisy_dc=noisy)
    shared = DeepCascade(**{**TINY, "num_cascades": 3}, noisy_dc=noisy, share_weights=True)
    n_sep = count(separate.init(jax.random.PRNGKey(0), x, k0, mask)["params"])
    n_sh = count(shared.init(jax.random.PRNGKey(0), x, k0, mask)["params"])
    # CNN: 2->8, 8->8, 8->2 3x3 convs with biases (+ lam).
    per_cascade = (9 * 2 * 8 + 8) + (9 * 8 * 8 + 8) + (9 * 8 * 2 + 2) + int(noisy)
    assert n_sh == per_cascade and n_sep == 3 * per_cascade


@pytest.mark.parametrize("share", [False, True])
def test_remat_gives_identical_outputs_and_gradients(share):
  x, k0, mask, target = phantom_batch()
  plain = DeepCascade(**TINY, share_weights=share, noisy_dc=True, identity_init=False)
  remat = DeepCascade(**TINY, share_weights=share, noisy_dc=True, identity_init=False, remat=True)
  params = plain.init(jax.random.PRNGKey(2), x, k0, mask)["params"]
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
      remat.init(jax.random.PRNGKey(2), x, k0, mask)["params"])

  def loss(model):
    return lambda p: jnp.mean((model.apply({"params": p}, x, k0, mask) - target) ** 2)

  v1, g1 = jax.value_and_grad(loss(plain))(params)
  v2, g2 = jax.value_and_grad(loss(remat))(params)
  np.testing.assert_allclose(float(v1), float(v2), rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_tiny_cascade_learns():
  x, k0, mask, target = phantom_batch(batch=4, seed=10)
  model = DeepCascade(**TINY)
  params = model.init(jax.random.PRNGKey(0), x, k0, mask)["params"]
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  def loss_fn(p):
    return jnp.mean((model.apply({"params": p}, x, k0, mask) - target) ** 2)

  @jax.jit
  def step(p, s):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  losses = []
  for _ in range(30):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  # Step 0 is the zero-filled error (identity init); training must cut it clearly.
  assert losses[-1] < 0.7 * losses[0], losses
