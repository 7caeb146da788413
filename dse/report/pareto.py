"""Pareto fronts of a sweep summary: per task, maximise mean accuracy, minimise energy (and memory).

A point is on the front when no other point of the same task is at least as good in every objective
and strictly better in one. Points with equal objectives do not dominate each other, so exact
duplicates are all kept; the front's order is fixed (energy up, accuracy down, memory up, label),
so the same summary in any row order gives the same front.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dse.energy.units import UNITS
from dse.errors import InputError, choice

ENERGY_UNITS: tuple[str, ...] = UNITS
"""The units a workload's iteration energy is broken into, in stacking order."""

IDENTITY_COLUMNS: tuple[str, ...] = (
    "model", "dataset", "weights", "activations", "gradients", "weight_grads", "optimizer",
    "master_weights", "warmup_epochs",
)
"""Columns that describe a configuration (not a measurement); carried into summaries and fronts."""

COUNT_COLUMNS: tuple[str, ...] = ("n_seeds", "n_ok", "n_diverged", "n_error")
STATISTIC_COLUMNS: tuple[str, ...] = (
    "n", "accuracy_mean", "accuracy_std", "accuracy_ci_low", "accuracy_ci_high", "val_accuracy_mean",
    "baseline", "delta_mean", "delta_ci_low", "delta_ci_high", "p_value", "p_vs_best")
"""A configuration's accuracy over seeds, and its comparisons with the baseline and the best (Welch)."""
TUNED_PREFIX = "tuned:"
"""Columns `tuned:<field>`: the value of each tuned field at the point reported."""


def energy_column(workload: str, unit: str | None = None) -> str:
    """Name of the energy-per-iteration column (mJ) of a workload, or of one of its units."""
    return f"energy_mj:{workload}" if unit is None else f"energy_mj:{workload}:{unit}"


def run_energy_column(workload: str, mean: bool = False) -> str:
    """Name of a workload's run-energy column (mJ): the whole training run, or (`mean`) its mean per
    iteration, each iteration in the formats it trained in (warm-up in fp32)."""
    return f"run_mean_energy_mj:{workload}" if mean else f"run_energy_mj:{workload}"


FRONT_ENERGIES: tuple[str, ...] = ("iteration", "run-mean")
"""The energies a user may make fronts rank by: one iteration in the trial's formats, or the run's mean
per iteration (`dse report --front-energy`)."""
FRONT_ENERGY = "front_energy"
"""`frame.attrs` key of the energy the user chose (`choose_front_energy`); absent: `ranks_by_run_mean`."""


def choose_front_energy(trials: pd.DataFrame, measure: str | None) -> None:
    """Make every front of `trials` (and of the summaries made from it) rank by `measure`, one of
    FRONT_ENERGIES; None leaves the choice to `ranks_by_run_mean`."""
    if measure is not None:
        trials.attrs[FRONT_ENERGY] = choice("--front-energy", measure, FRONT_ENERGIES)


def front_energy_column(summary: pd.DataFrame, workload: str) -> str:
    """The energy a front ranks by: the one the user chose (`choose_front_energy`; a run mean that some
    configuration lacks is an InputError), else the run's mean per iteration (each iteration in the
    formats it trained in: a warm-up's in fp32) where `ranks_by_run_mean`, else one iteration in the
    trial's formats."""
    chosen = summary.attrs.get(FRONT_ENERGY)
    if chosen == "iteration":
        return energy_column(workload)
    if chosen == "run-mean":
        lacking = without_run_mean(summary)
        if lacking:
            task, label, missing = lacking[0]
            more = f" (and {len(lacking) - 1} more)" if len(lacking) > 1 else ""
            raise InputError(f"--front-energy run-mean: configuration {label!r} of task {task!r} has no run "
                             f"mean on workload {missing!r}{more}: its results predate what the run mean "
                             "needs (run `dse sweep` on the sweep file again to price them; it trains "
                             "nothing again), or use --front-energy iteration")
        return run_energy_column(workload, mean=True)
    return run_energy_column(workload, mean=True) if ranks_by_run_mean(summary) else energy_column(workload)


def without_run_mean(summary: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(task, label, workload) of each configuration with an accuracy and one iteration's energy but no
    run mean on that workload, where its runs trained an iteration (`ranks_by_run_mean`)."""
    lacking: list[tuple[str, str, str]] = []
    if "accuracy_mean" not in summary.columns:
        return lacking
    accuracy = pd.to_numeric(summary["accuracy_mean"], errors="coerce").notna()
    for workload in [w for w in workloads_of(summary) if energy_column(w) in summary.columns]:
        mean, total = run_energy_column(workload, mean=True), run_energy_column(workload)
        priced = accuracy & pd.to_numeric(summary[energy_column(workload)], errors="coerce").notna()
        if total in summary.columns:  # a known total without a mean: no iteration trained
            priced &= pd.to_numeric(summary[total], errors="coerce").isna()
        if mean in summary.columns:
            priced &= pd.to_numeric(summary[mean], errors="coerce").isna()
        lacking += [(str(row["task"]), str(row["label"]), workload) for _, row in summary[priced].iterrows()]
    return lacking


def ranks_by_run_mean(summary: pd.DataFrame) -> bool:
    """Whether every front of `summary` ranks by the run's mean: only where every configuration that has
    an accuracy and one iteration's energy has its run's mean too, in every workload. A store written
    before dse counted iterations lacks some (a warm-up or a diverged seed), and a front ranked by the
    run's mean would silently leave those configurations out; so then every front, of every task and
    workload, ranks by one iteration: one measure in a report. A configuration whose runs trained no
    iteration (every seed diverged at its first batch: a run total, its forward, and no mean) keeps no
    one from it."""
    workloads = [w for w in workloads_of(summary) if energy_column(w) in summary.columns]
    if not workloads or "accuracy_mean" not in summary.columns:
        return False
    if any(run_energy_column(workload, mean=True) not in summary.columns for workload in workloads):
        return False
    return not without_run_mean(summary)


def memory_column(workload: str) -> str:
    """Name of the memory-footprint column (MiB) of a workload."""
    return f"memory_mib:{workload}"


def area_column(workload: str) -> str:
    """Name of the datapath-area column (um^2, at the workload column's node) of a workload."""
    return f"area_um2:{workload}"


def workloads_of(frame: pd.DataFrame) -> list[str]:
    """The sweep's workloads: from `frame.attrs["sweep"]`, else from the `energy_mj:W` columns."""
    declared = (frame.attrs.get("sweep") or {}).get("workloads")
    if declared:
        return [str(w) for w in declared]
    return [c.split(":", 1)[1] for c in frame.columns if c.startswith("energy_mj:") and c.count(":") == 1]


def non_dominated(objectives: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows of an n x k array (every objective minimised) that nothing dominates."""
    points = np.asarray(objectives, dtype=float)
    if points.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    # [j, i]: point j is no worse than point i everywhere / strictly better somewhere.
    no_worse = (points[:, None, :] <= points[None, :, :]).all(axis=2)
    better = (points[:, None, :] < points[None, :, :]).any(axis=2)
    return np.asarray(~(no_worse & better).any(axis=0))


def _require(summary: pd.DataFrame, columns: list[str], workload: str) -> None:
    missing = [c for c in columns if c not in summary.columns]
    if missing:
        known = ", ".join(workloads_of(summary)) or "none"
        raise InputError(f"sweep results have no column {missing[0]!r} for workload {workload!r} "
                         f"(workloads in the results: {known})")


def pareto_front(summary: pd.DataFrame, workload: str, memory_objective: bool = False) -> pd.DataFrame:
    """Per task, the configurations no other one beats on mean accuracy, energy of `workload` (and memory).

    The energy is `front_energy_column`'s: the run's mean per iteration where `ranks_by_run_mean`. Rows
    whose accuracy, energy or (if asked) memory is missing (NaN), such as configurations whose every
    seed raised, never enter the front. Returns one row per front point with columns `task`,
    `workload`, `label`, the tuned values, the configuration's identity columns, seed counts, the
    STATISTIC_COLUMNS present, `energy_mj` (the energy ranked by), `iteration_energy_mj` (one iteration
    in the trial's formats, where that is not what ranks) and `energy_mj:<unit>` for each unit present
    (its split), `run_energy_mj` (the whole run), `memory_mib` and `area_um2` (each if present).
    """
    energy = front_energy_column(summary, workload)
    memory = memory_column(workload)
    _require(summary, ["task", "label", "accuracy_mean", energy] + ([memory] if memory_objective else []),
             workload)
    units = [u for u in ENERGY_UNITS if energy_column(workload, u) in summary.columns]
    renamed = {energy: "energy_mj", **({energy_column(workload): "iteration_energy_mj"}
                                       if energy != energy_column(workload) else {}),
               **{energy_column(workload, u): f"energy_mj:{u}" for u in units},
               run_energy_column(workload): "run_energy_mj", memory: "memory_mib",
               area_column(workload): "area_um2"}
    keep = (["task", "label"] + [c for c in summary.columns if str(c).startswith(TUNED_PREFIX)]
            + [c for c in IDENTITY_COLUMNS if c in summary.columns]
            + [c for c in COUNT_COLUMNS if c in summary.columns]
            + [c for c in STATISTIC_COLUMNS if c in summary.columns]
            + [c for c in renamed if c in summary.columns])
    objective_columns = ["accuracy_mean", energy] + ([memory] if memory_objective else [])

    fronts: list[pd.DataFrame] = []
    for task in pd.unique(summary["task"]):
        rows = summary[summary["task"] == task]
        values = rows[objective_columns].to_numpy(dtype=float)
        finite = np.isfinite(values).all(axis=1)
        candidates = rows[finite]
        minimised = values[finite] * np.array([-1.0] + [1.0] * (len(objective_columns) - 1))
        fronts.append(candidates[non_dominated(minimised)])
    columns = ["task", "workload"] + [renamed.get(c, c) for c in keep if c != "task"]
    if not fronts:
        return pd.DataFrame(columns=columns)
    front = pd.concat(fronts)[keep].rename(columns=renamed)
    front.insert(1, "workload", workload)
    order = ["energy_mj", "accuracy_mean"] + (["memory_mib"] if memory_objective else []) + ["label"]
    ascending = [True, False] + ([True] if memory_objective else []) + [True]
    task_rank = {task: rank for rank, task in enumerate(pd.unique(summary["task"]))}
    front = front.assign(_task_rank=front["task"].map(task_rank))
    front = front.sort_values(["_task_rank", *order], ascending=[True, *ascending], kind="mergesort")
    return front.drop(columns="_task_rank").reset_index(drop=True)[columns]


def all_fronts(summary: pd.DataFrame, workloads: list[str], memory_objective: bool = False) -> pd.DataFrame:
    """The fronts of every task and workload: task by task, and within a task workloads in the given order."""
    fronts = [pareto_front(summary, w, memory_objective) for w in workloads]
    non_empty = [f for f in fronts if len(f)]
    if not non_empty:
        return fronts[0] if fronts else pd.DataFrame(columns=["task", "workload", "label"])
    joined = pd.concat(non_empty, ignore_index=True)
    task_rank = {task: rank for rank, task in enumerate(pd.unique(summary["task"]))}
    by_task = joined["task"].map(task_rank).sort_values(kind="mergesort").index
    return joined.loc[by_task].reset_index(drop=True)
