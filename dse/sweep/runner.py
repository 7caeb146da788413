"""A sweep from a validated config to a filled store and reports.

Order matters for "nothing written on bad input": expand the trials, estimate every configuration's
energy, check the output path and (for Ray) reach the cluster, and only then create the directory and
the store. Each finished trial is committed as it arrives; rerunning skips what is finished (resume),
`force=True` reruns it.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dse.errors import InputError
from dse.sweep.config import SweepConfig
from dse.sweep.energy import EnergyEstimator, energy_key
from dse.sweep.executors import (
    Executor,
    GroupJob,
    InlineExecutor,
    LocalExecutor,
    RayExecutor,
    TrainFn,
    TrialJob,
    TrialOutcome,
    start_worker_server,
)
from dse.sweep.groups import plan_groups
from dse.sweep.store import (
    PlanRow,
    SweepStore,
    TrialRow,
    load_trials,
    master_weights_text,
    stored_sweep_name,
)
from dse.sweep.trials import Trial, baseline_labels, estimated_cost, expand, resolved_formats, stable_hash
from dse.usercode import sources_of


@dataclass
class TrialRecord:
    """What the progress display and the summary need to know about one finished trial."""

    trial_id: str
    task: str
    label: str
    seed: int
    status: str
    test_accuracy: float
    error: str
    wall_time_s: float


class Reporter(Protocol):
    def start(self, total: int, done: int, best: TrialRecord | None) -> None: ...

    def trial_done(self, record: TrialRecord) -> None: ...

    def stop(self) -> None: ...


class SilentReporter:
    def start(self, total: int, done: int, best: TrialRecord | None) -> None:
        pass

    def trial_done(self, record: TrialRecord) -> None:
        pass

    def stop(self) -> None:
        pass


@dataclass
class SweepSummary:
    name: str
    output: Path
    total: int
    skipped: int
    """Trials already in the store from an earlier run (resume)."""
    ran: int
    """Trials run now."""
    ok: int = 0
    """Trials of the sweep (run now or earlier) by status."""
    diverged: int = 0
    errors: int = 0
    best: TrialRecord | None = None
    """The finished trial with the best test accuracy, now or earlier."""
    wall_time_s: float = 0.0
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Configurations whose trials trained one by one instead of in groups, and why."""


# --- preparation ----------------------------------------------------------------------------------

EnergyRows = dict[tuple[str, str], dict[str, float]]
"""(energy key, workload) -> WorkloadEnergy.as_row()."""


def estimate_energies(sweep: SweepConfig, trials: list[Trial]) -> tuple[dict[str, str], EnergyRows]:
    """(trial_id -> energy key, (energy key, workload) -> values) for every trial's configuration."""
    estimator = EnergyEstimator(sweep.energy)
    keys: dict[str, str] = {}
    energies: EnergyRows = {}
    for trial in trials:
        key = energy_key(trial.config, sweep.energy)
        keys[trial.trial_id] = key
        if (key, sweep.energy.columns[0]) in energies:
            continue
        try:
            estimates = estimator.estimate(trial.config)
        except ValueError as error:
            message = str(error).splitlines()[0]
            raise sweep.source.error(trial.source, f"energy of {trial.label!r}: {message}") from None
        for workload, estimate in estimates.items():
            energies[(key, workload)] = estimate.as_row()
    return keys, energies


def check_tasks(sweep: SweepConfig) -> None:
    """Each task's dataset loads and its model fits it (a file dataset needs its data_dir)."""
    from dse.data import load_dataset
    from models.proxies import build_model

    for task in sweep.tasks:
        defaults = task.defaults
        try:
            build_model(defaults["model"], load_dataset(defaults["dataset"], defaults.get("data_dir")))
        except (ValueError, FileNotFoundError) as error:
            raise sweep.source.error(task.path, str(error).splitlines()[0]) from None


def check_layer_rules(sweep: SweepConfig, trials: list[Trial]) -> None:
    """Every per-layer rule matches some GEMM of its task's model (an error names the rule's line)."""
    from dse.data import load_dataset
    from dse.precision import TensorFormats, resolve_layers
    from dse.train.functional import model_layers
    from models.proxies import build_model

    for task in sweep.tasks:
        rule_sets = {trial.config.layers for trial in trials
                     if trial.task == task.name and trial.config.layers}
        if not rule_sets:
            continue
        defaults = task.defaults
        data = load_dataset(defaults["dataset"], defaults.get("data_dir"))
        layers = model_layers(build_model(defaults["model"], data), data.x_train[:2])
        for rules in rule_sets:
            resolve_layers(layers, rules, TensorFormats())


def check_trials(sweep: SweepConfig, trials: list[Trial]) -> None:
    """Each trial's configuration can run (the combination of its fields: e.g. LNS-Madam with a
    non-LNS master copy), reported at its trial entry."""
    from dse.train.loop import check_config

    for trial in trials:
        try:
            check_config(trial.config)
        except ValueError as error:
            raise sweep.source.error(trial.source, f"{trial.label!r}: {str(error).splitlines()[0]}") from None


def plan_sweep(sweep: SweepConfig) -> tuple[list[Trial], dict[str, str], EnergyRows]:
    """Everything checked before the disk is touched: tasks, trials, baseline, the energy of every trial."""
    check_tasks(sweep)
    trials = expand(sweep)
    check_trials(sweep, trials)
    check_layer_rules(sweep, trials)
    baseline_labels(sweep, trials)
    keys, energies = estimate_energies(sweep, trials)
    return trials, keys, energies


def unique_runs(trials: list[Trial]) -> list[Trial]:
    """One trial per trial id (a run two configurations share is trained once), in plan order."""
    return list({trial.trial_id: trial for trial in reversed(trials)}.values())[::-1]


def check_output(directory: Path, name: str, force: bool) -> bool:
    """Can the sweep write here? Returns True if an existing store of another sweep is to be replaced."""
    if directory.exists() and not directory.is_dir():
        raise InputError(f"output path {str(directory)!r} exists and is not a directory")
    ancestor = directory
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"cannot create output directory {str(directory)!r}: {str(ancestor)!r} is not a "
                         "directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to output directory {str(directory)!r}: permission denied on "
                         f"{str(ancestor)!r}")
    stored = stored_sweep_name(directory) if directory.is_dir() else None
    if stored is not None and stored != name:
        if not force:
            raise InputError(f"{str(directory)!r} holds the results of sweep {stored!r}, not {name!r}: set "
                             "another output path (output: or --output) or pass --force to replace them")
        return True
    return False


def make_executor(sweep: SweepConfig) -> Executor:
    settings = sweep.executor
    if settings.backend == "ray":
        return RayExecutor(settings.workers, settings.threads, settings.address)
    return LocalExecutor(settings.workers, settings.threads)


def _row(trial: Trial, outcome: TrialOutcome) -> TrialRow:
    config = trial.config
    formats = resolved_formats(config)
    result = outcome.result
    extra: dict[str, Any] = {}
    validation = None
    if result is None:
        status, diverged, accuracy, loss = "error", False, None, None
        wall = outcome.wall_time_s
        extra["traceback"] = outcome.traceback
    else:
        diverged = bool(result.get("diverged", False))
        status = "diverged" if diverged else "ok"
        accuracy = float(result["test_accuracy"])
        if result.get("val_accuracy") is not None:
            validation = float(result["val_accuracy"])
        loss = float(result["final_loss"])
        wall = float(result.get("wall_time_s", outcome.wall_time_s))
        extra = {k: v for k, v in result.items() if k != "config"}
    values = {
        "trial_id": trial.trial_id, "task": trial.task, "label": trial.label, "model": config.model,
        "dataset": config.dataset, "weights": formats["weights"], "activations": formats["activations"],
        "gradients": formats["gradients"], "weight_grads": formats["weight_grads"],
        "optimizer": config.optimizer, "master_weights": master_weights_text(config.master_weights),
        "warmup_epochs": config.warmup_epochs, "seed": config.seed, "status": status,
        "diverged": int(diverged), "error": outcome.error, "val_accuracy": validation,
        "test_accuracy": accuracy, "final_loss": loss,
        "wall_time_s": wall, "config": json.dumps(config.to_dict(), sort_keys=True),
        "result": json.dumps(extra, sort_keys=True, default=str),
    }
    return TrialRow(values)


def _job(group: list[Trial], threads: int, train_fn: TrainFn | None) -> TrialJob | GroupJob:
    jobs = tuple(TrialJob(t.trial_id, t.config.to_dict(), threads, train_fn,
                          sources_of([t.config.model, t.config.dataset])) for t in group)
    return jobs[0] if len(jobs) == 1 else GroupJob(jobs)


def _record(trial: Trial, row: TrialRow) -> TrialRecord:
    accuracy = row.values["test_accuracy"]
    return TrialRecord(trial.trial_id, trial.task, trial.label, trial.config.seed, row.values["status"],
                       math.nan if accuracy is None else float(accuracy), row.values["error"],
                       float(row.values["wall_time_s"]))


def better_than(record: TrialRecord, best: TrialRecord | None) -> bool:
    """Whether a finished trial beats the best so far (an ok trial with a higher test accuracy)."""
    return record.status == "ok" and not math.isnan(record.test_accuracy) and (
        best is None or record.test_accuracy > best.test_accuracy)


# --- the run --------------------------------------------------------------------------------------

def run_sweep(sweep: SweepConfig, *, force: bool = False, reporter: Reporter | None = None,
              train_fn: TrainFn | None = None, executor: Executor | None = None,
              reports: bool = True) -> SweepSummary:
    """Run every unfinished trial of `sweep`, commit each as it finishes, then write the reports.

    Trials of one configuration train in groups (`plan_groups`, executor.group_size).
    `train_fn` replaces dse.train.loop.train (tests; it trains one trial, so nothing is grouped);
    `executor` replaces the configured one;
    `reports=False` skips dse.report.write_reports.
    """
    started = time.perf_counter()
    reporter = reporter or SilentReporter()
    if executor is None and sweep.executor.backend == "local" and _has_work(sweep, force):
        start_worker_server()  # its imports overlap the planning below
    trials, keys, energies = plan_sweep(sweep)
    runs = unique_runs(trials)
    groups, notes = plan_groups(runs, sweep.executor.group_size if train_fn is None else 1)
    directory = sweep.output
    replace_foreign = check_output(directory, sweep.name, force)
    executor = executor or make_executor(sweep)
    if isinstance(executor, RayExecutor):
        executor.connect()
    try:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            store = SweepStore(directory)
        except OSError as error:
            raise InputError(f"cannot create output directory {str(directory)!r}: {error.strerror}") from None
        with store:
            if replace_foreign:
                store.reset()
            ids = [trial.trial_id for trial in runs]
            meta = {"name": sweep.name, "config_yaml": sweep.text, "workloads": list(sweep.energy.columns),
                    "energy": sweep.energy.describe(), "memory_objective": sweep.memory_objective,
                    "baselines": baseline_labels(sweep, trials),
                    "config_hash": stable_hash({"trials": ids, "energy": sweep.energy.describe(),
                                                "workloads": list(sweep.energy.columns)})}
            plan = [PlanRow(t.trial_id, t.task, t.label, keys[t.trial_id], t.configuration, t.tuning)
                    for t in trials]
            store.start(meta, plan, energies)
            finished = store.finished()
            # a group with any member missing reruns whole; only the missing members are stored
            groups = [g for g in groups if force or any(t.trial_id not in finished for t in g)]
            wanted = {t.trial_id for g in groups for t in g if force or t.trial_id not in finished}
            summary = SweepSummary(sweep.name, directory, total=len(runs),
                                   skipped=len(runs) - len(wanted), ran=0, notes=notes)
            summary.best = _best_of(load_trials(directory)) if summary.skipped else None
            by_id = {trial.trial_id: trial for group in groups for trial in group}

            def on_done(outcome: TrialOutcome) -> None:
                if outcome.trial_id not in wanted:
                    return
                wanted.discard(outcome.trial_id)
                trial = by_id[outcome.trial_id]
                row = _row(trial, outcome)
                store.record(row)
                record = _record(trial, row)
                summary.ran += 1
                reporter.trial_done(record)

            threads = sweep.executor.threads
            longest_first = sorted(groups, key=lambda g: -sum(estimated_cost(t.config) for t in g))  # stable
            jobs = [_job(group, threads, train_fn) for group in longest_first]
            reporter.start(len(trials), summary.skipped, summary.best)
            try:
                executor.run(jobs, on_done)
            finally:
                reporter.stop()
    finally:
        if isinstance(executor, RayExecutor):
            executor.close()
    frame = load_trials(directory)
    counts = frame.drop_duplicates("trial_id")["status"].value_counts()
    summary.ok, summary.diverged, summary.errors = (int(counts.get(status, 0))
                                                    for status in ("ok", "diverged", "error"))
    summary.best = _best_of(frame)
    if reports:
        from dse.report.files import write_reports_if_changed

        summary.files = write_reports_if_changed(frame, directory, sweep.memory_objective)
    summary.wall_time_s = time.perf_counter() - started
    return summary


def _has_work(sweep: SweepConfig, force: bool) -> bool:
    """Whether some trial of the sweep is not in its store yet (read only; False on bad input, which
    planning reports)."""
    try:
        ids = {trial.trial_id for trial in expand(sweep)}
        stored = set(load_trials(sweep.output)["trial_id"]) if sweep.output.is_dir() else set()
    except (ValueError, OSError):
        return False
    return force or not ids <= stored


def _best_of(frame: Any) -> TrialRecord | None:
    """The ok trial with the highest test accuracy in a load_trials frame, among the trials at each
    configuration's chosen tuning point (the point validation chose; the test set chooses nothing)."""
    from dse.report.tables import chosen_trials

    frame = chosen_trials(frame)
    ok = frame[(frame["status"] == "ok") & frame["test_accuracy"].notna()]
    if ok.empty:
        return None
    row = ok.loc[ok["test_accuracy"].idxmax()]
    return TrialRecord(row["trial_id"], row["task"], row["label"], int(row["seed"]), "ok",
                       float(row["test_accuracy"]), "", float(row["wall_time_s"]))


__all__ = ["InlineExecutor", "SweepSummary", "TrialRecord", "run_sweep"]
