"""Synthetic phantoms: determinism, physical geometry, label alignment, class signal, BIDS output."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from nnssl.data.imageio import read_image
from nnssl.data.paired_organs import CONTEXT_LABELS, TWIN_LANDMARK_SIDE, TWIN_OTHER_SIDE
from nnssl.data.phantom_files import write_phantom_collection
from nnssl.data.phantoms import KEY_ORGAN_SHAPES, LABELS, PhantomConfig, landmark_side, make_phantom, volume_assignment
from nnssl.errors import InvalidInput, NnsslError
from nnssl.io_utils import read_json


def _physical_points(phantom, label):
    """World coordinates (mm, ITK x/y/z) of the voxels carrying `label`."""
    index = np.argwhere(phantom.label_map == label)[:, ::-1].astype(float)  # array -> ITK index order
    direction = np.array(phantom.direction).reshape(3, 3)
    return np.array(phantom.origin) + (direction @ (index * np.array(phantom.spacing[::-1])).T).T


def _bbox_fill(mask):
    idx = np.argwhere(mask)
    return mask.sum() / np.prod(idx.max(0) - idx.min(0) + 1)


def test_config_reports_every_bad_value():
    with pytest.raises(InvalidInput) as e:
        PhantomConfig(num_volumes=0, shape=(8, 64, 64), modality="PET", num_classes=9, seed=-1, key_organ_scale=3)
    assert len(e.value.problems) == 6
    text = str(e.value)
    assert "num_volumes" in text and "shape" in text and "PET" in text and "num_classes" in text
    assert "key_organ_scale" in text


def test_config_accepts_list_shape():
    assert PhantomConfig(shape=[32, 40, 48]).shape == (32, 40, 48)


def test_deterministic_in_seed_and_index():
    config = PhantomConfig(num_volumes=6, shape=(24, 24, 24))
    a, b = make_phantom(3, config), make_phantom(3, config)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label_map, b.label_map)
    assert a.spacing == b.spacing and a.direction == b.direction and a.origin == b.origin
    other_index = make_phantom(4, config)
    other_seed = make_phantom(3, PhantomConfig(num_volumes=6, shape=(24, 24, 24), seed=1))
    for other in (other_index, other_seed):
        assert other.image.shape != a.image.shape or not np.array_equal(other.image, a.image)
    with pytest.raises(IndexError):
        make_phantom(6, config)


def test_classes_balanced_and_modalities_mixed():
    config = PhantomConfig(num_volumes=12, num_classes=3, modality="mixed")
    assigned = [volume_assignment(i, config) for i in range(12)]
    for c in range(3):
        kinds = [kind for label, kind in assigned if label == c]
        assert len(kinds) == 4 and kinds.count("MR") == 2 and kinds.count("CT") == 2


def test_shape_and_spacing_follow_the_field_of_view():
    config = PhantomConfig(num_volumes=8, shape=(40, 48, 56))
    fov_xyz = np.array(config.shape[::-1], dtype=float)
    thick_axes = set()
    for i in range(8):
        p = make_phantom(i, config)
        assert p.image.dtype == np.float32 and p.label_map.dtype == np.uint8
        assert p.image.shape == p.label_map.shape == p.anatomy_mask.shape
        direction = np.array(p.direction).reshape(3, 3)
        assert np.allclose(np.abs(direction).sum(0), 1) and np.allclose(np.abs(direction).sum(1), 1)
        spacing = np.array(p.spacing)
        assert sorted(spacing)[1] == pytest.approx(sorted(spacing)[0])  # two equal in-plane spacings
        assert 0.7 <= spacing.min() <= 1.2 and 2.0 <= spacing.max() <= 4.0
        thick_axes.add(int(np.argmax(spacing)))
        for axis in range(3):  # array axis -> ITK axis 2-axis -> physical axis
            physical = int(np.argmax(np.abs(direction[:, 2 - axis])))
            extent = p.image.shape[axis] * spacing[axis]
            assert abs(extent - fov_xyz[physical]) <= spacing[axis] / 2 + 1e-6
        # The field of view is centred on the world origin.
        corner = np.array(p.image.shape[::-1]) - 1
        far = np.array(p.origin) + direction @ (corner * spacing[::-1])
        assert np.allclose((np.array(p.origin) + far) / 2, 0, atol=1e-6)
    assert len(thick_axes) > 1  # the thick axis is not always the same
    iso = make_phantom(0, PhantomConfig(shape=(24, 28, 32), anisotropic=False, random_orientation=False))
    assert iso.image.shape == (24, 28, 32) and iso.spacing == (1.0, 1.0, 1.0)
    assert iso.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def test_same_anatomy_in_world_space_whatever_the_scan():
    """Anisotropic + reoriented and 1 mm isotropic versions of a subject agree in millimetres."""
    scanned = PhantomConfig(num_volumes=4, shape=(48, 48, 48), modality="MR")
    reference = PhantomConfig(num_volumes=4, shape=(48, 48, 48), modality="MR", anisotropic=False,
                              random_orientation=False)
    for i in range(4):
        a, b = make_phantom(i, scanned), make_phantom(i, reference)
        assert a.class_label == b.class_label
        for label in (1, 2, 3):
            pa, pb = _physical_points(a, label), _physical_points(b, label)
            assert np.abs(pa.mean(0) - pb.mean(0)).max() < 2.0  # mm
            volume_a, volume_b = len(pa) * np.prod(a.spacing), len(pb) * np.prod(b.spacing)
            assert abs(volume_a / volume_b - 1) < 0.35


@pytest.mark.parametrize("modality", ["MR", "CT"])
def test_labels_and_mask_align_with_the_image(modality):
    config = PhantomConfig(num_volumes=4, shape=(32, 32, 32), modality=modality)
    for i in range(4):
        p = make_phantom(i, config)
        assert set(np.unique(p.label_map)) <= set(LABELS)
        assert {0, 1, 2}.issubset(set(np.unique(p.label_map)))
        assert np.array_equal(p.anatomy_mask, (p.label_map > 0).astype(np.uint8))
        body, background = p.image[p.label_map > 0], p.image[p.label_map == 0]
        assert 0.15 < body.size / p.image.size < 0.8
        if modality == "MR":
            assert p.modality == "T1w"
            assert np.median(body) > 5 * np.median(background) and body.mean() > 200
        else:
            assert p.modality == "ct"
            assert np.median(body) > -500 and np.median(background) < -900
            assert p.image[p.label_map == 6].mean() > 300  # bone


@pytest.mark.parametrize("modality", ["MR", "CT"])
def test_class_is_in_the_structure_not_the_mean_intensity(modality):
    config = PhantomConfig(num_volumes=20, shape=(48, 48, 48), modality=modality, num_classes=2)
    phantoms = [make_phantom(i, config) for i in range(20)]
    classes = np.array([p.class_label for p in phantoms])
    means = np.array([p.image.mean() for p in phantoms])
    assert sorted(set(classes)) == [0, 1]
    m0, m1 = means[classes == 0], means[classes == 1]
    assert abs(m0.mean() - m1.mean()) < min(m0.std(), m1.std())
    # Key organ: sphere fills ~52% of its bounding box, the cuboid ~90%.
    predicted = np.array([_bbox_fill(p.label_map == 2) > 0.7 for p in phantoms]).astype(int)
    assert np.array_equal(predicted, classes)


def test_four_key_organ_shapes():
    config = PhantomConfig(num_volumes=8, shape=(48, 48, 48), num_classes=4, anisotropic=False, modality="MR")
    for i in range(8):
        p = make_phantom(i, config)
        mask = p.label_map == 2
        idx = np.argwhere(mask)
        extent = idx.max(0) - idx.min(0) + 1
        shape = KEY_ORGAN_SHAPES[p.class_label]
        if shape == "rod":
            assert extent.max() > 2 * extent.min()
        elif shape == "pair":
            from scipy import ndimage

            assert ndimage.label(mask)[1] == 2
        else:
            assert (_bbox_fill(mask) > 0.7) == (shape == "cuboid")


def test_key_organ_scale_grows_only_the_key_organ():
    """The radius factor scales the class-defining organ's volume by its cube and leaves the rest
    of the anatomy (same random stream) where it was."""
    base = PhantomConfig(num_volumes=4, shape=(48, 48, 48), num_classes=4, anisotropic=False, modality="MR")
    large = PhantomConfig(**{**base.to_dict(), "shape": (48, 48, 48), "key_organ_scale": 1.5})
    for i in range(4):
        a, b = make_phantom(i, base), make_phantom(i, large)
        assert a.class_label == b.class_label
        assert (b.label_map == 2).sum() / (a.label_map == 2).sum() == pytest.approx(1.5 ** 3, rel=0.2)
        outside = (a.label_map != 2) & (b.label_map != 2)
        assert (a.label_map[outside] == b.label_map[outside]).all()


def test_write_collection_bids_tree(tmp_path):
    config = PhantomConfig(num_volumes=4, shape=(24, 24, 24), modality="mixed")
    out = tmp_path / "phantoms"
    manifest = write_phantom_collection(out, config)
    assert len(manifest.cases) == 4 and manifest.out_dir == out
    mr = next(c for c in manifest.cases if c.modality == "T1w")
    ct = next(c for c in manifest.cases if c.modality == "ct")
    assert mr.image == out / mr.case_id / "ses-01" / "anat" / f"{mr.case_id}_ses-01_T1w.nii.gz"
    assert ct.image == out / ct.case_id / "ses-01" / "ct" / f"{ct.case_id}_ses-01_ct.nii.gz"
    assert mr.anatomy_mask == mr.image.with_name(f"{mr.case_id}_ses-01_T1w_anatmask.nii.gz")
    assert mr.label_map.is_relative_to(out / "derivatives" / "labels")
    for case in manifest.cases:
        phantom = make_phantom(int(case.case_id[4:]) - 1, config)
        image, header = read_image(case.image)
        assert np.allclose(image, phantom.image, atol=1e-4)
        assert np.allclose(header.spacing, phantom.spacing) and np.allclose(header.direction, phantom.direction)
        labels, _ = read_image(case.label_map, dtype=np.uint8)
        mask, _ = read_image(case.anatomy_mask, dtype=np.uint8)
        assert np.array_equal(labels, phantom.label_map) and np.array_equal(mask, phantom.anatomy_mask)
    cases = read_json(out / "cases.json")["cases"]
    assert [c["case_id"] for c in cases] == ["sub-001", "sub-002", "sub-003", "sub-004"]
    assert cases[0]["image"] == manifest.cases[0].image.relative_to(out).as_posix()
    assert {c["class_label"] for c in cases} == {0, 1}
    assert all((out / c["label_map"]).is_file() and not c["image"].startswith("/") for c in cases)
    with open(out / "participants.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [r["participant_id"] for r in rows] == [c["case_id"] for c in cases]
    assert [int(r["class_label"]) for r in rows] == [c["class_label"] for c in cases]
    assert all(20 <= int(r["age"]) <= 80 and r["sex"] in ("F", "M") for r in rows)
    description = read_json(out / "dataset_description.json")
    assert description["nnssl_phantom_config"]["num_volumes"] == 4 and "BIDSVersion" in description


def test_rewrite_replaces_old_phantoms_and_refuses_foreign_folders(tmp_path):
    out = tmp_path / "phantoms"
    write_phantom_collection(out, PhantomConfig(num_volumes=3, shape=(16, 16, 16), modality="MR"))
    (out / "cases.json").unlink()  # as after a crashed run: stale volumes are still recognised as ours
    (out / "sub-001" / "extra").mkdir()
    manifest = write_phantom_collection(out, PhantomConfig(num_volumes=2, shape=(16, 16, 16), modality="CT",
                                                           anatomy_masks=False), num_processes=2)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz"))
    assert files == sorted([c.image.relative_to(out).as_posix() for c in manifest.cases]
                           + [c.label_map.relative_to(out).as_posix() for c in manifest.cases])
    assert not (out / "sub-003").exists() and all(c.anatomy_mask is None for c in manifest.cases)
    assert (out / "cases.json").is_file()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(NnsslError, match="not empty"):
        write_phantom_collection(foreign, PhantomConfig(num_volumes=1, shape=(16, 16, 16)))
    assert (foreign / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------- paired organs

def _paired(num_volumes=8, shape=(48, 48, 48), modality="MR", **kw):
    return PhantomConfig(num_volumes=num_volumes, shape=shape, modality=modality, anisotropic=False,
                         random_orientation=False, paired_organs=True, **kw)


def test_paired_organs_are_off_by_default_and_validated():
    assert PhantomConfig().paired_organs is False and set(PhantomConfig().labels) == set(LABELS)
    plain = make_phantom(0, PhantomConfig(num_volumes=2, shape=(32, 32, 32)))
    assert not np.isin(plain.label_map, CONTEXT_LABELS).any()
    assert set(_paired().labels) == set(LABELS) | set(CONTEXT_LABELS)
    with pytest.raises(InvalidInput, match="paired_organs"):
        PhantomConfig(paired_organs="yes")


def test_paired_twins_mirror_each_other_and_the_landmark_marks_one_side():
    config = _paired()
    sides = []
    for i in range(config.num_volumes):
        p = make_phantom(i, config)
        near, far = _physical_points(p, TWIN_LANDMARK_SIDE), _physical_points(p, TWIN_OTHER_SIDE)
        # mirror images, up to what the body's uneven boundary or the key organ cuts off
        assert abs(len(near) - len(far)) <= 0.1 * len(near)
        assert np.allclose(near.mean(0) * [-1, 1, 1], far.mean(0), atol=0.6)
        landmark, second = _physical_points(p, 3), _physical_points(p, 5)
        side = np.sign(near.mean(0)[0])
        assert np.sign(landmark.mean(0)[0]) == side and np.sign(second.mean(0)[0]) == -side
        assert landmark.mean(0)[1] < near.mean(0)[1] - 8  # anterior to the twin (+y is posterior)
        sides.append(side)
        assert landmark_side(i, config) == side
    assert sides.count(1.0) == sides.count(-1.0)  # balanced: a twin's position says nothing


@pytest.mark.parametrize("modality", ["MR", "CT"])
def test_twins_have_one_intensity_distribution(modality):
    """Across a collection the two twin labels' intensities are indistinguishable (two-sample KS
    distance), while the twins clearly differ from the landmark organ."""
    from scipy.stats import ks_2samp

    config = _paired(num_volumes=16, shape=(32, 32, 32), modality=modality)
    values: dict[int, list[np.ndarray]] = {TWIN_LANDMARK_SIDE: [], TWIN_OTHER_SIDE: [], 3: []}
    for i in range(config.num_volumes):
        p = make_phantom(i, config)
        body = p.image[p.label_map == 1]
        z = (p.image - np.median(body)) / body.std()
        for label in values:
            values[label].append(z[p.label_map == label])
    near, far, landmark = (np.concatenate(values[k]) for k in (TWIN_LANDMARK_SIDE, TWIN_OTHER_SIDE, 3))
    assert ks_2samp(near, far).statistic < 0.05
    assert ks_2samp(near, landmark).statistic > 0.5


def test_twin_tokens_never_see_the_side_cues():
    """In the centre 32³ crop of a 48³ phantom (the demo's encoder input), the 8³ cell of a twin
    token holds no voxel of the landmark or the second organ: its own voxels cannot tell."""
    from nnssl.evaluation.labeled import centre_crop_or_pad, token_labels

    config = _paired(num_volumes=12)
    twin_tokens = 0
    for i in range(config.num_volumes):
        label = centre_crop_or_pad(make_phantom(i, config).label_map[None], (32, 32, 32))[0]
        tokens = token_labels(label, (4, 4, 4))
        cells = label.reshape(4, 8, 4, 8, 4, 8).transpose(0, 2, 4, 1, 3, 5).reshape(64, -1)
        twins = np.isin(tokens, CONTEXT_LABELS)
        twin_tokens += twins.sum()
        assert not np.isin(cells[twins], (3, 4, 5)).any()
        assert {TWIN_LANDMARK_SIDE, TWIN_OTHER_SIDE} <= set(tokens.tolist())
    assert twin_tokens >= 4 * config.num_volumes


def test_paired_phantoms_are_deterministic_and_keep_the_subjects_body():
    config = _paired(num_volumes=3, shape=(32, 32, 32))
    a, b = make_phantom(1, config), make_phantom(1, config)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label_map, b.label_map)
    other = make_phantom(1, _paired(num_volumes=3, shape=(32, 32, 32), seed=1))
    assert not np.array_equal(other.label_map, a.label_map)
    plain = make_phantom(1, PhantomConfig(**{**config.to_dict(), "shape": (32, 32, 32), "paired_organs": False}))
    assert np.array_equal(plain.label_map == 0, a.label_map == 0) and np.array_equal(plain.label_map == 6,
                                                                                       a.label_map == 6)
    assert plain.class_label == a.class_label


def test_paired_collection_lists_its_context_labels(tmp_path):
    manifest = write_phantom_collection(tmp_path / "paired", _paired(num_volumes=2, shape=(24, 24, 24)))
    cases = read_json(manifest.cases_json)
    assert cases["context_labels"] == list(CONTEXT_LABELS)
    assert cases["labels"][str(TWIN_LANDMARK_SIDE)] == "twin_landmark_side"
    assert "twin_other_side" in (tmp_path / "paired" / "derivatives" / "labels" / "dseg.tsv").read_text()
    plain = write_phantom_collection(tmp_path / "plain", PhantomConfig(num_volumes=2, shape=(24, 24, 24)))
    assert "context_labels" not in read_json(plain.cases_json)
