"""Process memory policy: keep freed memory in the process (glibc malloc), so that the next large
allocation reuses pages that are already resident.

Why: glibc serves every allocation above 32 MiB with its own ``mmap`` and hands it back to the kernel
on ``free``. A pruning run allocates and frees such blocks all the time (gradient matrices, their
column-major copies, N × N Gram matrices, float64 chunks), so each one is faulted in afresh. On a
virtual machine whose guest reports free pages to its host (Firecracker's free page reporting, as on
this project's 2-core machine) the host reclaims them within seconds, and faulting them back costs
about 8–10 s per GiB: touching a fresh 1.3 GB array took 10–16 s there, against 0.1 s for one the
process had just freed.

:func:`retain_freed_memory` turns both returns off (``mallopt(M_MMAP_MAX, 0)``: large blocks come from
the heap; ``mallopt(M_TRIM_THRESHOLD, 2³¹ − 1)``: up to 2 GiB of free heap top is kept). The process's
peak memory grows by what fragmentation leaves unused (MLPNet sweep worker: 5.8 GB against 4.7 GB), and
its results are unchanged (design note 27; docs/results.md, the MLPNet sweep).

Only the command-line entry points (``cbs``, ``scripts/reproduce.py``) call it: a library must not
change its host process's allocator. ``CBS_RETAIN_MEMORY=0`` turns it off for them; elsewhere than
Linux with glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

from engine.errors import invalid_option

__all__ = ["retain_freed_memory", "memory_retained", "RETAIN_ENV"]

#: environment variable that switches :func:`retain_freed_memory` off ("0") or on ("1", the default)
RETAIN_ENV = "CBS_RETAIN_MEMORY"

# mallopt parameter numbers of glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: free heap top kept before glibc trims it (mallopt takes an int)
_TRIM_THRESHOLD = 2**31 - 1

_log = logging.getLogger(__name__)
_retained = False


def _enabled_by_env() -> bool:
    value = os.environ.get(RETAIN_ENV, "").strip() or "1"  # unset or empty: the default
    if value not in ("0", "1"):
        raise invalid_option(RETAIN_ENV, "retain_freed_memory()", "'0' (off) or '1' (on) in the environment", repr(value))
    return value == "1"


def retain_freed_memory() -> bool:
    """Ask glibc malloc to keep freed memory in this process (see the module docstring).

    Returns:
        True when the policy is in force (now or from an earlier call), False when ``CBS_RETAIN_MEMORY=0``
        or the C library is not glibc (nothing is changed then).

    Raises:
        InvalidOptionError: ``CBS_RETAIN_MEMORY`` is set to something other than "0" or "1".
    """
    global _retained
    if not _enabled_by_env():
        return _retained
    if _retained:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl's mallopt is a no-op that reports success
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) != 1:
        _log.warning("glibc refused mallopt; freed memory goes back to the kernel as usual")
        return False
    _retained = True
    _log.info("freed memory stays in the process (%s=0 turns this off)", RETAIN_ENV)
    return True


def memory_retained() -> bool:
    """Whether :func:`retain_freed_memory` is in force in this process (recorded with every run)."""
    return _retained
