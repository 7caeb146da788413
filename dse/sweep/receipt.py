"""A sweep's receipt: what its plan was made from, so that the same `dse sweep` command, run again with
nothing left to train, answers from the store without planning the sweep again.

Planning (dse.sweep.runner.plan_sweep) validates the file, loads each task's dataset, builds and traces
its model for the energy model and prices every configuration: it needs torch, whose import alone is
1.3 s on 2 cores, most of such a rerun. With every plan the command records a receipt in the store:
the sweep file (its path and the sha256 of its text), the working folder (a relative output path
resolves against it), the overrides that change what is stored (--output, --group-size) and the
fingerprint of the code that planned it (dse's sources and energy tables, and the versions of the
libraries its numbers come from). When the same command runs again, every trial of the stored plan is
stored (and --force is not given; with --retry-failed, none of them failed) and the receipt is the
same, a full run would rewrite the same plan and energies into the store and find nothing to train:
`finished_sweep` says so, and `conclude_finished` gives the summary, notes and report files the full
run gives.

A sweep that reads files besides its own (a data_dir or a file dataset, a user's model, dataset or
workload code, an energy table or a workload file) gets no receipt: whether those changed is not
cheap to tell, so each of its runs plans in full. So does a run through the Python API (run_sweep
without `invocation`), and its store then holds no receipt.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dse.digests import file_sha256, sha256_hex, sha256_of_parts
from dse.sweep import lock
from dse.sweep.store import StoredProgress, output_directory, stored_progress
from dse.sweep.summary import Reporter, SweepSummary, best_of, conclude
from dse.usercode import is_ref
from dse.yaml_lines import file_text, load_yaml

if TYPE_CHECKING:
    from dse.sweep.config import SweepConfig

LIBRARIES: tuple[str, ...] = ("torch", "numpy", "pandas", "pydantic", "pyyaml")
"""Libraries whose version is part of the code fingerprint: training, the energy model's arithmetic
and tables, and the validation of the sweep file."""


def invocation(config: Path, output: Path | None, group_size: int | None) -> dict[str, Any]:
    """What a `dse sweep` command was given that decides its plan and its store, besides the file's text."""
    return {"file": str(Path(config).resolve()), "cwd": os.getcwd(),
            "output": None if output is None else str(output), "group_size": group_size}


def _code_files() -> list[Path]:
    """dse's package, its models, its command line and its energy tables (in a checkout they sit beside
    dse/; installed, inside it)."""
    from dse.energy.tables import tables_dir

    roots = [Path(__file__).resolve().parents[1]]
    for name in ("dse.models", "dse.cli"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin is not None:
            origin = Path(spec.origin).resolve()
            roots.append(origin.parent if origin.name == "__init__.py" else origin)
    roots.append(tables_dir().resolve())
    files: set[Path] = set()
    for root in roots:
        candidates = root.rglob("*") if root.is_dir() else [root]
        files.update(path for path in candidates if path.is_file() and "__pycache__" not in path.parts)
    return sorted(files)


def code_fingerprint() -> str:
    """sha256 of every file of dse's code and tables (path and bytes) and of LIBRARIES' versions."""
    return sha256_of_parts([*(f"{path}\0{file_sha256(path)}\n" for path in _code_files()),
                            *(f"{name}=={importlib.metadata.version(name)}\n" for name in LIBRARIES)])


def reads_other_files(sweep: SweepConfig) -> bool:
    """Whether planning the sweep reads a file besides the sweep file and dse's own."""
    from dse.data import FILE_DATASETS

    for task in sweep.tasks:
        defaults = task.defaults
        if (defaults.get("data_dir") is not None or defaults.get("dataset") in FILE_DATASETS
                or is_ref(defaults.get("model")) or is_ref(defaults.get("dataset"))):
            return True
    return sweep.energy.table is not None or bool(sweep.energy.sources)


def plan_receipt(sweep: SweepConfig, given: dict[str, Any]) -> dict[str, Any] | None:
    """The receipt a plan of `sweep`, run by a command that was `given` this (`invocation`), leaves in the
    store; None where the sweep reads other files."""
    if reads_other_files(sweep):
        return None
    return {**given, "text_sha256": sha256_hex(sweep.text), "code": code_fingerprint()}


@dataclass(frozen=True)
class FinishedSweep:
    """A stored sweep that the command asks for again with nothing left to train."""

    name: str
    output: Path
    memory_objective: bool
    planned: int
    """Rows of the plan (what the progress display counts)."""
    runs: int
    """Distinct trials of the plan."""
    notes: list[str]
    """The group notes of the plan (configurations trained one by one, and why)."""


@dataclass(frozen=True)
class SweepOnDisk:
    """The sweep file and its store as `dse sweep` reads them before it plans: the file's text
    (dse.yaml_lines.file_text of its bytes: what load_config validates and the receipt hashes) and
    plain YAML (the full validation is the plan's), its output directory, and the store there as a
    rerun sees it (None: there is none). Read once, it serves `finished_sweep`, `likely_to_train` and
    load_config."""

    text: str
    data: dict[str, Any]
    directory: Path
    stored: StoredProgress | None


def read_sweep(config: Path, output: Path | None) -> SweepOnDisk | None:
    """The sweep file and its store, read as far as plain YAML tells; None where that fails (load_yaml's
    bounds included: an alias bomb is load_config's error to report, not a hang here)."""
    try:
        text = file_text(Path(config).read_bytes())
        data, _ = load_yaml(text, str(config))
        if not isinstance(data, dict):
            return None
        name = data.get("name") if data.get("name") is not None else Path(config).stem
        directory = output if output is not None else output_directory(data.get("output"), str(name))
        return SweepOnDisk(text, data, directory, stored_progress(directory))
    except (OSError, ValueError, TypeError):
        return None


_UNREAD: Any = object()
"""The default of `on_disk` below: read the sweep file and its store now."""


def likely_to_train(config: Path, output: Path | None, force: bool,
                    on_disk: SweepOnDisk | None = _UNREAD) -> bool:
    """Whether `dse sweep config` will most likely train on local workers: its executor is local and it is
    forced, or its store is missing, holds another text of the file, or lacks a planned trial. The
    command then starts the workers' fork server (seconds of imports) before it plans, instead of
    after; run_sweep decides for certain. `on_disk`: `read_sweep(config, output)` where the caller
    read it already."""
    read = read_sweep(config, output) if on_disk is _UNREAD else on_disk
    if read is None:
        return False
    executor = read.data.get("executor")
    if isinstance(executor, dict) and executor.get("backend", "local") != "local":
        return False
    stored = read.stored
    if force or stored is None:
        return True
    try:
        receipt = json.loads(stored.meta.get("receipt", "null"))
    except ValueError:
        receipt = None
    text_changed = not isinstance(receipt, dict) or receipt.get("text_sha256") != sha256_hex(read.text)
    return text_changed or any(trial_id not in stored.statuses for trial_id in stored.planned)


def finished_sweep(config: Path, output: Path | None, group_size: int | None, retry_failed: bool,
                   on_disk: SweepOnDisk | None = _UNREAD) -> FinishedSweep | None:
    """The stored sweep if `dse sweep config` with these options would find nothing to train and rewrite
    nothing but the same plan (see the module docstring); else None, and the command plans in full
    (which also reports any problem with the file). `on_disk`: as for `likely_to_train`."""
    read = read_sweep(config, output) if on_disk is _UNREAD else on_disk
    if read is None or read.stored is None:
        return None
    stored, directory = read.stored, read.directory
    try:
        receipt = json.loads(stored.meta.get("receipt", "null"))
        expected = {**invocation(config, output, group_size), "text_sha256": sha256_hex(read.text)}
        if not isinstance(receipt, dict) or {key: receipt.get(key) for key in expected} != expected:
            return None
        if receipt.get("code") != code_fingerprint() or not stored.planned:
            return None
        statuses = stored.statuses
        if any(trial_id not in statuses or (retry_failed and statuses[trial_id] == "error")
               for trial_id in stored.planned):
            return None
        return FinishedSweep(stored.meta["name"], Path(directory),
                             bool(json.loads(stored.meta.get("memory_objective", "false"))),
                             len(stored.planned), len(set(stored.planned)),
                             list(json.loads(stored.meta.get("group_notes", "[]"))))
    except (OSError, ValueError, TypeError, KeyError, sqlite3.Error):
        return None


def conclude_finished(finished: FinishedSweep, reporter: Reporter) -> SweepSummary:
    """What run_sweep returns for this sweep with nothing to train (its reporter told the same), without
    planning: the counts and best trial from the store, the plan's notes, the report files (written
    only if they are not current)."""
    from dse.report.files import writable_current_reports
    from dse.sweep.store import load_trials

    started = time.perf_counter()
    with contextlib.ExitStack() as held:
        with contextlib.suppress(OSError):  # (a folder this user cannot write: it writes nothing there)
            held.enter_context(lock.holding(finished.output))  # another sweep running there: refused
        summary = SweepSummary(finished.name, finished.output, total=finished.runs, skipped=finished.runs,
                               ran=0)
        frame = load_trials(finished.output)  # nothing trains: one frame serves the display and the summary
        # stale report files in a folder that refuses them: said before anything is printed
        writable_current_reports(frame, finished.output, finished.memory_objective)
        reporter.start(finished.planned, summary.skipped, best_of(frame))
        reporter.stop()
        summary.notes = finished.notes
        return conclude(summary, finished.memory_objective, True, started, frame)
