"""Fixtures for the shared datasets (../shared/data).

The real benchmark files live next to the repository, not in it, so tests find
them relative to this file. A missing folder is a broken checkout, not an
optional feature: the fixture fails loudly instead of skipping, so data tests
can never pass by silently not running.
"""
from __future__ import annotations

from pathlib import Path

import pytest

__all__ = ["SHARED_DATA_DIR", "shared_data_dir"]

#: ``<repo root>/../shared/data``
SHARED_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The read-only shared dataset folder; fails the test if it is absent."""
    if not SHARED_DATA_DIR.is_dir():
        pytest.fail(
            f"Shared dataset folder not found: {SHARED_DATA_DIR}. The data tests need the "
            "read-only datasets in ../shared/data next to the repository root "
            "(see shared/data/README.md).",
            pytrace=False,
        )
    return SHARED_DATA_DIR
