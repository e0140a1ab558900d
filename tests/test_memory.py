"""scripts/memory_policy.py: the retain-freed-memory policy of the sweep script (no library code tunes the
allocator).

Its effect is checked on the process itself (resident memory after freeing a large array), in
subprocesses, so that the test process keeps glibc's defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import importlib.util
from pathlib import Path

from engine.errors import InvalidOptionError

_PATH = Path(__file__).parents[1] / "scripts" / "memory_policy.py"
_SPEC = importlib.util.spec_from_file_location("memory_policy", _PATH)
_policy = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_policy)
RETAIN_ENV, memory_retained, retain_freed_memory = _policy.RETAIN_ENV, _policy.memory_retained, _policy.retain_freed_memory


def _is_glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):  # the name is unknown outside glibc
        return False


_glibc = _is_glibc()

# allocate and free 256 MiB, report resident memory (MiB) before, with and after it
_PROBE = """
import json, sys, importlib.util
import numpy as np
spec = importlib.util.spec_from_file_location("memory_policy", sys.argv[1])
policy = importlib.util.module_from_spec(spec); spec.loader.exec_module(policy)
retain_freed_memory, memory_retained = policy.retain_freed_memory, policy.memory_retained
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
applied = retain_freed_memory()
before = rss()
block = np.ones(2**25)  # 256 MiB, touched
during = rss()
del block
after = rss()
print(json.dumps({"applied": applied, "retained": memory_retained(), "before": before, "during": during,
                  "after": after}))
"""


def _probe(value: str) -> dict:
    env = {**os.environ, RETAIN_ENV: value}
    out = subprocess.run([sys.executable, "-c", _PROBE, str(_PATH)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not _glibc, reason="the policy is glibc malloc's; elsewhere it does nothing")
def test_freed_block_stays_resident_only_with_the_policy():
    on, off = _probe("1"), _probe("0")
    assert on["applied"] and on["retained"]
    assert not off["applied"] and not off["retained"]
    for probe in (on, off):
        assert probe["during"] - probe["before"] > 250  # the block was resident
    # glibc's default unmaps the 256 MiB block on free; with the policy it stays in the heap
    assert off["during"] - off["after"] > 250
    assert on["during"] - on["after"] < 10


def test_off_switch_changes_nothing(monkeypatch):
    monkeypatch.setenv(RETAIN_ENV, "0")
    assert retain_freed_memory() is False
    assert memory_retained() is False


@pytest.mark.parametrize("value", ["yes", "2", "true"])
def test_bad_switch_names_the_variable_the_choices_and_the_value(monkeypatch, value):
    monkeypatch.setenv(RETAIN_ENV, value)
    with pytest.raises(InvalidOptionError) as err:
        retain_freed_memory()
    message = str(err.value)
    assert RETAIN_ENV in message and "'0' (off) or '1' (on)" in message and repr(value) in message
