"""Sweeps: a YAML file of tasks x trial grids x seeds -> trained proxies + energy estimates -> a SQLite store.

    from dse.sweep import load_config, run_sweep, load_trials
    summary = run_sweep(load_config("examples/quickstart.yaml"))
    frame = load_trials(summary.output)

Names are imported on first use, so a worker process that only runs trials (dse.sweep.executors)
does not pay for pandas, pydantic and the energy model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dse.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from dse.sweep.config import SweepConfig, load_config, parse_config
    from dse.sweep.runner import SweepSummary, run_sweep
    from dse.sweep.store import load_trials
    from dse.sweep.trials import Trial, expand, trial_hash

_EXPORTS = {
    "SweepConfig": "dse.sweep.config", "load_config": "dse.sweep.config", "parse_config": "dse.sweep.config",
    "SweepSummary": "dse.sweep.runner", "run_sweep": "dse.sweep.runner", "load_trials": "dse.sweep.store",
    "Trial": "dse.sweep.trials", "expand": "dse.sweep.trials", "trial_hash": "dse.sweep.trials",
}

__all__ = ["SweepConfig", "SweepSummary", "Trial", "expand", "load_config", "load_trials", "parse_config",
           "run_sweep", "trial_hash"]

__getattr__ = lazy_exports(__name__, _EXPORTS)
