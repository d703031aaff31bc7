"""One convention in every command: `-device`, `-n` (a name), `--shape` order, progress output."""

from __future__ import annotations

import argparse
import importlib
import io
import logging

import pytest
import torch

from nnssl import log
from nnssl.cli.common import device

DEVICE_COMMANDS = ("nnssl.cli.train", "nnssl.cli.evaluate")
SHAPE_COMMANDS = (("nnssl.cli.dataset", "build_phantoms_parser"), ("nnssl.cli.demo", "build_parser"))


def _parser(module: str, builder: str = "build_parser") -> argparse.ArgumentParser:
    return getattr(importlib.import_module(module), builder)()


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


def test_every_device_flag_is_the_one_validated_type():
    for module in DEVICE_COMMANDS:
        assert _option(_parser(module), "-device").type is device, module
    assert device("cpu") == "cpu"
    for wrong in ("gpu", "cuda1", "cuda:", "cuda:x", "CPU", "cuda:0,1"):
        with pytest.raises(argparse.ArgumentTypeError, match="use cuda, cuda:N, cpu or mps"):
            device(wrong)
    if not torch.cuda.is_available():
        for missing in ("cuda", "cuda:1"):
            with pytest.raises(argparse.ArgumentTypeError, match="no CUDA device is visible"):
                device(missing)
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="CUDA device"):
            device(f"cuda:{torch.cuda.device_count()}")


def test_n_is_a_name_and_the_old_count_flag_names_its_replacement(capsys):
    from nnssl.cli import dataset, demo

    assert _option(dataset.build_create_parser(), "-n").dest == "name"
    for main in (dataset.generate_phantoms_main, demo.main):
        with pytest.raises(SystemExit) as exit_:
            main(["-o", "x", "-n", "20"])
        assert exit_.value.code == 2 and "--num_volumes" in capsys.readouterr().err


def test_shape_is_z_y_x_in_every_command():
    for module, builder in SHAPE_COMMANDS:
        action = _option(_parser(module, builder), "--shape")
        assert action.metavar == ("Z", "Y", "X") and action.nargs == 3, module


def test_progress_is_a_bar_on_a_terminal_and_log_lines_elsewhere(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    from tqdm import tqdm

    assert isinstance(log.progress(total=3), tqdm)
    monkeypatch.setattr("sys.stderr", io.StringIO())  # a SLURM log file
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("nnssl")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    monkeypatch.setattr(log, "PROGRESS_LOG_SECONDS", 0.0)
    try:
        bar = log.progress(range(4), desc="integrity check", unit="img")
        assert not isinstance(bar, tqdm) and list(bar) == [0, 1, 2, 3]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert len(lines) == 4 and lines[-1].startswith("integrity check: 4/4 img (100%)")
    assert "\r" not in "".join(lines)


def test_integrity_check_reports_progress(tmp_path, monkeypatch):
    """nnssl_verify_dataset on a large collection says how far it is, in a log file too."""
    from nnssl.data import integrity
    from nnssl.data.collection import Collection

    seen: list[int] = []

    class Recorder:
        def __init__(self, *args, total=None, **kwargs):
            self.total = total

        def update(self, n=1):
            seen.append(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(integrity, "progress", Recorder)
    images = [{"name": f"i{i}.nii.gz", "modality": "T1w", "image_path": str(tmp_path / f"i{i}.nii.gz")}
              for i in range(5)]
    collection = Collection.from_dict({"collection_index": 1, "collection_name": "Dataset001_X", "datasets": {
        "d": {"dataset_index": "d", "subjects": {"sub-1": {"subject_id": "sub-1", "sessions": {
            "ses-1": {"session_id": "ses-1", "images": images}}}}}}})
    for processes in (1, 2):
        seen.clear()
        report = integrity.verify_collection(collection, num_processes=processes)
        assert report.num_checked == 5 and sum(seen) == 5, processes
