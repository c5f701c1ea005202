"""Baseline models: shapes, parameter counts, structure, lowerings, batch norm.

Widths and images are tiny (a few channels, 16-24 px) so the file runs in
seconds; the RED-CNN paper configuration is only initialised abstractly
(``jax.eval_shape``), never run.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from ldct_jax.models.dncnn import DnCNN, dilation_schedule
from ldct_jax.models.redcnn import REDCNN
from ldct_jax.models.unet import UNet

TOL = dict(rtol=2e-5, atol=2e-5)


def _images(shape=(2, 24, 24, 1), seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), shape, jnp.float32)


def _param_count(params):
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def test_redcnn_paper_size_parameter_count():
  variables = jax.eval_shape(REDCNN().init, jax.random.PRNGKey(0),
                             jnp.zeros((1, 64, 64, 1)))
  # conv1 5*5*1*96+96, conv2-5 and deconv1-4 4+4 x (5*5*96*96+96),
  # deconv5 5*5*96*1+1 (Chen et al. 2017: ~1.85 M).
  expected = (25 * 96 + 96) + 8 * (25 * 96 * 96 + 96) + (25 * 96 + 1)
  assert expected == 1_848_865
  assert _param_count(variables["params"]) == expected


def test_redcnn_matches_an_independent_forward_pass():
  """The paper's wiring, written out with flax.linen layers, on random params.

  conv1..conv5 (VALID, ReLU); deconv1 + conv4 output -> ReLU; deconv2 ->
  ReLU; deconv3 + conv2 output -> ReLU; deconv4 -> ReLU; deconv5 + input ->
  ReLU.
  """
  model = REDCNN(features=4, kernel_size=3, num_layers=5,
                 conv_lowering="matmul")
  x = _images() - 0.3  # some negative inputs, so the final ReLU matters
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"]
  # Non-zero biases so that a missing or misplaced bias shows.
  params = jax.tree.map(lambda p: p + 0.05, params)

  def conv(name, h):
    return nn.Conv(4, (3, 3), padding="VALID").apply(
        {"params": params[name]}, h)

  def deconv(name, h, features=4):
    return nn.ConvTranspose(features, (3, 3), padding="VALID").apply(
        {"params": params[name]}, h)

  c1 = nn.relu(conv("conv1", x))
  c2 = nn.relu(conv("conv2", c1))
  c3 = nn.relu(conv("conv3", c2))
  c4 = nn.relu(conv("conv4", c3))
  c5 = nn.relu(conv("conv5", c4))
  d1 = nn.relu(deconv("deconv1", c5) + c4)
  d2 = nn.relu(deconv("deconv2", d1))
  d3 = nn.relu(deconv("deconv3", d2) + c2)
  d4 = nn.relu(deconv("deconv4", d3))
  expected = nn.relu(deconv("deconv5", d4, features=1) + x)
  got = jax.jit(model.apply)({"params": params}, x)
  assert got.shape == x.shape
  assert np.any(np.asarray(expected) == 0) and np.any(np.asarray(expected) > 0)
  np.testing.assert_allclose(got, expected, **TOL)


def test_redcnn_rejects_too_small_images():
  with pytest.raises(ValueError, match="larger than 20 px"):
    REDCNN(features=2).init(jax.random.PRNGKey(0), jnp.zeros((1, 20, 20, 1)))


def test_dncnn_zero_last_layer_is_identity():
  model = DnCNN(depth=4, features=4, conv_lowering="matmul", identity_init=False)
  x = _images()
  variables = model.init(jax.random.PRNGKey(0), x)
  params = dict(variables["params"])
  params["conv_out"] = jax.tree.map(jnp.zeros_like, params["conv_out"])
  out = model.apply({**variables, "params": params}, x)
  np.testing.assert_array_equal(out, x)
  # And with the trained-looking (random) last layer it is not the identity.
  assert not np.allclose(model.apply(variables, x), x)


def test_dncnn_starts_as_the_identity_by_default():
  """identity_init (the default) zero-initialises only the noise head."""
  x = _images()
  variables = DnCNN(depth=4, features=4, conv_lowering="matmul").init(jax.random.PRNGKey(0), x)
  np.testing.assert_array_equal(variables["params"]["conv_out"]["kernel"], 0.0)
  assert np.all(np.abs(variables["params"]["conv1"]["kernel"]) > 0)  # the rest is random
  np.testing.assert_array_equal(
      DnCNN(depth=4, features=4, conv_lowering="matmul").apply(variables, x), x)


def test_dncnn_dilation_schedule():
  assert dilation_schedule(7, True) == (1, 2, 3, 4, 3, 2, 1)
  assert dilation_schedule(9, True) == (1, 2, 3, 4, 3, 2, 1, 2, 3)
  assert dilation_schedule(5, False) == (1,) * 5


def test_dncnn_dilated_receptive_field():
  """An impulse spreads by the sum of the layers' dilations, per side."""
  x = jnp.zeros((1, 33, 33, 1)).at[0, 16, 16, 0].set(1.0)
  for dilated, reach in ((False, 1 + 1 + 1), (True, 1 + 2 + 3)):
    model = DnCNN(depth=3, features=2, use_bn=False, dilated=dilated,
                  conv_lowering="matmul", identity_init=False)
    variables = model.init(jax.random.PRNGKey(0), x)
    # Positive kernels and zero biases: every pixel the impulse can reach
    # through the ReLUs is non-zero, every other pixel is exactly zero.
    variables = jax.tree.map(
        lambda p: jnp.abs(p) if p.ndim > 1 else jnp.zeros_like(p), variables)
    changed = np.argwhere(np.asarray(model.apply(variables, x) - x)[0, :, :, 0])
    assert changed[:, 0].min() == 16 - reach
    assert changed[:, 0].max() == 16 + reach
    assert changed[:, 1].max() == 16 + reach


def test_dncnn_batch_norm_train_vs_eval():
  model = DnCNN(depth=3, features=4, conv_lowering="matmul", identity_init=False)
  x = _images(seed=1) * 3.0 + 1.0
  variables = model.init(jax.random.PRNGKey(0), x)
  stats = variables["batch_stats"]["bn1"]
  np.testing.assert_array_equal(stats["mean"], 0.0)
  np.testing.assert_array_equal(stats["var"], 1.0)
  eval_out = model.apply(variables, x, train=False)
  train_out, updates = model.apply(variables, x, train=True,
                                   mutable=["batch_stats"])
  # Fresh running stats (0, 1) differ from the batch's, so train != eval.
  assert not np.allclose(train_out, eval_out)
  # Train mode normalises with the batch's own statistics: the output does
  # not depend on the running averages it starts from.
  shifted = jax.tree.map(lambda v: v + 7.0, variables["batch_stats"])
  np.testing.assert_allclose(
      model.apply({**variables, "batch_stats": shifted}, x, train=True,
                  mutable=["batch_stats"])[0], train_out, **TOL)
  # The running averages move by (1 - momentum) towards the batch's (biased)
  # statistics of bn1's input, recomputed here with flax.linen layers.
  params = variables["params"]
  h = nn.relu(nn.Conv(4, (3, 3)).apply({"params": params["conv_in"]}, x))
  pre_bn = nn.Conv(4, (3, 3), use_bias=False).apply(
      {"params": params["conv1"]}, h)
  new_stats = updates["batch_stats"]["bn1"]
  momentum = model.bn_momentum
  np.testing.assert_allclose(new_stats["mean"],
                             (1 - momentum) * pre_bn.mean(axis=(0, 1, 2)),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(
      new_stats["var"],
      momentum + (1 - momentum) * pre_bn.var(axis=(0, 1, 2)), rtol=1e-4)
  with pytest.raises(Exception, match="batch_stats"):
    model.apply(variables, x, train=True)  # the collection must be mutable


def test_unet_shapes_and_residual():
  model = UNet(features=2, depth=2, conv_lowering="matmul")
  x = _images((2, 8, 12, 2))  # two channels in, two out; non-square
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  out = jax.jit(model.apply)(variables, x)
  assert out.shape == x.shape
  assert not np.allclose(out, x)
  # Zero output conv: the network adds nothing to its input.
  params = dict(variables["params"])
  params["conv_out"] = jax.tree.map(jnp.zeros_like, params["conv_out"])
  np.testing.assert_array_equal(
      jax.jit(model.apply)({"params": params}, x), x)


def test_unet_rejects_sizes_not_divisible():
  with pytest.raises(ValueError, match="divisible by 4"):
    UNet(features=2, depth=2).init(jax.random.PRNGKey(0),
                                   jnp.zeros((1, 16, 18, 1)))


MODELS = {
    "redcnn": (REDCNN, dict(features=3, kernel_size=3, num_layers=3),
               (2, 16, 16, 1)),
    "dncnn": (DnCNN, dict(depth=4, features=3, identity_init=False), (2, 12, 12, 1)),
    "dncnn_dilated": (DnCNN, dict(depth=5, features=3, dilated=True, identity_init=False),
                      (2, 12, 12, 1)),
    "unet": (UNet, dict(features=2, depth=2), (2, 8, 8, 1)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_agree_across_lowerings(name):
  """Same params, same output and gradient, whatever the conv lowering."""
  cls, kwargs, shape = MODELS[name]
  x = _images(shape, seed=2)
  variables = cls(conv_lowering="xla", **kwargs).init(jax.random.PRNGKey(3), x)

  @functools.partial(jax.jit, static_argnums=0)
  def run(lowering):
    model = cls(conv_lowering=lowering, **kwargs)

    def loss(params):
      out, _ = model.apply({**variables, "params": params}, x, train=True,
                           mutable=["batch_stats"])
      return jnp.mean((out - 0.5) ** 2), out

    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(
        variables["params"])
    assert out.shape == x.shape
    return out, grads, model.apply(variables, x)

  reference = run("xla")
  # On CPU 'auto' and 'matmul' resolve to im2col at these sizes; 'taps' is
  # the other end of the matmul family.
  for lowering in ("auto", "taps"):
    got = run(lowering)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                         atol=1e-5),
                 got, reference)
