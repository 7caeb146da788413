"""A sweep from a validated config to a filled store and reports.

Order matters for "nothing written on bad input": expand the trials, estimate every configuration's
energy, check the output path and (for Ray) reach the cluster, and only then create the directory and
the store. The output folder's lock (one sweep at a time, dse/sweep/lock.py) is taken before planning
where the folder exists, else with the directory (and the folder checked again under it). Each
finished trial is committed as it arrives; rerunning skips what is finished (resume), `force=True`
reruns it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dse.errors import InputError, Problems
from dse.interrupts import signals_interrupt
from dse.report.drawing import FigureProcesses
from dse.sweep import lock
from dse.sweep.config import SweepConfig
from dse.sweep.energy import EnergyEstimator, energy_key, warmup_config, warmup_energy_key
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
    worker_server_running,
)
from dse.sweep.groups import DeviceShare, device_shares, plan_groups
from dse.sweep.interrupt import SweepInterrupted
from dse.sweep.receipt import plan_receipt
from dse.sweep.store import (
    PlanRow,
    SweepStore,
    TrialRow,
    load_trials,
    master_weights_text,
    store_path,
    store_problem,
    stored_sweep_name,
)
from dse.sweep.summary import (
    Reporter,
    SilentReporter,
    SweepSummary,
    TrialRecord,
    accuracy_or_nan,
    best_of,
    conclude,
)
from dse.sweep.trials import Trial, baseline_labels, estimated_cost, expand, resolved_formats, stable_hash
from dse.train.loop import check_batch_size
from dse.usercode import sources_of

# --- preparation ----------------------------------------------------------------------------------

EnergyRows = dict[tuple[str, str], dict[str, float]]
"""(energy key, workload) -> WorkloadEnergy.as_row()."""


def estimate_energies(sweep: SweepConfig, trials: list[Trial], samples: dict[str, int] | None = None
                      ) -> tuple[dict[str, str], EnergyRows]:
    """(trial_id -> energy key, (energy key, workload) -> values) for every trial's configuration and
    the configuration of its warm-up (warmup_config), if it has one. `samples`: each task's training
    samples (`check_tasks`), so that pricing an epoch's batches loads no dataset again."""
    rows = {(trial.config.dataset, trial.config.data_dir): samples[trial.task]
            for trial in trials if samples is not None and trial.task in samples}
    estimator = EnergyEstimator(sweep.energy, rows)
    keys: dict[str, str] = {}
    energies: EnergyRows = {}
    problems = Problems()
    for trial in trials:
        keys[trial.trial_id] = energy_key(trial.config, sweep.energy)
        warmup = warmup_config(trial.config)
        for config in (trial.config, *([warmup] if warmup is not None else [])):
            key = energy_key(config, sweep.energy)
            if (key, sweep.energy.columns[0]) in energies:
                continue
            try:
                estimates = estimator.estimate(config)
            except ValueError as error:
                message = str(error).splitlines()[0]
                problems.add(str(sweep.source.error(trial.source, f"energy of {trial.label!r}: {message}")))
                break
            for workload, estimate in estimates.items():
                energies[(key, workload)] = estimate.as_row()
    problems.raise_any()
    return keys, energies


def check_tasks(sweep: SweepConfig) -> dict[str, int]:
    """Each task's dataset loads and its model fits it (a file dataset needs its data_dir); returns each
    task's number of training samples (after the validation split)."""
    from dse.data import load_dataset, with_validation
    from dse.models.proxies import build_model

    problems = Problems()
    samples: dict[str, int] = {}
    for task in sweep.tasks:
        defaults = task.defaults
        try:
            data = load_dataset(defaults["dataset"], defaults.get("data_dir"))
            build_model(defaults["model"], data)
            samples[task.name] = len(with_validation(data).x_train)
        except (ValueError, FileNotFoundError) as error:
            problems.add(str(sweep.source.error(task.path, str(error).splitlines()[0])))
    problems.raise_any()
    return samples


def check_layer_rules(sweep: SweepConfig, trials: list[Trial]) -> None:
    """Every per-layer rule matches some GEMM of its task's model (an error names the rule's line)."""
    from dse.data import load_dataset
    from dse.models.proxies import build_model
    from dse.precision import TensorFormats, resolve_layers
    from dse.train.functional import model_layers

    problems = Problems()
    for task in sweep.tasks:
        rule_sets = {trial.config.layers for trial in trials
                     if trial.task == task.name and trial.config.layers}
        if not rule_sets:
            continue
        defaults = task.defaults
        data = load_dataset(defaults["dataset"], defaults.get("data_dir"))
        layers = model_layers(build_model(defaults["model"], data), data.x_train[:2])
        for rules in rule_sets:
            problems.attempt(resolve_layers, layers, rules, TensorFormats())
    problems.raise_any()


def check_trials(sweep: SweepConfig, trials: list[Trial], samples: dict[str, int]) -> None:
    """Each trial's configuration can run (the combination of its fields: e.g. LNS-Madam with a
    non-LNS master copy; a batch no larger than the training set), reported at its trial entry."""
    from dse.train.loop import check_config

    problems = Problems()
    for trial in trials:
        try:
            check_config(trial.config)
            check_batch_size(trial.config.batch_size, samples.get(trial.task), trial.config.dataset)
        except ValueError as error:
            problems.add(str(sweep.source.error(trial.source,
                                                f"{trial.label!r}: {str(error).splitlines()[0]}")))
    problems.raise_any()


def plan_sweep(sweep: SweepConfig) -> tuple[list[Trial], dict[str, str], EnergyRows]:
    """Everything checked before the disk is touched: tasks, trials, baseline, the energy of every trial.
    Every problem is reported at once (one line each)."""
    samples = check_tasks(sweep)
    trials = expand(sweep)
    problems = Problems()
    problems.attempt(check_trials, sweep, trials, samples)
    problems.attempt(check_layer_rules, sweep, trials)
    problems.attempt(baseline_labels, sweep, trials)
    energies = problems.attempt(estimate_energies, sweep, trials, samples)
    problems.raise_any()
    assert energies is not None
    keys, rows = energies
    return trials, keys, rows


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
        return RayExecutor(settings.workers, settings.threads, settings.address, settings.retries)
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


def _job(group: list[Trial], threads: int, train_fn: TrainFn | None, shares: dict[str, DeviceShare]
         ) -> TrialJob | GroupJob:
    jobs = tuple(TrialJob(t.trial_id, t.config.to_dict(), threads, train_fn,
                          sources_of([t.config.model, t.config.dataset])) for t in group)
    if len(jobs) == 1:
        return jobs[0]
    share = shares.get(group[0].config.device)  # the memory plan_groups split by, so nothing splits again
    return GroupJob(jobs, *((share.available_bytes, share.groups_at_once) if share else (None, None)))


def _record(trial: Trial, row: TrialRow) -> TrialRecord:
    values = row.values
    return TrialRecord(trial.trial_id, trial.task, trial.label, trial.config.seed, values["status"],
                       accuracy_or_nan(values["test_accuracy"]), values["error"],
                       float(values["wall_time_s"]), accuracy_or_nan(values["val_accuracy"]))


# --- the run --------------------------------------------------------------------------------------

def run_sweep(sweep: SweepConfig, *, force: bool = False, retry_failed: bool = False,
              reporter: Reporter | None = None, train_fn: TrainFn | None = None,
              executor: Executor | None = None, reports: bool = True,
              invocation: dict[str, Any] | None = None) -> SweepSummary:
    """Run every unfinished trial of `sweep`, commit each as it finishes, then write the reports.

    The steps: plan (every check, nothing written), acquire the executor (a Ray cluster is reached
    before the disk is touched), open the store, execute, summarize, report. Trials of one
    configuration train in groups (`plan_groups`, executor.group_size or each model's default).
    `force` reruns every trial; `retry_failed` reruns the trials stored as failed (status error).
    `train_fn` replaces dse.train.loop.train (tests; it trains one trial, so nothing is grouped);
    `executor` replaces the configured one; `reports=False` skips dse.report.write_reports.
    `invocation`: what the command line was given (dse.sweep.receipt.invocation); the store then keeps
    the plan's receipt, with which the same command, run again with nothing to train, skips planning.

    SIGINT, SIGTERM and SIGHUP stop the run (dse/sweep/interrupt.py): the workers are stopped, what was
    committed stays, and SweepInterrupted says how many trials the store holds.
    """
    with signals_interrupt():
        return _run_sweep(sweep, force=force, retry_failed=retry_failed, reporter=reporter,
                          train_fn=train_fn, executor=executor, reports=reports, invocation=invocation)


def _run_sweep(sweep: SweepConfig, *, force: bool, retry_failed: bool, reporter: Reporter | None,
               train_fn: TrainFn | None, executor: Executor | None, reports: bool,
               invocation: dict[str, Any] | None) -> SweepSummary:
    started = time.perf_counter()
    with contextlib.ExitStack() as held:
        # another sweep on this folder: refused before planning, where the folder is there to lock
        locked = sweep.output.is_dir() and _lock(sweep.output, held, or_later=True)
        if (executor is None and sweep.executor.backend == "local" and not worker_server_running()
                and _has_work(sweep, force, retry_failed)):
            start_worker_server()  # its imports overlap the planning below
        trials, keys, energies = plan_sweep(sweep)
        runs = unique_runs(trials)
        group_size = sweep.executor.group_size if train_fn is None else 1
        shares = device_shares(runs, sweep.executor) if group_size != 1 else {}
        groups, notes = plan_groups(runs, group_size, shares=shares)
        replace_foreign = check_output(sweep.output, sweep.name, force)
        with FigureProcesses() as figures:
            with contextlib.ExitStack() as opened:
                acquired = opened.enter_context(executor or make_executor(sweep))  # (Ray: reached first)
                if not locked:
                    make_output_directory(sweep.output)
                    _lock(sweep.output, held)
                    # another sweep may have made the folder and stored its results there since the
                    # check above (while this one planned or reached Ray): checked again under the lock
                    replace_foreign = check_output(sweep.output, sweep.name, force)
                store = opened.enter_context(open_store(sweep.output))
                if replace_foreign:
                    store.reset()
                plan = [PlanRow(t.trial_id, t.task, t.label, keys[t.trial_id], t.configuration, t.tuning,
                                warmup_energy_key(t.config, sweep.energy)) for t in trials]
                receipt = (None if invocation is None or train_fn is not None
                           else plan_receipt(sweep, invocation))
                meta = {**_store_meta(sweep, trials, runs, notes), "receipt": receipt}
                try:
                    store.start(meta, plan, energies)
                except sqlite3.Error as error:  # (rolled back: the store is as it was)
                    raise InputError(store_problem(store.path, error)
                                     or f"cannot write {store.path}: {error}") from None
                summary = execute_trials(sweep, trials, runs, groups, store, acquired,
                                         rerun=_rerun(store, force, retry_failed), train_fn=train_fn,
                                         reporter=reporter or SilentReporter(), shares=shares,
                                         on_core_idle=figures.prepare if reports else None)
            summary.notes = notes + summary.notes
            return conclude(summary, sweep.memory_objective, reports, started, figures=figures)


def _lock(directory: Path, held: contextlib.ExitStack, *, or_later: bool = False) -> bool:
    """Hold `directory`'s sweep lock (dse/sweep/lock.py) in `held`; InputError where another sweep holds it.
    Where the lock file cannot be made: False with `or_later` (an unwritable folder, which check_output
    names after planning), else an InputError."""
    try:
        held.enter_context(lock.holding(directory))
    except OSError as error:
        if or_later:
            return False
        raise InputError(f"cannot write to output directory {str(directory)!r}: cannot make "
                         f"{lock.lock_path(directory)} ({error.strerror or error})") from None
    return True


def make_output_directory(directory: Path) -> None:
    """Create the sweep's output folder with its parents (after every check has passed)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create output directory {str(directory)!r}: {error.strerror}") from None


def open_store(directory: Path) -> SweepStore:
    """The sweep's store in `directory`, created with its folders (after every check has passed)."""
    make_output_directory(directory)
    path = store_path(directory)
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):  # (SQLite would open it read-only)
        raise InputError(f"cannot write {path}: permission denied (a sweep records its trials there; "
                         "nothing was written)")
    try:
        return SweepStore(directory)
    except sqlite3.Error as error:
        raise InputError(store_problem(path, error) or f"cannot open {path}: {error}") from None


def _store_meta(sweep: SweepConfig, trials: list[Trial], runs: list[Trial], group_notes: list[str]
                ) -> dict[str, Any]:
    ids = [trial.trial_id for trial in runs]
    return {"name": sweep.name, "group_notes": group_notes, "config_yaml": sweep.text,
            "workloads": list(sweep.energy.columns),
            "energy": sweep.energy.describe(), "memory_objective": sweep.memory_objective,
            "baselines": baseline_labels(sweep, trials),
            "config_hash": stable_hash({"trials": ids, "energy": sweep.energy.describe(),
                                        "workloads": list(sweep.energy.columns)})}


def _rerun(store: SweepStore, force: bool, retry_failed: bool) -> Callable[[str], bool]:
    """Whether a trial is to run: not yet stored, or stored and rerun by --force (every trial) or
    --retry-failed (the trials that failed)."""
    statuses = store.statuses()
    if force:
        return lambda trial_id: True
    return lambda trial_id: trial_id not in statuses or (retry_failed and statuses[trial_id] == "error")


def execute_trials(sweep: SweepConfig, trials: list[Trial], runs: list[Trial], groups: list[list[Trial]],
                   store: SweepStore, executor: Executor, *, rerun: Callable[[str], bool],
                   train_fn: TrainFn | None, reporter: Reporter,
                   shares: dict[str, DeviceShare] | None = None,
                   on_core_idle: Callable[[], None] | None = None) -> SweepSummary:
    """Train the trials `rerun` asks for (longest groups first), committing each as it arrives; a
    group's job carries its device's share (`shares`, as plan_groups split by). `on_core_idle` is
    called once, when fewer jobs are left than the executor has workers (one of them has nothing
    left to do: the sweep's tail), if there is any job at all."""
    # a group with any member to run reruns whole; only the members to run are stored
    groups = [g for g in groups if any(rerun(t.trial_id) for t in g)]
    wanted = {t.trial_id for g in groups for t in g if rerun(t.trial_id)}
    summary = SweepSummary(sweep.name, sweep.output, total=len(runs), skipped=len(runs) - len(wanted), ran=0)
    best = best_of(load_trials(sweep.output)) if summary.skipped else None
    by_id = {trial.trial_id: trial for group in groups for trial in group}

    unsupported: list[tuple[Trial, TrialOutcome]] = []
    """Trials this torch or device cannot run: not stored; the others run on, and the sweep then stops
    naming the first (stopping at once, a resume would meet the same trial first and never finish the
    others)."""

    def on_done(outcome: TrialOutcome) -> None:
        job_left.check(outcome.trial_id)
        if outcome.trial_id not in wanted:
            return
        wanted.discard(outcome.trial_id)
        trial = by_id[outcome.trial_id]
        if outcome.unsupported:  # not the trial's result: stored, it would not run again on resume
            unsupported.append((trial, outcome))
            return
        row = _row(trial, outcome)
        store.record(row)
        summary.ran += 1
        note = f"{trial.task}: {trial.label}: {outcome.note}" if outcome.note else ""
        if note and note not in summary.notes:
            summary.notes.append(note)
        reporter.trial_done(_record(trial, row))

    threads = sweep.executor.threads
    longest_first = sorted(groups, key=lambda g: -sum(estimated_cost(t.config) for t in g))  # stable
    jobs = [_job(group, threads, train_fn, shares or {}) for group in longest_first]
    job_left = _JobsLeft(longest_first, sweep.executor.workers, on_core_idle)
    reporter.start(len(trials), summary.skipped, best)
    try:
        executor.run(jobs, on_done)
    except KeyboardInterrupt as error:  # the executor has stopped its workers
        # counted in the store: the signal may have come between a trial's commit and its count
        statuses = store.statuses()
        stored = sum(trial.trial_id in statuses for trial in runs)
        raise SweepInterrupted(SweepInterrupted.of(error).signal_number, stored=stored,
                               total=summary.total) from None
    finally:
        reporter.stop()
    if unsupported:
        trial, outcome = unsupported[0]
        more = len(unsupported) - 1
        others = f" and {more} more trial{'s' * (more > 1)}" if more else ""
        raise InputError(f"trial {trial.trial_id} ({trial.task}: {trial.label}){others}: {outcome.error}; "
                         "not stored (every other trial finished and is stored)")
    return summary


class _JobsLeft:
    """Counts a run's jobs down as their trials come back, and calls `on_core_idle` once when fewer
    are left than there are `workers` (at once if there are fewer from the start)."""

    def __init__(self, groups: list[list[Trial]], workers: int,
                 on_core_idle: Callable[[], None] | None) -> None:
        self.members = {trial.trial_id: index for index, group in enumerate(groups) for trial in group}
        self.left = [len(group) for group in groups]
        self.jobs = len(groups)
        self.workers = workers
        self.on_core_idle = on_core_idle if groups else None
        self._maybe_idle()

    def check(self, trial_id: str) -> None:
        index = self.members.pop(trial_id, None)
        if index is None:
            return
        self.left[index] -= 1
        if self.left[index] == 0:
            self.jobs -= 1
            self._maybe_idle()

    def _maybe_idle(self) -> None:
        if self.on_core_idle is not None and self.jobs < self.workers:
            on_core_idle, self.on_core_idle = self.on_core_idle, None
            on_core_idle()


def _has_work(sweep: SweepConfig, force: bool, retry_failed: bool) -> bool:
    """Whether some trial of the sweep is not in its store yet, or failed there and is retried (read
    only; False on bad input, which planning reports)."""
    try:
        ids = {trial.trial_id for trial in expand(sweep)}
        frame = load_trials(sweep.output) if sweep.output.is_dir() else None
    except (ValueError, OSError):
        return False
    if frame is not None and retry_failed:
        frame = frame[frame["status"] != "error"]
    stored = set() if frame is None else set(frame["trial_id"])
    return force or not ids <= stored


__all__ = ["InlineExecutor", "SweepSummary", "TrialRecord", "run_sweep"]
