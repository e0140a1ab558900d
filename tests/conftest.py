"""Shared pytest fixtures.

``shared_data``: the shared data directory (``$CBS_DATA_DIR``, else ``../shared/data`` next to the project
root: the tests pin it so that a test that changes the working directory still finds it). Tests that need the real data sets or
checkpoints take this fixture and are skipped, with the reason, when the directory is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.data import DATA_DIR_ENV, default_data_dir

os.environ.setdefault(DATA_DIR_ENV, str(Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data directory as a Path; skips the test when it does not exist."""
    path = default_data_dir()
    if not path.is_dir():
        pytest.skip(f"../shared/data not found: '{path}' does not exist (set {DATA_DIR_ENV} to use another folder)")
    return path
