"""CPCA 2D -> 3D: short-series slab padding in denoise, the two-stage transfer, the experiment.

Tiny shapes throughout: compilation dominates the run time.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldct_jax.data import pipeline as pl
from ldct_jax.evaluation import denoise_volume
from ldct_jax.models.cpce import CPCE3D

NORM = pl.Normalization()


# ------------------------------------------------------- short-series padding


@pytest.mark.parametrize("depth,slab,expected", [
    (1, 3, [[0, 0, 0]]),
    (1, 5, [[0, 0, 0, 0, 0]]),
    (2, 3, [[0, 0, 1], [0, 1, 1]]),
    (2, 5, [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]),
    (4, 5, [[0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [0, 1, 2, 3, 3], [1, 2, 3, 3, 3]]),
])
def test_series_shorter_than_the_slab_repeat_their_edge_slices(depth, slab, expected):
  """Every slab of a volume with fewer slices than the slab, written out by hand."""
  hu = np.arange(depth, dtype=np.float32)[:, None, None] * 10.0 + np.zeros((1, 4, 4), np.float32)
  volume = pl.Volume("short", {"ld": hu})
  (indices, batch), = list(pl.iterate_slices(volume, keys=("ld",), normalization=NORM,
                                             slab=slab, batch_size=8))
  assert indices.tolist() == list(range(depth))
  got = NORM.denormalize(batch["ld"][:, :, 0, 0, 0]) / 10.0
  np.testing.assert_array_equal(got, np.asarray(expected, np.float32))


def test_long_series_keep_reflected_neighbours():
  """Padding changes only for short series: 5 slices, slab 5, slice 0 reads 2 1 0 1 2."""
  hu = np.arange(5, dtype=np.float32)[:, None, None] + np.zeros((1, 4, 4), np.float32)
  (_, batch), = list(pl.iterate_slices(pl.Volume("v", {"ld": hu}), keys=("ld",),
                                       normalization=NORM, slab=5, batch_size=8))
  np.testing.assert_array_equal(NORM.denormalize(batch["ld"][0, :, 0, 0, 0]), [2, 1, 0, 1, 2])


@pytest.mark.parametrize("depth,slab", [(1, 3), (2, 3), (1, 5), (2, 5)])
def test_denoise_pads_a_short_series_for_a_3d_model_and_says_so(depth, slab, capsys):
  """A k = 3 / 5 CPCE-3D denoises a 1- and 2-slice series: each output slice is the
  model applied to the slab built here by repeating the series' edge slices."""
  model = CPCE3D(features=2, num_layers=2)
  rng = np.random.default_rng(depth * 10 + slab)
  hu = rng.uniform(-200.0, 200.0, (depth, 12, 12)).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, slab, 12, 12, 1)))
  fn = jax.jit(lambda x: model.apply(variables, x))
  out = denoise_volume(fn, hu, NORM, slab=slab, batch_size=2)
  assert out.shape == hu.shape
  assert "padded by edge replication" in capsys.readouterr().out
  for z in range(depth):
    neighbours = [min(max(z + d, 0), depth - 1) for d in range(-(slab // 2), slab // 2 + 1)]
    x = ((hu[neighbours] + 1024.0) / 4096.0)[None, ..., None]
    expected = np.asarray(model.apply(variables, x))[0, ..., 0] * 4096.0 - 1024.0
    np.testing.assert_allclose(out[z], expected, atol=1e-3)
