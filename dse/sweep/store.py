"""The sweep's SQLite store (`sweep.sqlite` in the output directory) and `load_trials` for reports.

Tables:
- `meta`: the sweep's name (its identity: a store belongs to one sweep), the YAML it last ran with, its
  config hash, energy settings and workloads.
- `plan`: the trials of the latest run of the sweep file, in order, with task, label, configuration
  (hash of the trial without seed and tuned values), tuning point (JSON), energy key and the energy key
  of its warm-up's configuration (empty without a warm-up); a trial two configurations share has a
  row under each. Trials that were dropped from the file stay in `trials` but leave the plan, so
  reports skip them.
- `trials`: one row per finished trial, primary key trial_id; each is committed in its own transaction
  the moment its trial finishes (WAL journal, synchronous=FULL), so a SIGKILL at any moment loses no
  finished trial and a half-written row never becomes visible.
- `energy`: per (energy key, workload column) the energy of one iteration by unit, the training-state
  memory and the area of the datapath the trial trained on; and what its run's batches cost: an epoch's
  last batch at its own rows, the forward pass of a full and of a last batch, the batches per epoch. A
  workload column is a workload, or a workload at one point of the energy axes (`resnet50@7nm,pe`).
  Energy depends only on the configuration, so it is recomputed, never retrained, when the energy
  settings change.

Stores written before schema 2 are read as they are and brought up to date when a sweep opens them:
`trials` gains `val_accuracy` (empty for the old rows) and the plan, which every run rewrites, is
rebuilt with its new columns; `energy` gains `area_um2` (empty until the energy is recomputed, which
every run does). A plan without `warmup_energy_key` gains it (empty, so a warm-up's energy is unknown
until the next run rewrites the plan); results without `epoch_iterations` give no run total
(`_run_iterations`). `energy` gains the batch columns (empty, so a run's energy is unknown until
the next run recomputes the energy). `master_weights` holds text (`true`, `false` or the master copy's format
spec); the 0/1 of an old store reads as false/true.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

from dse.energy.units import UNITS
from dse.errors import InputError
from dse.report.pareto import TUNED_PREFIX, area_column, energy_column, memory_column, run_energy_column
from dse.sweep.run_energy import BatchEnergies, RunEnergy, has_warmup, run_energy

T = TypeVar("T")
STORE_FILE = "sweep.sqlite"
SCHEMA_VERSION = "3"
TRIAL_COLUMNS: tuple[str, ...] = (
    "trial_id", "task", "label", "model", "dataset", "weights", "activations", "gradients", "weight_grads",
    "optimizer", "master_weights", "warmup_epochs", "seed", "status", "diverged", "error", "val_accuracy",
    "test_accuracy", "final_loss", "wall_time_s")
PLAN_COLUMNS: tuple[str, ...] = ("configuration", "tuning")
"""Columns load_trials takes from the plan: the configuration hash and the tuning point (JSON)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS plan (
    position INTEGER PRIMARY KEY, trial_id TEXT NOT NULL, task TEXT NOT NULL, label TEXT NOT NULL,
    configuration TEXT NOT NULL, tuning TEXT NOT NULL, energy_key TEXT NOT NULL,
    warmup_energy_key TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS trials (
    trial_id TEXT PRIMARY KEY, task TEXT NOT NULL, label TEXT NOT NULL, model TEXT NOT NULL,
    dataset TEXT NOT NULL, weights TEXT NOT NULL, activations TEXT NOT NULL, gradients TEXT NOT NULL,
    weight_grads TEXT NOT NULL, optimizer TEXT NOT NULL, master_weights TEXT NOT NULL,
    warmup_epochs INTEGER NOT NULL, seed INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'diverged', 'error')), diverged INTEGER NOT NULL,
    error TEXT NOT NULL, val_accuracy REAL, test_accuracy REAL, final_loss REAL, wall_time_s REAL NOT NULL,
    config TEXT NOT NULL, result TEXT NOT NULL, finished_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS energy (
    energy_key TEXT NOT NULL, workload TEXT NOT NULL, total_mj REAL NOT NULL, multiply_mj REAL NOT NULL,
    conversion_mj REAL NOT NULL, accumulation_mj REAL NOT NULL, update_mj REAL NOT NULL,
    memory_mj REAL NOT NULL, memory_mib REAL NOT NULL, area_um2 REAL, last_iteration_mj REAL,
    forward_mj REAL, last_forward_mj REAL, epoch_batches INTEGER, PRIMARY KEY (energy_key, workload));
"""
_BATCH_VALUES = ("last_iteration_mj", "forward_mj", "last_forward_mj", "epoch_batches")
"""The energy columns of a run's batches (dse.sweep.run_energy.BatchEnergies), absent before schema 3."""
_ENERGY_VALUES = ("total_mj", "multiply_mj", "conversion_mj", "accumulation_mj", "update_mj", "memory_mj",
                  "memory_mib", "area_um2", *_BATCH_VALUES)
_OPTIONAL_VALUES = ("area_um2", *_BATCH_VALUES)
"""Energy columns an older store may lack (area_um2 before schema 2)."""


@dataclass(frozen=True)
class PlanRow:
    trial_id: str
    task: str
    label: str
    energy_key: str
    configuration: str = ""
    """Hash of the configuration; empty: the label names it (stores before schema 2)."""
    tuning: dict[str, Any] = field(default_factory=dict)
    warmup_energy_key: str = ""
    """Energy key of the configuration its warm-up epochs trained in (dse.sweep.energy.warmup_config);
    empty: it has no warm-up."""


@dataclass(frozen=True)
class TrialRow:
    """A finished trial as stored: the descriptive columns, the outcome and the full records as JSON."""

    values: dict[str, Any]
    """TRIAL_COLUMNS (test_accuracy/final_loss None for an error), plus config/result JSON strings."""


BUSY_TIMEOUT_S = 60.0
"""How long a connection waits for another process's lock on the store before it gives up."""


def store_path(directory: Path) -> Path:
    return Path(directory) / STORE_FILE


def store_problem(path: Path, error: sqlite3.Error) -> str | None:
    """One line naming why the store at `path` cannot be opened where SQLite says it cannot: locked by
    another process, not readable or writable by this user, a disk error. None for any other error (a
    file that is not a store, or a damaged one). Never advice to remove it: it may hold results."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "locked" in text or "busy" in text:
        return (f"{path} is locked by another process (another dse sweep writing it?): nothing was read "
                "or written; run again once it has finished")
    if "disk i/o" in text.lower() or "disk is full" in text or "database or disk is full" in text:
        return f"cannot use {path}: {text} (nothing was written)"
    if "unable to open" in text or "readonly" in text or "read-only" in text:
        for where, mode, what in ((path, os.R_OK, "read"), (path, os.W_OK, "write"),
                                  (path.parent, os.W_OK | os.X_OK, "write in the folder of")):
            if where.exists() and not os.access(where, mode):
                return f"cannot {what} {path}: permission denied (nothing was written)"
        return f"cannot open {path}: {text} (nothing was written)"
    return None


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`; None where there is none."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    return connection


def _columns(connection: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in connection.execute(f"PRAGMA table_info({table})")]


def _migrate(connection: sqlite3.Connection) -> None:
    """Bring a store of an older schema up to date (see the module docstring); a no-op on a new one."""
    plan = _columns(connection, "plan")
    if plan and "configuration" not in plan:
        connection.execute("DROP TABLE plan")  # every run rewrites the plan: nothing is lost
    elif plan and "warmup_energy_key" not in plan:
        connection.execute("ALTER TABLE plan ADD COLUMN warmup_energy_key TEXT NOT NULL DEFAULT ''")
    trials = _columns(connection, "trials")
    if trials and "val_accuracy" not in trials:
        connection.execute("ALTER TABLE trials ADD COLUMN val_accuracy REAL")
    energy = _columns(connection, "energy")
    for name in _OPTIONAL_VALUES:
        if energy and name not in energy:
            kind = "INTEGER" if name == "epoch_batches" else "REAL"
            connection.execute(f"ALTER TABLE energy ADD COLUMN {name} {kind}")


def master_weights_text(value: bool | str) -> str:
    """How the store spells TrainConfig.master_weights: `true`, `false` or the copy's format spec."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def master_weights_value(stored: Any) -> bool | str:
    """The stored master_weights as TrainConfig has it (an old store's 0/1 as false/true)."""
    if stored in (1, "1", "true"):
        return True
    if stored in (0, "0", "false"):
        return False
    return str(stored)


def _read_meta(connection: sqlite3.Connection) -> dict[str, str]:
    """The meta table ({} where there is none); any other SQLite error (locked, unreadable) raises."""
    try:
        return dict(connection.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.OperationalError as error:
        if str(error).startswith("no such table"):
            return {}
        raise


def _reading_connection(path: Path) -> sqlite3.Connection:
    """A connection that reads the existing store at `path` and leaves no file behind.

    Read-write but never created (mode=rw): a read-only connection to a WAL store leaves its -wal and
    -shm files behind, which the last read-write connection to close removes. A store that cannot be
    written (a write-protected file, read-only media) has no WAL index to open, so it is read as
    immutable, unless a -wal file holds trials outside it (then OperationalError: see _read_only)."""
    if not Path(f"{path}-wal").exists() and not os.access(path, os.W_OK):
        return sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    connection: sqlite3.Connection | None = None
    try:
        connection = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=BUSY_TIMEOUT_S)
        connection.execute("PRAGMA schema_version").fetchone()
        return connection
    except sqlite3.OperationalError as error:  # a write-protected directory: the WAL index cannot be made
        if connection is not None:
            connection.close()
        if Path(f"{path}-wal").exists() or "locked" in str(error):  # (a lock: no reading around it)
            raise
        return sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    except BaseException:
        if connection is not None:
            connection.close()
        raise


_SQLITE_LOCK_BYTES = (0x40000000, 512)
"""(first, count) of the bytes of a database file SQLite's connections lock (its pending, reserved and
shared bytes, sqlite3.c: PENDING_BYTE): every open connection holds some of them (one in WAL mode its
shared lock as long as it is open), and one that opens takes one before it makes a -wal or -shm."""


def _remove_unless_in_use(path: Path, made: list[Path]) -> None:
    """Remove the files in `made` (the -wal and -shm files a read of the store at `path` made, which
    were not there before it) where no connection has the store open: SQLite removes them when the last
    connection closes, but not when the read failed (a full disk: the -shm could not grow), and they
    would stay. A -wal that holds anything stays (its frames are trials). Tried while holding a write
    lock on the bytes SQLite locks, so no connection is open or can open meanwhile; where another has
    it open, the files are that connection's, and stay. Called only where the files were not there
    before the read, so no connection of this process had the store open (closing this function's
    descriptor would drop such a connection's POSIX locks)."""
    if not made:
        return
    try:
        descriptor = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        first, count = _SQLITE_LOCK_BYTES
        fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB, count, first)
        for leftover in made:
            with contextlib.suppress(OSError):
                if not leftover.name.endswith("-wal") or leftover.stat().st_size == 0:
                    leftover.unlink()
    except OSError:  # another connection holds the store: the files are its own
        pass
    finally:
        os.close(descriptor)


def _read_only(path: Path, read: Callable[[sqlite3.Connection], T]) -> T:
    """`read` (which only reads) run on a connection to the existing store at `path` that leaves no file
    behind (sqlite3 errors pass through), nor where it fails (`_remove_unless_in_use`). A store with a
    -wal file that cannot be opened where it is (on read-only media without its -shm file) is read from
    a temporary copy of the two files."""
    journal = [Path(f"{path}{suffix}") for suffix in ("-wal", "-shm")]
    made = [file for file in journal if not file.exists()]
    try:
        connection = _reading_connection(path)
    except sqlite3.OperationalError as error:
        _remove_unless_in_use(path, [file for file in made if file.exists()])
        if not Path(f"{path}-wal").exists():
            raise
        try:
            with tempfile.TemporaryDirectory(prefix="dse-store-") as scratch:
                copy = Path(scratch) / path.name
                shutil.copyfile(path, copy)
                shutil.copyfile(f"{path}-wal", f"{copy}-wal")
                return _read_only(copy, read)
        except OSError:  # no room for the copy either (a full disk): SQLite's own error says why
            raise error from None
    try:
        return read(connection)
    finally:
        connection.close()
        _remove_unless_in_use(path, [file for file in made if file.exists()])


def stored_sweep_name(directory: Path) -> str | None:
    """The name of the sweep whose store is in `directory`, or None if there is no store.

    A file that is not a dse store raises InputError rather than being overwritten.
    """
    path = store_path(directory)
    if not path.exists() or (path.is_file() and path.stat().st_size == 0):
        return None  # (an empty file: SQLite's new database, a sweep stopped as it opened its store)
    def read(connection: sqlite3.Connection) -> tuple[dict[str, str], bool]:
        meta = _read_meta(connection)
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        empty = not meta and {"meta", "trials"} <= tables and not connection.execute(
            "SELECT 1 FROM trials LIMIT 1").fetchall()
        return meta, empty

    try:
        meta, empty = _read_only(path, read)
    except sqlite3.Error as error:
        problem = store_problem(path, error)
        raise InputError(problem or f"{path} is not a readable sweep store ({str(error).splitlines()[0]}): "
                         "choose another output path (output: or --output)") from None
    if "name" not in meta:
        if empty:  # a store a sweep created and was stopped in before it wrote its plan: nothing in it
            return None
        raise InputError(f"{path} is not a dse sweep store (it has no sweep name): choose another output "
                         "path (output: or --output)")
    return meta["name"]


def output_directory(output: str | None, name: str) -> Path:
    """Where a sweep's store and reports go: its `output:`, else results/<its name>."""
    return Path(output) if output is not None else Path("results") / name


@dataclass(frozen=True)
class StoredProgress:
    """A store as a rerun sees it before planning: its meta, its plan's trial ids and every stored trial's
    status."""

    meta: dict[str, str]
    planned: list[str]
    """The trial id of each plan row, in plan order (an id two configurations share appears twice)."""
    statuses: dict[str, str]


def stored_progress(directory: Path) -> StoredProgress | None:
    """The store in `directory` read without writing (None: there is none, or it cannot be read)."""
    path = store_path(directory)
    if not path.is_file():
        return None
    def read(connection: sqlite3.Connection) -> StoredProgress:
        return StoredProgress(
            _read_meta(connection),
            [row[0] for row in connection.execute("SELECT trial_id FROM plan ORDER BY position")],
            dict(connection.execute("SELECT trial_id, status FROM trials").fetchall()))

    try:
        return _read_only(path, read)
    except sqlite3.Error:
        return None


class SweepStore:
    """The parent process's handle on the store: the only writer."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = store_path(self.directory)
        self.connection = _connect(self.path)
        with self.connection:
            _migrate(self.connection)
            self.connection.executescript(_SCHEMA)
        self._identity = _identity(self.path)

    def reset(self) -> None:
        """Forget everything (used by --force on a store that belonged to another sweep)."""
        with self.connection:
            for table in ("meta", "plan", "trials", "energy"):
                self.connection.execute(f"DELETE FROM {table}")

    def start(self, meta: dict[str, Any], plan: Iterable[PlanRow],
              energies: dict[tuple[str, str], dict[str, float]]) -> None:
        """Record the run's settings, its plan and the energy of every planned configuration, atomically."""
        now = time.time()
        with self.connection:
            existing = _read_meta(self.connection)
            values = {**{k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items()},
                      "schema": SCHEMA_VERSION, "updated_at": str(now),
                      "created_at": existing.get("created_at", str(now))}
            self.connection.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                        sorted(values.items()))
            self.connection.execute("DELETE FROM plan")
            self.connection.executemany(
                "INSERT INTO plan (position, trial_id, task, label, configuration, tuning, energy_key, "
                "warmup_energy_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(position, row.trial_id, row.task, row.label, row.configuration,
                  json.dumps(row.tuning, sort_keys=True), row.energy_key, row.warmup_energy_key)
                 for position, row in enumerate(plan)])
            self.connection.executemany(
                f"INSERT OR REPLACE INTO energy (energy_key, workload, {', '.join(_ENERGY_VALUES)}) "
                f"VALUES (?, ?, {', '.join('?' * len(_ENERGY_VALUES))})",
                [(key, workload, *(values.get(name) for name in _ENERGY_VALUES))
                 for (key, workload), values in energies.items()])

    def statuses(self) -> dict[str, str]:
        """trial_id -> status (ok, diverged, error) of every stored trial."""
        return dict(self.connection.execute("SELECT trial_id, status FROM trials"))

    def record(self, row: TrialRow) -> None:
        """Commit one finished trial in its own transaction (replacing an earlier run of it). Where that
        fails (a full disk, the store locked past BUSY_TIMEOUT_S, its file removed) an InputError says
        why in one line: the transaction is rolled back, so the store keeps every trial committed
        before, and a rerun resumes from them."""
        values = {**row.values, "finished_at": time.time()}
        names = list(values)
        trial = f"{values['task']}: {values['label']} (seed {values['seed']})"
        if _identity(self.path) != self._identity:  # SQLite would go on writing the removed file
            raise InputError(f"cannot record trial {trial}: {self.path} was removed or replaced while the "
                             "sweep ran (the trials it held went with it); run the same command again to "
                             "start a new store")
        try:
            with self.connection:
                self.connection.execute(
                    f"INSERT OR REPLACE INTO trials ({', '.join(names)}) "
                    f"VALUES ({', '.join('?' * len(names))})", [values[name] for name in names])
        except sqlite3.Error as error:
            text = str(error).splitlines()[0] if str(error) else type(error).__name__
            if "locked" in text or "busy" in text:
                text = f"{text}: another process held it for over {BUSY_TIMEOUT_S:g} s"
            raise InputError(f"cannot record trial {trial} in {self.path} ({text}); the {self._count()} "
                             "trials stored before it are kept: run the same command again to resume"
                             ) from None

    def _count(self) -> str:
        """How many trials the store holds, as text ('all' where even counting fails)."""
        try:
            return str(self.connection.execute("SELECT COUNT(*) FROM trials").fetchone()[0])
        except sqlite3.Error:
            return "all"

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> SweepStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def energy_columns(workloads: Iterable[str]) -> list[str]:
    """The energy columns of load_trials, in order, for these workloads."""
    columns: list[str] = []
    for workload in workloads:
        columns.append(energy_column(workload))
        columns += [energy_column(workload, unit) for unit in UNITS]
        columns.append(memory_column(workload))
        columns.append(area_column(workload))
        columns += [run_energy_column(workload), run_energy_column(workload, mean=True)]
    return columns


_STATUSES = ("ok", "diverged", "error")


def _read_store(connection: sqlite3.Connection) -> tuple[dict[str, str], list[str], list[tuple[Any, ...]],
                                                       list[str], list[tuple[Any, ...]]]:
    """The store's meta, workloads, plan rows joined with their trials (and the joined column names), and
    energy rows: sqlite3 errors (a missing table) and a missing column raise."""
    meta = _read_meta(connection)
    workloads = json.loads(meta.get("workloads", "[]"))
    if not isinstance(workloads, list):
        raise ValueError(f"meta.workloads is not a list: {workloads!r}")
    plan = _columns(connection, "plan")
    plan_columns = "p.configuration, p.tuning" if "configuration" in plan else "p.label, '{}'"
    # NULL: a plan written before warm-ups were priced (unknown until a run rewrites it)
    plan_columns += ", p.warmup_energy_key" if "warmup_energy_key" in plan else ", NULL"
    rows = connection.execute(
        f"SELECT p.energy_key, p.task, p.label, {plan_columns}, t.* FROM plan p "
        "JOIN trials t ON t.trial_id = p.trial_id ORDER BY p.position").fetchall()
    names = ["energy_key", "plan_task", "plan_label", "configuration", "tuning", "warmup_energy_key"] + [
        d[0] for d in connection.execute("SELECT * FROM trials LIMIT 0").description]
    missing = [name for name in (*TRIAL_COLUMNS, "config") if name not in names
               and name != "val_accuracy"]  # val_accuracy: absent from stores before schema 2
    stored = set(_columns(connection, "energy"))
    missing += [f"energy.{name}" for name in _ENERGY_VALUES if name not in stored
                and name not in _OPTIONAL_VALUES]
    if missing:
        raise ValueError(f"missing column {', '.join(missing)}")
    selected = ", ".join(name if name in stored else "NULL" for name in _ENERGY_VALUES)
    energy = connection.execute(f"SELECT energy_key, workload, {selected} FROM energy").fetchall()
    return meta, workloads, rows, names, energy


def _json_object(text: Any, what: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not a JSON object: {text!r}")
    return value


def _trial_records(rows: list[tuple[Any, ...]], names: list[str], workloads: list[str],
                   energy: list[tuple[Any, ...]]) -> tuple[list[dict[str, Any]], dict[str, None]]:
    """load_trials' records, one per plan row, and the tuned fields; a row that is not what the sweep
    wrote (an unknown status, a config or tuning that is not a JSON object) raises."""
    by_key: dict[tuple[str, str], tuple[float, ...]] = {(r[0], r[1]): tuple(r[2:]) for r in energy}
    records = []
    tuned: dict[str, None] = {}
    for raw in rows:
        row = dict(zip(names, raw, strict=True))
        where = f"trial {row['trial_id']}"
        if row["status"] not in _STATUSES:
            raise ValueError(f"{where}: unknown status {row['status']!r}")
        _json_object(row["config"], f"{where}: config")
        record: dict[str, Any] = {name: row.get(name) for name in (*TRIAL_COLUMNS, *PLAN_COLUMNS)}
        record["task"], record["label"] = row["plan_task"], row["plan_label"]
        record["master_weights"] = master_weights_value(row["master_weights"])
        record["diverged"] = bool(row["diverged"])
        for name in ("val_accuracy", "test_accuracy", "final_loss"):
            record[name] = math.nan if record[name] is None else float(record[name])
        for name, value in _json_object(record["tuning"], f"{where}: tuning").items():
            tuned.setdefault(name)
            record[TUNED_PREFIX + name] = value
        iterations, counted = _run_iterations(row)
        for workload in workloads:
            values = by_key.get((row["energy_key"], workload))
            numbers = dict(zip(_ENERGY_VALUES, values, strict=True)) if values else {}
            record[energy_column(workload)] = numbers.get("total_mj", math.nan)
            for unit in UNITS:
                record[energy_column(workload, unit)] = numbers.get(f"{unit}_mj", math.nan)
            record[memory_column(workload)] = numbers.get("memory_mib", math.nan)
            area = numbers.get("area_um2")
            record[area_column(workload)] = math.nan if area is None else area
            run = _run_energy(iterations, numbers, by_key, row, workload)
            record[run_energy_column(workload)] = run.total_mj if counted else math.nan
            record[run_energy_column(workload, mean=True)] = run.mean_mj
        record["config"] = row["config"]
        records.append(record)
    return records, tuned


def _run_iterations(row: dict[str, Any]) -> tuple[list[int] | None, bool]:
    """The iterations the trial trained in each epoch (None: unknown), and whether they are counted
    (True) or, for a result without the iterations of each epoch it ran (a trial recorded before dse
    counted them: every epoch then trained all its batches unless it diverged), assumed: enough for the
    run's mean per iteration, not for its total (an empty list stands for every batch of each of
    `epochs_run` epochs; `_run_energy` fills it in). A trial that raised trained nothing that counts."""
    if row["status"] == "error":
        return None, False
    result = _json_object(row["result"], f"trial {row['trial_id']}: result")
    epochs, counts = result.get("epochs_run"), result.get("epoch_iterations")
    if counts is not None and not (isinstance(counts, list)
                                   and all(isinstance(count, int) for count in counts)):
        raise ValueError(f"trial {row['trial_id']}: epoch_iterations is not a list of integers: {counts!r}")
    if counts is not None and len(counts) == epochs:
        return counts, True
    if row["status"] != "ok" or not isinstance(epochs, int):
        return None, False  # (the epoch it diverged in trained an unknown part of its batches)
    return [-1] * epochs, False


def _batch_energies(numbers: dict[str, Any]) -> BatchEnergies | None:
    """An energy row's batch costs; None where it has none (a row written before schema 3)."""
    if not numbers or any(numbers.get(name) is None for name in _BATCH_VALUES):
        return None
    return BatchEnergies(float(numbers["total_mj"]), float(numbers["last_iteration_mj"]),
                         float(numbers["forward_mj"]), float(numbers["last_forward_mj"]),
                         int(numbers["epoch_batches"]))


def _run_energy(iterations: list[int] | None, numbers: dict[str, Any],
                by_key: dict[tuple[str, str], tuple[float, ...]], row: dict[str, Any], workload: str
                ) -> RunEnergy:
    """The run's energy in one workload column (NaN where its iterations or an energy are unknown)."""
    unknown = RunEnergy(math.nan, math.nan)
    energies = _batch_energies(numbers)
    if iterations is None or energies is None:
        return unknown
    warmup_epochs = int(row["warmup_epochs"]) if has_warmup(int(row["warmup_epochs"]),
                                                             str(row["optimizer"])) else 0
    warmup = None
    if warmup_epochs and iterations:
        stored = by_key.get((row["warmup_energy_key"], workload)) if row["warmup_energy_key"] else None
        warmup = _batch_energies(dict(zip(_ENERGY_VALUES, stored, strict=True))) if stored else None
        if warmup is None:  # a plan from before warm-ups were priced: known once a run rewrites it
            return unknown
    # a result from before iterations were counted: every epoch trained all its batches
    counts = [energies.epoch_batches if count < 0 else count for count in iterations]
    try:
        return run_energy(counts, warmup_epochs, energies, warmup, row["status"] == "diverged")
    except ValueError:  # trained on another training set than the one priced (a user's dataset changed)
        return unknown


def load_trials(directory: Path) -> pd.DataFrame:
    """One row per finished trial of the sweep's latest plan, in plan order (see docs/config.md).

    Columns: TRIAL_COLUMNS, PLAN_COLUMNS, `tuned:<field>` per field tuned in the plan, then per workload
    W `energy_mj:W`, `energy_mj:W:<unit>` for each unit, `memory_mib:W`, `area_um2:W`, `run_energy_mj:W`
    and `run_mean_energy_mj:W` (dse.sweep.energy.run_energy), then `config` (the
    TrainConfig as JSON). `frame.attrs['sweep']` holds the sweep's name, workloads, memory_objective,
    baselines (task -> label, where the sweep file named one) and output directory.
    """
    directory = Path(directory)
    path = store_path(directory)
    if not path.is_file():
        raise InputError(f"no sweep store in {str(directory)!r} (no {STORE_FILE}; run `dse sweep` first)")
    if stored_sweep_name(directory) is None:  # an empty store: a sweep stopped before it planned
        raise InputError(f"{path} holds no sweep yet (a sweep was stopped before it planned its trials): "
                         "run `dse sweep` first")
    try:
        meta, workloads, rows, names, energy = _read_only(path, _read_store)
        records, tuned = _trial_records(rows, names, workloads, energy)
        sweep = {"name": meta.get("name", ""), "workloads": list(workloads),
                 "memory_objective": json.loads(meta.get("memory_objective", "false")),
                 "baselines": json.loads(meta.get("baselines", "{}")), "output": str(directory)}
    except (sqlite3.Error, ValueError, KeyError, TypeError, AttributeError) as error:
        problem = store_problem(path, error) if isinstance(error, sqlite3.Error) else None
        raise InputError(problem or f"{path} is not a readable sweep store: {str(error).splitlines()[0]}"
                         ) from None
    columns = [*TRIAL_COLUMNS, *PLAN_COLUMNS, *(TUNED_PREFIX + name for name in tuned),
               *energy_columns(workloads), "config"]
    frame = pd.DataFrame.from_records(records, columns=columns)
    if frame.empty:
        frame = frame.astype({"diverged": bool, "val_accuracy": float, "test_accuracy": float,
                              "final_loss": float, "wall_time_s": float})
    frame.attrs["sweep"] = sweep
    return frame
