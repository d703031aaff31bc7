"""The one logging path: the `logging` module, configured by entry points only.

Library modules call `get_logger(__name__)`; they never print. Command-line entry points
call `setup_logging(verbose)` once. Training adds its log file through `add_log_file`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

_ROOT = "nnssl"
_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def get_logger(name: str = _ROOT) -> logging.Logger:
    if not name.startswith(_ROOT):
        name = f"{_ROOT}.{name}"
    return logging.getLogger(name)


def setup_logging(verbose: bool = False) -> logging.Logger:
    """Send nnssl's messages to stderr (INFO, or DEBUG with `verbose`). Idempotent."""
    logger = logging.getLogger(_ROOT)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(getattr(h, "_nnssl_console", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._nnssl_console = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False
    return logger


def add_log_file(path: Path) -> logging.Handler:
    """Also write every nnssl message (with timestamps) to `path`; returns the handler."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger(_ROOT)
    if logger.getEffectiveLevel() > logging.INFO:  # library use without setup_logging: the file still gets INFO
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler


# ------------------------------------------------------------------------------- progress
PROGRESS_LOG_SECONDS = 60.0  # without a terminal: one progress line per minute at most


def progress_bars_enabled(stream=None) -> bool:  # type: ignore[no-untyped-def]
    """Bars only on a terminal: redrawn bars in a SLURM log file are thousands of carriage
    returns that bury the messages around them."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class _LoggedProgress:
    """What a progress bar becomes without a terminal: nothing for short loops, and for long
    ones a log line (count, share, rate, time left) at most every `PROGRESS_LOG_SECONDS`, so a
    log file still says how far a day-long run has come."""

    def __init__(self, iterable=None, total: int | None = None, desc: str | None = None,  # type: ignore[no-untyped-def]
                 unit: str = "it", interval: float | None = None) -> None:
        import time

        self.iterable, self.desc, self.unit = iterable, desc or "progress", unit
        self.interval = PROGRESS_LOG_SECONDS if interval is None else interval
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n = total, 0
        self._clock = time.monotonic
        self._start = self._last = self._clock()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self._clock()
        if now - self._last >= self.interval:
            self._last = now
            get_logger().info("%s", self.describe(now))

    def describe(self, now: float | None = None) -> str:
        elapsed = max((now if now is not None else self._clock()) - self._start, 1e-9)
        rate = self.n / elapsed
        text = f"{self.desc}: {self.n}"
        if self.total:
            text += f"/{self.total} {self.unit} ({100.0 * self.n / self.total:.0f}%)"
            if rate > 0:
                text += f", {rate:.1f} {self.unit}/s, about {(self.total - self.n) / rate / 60:.0f} min left"
        else:
            text += f" {self.unit}, {rate:.1f} {self.unit}/s"
        return text

    def __iter__(self):  # type: ignore[no-untyped-def]
        for item in self.iterable:
            yield item
            self.update()

    def close(self) -> None:
        pass

    def __enter__(self) -> _LoggedProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(iterable=None, *, total: int | None = None, desc: str | None = None, unit: str = "it",  # type: ignore[no-untyped-def]
             leave: bool = True):
    """The one progress helper of every command: a tqdm bar on a terminal, periodic log lines
    otherwise (see `_LoggedProgress`). Use it like tqdm: iterate it, or `update(n)` it in a
    `with` block."""
    if not progress_bars_enabled():
        return _LoggedProgress(iterable, total=total, desc=desc, unit=unit)
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)
