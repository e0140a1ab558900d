"""The one place that shows progress (DESIGN.md: no print in library code).

Progress bars go to stderr through tqdm; they are off when ``enabled`` is False, when the
environment variable ``CBS_PROGRESS=0`` is set, or (``enabled=None``) when stderr is not a terminal.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

__all__ = ["progress", "get_logger"]

T = TypeVar("T")


def _wanted(enabled: bool | None) -> bool:
    if os.environ.get("CBS_PROGRESS", "1") == "0":
        return False
    if enabled is None:
        return sys.stderr.isatty()
    return bool(enabled)


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", enabled: bool | None = None) -> Iterator[T]:
    """Iterate with a progress bar (or silently)."""
    if not _wanted(enabled):
        yield from iterable
        return
    with tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr) as bar:
        yield from bar


def get_logger(name: str = "cbs") -> logging.Logger:
    """The package logger (the CLI attaches a handler; the library never configures logging)."""
    return logging.getLogger(name)
