"""Reader and writer for fastMRI single-coil HDF5 files, read lazily one slice at a time.

A fastMRI single-coil file (facebookresearch/fastMRI; Zbontar et al. 2018)
holds:

* ``kspace``: ``(slices, H, W)`` complex64 k-space, centred (DC at
  ``(H // 2, W // 2)``), H the readout and W the phase-encode direction. The
  knee files are 640 x 368: the readout is 2x oversampled, so the image is
  cropped after the inverse FFT;
* ``reconstruction_esc`` (single-coil files) or ``reconstruction_rss``
  (multi-coil ones): ``(slices, h, w)`` float32 magnitude targets, absent
  from the challenge's test files;
* ``ismrmrd_header``: ISMRMRD XML whose ``encoding/encodedSpace/matrixSize``
  and ``encoding/reconSpace/matrixSize`` give the k-space and reconstruction
  sizes (``x`` rows, ``y`` columns);
* attrs ``max`` and ``norm`` (of the target volume), ``acquisition``
  (e.g. ``CORPD_FBK``), ``patient_id``;
* optionally ``mask``: ``(W,)`` the sampled columns of an already
  undersampled file (the test set); its ``kspace`` is zero elsewhere and the
  file is reconstructed with its own mask.

The reconstruction size (``FastMRIFile.recon_size``) is, as fastMRI's data
transforms choose it, the target's shape when there is a target, else the
header's reconSpace size, else the k-space size; each side is clipped to the
k-space's (fastMRI's guard for FLAIR files whose header is larger than the
data). The fastMRI image is ``center_crop(|ifft2c(kspace)|, recon_size)``
(``physics.mri.magnitude_image``).

``FastMRIFile`` keeps only metadata; every ``read_*`` opens the file, reads
one slice and closes it, so whole volumes (hundreds of MB for real files) are
never held and many files can be open in a loader at once. Multi-coil
``(slices, coils, H, W)`` files are refused with a clear error: this reader
is single-coil only.
"""
from __future__ import annotations

import os
import pathlib
import xml.etree.ElementTree as ET
from typing import Mapping, Optional, Sequence, Tuple

import h5py
import numpy as np

from ldct_jax.errors import InputError

RECON_KEYS = ("reconstruction_esc", "reconstruction_rss")
ISMRMRD_NAMESPACE = "http://www.ismrm.org/ISMRMRD"


def _attr_value(value):
  """HDF5 attribute -> plain Python (str, float, int, list)."""
  if isinstance(value, bytes):
    return value.decode("utf-8", "replace")
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  return value


def _parse_header(path, raw) -> dict:
  """``{'encoded': (x, y, z), 'recon': (x, y, z), 'fov_mm': (x, y, z)}`` from ISMRMRD XML."""
  if isinstance(raw, np.ndarray):
    raw = raw.item() if raw.shape == () else bytes(raw)
  if isinstance(raw, bytes):
    raw = raw.decode("utf-8", "replace")
  try:
    root = ET.fromstring(raw)
  except ET.ParseError as error:
    raise InputError(f"{path}: ismrmrd_header is not valid XML ({error})") from None
  ns = {"m": ISMRMRD_NAMESPACE}
  out = {}
  for key, space in (("encoded", "encodedSpace"), ("recon", "reconSpace")):
    size = root.find(f"m:encoding/m:{space}/m:matrixSize", ns)
    if size is not None:
      try:
        out[key] = tuple(int(size.find(f"m:{a}", ns).text) for a in "xyz")
      except (AttributeError, TypeError, ValueError):
        raise InputError(f"{path}: ismrmrd_header {space}/matrixSize lacks integer x, y, z") \
            from None
    fov = root.find(f"m:encoding/m:{space}/m:fieldOfView_mm", ns)
    if fov is not None and key == "recon":
      try:
        out["fov_mm"] = tuple(float(fov.find(f"m:{a}", ns).text) for a in "xyz")
      except (AttributeError, TypeError, ValueError):
        pass  # the field of view is informative only
  return out


class FastMRIFile:
  """Metadata of one fastMRI single-coil file; slices are read on demand.

  Attributes:
    path: the file.
    num_slices: number of slices.
    kspace_shape: ``(slices, H, W)``.
    recon_size: ``(h, w)`` of the reconstruction (see the module docstring).
    encoded_size: ``(H, W)`` from the header (None without a header).
    attrs: the file's attributes as plain Python values.
    mask: ``(W,)`` float32 0/1 sampled columns of an undersampled file, or None.
    target_key: ``'reconstruction_esc'``, ``'reconstruction_rss'`` or None.
    has_target: whether the file has a target reconstruction.
  """

  def __init__(self, path):
    self.path = pathlib.Path(path)
    if not self.path.is_file():
      raise InputError(f"{self.path}: no such file")
    if not h5py.is_hdf5(self.path):
      raise InputError(f"{self.path}: not an HDF5 file (fastMRI files are HDF5)")
    try:
      handle = h5py.File(self.path, "r")
    except OSError as error:
      raise InputError(f"{self.path}: cannot be opened as HDF5 ({error})") from None
    with handle as f:
      if "kspace" not in f:
        raise InputError(f"{self.path}: no 'kspace' dataset (has {sorted(f.keys())}); "
                         "not a fastMRI file")
      kspace = f["kspace"]
      if kspace.ndim == 4:
        raise InputError(f"{self.path}: 'kspace' {kspace.shape} is multi-coil "
                         "(slices, coils, H, W); only single-coil files (slices, H, W) are "
                         "supported")
      if kspace.ndim != 3:
        raise InputError(f"{self.path}: 'kspace' has shape {kspace.shape}; expected "
                         "single-coil (slices, H, W)")
      if kspace.dtype.kind != "c":
        raise InputError(f"{self.path}: 'kspace' has dtype {kspace.dtype}; expected complex "
                         "k-space (complex64)")
      self.kspace_shape: Tuple[int, int, int] = tuple(int(s) for s in kspace.shape)
      self.target_key: Optional[str] = next((k for k in RECON_KEYS if k in f), None)
      target_shape = None
      if self.target_key is not None:
        target = f[self.target_key]
        if target.ndim != 3 or target.shape[0] != self.kspace_shape[0]:
          raise InputError(f"{self.path}: '{self.target_key}' has shape {target.shape}; "
                           f"expected ({self.kspace_shape[0]}, h, w), one image per k-space "
                           "slice")
        target_shape = tuple(int(s) for s in target.shape[1:])
      header = _parse_header(self.path, f["ismrmrd_header"][()]) if "ismrmrd_header" in f else {}
      self.attrs = {k: _attr_value(v) for k, v in f.attrs.items()}
      self.mask: Optional[np.ndarray] = None
      if "mask" in f:
        mask = np.asarray(f["mask"][()], np.float32).reshape(-1)
        if mask.shape != (self.kspace_shape[-1],):
          raise InputError(f"{self.path}: 'mask' has {f['mask'].shape} entries for "
                           f"{self.kspace_shape[-1]} k-space columns; expected (W,)")
        self.mask = (mask != 0).astype(np.float32)
    height, width = self.kspace_shape[1:]
    self.encoded_size = header["encoded"][:2] if "encoded" in header else None
    self.fov_mm = header.get("fov_mm")
    if target_shape is not None:
      size = target_shape
    elif "recon" in header:
      size = header["recon"][:2]
    else:
      size = (height, width)
    self.recon_size: Tuple[int, int] = (min(int(size[0]), height), min(int(size[1]), width))

  @property
  def num_slices(self) -> int:
    return self.kspace_shape[0]

  @property
  def has_target(self) -> bool:
    return self.target_key is not None

  def _check_index(self, index: int) -> int:
    index = int(index)
    if not 0 <= index < self.num_slices:
      raise IndexError(f"{self.path}: slice {index} out of range [0, {self.num_slices})")
    return index

  def read_kspace(self, index: int) -> np.ndarray:
    """Slice ``index`` of ``kspace``, ``(H, W)`` complex64 (the file is opened and closed)."""
    index = self._check_index(index)
    with h5py.File(self.path, "r") as f:
      return np.asarray(f["kspace"][index], np.complex64)

  def read_target(self, index: int) -> Optional[np.ndarray]:
    """Slice ``index`` of the target reconstruction, ``(h, w)`` float32, or None."""
    index = self._check_index(index)
    if self.target_key is None:
      return None
    with h5py.File(self.path, "r") as f:
      return np.asarray(f[self.target_key][index], np.float32)

  def __repr__(self) -> str:
    return (f"FastMRIFile({str(self.path)!r}, kspace={self.kspace_shape}, "
            f"recon_size={self.recon_size}, target={self.target_key}, "
            f"own_mask={self.mask is not None})")


def find_fastmri_files(root) -> list:
  """Every ``*.h5`` file in folder ``root`` (not recursive), sorted; or ``[root]`` for a file.

  Each file is checked (``FastMRIFile``), so a bad file fails here with an
  ``InputError`` naming it.
  """
  root = pathlib.Path(root).expanduser()
  if root.is_file():
    paths = [root]
  elif root.is_dir():
    paths = sorted(p for p in root.glob("*.h5") if p.is_file())
    if not paths:
      raise InputError(f"{root}: no fastMRI *.h5 files in this folder")
  else:
    raise InputError(f"{root}: no such file or folder")
  for path in paths:
    FastMRIFile(path)
  return paths


def ismrmrd_header(encoded_size: Sequence[int], recon_size: Sequence[int],
                   fov_mm: Optional[Sequence[float]] = None) -> str:
  """A minimal ISMRMRD XML header with the encoded and reconstruction matrix sizes.

  ``encoded_size = (H, W)`` and ``recon_size = (h, w)`` become ``x`` (rows,
  readout) and ``y`` (columns, phase encode), ``z = 1``; ``fov_mm`` (rows,
  columns) defaults to 1 mm pixels of the reconstruction.
  """
  (ex, ey), (rx, ry) = (tuple(int(s) for s in encoded_size), tuple(int(s) for s in recon_size))
  fx, fy = (float(rx), float(ry)) if fov_mm is None else (float(fov_mm[0]), float(fov_mm[1]))
  # The encoded FOV grows with the matrix (readout oversampling keeps the pixel size).
  efx, efy = fx * ex / rx, fy * ey / ry

  def space(name, x, y, fovx, fovy):
    return (f"<{name}><matrixSize><x>{x}</x><y>{y}</y><z>1</z></matrixSize>"
            f"<fieldOfView_mm><x>{fovx:g}</x><y>{fovy:g}</y><z>1</z></fieldOfView_mm></{name}>")

  return ('<?xml version="1.0" encoding="utf-8"?>\n'
          f'<ismrmrdHeader xmlns="{ISMRMRD_NAMESPACE}"><encoding>'
          + space("encodedSpace", ex, ey, efx, efy) + space("reconSpace", rx, ry, fx, fy)
          + "<trajectory>cartesian</trajectory></encoding></ismrmrdHeader>")


def write_fastmri_file(path, kspace: np.ndarray, target: Optional[np.ndarray] = None, *,
                       recon_key: str = "reconstruction_esc", mask: Optional[np.ndarray] = None,
                       attrs: Optional[Mapping] = None,
                       fov_mm: Optional[Sequence[float]] = None,
                       recon_size: Optional[Sequence[int]] = None) -> pathlib.Path:
  """Writes a fastMRI single-coil file (atomically: a temporary file renamed into place).

  Args:
    path: the ``.h5`` file to write.
    kspace: ``(slices, H, W)`` complex k-space (zero off ``mask`` when given).
    target: ``(slices, h, w)`` magnitudes, or None (like a test-set file).
    recon_key: ``'reconstruction_esc'`` or ``'reconstruction_rss'``.
    mask: ``(W,)`` sampled columns of undersampled k-space, or None.
    attrs: more attributes (e.g. ``acquisition``, ``patient_id``); ``max``
      and ``norm`` are those of ``target`` unless given.
    fov_mm: field of view of the reconstruction, (rows, columns), for the header.
    recon_size: the header's reconstruction size (h, w) when there is no
      ``target`` (a test-set file); default the k-space size.

  Returns:
    ``path``.
  """
  path = pathlib.Path(path)
  kspace = np.asarray(kspace)
  if kspace.ndim != 3 or not np.iscomplexobj(kspace):
    raise ValueError(f"kspace must be complex (slices, H, W), got {kspace.dtype} {kspace.shape}")
  if recon_key not in RECON_KEYS:
    raise ValueError(f"recon_key must be one of {RECON_KEYS}, got {recon_key!r}")
  num_slices, height, width = kspace.shape
  recon_size = tuple(int(s) for s in recon_size) if recon_size else (height, width)
  meta = {"acquisition": "UNKNOWN", "patient_id": path.stem}
  if target is not None:
    target = np.asarray(target, np.float32)
    if target.ndim != 3 or target.shape[0] != num_slices:
      raise ValueError(f"target must be ({num_slices}, h, w), got {target.shape}")
    recon_size = target.shape[1:]
    meta.update(max=float(target.max()), norm=float(np.linalg.norm(target)))
  meta.update(attrs or {})
  if mask is not None:
    mask = np.asarray(mask).reshape(-1)
    if mask.shape != (width,):
      raise ValueError(f"mask must have one entry per k-space column ({width}), got {mask.shape}")
  tmp = path.with_name(path.name + ".tmp")
  try:
    with h5py.File(tmp, "w") as f:
      # One chunk per slice: a lazy read of one slice reads only that slice.
      f.create_dataset("kspace", data=kspace.astype(np.complex64), chunks=(1, height, width))
      if target is not None:
        f.create_dataset(recon_key, data=target, chunks=(1,) + target.shape[1:])
      if mask is not None:
        f.create_dataset("mask", data=mask.astype(bool))
      f.create_dataset("ismrmrd_header", data=ismrmrd_header((height, width), recon_size, fov_mm))
      for key, value in meta.items():
        f.attrs[key] = value
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return path
