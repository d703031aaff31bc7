"""Worker pool and run bookkeeping: bounded jobs in flight, progress, per-stage report."""

from __future__ import annotations

import json
import os
import re

import pytest

from nnssl import workers as pool
from nnssl.data.builders import create_dataset
from nnssl.data.phantom_files import write_phantom_collection
from nnssl.data.phantoms import PhantomConfig
from nnssl.errors import NnsslError
from nnssl.preprocessing.case import STAGES
from nnssl.preprocessing.runner import plan_and_preprocess


def _counting(n: int, pulled: list[int]):
    for i in range(n):
        pulled.append(i)
        yield -i


def test_imap_pulls_jobs_lazily_and_returns_every_result():
    """The parent never holds more than a few jobs per worker, however many cases there are."""
    pulled: list[int] = []
    results = pool.imap(abs, _counting(50, pulled), 2)
    first = next(results)
    assert len(pulled) <= pool.IN_FLIGHT_PER_WORKER * 2
    assert sorted([first, *results]) == list(range(50))
    pulled.clear()
    in_process = pool.imap(abs, _counting(50, pulled), 1)
    assert next(in_process) == 0 and len(pulled) == 1


def test_a_dying_worker_is_an_error_naming_the_jobs_in_flight():
    with pytest.raises(NnsslError, match="worker process died.*case-3"):
        list(pool.imap(os._exit, [3], 2, describe=lambda code: f"case-{code}"))


def test_report_has_stage_seconds_and_memory_and_the_bar_shows_rate_and_eta(nnssl_roots, capsys, monkeypatch):
    monkeypatch.setattr("nnssl.log.progress_bars_enabled", lambda stream=None: True)  # as on a terminal
    bids = nnssl_roots.raw / "Dataset041_Pool" / "bids"
    write_phantom_collection(bids, PhantomConfig(num_volumes=4, shape=(24, 24, 24)))
    create_dataset(bids, 41, "Pool")
    outcome, = plan_and_preprocess(["41"], num_processes=2, num_processes_fingerprint=1)
    assert outcome.ok and outcome.done == 4
    report = json.loads((nnssl_roots.preprocessed / "Dataset041_Pool" / "preprocessing_report__onemmiso.json")
                        .read_text())
    assert set(report["seconds_per_stage"]) == set(STAGES)
    assert all(v >= 0 for v in report["seconds_per_stage"].values()) and report["seconds_per_stage"]["read"] > 0
    assert report["peak_worker_rss_mb"] > 50 and report["peak_parent_rss_mb"] > 50
    bar = capsys.readouterr().err
    assert re.search(r"4/4 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(case/s|s/case)\]", bar), bar[-300:]
