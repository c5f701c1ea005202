"""The ablation trains the noise VAE once and shares it between denoisers' b arms.

Also: each variant has its own default workdir, and an arm workdir trained
at other model shapes is refused before anything is written into it.
"""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "experiments"))
import tddl_ablation  # noqa: E402
from ldct_jax.methods import tddl  # noqa: E402


def test_noise_model_fingerprint_ignores_the_denoiser_only():
  gcn = tddl_ablation.arm_config("b_tddl_vae", "gcn", 0, "")
  same = [tddl_ablation.arm_config("b_tddl_vae", name, 0, "") for name in ("gcn_local", "redcnn")]
  # RED-CNN's config also changes data.patch_size, which only the denoiser reads.
  assert same[1].data.patch_size != gcn.data.patch_size
  assert all(tddl.noise_model_fingerprint(c) == tddl.noise_model_fingerprint(gcn) for c in same)
  for change in (lambda c: c.tddl.vae.update(num_steps=7), lambda c: setattr(c, "seed", 3),
                 lambda c: c.data.update(skip_air_fraction=0.5),
                 lambda c: c.tddl.update(noise_fraction=0.25)):
    other = tddl_ablation.arm_config("b_tddl_vae", "gcn", 0, "")
    change(other)
    assert tddl.noise_model_fingerprint(other) != tddl.noise_model_fingerprint(gcn)


def test_finished_noise_model_is_copied_only_to_arms_that_need_the_same_one(tmp_path):
  first, second, other = (str(tmp_path / name) for name in ("gcn_b", "local_b", "gcn_b_seed3"))
  stage = os.path.join(first, "checkpoints", "noise_model")
  os.makedirs(os.path.join(stage, "500"))
  finished = {}
  config = tddl_ablation.arm_config("b_tddl_vae", "gcn", 0, "")
  tddl_ablation.remember_noise_model(config, first, finished)
  assert finished == {}  # not COMPLETED: an interrupted stage is never shared
  with open(os.path.join(stage, "COMPLETED"), "w") as f:
    json.dump({"step": 500}, f)
  tddl_ablation.remember_noise_model(config, first, finished)

  tddl_ablation.share_noise_model(tddl_ablation.arm_config("b_tddl_vae", "gcn_local", 0, ""),
                                  second, finished)
  copied = os.path.join(second, "checkpoints", "noise_model")
  assert sorted(os.listdir(copied)) == ["500", "COMPLETED"]

  reseeded = tddl_ablation.arm_config("b_tddl_vae", "gcn", 0, "")
  reseeded.seed = 3
  tddl_ablation.share_noise_model(reseeded, other, finished)
  assert not os.path.exists(os.path.join(other, "checkpoints"))
  # Arms without a VAE get nothing.
  tddl_ablation.share_noise_model(tddl_ablation.arm_config("c_gaussian", "gcn", 0, ""),
                                  other, finished)
  assert not os.path.exists(os.path.join(other, "checkpoints"))


@pytest.mark.parametrize("arm", ["a_true_pairs", "c_poisson"])
def test_arms_without_a_vae_are_not_remembered(tmp_path, arm):
  stage = tmp_path / "checkpoints" / "noise_model"
  stage.mkdir(parents=True)
  (stage / "COMPLETED").write_text("{}")
  finished = {}
  tddl_ablation.remember_noise_model(tddl_ablation.arm_config(arm, "gcn", 0, ""), str(tmp_path),
                                     finished)
  assert finished == {}


def test_paper_variant_sizes_the_gcn_and_its_control_alike():
  gcn = tddl_ablation.arm_config("a_true_pairs", "gcn", 0, "", variant="paper")
  local = tddl_ablation.arm_config("a_true_pairs", "gcn_local", 0, "", variant="paper")
  assert (gcn.model.features, gcn.model.num_blocks, gcn.model.k, gcn.model.search_window) == \
      (32, 3, 16, 49)
  assert (local.model.name, local.model.features, local.model.num_blocks) == ("gcn_local", 32, 3)
  assert local.data.patch_size == gcn.data.patch_size == 64


def test_each_variant_has_its_own_default_workdir():
  default = tddl_ablation.parse_args([]).workdir
  paper = tddl_ablation.parse_args(["--variant=paper"]).workdir
  assert default == "runs/tddl_ablation" and paper == "runs/tddl_ablation_paper"
  assert tddl_ablation.parse_args(["--variant=paper", "--workdir=/x"]).workdir == "/x"


def test_arm_workdir_of_other_model_shapes_is_refused_before_sharing(tmp_path):
  # The CPU ablation's gcn/b arm, then --variant=paper pointed at the same
  # workdir: the paper-size GCN and VAE must not resume CPU-size checkpoints.
  cpu = tddl_ablation.arm_config("b_tddl_vae", "gcn", 0, "")
  workdir = tmp_path / "gcn_b_tddl_vae"
  workdir.mkdir()
  (workdir / "config.json").write_text(cpu.to_json_best_effort(indent=2, sort_keys=True))
  paper = tddl_ablation.arm_config("b_tddl_vae", "gcn", 0, "", variant="paper")
  source = tmp_path / "finished" / "checkpoints" / "noise_model"
  source.mkdir(parents=True)
  finished = {tddl.noise_model_fingerprint(paper): str(source)}
  with pytest.raises(ValueError, match=r"model\.features") as refused:
    tddl_ablation.prepare_arm(paper, str(workdir), finished)
  assert "tddl.vae.model.features" in str(refused.value)
  assert not (workdir / "checkpoints").exists()  # nothing was shared into it
  # The same variant resumes (more steps change no shape), and gets the VAE.
  cpu.train.num_steps = 5
  tddl_ablation.prepare_arm(cpu, str(workdir), {tddl.noise_model_fingerprint(cpu): str(source)})
  assert (workdir / "checkpoints" / "noise_model").is_dir()
