"""Fingerprint: header geometry, bounded intensity sampling, failures recorded not fatal."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from nnssl.data.builders import create_dataset
from nnssl.data.phantom_files import write_phantom_collection
from nnssl.data.phantoms import PhantomConfig
from nnssl.planning.fingerprint import FingerprintConfig, extract_fingerprint


def _collection(nnssl_roots, n=8):
    out = nnssl_roots.raw / "Dataset020_Fp" / "bids"
    write_phantom_collection(out, PhantomConfig(num_volumes=n, shape=(24, 24, 24)))
    return create_dataset(out, 20, "Fp")


def test_geometry_and_statistics_per_modality(nnssl_roots):
    _, collection = _collection(nnssl_roots)
    fp = extract_fingerprint(collection, FingerprintConfig(images_per_modality=3, voxels_per_image=500))
    d = fp.to_dict()
    assert d["num_images"] == 8 and d["num_failed"] == 0
    assert set(d["intensity_statistics_per_modality"]) == {"T1w", "ct"}
    ct = d["intensity_statistics_per_modality"]["ct"]
    assert ct["num_images_sampled"] == 3 and ct["num_voxels_sampled"] <= 1500
    assert ct["percentile_00_5"] <= ct["mean"] <= ct["percentile_99_5"]
    first = next(iter(fp.images.values()))
    assert len(first["spacing"]) == 3 and len(first["direction"]) == 9 and all(s > 0 for s in first["spacing"])


def test_bad_files_are_recorded_and_the_rest_goes_on(nnssl_roots, monkeypatch):
    path, collection = _collection(nnssl_roots)
    images = list(collection.iter_images())
    images[0].image_path().write_bytes(b"junk")                                          # corrupt
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5), np.float32)), str(images[1].image_path()))  # 2D
    images[2].entry.image_path = "$NOT_SET_ANYWHERE/x.nii.gz"                           # unset variable
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    fp = extract_fingerprint(collection, FingerprintConfig(num_processes=2))
    reasons = {f["image_id"]: f["reason"] for f in fp.failures}
    assert len(reasons) == 3 and len(fp.images) == 5
    assert "header cannot be read" in reasons[images[0].image_id]
    assert "2D image" in reasons[images[1].image_id]
    assert "NOT_SET_ANYWHERE" in reasons[images[2].image_id]


def test_foreground_sampling_draws_only_nonzero_voxels():
    from nnssl.planning.fingerprint import sample_foreground

    rng = np.random.default_rng(0)
    large = np.zeros((120, 120, 120), np.float32)
    large[:, :, 30:] = rng.normal(100, 5, (120, 120, 90))  # 75% foreground: the fast path
    values = sample_foreground(large, 10_000, rng)
    assert values.size == 10_000 and (values != 0).all() and abs(values.mean() - 100) < 0.5
    sparse = np.zeros((120, 120, 120), np.float32)
    sparse[:3, :3, :3] = 7  # 27 nonzero voxels: falls back to the exact enumeration
    assert np.array_equal(np.sort(sample_foreground(sparse, 10_000, rng)), np.full(27, 7, np.float32))
    small = rng.normal(size=(10, 10, 10)).astype(np.float32)  # fewer voxels than asked: each once
    assert np.array_equal(np.sort(sample_foreground(small, 10_000, rng)), np.sort(small.ravel()))


def test_parallel_fingerprint_equals_the_serial_one(nnssl_roots):
    """Workers finish in any order; the fingerprint (image order, statistics) must not depend on it."""
    _, collection = _collection(nnssl_roots, n=10)
    config = FingerprintConfig(images_per_modality=4, voxels_per_image=300)
    serial = extract_fingerprint(collection, config).to_dict()
    parallel = extract_fingerprint(collection, FingerprintConfig(images_per_modality=4, voxels_per_image=300,
                                                                 num_processes=2)).to_dict()
    assert list(parallel["images"]) == list(serial["images"])
    assert parallel == serial
