"""Blind training across doses (``data.blind_doses``, issue #12) on tiny built-in data.

The dose series come from ``builtin.load_extra_doses`` (an independent reader
of the same DICOM folders); the per-patch choice is checked sample by sample
against the batch it was drawn from.
"""
import json
import os

import jax
import numpy as np
import pytest

from configs import redcnn as redcnn_config
from ldct_jax import models, run
from ldct_jax.data import builtin, datasets
from ldct_jax.data.pipeline import Normalization, make_patch_dataset
from ldct_jax.errors import InputError
from ldct_jax.methods import supervised

from conftest import TINY_BUILTIN

EXTRA = (0.1, 0.5)
DOSES = (0.1, 0.25, 0.5)  # 0.25: the built-in dose_fraction, the 'ld' array
KEYS = ("ld@0.100", "ld@0.250", "ld@0.500")


def tiny_config(cache_dir, blind_doses=DOSES, steps=2):
  config = redcnn_config.get_config("blind")
  config.data.cache_dir = str(cache_dir)
  config.data.builtin.update(dict(TINY_BUILTIN, extra_doses=EXTRA))
  config.data.blind_doses = tuple(blind_doses)
  config.data.update(dict(patch_size=32, batch_size=4))
  config.model.update(dict(features=4, kernel_size=3, num_layers=2))
  config.train.update(dict(num_steps=steps, log_every=1, eval_every=steps,
                           checkpoint_every=steps, tensorboard=False))
  config.eval.update(dict(val_max_slices=1, max_slices=1, classical="none"))
  return config


@pytest.fixture(scope="module")
def dataset(builtin_cache):
  return datasets.load_dataset(tiny_config(builtin_cache).data)


def test_dose_series_are_the_built_in_extra_doses(dataset):
  # load_dataset itself reads no extra dose: eval/denoise never pay for them.
  assert all(set(v.arrays) == {"ld", "nd"} for v in dataset.volumes.values())
  volumes = datasets.with_dose_series(dataset, DOSES)
  assert [v.patient_id for v in volumes] == sorted(dataset.splits["train"])
  for volume in volumes:
    extra = builtin.load_extra_doses(dataset.root, volume.patient_id)
    assert set(extra) == set(EXTRA)
    assert set(volume.arrays) == {"ld", "nd", *KEYS}
    np.testing.assert_array_equal(volume.arrays["ld@0.100"], extra[0.1])
    np.testing.assert_array_equal(volume.arrays["ld@0.500"], extra[0.5])
    # The dataset's own dose is its 'ld' array, not a second copy.
    assert np.shares_memory(volume.arrays["ld@0.250"], dataset.volumes[volume.patient_id].arrays["ld"])
    np.testing.assert_array_equal(volume.arrays["nd"], dataset.volumes[volume.patient_id].arrays["nd"])
  # Lower dose, more noise: LD is thinned from ND's photons, so var(LD - ND)
  # grows like 1/f - 1 (9 : 3 : 1 at 0.1 : 0.25 : 0.5); std ratios sqrt(3)
  # each, within 10% (measured 1.73, 1.74).
  diff_std = {f: np.std(np.concatenate([(v.arrays[k] - v.arrays["nd"]).ravel() for v in volumes]))
              for f, k in zip(DOSES, KEYS)}
  for low, high in ((0.1, 0.25), (0.25, 0.5)):
    expected = np.sqrt((1 / low - 1) / (1 / high - 1))
    assert diff_std[low] / diff_std[high] == pytest.approx(expected, rel=0.1)


def test_missing_dose_names_the_extra_doses_to_add(dataset):
  with pytest.raises(InputError, match=r"no dose 0\.2 .*extra_doses='\(0\.1,0\.2,0\.5\)'"):
    datasets.with_dose_series(dataset, (0.1, 0.2, 0.25))


def test_blind_training_needs_the_built_in_data(builtin_cache, dataset):
  config = tiny_config(builtin_cache)
  config.data.root = str(dataset.root)  # the same files, read as a user's tree
  other = datasets.load_dataset(config.data)
  assert not other.is_builtin
  with pytest.raises(InputError, match="only the built-in data provides them"):
    datasets.with_dose_series(other, DOSES)


@pytest.mark.parametrize("doses", [(0.1, 0.1001), (0.0, 0.5), (0.5, 1.0)])
def test_bad_blind_doses_are_refused(doses):
  with pytest.raises(InputError, match="data.blind_doses"):
    datasets.blind_dose_keys(doses)


def _blind_batch(dataset, batch_size=16):
  volumes = datasets.with_dose_series(dataset, DOSES)
  stream = make_patch_dataset(volumes, keys=("nd",) + KEYS, patch_size=32, batch_size=batch_size,
                              seed=3, normalization=Normalization(), num_devices=1,
                              process_index=0, process_count=1)
  batch = stream.batch_at(0)
  stream.close()
  return batch


def test_each_patch_gets_one_dose_drawn_per_sample(dataset):
  batch = _blind_batch(dataset)
  size = batch["nd"].shape[0]
  # The variants are co-located crops (each is closer to its own NDCT patch
  # than to the next sample's) and differ from each other.
  for key in KEYS:
    own = np.sqrt(np.mean((batch[key] - batch["nd"]) ** 2, axis=(1, 2, 3)))
    other = np.sqrt(np.mean((batch[key] - np.roll(batch["nd"], 1, axis=0)) ** 2, axis=(1, 2, 3)))
    assert np.all(own < other)
  assert all(not np.array_equal(batch[a][i], batch[b][i])
             for i in range(size) for a in KEYS for b in KEYS if a < b)

  draws = []
  for seed in (0, 1):
    selected, chosen = jax.jit(supervised.select_dose, static_argnums=(1, 2))(
        batch, KEYS, DOSES, jax.random.PRNGKey(seed))
    selected, chosen = jax.tree.map(np.asarray, (selected, chosen))
    assert selected["ld"].shape == batch["nd"].shape
    np.testing.assert_array_equal(selected["nd"], batch["nd"])
    for i in range(size):
      assert chosen[i] in DOSES
      np.testing.assert_array_equal(selected["ld"][i], batch[KEYS[DOSES.index(chosen[i])]][i])
    assert len(set(chosen.tolist())) > 1  # per patch, not per batch
    draws.append(chosen)
  assert not np.array_equal(draws[0], draws[1])  # the draw follows the rng


def test_train_step_logs_the_mean_drawn_dose(builtin_cache, dataset):
  config = tiny_config(builtin_cache)
  batch = _blind_batch(dataset, batch_size=4)
  model = models.get_model(config.model)
  state = supervised.create_train_state(
      model, supervised.make_optimizer(config.optim, 2), jax.random.PRNGKey(0), (1, 32, 32, 1))
  step = jax.jit(supervised.make_train_step(model, supervised.make_loss_fn(config.loss),
                                            dose_keys=KEYS, doses=DOSES))
  rng = jax.random.PRNGKey(5)
  _, metrics = step(state, batch, rng)
  _, dose_rng = jax.random.split(rng)
  _, chosen = supervised.select_dose(batch, KEYS, DOSES, dose_rng)
  assert float(metrics["dose_mean"]) == pytest.approx(float(np.mean(chosen)))
  assert np.isfinite(float(metrics["loss"]))


def test_blind_run_trains_and_evaluates_on_another_root(builtin_cache, tmp_path):
  config = tiny_config(builtin_cache)
  workdir = str(tmp_path / "blind")
  report = run.train_and_evaluate(config, workdir)
  assert np.isfinite(report["mean"]["model"]["psnr/abdomen"])
  lines = [json.loads(l) for l in open(os.path.join(workdir, "logs", "metrics.jsonl"))]
  drawn = [l["dose_mean"] for l in lines if "dose_mean" in l]
  assert len(drawn) == 2 and all(min(DOSES) <= d <= max(DOSES) for d in drawn)
  # A site's paired scans (no extra doses there) evaluate the blind run.
  plain = builtin.ensure_builtin_dataset(builtin.BuiltinSpec(**TINY_BUILTIN), builtin_cache,
                                         verbose=False)
  again = run.main(None, mode="eval", workdir=workdir,
                   overrides={"data.root": str(plain), "eval.split": "all"})
  assert again["data_root"] == str(plain) and np.isfinite(again["mean"]["model"]["psnr/abdomen"])



@pytest.mark.parametrize("path,variant", [("gcn", ""), ("gcn", "local"), ("gcn", "blind"),
                                          ("gcn", "local_blind"), ("redcnn", "blind")])
def test_config_variants_build(path, variant):
  import importlib
  from ldct_jax.methods import build_method
  config = importlib.import_module(f"configs.{path}").get_config(variant)
  if path == "gcn":
    assert config.model.name == ("gcn_local" if "local" in variant else "gcn")
  if "blind" in variant:
    # Every blind dose is the built-in dose_fraction or one of its extra doses.
    assert config.data.blind_doses == (0.05, 0.1, 0.25, 0.5)
    assert (set(config.data.blind_doses) - {config.data.builtin.dose_fraction}
            == set(config.data.builtin.extra_doses))
  else:
    assert config.data.blind_doses == ()
  stage = build_method(config, None).denoiser_stage
  assert jax.tree.leaves(jax.eval_shape(stage.init_state, jax.random.PRNGKey(0), {}).params)


def test_gcn_config_refuses_unknown_variants():
  from configs import gcn as gcn_config
  for variant in ("blind_blind", "paper"):
    with pytest.raises(ValueError, match="unknown variant"):
      gcn_config.get_config(variant)
