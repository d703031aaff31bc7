"""Augmentation on the training device (`augment_on_device`): workers send raw regions and drawn
parameters, `RawBatch.to(device)` augments. Run on the CPU device here: the same draws must give
the CPU path's patches within float tolerance, and the stream must stay a pure function of
(seed, rank, step) — workers, resume and ranks change nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnssl.dataloading.augment import AugmentConfig, IntensityParams, apply_intensity
from nnssl.dataloading.device_augment import RawBatch, apply_intensity_batch
from nnssl.dataloading.loader import PretrainLoader, resolve_augment_on_device
from nnssl.dataloading.patches import CaseReadError
from test_dataloading_loader import BUSY, _cases, _config, _run

# The equivalence tolerance: both paths run the same torch resampling on the CPU; they differ
# only in the order of the float64 sums behind mean / std and in NumPy's vs torch's float32 pow.
# Measured: at most 7e-7 on values of magnitude ~3.
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def _device_config(**kwargs):
    return _config(augment_on_device=True, **kwargs)


def test_same_draws_give_the_cpu_paths_patches(nnssl_roots):
    cases = _cases(nnssl_roots)  # every other case has a defaced slab
    cpu_loader = PretrainLoader(cases, _config(augment_on_device=False))
    device_loader = PretrainLoader(cases, _device_config())
    drawn = {"zoom": 0, "rotation": 0, "crop": 0, "contrast": 0, "gamma": 0, "mask_sent": 0, "mask_skipped": 0}
    for step in range(8):
        expected, raw = cpu_loader.batch_at(step), device_loader.batch_at(step)
        assert isinstance(raw, RawBatch) and raw.step == step and raw.image_ids == expected.image_ids
        got = raw.to("cpu")
        torch.testing.assert_close(got.data, expected.data, **TOLERANCE)
        assert torch.equal(got.anonymization_mask, expected.anonymization_mask)
        for s in raw.samples:
            drawn["rotation"] += s.spatial.rotation is not None
            drawn["zoom"] += s.spatial.rotation is None and s.spatial.zoom != 1.0
            drawn["crop"] += s.spatial.is_crop
            drawn["contrast"] += s.intensity.contrast is not None
            drawn["gamma"] += s.intensity.gamma is not None
            drawn["mask_sent" if s.mask_offset is not None else "mask_skipped"] += 1
    assert min(drawn.values()) > 0, drawn  # every path was compared, not just plain crops


def test_intensity_batch_matches_the_numpy_changes_sample_by_sample():
    rng = np.random.default_rng(1)
    patches = rng.standard_normal((4, 2, 6, 7, 5)).astype(np.float32) * 3
    patches[3] = 0.5  # constant: gamma must leave it alone on both paths
    params = [IntensityParams(brightness=1.1, contrast=0.9, gamma=1.2), IntensityParams(contrast=1.15),
              IntensityParams(), IntensityParams(brightness=0.9, gamma=0.8)]
    expected = patches.copy()
    for patch, p in zip(expected, params):
        apply_intensity(patch, p)
    got = torch.from_numpy(patches.copy())
    apply_intensity_batch(got, params)
    torch.testing.assert_close(got, torch.from_numpy(expected), **TOLERANCE)
    assert torch.equal(got[2], torch.from_numpy(patches[2]))  # nothing drawn: untouched, bit for bit
    assert torch.equal(got[3], torch.full_like(got[3], 0.5 * np.float32(0.9)))


def test_device_stream_is_a_pure_function_of_seed_rank_and_step(nnssl_roots):
    cases = _cases(nnssl_roots)

    def augmented(config, **kwargs):
        return [b.to("cpu") for b in _run(cases, config, **kwargs)]

    in_process = augmented(_device_config(), end_step=5)
    forked = augmented(_device_config(num_workers=2), end_step=5)
    resumed = augmented(_device_config(num_workers=2), start_step=3, end_step=5)
    for a, b in zip(in_process, forked):
        assert a.step == b.step and torch.equal(a.data, b.data)
        assert torch.equal(a.anonymization_mask, b.anonymization_mask)
    assert [b.step for b in resumed] == [3, 4]
    assert all(torch.equal(a.data, b.data) for a, b in zip(in_process[3:], resumed))
    # two ranks of batch 3 make up the global batch of one process with batch 6 (DDP equivalence)
    rank0 = augmented(_device_config(), rank=0, world_size=2, end_step=2)
    rank1 = augmented(_device_config(), rank=1, world_size=2, end_step=2)
    single = augmented(_device_config(batch_size=6), end_step=2)
    for a, b, whole in zip(rank0, rank1, single):
        torch.testing.assert_close(torch.cat([a.data, b.data]), whole.data, rtol=0, atol=0)
        assert a.image_ids + b.image_ids == whole.image_ids
    other_seed = augmented(_device_config(seed=1), end_step=1)
    assert not torch.equal(other_seed[0].data, in_process[0].data)


def test_workers_send_only_the_regions_and_a_raw_batch_says_how_to_use_it(nnssl_roots):
    cases = _cases(nnssl_roots)
    plain = AugmentConfig(zoom_probability=0.0, rotation_probability=0.0)
    raw = PretrainLoader(cases, _device_config(augment=plain)).batch_at(0)
    assert raw.images.numel() == 3 * 16 ** 3  # crops: exactly the patch voxels, nothing else
    with pytest.raises(AttributeError, match=r"batch.to\(device\)"):
        _ = raw.data
    assert not PretrainLoader(cases, _config(augment=BUSY)).augment_on_device  # the fixture sets it off
    assert PretrainLoader(cases, _config(augment_on_device=None)).augment_on_device == torch.cuda.is_available()
    assert resolve_augment_on_device(None, "cuda:1") and not resolve_augment_on_device(None, "cpu")
    assert not resolve_augment_on_device(False, "cuda") and resolve_augment_on_device(True, "cpu")


def test_a_failing_read_still_names_the_case(nnssl_roots):
    cases = _cases(nnssl_roots, n=2)
    cases[1].image.write_bytes(b"not a blosc2 file" * 64)
    with pytest.raises(CaseReadError) as err:
        _run(cases, _device_config(num_workers=0), end_step=50)
    assert err.value.image_id == cases[1].image_id and str(cases[1].image) in str(err.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_same_draws_give_the_cpu_paths_patches(nnssl_roots):
    """The path a CUDA run takes by default. CUDA's interpolation kernels round differently from
    the CPU's, so a looser tolerance; the nearest-neighbour masks may differ where a sampling
    point falls half-way between voxels. Written without a GPU to run it on: check the bounds
    the first time a GPU runs the suite."""
    cases = _cases(nnssl_roots)
    cpu_loader = PretrainLoader(cases, _config(augment_on_device=False, num_workers=2, pin_memory=True))
    device_loader = PretrainLoader(cases, _device_config(num_workers=2, pin_memory=True))
    with cpu_loader, device_loader:
        for expected, raw in zip(cpu_loader, device_loader):
            assert isinstance(raw, RawBatch) and raw.images.is_pinned()
            got = raw.to("cuda")
            assert got.data.is_cuda and got.anonymization_mask.is_cuda
            torch.testing.assert_close(got.data.cpu(), expected.data, rtol=1e-4, atol=1e-4)
            assert (got.anonymization_mask.cpu() != expected.anonymization_mask).float().mean() < 1e-3
            if raw.step == 5:
                break
