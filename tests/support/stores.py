"""Read a sweep's store from outside the sweep, as a second process would while it runs."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from dse.sweep.store import STORE_FILE


def stored_trial_ids(out: Path) -> list[str]:
    """The trial ids stored in `out`'s store ([] while it has no table of trials yet); read-only, so a
    running sweep's writes are not disturbed."""
    try:
        with sqlite3.connect(f"file:{out / STORE_FILE}?mode=ro", uri=True, timeout=5) as connection:
            return [row[0] for row in connection.execute("SELECT trial_id FROM trials")]
    except sqlite3.OperationalError:
        return []
