"""Conv / ConvTranspose: every lowering against lax and flax.linen references.

Values and gradients (wrt input and kernel) must match
``lax.conv_general_dilated`` / ``lax.conv_transpose`` (the XLA convolutions,
an implementation independent of the matmul lowerings) and the Flax layers to
float32 tolerance. Shapes are tiny so the file runs in seconds on 2 cores.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax

from ldct_jax.models import layers

# 'auto' and 'matmul' resolve to one of the others; they are checked in the
# module tests and in test_auto_lowering_resolves_by_backend.
ALL_LOWERINGS = layers.LOWERINGS
# Loose enough for float32 sums over a few hundred terms in another order,
# tight enough to catch any misplaced tap (errors of order 1).
TOL = dict(rtol=2e-5, atol=2e-5)

# The matmul lowerings share their slicing and padding code and differ only
# in how taps are grouped into matmuls, so every case runs XLA and im2col and
# a covering subset (marked ALL) also runs 'rows' and 'taps'; compilation of
# the per-tap graphs dominates this file's run time.
ALL = ("xla",) + layers.MATMUL_LOWERINGS
BASIC = ("xla", "im2col")

# (kernel_size, strides, padding, dilation, groups, input spatial, lowerings)
CONV_CASES = [
    ((3, 3), 1, "SAME", 1, 1, (7, 6), ALL),
    ((3, 3), 1, "VALID", 1, 1, (7, 6), BASIC),
    ((5, 5), 1, "VALID", 1, 1, (9, 8), BASIC),
    ((3, 3), 2, "SAME", 1, 1, (7, 6), BASIC),
    ((3, 2), 2, "VALID", 1, 1, (8, 7), ALL),
    ((3, 3), 1, ((2, 0), (1, 3)), 1, 1, (5, 6), BASIC),
    ((3, 3), 2, 1, 1, 1, (6, 7), BASIC),
    ((3, 3), 1, "SAME", 2, 1, (7, 8), BASIC),
    ((3, 3), 2, ((1, -1), (0, 2)), 2, 1, (9, 8), ALL),
    ((3, 3), 1, "SAME", 1, 2, (5, 6), ALL),
    ((1, 1), 2, "VALID", 1, 1, (5, 4), BASIC),
    ((2, 3, 2), 1, "SAME", 1, 1, (4, 5, 4), ALL),
    ((3, 3, 3), 2, "VALID", 1, 1, (5, 5, 6), BASIC),
    ((2, 3, 2), 1, ((0, 1), (1, 0), (2, 2)), (1, 2, 1), 2, (4, 6, 4), BASIC),
]

# (kernel_size, strides, padding, dilation, input spatial, lowerings)
TRANSPOSE_CASES = [
    ((5, 5), 1, "VALID", 1, (4, 5), BASIC),
    ((3, 3), 1, "SAME", 1, (4, 5), ALL),
    ((2, 2), 2, "VALID", 1, (3, 4), ALL),
    ((3, 3), 2, "SAME", 1, (3, 4), BASIC),
    ((3, 3), 2, "VALID", 1, (3, 4), BASIC),
    ((4, 3), 2, ((1, 2), (0, 1)), 1, (3, 3), ALL),
    ((3, 3), 2, "SAME", 2, (3, 4), BASIC),
    ((1, 1), 3, "SAME", 1, (2, 3), BASIC),
    ((3, 3), 1, "VALID", 2, (4, 3), BASIC),
    ((3, 2, 2), 1, "VALID", 1, (2, 3, 2), BASIC),
    ((2, 2, 2), 2, "SAME", 1, (2, 3, 2), ALL),
]


def _case_id(case):
  return "-".join(str(part).replace(" ", "") for part in case)


def _broadcast(value, rank):
  return (value,) * rank if isinstance(value, int) else tuple(value)


def _random(shape, seed):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _value_and_grads(fn, x, kernel, cotangent):
  """Output and the VJP of a fixed cotangent wrt input and kernel."""
  y, vjp = jax.vjp(fn, x, kernel)
  return (y,) + vjp(cotangent)


def _check_lowerings(lowerings, ours, reference, x, kernel, seed):
  """Compares ``ours(x, kernel, lowering)`` with ``reference``: value and
  both gradients, for each of ``lowerings``.

  All lowerings go through one jit so each case compiles once (compilation,
  not arithmetic, dominates these tiny tests).
  """
  cotangent = _random(reference(x, kernel).shape, seed)
  expected = _value_and_grads(reference, x, kernel, cotangent)

  @jax.jit
  def all_lowerings(x, kernel, cotangent):
    return {lowering: _value_and_grads(
        lambda x, k: ours(x, k, lowering), x, kernel, cotangent)
            for lowering in lowerings}

  for lowering, actual in all_lowerings(x, kernel, cotangent).items():
    for name, got, want in zip(("value", "grad_x", "grad_kernel"), actual,
                               expected):
      assert got.shape == want.shape, (lowering, name)
      np.testing.assert_allclose(got, want, err_msg=f"{lowering} {name}",
                                 **TOL)


@pytest.mark.parametrize("case", CONV_CASES, ids=_case_id)
def test_conv_matches_lax_value_and_grads(case):
  kernel_size, strides, padding, dilation, groups, spatial, lowerings = case
  rank = len(kernel_size)
  in_features, out_features = 2 * groups, 3 * groups
  x = _random((2,) + spatial + (in_features,), 0)
  kernel = _random(kernel_size + (in_features // groups, out_features), 1)
  strides, dilation = _broadcast(strides, rank), _broadcast(dilation, rank)
  pads = layers.conv_padding(padding, spatial, kernel_size, strides, dilation)
  dn = ("NHWC", "HWIO", "NHWC") if rank == 2 else ("NDHWC", "DHWIO", "NDHWC")
  lax_padding = padding if isinstance(padding, str) else pads

  def reference(x, kernel):
    return lax.conv_general_dilated(
        x, kernel, strides, lax_padding, rhs_dilation=dilation,
        dimension_numbers=dn, feature_group_count=groups)

  def ours(x, kernel, lowering):
    return layers.conv_general(x, kernel, strides, pads, dilation, groups,
                               lowering)

  _check_lowerings(lowerings, ours, reference, x, kernel, seed=2)


@pytest.mark.parametrize("case", TRANSPOSE_CASES, ids=_case_id)
def test_conv_transpose_matches_lax_value_and_grads(case):
  kernel_size, strides, padding, dilation, spatial, lowerings = case
  rank = len(kernel_size)
  x = _random((2,) + spatial + (3,), 3)
  kernel = _random(kernel_size + (3, 2), 4)
  strides, dilation = _broadcast(strides, rank), _broadcast(dilation, rank)
  pads = layers.conv_transpose_padding(padding, kernel_size, strides, dilation)
  dn = ("NHWC", "HWIO", "NHWC") if rank == 2 else ("NDHWC", "DHWIO", "NDHWC")
  lax_padding = padding if isinstance(padding, str) else pads

  def reference(x, kernel):
    return lax.conv_transpose(x, kernel, strides, lax_padding,
                              rhs_dilation=dilation, dimension_numbers=dn)

  def ours(x, kernel, lowering):
    return layers.conv_transpose_general(x, kernel, strides, pads, dilation,
                                         1, lowering)

  _check_lowerings(lowerings, ours, reference, x, kernel, seed=5)


def test_transposed_conv_sizes_follow_flax_rules():
  x = jnp.zeros((1, 6, 7, 1))
  sizes = {}
  for padding, strides, kernel in [("VALID", 1, 5), ("SAME", 2, 3),
                                   ("VALID", 2, 3), ("VALID", 2, 2)]:
    layer = layers.ConvTranspose(1, (kernel, kernel), strides, padding,
                                 lowering="matmul")
    sizes[(padding, strides, kernel)] = layer.init_with_output(
        jax.random.PRNGKey(0), x)[0].shape[1:3]
  # VALID stride 1 grows by k - 1 (the RED-CNN decoder); SAME multiplies by
  # the stride; VALID stride s gives in * s + max(k - s, 0).
  assert sizes[("VALID", 1, 5)] == (10, 11)
  assert sizes[("SAME", 2, 3)] == (12, 14)
  assert sizes[("VALID", 2, 3)] == (13, 15)
  assert sizes[("VALID", 2, 2)] == (12, 14)


LAYER_CASES = [
    dict(kernel_size=(3, 3), strides=2, padding="SAME"),
    dict(kernel_size=(3, 3), padding="VALID", kernel_dilation=2),
    dict(kernel_size=(3, 3), padding=((1, 2), (0, 1)), feature_group_count=2),
    dict(kernel_size=(2, 3, 3), padding="SAME", use_bias=False),
]


@pytest.mark.parametrize("kwargs", LAYER_CASES, ids=_case_id)
def test_conv_module_is_a_drop_in_for_flax_conv(kwargs):
  rank = len(kwargs["kernel_size"])
  x = _random((2,) + (6,) * rank + (4,), 6)
  flax_layer = nn.Conv(6, **kwargs)
  key = jax.random.PRNGKey(7)
  flax_vars = flax_layer.init(key, x)
  expected = flax_layer.apply(flax_vars, x)
  for lowering in ALL_LOWERINGS:
    ours = layers.Conv(6, lowering=lowering, **kwargs)
    our_vars = ours.init(key, x)
    # Same names, shapes and, with the same key, the same initial values.
    assert jax.tree.map(jnp.shape, our_vars) == jax.tree.map(jnp.shape,
                                                             flax_vars)
    jax.tree.map(np.testing.assert_array_equal, our_vars, flax_vars)
    np.testing.assert_allclose(ours.apply(flax_vars, x), expected, **TOL)


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=(5, 5), padding="VALID"),
    dict(kernel_size=(2, 2), strides=2, padding="VALID"),
    dict(kernel_size=(3, 3), strides=2, padding="SAME", kernel_dilation=2),
    dict(kernel_size=(2, 2, 2), strides=2, padding="SAME"),
], ids=_case_id)
def test_conv_transpose_module_is_a_drop_in_for_flax(kwargs):
  rank = len(kwargs["kernel_size"])
  x = _random((2,) + (4,) * rank + (3,), 8)
  flax_layer = nn.ConvTranspose(5, **kwargs)
  key = jax.random.PRNGKey(9)
  flax_vars = flax_layer.init(key, x)
  # A non-zero bias, so the test also sees that the bias is added.
  flax_vars = jax.tree.map(lambda v: v + 0.5, flax_vars)
  expected = flax_layer.apply(flax_vars, x)
  for lowering in ALL_LOWERINGS:
    ours = layers.ConvTranspose(5, lowering=lowering, **kwargs)
    assert (jax.tree.map(jnp.shape, ours.init(key, x))
            == jax.tree.map(jnp.shape, flax_vars))
    np.testing.assert_allclose(ours.apply(flax_vars, x), expected, **TOL)


def test_extra_batch_axes_are_flattened_like_flax():
  x = _random((2, 3, 5, 5, 2), 10)
  flax_vars = nn.Conv(4, (3, 3)).init(jax.random.PRNGKey(0), x)
  expected = nn.Conv(4, (3, 3)).apply(flax_vars, x)
  got = layers.Conv(4, (3, 3), lowering="matmul").apply(flax_vars, x)
  assert got.shape == (2, 3, 5, 5, 4)
  np.testing.assert_allclose(got, expected, **TOL)


def test_bfloat16_compute_dtype():
  x = _random((1, 6, 6, 2), 11)
  layer = layers.Conv(3, (3, 3), dtype=jnp.bfloat16, lowering="matmul")
  variables = layer.init(jax.random.PRNGKey(0), x)
  y = layer.apply(variables, x)
  assert y.dtype == jnp.bfloat16
  assert variables["params"]["kernel"].dtype == jnp.float32
  reference = layers.Conv(3, (3, 3), lowering="xla").apply(variables, x)
  # bf16 keeps 8 mantissa bits: agreement to ~1 %, not to float32 precision.
  np.testing.assert_allclose(y.astype(jnp.float32), reference, rtol=0.05,
                             atol=0.05)


def test_auto_lowering_resolves_by_backend():
  expected = "matmul" if jax.default_backend() == "cpu" else "xla"
  assert layers.resolve_lowering("auto") == expected
  with pytest.raises(ValueError, match="unknown conv lowering"):
    layers.resolve_lowering("fft")


def test_choose_matmul_lowering_by_buffer_size():
  limit = layers.IM2COL_MAX_BYTES
  assert layers.choose_matmul_lowering(limit, limit // 5) == "im2col"
  assert layers.choose_matmul_lowering(limit + 1, limit // 5) == "rows"
  assert layers.choose_matmul_lowering(
      10 * limit, layers.ROWS_MAX_BYTES + 1) == "taps"


def test_empty_output_and_bad_padding_raise():
  x = jnp.zeros((1, 3, 3, 1))
  with pytest.raises(ValueError, match="empty"):
    layers.Conv(1, (5, 5), padding="VALID", lowering="im2col").init(
        jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="padding"):
    layers.Conv(1, (3, 3), padding="REFLECT").init(jax.random.PRNGKey(0), x)
