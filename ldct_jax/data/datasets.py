"""Paired LDCT/NDCT datasets from a config: a real Mayo/TCIA tree or the built-in one.

``load_dataset(config.data)`` finds the patients, reads every low/full-dose
pair through the DICOM reader (validated pairing by slice position), and
splits patients into train/val/test (fixed by the split seed, or a shipped
split file). Both real and built-in data take exactly the same path; the
only difference is where ``root`` comes from.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Dict, List, Optional

import numpy as np

from ldct_jax.data import builtin, dicom
from ldct_jax.data.pipeline import (DEFAULT_SPLIT_FRACTIONS, Volume, load_split_file,
                                   split_patients)


@dataclasses.dataclass
class CTDataset:
  """Scans as in-memory HU volumes, keyed 'ld' (low dose) and 'nd' (normal dose).

  A patient may have several scans (TCIA studies); volumes are keyed by scan
  ('<patient>' or '<patient>_<study>') while splits are by patient, so all
  scans of a patient land in the same split.
  """

  root: pathlib.Path
  layout: str
  volumes: Dict[str, Volume]
  spacing: Dict[str, tuple]               # (slice, row, col) mm per scan
  splits: Dict[str, List[str]]            # split name -> patient ids
  patient_of: Dict[str, str] = dataclasses.field(default_factory=dict)  # scan -> patient
  is_builtin: bool = False

  def split(self, name: str) -> List[Volume]:
    """Volumes of split ``name`` ('train', 'val', 'test' or 'all')."""
    if name == "all":
      return [self.volumes[k] for k in sorted(self.volumes)]
    if name not in self.splits:
      raise ValueError(f"unknown split {name!r}; have {sorted(self.splits)} and 'all'")
    members = set(self.splits[name])
    return [self.volumes[k] for k in sorted(self.volumes)
            if self.patient_of.get(k, k) in members]

  def ground_truth(self, patient_id: str) -> Optional[np.ndarray]:
    return builtin.load_ground_truth(self.root, patient_id) if self.is_builtin else None


def resolve_root(data_cfg) -> tuple:
  """Returns ``(root, is_builtin)``: the configured root, or the built-in dataset."""
  if data_cfg.get("root"):
    root = pathlib.Path(data_cfg.root).expanduser()
    if not root.is_dir():
      raise ValueError(f"data.root {str(root)!r} is not a directory")
    return root, False
  spec = builtin.BuiltinSpec.from_config(data_cfg.get("builtin", {}))
  return builtin.ensure_builtin_dataset(spec, data_cfg.get("cache_dir")), True


def load_dataset(data_cfg) -> CTDataset:
  root, is_builtin = resolve_root(data_cfg)
  pairs = dicom.find_pairs(root, layout=data_cfg.get("layout", "auto"),
                           thickness=data_cfg.get("thickness", "1mm"))
  if not pairs:
    raise ValueError(f"no low/full-dose patient pairs found under {root}")
  wanted = data_cfg.get("patients")
  if wanted:
    pairs = [p for p in pairs if p.patient_id in set(wanted)]
  scans_per_patient = {}
  for pair in pairs:
    scans_per_patient[pair.patient_id] = scans_per_patient.get(pair.patient_id, 0) + 1
  volumes, spacing, patient_of = {}, {}, {}
  for pair in pairs:
    key = pair.patient_id
    if scans_per_patient[pair.patient_id] > 1:
      key = f"{pair.patient_id}_{pair.study}"
    low, full = dicom.load_pair(pair)
    volumes[key] = Volume(key, {"ld": low.hu, "nd": full.hu})
    spacing[key] = tuple(full.spacing)
    patient_of[key] = pair.patient_id
  ids = sorted(set(patient_of.values()))
  split_cfg = data_cfg.get("split", {})
  split_file = split_cfg.get("file", "auto")
  if split_file == "auto":  # a split list shipped with the data, else fractions
    shipped = root / "splits.json"
    split_file = str(shipped) if shipped.exists() and not wanted else ""
  if split_file:
    splits = load_split_file(split_file)
    unknown = sorted(set(sum(splits.values(), [])) - set(ids))
    if unknown:
      raise ValueError(f"split file {split_file} names patients not under {root}: {unknown}")
  else:
    splits = split_patients(ids, tuple(split_cfg.get("fractions", DEFAULT_SPLIT_FRACTIONS)),
                            int(split_cfg.get("seed", 0)))
  return CTDataset(root=root, layout=pairs[0].layout, volumes=volumes, spacing=spacing,
                   splits={k: list(v) for k, v in splits.items()}, patient_of=patient_of,
                   is_builtin=is_builtin)
