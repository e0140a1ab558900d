"""The ``ray`` executor: blocks (and layer-wise rows) as tasks on a Ray cluster (the ``ray`` extra).

What travels, and how often:

* **once per call**: the solver and every block's options (with their ``evaluate`` callbacks, which may hold
  the model and its loss samples) as one object in Ray's object store; a worker deserializes it once and keeps
  it for the call's other tasks (:data:`_CONTEXT`);
* **once per array**: every array of at least :data:`BIG_BYTES` inside the problems (a Fisher block's gradient
  rows, the factor X that all rows of a layer share, a shared H) goes into the object store once, however many
  problems or tasks hold it; a task carries references, and a worker on the same node maps it without a copy;
* **per task**: the problems of one chunk, pickled without those arrays (weights, k, labels: kilobytes);
* **back**: supports, objectives, bounds, gaps, statuses, timings (``SolveResult`` without weights).

Chunks: the blocks, largest first, are cut into about four tasks per slot (``workers`` slots, or one per CPU of
the cluster), so a task's fixed cost (about 1.5 ms here) is spread over many small rows, and at most one task
per slot is in flight: the oldest in flight is the slowest running one, shown on the progress bar.

Faults: a task whose worker dies is retried by Ray (``max_retries``); every task is a pure function of its
inputs (seeded solvers; no time limit makes it depend on the clock), so a retried run returns what an
undisturbed one does. An error of ours inside a task (a plug-in that raises, a refuted claim) comes back as
itself, not retried.

Connecting (:func:`connect`, at :func:`engine.executor.make_executor`, before any work): the cluster this
process is already connected to; else ``address`` (``HOST:PORT``, ``ray://HOST:PORT``, ``auto``), whose port
is probed first so an unreachable cluster is one clear error instead of Ray's retries; else a new local
instance on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
import socket
import time
from collections import OrderedDict
from typing import Any

import numpy as np

from .errors import CBSError, InvalidOptionError, first_line
from .executor import Executor, remember, remote_task, slowest_note
from .progress import ProgressBar, get_logger
from .solve import note_overshoot

__all__ = ["RayExecutor", "connect", "start_local", "BIG_BYTES", "TASKS_PER_SLOT", "MAX_RETRIES"]

log = get_logger(__name__)

#: arrays at least this large travel through the object store, once each
BIG_BYTES = 1 << 16
#: tasks per slot (chunking: load balance against the per-task cost)
TASKS_PER_SLOT = 4
#: retries of a task whose worker died
MAX_RETRIES = 3
#: seconds to wait for a TCP connection to a cluster's address
PROBE_SECONDS = 5.0


def _ray(where: str):
    try:
        import ray
    except ImportError:
        raise InvalidOptionError(f"The 'executor' argument of {where} is 'ray', and Ray is not installed: "
                                 "pip install 'cbs-prune[ray]'.") from None
    return ray


def _flag(where: str) -> str:
    return "ray_address" if where.endswith(")") else "--ray-address"


def _probe(address: str, where: str) -> None:
    """Refuse an address whose port does not answer (Ray itself would retry for minutes)."""
    text = address.split("://", 1)[-1]
    host, _, port = text.rpartition(":")
    bad = f"The '{_flag(where)}' argument of {where} must be a reachable Ray cluster (HOST:PORT of its head"
    if not host or not port.isdigit():
        raise InvalidOptionError(f"{bad}, ray://HOST:PORT or auto). Got {address!r}.")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        raise InvalidOptionError(f"{bad}). Got {address!r}: {exc.strerror or exc}.") from None


def connect(address: str | None, where: str, num_cpus: int | None = None) -> Any:
    """The ``ray`` module, connected (module docstring); a clear error (exit 2) when it cannot be."""
    ray = _ray(where)
    if address not in (None, "auto", "local"):
        _probe(address, where)
    if ray.is_initialized():
        return ray
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    if address in (None, "local"):
        start_local(num_cpus=num_cpus, where=where)
        return ray
    _quiet()
    try:
        ray.init(address=address, logging_level="WARNING")
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError, ...
        hint = ("" if os.environ.get("RAY_AUTH_MODE") else " A cluster started with `ray start` asks for a token "
                "(Ray >= 2.59): set RAY_AUTH_MODE=token here, with its token in RAY_AUTH_TOKEN or ~/.ray/auth_token.")
        raise InvalidOptionError(f"The '{_flag(where)}' argument of {where} must be a Ray cluster this process can "
                                 f"join. Got {address!r}: {first_line(exc)}.{hint}") from None
    return ray


def _quiet() -> None:
    import logging

    # "token authentication is enabled" is Ray's notice on every start, not the user's business
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def start_local(num_cpus: int | None = None, object_store_memory: int | None = None,
                where: str = "start_local()") -> Any:
    """Start a Ray instance for this process alone, listening on 127.0.0.1 only (Ray would otherwise bind its
    services to the machine's routable address); the ``ray`` module. The tests start theirs with this too."""
    ray = _ray(where)
    from ray._private import ray_constants

    _quiet()
    loopback = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # how Ray itself keeps a one-machine instance on the loopback
    try:
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory,
                 include_dashboard=False, logging_level="WARNING", _node_ip_address="127.0.0.1")
    except Exception as exc:  # noqa: BLE001 - Ray raises RuntimeError, ValueError, ... when it cannot start
        raise InvalidOptionError(f"The 'executor' argument of {where} is 'ray', and a local Ray instance could not "
                                 f"start: {first_line(exc)}.") from None
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = loopback
    return ray


# ---------------------------------------------------------------------------------------------- packing
class _Pickler(pickle.Pickler):
    """Pickles with every large array replaced by a key into a table of object-store references."""

    def __init__(self, buf, packer: "_Packer") -> None:
        super().__init__(buf, protocol=5)
        self.packer = packer
        self.used: set[int] = set()

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is np.ndarray and obj.nbytes >= BIG_BYTES:
            key = self.packer.share(obj)
            self.used.add(key)
            return key
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, arrays: dict[int, np.ndarray]) -> None:
        super().__init__(io.BytesIO(data))
        self.arrays = arrays

    def persistent_load(self, key: Any) -> Any:
        return self.arrays[key]


class _Packer:
    """One call's table: each large array put into the object store once (keyed by identity, kept alive)."""

    def __init__(self, ray) -> None:
        self.ray = ray
        self.refs: dict[int, Any] = {}
        self.keep: list[np.ndarray] = []  # an id is unique only while its array lives
        self.bytes_shared = 0

    def share(self, array: np.ndarray) -> int:
        key = id(array)
        if key not in self.refs:
            self.refs[key] = self.ray.put(array)
            self.keep.append(array)
            self.bytes_shared += array.nbytes
        return key

    def pack(self, obj: Any) -> tuple[bytes, dict[int, Any]]:
        buf = io.BytesIO()
        pickler = _Pickler(buf, self)
        pickler.dump(obj)
        return buf.getvalue(), {k: self.refs[k] for k in pickler.used}


def _importable_elsewhere(module_name: str) -> bool:
    """Whether a worker can import ``module_name`` by name: this package's modules and installed ones (under
    the interpreter's prefix); a user's file or a test module is not (it is sent by value)."""
    import sys
    from pathlib import Path

    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if module is None or module_name == "__main__" or file is None:
        return True  # built-ins; __main__ is sent by value by cloudpickle itself
    path = Path(file).resolve()
    here = Path(__file__).resolve().parent  # engine/; formulations/ beside it
    roots = [Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), here, here.parent / "formulations"]
    return any(path.is_relative_to(r) for r in roots)


def send_user_code_by_value(obj: Any) -> list[str]:
    """Register with cloudpickle, by value, every module of a class or function inside ``obj`` that a worker
    could not import (a plug-in solver, a model or a loss defined in the user's own file); their names."""
    from ray import cloudpickle

    seen: set[str] = set()

    class _Walker(cloudpickle.CloudPickler):
        def reducer_override(self, o):
            name = getattr(o, "__module__", None) if isinstance(o, type) or callable(o) else None
            name = name or getattr(type(o), "__module__", None)
            if isinstance(name, str):
                seen.add(name)
            return super().reducer_override(o)

    _Walker(io.BytesIO(), protocol=5).dump(obj)
    import sys

    sent = sorted(m for m in seen if m.split(".")[0] not in ("builtins", "numpy", "torch")
                  and not _importable_elsewhere(m))
    for m in sent:
        cloudpickle.register_pickle_by_value(sys.modules[m])
    return sent


# ------------------------------------------------------------------------------------------- the task
#: in a worker: the last calls' (solver, options), by object id, deserialized once per worker and call
_CONTEXT: OrderedDict[str, Any] = OrderedDict()


def _run_chunk(context_box: list, payload: bytes, refs_box: list[dict[int, Any]], indices: list[int]) -> Any:
    """In a worker: solve and check the chunk's blocks (:func:`engine.executor.solve_task`)."""
    import ray
    import torch

    torch.set_num_threads(1)
    key = context_box[0].hex()
    if key not in _CONTEXT:
        _CONTEXT[key] = ray.get(context_box[0])
        while len(_CONTEXT) > 2:
            _CONTEXT.popitem(last=False)
    solver, options = _CONTEXT[key]
    refs = refs_box[0]
    arrays = dict(zip(refs, ray.get(list(refs.values())))) if refs else {}
    problems, warm = _Unpickler(payload, arrays).load()
    out = []
    try:
        for i, problem, w in zip(indices, problems, warm):
            out.append(remote_task(solver, problem, options[i], w))  # (result, the support's update)
    except CBSError as exc:
        return ("error", exc)  # ours, one line: raised again in the driver as it is, never retried
    return ("ok", out)


_REMOTE: dict[str, Any] = {}


def _remote(ray):
    if "chunk" not in _REMOTE:
        _REMOTE["chunk"] = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(_run_chunk)
    return _REMOTE["chunk"]


class RayExecutor(Executor):
    """Tasks on a Ray cluster (module docstring). ``workers`` > 1 caps the tasks in flight; 1: one per CPU of
    the cluster."""

    name = "ray"

    def __init__(self, workers: int = 1, address: str | None = None, where: str = "make_executor()") -> None:
        super().__init__(workers)
        self.address = address
        self.ray = connect(address, where, num_cpus=workers if workers > 1 else None)
        #: what the last call moved: bytes put once, bytes of task payloads, tasks, seconds
        self.last: dict[str, Any] = {}

    def slots(self) -> int:
        if self.workers > 1:
            return self.workers
        return max(1, int(self.ray.cluster_resources().get("CPU", 1)))

    def solve(self, solver, problems, options, desc="select", show=None, warm_starts=None):
        ray = self.ray
        n = len(problems)
        if n == 0:
            return []
        started = time.perf_counter()
        slots = self.slots()
        order = sorted(range(n), key=lambda i: -problems[i].n)  # largest first
        size = max(1, math.ceil(n / (TASKS_PER_SLOT * slots)))
        chunks = [order[s : s + size] for s in range(0, n, size)]
        # a memo is the caller's, in this process (a worker's task makes its own: remote_task)
        job = (solver, [o if o.memo is None else dataclasses.replace(o, memo=None) for o in options])
        send_user_code_by_value(job)
        context = ray.put(job)
        packer = _Packer(ray)
        remote = _remote(ray)
        results: list[Any] = [None] * n
        payload_bytes = 0
        queue = list(range(len(chunks)))
        in_flight: dict[Any, int] = {}
        running: dict[Any, tuple[str, float]] = {}
        with ProgressBar(n, f"{desc} [ray]", show) as bar:
            while queue or in_flight:
                while queue and len(in_flight) < slots:
                    c = queue.pop(0)
                    payload, refs = packer.pack(([problems[i] for i in chunks[c]],
                                                 [None if warm_starts is None else warm_starts[i] for i in chunks[c]]))
                    payload_bytes += len(payload)
                    ref = remote.remote([context], payload, [refs], chunks[c])
                    in_flight[ref] = c
                    running[ref] = (problems[chunks[c][0]].label, time.monotonic())
                done, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
                for ref in done:
                    c = in_flight.pop(ref)
                    running.pop(ref)
                    try:
                        kind, value = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        raise (exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc) from None
                    if kind == "error":
                        raise value
                    for i, (result, solution) in zip(chunks[c], value):
                        results[i] = remember(problems[i], options[i], result, solution)
                        note_overshoot(solver, problems[i], result)
                    bar.update(len(chunks[c]))
                bar.status(slowest_note(running))
        self.last = {"tasks": len(chunks), "blocks": n, "bytes_shared": packer.bytes_shared,
                     "arrays_shared": len(packer.refs), "payload_bytes": payload_bytes,
                     "seconds": time.perf_counter() - started}
        log.info("ray: %d blocks in %d tasks, %.1f MB shared once, %.1f kB of payloads, %.2f s", n, len(chunks),
                 packer.bytes_shared / 1e6, payload_bytes / 1e3, self.last["seconds"])
        return results

