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

__all__ = ["progress", "ProgressBar", "get_logger"]

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
        if total is None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        with ProgressBar(total, desc, True) as bar:  # the built-in line (tqdm is not there)
            for item in iterable:
                yield item
                bar.update()
        return
    with tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr) as bar:
        yield from bar


class ProgressBar:
    """A bar driven by hand, for work whose items finish out of order (executors): ``update(n)`` counts
    finished items, ``status(text)`` shows a short note after the count (e.g. the slowest running task).
    Same switches as :func:`progress`; a no-op when off. Use as a context manager. Without tqdm it is the
    built-in bar: ``desc: done/total  note`` on one stderr line, rewritten with ``\\r`` at most ~10 times a
    second, shown once more with the final count and cleared at the end (``leave=False``, like tqdm's)."""

    def __init__(self, total: int | None, desc: str = "", enabled: bool | None = None) -> None:
        self.total, self.desc, self.done, self.note = total, desc, 0, ""
        self._on = _wanted(enabled)
        self._bar = None
        self._width, self._last = 0, 0.0
        if self._on:
            try:
                from tqdm.auto import tqdm  # noqa: PLC0415 - optional (the ``progress`` extra)

                self._bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                self._draw(force=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._on:
            self._draw()

    def status(self, text: str) -> None:
        if text == self.note:
            return
        self.note = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=True)
        elif self._on:
            self._draw()

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        line = (f"{self.desc}: " if self.desc else "") + count + (f"  {self.note}" if self.note else "")
        self._width = max(self._width, len(line))
        sys.stderr.write("\r" + line.ljust(self._width))
        sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._on and self._width:
            self._draw(force=True)  # the final count, then the line cleared
            sys.stderr.write("\r" + " " * self._width + "\r")
            sys.stderr.flush()
            self._width = 0

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def get_logger(name: str = "cbs") -> logging.Logger:
    """The package logger (the CLI attaches a handler; the library never configures logging)."""
    return logging.getLogger(name)
