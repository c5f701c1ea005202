"""GCN denoiser: kNN graph vs brute force, GraphConv vs a dense-Theta reference.

Also: translation equivariance in the interior, residual output, gradients,
jit, chunking invariance and the parameter counts of GCNDenoiser and its
LocalCNN control, derived layer by layer from the architecture. Shapes are tiny so the file runs in about a minute.
"""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldct_jax.models import gcn

TOL = dict(rtol=1e-5, atol=1e-5)


def _random(shape, seed):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _param_count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _knn_reference(features, k, search_window, exclude_radius):
  """Brute force in float64: per pixel, sort every allowed candidate."""
  features = np.asarray(features, np.float64)
  batch, height, width, _ = features.shape
  radius = search_window // 2
  indices = np.zeros((batch, height, width, k), np.int64)
  distances = np.zeros((batch, height, width, k))
  for b, y, x in itertools.product(range(batch), range(height), range(width)):
    cands = []
    for dy, dx in itertools.product(range(-radius, radius + 1), repeat=2):
      if abs(dy) <= exclude_radius and abs(dx) <= exclude_radius:
        continue
      yy, xx = y + dy, x + dx
      if 0 <= yy < height and 0 <= xx < width:
        dist = np.sum((features[b, yy, xx] - features[b, y, x]) ** 2)
        cands.append((dist, yy * width + xx))
    cands.sort()
    distances[b, y, x] = [c[0] for c in cands[:k]]
    indices[b, y, x] = [c[1] for c in cands[:k]]
  return indices, distances


def test_knn_finds_planted_duplicates_and_skips_local_and_far_ones():
  height = width = 13
  feats = np.array(_random((1, height, width, 4), 0))
  p = (6, 6)
  planted = [(2, 3), (10, 9), (6, 11)]  # |dy|, |dx| <= 5: inside window 11
  decoys = [(6, 7), (5, 5),  # local 3x3 neighbours: excluded
            (0, 0), (12, 6)]  # |dy| = 6 > 5: outside the window
  for y, x in planted + decoys:
    feats[0, y, x] = feats[0, p[0], p[1]]
  indices, distances = gcn.knn_graph(jnp.asarray(feats), 5, 11)
  got = [divmod(int(i), width) for i in indices[0, p[0], p[1]]]
  assert sorted(got[:3]) == sorted(planted)
  np.testing.assert_array_equal(distances[0, p[0], p[1], :3], 0.0)
  # The other two are ordinary, strictly farther pixels, none of the decoys.
  assert np.all(np.asarray(distances[0, p[0], p[1], 3:]) > 0)
  assert not set(got[3:]) & set(decoys)


@pytest.mark.parametrize("search_window,exclude_radius,k,chunk_rows", [
    (7, 1, 6, None), (7, 1, 6, 2), (7, 1, 6, 4), (5, 0, 4, 3)])
def test_knn_matches_brute_force(search_window, exclude_radius, k,
                                 chunk_rows):
  feats = _random((2, 9, 11, 3), 1)
  indices, distances = gcn.knn_graph(feats, k, search_window, exclude_radius,
                                     chunk_rows=chunk_rows)
  ref_indices, ref_distances = _knn_reference(feats, k, search_window,
                                              exclude_radius)
  assert indices.shape == distances.shape == (2, 9, 11, k)
  assert indices.dtype == jnp.int32
  # Random float features: no ties, so the ordered lists must agree.
  np.testing.assert_array_equal(indices, ref_indices)
  np.testing.assert_allclose(distances, ref_distances, **TOL)


def test_knn_chunked_equals_unchunked_under_jit():
  feats = _random((1, 10, 7, 5), 2)
  knn = jax.jit(gcn.knn_graph, static_argnums=(1, 2, 3, 4))
  whole = knn(feats, 5, 5, 1, 10)
  for rows in (1, 3, 4):
    chunked = knn(feats, 5, 5, 1, rows)
    np.testing.assert_array_equal(whole[0], chunked[0])
    np.testing.assert_array_equal(whole[1], chunked[1])


def test_knn_stays_in_window_and_image_at_borders():
  height, width, radius, k = 7, 8, 2, 5
  # k = 5 is every candidate a corner pixel has in a 5x5 window (3x3 - 4).
  indices, _ = gcn.knn_graph(_random((2, height, width, 2), 3), k,
                             2 * radius + 1)
  indices = np.asarray(indices)
  assert indices.min() >= 0 and indices.max() < height * width
  ys, xs = np.divmod(indices, width)
  dy = ys - np.arange(height)[None, :, None, None]
  dx = xs - np.arange(width)[None, None, :, None]
  assert np.all(np.abs(dy) <= radius) and np.all(np.abs(dx) <= radius)
  assert not np.any((np.abs(dy) <= 1) & (np.abs(dx) <= 1))
  # No pixel lists a neighbour twice.
  assert all(len(set(row)) == k for row in indices.reshape(-1, k))


def test_knn_rejects_windows_without_enough_candidates():
  feats = _random((1, 7, 8, 2), 4)
  with pytest.raises(ValueError, match="candidates"):
    gcn.knn_graph(feats, 6, 5)
  with pytest.raises(ValueError, match="odd"):
    gcn.knn_graph(feats, 2, 4)


def test_knn_carries_no_gradient():
  feats = _random((1, 6, 6, 2), 5)
  grad = jax.grad(lambda f: jnp.sum(gcn.knn_graph(f, 3, 5)[1]))(feats)
  np.testing.assert_array_equal(grad, 0.0)


def _graph_conv_reference(params, feats, indices, rank, label_scale):
  """Dense reference: forms each edge's C_out x C_in Theta explicitly."""
  feats = np.asarray(feats, np.float64)
  p = {name: np.asarray(v, np.float64) for name, v in params.items()}
  batch, height, width, cin = feats.shape
  flat = feats.reshape(batch, height * width, cin)
  cout = p["edge_head_kernel"].shape[1] // rank - cin - 1
  temperature = np.exp(p["log_temperature"])
  out = np.zeros((batch, height, width, cout))
  for b, y, x in itertools.product(range(batch), range(height), range(width)):
    nbrs = flat[b, np.asarray(indices[b, y, x])]
    labels = nbrs - feats[b, y, x]
    spread = 1.0
    if label_scale != "absolute":
      spread = np.mean(np.sum(labels ** 2, axis=-1)) / cin + gcn.LABEL_SPREAD_EPS
    logits = -np.sum(labels ** 2, axis=-1) / (cin * temperature * spread)
    if label_scale == "local":
      labels = labels / np.sqrt(spread)
    weights = np.exp(logits - logits.max())
    weights /= weights.sum()
    for label, nbr, weight in zip(labels, nbrs, weights):
      pre = label @ p["edge_hidden_kernel"] + p["edge_hidden_bias"]
      hidden = np.where(pre > 0, pre, 0.01 * pre)
      head = hidden @ p["edge_head_kernel"] + p["edge_head_bias"]
      kappa = head[:rank]
      right = head[rank:rank + rank * cin].reshape(rank, cin)
      left = head[rank + rank * cin:].reshape(rank, cout)
      theta = sum(kappa[r] * np.outer(left[r], right[r]) for r in range(rank))
      assert np.linalg.matrix_rank(theta) <= rank
      out[b, y, x] += weight * theta @ nbr
  return out / math.sqrt(rank * cin)


@pytest.mark.parametrize("chunk_rows,label_scale",
                         [(None, "local"), (2, "local"), (None, "absolute"),
                          (2, "local_weights")])
def test_graph_conv_matches_dense_theta_reference(chunk_rows, label_scale):
  feats = _random((2, 6, 7, 3), 6)
  layer = gcn.GraphConv(4, k=3, search_window=5, rank=2,
                        chunk_rows=chunk_rows, label_scale=label_scale)
  variables = layer.init(jax.random.PRNGKey(7), feats)
  # A temperature away from 1 so that it is exercised too.
  params = dict(variables["params"], log_temperature=jnp.float32(0.4))
  out = layer.apply({"params": params}, feats)
  indices, _ = gcn.knn_graph(feats, 3, 5)
  expected = _graph_conv_reference(params, feats, indices, 2, label_scale)
  assert out.shape == (2, 6, 7, 4)
  np.testing.assert_allclose(out, expected, **TOL)
  assert float(jnp.std(out)) > 0.1  # the reference comparison is not 0 == 0


def test_box_average_matches_numpy_and_search_patch_searches_on_it():
  feats = _random((2, 6, 7, 3), 9)
  padded = np.pad(np.asarray(feats, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  expected = sum(padded[:, dy:dy + 6, dx:dx + 7] for dy in range(3) for dx in range(3)) / 9.0
  np.testing.assert_allclose(gcn.box_average(feats, 1), expected, rtol=1e-5, atol=1e-6)
  assert gcn.box_average(feats, 0) is feats
  # The layer's graph is the kNN of the box-averaged features; the labels and
  # weights still come from the pixels' own features (the dense reference).
  layer = gcn.GraphConv(4, k=3, search_window=5, rank=2, search_patch=1)
  params = layer.init(jax.random.PRNGKey(7), feats)["params"]
  indices, _ = gcn.knn_graph(gcn.box_average(feats, 1), 3, 5)
  assert not np.array_equal(indices, gcn.knn_graph(feats, 3, 5)[0])  # the choice matters
  np.testing.assert_allclose(layer.apply({"params": params}, feats),
                             _graph_conv_reference(params, feats, indices, 2, "absolute"), **TOL)


def test_local_label_scale_makes_graph_conv_homogeneous_in_feature_scale():
  # With local scaling the softmax and the edge network see d_ij / sigma_i,
  # unchanged when the features are scaled, so the output scales with them
  # (Theta F_j, F_j scaled); with GCDN's absolute labels it does not.
  feats = _random((1, 8, 8, 3), 21)
  for label_scale, homogeneous in (("local", True), ("absolute", False)):
    layer = gcn.GraphConv(4, k=3, search_window=5, rank=2, label_scale=label_scale)
    variables = layer.init(jax.random.PRNGKey(22), feats)
    out = layer.apply(variables, feats)
    for scale in (1e-3, 30.0):
      scaled = layer.apply(variables, feats * scale) / scale
      assert np.allclose(scaled, out, rtol=1e-4, atol=1e-5) == homogeneous, (label_scale, scale)


def test_local_label_scale_is_finite_on_flat_images():
  # Every label is zero on a constant image (the zeros that models are
  # initialised with): the spread's epsilon must keep values and gradients finite.
  layer = gcn.GraphConv(3, k=3, search_window=5, rank=2, label_scale="local")
  flat = jnp.full((1, 6, 6, 3), 0.25)
  variables = layer.init(jax.random.PRNGKey(23), flat)
  grads = jax.grad(lambda v, f: jnp.sum(layer.apply(v, f) ** 2), argnums=(0, 1))(variables, flat)
  assert np.all(np.isfinite(layer.apply(variables, flat)))
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(leaf))


def test_graph_conv_chunked_gradients_match_unchunked():
  feats = _random((1, 6, 5, 3), 8)
  whole = gcn.GraphConv(3, k=3, search_window=5, rank=2, chunk_rows=6)
  chunked = gcn.GraphConv(3, k=3, search_window=5, rank=2, chunk_rows=4)
  variables = whole.init(jax.random.PRNGKey(9), feats)

  def grads(layer):
    loss = lambda v, f: jnp.sum(jnp.sin(layer.apply(v, f)))
    return jax.grad(loss, argnums=(0, 1))(variables, feats)

  for a, b in zip(jax.tree.leaves(grads(whole)), jax.tree.leaves(
      grads(chunked))):
    np.testing.assert_allclose(a, b, **TOL)


def _check_translation_equivariance(apply, channels, margin, size=16,
                                    shift=(3, 2)):
  """Output of a shifted crop equals the shifted output away from borders."""
  dy, dx = shift
  base = _random((1, size + dy, size + dx, channels), 10)
  out_a = np.asarray(apply(base[:, :size, :size]))
  out_b = np.asarray(apply(base[:, dy:dy + size, dx:dx + size]))
  # Pixel (y, x) of crop b is pixel (y + dy, x + dx) of crop a; compare where
  # both see no border within `margin`.
  ys = slice(dy + margin, size - margin)
  xs = slice(dx + margin, size - margin)
  assert ys.stop - ys.start >= 3 and xs.stop - xs.start >= 3
  np.testing.assert_allclose(
      out_b[:, ys.start - dy:ys.stop - dy, xs.start - dx:xs.stop - dx],
      out_a[:, ys, xs], **TOL)
  # The borders do differ, else the check would be vacuous.
  assert not np.allclose(out_b[:, :margin], out_a[:, dy:dy + margin])


def test_graph_conv_is_translation_equivariant_in_interior():
  layer = gcn.GraphConv(4, k=4, search_window=5, rank=2)
  feats = _random((1, 16, 16, 3), 11)
  variables = layer.init(jax.random.PRNGKey(12), feats)
  _check_translation_equivariance(lambda f: layer.apply(variables, f), 3,
                                  margin=2)


def _small_gcn(**kw):
  return gcn.GCNDenoiser(features=6, num_blocks=2, k=4, search_window=5,
                         rank=2, **kw)


def test_gcn_denoiser_is_translation_equivariant_in_interior():
  model = _small_gcn(identity_init=False)  # else the check is x == x
  variables = model.init(jax.random.PRNGKey(13), jnp.zeros((1, 16, 16, 1)))
  # conv_in 1 + two blocks of window radius 2 + conv_out 1.
  _check_translation_equivariance(lambda x: model.apply(variables, x), 1,
                                  margin=6, size=20)


def test_gcn_denoiser_shape_jit_and_residual():
  model = _small_gcn()
  x = _random((2, 12, 10, 1), 14)
  variables = model.init(jax.random.PRNGKey(15), x)
  out = model.apply(variables, x, train=True)
  assert out.shape == x.shape
  np.testing.assert_allclose(jax.jit(model.apply)(variables, x), out, **TOL)
  # identity_init (default): the untrained net returns its input exactly;
  # the output is x minus the last conv's noise estimate.
  np.testing.assert_array_equal(out, x)
  random_head = _small_gcn(identity_init=False)
  out = random_head.apply(random_head.init(jax.random.PRNGKey(15), x), x)
  assert float(jnp.max(jnp.abs(out - x))) > 1e-3


def test_gcn_denoiser_gradients_finite_and_reach_graph_conv():
  # A random last conv, so that gradients reach every layer at this point.
  model = _small_gcn(chunk_rows=5, identity_init=False)
  x = _random((2, 12, 12, 1), 16)
  target = _random((2, 12, 12, 1), 17)
  variables = model.init(jax.random.PRNGKey(18), x)
  loss = lambda v, x: jnp.mean((model.apply(v, x) - target) ** 2)
  grad_v, grad_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, x)
  leaves = jax.tree_util.tree_leaves_with_path(grad_v)
  for path, leaf in leaves:
    assert np.all(np.isfinite(leaf)), path
  assert np.all(np.isfinite(grad_x)) and float(jnp.abs(grad_x).max()) > 0
  graph = grad_v["params"]["block1"]["graph"]
  for name in ("edge_hidden_kernel", "edge_head_kernel", "edge_head_bias",
               "log_temperature"):
    assert float(jnp.abs(graph[name]).max()) > 0, name
  assert float(jnp.abs(grad_v["params"]["block0"]["beta"])) > 0


def _conv(kernel, cin, cout):
  """Weights + biases of a conv (every Conv here has a bias)."""
  return kernel * kernel * cin * cout + cout


def _graph_conv_params(cin, cout, rank):
  """GraphConv by hand: edge hidden layer (C_in -> C_in, bias), low-rank head
  (C_in -> r (1 + C_in + C_out): kappa, b, a; bias), one temperature."""
  head = rank * (1 + cin + cout)
  return (cin * cin + cin) + (cin * head + head) + 1


def _expected_gcn(features, blocks, rank, channels=1):
  """conv_in, per block local 3x3 + GraphConv + alpha + beta, conv_out."""
  block = _conv(3, features, features) + _graph_conv_params(features, features, rank) + 2
  return _conv(3, channels, features) + blocks * block + _conv(3, features, channels)


def _expected_local(features, blocks, hidden, channels=1):
  """As _expected_gcn with the GraphConv replaced by conv3x3 (F -> M) + conv1x1 (M -> F)."""
  block = (_conv(3, features, features) + _conv(3, features, hidden)
           + _conv(1, hidden, features) + 2)
  return _conv(3, channels, features) + blocks * block + _conv(3, features, channels)


def _matching_width(features, rank):
  """The path width M whose conv3x3 + conv1x1 is nearest the GraphConv's count."""
  target = _graph_conv_params(features, features, rank)
  return min(range(1, 10 * target),
             key=lambda m: abs(_conv(3, features, m) + _conv(1, m, features) - target))


@pytest.mark.parametrize("features,blocks,rank,channels", [(32, 3, 11, 1), (16, 2, 11, 1),
                                                           (5, 2, 3, 2)])
def test_parameter_counts_gcn_vs_local_cnn(features, blocks, rank, channels):
  # Counted by arithmetic from the architecture, not from the module's own
  # helpers; (32, 3, 11) is the module default, (16, 2, 11) TDDL's.
  x = jnp.zeros((1, 16, 16, channels))
  shapes = lambda m: jax.eval_shape(m.init, jax.random.PRNGKey(0), x)
  net = gcn.GCNDenoiser(features=features, num_blocks=blocks, rank=rank)
  local = gcn.LocalCNN(features=features, num_blocks=blocks, rank=rank)
  hidden = _matching_width(features, rank)
  assert gcn.local_path_width(features, rank) == hidden
  n_gcn, n_local = _param_count(shapes(net)), _param_count(shapes(local))
  assert n_gcn == _expected_gcn(features, blocks, rank, channels)
  assert n_local == _expected_local(features, blocks, hidden, channels)
  graph = shapes(net)["params"]["block0"]["graph"]
  assert _param_count(graph) == _graph_conv_params(features, features, rank)
  assert gcn.graph_conv_param_count(features, features, rank) == _param_count(graph)
  if (features, blocks, rank) == (32, 3, 11):
    # The figures docs/gcn.md states.
    assert (n_gcn, n_local, hidden, _param_count(graph)) == (102_315, 102_606, 77, 24_652)
  elif (features, blocks, rank) == (16, 2, 11):
    assert (n_gcn, n_local) == (17_837, 17_861)  # README's ablation table
  # Equal size within 0.3% at the sizes compared in the ablation.
  if features >= 16:
    assert abs(n_local - n_gcn) / n_gcn < 0.003


def test_local_cnn_shape_and_residual():
  x = _random((2, 9, 11, 1), 19)
  model = gcn.LocalCNN(features=6, num_blocks=2)
  np.testing.assert_array_equal(model.apply(model.init(jax.random.PRNGKey(20), x), x), x)
  model = gcn.LocalCNN(features=6, num_blocks=2, identity_init=False)
  variables = model.init(jax.random.PRNGKey(20), x)
  out = model.apply(variables, x)
  assert out.shape == x.shape and float(jnp.max(jnp.abs(out - x))) > 1e-3
  params = dict(variables["params"])
  params["conv_out"] = jax.tree.map(jnp.zeros_like, params["conv_out"])
  np.testing.assert_array_equal(model.apply({"params": params}, x), x)
