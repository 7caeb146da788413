"""One sweep at a time per output folder (dse/sweep/lock.py): a second `dse sweep` on a folder a sweep is
writing is refused at once with one line naming the folder and the running sweep, writes nothing and
trains nothing; `dse report` and `dse export` read beside it; a sweep killed outright (SIGKILL) blocks
nobody; each trial is stored exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.stores import stored_trial_ids

from dse.errors import InputError
from dse.sweep import lock, parse_config, run_sweep
from dse.sweep.executors import InlineExecutor
from dse.sweep.store import STORE_FILE

TRIALS = 12

_RUN = """\
import sys
sys.path.insert(0, {tests!r})
from support.fakes import held_train
from dse.sweep import load_config, run_sweep
run_sweep(load_config({config!r}), train_fn=held_train, reports=False)
"""


def _text(out: Path) -> str:
    return (f"name: locked\nseeds: [0, 1, 2]\ntask: {{model: mlp, dataset: digits, epochs: 1}}\n"
            f"energy: {{workloads: [proxy]}}\n"
            f"trials: [{{format: [fp32, int8, bf16, int16], optimizer: sgd}}]\n"
            f"executor: {{workers: 1}}\noutput: {out}\n")



def _dse(repo_root: Path, cwd: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(repo_root), "DSE_FAKE_LOG": str(cwd / "second.jsonl")}
    return subprocess.Popen([sys.executable, "-m", "dse.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finished(process: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_a_second_sweep_on_a_folder_in_use_is_refused_and_readers_go_on(
        tmp_path: Path, repo_root: Path, tests_dir: Path, fake_train: Callable[..., Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The first sweep (on a local worker) stores a trial and is held in the middle of its run
    (support.fakes' held_train) while a second `dse sweep`, `dse export` and `dse report` run on its
    folder at once. Then its own process is killed outright, as the out-of-memory killer does, its fork
    server and worker left running: none of them keeps the folder locked, and the next run resumes."""
    out, config = tmp_path / "out", tmp_path / "s.yaml"
    config.write_text(_text(out))
    env = {**os.environ, "DSE_RELEASE": str(tmp_path / "never")}
    first = subprocess.Popen([sys.executable, "-c", _RUN.format(tests=str(tests_dir), config=str(config))],
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env=env)
    try:
        deadline = time.monotonic() + 120
        while not stored_trial_ids(out):
            assert first.poll() is None, first.stderr.read().decode() if first.stderr else ""
            assert time.monotonic() < deadline, "the first sweep made no progress"
            time.sleep(0.02)
        started = [_dse(repo_root, tmp_path, "sweep", str(config)),
                   _dse(repo_root, tmp_path, "export", str(out), "--to", "csv"),
                   _dse(repo_root, tmp_path, "report", str(out))]
        second, exported, reported = (_finished(process) for process in started)
        running = first.poll() is None
        os.kill(first.pid, signal.SIGKILL)  # the sweep's process alone: what it started goes on a while
        first.wait()

        # killed outright, it left its lock file (with its text) but nothing holds it: the next run resumes
        assert (out / lock.LOCK_FILE).read_text().startswith(f"pid {first.pid} ")
        before = stored_trial_ids(out)
        log = tmp_path / "resume.jsonl"
        monkeypatch.setenv("DSE_FAKE_LOG", str(log))
        run_sweep(parse_config(config.read_text(), "s.yaml"), train_fn=fake_train, executor=InlineExecutor(),
                  reports=False)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)  # what the first sweep started
        first.wait()
    assert running
    assert second.returncode == 2, (second.stdout, second.stderr)
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"output folder {str(out)!r} is in use by another dse sweep (pid {first.pid} on host " in lines[0]
    assert second.stdout == "" and not (tmp_path / "second.jsonl").exists()  # the second trained nothing
    assert exported.returncode == 0 and len(exported.stdout.splitlines()) > 1, exported.stderr
    assert reported.returncode == 0 and "wrote" in reported.stdout, reported.stderr
    after = stored_trial_ids(out)
    assert len(after) == len(set(after)) == TRIALS and set(before) <= set(after)
    assert len(log.read_text().splitlines()) == TRIALS - len(before)  # each missing trial once
    assert not (out / lock.LOCK_FILE).exists()  # removed by the run that ended


def test_a_sweep_refused_by_the_lock_writes_nothing_even_where_its_folder_is_new(
        tmp_path: Path, fake_train: Callable[..., Any]) -> None:
    """The lock is taken before planning where the folder exists, and before the store is made where it
    does not; either way the refused run leaves the holder's folder as it was."""
    out = tmp_path / "out"
    out.mkdir()
    held = lock.take(out)
    try:
        before = {path.name: path.read_bytes() for path in out.iterdir()}
        with pytest.raises(InputError, match=f"in use by another dse sweep \\(pid {os.getpid()} on host "):
            run_sweep(parse_config(_text(out), "s.yaml"), train_fn=fake_train, executor=InlineExecutor(),
                      reports=False)
        assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    finally:
        lock.release(held)
    assert list(out.iterdir()) == []

    new = tmp_path / "new"  # not there when the sweep starts: another makes it and holds it meanwhile
    holder = _HoldingAfterMaking(new)
    with pytest.raises(InputError, match=f"in use by another dse sweep \\(pid {os.getpid()} on host "):
        run_sweep(parse_config(_text(new), "s.yaml"), train_fn=fake_train, executor=holder, reports=False)
    assert holder.before == {path.name: path.read_bytes() for path in new.iterdir()}
    lock.release(holder.held)


class _HoldingAfterMaking(InlineExecutor):
    """An executor whose start makes the output folder and takes its lock, as another sweep would while
    this one planned; the folder's files as they were then in `before`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __enter__(self) -> InlineExecutor:
        self.folder.mkdir()
        self.held = lock.take(self.folder)
        self.before = {path.name: path.read_bytes() for path in self.folder.iterdir()}
        return self


class _AnotherSweepFirst(InlineExecutor):
    """An executor whose start runs another sweep (named "first") into the same new output folder: the
    window between a sweep's checks of a folder that is not there yet and its taking the lock."""

    def __init__(self, text: str, train: Callable[..., Any]) -> None:
        self.text, self.train = text, train

    def __enter__(self) -> InlineExecutor:
        run_sweep(parse_config(self.text, "first.yaml"), train_fn=self.train, executor=InlineExecutor(),
                  reports=False)
        return self


def test_a_sweep_whose_new_folder_another_sweep_filled_meanwhile_is_refused_under_the_lock(
        tmp_path: Path, fake_train: Callable[..., Any]) -> None:
    """Before: the store of sweep "first" was taken over by "second" without --force (its name replaced,
    its trials mixed with the other's); its checks ran before the folder existed, so before the lock."""
    out = tmp_path / "out"
    first = _text(out).replace("name: locked", "name: first")
    second = parse_config(_text(out).replace("name: locked", "name: second"), "second.yaml")
    with pytest.raises(InputError, match=f"{str(out)!r} holds the results of sweep 'first', not 'second'"):
        run_sweep(second, train_fn=fake_train, executor=_AnotherSweepFirst(first, fake_train), reports=False)
    with sqlite3.connect(out / STORE_FILE) as connection:
        assert dict(connection.execute("SELECT key, value FROM meta"))["name"] == "first"
        assert connection.execute("SELECT COUNT(*) FROM trials").fetchone()[0] == TRIALS
    assert not (out / lock.LOCK_FILE).exists()


def test_a_process_the_sweep_forks_does_not_keep_its_lock(tmp_path: Path) -> None:
    """A figure process forked while the lock is held, still running after the sweep was killed outright
    (the kernel closes the sweep's descriptors; its lock file stays), must not keep the folder locked.
    (A release by the sweep itself removes the file, so a child's copy would go unseen there.)"""
    held = lock.take(tmp_path)
    started, ready = os.pipe()
    child = os.fork()
    if child == 0:  # the forked process (its at-fork handlers have run): outlives the sweep
        os.write(ready, b"1")
        time.sleep(30)
        os._exit(0)
    os.close(ready)
    try:
        assert os.read(started, 1) == b"1"
        lock._HELD.pop(held)
        os.close(held)  # the sweep killed: its descriptor closed, nothing removed
        assert (tmp_path / lock.LOCK_FILE).exists()
        again = lock.take(tmp_path)  # refused if the child still held the lock
        lock.release(again)
    finally:
        os.close(started)
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_the_lock_names_its_holder_and_a_stale_file_takes_over(tmp_path: Path) -> None:
    (tmp_path / lock.LOCK_FILE).write_text("pid 1 on host gone since 2020-01-01 00:00:00 UTC\n")
    held = lock.take(tmp_path)
    try:
        text = json.dumps((tmp_path / lock.LOCK_FILE).read_text())
        assert f"pid {os.getpid()} on host " in text and "gone" not in text
    finally:
        lock.release(held)
    assert not (tmp_path / lock.LOCK_FILE).exists()


def test_a_file_system_that_cannot_lock_runs_the_sweep_and_says_so(
        tmp_path: Path, fake_train: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """flock unsupported (some FUSE and SMB mounts: ENOLCK): the sweep is not refused, it runs and warns
    once that nothing keeps a second sweep out (refusing would make such a folder unusable)."""
    import errno

    def no_locks(descriptor: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(lock.fcntl, "flock", no_locks)
    out = tmp_path / "out"
    with pytest.warns(lock.UnlockedWarning, match="does not support locks") as caught:
        summary = run_sweep(parse_config(_text(out), "s.yaml"), train_fn=fake_train,
                            executor=InlineExecutor(), reports=False)
    assert summary.ran == TRIALS and len(caught) == 1
    assert not (out / lock.LOCK_FILE).exists()


def test_a_file_system_that_cannot_lock_is_one_warning_line_also_with_nothing_to_train(
        tmp_path: Path, fake_train: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """`dse sweep` run again with every trial stored answers from its receipt (cli's path without
    planning); it warned as Python does, in two lines naming contextlib.py and its source line."""
    import errno

    from typer.testing import CliRunner

    import dse.sweep.executors
    import dse.sweep.runner
    import dse.train.loop
    from dse.cli import app

    def no_locks(descriptor: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(lock.fcntl, "flock", no_locks)
    monkeypatch.setattr(dse.sweep.runner, "make_executor", lambda sweep: InlineExecutor())
    monkeypatch.setattr(dse.sweep.runner, "start_worker_server", lambda: None)
    monkeypatch.setattr(dse.sweep.executors, "start_worker_server", lambda: None)
    monkeypatch.setattr(dse.train.loop, "train", lambda config, dataset=None: fake_train(config))
    out, config = tmp_path / "out", tmp_path / "s.yaml"
    config.write_text(_text(out).replace("workers: 1", "workers: 1, group_size: 1"))
    warned = f"warning: {out}: its file system does not support locks"
    for run in ("trains", "nothing to train"):
        result = CliRunner().invoke(app, ["sweep", str(config), "-q"])
        assert result.exit_code == 0, (run, result.output)
        assert result.output.splitlines()[:1] == [f"{warned} ({os.strerror(errno.ENOLCK)}): nothing keeps a "
                                                  "second dse sweep from writing there at the same time"], run
        assert len(result.output.strip().splitlines()) == 1, (run, result.output)


def test_a_second_sweep_is_refused_before_it_starts_its_workers(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: `dse sweep` started its workers' fork server (seconds of torch imports in a process of its
    own) and imported the trainer before run_sweep refused it (6.9 s wall on this 2-core VM under a load
    of 7, 0.9 s after)."""
    from typer.testing import CliRunner

    import dse.sweep.executors
    from dse.cli import app

    out, config = tmp_path / "out", tmp_path / "s.yaml"
    out.mkdir()
    config.write_text(_text(out))
    started: list[bool] = []
    monkeypatch.setattr(dse.sweep.executors, "start_worker_server", lambda: started.append(True))
    held = lock.take(out)
    try:
        result = CliRunner().invoke(app, ["sweep", str(config)])
    finally:
        lock.release(held)
    assert result.exit_code == 2 and "is in use by another dse sweep" in result.output, result.output
    assert started == [] and list(out.iterdir()) == []


def test_a_sweep_starting_while_another_command_checks_the_lock_is_not_refused(tmp_path: Path) -> None:
    """The early check (`refuse_if_held`, before a sweep's imports) took the lock itself, wrote its own
    holder text and let go: a sweep taking the lock in that instant was refused, naming a command that
    was only checking (and might then exit). The check now holds a shared lock for its instant, and a
    taker waits such a lock out (within PROBE_WAIT_S); the check makes no file where there is none."""
    import fcntl
    import threading

    lock.refuse_if_held(tmp_path)  # no lock file: nothing made
    assert not (tmp_path / lock.LOCK_FILE).exists()
    (tmp_path / lock.LOCK_FILE).write_text("")
    checking = os.open(tmp_path / lock.LOCK_FILE, os.O_RDONLY)
    fcntl.flock(checking, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a check, in its instant
    threading.Timer(0.05, os.close, (checking,)).start()
    held = lock.take(tmp_path)  # before: InputError "in use by another dse sweep (pid unknown; ...)"
    try:
        lock.refuse_if_held(tmp_path / "elsewhere")  # (no folder: nothing)
        with pytest.raises(InputError, match=rf"in use by another dse sweep \(pid {os.getpid()} on host "):
            lock.refuse_if_held(tmp_path)  # a real holder is still found at once
    finally:
        lock.release(held)
    lock.refuse_if_held(tmp_path)


def test_a_holder_text_naming_a_process_gone_is_not_quoted_as_the_holder(tmp_path: Path) -> None:
    """A holder that may not write the lock file (another user's, read-only to it) leaves an earlier
    sweep's text there: a refused sweep quoted that text, naming a process that no longer runs."""
    import fcntl
    import socket

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / lock.LOCK_FILE).write_text(f"pid {gone.pid} on host {socket.gethostname()} since "
                                           "2026-01-01 00:00:00 UTC\n")
    holding = os.open(tmp_path / lock.LOCK_FILE, os.O_RDONLY)  # the holder, with no write access
    fcntl.flock(holding, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        for check in (lock.refuse_if_held, lock.take):
            with pytest.raises(InputError) as refused:
                check(tmp_path)
            assert f"pid {gone.pid}" not in str(refused.value)
            assert "pid unknown: the lock file names an earlier sweep" in str(refused.value)
    finally:
        os.close(holding)
