"""CPCE-2D / CPCE-3D: shapes, parameter counts, and 2D -> 3D inflation.

Widths are tiny (2-8 features, 12-20 px): compilation dominates the run time.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldct_jax import models
from ldct_jax.models.cpce import CPCE2D, CPCE3D, inflate_2d_to_3d


def _random(shape, seed):
  return jax.random.uniform(jax.random.PRNGKey(seed), shape, jnp.float32)


def _count(params):
  return sum(leaf.size for leaf in jax.tree.leaves(params))


def _expected_params(features, channels, num_3d, num_layers=4, depth=3,
                     bias=False):
  """Weights from the layer table in the cpce docstring."""
  f, c = features, channels
  conv_sizes = ([(c, f)] + [(f, f)] * (num_layers - 1))
  total = 0
  for index, (cin, cout) in enumerate(conv_sizes):
    taps = 9 * (depth if index < num_3d else 1)
    total += taps * cin * cout + bias * cout
  total += (num_layers - 1) * (9 * f * f + bias * f)  # deconv1..3
  total += 9 * f * c + bias * c                        # deconv4
  total += (num_layers - 1) * (2 * f * f + bias * f)   # 1x1 reduces
  return total


def test_registry_names():
  assert models.get_model_class("cpce2d") is CPCE2D
  assert models.get_model_class("cpce3d") is CPCE3D


def test_cpce2d_shape_and_paper_parameter_count():
  model = CPCE2D()
  x = _random((2, 20, 18, 1), 0)
  variables = model.init(jax.random.PRNGKey(0), x)
  y = model.apply(variables, x)
  assert y.shape == x.shape
  assert float(y.min()) >= 0.0  # final ReLU
  # Paper width, no bias: 288 + 3*9216 (convs) + 3*9216 + 288 (deconvs)
  # + 3*2048 (1x1 reduces).
  assert _count(variables["params"]) == 62016
  assert _count(variables["params"]) == _expected_params(32, 1, 0)
  assert set(variables["params"]) == (
      {f"conv{i}" for i in range(1, 5)} | {f"deconv{i}" for i in range(1, 5)}
      | {f"reduce{i}" for i in range(1, 4)})


@pytest.mark.parametrize("slices", [3, 5, 9])
def test_cpce3d_shapes_and_parameter_counts(slices):
  model = CPCE3D(features=4)
  x = _random((2, slices, 16, 17, 1), 1)
  variables = model.init(jax.random.PRNGKey(0), x)
  y = model.apply(variables, x)
  assert y.shape == (2, 16, 17, 1)
  num_3d = (slices - 1) // 2
  params = variables["params"]
  for depth in range(1, 5):
    assert params[f"conv{depth}"]["kernel"].ndim == (5 if depth <= num_3d
                                                     else 4)
  assert _count(params) == _expected_params(4, 1, num_3d)


def test_bias_and_channels_are_counted():
  model = CPCE2D(features=5, use_bias=True)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 12, 12, 2)))
  assert _count(variables["params"]) == _expected_params(5, 2, 0, bias=True)


@pytest.mark.parametrize("slices", [3, 9])
def test_inflated_3d_equals_2d_on_the_central_slice(slices):
  model_2d = CPCE2D(features=6, use_bias=True)
  slab = _random((2, slices, 18, 16, 1), 2)
  central = slab[:, slices // 2]
  params_2d = model_2d.init(jax.random.PRNGKey(3), central)["params"]
  # Non-zero biases, so the test also sees that they are carried over.
  params_2d = jax.tree.map(lambda p: p + 0.01, params_2d)
  expected = model_2d.apply({"params": params_2d}, central)
  params_3d = inflate_2d_to_3d(params_2d, depth=3, slices=slices)
  model_3d = CPCE3D(features=6, use_bias=True)
  # Same structure as a freshly initialised 3D model.
  fresh = model_3d.init(jax.random.PRNGKey(0), slab)["params"]
  assert (jax.tree.map(jnp.shape, params_3d)
          == jax.tree.map(jnp.shape, dict(fresh)))
  got = model_3d.apply({"params": params_3d}, slab)
  assert float(jnp.abs(expected).max()) > 0  # not a trivially dead network
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  # The off-centre slices really are ignored: changing them changes nothing.
  others = slab.at[:, 0].set(5.0).at[:, -1].set(-3.0)
  np.testing.assert_allclose(model_3d.apply({"params": params_3d}, others),
                             expected, rtol=1e-5, atol=1e-6)


def test_inflated_kernel_layout():
  kernel = _random((3, 3, 1, 4), 4)
  params = inflate_2d_to_3d({"conv1": {"kernel": kernel}, "conv2": {},
                             "conv3": {}, "conv4": {}}, slices=3)
  inflated = params["conv1"]["kernel"]
  assert inflated.shape == (3, 3, 3, 1, 4)
  np.testing.assert_array_equal(inflated[1], kernel)
  np.testing.assert_array_equal(inflated[0], 0)
  np.testing.assert_array_equal(inflated[2], 0)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="larger than 8"):
    CPCE2D(features=2).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 12, 1)))
  with pytest.raises(ValueError, match="1 \\+ a multiple of 2"):
    CPCE3D(features=2).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 12, 12, 1)))
  with pytest.raises(ValueError, match="more than the 4"):
    CPCE3D(features=2).init(jax.random.PRNGKey(0),
                            jnp.zeros((1, 11, 12, 12, 1)))
