"""One sweep at a time per output folder (dse/sweep/lock.py): a second `dse sweep` on a folder a sweep is
writing is refused at once with one line naming the folder and the running sweep, writes nothing and
trains nothing; `dse report` and `dse export` read beside it; a sweep killed outright (SIGKILL) blocks
nobody; each trial is stored exactly once."""

from __future__ import annotations

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


def _stored(out: Path) -> list[str]:
    try:
        with sqlite3.connect(f"file:{out / STORE_FILE}?mode=ro", uri=True, timeout=5) as connection:
            return [row[0] for row in connection.execute("SELECT trial_id FROM trials")]
    except sqlite3.OperationalError:
        return []


def _dse(repo_root: Path, cwd: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(repo_root), "DSE_FAKE_LOG": str(cwd / "second.jsonl")}
    return subprocess.Popen([sys.executable, "-m", "dse.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finished(process: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_a_second_sweep_on_a_folder_in_use_is_refused_and_readers_go_on(tmp_path: Path, repo_root: Path,
                                                                        tests_dir: Path) -> None:
    """The first sweep stores a trial and is held in the middle of its run (support.fakes'
    held_train) while a second `dse sweep`, `dse export` and `dse report` run on its folder at once."""
    out, config = tmp_path / "out", tmp_path / "s.yaml"
    config.write_text(_text(out))
    env = {**os.environ, "DSE_RELEASE": str(tmp_path / "never")}
    first = subprocess.Popen([sys.executable, "-c", _RUN.format(tests=str(tests_dir), config=str(config))],
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env=env)
    try:
        deadline = time.monotonic() + 120
        while not _stored(out):
            assert first.poll() is None, first.stderr.read().decode() if first.stderr else ""
            assert time.monotonic() < deadline, "the first sweep made no progress"
            time.sleep(0.02)
        started = [_dse(repo_root, tmp_path, "sweep", str(config)),
                   _dse(repo_root, tmp_path, "export", str(out), "--to", "csv"),
                   _dse(repo_root, tmp_path, "report", str(out))]
        second, exported, reported = (_finished(process) for process in started)
        running = first.poll() is None
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the first sweep and what it started: killed outright
        first.wait()
    assert running
    assert second.returncode == 2, (second.stdout, second.stderr)
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"output folder {str(out)!r} is in use by another dse sweep (pid {first.pid} on host " in lines[0]
    assert not (tmp_path / "second.jsonl").exists()  # the second trained nothing
    assert exported.returncode == 0 and len(exported.stdout.splitlines()) > 1, exported.stderr
    assert reported.returncode == 0 and "wrote" in reported.stdout, reported.stderr

    # killed outright, it left its lock file (with its text) but holds nothing: the next run resumes
    assert (out / lock.LOCK_FILE).read_text().startswith(f"pid {first.pid} ")
    before = _stored(out)
    log = tmp_path / "resume.jsonl"
    env = {**os.environ, "DSE_FAKE_LOG": str(log)}
    script = _RUN.format(tests=str(tests_dir), config=str(config))
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)  # (no DSE_RELEASE)
    after = _stored(out)
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


def test_a_process_the_sweep_forks_does_not_keep_its_lock(tmp_path: Path) -> None:
    """A figure process forked while the lock is held, still running after the sweep released it (or was
    killed), must not keep the folder locked."""
    held = lock.take(tmp_path)
    child = os.fork()
    if child == 0:  # the forked process: outlives the lock's release below
        time.sleep(3)
        os._exit(0)
    try:
        lock.release(held)
        again = lock.take(tmp_path)  # refused if the child still held the lock
        lock.release(again)
    finally:
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
