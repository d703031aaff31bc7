"""The multi-process loader: determinism, rank streams, resume, errors, blosc2 + fork, shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from nnssl.dataloading.augment import AugmentConfig
from nnssl.dataloading.dataset import load_cases
from nnssl.dataloading.loader import Batch, LoaderConfig, PretrainLoader
from nnssl.dataloading.patches import CaseReadError
from nnssl.errors import InvalidInput, NnsslError
from test_dataloading_dataset import build_dataset

PATCH = (16, 16, 16)
# every augmentation on, so determinism covers the random geometry and intensity draws too
BUSY = AugmentConfig(zoom_probability=0.5, rotation_probability=0.5, brightness_probability=0.5,
                     contrast_probability=0.5, gamma_probability=0.5)


def _cases(nnssl_roots, n: int = 4):
    rng = np.random.default_rng(0)
    specs = []
    for i in range(n):
        anon = np.zeros((1, 24, 28, 20), np.uint8)
        anon[:, :8] = 1
        specs.append({"subject": f"sub-{i}", "image": rng.standard_normal((1, 24, 28, 20)).astype(np.float32),
                      "anon": anon if i % 2 == 0 else None})
    return load_cases(build_dataset(nnssl_roots.preprocessed, specs))


def _config(**kwargs) -> LoaderConfig:
    # the CPU path (augmentation in the workers) whatever the machine: auto would pick the device
    # path where CUDA is available (tests/test_dataloading_device_augment.py covers that one)
    base = dict(patch_size=PATCH, batch_size=3, num_workers=0, augment=BUSY, foreground_probability=0.3,
                pin_memory=False, augment_on_device=False)
    base.update(kwargs)
    return LoaderConfig(**base)


def _run(cases, config, **kwargs) -> list[Batch]:
    with PretrainLoader(cases, config, **kwargs) as loader:
        return list(loader)


def _same(a: Batch, b: Batch) -> bool:
    return (a.step == b.step and a.image_ids == b.image_ids and torch.equal(a.data, b.data)
            and torch.equal(a.anonymization_mask, b.anonymization_mask))


def test_same_seed_same_batches_and_workers_do_not_change_the_stream(nnssl_roots):
    cases = _cases(nnssl_roots)
    first = _run(cases, _config(), end_step=6)
    assert [b.step for b in first] == list(range(6))
    assert first[0].data.shape == (3, 1, *PATCH) and first[0].data.dtype == torch.float32
    mask = first[0].anonymization_mask
    assert mask.shape == (3, 1, *PATCH) and mask.dtype == torch.bool
    assert all(_same(a, b) for a, b in zip(first, _run(cases, _config(), end_step=6)))
    forked = _run(cases, _config(num_workers=2), end_step=6)
    assert [b.step for b in forked] == list(range(6))
    assert all(_same(a, b) for a, b in zip(first, forked))
    assert not any(_same(a, b) for a, b in zip(first, _run(cases, _config(seed=1), end_step=6)))
    assert any(b.anonymization_mask.any() for b in first)  # masks travel with the patches


def test_ranks_get_different_streams_that_make_up_the_global_batch(nnssl_roots):
    cases = _cases(nnssl_roots)
    rank0 = _run(cases, _config(), rank=0, world_size=2, end_step=4)
    rank1 = _run(cases, _config(), rank=1, world_size=2, end_step=4)
    assert not any(torch.equal(a.data, b.data) for a, b in zip(rank0, rank1))
    # ...and together they are the global batch a single process with batch 2·3 sees
    single = _run(cases, _config(batch_size=6), end_step=4)
    for a, b, whole in zip(rank0, rank1, single):
        assert torch.equal(torch.cat([a.data, b.data]), whole.data)
        assert a.image_ids + b.image_ids == whole.image_ids


def test_resume_from_a_step_continues_the_exact_stream(nnssl_roots):
    cases = _cases(nnssl_roots)
    full = _run(cases, _config(num_workers=2), end_step=7)
    loader = PretrainLoader(cases, _config(num_workers=2), start_step=0, end_step=7)
    with loader:
        for batch in loader:
            if batch.step == 2:
                break
    assert loader.next_step == 3
    resumed = _run(cases, _config(num_workers=2), start_step=loader.next_step, end_step=7)
    assert [b.step for b in resumed] == [3, 4, 5, 6]
    assert all(_same(a, b) for a, b in zip(full[3:], resumed))
    assert _same(PretrainLoader(cases, _config()).batch_at(5), full[5])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failing_read_raises_with_case_id_path_and_reason(nnssl_roots, workers):
    cases = _cases(nnssl_roots, n=2)
    broken = cases[1]
    broken.image.write_bytes(b"not a blosc2 file" * 64)
    with pytest.raises(CaseReadError) as err:
        _run(cases, _config(num_workers=workers), end_step=50)
    assert isinstance(err.value, NnsslError)
    assert err.value.image_id == broken.image_id and err.value.path == str(broken.image)
    assert broken.image_id in str(err.value) and str(broken.image) in str(err.value)
    assert err.value.reason  # the storage layer's own message, not "worker is no longer alive"


def test_workers_stop_on_close(nnssl_roots):
    cases = _cases(nnssl_roots)
    loader = PretrainLoader(cases, _config(num_workers=2))
    iterator = iter(loader)
    assert next(iterator).step == 0
    workers = list(loader._iterator._workers)
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    loader.close()
    for w in workers:
        w.join(timeout=10)
    assert not any(w.is_alive() for w in workers)


def test_no_deadlock_when_the_parent_used_blosc2_threads(tmp_path):
    # The parent decompresses with 4 blosc2 threads first; forked workers then deadlock on their
    # first read unless blosc2 is switched to 1 thread around the fork.
    script = textwrap.dedent(f"""
        import blosc2, numpy as np
        from pathlib import Path
        from nnssl.dataloading.dataset import CaseRecord
        from nnssl.dataloading.loader import LoaderConfig, PretrainLoader
        from nnssl.preprocessing.storage import open_array, read_region, save_array
        folder = Path({str(tmp_path)!r})
        cases = []
        for i in range(2):
            volume = np.random.default_rng(i).standard_normal((1, 96, 96, 96)).astype(np.float32)
            save_array(folder / f"v{{i}}.b2nd", volume, patch_size=(32, 32, 32))
            cases.append(CaseRecord(f"c__d__s{{i}}__t__v{{i}}", f"c__d__s{{i}}", folder / f"v{{i}}.b2nd"))
        blosc2.set_nthreads(4)
        read_region(open_array(cases[0].image), (slice(None), slice(0, 96), slice(0, 96), slice(0, 96)))
        config = LoaderConfig((32, 32, 32), batch_size=2, num_workers=2, pin_memory=False)
        with PretrainLoader(cases, config, end_step=4) as loader:
            steps = [batch.step for batch in loader]
        print("ok", steps)
    """)
    # own process group, so a deadlock (a regression) is killed together with its workers
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the loader deadlocked after the parent used blosc2 threads")
    assert proc.returncode == 0, err
    assert "ok [0, 1, 2, 3]" in out


def test_configuration_errors_are_reported_together(nnssl_roots):
    with pytest.raises(InvalidInput) as err:
        LoaderConfig(patch_size=(16, 16), batch_size=0, num_workers=-1, foreground_probability=2.0,
                     prefetch=0)
    assert len(err.value.problems) == 5
    with pytest.raises(InvalidInput, match="rank"):
        PretrainLoader(_cases(nnssl_roots, n=1), _config(), rank=2, world_size=2)
    with pytest.raises(InvalidInput, match="no cases"):
        PretrainLoader([], _config())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_batches_are_pinned_on_cuda_machines(nnssl_roots):
    cases = _cases(nnssl_roots)
    batches = _run(cases, _config(num_workers=2, pin_memory=None), end_step=2)
    assert all(b.data.is_pinned() and b.anonymization_mask.is_pinned() for b in batches)
    moved = batches[0].to("cuda")
    assert moved.data.is_cuda and torch.equal(moved.data.cpu(), batches[0].data)
