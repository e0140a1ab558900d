"""Reproducible records: JSON/JSONL written atomically, with package versions, seeds and settings."""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import os
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import RunError

__all__ = ["environment", "write_json_atomic", "append_jsonl", "read_jsonl", "to_jsonable", "atomic_write_bytes",
           "write_folder_atomic", "staged_folder"]

_PACKAGES = ("cbs-prune", "torch", "numpy", "scipy", "highspy", "pyomo", "cvxpy", "pyscipopt", "gurobipy")


def environment() -> dict[str, Any]:
    """Python, platform, thread count and installed versions of the packages that shape results."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        import torch

        threads = torch.get_num_threads()
    except Exception:  # noqa: BLE001 - torch is a dependency, but a record must never fail for this
        threads = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "versions": versions,
    }


def to_jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays, paths, enums and dataclass-like objects to JSON types."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, float) and not np.isfinite(value):
        return None if np.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a result file is for the group to read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Build the whole new content of folder ``out`` in the yielded temporary folder beside it; when the
    ``with`` block ends normally, the temporary folder replaces ``out`` by renames, so a reader sees the old
    folder or the new one, never a mix. On an error (or Ctrl-C) the temporary folder is removed and ``out``
    is untouched; a full disk is one :class:`~engine.errors.RunError` naming the folder and the free space. A killed run's
    leftovers (``.NAME.new-*``) are removed by :func:`engine.outdir.check_out` of the next run."""
    import shutil

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.chmod(path, 0o644)  # mkstemp/mkdtemp make things private; a result is for the group to read
        os.chmod(tmp, 0o755)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.rmdir(old)
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            free = shutil.disk_usage(out.parent).free
            raise RunError(f"No space left to write {out}: {free / 2**20:.1f} MiB free on its device; its previous "
                           "contents are intact.") from None
        raise


def write_folder_atomic(out: str | os.PathLike, files: dict[str, bytes]) -> None:
    """Write ``files`` ({name: bytes}) as the whole content of folder ``out``, all at once (see
    :func:`staged_folder`). Files are readable by the group (0644)."""
    with staged_folder(out) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)


def write_json_atomic(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Write a JSON record atomically (readers never see a half-written file)."""
    atomic_write_bytes(path, (json.dumps(to_jsonable(record), indent=2) + "\n").encode())


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line (a crash loses at most the line being written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(to_jsonable(record)) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSONL file written by :func:`append_jsonl`; a torn last line (a crash while
    appending) is skipped, so a resumed sweep redoes that run instead of failing."""
    out = []
    lines = Path(path).read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return out
