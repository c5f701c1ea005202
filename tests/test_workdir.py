"""The workdir's saved config: round trip, resume refusal, eval overrides."""
import glob
import importlib
import json
import os

import pytest

from configs import redcnn as redcnn_config
from ldct_jax import workdir as workdir_lib
from ldct_jax.errors import InputError


@pytest.mark.parametrize("name", ["redcnn", "dncnn", "unet", "tddl"])
def test_saved_config_reads_back_unchanged(tmp_path, name):
  config = importlib.import_module(f"configs.{name}").get_config()
  (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2))
  saved = workdir_lib.load_saved_config(str(tmp_path))
  assert workdir_lib.changed_fields(config, saved) == []
  assert isinstance(saved.eval.windows, tuple)  # tuples stay tuples (config_flags needs them)


def test_resume_allows_new_steps_but_refuses_new_shapes(tmp_path):
  workdir = str(tmp_path / "run")
  config = redcnn_config.get_config()
  config.model.update(dict(features=4, num_layers=2))
  workdir_lib.prepare_workdir(config, workdir)
  more = redcnn_config.get_config()
  more.model.update(dict(features=4, num_layers=2))
  more.train.num_steps = 5000
  more.optim.lr = 3e-4
  workdir_lib.prepare_workdir(more, workdir)  # allowed: logged and stored beside
  (extra,) = glob.glob(os.path.join(workdir, "config.*.json"))
  assert json.load(open(extra))["train"]["num_steps"] == 5000
  assert json.load(open(os.path.join(workdir, "config.json")))["train"]["num_steps"] == 2000
  wider = redcnn_config.get_config()
  wider.model.update(dict(features=8, num_layers=2))
  wider.train.num_steps = 5000
  with pytest.raises(InputError, match=r"model\.features \(4 -> 8\)") as error:
    workdir_lib.prepare_workdir(wider, workdir)
  assert "num_steps" not in str(error.value)  # only the field that matters is blamed
  other_optimiser = redcnn_config.get_config()
  other_optimiser.model.update(dict(features=4, num_layers=2))
  other_optimiser.optim.name = "sgd"
  with pytest.raises(InputError, match=r"optim\.name"):
    workdir_lib.prepare_workdir(other_optimiser, workdir)


def test_run_config_applies_only_the_given_overrides(tmp_path):
  config = redcnn_config.get_config()
  config.model.features = 4
  config.train.num_steps = 7
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  got = workdir_lib.run_config(str(tmp_path), {"data.root": "/elsewhere", "eval.split": "all"})
  assert got.model.features == 4 and got.train.num_steps == 7
  assert got.data.root == "/elsewhere" and got.eval.split == "all"
  with pytest.raises(InputError, match=r"data\.normalization\.scale"):
    workdir_lib.run_config(str(tmp_path), {"data.normalization.scale": 2000.0})
  with pytest.raises(InputError, match=r"model\.num_layers"):
    workdir_lib.run_config(str(tmp_path), {"model.num_layers": 3})
  with pytest.raises(InputError, match="no field 'nonsense'"):
    workdir_lib.run_config(str(tmp_path), {"nonsense.x": 1})
