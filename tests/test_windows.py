import numpy as np
import pytest

from ldct_jax.windows import WINDOWS, Window, apply_window, get_window


def test_paper_window_is_minus160_to_240():
  w = WINDOWS["paper"]
  assert (w.low, w.high, w.width) == (-160.0, 240.0, 400.0)


def test_apply_window_maps_bounds_and_clips():
  hu = np.array([-2000.0, -160.0, 40.0, 240.0, 3000.0])
  np.testing.assert_allclose(apply_window(hu, "paper"), [0, 0, 0.5, 1, 1])


def test_apply_window_jnp_matches_numpy():
  import jax.numpy as jnp
  hu = np.linspace(-1200, 1200, 17).astype(np.float32)
  np.testing.assert_allclose(np.asarray(apply_window(jnp.asarray(hu), "lung")),
                             apply_window(hu, "lung"), rtol=1e-6)


def test_get_window_forms():
  assert get_window((40, 400)) == Window(40.0, 400.0)
  assert get_window({"low": -160, "high": 240}).center == 40.0
  with pytest.raises(ValueError, match="unknown HU window"):
    get_window("liver-ish")
  with pytest.raises(ValueError, match="positive"):
    Window(0.0, 0.0)
