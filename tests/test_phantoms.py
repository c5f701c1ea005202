"""Procedural phantoms: HU per tissue, determinism, z continuity, lesions, scale."""
import functools

import numpy as np
import pytest
from scipy import ndimage

from ldct_jax.data import phantoms

T = phantoms.TISSUE_IDS


@functools.lru_cache(maxsize=None)
def volume(seed, region, size=128, num_slices=8, slice_thickness_mm=1.0, num_lesions=None):
  return phantoms.make_volume(seed, region=region, size=size, num_slices=num_slices,
                              slice_thickness_mm=slice_thickness_mm, num_lesions=num_lesions)


def interior(mask):
  """The mask minus a one-voxel in-plane rim, so partial-volume edges drop out."""
  return ndimage.binary_erosion(mask, structure=np.ones((1, 3, 3), bool))


def median_in(vol, *names):
  mask = interior(np.isin(vol.tissue, [T[n] for n in names]))
  assert mask.sum() > 20, names
  return float(np.median(vol.hu[mask]))


@pytest.mark.parametrize('region', phantoms.REGIONS)
def test_shapes_dtypes_and_air(region):
  vol = volume(0, region, size=64)
  assert vol.hu.shape == vol.labels.shape == vol.tissue.shape == (8, 64, 64)
  assert vol.hu.dtype == np.float32 and vol.labels.dtype == np.int16
  assert vol.region == region
  fov = phantoms.DEFAULT_FOV_MM[region]
  assert vol.pixel_spacing_mm == pytest.approx(fov / 64)
  assert vol.slice_thickness_mm == 1.0
  # Air outside the body is exactly -1000 HU and nothing is below it.
  assert np.all(vol.hu[:, :2, :2] == -1000.0)
  assert vol.hu.min() == -1000.0
  single = phantoms.make_slice(0, region=region, size=64)
  assert single.hu.shape == (1, 64, 64)


def test_same_seed_is_deterministic_and_seeds_differ():
  a, b = (phantoms.make_volume(7, region='abdomen', size=64, num_slices=4) for _ in range(2))
  np.testing.assert_array_equal(a.hu, b.hu)
  np.testing.assert_array_equal(a.labels, b.labels)
  assert a.lesions == b.lesions
  c = phantoms.make_volume(8, region='abdomen', size=64, num_slices=4)
  body = (a.tissue > 0) | (c.tissue > 0)
  assert np.mean(np.abs(a.hu - c.hu)[body]) > 20.0
  # Different patients differ in size, not just in texture.
  assert abs(int((a.tissue > 0).sum()) - int((c.tissue > 0).sum())) > 0.02 * body.sum()


@pytest.mark.parametrize('seed', [0, 1])
def test_body_tissue_hu(seed):
  abdomen = volume(seed, 'abdomen')
  assert -125 < median_in(abdomen, 'fat') < -75
  assert 40 < median_in(abdomen, 'muscle') < 65
  assert 50 < median_in(abdomen, 'liver') < 70
  assert 38 < median_in(abdomen, 'spleen') < 52
  assert 20 < median_in(abdomen, 'kidney_cortex', 'kidney_medulla') < 45
  assert 150 < median_in(abdomen, 'cancellous_bone') < 350
  # The cortex is thin, so compare the densest of its voxels.
  cortex = abdomen.hu[abdomen.tissue == T['cortical_bone']]
  assert np.percentile(cortex, 90) > 700 and cortex.max() > 950
  chest = volume(seed, 'chest')
  assert -900 < median_in(chest, 'lung') < -780
  assert 30 < median_in(chest, 'heart') < 50


@pytest.mark.parametrize('seed', [0, 1])
def test_head_tissue_hu_and_skull_ring(seed):
  head = volume(seed, 'head')
  assert 34 < median_in(head, 'gray_matter') < 46
  assert 20 < median_in(head, 'white_matter') < 30
  assert median_in(head, 'gray_matter') - median_in(head, 'white_matter') > 8
  assert -5 < median_in(head, 'csf') < 15
  # Every ray from the head centre crosses skull brighter than 1000 HU.
  plane = head.hu[head.hu.shape[0] // 2]
  cy, cx = ndimage.center_of_mass(plane > -500)
  radius = np.arange(0, 64)
  for angle in np.linspace(0, 2 * np.pi, 36, endpoint=False):
    ys = np.clip(np.round(cy + radius * np.sin(angle)).astype(int), 0, 127)
    xs = np.clip(np.round(cx + radius * np.cos(angle)).astype(int), 0, 127)
    assert plane[ys, xs].max() > 1000


def test_region_signatures():
  chest, abdomen, head = (volume(0, r) for r in ('chest', 'abdomen', 'head'))
  body = lambda v: v.tissue > 0
  lung_fraction = lambda v: np.mean(v.hu[body(v)] < -700)
  assert lung_fraction(chest) > 0.2
  assert lung_fraction(head) < 0.02
  assert np.mean(head.hu[body(head)] > 1000) > 0.02  # skull
  # Bowel gas: air pockets inside the abdomen in some patient of a few.
  assert any(np.any(volume(s, 'abdomen').tissue == T['gas']) for s in range(4))
  assert np.any(abdomen.tissue == T['liver']) and not np.any(abdomen.tissue == T['lung'])
  assert not np.any(chest.tissue == T['liver']) and not np.any(head.tissue == T['lung'])


@pytest.mark.parametrize('region', phantoms.REGIONS)
def test_adjacent_slices_correlate_and_correlation_decays_with_distance(region):
  vol = volume(3, region, size=128, num_slices=24)
  hu = vol.hu

  def correlation(dz):
    pairs = [(hu[k], hu[k + dz]) for k in range(0, hu.shape[0] - dz)]
    return np.mean([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in pairs])

  def body_correlation(dz):
    values = []
    for k in range(hu.shape[0] - dz):
      body = (vol.tissue[k] > 0) & (vol.tissue[k + dz] > 0)
      values.append(np.corrcoef(hu[k][body], hu[k + dz][body])[0, 1])
    return np.mean(values)

  assert correlation(1) > 0.95
  assert body_correlation(1) > 0.9
  assert body_correlation(1) > body_correlation(4) > body_correlation(16)


@pytest.mark.parametrize('region,seed', [(r, s) for r in phantoms.REGIONS for s in (0, 5)])
def test_lesion_boxes_match_masks_and_lie_in_their_organ(region, seed):
  vol = volume(seed, region, num_lesions=3)
  assert 1 <= len(vol.lesions) <= 3
  assert sorted(np.unique(vol.labels))[1:] == [l.label for l in vol.lesions]
  organs = {'nodule': {'lung'}, 'ground_glass_nodule': {'lung'}, 'high_contrast': None,
            'metastasis': {'liver'}, 'hemorrhage': {'white_matter', 'gray_matter'},
            'hypodense': {'white_matter', 'gray_matter'}}
  for lesion in vol.lesions:
    mask = vol.labels == lesion.label
    idx = np.nonzero(mask)
    box = tuple(int(i.min()) for i in idx) + tuple(int(i.max()) + 1 for i in idx)
    assert box == lesion.box
    allowed = organs[lesion.kind] or {'lung', 'liver', 'spleen'}
    tissues = {phantoms.TISSUES[t] for t in np.unique(vol.tissue[mask])}
    assert tissues <= allowed, (lesion, tissues)
    assert lesion.organ in allowed
    center = np.round(lesion.center_zyx).astype(int)
    assert mask[tuple(np.clip(center, 0, np.array(mask.shape) - 1))]
  for z in range(vol.hu.shape[0]):
    boxes = vol.boxes_2d(z)
    labels = vol.lesion_labels_2d(z)
    assert boxes.shape == (labels.size, 4)
    for label, (y0, x0, y1, x1) in zip(labels, boxes):
      ys, xs = np.nonzero(vol.labels[z] == label)
      assert (y0, x0, y1, x1) == (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)


def test_lesion_contrast_matches_its_nominal_value():
  vol = phantoms.make_volume(2, region='abdomen', size=256, num_slices=16, num_lesions=4)
  checked = 0
  for lesion in vol.lesions:
    if lesion.kind != 'metastasis' or lesion.radius_mm < 4 * vol.pixel_spacing_mm:
      continue
    mask = vol.labels == lesion.label
    core = ndimage.binary_erosion(mask, iterations=2)
    shell = (ndimage.binary_dilation(mask, iterations=5) & ~ndimage.binary_dilation(mask, iterations=2)
             & (vol.tissue == T['liver']))
    measured = vol.hu[core].mean() - np.median(vol.hu[shell])
    assert measured == pytest.approx(lesion.contrast_hu, abs=6.0)
    checked += 1
  assert checked >= 1
  chest = volume(0, 'chest', size=256, num_slices=16, num_lesions=4)
  for lesion in chest.lesions:
    core = ndimage.binary_erosion(chest.labels == lesion.label)
    if core.sum() < 5:
      continue
    value = np.median(chest.hu[core])
    if lesion.kind == 'nodule':
      assert -150 < value < 120
    elif lesion.kind == 'ground_glass_nodule':
      assert -720 < value < -350


def test_texture_is_low_amplitude_and_spatially_correlated():
  vol = volume(1, 'abdomen', size=256, num_slices=4)
  liver = (ndimage.binary_erosion(vol.tissue == T['liver'], np.ones((1, 3, 3), bool), iterations=3)
           & (vol.labels == 0))
  values = vol.hu[liver]
  assert 1.5 < values.std() < 10.0
  # Neighbouring liver pixels share their texture (smooth field, not white noise).
  shifted = np.roll(vol.hu, 1, axis=2)
  both = liver & np.roll(liver, 1, axis=2)
  assert np.corrcoef(vol.hu[both], shifted[both])[0, 1] > 0.5


def test_same_seed_same_anatomy_at_64_and_256():
  coarse = phantoms.make_volume(4, region='chest', size=64, num_slices=4)
  fine = phantoms.make_volume(4, region='chest', size=256, num_slices=4)
  # 4x4 block means of the 256 grid cover exactly the 64 grid's voxels.
  pooled = fine.hu.reshape(4, 64, 4, 64, 4).mean(axis=(2, 4))
  assert np.corrcoef(pooled.ravel(), coarse.hu.ravel())[0, 1] > 0.98
  assert np.median(np.abs(pooled - coarse.hu)) < 10.0
  assert [l.kind for l in fine.lesions] == [l.kind for l in coarse.lesions]
  for a, b in zip(fine.lesions, coarse.lesions):
    assert a.radius_mm == b.radius_mm and a.contrast_hu == b.contrast_hu
    # Voxel centres: i_256 + 0.5 = 4 (i_64 + 0.5) in plane.
    np.testing.assert_allclose(np.array(a.center_zyx[1:]) + 0.5,
                               4 * (np.array(b.center_zyx[1:]) + 0.5), atol=1e-3)


def test_edges_are_antialiased():
  vol = phantoms.make_slice(0, region='abdomen', size=128)
  body = vol.tissue[0] > 0
  edge = body & ~ndimage.binary_erosion(body)
  outside_edge = ndimage.binary_dilation(body) & ~body
  rim = vol.hu[0][edge | outside_edge]
  # A hard (aliased) edge would only hold -1000 and skin values (> 0 HU).
  partial = np.mean((rim > -990) & (rim < -50))
  assert partial > 0.3


@pytest.mark.parametrize('size', [64, 512])
def test_extreme_sizes(size):
  vol = phantoms.make_slice(3, region='chest', size=size)
  assert vol.hu.shape == (1, size, size)
  assert np.isfinite(vol.hu).all()
  assert len(vol.lesions) >= 1


def test_bad_arguments_raise():
  with pytest.raises(ValueError):
    phantoms.make_volume(0, region='knee')
  with pytest.raises(ValueError):
    phantoms.make_volume(0, fov_mm=700.0)
