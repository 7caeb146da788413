"""What a sweep run tells its caller: the counts by status, the best trial, the notes and the report
files (SweepSummary), and what its progress display is told as trials finish (Reporter).

Read from the store alone (pandas, no torch), so that a rerun with nothing to train (dse.sweep.receipt)
reports exactly what a full run reports without planning the sweep again.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dse.sweep.store import load_trials

if TYPE_CHECKING:
    from dse.report.drawing import FigureProcesses


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
    val_accuracy: float = math.nan
    """Accuracy on the validation split: what the best trial is chosen by (NaN: none reported)."""


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
    """The finished trial with the best validation accuracy, now or earlier (`better_than`)."""
    wall_time_s: float = 0.0
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Configurations whose trials trained one by one instead of in groups, and why."""
    trials: Any = field(default=None, repr=False, compare=False)
    """The store's trials (load_trials) as `conclude` read them once the run was over."""
    tables: Any = field(default=None, repr=False, compare=False)
    """The trials' dse.report.SweepTables where `conclude` built them to write the reports (None: the
    files were current, or not asked for): the command line prints the fronts from them."""


def accuracy_or_nan(value: Any) -> float:
    return math.nan if value is None else float(value)


def better_than(record: TrialRecord, best: TrialRecord | None) -> bool:
    """Whether a finished trial beats the best so far: an ok trial with a higher validation accuracy.

    Validation chooses, as it chooses tuning points; the test accuracy is reported, never compared (a
    trial without a validation accuracy is never the best)."""
    return record.status == "ok" and not math.isnan(record.val_accuracy) and (
        best is None or record.val_accuracy > best.val_accuracy)


def summarize(summary: SweepSummary, frame: Any) -> None:
    """The counts by status and the best trial of the whole store (this run and earlier ones)."""
    counts = frame.drop_duplicates("trial_id")["status"].value_counts()
    summary.ok, summary.diverged, summary.errors = (int(counts.get(status, 0))
                                                    for status in ("ok", "diverged", "error"))
    summary.best = best_of(frame)


def best_of(frame: Any) -> TrialRecord | None:
    """The ok trial with the highest validation accuracy in a load_trials frame (`better_than`), among
    the trials at each configuration's chosen tuning point (the point validation chose)."""
    from dse.report.tables import chosen_trials

    frame = chosen_trials(frame)
    ok = frame[(frame["status"] == "ok") & frame["val_accuracy"].notna()]
    if ok.empty:
        return None
    row = ok.loc[ok["val_accuracy"].idxmax()]
    return TrialRecord(row["trial_id"], row["task"], row["label"], int(row["seed"]), "ok",
                       accuracy_or_nan(row["test_accuracy"]), "", float(row["wall_time_s"]),
                       float(row["val_accuracy"]))


def conclude(summary: SweepSummary, memory_objective: bool, reports: bool, started: float,
             frame: Any = None, figures: FigureProcesses | None = None) -> SweepSummary:
    """Fill in what the store holds once the run is over: the counts and the best trial, the report files
    (written unless they are current: dse.report.files.write_reports_if_changed, whose tables it
    keeps; the figures drawn by `figures` where given) where `reports`, and the wall time since
    `started` (time.perf_counter).
    `frame`: the store's load_trials, where the caller read it after the last trial was stored (else
    it is read here)."""
    if frame is None:
        frame = load_trials(summary.output)
    summary.trials = frame
    summarize(summary, frame)
    if reports:
        from dse.report.files import write_reports_if_changed

        summary.files, summary.tables = write_reports_if_changed(frame, summary.output, memory_objective,
                                                                 figures=figures)
    summary.wall_time_s = time.perf_counter() - started
    return summary
