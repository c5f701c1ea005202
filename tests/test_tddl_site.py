"""TDDL for a site's own scanner (configs/tddl.py:site): noise from one root, NDCT from another.

A tiny end-to-end run: the noise VAE learns from an LDCT-only tree (whose
full-dose folders hold garbage, so any read of them would fail), the GCN
trains on the built-in NDCT, and the trained run is evaluated on a third,
paired dataset with ``--mode=eval --config.data.root=DIR --config.eval.split=all``.
"""
import shutil

import numpy as np
import pytest

from ldct_jax import run
from ldct_jax.data import builtin, datasets
from ldct_jax.errors import InputError

from test_tddl import tiny_config

OTHER_SCANNER = dict(num_patients=2, num_slices=4, size=64, seed=11)
THIRD_SITE = dict(num_patients=2, num_slices=4, size=64, seed=12)


def _ldct_only_tree(cache, target):
  """A Mayo-layout tree of low-dose series only, from another built-in draw;
  each patient's full_1mm folder holds a file that is not DICOM."""
  source = builtin.ensure_builtin_dataset(builtin.BuiltinSpec(**OTHER_SCANNER), cache,
                                          verbose=False)
  for patient in sorted(p for p in source.iterdir() if p.name.startswith("SIM")):
    shutil.copytree(patient / "quarter_1mm", target / f"SITE{patient.name}" / "quarter_1mm")
    (target / f"SITE{patient.name}" / "full_1mm").mkdir()
    (target / f"SITE{patient.name}" / "full_1mm" / "0001.IMA").write_bytes(b"not DICOM")
  return target


def test_site_run_learns_noise_from_its_own_root_and_evals_on_a_third(
    builtin_cache, tmp_path, monkeypatch):
  noise_root = _ldct_only_tree(builtin_cache, tmp_path / "my_ldct")
  third = builtin.ensure_builtin_dataset(builtin.BuiltinSpec(**THIRD_SITE), builtin_cache,
                                         verbose=False)
  calls = []
  real = datasets.load_unpaired
  monkeypatch.setattr(datasets, "load_unpaired",
                      lambda root, **kw: calls.append((str(root), kw["dose"])) or real(root, **kw))
  config = tiny_config(builtin_cache, "site")
  config.data.noise_root = str(noise_root)
  workdir = str(tmp_path / "site_run")
  report = run.train_and_evaluate(config, workdir)
  assert calls and all(c == (str(noise_root), "low") for c in calls)
  assert np.isfinite(report["mean"]["model"]["psnr/abdomen"])
  # No site pairs: no checkpoint is ranked, eval uses the last one.
  assert report["checkpoint_step"] == config.train.num_steps
  # The site checks the model on a third, paired dataset, from the run's own config.
  again = run.main(None, mode="eval", workdir=workdir,
                   overrides={"data.root": str(third), "eval.split": "all"})
  assert again["split"] == "all" and again["data_root"] == str(third)
  assert again["num_slices"] == THIRD_SITE["num_patients"] * THIRD_SITE["num_slices"]
  assert np.isfinite(again["mean"]["model"]["psnr/abdomen"])


def test_site_variant_needs_a_noise_root(builtin_cache, tmp_path):
  with pytest.raises(InputError, match="noise_root"):
    run.train_and_evaluate(tiny_config(builtin_cache, "site"), str(tmp_path / "no_root"))
