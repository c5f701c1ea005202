"""Losses: closed forms in NumPy/SciPy float64, gradients, descent toward the target, registry."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import structural_similarity

from ldct_jax import losses, metrics

# Three MS-SSIM scales fit 48x48 images (11 * 2**2 = 44): keeps tests small.
THREE_SCALES = tuple(np.array(metrics.MS_SSIM_WEIGHTS[:3]) / sum(metrics.MS_SSIM_WEIGHTS[:3]))

LOSS_KWARGS = {
    "l1": {},
    "l2": {},
    "charbonnier": {},
    "ssim": {"data_range": 1.0},
    "ms_ssim": {"data_range": 1.0, "weights": THREE_SCALES},
    "mix": {"data_range": 1.0, "weights": THREE_SCALES},
}


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(0)
  target = ndimage.gaussian_filter(rng.random((2, 48, 48, 1)), (0, 2, 2, 0))
  noise = 0.05 * rng.standard_normal(target.shape)
  return target.astype(np.float32), noise.astype(np.float32)


@pytest.fixture(scope="module")
def jitted_losses():
  # Jit once per loss: eager SSIM dispatches many small ops, each compiled.
  return {name: jax.jit(losses.get_loss(name, **kwargs))
          for name, kwargs in LOSS_KWARGS.items()}


@pytest.fixture(scope="module")
def jitted_grads():
  return {name: jax.jit(jax.grad(losses.get_loss(name, **kwargs)))
          for name, kwargs in LOSS_KWARGS.items()}


def test_pixel_losses_closed_forms(images):
  target, noise = images
  pred = target + noise
  err = noise.astype(np.float64)
  np.testing.assert_allclose(losses.l1_loss(pred, target), np.mean(np.abs(err)), rtol=1e-4)
  np.testing.assert_allclose(jax.grad(losses.l1_loss)(pred, target),
                             np.sign(err) / err.size, rtol=1e-6)
  np.testing.assert_allclose(losses.l2_loss(pred, target), np.mean(err**2), rtol=1e-4)
  np.testing.assert_allclose(losses.charbonnier_loss(pred, target, eps=0.01),
                             np.mean(np.sqrt(err**2 + 1e-4)), rtol=1e-4)


def test_ssim_losses_are_one_minus_metric(images):
  target, noise = images
  pred = target + noise
  expected_ssim = np.mean([
      structural_similarity(target[i, ..., 0], pred[i, ..., 0], data_range=1.0,
                            gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
      for i in range(2)])
  np.testing.assert_allclose(losses.ssim_loss(pred, target, 1.0), 1 - expected_ssim,
                             atol=1e-4)
  np.testing.assert_allclose(
      losses.ms_ssim_loss(pred, target, 1.0, THREE_SCALES),
      1 - np.mean(metrics.ms_ssim(pred, target, 1.0, THREE_SCALES)), atol=1e-6)


def test_mix_loss_matches_scipy_float64(images):
  target, noise = images
  pred = target + noise
  alpha, data_range = 0.84, 2.0
  weighted_l1 = ndimage.gaussian_filter(np.abs(noise.astype(np.float64)), (0, 1.5, 1.5, 0),
                                        mode="reflect", truncate=3.5)[:, 5:-5, 5:-5]
  ms = np.asarray(metrics.ms_ssim(pred, target, data_range, THREE_SCALES), np.float64)
  expected = np.mean(alpha * (1 - ms)
                     + (1 - alpha) * weighted_l1.mean(axis=(1, 2, 3)) / data_range)
  got = losses.mix_loss(pred, target, data_range, alpha, THREE_SCALES)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(LOSS_KWARGS))
def test_gradients_finite_and_zero_at_target(images, jitted_grads, name):
  target, noise = images
  grad_fn = jitted_grads[name]
  noisy_grad = grad_fn(jnp.asarray(target + noise), target)
  assert np.all(np.isfinite(noisy_grad)) and np.abs(noisy_grad).max() > 0
  # Every loss is minimal at pred == target, where its gradient vanishes.
  np.testing.assert_allclose(grad_fn(jnp.asarray(target), target), 0.0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(LOSS_KWARGS))
def test_losses_decrease_toward_target(images, jitted_losses, jitted_grads, name):
  target, noise = images
  loss_fn = jitted_losses[name]
  values = [float(loss_fn(target + t * noise, target)) for t in (1.0, 0.5, 0.25, 0.0)]
  assert all(a > b for a, b in zip(values, values[1:])), values
  # A gradient step from the noisy image lowers the loss too.
  pred = jnp.asarray(target + noise)
  step = jitted_grads[name](pred, target)
  step_size = 1e-3 / float(jnp.abs(step).max())
  assert float(loss_fn(pred - step_size * step, target)) < values[0]


def test_registry_and_argument_checks(images):
  target, noise = images
  assert set(losses.LOSSES) == {"l1", "l2", "ssim", "ms_ssim", "mix", "charbonnier"}
  l1 = losses.get_loss("l1")
  np.testing.assert_allclose(l1(target + noise, target), losses.l1_loss(target + noise, target))
  with pytest.raises(ValueError, match="unknown loss"):
    losses.get_loss("perceptual")
  with pytest.raises(ValueError, match="data_range"):
    losses.get_loss("ssim")
  with pytest.raises(ValueError, match="bad arguments"):
    losses.get_loss("ssim", data_range=1.0, sigm=2.0)
  with pytest.raises(ValueError, match="needs H, W >= 176"):
    losses.get_loss("mix", data_range=1.0)(target, target)
