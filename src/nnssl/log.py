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
