"""Tests for ldct_jax.data.pipeline: splits, normalisation, patches, slices, sharding."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldct_jax.data import pipeline as pl

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEPTH, SIDE = 8, 48
NORM = pl.Normalization()


def _position_volume(patient_index, depth=DEPTH, side=SIDE):
  """'a' encodes (patient, z, y, x) in its integer HU value, 'b' = 3a + 7.

  Integer HU below 2**23 survive the default normalisation bit-exactly, so a
  patch can be traced back to its exact source location and orientation.
  """
  z, y, x = np.meshgrid(np.arange(depth), np.arange(side), np.arange(side),
                        indexing="ij")
  a = (patient_index * 100_000 + z * 10_000 + y * side + x).astype(np.float32)
  return pl.Volume(f"patient{patient_index}", {"a": a, "b": 3 * a + 7})


@pytest.fixture(scope="module")
def paired_volumes():
  """3 patients x 8 slices x 48^2, integer HU noise; 'ld' = 'nd' + 100 HU."""
  rng = np.random.default_rng(1)
  volumes = []
  for i in range(3):
    nd = np.round(rng.normal(40, 200, (DEPTH, SIDE, SIDE))).astype(np.float32)
    volumes.append(pl.Volume(f"p{i}", {"ld": nd + 100, "nd": nd}))
  return volumes


def _stream(volumes, **overrides):
  settings = dict(keys=("ld", "nd"), patch_size=16, batch_size=4, seed=0,
                  normalization=NORM, num_threads=1, prefetch=2, num_devices=1,
                  process_index=0, process_count=1)
  settings.update(overrides)
  return pl.make_patch_dataset(volumes, **settings)


def _take(stream, n):
  return [next(stream) for _ in range(n)]


def _assert_batches_equal(first, second):
  assert len(first) == len(second)
  for batch_a, batch_b in zip(first, second):
    assert batch_a.keys() == batch_b.keys()
    for key in batch_a:
      np.testing.assert_array_equal(batch_a[key], batch_b[key])


# ---------------------------------------------------------------- splits


def test_split_is_deterministic_disjoint_complete_and_order_independent():
  ids = [f"L{i:03d}" for i in range(20)]
  splits = pl.split_patients(ids, seed=3)
  assert splits == pl.split_patients(list(reversed(ids)), seed=3)
  assert [len(splits[name]) for name in pl.SPLIT_NAMES] == [10, 5, 5]  # DEFAULT_SPLIT_FRACTIONS
  union = splits["train"] + splits["val"] + splits["test"]
  assert sorted(union) == ids  # every patient in exactly one split
  assert splits != pl.split_patients(ids, seed=4)


def test_split_small_cohort_and_counts():
  three = pl.split_patients(["c", "a", "b"], seed=0)
  assert [len(three[name]) for name in pl.SPLIT_NAMES] == [1, 1, 1]
  counts = pl.split_patients([str(i) for i in range(10)], seed=0,
                             counts=(5, 2, 3))
  assert [len(counts[name]) for name in pl.SPLIT_NAMES] == [5, 2, 3]
  with pytest.raises(ValueError, match="summing"):
    pl.split_patients([str(i) for i in range(10)], counts=(5, 2, 2))
  with pytest.raises(ValueError, match="either"):
    pl.split_patients(["a", "b", "c"], (0.5, 0.25, 0.25), counts=(1, 1, 1))
  with pytest.raises(ValueError, match="unique"):
    pl.split_patients(["a", "a", "b"])


def test_split_file_round_trip_and_overlap_rejected(tmp_path):
  splits = pl.split_patients([f"L{i}" for i in range(7)], seed=1)
  path = tmp_path / "split.json"
  pl.save_split_file(path, splits, metadata={"source": "unit test"})
  assert pl.load_split_file(path) == splits
  path.write_text(json.dumps({"train": ["x", "y"], "test": ["y"]}))
  with pytest.raises(ValueError, match="'y'"):
    pl.load_split_file(path)


# ---------------------------------------------------------- normalisation


def test_default_normalization_round_trip_is_exact_for_integer_hu():
  hu = np.arange(-1024, 3072, dtype=np.float32)
  x = NORM.normalize(hu)
  assert x.dtype == np.float32
  assert x[0] == 0.0 and NORM.normalize(np.float32(3072)) == 1.0
  np.testing.assert_array_equal(NORM.denormalize(x), hu)
  # jnp path (also what jitted evaluation code runs) gives the same numbers.
  np.testing.assert_array_equal(np.asarray(NORM.denormalize(jnp.asarray(x))), hu)
  # Integer inputs are promoted to float32, not float64.
  assert NORM.normalize(np.array([0], np.int16)).dtype == np.float32


def test_window_normalization_is_unclipped_and_invertible():
  norm = pl.Normalization.from_config({"kind": "window", "window": "paper"})
  assert norm == pl.Normalization.window(-160, 240)
  np.testing.assert_allclose(norm.normalize(np.array([-160.0, 240.0, 640.0])),
                             [0.0, 1.0, 2.0])
  hu = np.random.default_rng(0).uniform(-1024, 3000, 1000).astype(np.float32)
  np.testing.assert_allclose(norm.denormalize(norm.normalize(hu)), hu,
                             atol=1e-3)
  assert pl.Normalization.from_config(norm.to_config()) == norm
  assert pl.Normalization.from_config(None) == NORM
  with pytest.raises(ValueError, match="unused"):
    pl.Normalization.from_config({"kind": "affine", "sclae": 1000})


# ----------------------------------------------------------------- patches


@pytest.mark.parametrize("slab", [1, 3, 5])
def test_patch_shapes(paired_volumes, slab):
  batch = next(_stream(paired_volumes, slab=slab, batch_size=6))
  expected = (6, 16, 16, 1) if slab == 1 else (6, slab, 16, 16, 1)
  for key in ("ld", "nd"):
    assert batch[key].shape == expected
    assert batch[key].dtype == np.float32


def test_same_location_across_keys(paired_volumes):
  # nd varies pixel to pixel, so a different location or orientation for 'ld'
  # would break the exact difference.
  batch = next(_stream(paired_volumes, slab=3, batch_size=16))
  np.testing.assert_array_equal(batch["ld"] - batch["nd"],
                                np.float32(100 / NORM.scale))


def _dihedral(image):
  """The 8 rotations/flips of the last two axes."""
  for turns in range(4):
    rotated = np.rot90(image, turns, axes=(-2, -1))
    yield rotated
    yield rotated[..., ::-1]


@pytest.mark.parametrize("augment", [True, False])
def test_patches_are_exact_crops_with_one_orientation_for_all_keys(augment):
  volumes = [_position_volume(i) for i in range(3)]
  p, slab = 8, 3
  batch = next(_stream(volumes, keys=("a", "b"), patch_size=p, slab=slab,
                       batch_size=64, augment=augment))
  orientations = set()
  for a_patch, b_patch in zip(NORM.denormalize(batch["a"][..., 0]),
                              NORM.denormalize(batch["b"][..., 0])):
    code = int(a_patch[slab // 2].min())  # top-left pixel of the source crop
    patient, rest = divmod(code, 100_000)
    z, rest = divmod(rest, 10_000)
    y, x = divmod(rest, SIDE)
    source = volumes[patient].arrays["a"]
    neighbours = [abs(z + d) if z + d < DEPTH else 2 * (DEPTH - 1) - (z + d)
                  for d in range(-(slab // 2), slab // 2 + 1)]
    crop = source[neighbours, y:y + p, x:x + p]
    matches = [i for i, view in enumerate(_dihedral(crop))
               if np.array_equal(view, a_patch)]
    assert len(matches) == 1
    b_views = list(_dihedral(3 * crop + 7))
    np.testing.assert_array_equal(b_patch, b_views[matches[0]])
    orientations.add(matches[0])
  if augment:
    # 64 draws from 8 equally likely orientations: nearly all must appear.
    assert len(orientations) >= 6
  else:
    assert orientations == {0}


def _air_volume():
  """64^2 slices of air (-1000 HU) with a 12^2 block of 40 HU in the middle."""
  ct = np.full((DEPTH, 64, 64), -1000.0, np.float32)
  ct[:, 26:38, 26:38] = 40.0
  return pl.Volume("air", {"ld": ct, "nd": ct})


def test_air_patches_are_rejected():
  volumes = [_air_volume()]
  threshold = NORM.normalize(np.float32(-900))

  def air_fractions(stream):
    batch = next(stream)["ld"]
    return np.mean(batch < threshold, axis=(1, 2, 3))

  with_skip = air_fractions(_stream(volumes, batch_size=32,
                                    skip_air_fraction=0.9, max_air_retries=50))
  assert np.all(with_skip <= 0.9)
  without = air_fractions(_stream(volumes, batch_size=32,
                                  skip_air_fraction=None))
  assert np.mean(without > 0.9) > 0.5  # so the check above can fail
  # An all-air volume still yields (bounded retries), it does not hang.
  all_air = pl.Volume("void", {"ld": np.full((2, 16, 16), -1000.0, np.float32),
                               "nd": np.full((2, 16, 16), -1000.0, np.float32)})
  assert next(_stream([all_air], batch_size=2))["ld"].shape == (2, 16, 16, 1)


def test_slices_are_sampled_uniformly_over_volumes():
  # A 2-slice and a 6-slice volume: the second should get ~3/4 of the samples.
  short = _position_volume(0, depth=2, side=16)
  long = _position_volume(1, depth=6, side=16)
  batch = next(_stream([short, long], keys=("a",), patch_size=16,
                       batch_size=400, augment=False))
  patients = NORM.denormalize(batch["a"][:, 0, 0, 0]) // 100_000
  assert abs(np.mean(patients == 1) - 0.75) < 0.07


def test_stream_is_deterministic_for_a_seed_and_independent_of_threads(
    paired_volumes):
  reference = _take(_stream(paired_volumes, seed=5), 3)
  _assert_batches_equal(reference[1:2],
                        [_stream(paired_volumes, seed=5).batch_at(1)])
  _assert_batches_equal(reference, _take(_stream(paired_volumes, seed=5,
                                                 num_threads=2), 3))
  _assert_batches_equal(reference, _take(_stream(paired_volumes, seed=5,
                                                 num_threads=0), 3))
  other = next(_stream(paired_volumes, seed=6))
  assert not np.array_equal(other["ld"], reference[0]["ld"])


def test_resume_from_state_continues_identically(paired_volumes):
  uninterrupted = _stream(paired_volumes, slab=3, num_threads=2)
  _take(uninterrupted, 2)
  saved = json.loads(json.dumps(uninterrupted.get_state()))
  assert saved["batches_consumed"] == 2
  expected = _take(uninterrupted, 3)

  resumed = _stream(paired_volumes, slab=3, num_threads=2)
  next(resumed)  # a started iterator with prefetched batches must also resume
  resumed.set_state(saved)
  _assert_batches_equal(expected, _take(resumed, 3))
  with pytest.raises(ValueError, match="seed"):
    _stream(paired_volumes, slab=3, seed=1).set_state(saved)


def test_hosts_read_disjoint_shares_of_the_global_batch(paired_volumes):
  global_batches = _take(_stream(paired_volumes, batch_size=8), 2)
  host_batches = [_take(_stream(paired_volumes, batch_size=8, num_devices=2,
                                process_index=h, process_count=2), 2)
                  for h in range(2)]
  for step, global_batch in enumerate(global_batches):
    for key in global_batch:
      assert host_batches[0][step][key].shape[0] == 4
      np.testing.assert_array_equal(
          np.concatenate([host_batches[h][step][key] for h in range(2)]),
          global_batch[key])


def test_batch_size_must_divide_over_devices(paired_volumes):
  with pytest.raises(ValueError, match="multiple of the number of devices"):
    _stream(paired_volumes, batch_size=6, num_devices=4)
  with pytest.raises(ValueError, match="processes"):
    _stream(paired_volumes, batch_size=6, num_devices=1, process_count=4)
  with pytest.raises(ValueError, match="odd"):
    _stream(paired_volumes, slab=2)


# ------------------------------------------------------------------ slices


@pytest.mark.parametrize("slab", [1, 3])
def test_iterate_slices_covers_every_slice_once_in_order(slab):
  volume = _position_volume(0)
  seen = []
  for indices, batch in pl.iterate_slices(volume, keys=("a",),
                                          normalization=NORM, slab=slab,
                                          batch_size=3):
    hu = NORM.denormalize(batch["a"][..., 0])
    if slab == 1:
      assert hu.shape == (len(indices), SIDE, SIDE)
      np.testing.assert_array_equal(hu, volume.arrays["a"][indices])
    else:
      assert hu.shape == (len(indices), 3, SIDE, SIDE)
      np.testing.assert_array_equal(hu[:, 1], volume.arrays["a"][indices])
    seen.extend(indices.tolist())
  assert seen == list(range(DEPTH))
  if slab == 3:
    # Reflected neighbours at both ends: slab of slice 7 is (6, 7, 6).
    np.testing.assert_array_equal(hu[-1, 0], volume.arrays["a"][6])
    np.testing.assert_array_equal(hu[-1, 2], volume.arrays["a"][6])


def test_iterate_slices_padding_keeps_real_indices():
  volume = _position_volume(0)
  batches = list(pl.iterate_slices(volume, keys=("a", "b"), normalization=NORM,
                                   batch_size=3, pad_to_batch=True))
  indices, last = batches[-1]
  assert indices.tolist() == [6, 7]
  assert last["a"].shape == (3, SIDE, SIDE, 1)
  np.testing.assert_array_equal(last["b"][2], last["b"][1])


# ---------------------------------------------------------------- sharding


def test_to_global_batch_on_one_device(paired_volumes):
  mesh = pl.make_mesh()
  assert mesh.axis_names == ("data",)
  local = next(_stream(paired_volumes))
  global_batch = pl.to_global_batch(local, mesh)
  for key in local:
    assert isinstance(global_batch[key], jax.Array)
    assert global_batch[key].sharding.spec == jax.sharding.PartitionSpec("data")
    np.testing.assert_array_equal(np.asarray(global_batch[key]), local[key])


_FOUR_DEVICE_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from ldct_jax.data import pipeline as pl
    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    volumes = [pl.Volume(str(i), {"ld": rng.normal(0, 100, (4, 32, 32))})
               for i in range(2)]
    stream = pl.make_patch_dataset(volumes, keys=("ld",), patch_size=16,
                                   slab=3, batch_size=8, seed=0,
                                   normalization=pl.Normalization(),
                                   num_threads=1)
    local = next(stream)
    global_batch = pl.to_global_batch(local, pl.make_mesh())["ld"]
    assert global_batch.shape == (8, 3, 16, 16, 1), global_batch.shape
    shards = sorted(global_batch.addressable_shards,
                    key=lambda s: s.index[0].start)
    assert len({s.device for s in shards}) == 4
    for i, shard in enumerate(shards):
      assert shard.data.shape == (2, 3, 16, 16, 1)
      np.testing.assert_array_equal(np.asarray(shard.data),
                                    local["ld"][2 * i:2 * i + 2])
    np.testing.assert_array_equal(np.asarray(global_batch), local["ld"])
    print("SHARDED_OK")
""")


def test_global_batch_is_sharded_over_four_fake_devices():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=4").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
  result = subprocess.run([sys.executable, "-c", _FOUR_DEVICE_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "SHARDED_OK" in result.stdout


def test_raw_keys_are_cut_and_oriented_like_images_but_not_normalised():
  volumes = [_position_volume(i) for i in range(2)]
  batch = next(_stream(volumes, keys=("a", "b"), raw_keys=("b",), patch_size=8,
                       batch_size=16))
  # b = 3 a + 7 in HU (see _position_volume); raw, so in HU, not model units.
  np.testing.assert_allclose(batch["b"], 3 * NORM.denormalize(batch["a"]) + 7, rtol=1e-5)
  with pytest.raises(ValueError, match="air rejection"):
    _stream(volumes, keys=("b", "a"), raw_keys=("b",), patch_size=8, batch_size=16)
  with pytest.raises(ValueError, match="not among keys"):
    _stream(volumes, keys=("a",), raw_keys=("b",), patch_size=8, batch_size=16)
