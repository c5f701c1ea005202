"""Losses: closed forms and an MS-SSIM written in NumPy/SciPy float64, gradients, descent, registry."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import structural_similarity

from ldct_jax import losses, metrics

# Wang, Simoncelli & Bovik (2003) scale weights, finest first, as published.
WANG_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
# Three MS-SSIM scales fit 48x48 images (11 * 2**2 = 44): keeps tests small.
THREE_SCALES = tuple(np.array(WANG_WEIGHTS[:3]) / sum(WANG_WEIGHTS[:3]))

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


def _ms_ssim_reference(pred, target, data_range, weights):
  """MS-SSIM per image in NumPy float64, written from Wang et al. (2003).

  Conventions as ``ldct_jax.metrics.ms_ssim`` documents them: at each scale the
  statistics under a Gaussian window (sigma 1.5, cut at 3.5 sigma, scipy
  'reflect' borders, population variances), ``C1 = (0.01 R)^2``, ``C2 = (0.03
  R)^2``, maps cropped by 5 px; the mean contrast-structure term at scales
  ``1..M-1`` and the mean SSIM (luminance x contrast-structure) at scale M;
  2x2 average pooling between scales (an odd last row/column dropped);
  negative per-scale terms clipped to 0; channels averaged with the pixels.
  """
  pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
  data_range = np.broadcast_to(np.asarray(data_range, np.float64), pred.shape[:1])
  blur = lambda a: ndimage.gaussian_filter(a, (1.5, 1.5, 0), mode="reflect", truncate=3.5)
  out = []
  for x, y, r in zip(pred, target, data_range):  # (H, W, C) each
    c1, c2 = (0.01 * r)**2, (0.03 * r)**2
    terms = []
    for scale in range(len(weights)):
      mx, my = blur(x), blur(y)
      vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
      cs = ((2 * cxy + c2) / (vx + vy + c2))[5:-5, 5:-5]
      lum = ((2 * mx * my + c1) / (mx**2 + my**2 + c1))[5:-5, 5:-5]
      if scale == len(weights) - 1:
        terms.append(np.mean(lum * cs))
      else:
        terms.append(np.mean(cs))
        h, w = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2
        x = x[:h, :w].reshape(h // 2, 2, w // 2, 2, -1).mean(axis=(1, 3))
        y = y[:h, :w].reshape(h // 2, 2, w // 2, 2, -1).mean(axis=(1, 3))
    out.append(np.prod(np.maximum(np.array(terms), 0.0) ** np.array(weights)))
  return np.array(out)


_ms_ssim_loss_jit = jax.jit(losses.ms_ssim_loss, static_argnames=("weights",))


def _image_pairs():
  """(pred, target, data_range) pairs that stress different MS-SSIM terms."""
  rng = np.random.default_rng(1)
  target = ndimage.gaussian_filter(rng.random((2, 53, 50, 2)), (0, 2, 2, 0))
  noise = 0.05 * rng.standard_normal(target.shape)
  return {
      "noise": (target + noise, target, 1.0),
      # Blur: structure lost at the fine scales, kept at the coarse ones.
      "blur": (ndimage.gaussian_filter(target, (0, 1.5, 1.5, 0)), target, 1.0),
      # Contrast and brightness change: luminance counts at the last scale;
      # a per-image data range scales C1, C2 differently per image.
      "contrast": (0.7 * target + 0.2 + noise, target, np.array([1.0, 0.5])),
      # Negated structure: negative contrast-structure terms clip to 0.
      "negated": (1.0 - target + 0.1 * noise, target, 1.0),
  }


def test_ms_ssim_reference_is_ssim_at_one_scale(images):
  # The reference's building blocks against scikit-image: with one scale
  # MS-SSIM is plain SSIM.
  target, noise = images
  pred = (target + noise).astype(np.float64)
  expected = [structural_similarity(pred[i, ..., 0], target[i, ..., 0], data_range=1.0,
                                    gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False) for i in range(2)]
  np.testing.assert_allclose(_ms_ssim_reference(pred, target, 1.0, (1.0,)), expected,
                             rtol=1e-10)


@pytest.mark.parametrize("pair", ["noise", "blur", "contrast", "negated"])
def test_ms_ssim_loss_matches_numpy_float64(pair):
  assert metrics.MS_SSIM_WEIGHTS == WANG_WEIGHTS
  pred, target, data_range = _image_pairs()[pair]
  expected = _ms_ssim_reference(pred, target, data_range, THREE_SCALES)
  if pair == "negated":
    assert np.all(expected == 0.0)
  else:
    assert np.all((expected > 0.3) & (expected < 0.999)), expected
  got = _ms_ssim_loss_jit(pred.astype(np.float32), target.astype(np.float32),
                          data_range, THREE_SCALES)
  # float32 against float64: measured differences are ~2e-7.
  np.testing.assert_allclose(got, 1.0 - np.mean(expected), atol=2e-6)


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


def test_mix_loss_matches_scipy_float64(images):
  target, noise = images
  pred = target + noise
  alpha, data_range = 0.84, 2.0
  weighted_l1 = ndimage.gaussian_filter(np.abs(noise.astype(np.float64)), (0, 1.5, 1.5, 0),
                                        mode="reflect", truncate=3.5)[:, 5:-5, 5:-5]
  ms = _ms_ssim_reference(pred, target, data_range, THREE_SCALES)
  expected = np.mean(alpha * (1 - ms)
                     + (1 - alpha) * weighted_l1.mean(axis=(1, 2, 3)) / data_range)
  got = jax.jit(losses.mix_loss, static_argnames=("alpha", "weights"))(
      pred, target, data_range, alpha, THREE_SCALES)
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
