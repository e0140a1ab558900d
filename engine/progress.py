"""The one place that shows progress (DESIGN.md: no print in library code).

Progress bars go to stderr: through tqdm when it is installed (the ``progress`` extra:
``pip install 'cbs-prune[progress]'``), else through a minimal built-in counter line rewritten with a
carriage return. They are off when ``enabled`` is False, when the environment variable
``CBS_PROGRESS=0`` is set, or (``enabled=None``) when stderr is not a terminal. tqdm is imported only
when a bar is shown, so ``import engine`` never needs it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

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
    try:
        from tqdm.auto import tqdm  # noqa: PLC0415 - optional (the ``progress`` extra)
    except ImportError:
        yield from _fallback(iterable, total, desc)
        return
    with tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr) as bar:
        yield from bar


def _fallback(iterable: Iterable[T], total: int | None, desc: str) -> Iterator[T]:
    """The built-in bar: ``desc: i/total`` on one stderr line, rewritten with ``\\r``, cleared at the end."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    stream = sys.stderr
    prefix = f"{desc}: " if desc else ""
    width = 0
    last = 0.0

    def show(i: int, force: bool = False) -> None:
        nonlocal width, last
        now = time.monotonic()
        if not force and now - last < 0.1:  # at most ~10 redraws a second
            return
        last = now
        line = f"{prefix}{i}/{total}" if total is not None else f"{prefix}{i}"
        width = max(width, len(line))
        stream.write("\r" + line.ljust(width))
        stream.flush()

    i = 0
    show(0, force=True)
    try:
        for item in iterable:
            yield item
            i += 1
            show(i)
        show(i, force=True)
    finally:
        stream.write("\r" + " " * width + "\r")  # leave=False, like the tqdm bar
        stream.flush()


def get_logger(name: str = "cbs") -> logging.Logger:
    """The package logger (the CLI attaches a handler; the library never configures logging)."""
    return logging.getLogger(name)
