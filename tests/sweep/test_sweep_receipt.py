"""A rerun of `dse sweep` with nothing to train answers from the store (dse.sweep.receipt): the same
summary, notes, store and report files as a full run, without planning; and never when anything the
plan was made from changed (the file, an override, dse's code, a stored trial, --force, a run through
the Python API in between)."""

from __future__ import annotations

import dataclasses
import re
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dse.cli import app
from dse.sweep import load_config, load_trials, run_sweep
from dse.sweep import runner as sweep_runner
from dse.sweep.receipt import reads_other_files

SWEEP = """\
name: receipt
seeds: [0]
task: {model: mlp, dataset: digits, epochs: 1, batch_size: 64}
energy: {workloads: [proxy]}
trials:
  - {format: [fp32, int8], optimizer: sgd}
executor: {backend: local, workers: 1}
output: out
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-trial sweep (its file and its output folder `out`), trained once for the module."""
    root = tmp_path_factory.mktemp("receipt")
    (root / "sweep.yaml").write_text(SWEEP)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        result = CliRunner().invoke(app, ["sweep", "sweep.yaml", "-q"])
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def sweep_dir(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the finished sweep, the working folder; planned once here (a new folder is a new
    command), so that its store holds this command's receipt."""
    root = tmp_path / "copy"
    shutil.copytree(trained, root)
    monkeypatch.chdir(root)
    assert sweep(0).exit_code == 0
    return root


@pytest.fixture
def plans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the sweeps planned from here on (dse.sweep.runner.plan_sweep)."""
    calls: list[int] = []
    plan = sweep_runner.plan_sweep

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return plan(*args, **kwargs)

    monkeypatch.setattr(sweep_runner, "plan_sweep", counted)
    return calls


def sweep(exit_code: int | None = 0, *options: str) -> Any:
    result = CliRunner().invoke(app, ["sweep", "sweep.yaml", *options])
    if exit_code is not None:
        assert result.exit_code == exit_code, result.output
    return result


def without_durations(text: str) -> str:
    return re.sub(r"\bin \d+(\.\d+)?s\b|\d+:\d\d:\d\d", "", text)


def report_files(root: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((root / "out").iterdir())
            if "sqlite" not in path.name}


def test_a_rerun_with_nothing_to_train_gives_what_a_full_run_gives_without_planning(
        sweep_dir: Path, plans: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    files = report_files(sweep_dir)
    with monkeypatch.context() as patch:
        patch.setattr("dse.sweep.receipt.finished_sweep", lambda *args: None)  # the full run, for reference
        full = sweep()
    assert plans == [1]
    trials = load_trials(sweep_dir / "out")
    answered = sweep()
    assert plans == [1]  # not planned again
    assert without_durations(answered.stdout) == without_durations(full.stdout)
    assert "2 trials: 2 ok, 0 diverged, 0 failed (0 run now, 2 from an earlier run)" in answered.stdout
    assert load_trials(sweep_dir / "out").equals(trials) and report_files(sweep_dir) == files
    assert sweep(0, "-q").stdout == "" and plans == [1]


def _edit_file(root: Path) -> None:
    (root / "sweep.yaml").write_text(SWEEP + "# a comment changes the text, so the command plans again\n")


def _forget_a_trial(root: Path) -> None:
    with sqlite3.connect(root / "out" / "sweep.sqlite") as connection:
        connection.execute("DELETE FROM trials WHERE label = 'int8 sgd'")


def _run_through_the_api(root: Path) -> None:
    summary = run_sweep(load_config(root / "sweep.yaml"))
    assert summary.ran == 0


def _store_a_failure(root: Path) -> None:
    with sqlite3.connect(root / "out" / "sweep.sqlite") as connection:
        connection.execute("UPDATE trials SET status = 'error' WHERE label = 'int8 sgd'")


CHANGES: dict[str, tuple[Callable[[Path], None] | None, tuple[str, ...], int]] = {
    "the sweep file's text": (_edit_file, (), 0),
    "the group size given": (None, ("--group-size", "1"), 0),
    "the output given": (None, ("-o", "out"), 0),
    "a trial no longer stored": (_forget_a_trial, (), 1),
    "--force": (None, ("--force",), 2),
    "--retry-failed with a failed trial": (_store_a_failure, ("--retry-failed",), 1),
    "a run through the Python API in between": (_run_through_the_api, (), 0),
}
"""What changes -> (how, the options of the rerun, the trials it trains)."""


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_rerun_plans_again_when_anything_its_plan_was_made_from_changed(
        sweep_dir: Path, plans: list[int], change: str) -> None:
    edit, options, trains = CHANGES[change]
    if edit is not None:
        edit(sweep_dir)
    before = len(plans)  # (the API run plans once itself)
    result = sweep(0, *options)
    assert len(plans) == before + 1
    assert f"({trains} run" in result.stdout.replace("\n", " ")


def test_a_rerun_plans_again_when_dse_itself_changed(sweep_dir: Path, plans: list[int],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Another version of dse's code, tables or libraries (the code fingerprint) could plan otherwise:
    other energies, other checks."""
    monkeypatch.setattr("dse.sweep.receipt.code_fingerprint", lambda: "another version of dse")
    sweep()
    assert plans == [1]


def test_a_rerun_of_a_failed_trial_without_retry_failed_needs_no_plan(sweep_dir: Path,
                                                                      plans: list[int]) -> None:
    """A full run would skip the stored failure too (only --retry-failed reruns it)."""
    _store_a_failure(sweep_dir)
    result = sweep()
    assert plans == [] and "1 ok, 0 diverged, 1 failed (0 run now" in result.stdout


def test_a_bad_sweep_file_is_reported_as_ever(sweep_dir: Path, plans: list[int]) -> None:
    (sweep_dir / "sweep.yaml").write_text(SWEEP.replace("epochs: 1", "epochs: one"))
    result = sweep(2)
    assert "epochs" in result.output and "Traceback" not in result.output


def test_a_sweep_that_reads_other_files_gets_no_receipt(trained: Path) -> None:
    """Whether a data folder, a user's code or an energy table changed is not cheap to tell: such a
    sweep plans on every run."""
    plain = load_config(trained / "sweep.yaml")
    task = plain.tasks[0]

    def with_task(**fields: Any) -> Any:
        return plain.replace(tasks=(dataclasses.replace(task, defaults={**task.defaults, **fields}),))

    assert not reads_other_files(plain)
    assert reads_other_files(with_task(data_dir=str(trained)))
    assert reads_other_files(with_task(dataset="mnist"))
    assert reads_other_files(with_task(model="my_models.py:build"))
    assert reads_other_files(with_task(dataset="my_data.py:load"))
    assert reads_other_files(plain.replace(energy=dataclasses.replace(plain.energy, table="mine.yaml")))
    assert reads_other_files(plain.replace(energy=dataclasses.replace(plain.energy,
                                                                      sources={"net": "/x/net.onnx"})))


def test_workers_start_before_planning_only_where_the_sweep_will_most_likely_train(sweep_dir: Path) -> None:
    """The fork server's imports (seconds) overlap the planning when there is something to train, and are
    not paid by a rerun that will find nothing."""
    from dse.sweep.receipt import likely_to_train

    config = sweep_dir / "sweep.yaml"
    assert not likely_to_train(config, None, force=False)
    assert likely_to_train(config, None, force=True)
    assert likely_to_train(config, sweep_dir / "elsewhere", force=False)  # a fresh output: all to train
    _forget_a_trial(sweep_dir)
    assert likely_to_train(config, None, force=False)
    config.write_text(SWEEP.replace("backend: local", "backend: ray"))
    assert not likely_to_train(config, None, force=True)  # Ray's workers are not ours to start


def test_a_command_that_trains_reads_its_file_and_store_once_before_planning_and_its_trials_once_after(
        sweep_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether the rerun is answered from the store and whether to start the workers early are decided
    from one read of the sweep file and its store; the final counts, reports and fronts from one read
    of its trials (and one before training: the best trial so far, for the progress display)."""
    from dse.sweep import receipt, runner, store, summary

    reads: dict[str, int] = {"file": 0, "store": 0, "trials": 0}

    def counted(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def count(*args: Any, **kwargs: Any) -> Any:
            reads[name] += 1
            return function(*args, **kwargs)
        return count

    monkeypatch.setattr(receipt, "load_yaml", counted("file", receipt.load_yaml))
    monkeypatch.setattr(receipt, "stored_progress", counted("store", receipt.stored_progress))
    load_trials = counted("trials", store.load_trials)
    for module in (store, runner, summary):
        monkeypatch.setattr(module, "load_trials", load_trials)
    _forget_a_trial(sweep_dir)
    assert "2 trials: 2 ok, 0 diverged, 0 failed (1 run now, 1 from an earlier run)" in sweep().stdout
    assert reads == {"file": 1, "store": 1, "trials": 2}


def test_a_sweep_file_found_invalid_after_the_workers_started_leaves_no_process_behind(
        tmp_path: Path, repo_root: Path, process_tree: Callable[[int], dict[int, str]],
        survivors: Callable[[dict[int, str], float], dict[int, str]]) -> None:
    """The fork server starts before the file is validated (its imports overlap the planning); a file that
    is valid YAML but not a valid sweep ends the command with its one-line error and the server with it,
    not once the server has finished seconds of imports for nothing."""
    import os
    import subprocess
    import sys
    import time

    config, errors = tmp_path / "bad.yaml", tmp_path / "stderr.txt"
    config.write_text(SWEEP.replace("[fp32, int8]", "[fp32, int99]"))
    env = {**os.environ, "PYTHONPATH": f"{repo_root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    seen: dict[int, str] = {}
    with errors.open("wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "dse.cli", "sweep", str(config)], cwd=tmp_path,
                                   start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    try:
        while process.poll() is None:
            seen.update(process_tree(process.pid))
            time.sleep(0.02)
        left = survivors(seen, 0.5)
    finally:
        for pid in process_tree(process.pid):  # whatever is left of its session
            os.kill(pid, 9)
    assert process.returncode == 2
    assert errors.read_text().splitlines() == [
        f"error: {config}:6: trials[0].format[1]: invalid format spec 'int99': bits must be in 2..32, got 99"]
    assert len(seen) > 1, seen  # the server started (else this checks nothing)
    assert not left, f"processes outlived the command: {left}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("reports_current", [True, False])
def test_the_summary_tables_are_built_once_per_sweep_command(sweep_dir: Path, plans: list[int],
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             reports_current: bool) -> None:
    """The tables that write the reports also print the fronts (SweepTables.of once, not again for the
    printout); with the reports current, the printout builds them."""
    from dse.report import SweepTables

    built: list[int] = []
    of = SweepTables.of.__func__  # type: ignore[attr-defined]

    def counted(cls: type[SweepTables], *args: Any, **kwargs: Any) -> SweepTables:
        built.append(1)
        return of(cls, *args, **kwargs)

    monkeypatch.setattr(SweepTables, "of", classmethod(counted))
    if not reports_current:
        (sweep_dir / "out" / ".reports.json").unlink()
    result = sweep()
    assert "Pareto front" in result.stdout
    assert (sweep_dir / "out" / ".reports.json").is_file() and built == [1]


@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["LF", "CRLF"])
def test_a_rerun_of_an_lf_or_crlf_sweep_file_needs_no_plan(sweep_dir: Path, plans: list[int],
                                                         newline: str) -> None:
    """The sweep file is read once; its receipt and the rerun's check hash the same text, the file's
    text as Python reads it (universal newlines: a CRLF file is its LF text). So the LF file planned
    (by the fixture) and the same file saved with CRLF are both answered from the store, and the store
    keeps the LF text's receipt and YAML. (Before, the check hashed the raw bytes: a CRLF file planned
    in full on every rerun.)"""
    import json

    from dse.digests import sha256_hex

    (sweep_dir / "sweep.yaml").write_bytes(SWEEP.replace("\n", newline).encode())
    for _ in range(2):
        answered = sweep()
        assert plans == [] and "(0 run now, 2 from an earlier run)" in answered.stdout
    with sqlite3.connect(sweep_dir / "out" / "sweep.sqlite") as connection:
        meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
    assert json.loads(meta["receipt"])["text_sha256"] == sha256_hex(SWEEP.encode())
    assert meta["config_yaml"] == SWEEP


def test_a_planned_rerun_reads_the_sweep_file_once(sweep_dir: Path, plans: list[int],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The bytes read to check the receipt are the ones validated and planned (no second read, which
    could also see another text than the one checked)."""
    reads: list[str] = []
    read_bytes, read_text = Path.read_bytes, Path.read_text

    def counted_bytes(path: Path) -> bytes:
        reads.append(path.name)
        return read_bytes(path)

    def counted_text(path: Path, *args: Any, **kwargs: Any) -> str:
        reads.append(path.name)
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_bytes", counted_bytes)
    monkeypatch.setattr(Path, "read_text", counted_text)
    sweep(0, "--group-size", "1")  # another override: planned in full, nothing to train
    assert plans == [1] and reads.count("sweep.yaml") == 1


@given(st.one_of(st.binary(max_size=64),
                 st.lists(st.sampled_from(["a: 1", "\r\n", "\n", "\r", "\ufeff", "µ", " "]), max_size=12)
                 .map(lambda parts: "".join(parts).encode())))
@settings(max_examples=200)
def test_the_text_of_bytes_read_once_is_what_read_text_reads(data: bytes) -> None:
    """file_text (the sweep file's bytes, read once, as text) is Path.read_text's text: UTF-8 with
    universal newlines (CRLF and CR as LF), a BOM kept, the same error for bytes that are not UTF-8."""
    import tempfile

    from dse.yaml_lines import file_text

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sweep.yaml"
        path.write_bytes(data)
        try:
            expected: str | type[UnicodeDecodeError] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            expected = UnicodeDecodeError
    try:
        assert file_text(data) == expected
    except UnicodeDecodeError:
        assert expected is UnicodeDecodeError
