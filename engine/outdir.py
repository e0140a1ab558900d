"""The output folder of a run: checked before any work, held by one run at a time, replaced as a whole.

* :func:`check_out` refuses, with exit 2 and the folder's name, what could only fail after the work: an empty
  path, an existing file, a path under a file, a location that cannot be written, and a non-empty folder the
  user did not ask to replace (``--overwrite``). It also removes what a killed run left beside the folder
  (the temporary ``.NAME.new-*`` / ``.NAME.old-*`` folders of :func:`engine.records.write_folder_atomic`).
* :func:`locked` holds an exclusive lock (``fcntl.flock`` on ``.NAME.lock`` beside the folder) for the whole
  run, so a second run into the same folder stops at once instead of interleaving its files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import InvalidOptionError

__all__ = ["check_out", "locked"]


def _error(command: str, message: str) -> InvalidOptionError:
    arg = "out" if command.endswith(")") else "--out"  # the API's keyword or the CLI's flag
    return InvalidOptionError(f"The '{arg}' argument of {command} {message}")


def check_out(out: str | os.PathLike, command: str, overwrite: bool = False, resume: bool = False,
              marker: str | None = None, owned: tuple[str, ...] = ()) -> Path:
    """``out`` as a Path once it is a folder this run can create or replace (see the module docstring).

    A command that can resume (``marker``: the file its unfinished runs hold, e.g. ``checkpoint.pt``)
    accepts a non-empty folder with ``resume=True`` only when it holds that file, and refuses a folder that
    holds it without ``resume`` (continue it or replace it, never mix). ``resume`` into a new or empty folder
    starts afresh. A folder that holds only ``owned`` names (the files a previous run of the same command
    writes, e.g. ``cbs demo``'s) is that command's output and is replaced without ``overwrite``.
    """
    flag = "resume" if command.endswith(")") else "--resume"
    if resume and overwrite:
        raise _error(command, f"cannot be both resumed and replaced: pass {flag} or overwrite, not both.")
    text = os.fspath(out)
    if not text.strip():
        raise _error(command, "must name a folder. Got ''.")
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise _error(command, f"must be a folder. Got '{path}', which is a file.")
    parent = path.parent
    for p in [parent, *parent.parents]:
        if p.exists():
            if not p.is_dir():
                raise _error(command, f"must be a folder that can be created. Got '{path}': '{p}' is a file.")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise _error(command, f"must be a folder this user can write. Got '{path}' ({exc.strerror or exc}).") \
            from None
    for leftover in parent.glob(f".{path.name}.new-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in parent.glob(f".{path.name}.old-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    _refuse_if_held(path, command)  # a folder in use says so, whatever it holds
    ours = bool(owned) and path.is_dir() and all(p.name in owned for p in path.iterdir())
    if path.is_dir() and any(path.iterdir()) and not overwrite and not ours:
        held = ", ".join(sorted(p.name for p in path.iterdir())[:4])
        opt = "overwrite" if command.endswith(")") else "--overwrite"
        if marker is not None and (path / marker).is_file():
            if not resume:
                raise _error(command, f"holds a run ({marker}): pass {flag} to continue it with the same settings, "
                             f"or {opt} to replace it. Got '{path}'.")
        elif resume:
            raise _error(command, f"must hold a run of {command} to resume ({marker or 'its files'}), or be new or "
                         f"empty. Got '{path}', which holds {held}; pass {opt} to replace it.")
        else:
            raise _error(command, f"must be an empty or new folder, or pass {opt} to replace it. Got '{path}', "
                         f"which holds {held}.")
    return path


def _lock_file(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _take(fh, out: Path, command: str) -> None:
    """Lock the open lock file ``fh`` without waiting; another holder is the error naming the folder."""
    import fcntl

    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise _error(command, f"is in use by another run. Got '{out}' (locked by {_lock_file(out)}).") from None


def _refuse_if_held(out: Path, command: str) -> None:
    """Fail at once when another process holds ``out``'s lock (probed, not kept: :func:`locked` takes it)."""
    import fcntl

    lock = _lock_file(out)
    if not lock.exists() or _HELD.get(os.path.realpath(lock)):
        return
    with open(lock, "a+") as fh:
        _take(fh, out, command)
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


#: locks this process holds (lock file → depth): a nested ``locked`` of the same folder (the CLI, then the
#: API function it calls) is the same run, and flock would refuse a second descriptor even in one process
_HELD: dict[str, int] = {}


@contextlib.contextmanager
def locked(out: Path, command: str) -> Iterator[None]:
    """Hold the folder's lock for the ``with`` block; another holder makes this one fail at once."""
    import fcntl

    lock = _lock_file(out)
    key = os.path.realpath(lock)
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    with open(lock, "a+") as fh:
        _take(fh, out, command)
        _HELD[key] = 1
        try:
            yield
        finally:
            _HELD.pop(key, None)
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
