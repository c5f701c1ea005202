"""Converts a user's VGG16/VGG19 weights to this project's ``.npz`` (``models.features``).

The papers' perceptual loss uses ImageNet VGG19 conv5_4; no installable
package ships VGG19 weights, and weights are never downloaded at run time, so
a user brings a file they already have and converts it once::

    python -m ldct_jax.tools.convert_vgg vgg19-dcbb9e9d.pth vgg19.npz
    python -m ldct_jax.tools.convert_vgg vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5 vgg19.npz

then names it in a config (e.g. the perceptual loss's ``weights='vgg19.npz'``,
``layer='conv5_4'``). Accepted inputs:

  * torchvision ``.pth``/``.pt``: a ``state_dict`` of ``torchvision.models.vgg16``
    or ``vgg19`` (``features.{i}.weight`` OIHW, ``features.{i}.bias``; the
    ``classifier.*`` entries are ignored). Reading it needs PyTorch (not a
    dependency of this project). Without PyTorch, export it once where
    PyTorch is installed: ``np.savez('vgg19_state.npz', **{k: v.numpy() for k,
    v in torch.load('vgg19.pth').items()})`` and convert that ``.npz``.
  * ``.npz`` holding such a torchvision ``state_dict`` as NumPy arrays.
  * Keras ``.h5`` (Keras 2 / ``keras.applications`` layout, h5py needed):
    groups ``block{b}_conv{i}`` whose ``weight_names`` attribute lists the
    HWIO kernel and the bias, at the root or under ``model_weights`` (a whole
    saved model). Keras' VGG was trained on caffe-style inputs: BGR channel
    order, 0..255 scale, the ImageNet mean pixel (B 103.939, G 116.779,
    R 123.68) subtracted, no std. The converter flips the first layer's input
    channels to RGB and stores mean = (123.68, 116.779, 103.939) / 255 and
    std = 1 / 255 for [0, 1] inputs, so the converted network sees exactly the
    input Keras' ``preprocess_input`` would have given it.

torchvision weights take ImageNet's mean (0.485, 0.456, 0.406) and std
(0.229, 0.224, 0.225). Batch-normalised variants (``vgg19_bn``) are refused.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Dict, Tuple

import numpy as np

from ldct_jax.errors import InputError
from ldct_jax.models import features

# Keras' caffe-style preprocessing, as [0, 1] RGB constants.
KERAS_MEAN = tuple(v / 255.0 for v in (123.68, 116.779, 103.939))
KERAS_STD = (1.0 / 255.0,) * 3


def torchvision_feature_indices(depth: int) -> Tuple[int, ...]:
  """Indices of the convs in torchvision's ``vgg{depth}().features`` Sequential.

  Each conv is followed by a ReLU and each block by a MaxPool, every one a
  module of the Sequential: VGG19's convs sit at 0, 2, 5, 7, 10, 12, ...
  """
  indices, position = [], 0
  for convs in features.BLOCK_CONVS[depth]:
    for _ in range(convs):
      indices.append(position)
      position += 2  # conv, relu
    position += 1  # max-pool
  return tuple(indices)


def from_torchvision_state(state: Dict[str, np.ndarray], source: str) -> Tuple[dict, int]:
  """``features.{i}.weight`` (OIHW) / ``.bias`` -> ``({conv{b}_{i}: {kernel HWIO, bias}}, depth)``."""
  if any(re.fullmatch(r"features\.\d+\.running_mean", k) for k in state):
    raise InputError(f"{source}: a batch-normalised VGG (vgg16_bn/vgg19_bn); only the plain "
                     "torchvision vgg16/vgg19 are supported")
  conv_indices = sorted(int(m.group(1)) for k in state
                        if (m := re.fullmatch(r"features\.(\d+)\.weight", k)))
  for depth in features.BLOCK_CONVS:
    if tuple(conv_indices) == torchvision_feature_indices(depth):
      break
  else:
    raise InputError(f"{source}: not a torchvision vgg16/vgg19 state_dict: conv weights at "
                     f"features.{conv_indices} (expected features."
                     f"{list(torchvision_feature_indices(19))} for VGG19)")
  params = {}
  for name, index in zip(features.layer_names(depth), conv_indices):
    weight = np.asarray(state[f"features.{index}.weight"])
    bias = state.get(f"features.{index}.bias")
    if weight.ndim != 4 or bias is None:
      raise InputError(f"{source}: features.{index} must have a 4-D weight and a bias")
    params[name] = {"kernel": np.transpose(weight, (2, 3, 1, 0)), "bias": np.asarray(bias)}
  return params, depth


def read_torch(path: str) -> Dict[str, np.ndarray]:
  """A torchvision ``state_dict`` from a ``.pth`` as NumPy arrays (needs PyTorch)."""
  try:
    import torch
  except ImportError:
    raise InputError(
        f"{path}: reading a PyTorch file needs PyTorch, which is not installed (nor needed by "
        "ldct_jax). Either pip install torch, or export the state_dict where PyTorch is: "
        "np.savez('vgg_state.npz', **{k: v.numpy() for k, v in torch.load(PATH).items()}) "
        "and convert that .npz") from None
  state = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
    state = state["state_dict"]
  if not isinstance(state, dict):
    raise InputError(f"{path}: expected a state_dict, got {type(state).__name__}")
  return {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}


def read_keras_h5(path: str) -> Tuple[dict, int]:
  """Keras 2 ``block{b}_conv{i}`` groups -> ``(params, depth)``, kernels as stored (HWIO, BGR)."""
  try:
    import h5py
  except ImportError:
    raise InputError(f"{path}: reading a Keras .h5 file needs h5py: pip install h5py") from None
  with h5py.File(path, "r") as f:
    root = f["model_weights"] if "model_weights" in f else f
    depth = 19 if "block5_conv4" in root else 16
    params = {}
    for name in features.layer_names(depth):
      block, index = name[4], name[6]
      group_name = f"block{block}_conv{index}"
      if group_name not in root:
        raise InputError(f"{path}: no group {group_name}: not a Keras VGG{depth} weights file")
      group = root[group_name]
      if "weight_names" in group.attrs:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs["weight_names"]]
        arrays = [np.asarray(group[n]) for n in names]
      else:  # a group of datasets without the index attribute: take them in name order
        arrays = []
        group.visititems(lambda _, obj: arrays.append(np.asarray(obj))
                         if isinstance(obj, h5py.Dataset) else None)
      kernels = [a for a in arrays if a.ndim == 4]
      biases = [a for a in arrays if a.ndim == 1]
      if len(kernels) != 1 or len(biases) != 1:
        raise InputError(f"{path}: {group_name} must hold one 4-D kernel and one bias, got shapes "
                         f"{[a.shape for a in arrays]}")
      params[name] = {"kernel": kernels[0], "bias": biases[0]}
  return params, depth


def convert(src: str, dst: str) -> features.VGGWeights:
  """Converts ``src`` (torchvision .pth/.pt/.npz or Keras .h5) to ``dst`` (.npz); returns it loaded."""
  if not os.path.isfile(src):
    raise InputError(f"{src}: no such file")
  if not dst.endswith(".npz"):
    raise InputError(f"{dst}: the output must be an .npz file")
  extension = os.path.splitext(src)[1].lower()
  if extension in (".pth", ".pt"):
    params, depth = from_torchvision_state(read_torch(src), src)
    mean, std, kind = features.IMAGENET_MEAN, features.IMAGENET_STD, "torchvision"
  elif extension == ".npz":
    with np.load(src, allow_pickle=False) as f:
      state = {k: f[k] for k in f.files}
    params, depth = from_torchvision_state(state, src)
    mean, std, kind = features.IMAGENET_MEAN, features.IMAGENET_STD, "torchvision"
  elif extension in (".h5", ".hdf5"):
    params, depth = read_keras_h5(src)
    first = params["conv1_1"]
    if first["kernel"].shape[:2] != (3, 3):
      raise InputError(f"{src}: conv1_1 kernel has shape {first['kernel'].shape}; expected HWIO "
                       "(3, 3, 3, 64), i.e. Keras' channels-last ('tf') ordering")
    params["conv1_1"] = {"kernel": first["kernel"][:, :, ::-1, :], "bias": first["bias"]}
    mean, std, kind = KERAS_MEAN, KERAS_STD, "keras (caffe-style inputs, BGR flipped to RGB)"
  else:
    raise InputError(f"{src}: unknown extension {extension!r}; give a torchvision .pth/.pt/.npz "
                     "state_dict or a Keras .h5 file")
  features.save_vgg(dst, params, depth, mean, std,
                    source=f"{os.path.basename(src)} ({kind} VGG{depth})")
  return features.load_vgg(dst, depth=depth)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ldct_jax.tools.convert_vgg",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("src", help="torchvision .pth/.pt/.npz state_dict or Keras .h5 VGG16/19")
  parser.add_argument("dst", help="output .npz (this project's format)")
  args = parser.parse_args(argv)
  try:
    weights = convert(args.src, args.dst)
  except InputError as e:
    print(f"convert_vgg: error: {e}", file=sys.stderr)
    return 2
  count = sum(v.size for layer in weights.params.values() for v in layer.values())
  print(f"wrote {args.dst}: VGG{weights.depth}, {count:,} parameters, input mean "
        f"{np.round(weights.mean, 4).tolist()} std {np.round(weights.std, 4).tolist()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
