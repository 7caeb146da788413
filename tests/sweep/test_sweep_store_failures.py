"""The store failing in the middle of a run (a full disk, another process locking it past the busy
timeout, its folder removed) is one line naming the problem and the store, exit code 2, no traceback;
the trials stored before are kept and the same command resumes with every trial stored once.
The failures are SQLite's own, injected after the third trial is stored: a full disk is the store's
page limit (`PRAGMA max_page_count`, SQLITE_FULL), a lock is another connection's write transaction."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.stores import stored_trial_ids
from typer.testing import CliRunner

import dse.sweep.executors
import dse.sweep.runner
import dse.sweep.store
import dse.train.loop
from dse.cli import app
from dse.sweep.store import STORE_FILE, SweepStore

TRIALS = 6


def _text(out: Path) -> str:
    return (f"name: failing\nseeds: [0, 1, 2]\ntask: {{model: mlp, dataset: digits, epochs: 1}}\n"
            f"energy: {{workloads: [proxy]}}\ntrials: [{{format: [fp32, int8], optimizer: sgd}}]\n"
            f"executor: {{group_size: 1}}\noutput: {out}\n")


def _ids(config: Path, calls: list[dict[str, Any]]) -> list[str]:
    """The trial ids of the trials support.fakes logged (by format and seed)."""
    from dse.sweep import expand, parse_config

    trials = expand(parse_config(config.read_text(), "s.yaml"))
    return [t.trial_id for t in trials for call in calls
            if (t.config.format, t.config.seed) == (call["format"], call["seed"])]



def _calls(log: Path) -> list[dict[str, Any]]:
    """The trials support.fakes logged (one JSON object a line)."""
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture
def fake_sweep(monkeypatch: pytest.MonkeyPatch, fake_train: Callable[..., Any],
               tmp_path: Path) -> Iterator[Path]:
    """`dse sweep` in this process, each trial trained by fake_train inline (logged to calls.jsonl)."""
    monkeypatch.setattr(dse.sweep.runner, "make_executor", lambda sweep: dse.sweep.executors.InlineExecutor())
    monkeypatch.setattr(dse.sweep.runner, "start_worker_server", lambda: None)
    monkeypatch.setattr(dse.sweep.executors, "start_worker_server", lambda: None)
    monkeypatch.setattr(dse.train.loop, "train", lambda config, dataset=None: fake_train(config))
    monkeypatch.setenv("DSE_FAKE_LOG", str(tmp_path / "calls.jsonl"))
    config = tmp_path / "s.yaml"
    config.write_text(_text(tmp_path / "out"))
    yield config


def _fail_after(monkeypatch: pytest.MonkeyPatch, stored: int, fail: Callable[[SweepStore], None]) -> None:
    """Call fail(store) once `stored` trials are recorded, before the next one."""
    record = SweepStore.record
    count = [0]

    def failing(store: SweepStore, row: Any) -> None:
        if count[0] == stored:
            fail(store)
        count[0] += 1
        record(store, row)

    monkeypatch.setattr(SweepStore, "record", failing)


def _full(store: SweepStore) -> None:
    pages = store.connection.execute("PRAGMA page_count").fetchone()[0]
    store.connection.execute(f"PRAGMA max_page_count = {pages}")


_HOLDERS: list[sqlite3.Connection] = []


def _locked(store: SweepStore) -> None:
    holder = sqlite3.connect(store.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's write transaction, never committed
    _HOLDERS.append(holder)


def _removed(store: SweepStore) -> None:
    shutil.rmtree(store.directory)


@pytest.mark.parametrize(("fail", "problem"), [
    (_full, "(database or disk is full); the 3 trials stored before it are kept: run the same command "
            "again to resume"),
    (_locked, "(database is locked: another process held it for over 0.2 s); the 3 trials stored before "
              "it are kept"),
    (_removed, "/out/sweep.sqlite was removed or replaced while the sweep ran")],
    ids=["full", "locked", "removed"])
def test_a_store_that_fails_mid_run_is_one_line_and_the_run_resumes(
        fake_sweep: Path, monkeypatch: pytest.MonkeyPatch, fail: Callable[[SweepStore], None], problem: str,
        tmp_path: Path) -> None:
    """Before: the sqlite3 error's traceback, after planning and training (exit code 1); a removed store
    was written on in silence (SQLite goes on writing a file that is no longer there)."""
    with monkeypatch.context() as failing:
        failing.setattr(dse.sweep.store, "BUSY_TIMEOUT_S", 0.2)
        _fail_after(failing, 3, fail)
        result = CliRunner().invoke(app, ["sweep", str(fake_sweep), "-q"])
    for holder in _HOLDERS:
        holder.close()
    _HOLDERS.clear()
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot record trial "), result.output
    assert problem in lines[0] and "Traceback" not in result.output
    out = tmp_path / "out"
    if fail is _removed:
        assert not out.exists()
        kept: list[str] = []
    else:
        kept = stored_trial_ids(out)
        assert len(kept) == 3 and not (out / "sweep.lock").exists()
    (tmp_path / "calls.jsonl").unlink()
    resumed = CliRunner().invoke(app, ["sweep", str(fake_sweep), "-q"])
    assert resumed.exit_code == 0, resumed.output
    after = stored_trial_ids(out)
    assert len(after) == len(set(after)) == TRIALS and set(kept) <= set(after)
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == TRIALS - len(kept)  # only the missing trials trained


_CLI_HELD = """\
import functools, sys
sys.path.insert(0, {tests!r})
from support.fakes import held_train
import dse.sweep
from dse.cli import app
dse.sweep.run_sweep = functools.partial(dse.sweep.run_sweep, train_fn=held_train)
app(["sweep", {config!r}, "-q"], prog_name="dse")
"""


def test_a_worker_killed_mid_run_is_one_line_and_the_finished_trials_are_stored(
        tmp_path: Path, tests_dir: Path, fake_train: Callable[..., Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`dse sweep` on two local workers (support.fakes' held_train: seed-0 trials finish, others wait);
    one worker is killed (kill -9, as the out-of-memory killer does). Before: a traceback of RuntimeError
    (exit code 1)."""
    out, config, log = tmp_path / "out", tmp_path / "s.yaml", tmp_path / "calls.jsonl"
    config.write_text(_text(out).replace("group_size: 1", "workers: 2"))
    env = {**os.environ, "DSE_RELEASE": str(tmp_path / "never"), "DSE_FAKE_LOG": str(log)}
    script = _CLI_HELD.format(tests=str(tests_dir), config=str(config))
    sweep = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        # both workers held (no trial running) and every trial they finished stored: the kill then
        # cannot fall between a trial's end and its result's arrival, whatever the machine's load
        while (len(list(tmp_path.glob("never.waiting.*"))) < 2 or not log.exists()
               or sorted(stored_trial_ids(out)) != sorted(_ids(config, _calls(log)))):
            assert sweep.poll() is None and time.monotonic() < deadline, sweep.communicate()
            time.sleep(0.02)
        worker = _calls(log)[0]["pid"]  # it went on to a held trial
        os.kill(worker, signal.SIGKILL)
        stdout, stderr = sweep.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sweep.pid, signal.SIGKILL)
        sweep.wait()
    assert sweep.returncode == 2, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert lines == ["error: a worker process died (out of memory, or killed) and the sweep stopped its "
                     "others; the trials that finished are stored: run the same command again to resume"
                     ], stderr
    kept = stored_trial_ids(out)
    assert sorted(kept) == sorted(_ids(config, _calls(log))) and not (out / "sweep.lock").exists()
    from dse.sweep import parse_config, run_sweep
    from dse.sweep.executors import InlineExecutor

    log.unlink()
    monkeypatch.setenv("DSE_FAKE_LOG", str(log))
    run_sweep(parse_config(config.read_text(), "s.yaml"), train_fn=fake_train, executor=InlineExecutor(),
              reports=False)
    after = stored_trial_ids(out)
    assert len(after) == len(set(after)) == TRIALS and set(kept) <= set(after)
    assert len(log.read_text().splitlines()) == TRIALS - len(kept)


def test_reading_a_store_on_a_full_disk_is_one_line(tmp_path: Path, repo_root: Path,
                                                    fake_train: Callable[..., Any]) -> None:
    """`dse report` and `dse export` where no file may grow past 8 KiB (RLIMIT_FSIZE, as a full disk: the
    store's WAL index cannot be made, nor a copy of the store in the temporary folder). Before: a
    traceback of OSError (File too large) from the copy, exit code 1."""
    import resource

    from dse.sweep import parse_config, run_sweep
    from dse.sweep.executors import InlineExecutor

    out = tmp_path / "out"
    run_sweep(parse_config(_text(out), "s.yaml"), train_fn=fake_train, executor=InlineExecutor(),
              reports=False)
    kept = (out / STORE_FILE).read_bytes()
    env = {**os.environ, "PYTHONPATH": str(repo_root), "TMPDIR": str(tmp_path)}

    def full_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    for args in (["report", str(out)], ["export", str(out), "--to", "csv"]):
        result = subprocess.run([sys.executable, "-m", "dse.cli", *args], env=env, capture_output=True,
                                text=True, preexec_fn=full_disk, timeout=300)
        assert result.returncode == 2, (result.stdout, result.stderr)
        assert result.stderr.strip().splitlines() == [f"error: cannot use {out / STORE_FILE}: disk I/O error "
                                                      "(nothing was written)"], result.stderr
        assert result.stdout == "" and (out / STORE_FILE).read_bytes() == kept


_KILLED_WRITER = ("import os, sqlite3, sys\n"
                  "connection = sqlite3.connect(sys.argv[1])\n"
                  "connection.execute('PRAGMA wal_autocheckpoint = 0')\n"
                  "connection.execute('UPDATE trials SET wall_time_s = 123.0 WHERE rowid = 1')\n"
                  "connection.commit()\n"
                  "os._exit(0)\n")
"""A writer killed after a commit: the trial's new value is only in the -wal file it leaves (with its
-shm)."""


@pytest.mark.parametrize("journal", ["none", "wal", "wal and shm"])
def test_a_read_that_fails_on_a_full_disk_leaves_no_file_behind_and_loses_nothing(
        tmp_path: Path, repo_root: Path, fake_train: Callable[..., Any], journal: str) -> None:
    """`dse report` where no file may grow past 8 KiB (RLIMIT_FSIZE, as a full disk) on a store alone,
    with the -wal of a killed writer, and with its -wal and -shm: one line, exit code 2, and the folder
    holds the files it held (the store and -wal byte for byte), the temporary folder nothing, and the
    killed writer's commit reads back. Before: the failed read left an empty -wal and a partial -shm
    beside a store that had neither, and a -shm beside a -wal that had none."""
    import resource

    from dse.sweep import parse_config, run_sweep
    from dse.sweep.executors import InlineExecutor

    out, scratch = tmp_path / "out", tmp_path / "scratch"
    scratch.mkdir()
    store = out / STORE_FILE
    run_sweep(parse_config(_text(out), "s.yaml"), train_fn=fake_train, executor=InlineExecutor(),
              reports=False)
    if journal != "none":
        subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(store)], check=True, timeout=60)
        assert Path(f"{store}-wal").stat().st_size > 0
        if journal == "wal":
            Path(f"{store}-shm").unlink()
    kept = {path.name: path.read_bytes() for path in out.iterdir() if not path.name.endswith("-shm")}
    names = sorted(path.name for path in out.iterdir())

    def full_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    result = subprocess.run([sys.executable, "-m", "dse.cli", "report", str(out)], capture_output=True,
                            env={**os.environ, "PYTHONPATH": str(repo_root), "TMPDIR": str(scratch)},
                            text=True, preexec_fn=full_disk, timeout=300)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.strip().splitlines() == [f"error: cannot use {store}: disk I/O error (nothing was "
                                                  "written)"]
    assert sorted(path.name for path in out.iterdir()) == names
    assert {name: (out / name).read_bytes() for name in kept} == kept
    assert list(scratch.iterdir()) == []
    with contextlib.closing(sqlite3.connect(store)) as connection:
        times = {row[0] for row in connection.execute("SELECT wall_time_s FROM trials")}
    assert (123.0 in times) == (journal != "none")


def test_files_beside_a_store_another_connection_has_open_are_never_removed(tmp_path: Path) -> None:
    """What a failed read made is removed only where no connection has the store open: while another
    process reads it, its -wal and -shm are that reader's and stay; once the reader is gone (killed:
    nothing closed them), the empty -wal and the -shm go."""
    from dse.sweep.store import _remove_unless_in_use

    store = tmp_path / STORE_FILE
    with contextlib.closing(sqlite3.connect(store)) as connection:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("CREATE TABLE t (x)")
    journal = [Path(f"{store}-wal"), Path(f"{store}-shm")]
    reader = subprocess.Popen(
        [sys.executable, "-c", "import os, sqlite3, sys\nconnection = sqlite3.connect(sys.argv[1])\n"
         "connection.execute('SELECT * FROM t').fetchall()\nprint('open', flush=True)\nsys.stdin.read()\n"
         "os._exit(0)\n", str(store)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout is not None and reader.stdout.readline() == "open\n"
        _remove_unless_in_use(store, journal)
        assert all(file.exists() for file in journal)
    finally:
        reader.communicate(timeout=60)
    assert all(file.exists() for file in journal)  # (killed: left behind)
    _remove_unless_in_use(store, journal)
    assert not any(file.exists() for file in journal)
