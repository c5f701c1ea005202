"""HU display/metric windows as data.

A window is a (center, width) pair in Hounsfield units. Mapping HU through a
window clips to ``[center - width/2, center + width/2]`` and rescales to
``[0, 1]``. Metrics computed on windowed images use ``data_range=1``; metrics
computed on raw HU use the window width as data range. Every reported number
in this project names its window, so peers can reproduce it.

This module imports nothing else of ours: data, metrics and evaluation all
depend on it, never the other way round.
"""
from __future__ import annotations

import dataclasses
from typing import Union

import numpy as np


@dataclasses.dataclass(frozen=True)
class Window:
  """A HU window. ``low``/``high`` are the clipping bounds in HU."""

  center: float
  width: float
  name: str = ""

  def __post_init__(self):
    if not self.width > 0:
      raise ValueError(f"window width must be positive, got {self.width}")

  @classmethod
  def from_range(cls, low: float, high: float, name: str = "") -> "Window":
    return cls(center=(low + high) / 2.0, width=high - low, name=name)

  @property
  def low(self) -> float:
    return self.center - self.width / 2.0

  @property
  def high(self) -> float:
    return self.center + self.width / 2.0

  def describe(self) -> str:
    label = f"{self.name} " if self.name else ""
    return f"{label}[{self.low:g}, {self.high:g}] HU (C{self.center:g}/W{self.width:g})"

  def as_dict(self) -> dict:
    return {"name": self.name, "center": self.center, "width": self.width,
            "low": self.low, "high": self.high}


# Clinical presets (centre/width, HU). "paper" is the [-160, 240] HU range
# used for metrics by RED-CNN / WGAN-VGG and their public re-implementations.
WINDOWS = {
    "abdomen": Window(40.0, 400.0, "abdomen"),
    "soft_tissue": Window(50.0, 400.0, "soft_tissue"),
    "lung": Window(-600.0, 1500.0, "lung"),
    "head": Window(40.0, 80.0, "head"),
    "bone": Window(400.0, 1800.0, "bone"),
    "paper": Window.from_range(-160.0, 240.0, "paper"),
    # Everything from air to dense bone; for overall, unwindowed comparisons.
    "full": Window.from_range(-1024.0, 3072.0, "full"),
}

WindowLike = Union[str, Window, tuple, list, dict]

# The body/air boundary, HU: pixels above it are body. Air is -1000 HU and
# lung parenchyma (about -850 HU) still counts as body. The one definition
# used by body masks (``noise_stats``), the patch stream's air rejection
# (``data.pipeline``) and TDDL's noise estimates (``models.vae``).
BODY_THRESHOLD_HU = -900.0


def get_window(window: WindowLike) -> Window:
  """Resolves a preset name, a ``(center, width)`` pair, a dict or a Window."""
  if isinstance(window, Window):
    return window
  if isinstance(window, str):
    try:
      return WINDOWS[window]
    except KeyError:
      raise ValueError(
          f"unknown HU window {window!r}; known: {sorted(WINDOWS)} "
          "(or give (center, width))") from None
  if isinstance(window, dict) or hasattr(window, "to_dict"):
    d = dict(window.to_dict() if hasattr(window, "to_dict") else window)
    if "low" in d and "high" in d and "center" not in d:
      return Window.from_range(d["low"], d["high"], d.get("name", ""))
    return Window(float(d["center"]), float(d["width"]), d.get("name", ""))
  if isinstance(window, (tuple, list)) and len(window) == 2:
    return Window(float(window[0]), float(window[1]))
  raise ValueError(f"cannot interpret {window!r} as a HU window")


def apply_window(hu, window: WindowLike):
  """Maps HU to [0, 1] through ``window`` (clipped). Works on NumPy and jnp arrays."""
  w = get_window(window)
  xp = _array_module(hu)
  return xp.clip((hu - w.low) / w.width, 0.0, 1.0)


def _array_module(x):
  if isinstance(x, np.ndarray) or np.isscalar(x):
    return np
  import jax.numpy as jnp  # deferred: windows are also used by NumPy-only code
  return jnp
