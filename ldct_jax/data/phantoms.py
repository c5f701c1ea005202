"""Procedural anatomical CT phantoms in Hounsfield units: chest, abdomen, head.

Every phantom is one random but reproducible patient. The seed fixes the
anatomy (body size and shape, organ sizes and positions, vessel trees, bowel
gas, lesions, tissue texture), and the anatomy is defined in millimetres, so
the same seed rendered at 64² or 512² shows the same patient at a different
resolution, and a slab of 8 or 64 slices shows the same organs around the same
centre.

Conventions
  * Arrays are (D, H, W) = (z, y, x); intensities in HU, float32. Air outside
    the body is exactly -1000 HU.
  * Physical coordinates in mm with the origin at the centre of the slab.
    x grows towards the patient's left (image right: radiological display),
    y grows posteriorly (image down; the patient lies supine, so gas rises to
    small y), z grows with the slice index. Voxel (k, i, j) has its centre at
    ``z = (k - (D - 1) / 2) * slice_thickness_mm``,
    ``y = (i - (H - 1) / 2) * pixel_spacing_mm``, and likewise x, with
    ``pixel_spacing_mm = fov_mm / size``; so block-averaging a 256² image 4×4
    gives the 64² grid of the same field of view.

How a phantom is built
  Tissues are painted in order (painter's algorithm) from implicit 3D solids:
  superellipsoids (organs, vertebrae, tubes), superelliptic body contours that
  vary slowly with z, tapered capsules (vessel trees, ribs, airways), and
  their intersections. A solid reports a level function ``L`` (< 0 inside) and
  its gradient; ``L / |∇L|`` estimates the signed distance to the surface, and
  a voxel takes the solid's value in proportion to its coverage,
  ``clip(0.5 - L / (h·(|∂yL| + |∂xL|) + t·|∂zL|), 0, 1)``: a linear ramp across
  the voxel's extent along the surface normal (pixel h, slice t). That is
  the partial-volume effect of a box-shaped voxel, so edges are antialiased in
  plane and thick slices blur oblique surfaces along z, as in real CT.

  Texture: a smooth Gaussian random field in mm (a fine 2.5 mm and a coarse
  12 mm component) is added with a tissue-dependent amplitude (a few HU in
  soft tissue, more in lung and bone, none in air), so organs are not
  piecewise constant.

  Lesions are spheroids placed by rejection sampling in mm against the
  analytic anatomy (not the voxel grid), so their placement does not depend on
  the resolution. A lesion's label is the set of voxels whose centre lies
  inside it, plus the voxel holding its centre, so every listed lesion marks at
  least one voxel even when it is smaller than a voxel.

Random streams: ``np.random.default_rng(np.random.SeedSequence([seed, stream]))``
per purpose (anatomy, lesions, texture), and the texture lattice draws one
stream per lattice plane, so changing the grid never shifts the random numbers
the anatomy sees.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import numpy as np

REGIONS = ('chest', 'abdomen', 'head')

# Tissue classes of the ``tissue`` map; index = value in the map. Lung vessels
# count as lung, and lesions are not tissues (they live in ``labels``).
TISSUES = ('air', 'skin', 'fat', 'muscle', 'lung', 'blood', 'heart', 'liver',
           'spleen', 'kidney_cortex', 'kidney_medulla', 'bowel_wall',
           'bowel_content', 'gas', 'gallbladder', 'cortical_bone',
           'cancellous_bone', 'disc', 'cartilage', 'spinal_canal', 'airway',
           'breast_gland', 'csf', 'gray_matter', 'white_matter')
TISSUE_IDS = {name: index for index, name in enumerate(TISSUES)}

DEFAULT_FOV_MM = {'chest': 350.0, 'abdomen': 350.0, 'head': 250.0}
# The texture lattice is drawn over this square, so fields of view up to its
# width keep the same texture; larger ones are refused rather than wrapped.
MAX_FOV_MM = 600.0
AIR_HU = -1000.0

# A "long" semi-axis (mm) for tubes that run through the whole slab.
_LONG_MM = 1.0e5


@dataclasses.dataclass(frozen=True)
class Lesion:
  """A lesion inserted into a phantom.

  Attributes:
    label: Value of the lesion's voxels in ``PhantomVolume.labels`` (1..n).
    kind: 'nodule', 'ground_glass_nodule', 'high_contrast', 'metastasis',
      'hemorrhage' or 'hypodense'.
    center_zyx: Centre in voxel coordinates (float; (0, 0, 0) is the centre of
      the first voxel).
    radius_mm: Geometric mean of the spheroid's three semi-axes, mm.
    contrast_hu: Lesion HU minus the HU of the surrounding tissue (before
      texture), at the lesion centre.
    box: (z0, y0, x0, z1, y1, x1) half-open voxel box of the label mask.
    organ: Tissue the lesion lies in (a name in ``TISSUES``).
  """

  label: int
  kind: str
  center_zyx: tuple
  radius_mm: float
  contrast_hu: float
  box: tuple
  organ: str = ''


@dataclasses.dataclass(frozen=True)
class PhantomVolume:
  """A phantom volume and its ground truth.

  Attributes:
    hu: (D, H, W) float32, HU.
    labels: (D, H, W) int16; 0 = no lesion, k = the lesion with label k.
    lesions: One ``Lesion`` per label, in label order.
    pixel_spacing_mm: In-plane voxel size, mm.
    slice_thickness_mm: Slice thickness, equal to the slice spacing, mm.
    region: One of ``REGIONS``.
    tissue: (D, H, W) uint8 index into ``TISSUES`` of the tissue covering each
      voxel centre, before lesions and texture.
  """

  hu: np.ndarray
  labels: np.ndarray
  lesions: tuple
  pixel_spacing_mm: float
  slice_thickness_mm: float
  region: str
  tissue: Optional[np.ndarray] = None

  def lesion_labels_2d(self, z: int) -> np.ndarray:
    """Labels (int32, ascending) of the lesions present in slice ``z``."""
    present = np.unique(self.labels[z])
    return present[present > 0].astype(np.int32)

  def boxes_2d(self, z: int) -> np.ndarray:
    """(n, 4) int32 half-open boxes [y0, x0, y1, x1] of the lesions in slice z.

    Rows follow ``lesion_labels_2d(z)``; boxes come from the label mask itself.
    """
    plane = self.labels[z]
    rows = []
    for label in self.lesion_labels_2d(z):
      ys, xs = np.nonzero(plane == label)
      rows.append((ys.min(), xs.min(), ys.max() + 1, xs.max() + 1))
    return np.asarray(rows, np.int32).reshape(-1, 4)


# ----------------------------------------------------------------------------
# Voxel grid and painting.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Grid:
  """Voxel-centre coordinates (mm, float32) of a (D, H, W) slab."""

  z: np.ndarray
  y: np.ndarray
  x: np.ndarray
  pixel_mm: float
  slice_mm: float

  @classmethod
  def create(cls, size: int, num_slices: int, slice_mm: float, fov_mm: float):
    pixel_mm = fov_mm / size
    centred = lambda n, step: ((np.arange(n) - (n - 1) / 2) * step).astype(np.float32)
    return cls(centred(num_slices, slice_mm), centred(size, pixel_mm),
               centred(size, pixel_mm), pixel_mm, slice_mm)

  @property
  def shape(self):
    return (self.z.size, self.y.size, self.x.size)

  def window(self, lo, hi):
    """Index slices and broadcastable local coordinates of a mm box, or None."""
    slices, coords = [], []
    for axis, (coord, low, high) in enumerate(zip((self.z, self.y, self.x), lo, hi)):
      # One voxel of padding: the coverage ramp reaches half a footprint out.
      pad = self.pixel_mm + self.slice_mm
      start = int(np.searchsorted(coord, low - pad, 'left'))
      stop = int(np.searchsorted(coord, high + pad, 'right'))
      if stop <= start:
        return None
      slices.append(slice(start, stop))
      shape = [1, 1, 1]
      shape[axis] = stop - start
      coords.append(coord[start:stop].reshape(shape))
    return tuple(slices), tuple(coords)


def _coverage(grid: _Grid, level, grad_z, grad_y, grad_x):
  """Fraction of a box voxel inside the solid (linear ramp along the normal)."""
  footprint = grid.pixel_mm * (np.abs(grad_y) + np.abs(grad_x)) + grid.slice_mm * np.abs(grad_z)
  return np.clip(0.5 - level / np.maximum(footprint, 1e-6), 0.0, 1.0)


class _Canvas:
  """The HU and tissue volumes being painted, and the solids painted so far."""

  def __init__(self, grid: _Grid):
    self.grid = grid
    self.hu = np.full(grid.shape, AIR_HU, np.float32)
    self.tissue = np.zeros(grid.shape, np.uint8)
    self.solids = []  # (shape, tissue id) in painting order, for tissue_at.

  def paint(self, shape, hu, tissue: Optional[str] = None,
            gate: Optional[Callable] = None, register: bool = True):
    """Blends ``hu`` (HU, or a function of z, y, x in mm) into ``shape``.

    Args:
      shape: The solid.
      hu: Target HU, a number or a callable of broadcastable (z, y, x) mm.
      tissue: Tissue name written to the tissue map where the voxel centre is
        inside the solid; None paints HU only.
      gate: Optional function of the current HU that scales the coverage, to
        paint only into matching tissue (vessels only into aerated lung).
      register: Whether ``tissue_at`` (lesion placement) sees this solid; the
        field-modulated brain surfaces are not registered, lesions keep clear
        of them by construction.
    """
    window = self.grid.window(*shape.bounds())
    if window is None:
      return
    slices, (z, y, x) = window
    level, grad_z, grad_y, grad_x = shape.level(z, y, x)
    region = self.hu[slices]
    coverage = np.broadcast_to(_coverage(self.grid, level, grad_z, grad_y, grad_x), region.shape)
    target = hu(z, y, x) if callable(hu) else hu
    if gate is not None:
      coverage = coverage * gate(region)
    region += coverage * (target - region)
    if tissue is not None and gate is None:
      self.tissue[slices][np.broadcast_to(level <= 0, region.shape)] = TISSUE_IDS[tissue]
      if register:
        self.solids.append((shape, TISSUE_IDS[tissue]))

  def tissue_at(self, z, y, x) -> np.ndarray:
    """Tissue ids at mm points (1D arrays), from the registered solids."""
    ids = np.zeros(np.shape(z), np.uint8)
    for shape, tissue_id in self.solids:
      lo, hi = shape.bounds()
      near = ((z >= lo[0]) & (z <= hi[0]) & (y >= lo[1]) & (y <= hi[1])
              & (x >= lo[2]) & (x <= hi[2]))
      if near.any():
        inside = shape.level(z[near], y[near], x[near])[0] <= 0
        ids[np.flatnonzero(near)[inside]] = tissue_id
    return ids


# ----------------------------------------------------------------------------
# Solids. ``level(z, y, x)`` takes broadcastable mm coordinates and returns
# (L, dL/dz, dL/dy, dL/dx); L < 0 inside. ``bounds()`` is a mm box (lo, hi).
# ----------------------------------------------------------------------------


def _power_term(t, p: float):
  """(|t|**p, d|t|**p/dt); squares are special-cased because they dominate."""
  if p == 2.0:
    return t * t, 2.0 * t
  magnitude = np.abs(t)
  partial = magnitude ** (p - 1.0)
  return partial * magnitude, p * partial * np.sign(t)


def _rotation(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0):
  """Rows = local (c, b, a) axes in world (z, y, x): yaw turns in plane."""
  cy, sy = math.cos(yaw), math.sin(yaw)
  cp, sp = math.cos(pitch), math.sin(pitch)
  cr, sr = math.cos(roll), math.sin(roll)
  in_plane = np.array([[1, 0, 0], [0, cy, -sy], [0, sy, cy]])
  tilt_y = np.array([[cp, -sp, 0], [sp, cp, 0], [0, 0, 1]])
  tilt_x = np.array([[cr, 0, -sr], [0, 1, 0], [sr, 0, cr]])
  return tilt_x @ tilt_y @ in_plane


class _Superellipsoid:
  """|w/c|^pz + |v/b|^p + |u/a|^p <= 1 in rotated local axes (w, v, u).

  p = pz = 2 is an ellipsoid; a large pz flattens the ends (vertebral
  bodies); a long c makes a tube through the slab.
  """

  def __init__(self, center, semi_axes, rotation=None, p: float = 2.0, p_z: float = 2.0):
    self.center = tuple(float(v) for v in center)
    self.semi_axes = tuple(float(v) for v in semi_axes)
    matrix = np.eye(3) if rotation is None else np.asarray(rotation, float)
    # Python floats keep float32 coordinates float32 (NumPy 2 promotion).
    self.rotation = [[float(v) for v in row] for row in matrix]
    self.p, self.p_z = float(p), float(p_z)
    half = np.abs(matrix).T @ np.asarray(self.semi_axes)
    self._bounds = (np.asarray(self.center) - half, np.asarray(self.center) + half)

  def bounds(self):
    return self._bounds

  def level(self, z, y, x):
    offsets = (z - self.center[0], y - self.center[1], x - self.center[2])
    level, grads = -1.0, [0.0, 0.0, 0.0]
    for row, semi, power in zip(self.rotation, self.semi_axes, (self.p_z, self.p, self.p)):
      local = sum(weight * offset for weight, offset in zip(row, offsets) if weight != 0.0)
      term, slope = _power_term(local / semi, power)
      level = level + term
      for axis in range(3):
        if row[axis] != 0.0:
          grads[axis] = grads[axis] + slope * (row[axis] / semi)
    return level, grads[0], grads[1], grads[2]


class _BodyContour:
  """Superelliptic cross-section extruded along z; semi-axes vary with z.

  ``|x/a(z)|^p + |(y - cy)/b(z)|^p <= 1`` with a flatter back (b differs
  anterior/posterior). ``inset`` = (lateral, anterior, posterior) mm shrinks
  the semi-axes to make the nested skin / fat / muscle / cavity layers. The z slope of the contour is
  below ~0.05, so its z gradient is left out of the partial-volume ramp.
  """

  def __init__(self, center_y, a, b_ant, b_post, p, z_profile, inset=(0.0, 0.0, 0.0)):
    self.center_y, self.p = float(center_y), float(p)
    self.a, self.b_ant, self.b_post = float(a), float(b_ant), float(b_post)
    self.z_profile = tuple(float(v) for v in z_profile)  # slope, amp, wavelength, phase
    self.inset = tuple(float(v) for v in inset)

  def inset_by(self, lateral: float, anterior: Optional[float] = None,
               posterior: Optional[float] = None) -> '_BodyContour':
    """A nested contour; anterior and posterior insets default to ``lateral``."""
    extra = (lateral, lateral if anterior is None else anterior,
             lateral if posterior is None else posterior)
    return _BodyContour(self.center_y, self.a, self.b_ant, self.b_post, self.p, self.z_profile,
                        tuple(v + e for v, e in zip(self.inset, extra)))

  def _scale(self, z):
    slope, amplitude, wavelength, phase = self.z_profile
    return 1.0 + slope * z + amplitude * np.sin(2 * np.pi * z / wavelength + phase)

  def semi_axes(self, z=0.0):
    scale = self._scale(z)
    return (self.a * scale - self.inset[0], self.b_ant * scale - self.inset[1],
            self.b_post * scale - self.inset[2])

  def bounds(self):
    grow = 1.3
    return (np.array([-_LONG_MM, self.center_y - grow * self.b_ant, -grow * self.a]),
            np.array([_LONG_MM, self.center_y + grow * self.b_post, grow * self.a]))

  def level(self, z, y, x):
    a, b_ant, b_post = self.semi_axes(z)
    dy = y - self.center_y
    b = np.where(dy < 0, b_ant, b_post)
    term_x, slope_x = _power_term(x / a, self.p)
    term_y, slope_y = _power_term(dy / b, self.p)
    return term_x + term_y - 1.0, 0.0, slope_y / b, slope_x / a


class _Capsule:
  """A segment p0-p1 (mm, zyx) with radius tapering linearly r0 -> r1."""

  def __init__(self, p0, p1, r0: float, r1: float):
    self.p0 = tuple(float(v) for v in p0)
    self.axis = tuple(float(b) - float(a) for a, b in zip(p0, p1))
    self.length2 = max(sum(v * v for v in self.axis), 1e-12)
    self.r0, self.r1 = float(r0), float(r1)
    ends = np.array([p0, p1], float)
    radius = max(self.r0, self.r1)
    self._bounds = (ends.min(0) - radius, ends.max(0) + radius)

  def bounds(self):
    return self._bounds

  def level(self, z, y, x):
    offsets = (z - self.p0[0], y - self.p0[1], x - self.p0[2])
    along = np.clip(sum(o * a for o, a in zip(offsets, self.axis)) / self.length2, 0.0, 1.0)
    diffs = [o - along * a for o, a in zip(offsets, self.axis)]
    distance = np.maximum(np.sqrt(diffs[0] ** 2 + diffs[1] ** 2 + diffs[2] ** 2), 1e-6)
    radius = self.r0 + along * (self.r1 - self.r0)
    return (distance - radius, diffs[0] / distance, diffs[1] / distance, diffs[2] / distance)


class _HalfSpace:
  """Points with (p - origin) . normal <= 0; normal is a unit zyx vector."""

  def __init__(self, origin, normal):
    self.origin = tuple(float(v) for v in origin)
    norm = math.sqrt(sum(float(v) ** 2 for v in normal))
    self.normal = tuple(float(v) / norm for v in normal)

  def bounds(self):
    return (np.full(3, -_LONG_MM), np.full(3, _LONG_MM))

  def level(self, z, y, x):
    level = sum(n * (c - o) for n, c, o in zip(self.normal, (z, y, x), self.origin) if n != 0.0)
    return (level,) + self.normal


class _Intersection:
  """Inside every part; the level of the part nearest its own surface wins."""

  def __init__(self, *parts):
    self.parts = parts
    los, his = zip(*(part.bounds() for part in parts))
    self._bounds = (np.max(los, axis=0), np.min(his, axis=0))

  def bounds(self):
    return self._bounds

  def level(self, z, y, x):
    level, grad_z, grad_y, grad_x = self.parts[0].level(z, y, x)
    for part in self.parts[1:]:
      other = part.level(z, y, x)
      larger = other[0] > level
      level = np.where(larger, other[0], level)
      grad_z = np.where(larger, other[1], grad_z)
      grad_y = np.where(larger, other[2], grad_y)
      grad_x = np.where(larger, other[3], grad_x)
    return level, grad_z, grad_y, grad_x


class _Complement:
  """Outside ``part``; only meaningful inside an ``_Intersection``."""

  def __init__(self, part):
    self.part = part

  def bounds(self):
    return (np.full(3, -_LONG_MM), np.full(3, _LONG_MM))

  def level(self, z, y, x):
    return tuple(-value for value in self.part.level(z, y, x))


def _contract(weights: np.ndarray, array: np.ndarray, axis: int) -> np.ndarray:
  """Applies (n_out, n_in) ``weights`` along ``axis`` of a 3D array as one 2D
  matmul (NumPy's broadcast matmul does not reach BLAS and is ~25x slower)."""
  moved = np.moveaxis(array, axis, 0)
  out = weights @ moved.reshape(moved.shape[0], -1)
  return np.moveaxis(out.reshape((weights.shape[0],) + moved.shape[1:]), 0, axis)


class _SmoothField:
  """Stationary Gaussian random field in mm: zero mean, unit variance.

  White noise on a cubic lattice (spacing ``spacing_mm``) smoothed by a
  Gaussian kernel of standard deviation = spacing; at that ratio the summed
  squared kernel weights vary by ~1e-4 over a cell, so the variance is
  uniform and the normalisation exact. The lattice is fixed in mm (one random
  stream per z plane), so any grid samples the same field. Evaluated on grid
  coordinates (z (d,1,1), y (1,h,1), x (1,1,w)) as three separable
  contractions.
  """

  _NORM = math.pi ** 0.75  # sqrt of the summed squared weights, per 3 axes.

  def __init__(self, seed: int, stream: int, spacing_mm: float):
    self.seed, self.stream, self.spacing = seed, stream, float(spacing_mm)
    self.half_nodes = int(math.ceil(MAX_FOV_MM / 2 / self.spacing)) + 6
    self._planes = {}
    self._last = None  # (grid key, result): brain folds sample one window twice

  def _plane(self, kz: int) -> np.ndarray:
    if kz not in self._planes:
      rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.stream, kz + 2 ** 20]))
      size = 2 * self.half_nodes + 1
      self._planes[kz] = rng.standard_normal((size, size), dtype=np.float32)
    return self._planes[kz]

  def _weights(self, coords):
    coords = np.ravel(coords).astype(np.float64)
    first = int(math.floor(coords.min() / self.spacing)) - 5
    last = int(math.ceil(coords.max() / self.spacing)) + 5
    nodes = np.arange(first, last + 1)
    offset = coords[:, None] / self.spacing - nodes[None, :]
    # Cut the kernel at 5 spacings: its far tail would be float32 denormals,
    # which slow BLAS down by 10-50x.
    weights = np.where(np.abs(offset) < 5.0, np.exp(-0.5 * offset ** 2), 0.0)
    return nodes, weights.astype(np.float32), (-offset / self.spacing * weights).astype(np.float32)

  def __call__(self, z, y, x, with_gradient: bool = False):
    """Field (and its mm gradient) on grid coordinates; shapes broadcast to (d, h, w)."""
    key = (np.ravel(z).tobytes(), np.ravel(y).tobytes(), np.ravel(x).tobytes(), with_gradient)
    if self._last is None or self._last[0] != key:
      self._last = (key, self._evaluate(z, y, x, with_gradient))
    return self._last[1]

  def _evaluate(self, z, y, x, with_gradient):
    nodes_z, w_z, dw_z = self._weights(z)
    nodes_y, w_y, dw_y = self._weights(y)
    nodes_x, w_x, dw_x = self._weights(x)
    if max(abs(nodes_y[0]), abs(nodes_y[-1]), abs(nodes_x[0]), abs(nodes_x[-1])) > self.half_nodes:
      raise ValueError(f'field of view larger than {MAX_FOV_MM} mm')
    rows = slice(nodes_y[0] + self.half_nodes, nodes_y[-1] + self.half_nodes + 1)
    cols = slice(nodes_x[0] + self.half_nodes, nodes_x[-1] + self.half_nodes + 1)
    lattice = np.stack([self._plane(int(k))[rows, cols] for k in nodes_z]) / self._NORM
    smooth_x = _contract(w_x, lattice, 2)                        # (kz, ky, w)
    smooth_xy = _contract(w_y, smooth_x, 1)                       # (kz, h, w)
    value = _contract(w_z, smooth_xy, 0)                          # (d, h, w)
    if not with_gradient:
      return value
    grad_z = _contract(dw_z, smooth_xy, 0)
    grad_y = _contract(w_z, _contract(dw_y, smooth_x, 1), 0)
    grad_x = _contract(w_z, _contract(w_y, _contract(dw_x, lattice, 2), 1), 0)
    return value, grad_z, grad_y, grad_x


class _FieldDisplaced:
  """``base`` with its level shifted by ``-amplitude * field``: a wrinkled surface."""

  def __init__(self, base, field: _SmoothField, amplitude: float):
    self.base, self.field, self.amplitude = base, field, float(amplitude)

  def bounds(self):
    return self.base.bounds()

  def level(self, z, y, x):
    level, grad_z, grad_y, grad_x = self.base.level(z, y, x)
    value, f_z, f_y, f_x = self.field(z, y, x, with_gradient=True)
    a = self.amplitude
    return level - a * value, grad_z - a * f_z, grad_y - a * f_y, grad_x - a * f_x


class _FieldBand:
  """Thin sheets |field - offset| <= half_width: a maze of folds (sulci)."""

  def __init__(self, field: _SmoothField, offset: float, half_width: float):
    self.field, self.offset, self.half_width = field, float(offset), float(half_width)

  def bounds(self):
    return (np.full(3, -_LONG_MM), np.full(3, _LONG_MM))

  def level(self, z, y, x):
    value, f_z, f_y, f_x = self.field(z, y, x, with_gradient=True)
    sign = np.sign(value - self.offset)
    return (np.abs(value - self.offset) - self.half_width, sign * f_z, sign * f_y, sign * f_x)


# ----------------------------------------------------------------------------
# Anatomy. Builders draw every random number from the anatomy stream in a
# fixed order that does not depend on the grid, then paint.
# ----------------------------------------------------------------------------


_STREAMS = {'anatomy': 1, 'lesions': 2, 'texture_fine': 3, 'texture_coarse': 4,
            'brain_folds': 5}


def _rng(seed: int, stream: str) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([int(seed), _STREAMS[stream]]))


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
  return float(rng.uniform(low, high))


@dataclasses.dataclass
class _Anatomy:
  """What lesion placement needs from a painted patient.

  Attributes:
    tissue_hu: Tissue name -> its nominal HU before texture: a number, or a
      function of y (mm) for the lung's gravity-dependent density.
    deep_region: Optional solid that lesion spheres must lie inside (the head
      keeps lesions away from the cortex, whose folds are not registered).
    midline_gap: Optional (x_mm, half_width_mm) of a thin sagittal sheet that
      lesion spheres must not touch (the interhemispheric fissure: too thin
      for the probe points to be sure to hit it).
  """

  tissue_hu: dict
  deep_region: Optional[object] = None
  midline_gap: Optional[tuple] = None

  def hu_of(self, tissue: str, y_mm: float) -> float:
    value = self.tissue_hu[tissue]
    return float(value(y_mm)) if callable(value) else float(value)


@dataclasses.dataclass(frozen=True)
class _Torso:
  body: _BodyContour
  cavity: _BodyContour       # inside the muscle wall
  muscle_outer: _BodyContour
  fat_outer: _BodyContour    # inside the skin
  scale: float               # patient width relative to an average adult


def _paint_torso(canvas: _Canvas, rng, hu: dict, cavity_fill_hu: float) -> _Torso:
  """Skin, subcutaneous fat, muscle wall and the fill of the body cavity."""
  a = _uniform(rng, 125, 165)
  b_ant = _uniform(rng, 85, 118)
  b_post = b_ant * _uniform(rng, 0.85, 0.97)  # flatter back: the patient lies on it
  z_profile = (_uniform(rng, -1e-3, 1e-3), _uniform(rng, 0.0, 0.02),
               _uniform(rng, 150, 300), _uniform(rng, 0, 2 * np.pi))
  body = _BodyContour((b_ant - b_post) / 2, a, b_ant, b_post, _uniform(rng, 2.2, 2.8), z_profile)
  fat_mm = _uniform(rng, 6, 35)
  muscle_mm = _uniform(rng, 8, 14)
  fat_outer = body.inset_by(2.0)  # skin
  muscle_outer = fat_outer.inset_by(fat_mm, fat_mm, 0.4 * fat_mm)  # little fat on the back
  cavity = muscle_outer.inset_by(muscle_mm)
  canvas.paint(body, hu['skin'], 'skin')
  canvas.paint(fat_outer, hu['fat'], 'fat')
  canvas.paint(muscle_outer, hu['muscle'], 'muscle')
  canvas.paint(cavity, cavity_fill_hu, 'fat')
  return _Torso(body, cavity, muscle_outer, fat_outer, a / 145.0)


@dataclasses.dataclass(frozen=True)
class _Spine:
  y_body: float      # centre of the vertebral bodies, mm
  semi_y: float
  semi_x: float
  y_canal: float
  scale: float


def _spine_geometry(torso: _Torso) -> _Spine:
  scale = math.sqrt(torso.scale)
  semi_y, semi_x = 17.0 * scale, 22.0 * scale
  # The posterior arch and the back muscles around it fill the back of the
  # cavity near the midline; lungs and kidneys lie beside them.
  y_canal = torso.body.center_y + torso.cavity.semi_axes()[2] - 25.0 * scale
  return _Spine(y_canal - semi_y - 12.0 * scale, semi_y, semi_x, y_canal, scale)


def _paint_bone(canvas, outer, inner, hu: dict):
  canvas.paint(outer, hu['cortical_bone'], 'cortical_bone')
  canvas.paint(inner, hu['cancellous_bone'], 'cancellous_bone')


def _paint_spine(canvas: _Canvas, rng, torso: _Torso, spine: _Spine, hu: dict, pitch: float,
                 disc_mm: float):
  """Back muscles, discs, vertebrae (cortex + cancellous core), canal."""
  s = spine.scale
  z_offset = _uniform(rng, 0, pitch)
  for side in (-1, 1):
    back_muscle = _Superellipsoid((0, spine.y_canal + 30 * s, side * 28 * s), (_LONG_MM, 24 * s, 22 * s))
    canvas.paint(_Intersection(back_muscle, torso.muscle_outer), hu['muscle'], 'muscle')
  canvas.paint(_Superellipsoid((0, spine.y_body, 0), (_LONG_MM, 0.97 * spine.semi_y, 0.97 * spine.semi_x)),
               hu['disc'], 'disc')
  cortex = 1.5
  grid = canvas.grid
  first = int(math.floor((grid.z[0] - z_offset) / pitch)) - 1
  last = int(math.ceil((grid.z[-1] - z_offset) / pitch)) + 1
  for k in range(first, last + 1):
    z_mid = z_offset + k * pitch
    half = (pitch - disc_mm) / 2
    # name: (centre zyx, semi-axes zyx, z exponent)
    parts = (
        ((z_mid, spine.y_body, 0), (half, spine.semi_y, spine.semi_x), 8.0),
        ((z_mid - 0.1 * pitch, spine.y_canal, 0), (0.38 * pitch, 15 * s, 15 * s), 6.0),
        ((z_mid - 0.15 * pitch, spine.y_canal + 27 * s, 0), (0.25 * pitch, 20 * s, 5 * s), 2.0),
        ((z_mid - 0.05 * pitch, spine.y_canal - 3 * s, -28 * s), (0.18 * pitch, 6 * s, 20 * s), 2.0),
        ((z_mid - 0.05 * pitch, spine.y_canal - 3 * s, 28 * s), (0.18 * pitch, 6 * s, 20 * s), 2.0),
    )
    for center, semi, p_z in parts:
      inner = tuple(v - cortex for v in semi)
      _paint_bone(canvas, _Superellipsoid(center, semi, p_z=p_z),
                  _Superellipsoid(center, inner, p_z=p_z), hu)
  canvas.paint(_Superellipsoid((0, spine.y_canal, 0), (_LONG_MM, 8 * s, 10 * s)),
               hu['spinal_canal'], 'spinal_canal')


def _paint_ribs(canvas: _Canvas, rng, torso: _Torso, hu: dict, arc_end: float,
                cartilage_fraction: float):
  """Ribs: tubes along the inner chest wall, sloping down towards the front.

  Each rib follows the superelliptic wall from beside the spine (angle 0.3
  rad from the back) to ``arc_end``; its last ``cartilage_fraction`` is
  costal cartilage. Rib k starts at ``z0 + k * pitch`` (no per-rib draws, so
  the set of ribs in view does not change the random stream).
  """
  pitch = _uniform(rng, 24, 30)
  z_start = _uniform(rng, 0, pitch)
  descent = _uniform(rng, 35, 60)
  radius = _uniform(rng, 3.5, 5.0)
  a, b_ant, b_post = torso.cavity.semi_axes()
  a, b_ant, b_post = a + 5.0, b_ant + 5.0, b_post + 5.0  # inside the muscle wall
  center_y, p = torso.body.center_y, torso.body.p
  t = np.linspace(0.0, 1.0, 13)
  angle = 0.3 + t * (arc_end - 0.3)
  sin, cos = np.sin(angle), np.cos(angle)
  x_unit = np.abs(sin) ** (2 / p)
  y_path = center_y + np.sign(cos) * np.abs(cos) ** (2 / p) * np.where(cos > 0, b_post, b_ant)
  z_rise = descent * t ** 1.5
  grid = canvas.grid
  first = int(math.floor((grid.z[0] - descent - radius - z_start) / pitch))
  last = int(math.ceil((grid.z[-1] + radius - z_start) / pitch))
  bone_segments = int(round((1.0 - cartilage_fraction) * (t.size - 1)))
  for k in range(first, last + 1):
    for side in (-1, 1):
      points = np.stack([z_start + k * pitch + z_rise, y_path, side * a * x_unit], axis=1)
      segments = list(zip(points[:-1], points[1:]))
      # Cortex of the whole rib first, so joints do not leave cortex in the marrow.
      for p0, p1 in segments[:bone_segments]:
        canvas.paint(_Capsule(p0, p1, radius, radius), hu['cortical_bone'], 'cortical_bone')
      for p0, p1 in segments[:bone_segments]:
        canvas.paint(_Capsule(p0, p1, radius - 1.5, radius - 1.5), hu['cancellous_bone'],
                     'cancellous_bone')
      for p0, p1 in segments[bone_segments:]:
        canvas.paint(_Capsule(p0, p1, radius, radius * 0.8), hu['cartilage'], 'cartilage')


def _vessel_tree(rng, root, direction, radius: float, length: float, depth: int):
  """Segments (p0, p1, r0, r1) of a random bifurcating tree (zyx, mm).

  Children turn 20-45° either way in a random plane, with radii shrinking by
  ~0.78 per generation (close to Murray's law, 2^(-1/3)) and lengths by ~0.82.
  """
  segments = []
  stack = [(np.asarray(root, float), np.asarray(direction, float), radius, length, 0)]
  while stack:
    start, heading, r, seg_length, level = stack.pop()
    heading = heading / np.linalg.norm(heading)
    r_end = r * _uniform(rng, 0.72, 0.84)
    end = start + seg_length * heading
    segments.append((start, end, r, r_end))
    if level + 1 >= depth:
      continue
    normal = np.cross(heading, rng.standard_normal(3))
    normal /= np.linalg.norm(normal)
    for sign in (-1, 1):
      turn = math.radians(_uniform(rng, 20, 45))
      child = math.cos(turn) * heading + sign * math.sin(turn) * normal
      stack.append((end, child, r_end, seg_length * _uniform(rng, 0.72, 0.9), level + 1))
  return segments


def _lung_gate(region_hu):
  """1 in aerated lung (-920..-500 HU), 0 in air, airway lumen and soft tissue."""
  return (np.clip((region_hu + 960.0) / 40.0, 0.0, 1.0)
          * np.clip((-450.0 - region_hu) / 100.0, 0.0, 1.0))


def _build_chest(canvas: _Canvas, rng) -> _Anatomy:
  hu = {'skin': _uniform(rng, 20, 40), 'fat': _uniform(rng, -115, -90),
        'muscle': _uniform(rng, 45, 60), 'mediastinal_fat': _uniform(rng, -100, -80),
        'lung': _uniform(rng, -870, -820), 'heart': _uniform(rng, 35, 45),
        'blood': _uniform(rng, 38, 48), 'cortical_bone': _uniform(rng, 1000, 1300),
        'cancellous_bone': _uniform(rng, 200, 300), 'disc': _uniform(rng, 75, 95),
        'cartilage': _uniform(rng, 100, 140), 'spinal_canal': _uniform(rng, 15, 25),
        'breast_gland': _uniform(rng, 20, 40), 'airway_wall': _uniform(rng, 40, 80)}
  torso = _paint_torso(canvas, rng, hu, hu['mediastinal_fat'])
  spine = _spine_geometry(torso)
  center_y = torso.body.center_y
  a, b_ant, b_post = torso.cavity.semi_axes()
  pleura = torso.cavity.inset_by(1.0)

  # Lungs are denser posteriorly (gravity): + lung_slope HU across the chest.
  lung_slope = _uniform(rng, 20, 50) / (b_ant + b_post)
  lung_hu = lambda y: hu['lung'] + lung_slope * (y - center_y)
  z_lung = _uniform(rng, -40, 20)
  for side in (-1, 1):
    lung = _Superellipsoid((z_lung, center_y + 0.05 * b_post, side * 0.5 * a),
                           (170, 1.1 * max(b_ant, b_post), 0.52 * a), p=2.4)
    canvas.paint(_Intersection(lung, pleura), lambda z, y, x: lung_hu(y), 'lung')

  front = center_y - b_ant
  mediastinum = _Superellipsoid((0, (front + spine.y_body) / 2, 0.03 * a),
                                (_LONG_MM, (spine.y_body - front) / 2 + 5, 0.2 * a))
  canvas.paint(_Intersection(mediastinum, pleura), hu['mediastinal_fat'], 'fat')

  z_heart = _uniform(rng, -10, 60)
  heart_center = (z_heart, center_y - 0.25 * b_ant, 0.12 * a)
  heart_yaw = _uniform(rng, -0.8, -0.4)  # apex points left and forward
  heart_semi = (75.0, 0.42 * b_ant, 0.36 * a)
  canvas.paint(_Superellipsoid((z_heart - 70, center_y - 0.3 * b_ant, 0.0), (70, 15, 15)),
               hu['blood'], 'blood')  # ascending aorta
  canvas.paint(_Superellipsoid((z_heart - 60, center_y - 0.35 * b_ant, 0.16 * a), (55, 13, 13),
                               _rotation(pitch=0.3)), hu['blood'], 'blood')  # pulmonary trunk
  canvas.paint(_Intersection(_Superellipsoid(heart_center, tuple(v + 4 for v in heart_semi),
                                             _rotation(heart_yaw)), pleura),
               hu['mediastinal_fat'], 'fat')  # pericardial fat
  canvas.paint(_Intersection(_Superellipsoid(heart_center, heart_semi, _rotation(heart_yaw)), pleura),
               hu['heart'], 'heart')
  canvas.paint(_Superellipsoid((0, spine.y_body - 6, spine.semi_x + 10), (_LONG_MM, 12, 12)),
               hu['blood'], 'blood')  # descending aorta
  canvas.paint(_Superellipsoid((0, spine.y_body - spine.semi_y - 9, 4), (_LONG_MM, 7, 9)),
               hu['muscle'], 'muscle')  # oesophagus

  # Trachea down to the carina, then the two main bronchi out to the hila.
  z_carina = z_heart - _uniform(rng, 60, 90)
  y_trachea = spine.y_body - spine.semi_y - 24
  carina = (z_carina, y_trachea, 0.0)
  airways = [((z_carina - 400, y_trachea, 0.0), carina, 10.0, 10.0)]
  hila = []
  for side in (-1, 1):
    hilum = (z_carina + 30, y_trachea + 10, side * 0.25 * a)
    hila.append(hilum)
    airways.append((carina, hilum, 7.5, 5.5))
  for p0, p1, r0, r1 in airways:
    canvas.paint(_Capsule(p0, p1, r0, r1), hu['airway_wall'], 'cartilage')
  for p0, p1, r0, r1 in airways:
    canvas.paint(_Capsule(p0, p1, r0 - 1.8, r1 - 1.5), AIR_HU, 'airway')

  _paint_spine(canvas, rng, torso, spine, hu, pitch=_uniform(rng, 24, 28), disc_mm=5.0)
  _paint_ribs(canvas, rng, torso, hu, arc_end=2.75, cartilage_fraction=0.25)
  sternum = (0, center_y - b_ant - 6.0, 0)
  _paint_bone(canvas, _Superellipsoid(sternum, (_LONG_MM, 7, 16)),
              _Superellipsoid(sternum, (_LONG_MM, 5.5, 14.5)), hu)

  if rng.uniform() < 0.5:  # breasts
    body_a, body_b_ant, _ = torso.body.semi_axes()
    semi = (_uniform(rng, 50, 70), _uniform(rng, 22, 40), _uniform(rng, 55, 75))
    gland = _uniform(rng, 0.3, 0.7)
    for side in (-1, 1):
      center = (0.0, center_y - 0.9 * body_b_ant + 0.5 * semi[1], side * 0.42 * body_a)
      outer = _Superellipsoid(center, semi)
      # Skin only outside the body's own skin, fat merging with subcutaneous fat.
      canvas.paint(_Intersection(outer, _Complement(torso.fat_outer)), hu['skin'], 'skin')
      canvas.paint(_Intersection(_Superellipsoid(center, tuple(v - 2 for v in semi)),
                                 _Complement(torso.muscle_outer)), hu['fat'], 'fat')
      canvas.paint(_Intersection(_Superellipsoid(center, tuple(gland * v for v in semi)),
                                 _Complement(torso.muscle_outer)), hu['breast_gland'], 'breast_gland')

  # Pulmonary vessel trees from each hilum (upward, lateral and downward
  # lobar branches), painted only into aerated lung.
  for side, hilum in zip((-1, 1), hila):
    for lobe_z in (-1.0, 0.0, 1.0):
      direction = (lobe_z + _uniform(rng, -0.3, 0.3), _uniform(rng, -0.3, 0.3), side * 1.0)
      for p0, p1, r0, r1 in _vessel_tree(rng, hilum, direction, 5.5, 28.0, depth=9):
        canvas.paint(_Capsule(p0, p1, r0, r1), hu['blood'], gate=_lung_gate)
  return _Anatomy({'lung': lung_hu})


def _build_abdomen(canvas: _Canvas, rng) -> _Anatomy:
  hu = {'skin': _uniform(rng, 20, 40), 'fat': _uniform(rng, -115, -90),
        'muscle': _uniform(rng, 45, 60), 'liver': _uniform(rng, 52, 68),
        'spleen': _uniform(rng, 40, 50), 'kidney_cortex': _uniform(rng, 34, 42),
        'kidney_medulla': _uniform(rng, 24, 31), 'blood': _uniform(rng, 38, 48),
        'gallbladder': _uniform(rng, 0, 20), 'bowel_wall': _uniform(rng, 35, 50),
        'cortical_bone': _uniform(rng, 1000, 1300), 'cancellous_bone': _uniform(rng, 200, 300),
        'disc': _uniform(rng, 75, 95), 'cartilage': _uniform(rng, 100, 140),
        'spinal_canal': _uniform(rng, 15, 25)}
  torso = _paint_torso(canvas, rng, hu, hu['fat'] + 10.0)  # visceral fat is a bit denser
  spine = _spine_geometry(torso)
  center_y = torso.body.center_y
  a, b_ant, b_post = torso.cavity.semi_axes()
  cavity = torso.cavity.inset_by(1.0)

  # Bowel loops: wall, fluid content, and gas floating up (small y) to a level.
  for _ in range(int(rng.integers(6, 13))):
    center = (_uniform(rng, -80, 80), center_y + _uniform(rng, -0.8 * b_ant, 0.2 * b_post),
              _uniform(rng, -0.65 * a, 0.65 * a))
    semi = (_uniform(rng, 20, 45), _uniform(rng, 11, 22), _uniform(rng, 11, 22))
    rotation = _rotation(_uniform(rng, 0, np.pi), _uniform(rng, -0.6, 0.6), _uniform(rng, -0.6, 0.6))
    content_hu = _uniform(rng, -20, 30)
    gas_fraction = _uniform(rng, 0.1, 0.7) if rng.uniform() < 0.7 else 0.0
    wall = _Superellipsoid(center, semi, rotation)
    lumen = _Superellipsoid(center, tuple(v - 2.5 for v in semi), rotation)
    canvas.paint(_Intersection(wall, cavity), hu['bowel_wall'], 'bowel_wall')
    canvas.paint(_Intersection(lumen, cavity), content_hu, 'bowel_content')
    if gas_fraction > 0:
      top, bottom = lumen.bounds()[0][1], lumen.bounds()[1][1]
      level = top + gas_fraction * (bottom - top)
      canvas.paint(_Intersection(lumen, cavity, _HalfSpace((0, level, 0), (0, 1, 0))),
                   AIR_HU, 'gas')

  z_liver = _uniform(rng, -60, 0)
  liver_yaw = _uniform(rng, -0.3, 0.1)
  right_lobe = _Superellipsoid((z_liver, center_y - 0.05 * b_ant, -0.42 * a),
                               (110, 0.8 * (b_ant + b_post) / 2, 0.5 * a), _rotation(liver_yaw))
  left_lobe = _Superellipsoid((z_liver - 20, center_y - 0.55 * b_ant, 0.05 * a),
                              (70, 0.35 * b_ant, 0.38 * a), _rotation(_uniform(rng, 0.0, 0.3)))
  for lobe in (right_lobe, left_lobe):
    canvas.paint(_Intersection(lobe, cavity), hu['liver'], 'liver')
  canvas.paint(_Intersection(_Superellipsoid((z_liver + 50, center_y - 0.35 * b_ant, -0.25 * a),
                                             (30, 14, 12)), cavity),
               hu['gallbladder'], 'gallbladder')
  spleen = _Superellipsoid((_uniform(rng, -50, 10), center_y + 0.45 * b_post, 0.62 * a),
                           (55, 0.45 * b_post, 0.22 * a), _rotation(_uniform(rng, 0.4, 0.8)))
  canvas.paint(_Intersection(spleen, cavity), hu['spleen'], 'spleen')

  s = spine.scale
  for side in (-1, 1):
    z_kidney = _uniform(rng, 0, 50) + (15 if side < 0 else 0)  # the right kidney sits lower
    center = (z_kidney, spine.y_body + 5, side * (spine.semi_x + 40 * s))
    semi = (55 * s, 24 * s, 30 * s)
    rotation = _rotation(side * _uniform(rng, 0.3, 0.7))  # hilum turned forward and in
    canvas.paint(_Superellipsoid(center, semi, rotation), hu['kidney_cortex'], 'kidney_cortex')
    canvas.paint(_Superellipsoid(center, tuple(v - 7 for v in semi), rotation),
                 hu['kidney_medulla'], 'kidney_medulla')
    sinus = (center[0], center[1] - 6, center[2] - side * 0.5 * semi[2])
    canvas.paint(_Superellipsoid(sinus, (25 * s, 8 * s, 12 * s), rotation), hu['fat'], 'fat')
  aorta_radius = _uniform(rng, 9, 13)
  canvas.paint(_Superellipsoid((0, spine.y_body - spine.semi_y - aorta_radius - 2, 0.35 * spine.semi_x),
                               (_LONG_MM, aorta_radius, aorta_radius)), hu['blood'], 'blood')
  canvas.paint(_Superellipsoid((0, spine.y_body - spine.semi_y - 10, -(0.9 * spine.semi_x + 10)),
                               (_LONG_MM, 10, 14)), hu['blood'], 'blood')  # inferior vena cava
  for side in (-1, 1):  # psoas muscles, widening downwards
    canvas.paint(_Superellipsoid((150, spine.y_body + 0.1 * spine.semi_y, side * (spine.semi_x + 15 * s)),
                                 (230, 17 * s, 20 * s)), hu['muscle'], 'muscle')
  _paint_spine(canvas, rng, torso, spine, hu, pitch=_uniform(rng, 30, 35), disc_mm=9.0)
  _paint_ribs(canvas, rng, torso, hu, arc_end=1.9, cartilage_fraction=0.0)
  return _Anatomy({'liver': hu['liver'], 'spleen': hu['spleen']})


def _inset(ellipsoid: _Superellipsoid, mm: float) -> _Superellipsoid:
  return _Superellipsoid(ellipsoid.center, tuple(v - mm for v in ellipsoid.semi_axes),
                         ellipsoid.rotation, ellipsoid.p, ellipsoid.p_z)


def _build_head(canvas: _Canvas, rng, seed: int) -> _Anatomy:
  hu = {'skin': _uniform(rng, 30, 45), 'fat': _uniform(rng, -90, -60),
        'cortical_bone': _uniform(rng, 1400, 1700), 'cancellous_bone': _uniform(rng, 800, 1100),
        'csf': _uniform(rng, 2, 10), 'gray_matter': _uniform(rng, 36, 44),
        'white_matter': _uniform(rng, 22, 28)}
  center_y = _uniform(rng, -5, 5)
  head = _Superellipsoid((_uniform(rng, -25, 15), center_y, 0.0),
                         (_uniform(rng, 100, 115), _uniform(rng, 88, 100), _uniform(rng, 68, 80)),
                         _rotation(_uniform(rng, -0.06, 0.06)))
  scalp_mm = _uniform(rng, 4, 7)
  skull_mm = _uniform(rng, 5.5, 8.5)
  table_mm = 2.0
  csf_mm = _uniform(rng, 1.5, 3.5)  # wider with atrophy
  canvas.paint(head, hu['skin'], 'skin')
  canvas.paint(_inset(head, 1.5), hu['fat'], 'fat')
  canvas.paint(_inset(head, scalp_mm), hu['cortical_bone'], 'cortical_bone')
  canvas.paint(_inset(head, scalp_mm + table_mm), hu['cancellous_bone'], 'cancellous_bone')
  canvas.paint(_inset(head, scalp_mm + skull_mm - table_mm), hu['cortical_bone'], 'cortical_bone')
  canvas.paint(_inset(head, scalp_mm + skull_mm), hu['csf'], 'csf')
  brain = _inset(head, scalp_mm + skull_mm + csf_mm)
  canvas.paint(brain, hu['white_matter'], 'white_matter')

  # Cortex: gray matter outside a wrinkled surface ~5 mm under the brain
  # surface; sulci: CSF sheets in the outer 12 mm where the folds dip.
  folds = _SmoothField(seed, _STREAMS['brain_folds'], spacing_mm=5.0)
  gradient_scale = 2.0 / min(brain.semi_axes)  # |grad L| at the surface, 1/mm
  wrinkled = _FieldDisplaced(_inset(brain, 5.0), folds, 2.5 * gradient_scale)
  canvas.paint(_Intersection(brain, _Complement(wrinkled)), hu['gray_matter'], 'gray_matter',
               register=False)
  sulci = _Intersection(_FieldBand(folds, 0.0, 0.07), brain, _Complement(_inset(brain, 12.0)))
  canvas.paint(sulci, hu['csf'], 'csf', register=False)
  x_mid = brain.center[2]
  fissure = _Intersection(_HalfSpace((0, 0, x_mid + 1.2), (0, 0, 1)),
                          _HalfSpace((0, 0, x_mid - 1.2), (0, 0, -1)), brain,
                          _Complement(_Superellipsoid(brain.center, (60, 0.45 * brain.semi_axes[1], 40))))
  canvas.paint(fissure, hu['csf'], 'csf')

  z_ventricles = _uniform(rng, -10, 10)
  width = _uniform(rng, 4, 9)
  length = _uniform(rng, 25, 35)
  for side in (-1, 1):
    canvas.paint(_Superellipsoid((z_ventricles + 5, center_y - 0.12 * brain.semi_axes[1], side * 15),
                                 (15, 12, 7)), hu['gray_matter'], 'gray_matter')  # caudate
    canvas.paint(_Superellipsoid((z_ventricles + 12, center_y + 0.08 * brain.semi_axes[1], side * 11),
                                 (14, 16, 10)), hu['gray_matter'], 'gray_matter')  # thalamus
  for side in (-1, 1):
    offset = _uniform(rng, 6, 10)
    canvas.paint(_Superellipsoid((z_ventricles, center_y - 0.05 * brain.semi_axes[1], side * offset),
                                 (16, length, width), _rotation(side * 0.15)), hu['csf'], 'csf')
    canvas.paint(_Superellipsoid((z_ventricles + 8, center_y + 0.35 * brain.semi_axes[1], side * 15),
                                 (12, 15, 5), _rotation(-side * 0.4)), hu['csf'], 'csf')
  canvas.paint(_Superellipsoid((z_ventricles + 15, center_y + 0.05 * brain.semi_axes[1], 0),
                               (12, 14, 2.5)), hu['csf'], 'csf')  # third ventricle
  return _Anatomy({'white_matter': hu['white_matter'], 'gray_matter': hu['gray_matter']},
                  deep_region=_inset(brain, 18.0), midline_gap=(x_mid, 1.2))


# ----------------------------------------------------------------------------
# Lesions.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _LesionKind:
  name: str
  weight: float            # relative frequency within the region
  organs: tuple            # tissues the whole lesion must lie in
  radius_mm: tuple         # (low, high)
  contrast_hu: tuple       # (low, high), relative to the surrounding tissue


_LESION_KINDS = {
    'chest': (
        _LesionKind('nodule', 0.5, ('lung',), (2.5, 10.0), (780.0, 900.0)),
        _LesionKind('ground_glass_nodule', 0.3, ('lung',), (4.0, 12.0), (200.0, 400.0)),
        _LesionKind('high_contrast', 0.2, ('lung',), (1.5, 4.0), (1000.0, 1600.0)),  # calcified
    ),
    'abdomen': (
        _LesionKind('metastasis', 0.75, ('liver',), (4.0, 15.0), (-40.0, -15.0)),
        _LesionKind('high_contrast', 0.25, ('liver', 'spleen'), (2.0, 6.0), (100.0, 300.0)),
    ),
    'head': (
        _LesionKind('hemorrhage', 0.5, ('white_matter', 'gray_matter'), (3.0, 12.0), (25.0, 45.0)),
        _LesionKind('hypodense', 0.5, ('white_matter', 'gray_matter'), (4.0, 14.0), (-15.0, -6.0)),
    ),
}

# Lesions keep this far (mm) from other tissues and from each other.
_LESION_MARGIN_MM = 2.0
_PLACEMENT_ATTEMPTS = 300


def _sphere_directions(count: int) -> np.ndarray:
  """(count, 3) near-uniform unit vectors (Fibonacci sphere), zyx."""
  index = np.arange(count) + 0.5
  z = 1.0 - 2.0 * index / count
  azimuth = np.pi * (1.0 + 5.0 ** 0.5) * index
  ring = np.sqrt(1.0 - z ** 2)
  return np.stack([z, ring * np.sin(azimuth), ring * np.cos(azimuth)], axis=1)


# ~0.3 reach apart on the probe sphere: no registered structure thick enough
# to matter (ribs, vessels, ducts >= 7 mm across) slips between them.
_PROBE_DIRECTIONS = _sphere_directions(128)


def _organ_box(canvas: _Canvas, organs: Sequence[str]):
  """mm box (lo, hi) of the registered solids of ``organs``, clipped to the slab."""
  ids = {TISSUE_IDS[name] for name in organs}
  boxes = [shape.bounds() for shape, tissue_id in canvas.solids if tissue_id in ids]
  if not boxes:
    return None
  grid = canvas.grid
  lo = np.maximum(np.min([b[0] for b in boxes], axis=0), [grid.z[0], grid.y[0], grid.x[0]])
  hi = np.minimum(np.max([b[1] for b in boxes], axis=0), [grid.z[-1], grid.y[-1], grid.x[-1]])
  return lo, hi


def _place_lesion(canvas: _Canvas, anatomy: _Anatomy, kind: _LesionKind, rng, placed):
  """Draws a spheroid inside ``kind.organs`` clear of ``placed``; None if none fits.

  The test is analytic (registered solids at probe points on a sphere of the
  lesion's largest semi-axis plus a margin), so the outcome is the same at
  every resolution.
  """
  box = _organ_box(canvas, kind.organs)
  if box is None:
    return None
  lo, hi = box
  grid = canvas.grid
  organ_ids = np.array([TISSUE_IDS[name] for name in kind.organs])
  for _ in range(_PLACEMENT_ATTEMPTS):
    radius = _uniform(rng, *kind.radius_mm)
    stretch = np.exp(rng.uniform(-0.15, 0.15, 3))
    semi = radius * stretch / np.prod(stretch) ** (1 / 3)  # geometric mean = radius
    rotation = _rotation(*rng.uniform(-np.pi, np.pi, 3))
    # Centres lie within half a slice (or half a radius) of a slice centre,
    # so every lesion shows in at least one slice.
    z_slack = min(0.5 * radius, 0.5 * grid.slice_mm)
    center = np.array([_uniform(rng, grid.z[0] - z_slack, grid.z[-1] + z_slack),
                       _uniform(rng, lo[1], hi[1]), _uniform(rng, lo[2], hi[2])])
    contrast = _uniform(rng, *kind.contrast_hu)
    reach = float(semi.max()) + _LESION_MARGIN_MM
    if any(np.linalg.norm(center - other) < reach + other_reach for other, other_reach in placed):
      continue
    if anatomy.midline_gap is not None and (
        abs(center[2] - anatomy.midline_gap[0]) < reach + anatomy.midline_gap[1]):
      continue
    probes = np.concatenate([center[None], center + reach * _PROBE_DIRECTIONS,
                             center + 0.5 * reach * _PROBE_DIRECTIONS[::4]])
    tissues = canvas.tissue_at(probes[:, 0], probes[:, 1], probes[:, 2])
    if not np.isin(tissues, organ_ids).all():
      continue
    if anatomy.deep_region is not None and (
        anatomy.deep_region.level(probes[:, 0], probes[:, 1], probes[:, 2])[0] > 0).any():
      continue
    organ = TISSUES[tissues[0]]
    shape = _Superellipsoid(center, semi, rotation)
    return shape, center, radius, contrast, organ, reach
  return None


def _insert_lesions(canvas: _Canvas, anatomy: _Anatomy, region: str, seed: int,
                    num_lesions: Optional[int]):
  """Paints lesions into ``canvas.hu``; returns (labels, lesions)."""
  rng = _rng(seed, 'lesions')
  kinds = _LESION_KINDS[region]
  weights = np.array([kind.weight for kind in kinds])
  if num_lesions is None:
    num_lesions = int(rng.integers(1, 5))
  grid = canvas.grid
  labels = np.zeros(grid.shape, np.int16)
  lesions, placed = [], []
  for _ in range(num_lesions):
    kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
    found = _place_lesion(canvas, anatomy, kind, rng, placed)
    if found is None:
      continue
    shape, center, radius, contrast, organ, reach = found
    placed.append((center, reach))
    target = anatomy.hu_of(organ, center[1]) + contrast
    # Lesions never hide structures more extreme in their own direction
    # (vessels stay visible through a ground-glass nodule).
    extreme = np.maximum if contrast > 0 else np.minimum
    slices, (z, y, x) = grid.window(*shape.bounds())
    region_hu = canvas.hu[slices]
    level, grad_z, grad_y, grad_x = shape.level(z, y, x)
    coverage = _coverage(grid, level, grad_z, grad_y, grad_x)
    region_hu += coverage * (extreme(target, region_hu) - region_hu)

    label = len(lesions) + 1
    labels[slices][level <= 0] = label
    center_index = tuple(int(np.argmin(np.abs(axis - value)))
                         for axis, value in zip((grid.z, grid.y, grid.x), center))
    labels[center_index] = label
    mask_index = np.nonzero(labels[slices] == label)
    box = tuple(int(sl.start + idx.min()) for sl, idx in zip(slices, mask_index)) + tuple(
        int(sl.start + idx.max() + 1) for sl, idx in zip(slices, mask_index))
    center_zyx = tuple(float((value - axis[0]) / step) for value, axis, step in
                       zip(center, (grid.z, grid.y, grid.x),
                           (grid.slice_mm, grid.pixel_mm, grid.pixel_mm)))
    lesions.append(Lesion(label, kind.name, center_zyx, radius, contrast, box, organ))
  return labels, tuple(lesions)


# ----------------------------------------------------------------------------
# Texture.
# ----------------------------------------------------------------------------

# Texture standard deviation (HU) as a function of the painted HU: none in air,
# ~25 in lung parenchyma, a few HU in fat and soft tissue, tens in bone.
_TEXTURE_KNOTS_HU = (-1000.0, -980.0, -900.0, -650.0, -300.0, -150.0, -60.0, -10.0,
                     120.0, 250.0, 700.0, 1500.0)
_TEXTURE_STD_HU = {
    'body': (0.0, 0.0, 25.0, 25.0, 12.0, 8.0, 8.0, 5.0, 5.0, 30.0, 40.0, 40.0),
    # Brain gray/white contrast is only ~15 HU, so its texture stays ~1.5 HU.
    'head': (0.0, 0.0, 25.0, 25.0, 12.0, 6.0, 6.0, 1.5, 1.5, 30.0, 40.0, 40.0),
}


def _add_texture(canvas: _Canvas, seed: int, region: str):
  grid = canvas.grid
  coords = (grid.z[:, None, None], grid.y[None, :, None], grid.x[None, None, :])
  fine = _SmoothField(seed, _STREAMS['texture_fine'], 2.5)(*coords)
  coarse = _SmoothField(seed, _STREAMS['texture_coarse'], 12.0)(*coords)
  table = _TEXTURE_STD_HU['head' if region == 'head' else 'body']
  std = np.interp(canvas.hu, _TEXTURE_KNOTS_HU, table).astype(np.float32)
  canvas.hu += std * ((fine + coarse) * np.float32(1 / math.sqrt(2)))


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------


def make_volume(seed: int, *, region: str = 'abdomen', size: int = 256, num_slices: int = 32,
                slice_thickness_mm: float = 1.0, fov_mm: Optional[float] = None,
                num_lesions: Optional[int] = None) -> PhantomVolume:
  """A random, reproducible anatomical CT volume in HU.

  Args:
    seed: Patient seed; the same seed gives the same patient at any size,
      slice count and slice thickness.
    region: 'chest', 'abdomen' or 'head'.
    size: In-plane matrix size (size × size); 64 to 512 are checked.
    num_slices: Number of slices D, centred on the same anatomical z.
    slice_thickness_mm: Slice thickness = spacing, mm (partial volume along z
      follows it).
    fov_mm: Square field of view, mm (default 350 body, 250 head; at most 600).
    num_lesions: Lesions to insert (default: 1 to 4 at random). Fewer are
      returned if the organ has no room for them in this slab.

  Returns:
    A PhantomVolume with hu (D, H, W) float32, lesion labels and boxes, and
    the tissue map.
  """
  if region not in REGIONS:
    raise ValueError(f'unknown region {region!r}; known: {REGIONS}')
  fov_mm = DEFAULT_FOV_MM[region] if fov_mm is None else float(fov_mm)
  if not 0 < fov_mm <= MAX_FOV_MM:
    raise ValueError(f'fov_mm must be in (0, {MAX_FOV_MM}], got {fov_mm}')
  if size < 8 or num_slices < 1 or not slice_thickness_mm > 0:
    raise ValueError(f'bad grid: size={size}, num_slices={num_slices}, '
                     f'slice_thickness_mm={slice_thickness_mm}')
  grid = _Grid.create(int(size), int(num_slices), float(slice_thickness_mm), fov_mm)
  canvas = _Canvas(grid)
  rng = _rng(seed, 'anatomy')
  if region == 'chest':
    anatomy = _build_chest(canvas, rng)
  elif region == 'abdomen':
    anatomy = _build_abdomen(canvas, rng)
  else:
    anatomy = _build_head(canvas, rng, seed)
  labels, lesions = _insert_lesions(canvas, anatomy, region, seed, num_lesions)
  _add_texture(canvas, seed, region)
  # Nothing is less dense than air; blending gas into tissue in float32 can
  # undershoot -1000 by ~1e-4.
  np.maximum(canvas.hu, AIR_HU, out=canvas.hu)
  return PhantomVolume(hu=canvas.hu, labels=labels, lesions=lesions,
                       pixel_spacing_mm=grid.pixel_mm, slice_thickness_mm=grid.slice_mm,
                       region=region, tissue=canvas.tissue)


def make_slice(seed: int, *, region: str = 'abdomen', size: int = 256,
               fov_mm: Optional[float] = None, slice_thickness_mm: float = 1.0,
               num_lesions: Optional[int] = None) -> PhantomVolume:
  """One axial slice (D = 1) at the centre z of ``make_volume``'s patient ``seed``.

  Lesions are placed within half a slice of it, so they show in the slice.
  """
  return make_volume(seed, region=region, size=size, num_slices=1,
                     slice_thickness_mm=slice_thickness_mm, fov_mm=fov_mm,
                     num_lesions=num_lesions)
