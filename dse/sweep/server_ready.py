"""Imported last by the sweep's fork server (its preload, dse/sweep/executors.py): its imports have
ended, and CPython's server loop, which starts next, watches the sweep's pipe itself. The thread that
watched it during the imports (dse/sweep/server_start.py) ends here, so that the server forks each
worker from a single thread."""

from __future__ import annotations

from dse.sweep.server_start import stop_watching_the_sweep

stop_watching_the_sweep()
