"""Shared by every test folder (tests/ mirrors the package: formats, energy, models, train, sweep,
report, data; the package's top-level modules are tested at the top).

The helpers `report_frames` (synthetic sweep results) and `sweep_fakes` (stand-in training functions
that worker processes import by name) live beside this file; pytest puts this folder on sys.path
when it loads this conftest, so every test folder imports them by name.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository's root folder (examples/, docs/, cli.py)."""
    return ROOT


@pytest.fixture(scope="session")
def tests_dir() -> Path:
    """tests/: where the helper modules live, for a subprocess that imports them."""
    return TESTS
