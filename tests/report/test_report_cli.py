"""`dse report DIR` and `dse export DIR` on a real sweep store filled with synthetic trials."""

from __future__ import annotations

import contextlib
import io
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from dse.cli import app
from dse.report import render_table
from dse.sweep.store import load_trials

runner = CliRunner()


@pytest.fixture(scope="module")
def sweep_dir(store_trials: Callable[[Path, pd.DataFrame], None],
              make_example_trials: Callable[..., pd.DataFrame],
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of the example sweep, on one workload to keep the plots few (write_reports' own tests
    cover several)."""
    directory = tmp_path_factory.mktemp("sweep")
    store_trials(directory, make_example_trials(workloads=("resnet50",)))
    return directory


def front_sections(stdout: str) -> dict[str, list[str]]:
    """Config labels printed in each 'Pareto front: <task> on <workload>' table."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in stdout.splitlines():
        if "Pareto front:" in line:
            current = line.split("Pareto front:")[1].split("(")[0].strip()
            sections[current] = []
        elif current and line.startswith("│"):
            cells = [c.strip() for c in line.split("│")[1:-1]]
            if cells[0] != "Config":
                sections[current].append(cells[0])
    return sections


def test_report_prints_the_tables_and_rewrites_every_file(sweep_dir: Path) -> None:
    (sweep_dir / "summary.csv").unlink(missing_ok=True)
    result = runner.invoke(app, ["report", str(sweep_dir)])
    assert result.exit_code == 0, result.output
    assert "Summary over seeds" in result.stdout and "posit8 & 50%" in result.stdout
    pareto = pd.read_csv(sweep_dir / "pareto.csv")
    printed = front_sections(result.stdout)
    assert set(printed) == {"mlp-digits on resnet50", "cnn-m1d on resnet50"}
    for (task, workload), rows in pareto.groupby(["task", "workload"]):
        assert printed[f"{task} on {workload}"] == list(rows["label"])
    assert printed["mlp-digits on resnet50"] == ["int8 niti", "lns8 madam", "fp32 sgd"]
    for name in ("summary.csv", "trials.csv", "pareto.tex", "summary.md", "pareto_mlp-digits_resnet50.png",
                 "breakdown_cnn-m1d_resnet50.pdf"):
        assert (sweep_dir / name).stat().st_size > 0
    assert "wrote 16 files" in result.stdout


def test_report_with_memory_adds_the_memory_objective(make_trial_row: Callable[..., dict[str, Any]],
                                                      make_trials_frame: Callable[..., pd.DataFrame],
                                                      store_trials: Callable[[Path, pd.DataFrame], None],
                                                      tmp_path: Path) -> None:
    rows = [make_trial_row("t", "small", 0, 0.9, {"w": 2.0}, memory_mib={"w": 1.0}),
            make_trial_row("t", "fast", 0, 0.9, {"w": 1.0}, memory_mib={"w": 5.0}),
            make_trial_row("t", "big", 0, 0.9, {"w": 3.0}, memory_mib={"w": 6.0})]
    store_trials(tmp_path, make_trials_frame(rows, ["w"]))
    result = runner.invoke(app, ["report", str(tmp_path), "--memory"])
    assert result.exit_code == 0, result.output
    assert "min memory" in result.stdout and "Memory (MiB)" in result.stdout
    assert front_sections(result.stdout) == {"t on w": ["fast", "small"]}
    assert list(pd.read_csv(tmp_path / "pareto.csv")["memory_mib"]) == [5.0, 1.0]


def test_export_writes_one_table(sweep_dir: Path, tmp_path: Path) -> None:
    trials = load_trials(sweep_dir)
    result = runner.invoke(app, ["export", str(sweep_dir), "--to", "csv"])
    assert result.exit_code == 0, result.output
    assert result.stdout == render_table(trials, "summary", "csv")
    summary = pd.read_csv(io.StringIO(result.stdout))
    assert len(summary) == 12 and summary["accuracy_mean"].isna().sum() == 2
    out = tmp_path / "tables" / "pareto.tex"
    result = runner.invoke(app, ["export", str(sweep_dir), "--to", "latex", "--table", "pareto",
                                 "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text() == render_table(trials, "pareto", "latex")
    assert r"\toprule" in out.read_text() and str(out) in result.stdout
    result = runner.invoke(app, ["export", str(sweep_dir), "--to", "markdown", "--table", "pareto"])
    assert result.stdout.startswith("| Task | Workload | Config |")


@pytest.mark.parametrize(("args", "words"), [
    (["export", "EMPTY", "--to", "csv"], "no sweep store in"),
    (["report", "EMPTY"], "no sweep store in"),
    (["export", "SWEEP", "--to", "html", "--output", "OUT"], "unknown export format 'html'"),
    (["export", "SWEEP", "--to", "csv", "--table", "front", "--output", "OUT"], "unknown table 'front'"),
    (["export", "SWEEP", "--to", "csv", "--output", "EMPTY"], "is a directory"),
    (["export", "SWEEP", "--to", "csv", "--output", "BLOCKED"], "cannot write"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(sweep_dir: Path, tmp_path: Path, args: list[str],
                                                          words: str) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    paths = {"EMPTY": str(empty), "SWEEP": str(sweep_dir), "OUT": str(tmp_path / "out.csv"),
             "BLOCKED": str(blocker / "out.csv")}
    result = runner.invoke(app, [paths.get(a, a) for a in args])
    assert result.exit_code == 2, result.output
    assert words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file"]
    assert list(empty.iterdir()) == []


def test_report_with_titles_leaves_no_stale_cache_for_the_next_sweep_run(
        store_trials: Callable[[Path, pd.DataFrame], None], make_example_trials: Callable[..., pd.DataFrame],
        tmp_path: Path) -> None:
    """The files a sweep rerun keeps (write_reports_if_changed) are those of the options it asks for: after
    `dse report --titles`, a rerun with nothing to train writes its untitled plots again."""
    from dse.report.files import write_reports_if_changed

    store_trials(tmp_path, make_example_trials(workloads=("resnet50",)))
    frame = load_trials(tmp_path)
    plot = tmp_path / "pareto_mlp-digits_resnet50.pdf"
    write_reports_if_changed(frame, tmp_path)
    untitled = plot.read_bytes()
    result = runner.invoke(app, ["report", str(tmp_path), "--titles"])
    assert result.exit_code == 0, result.output
    assert plot.read_bytes() != untitled
    write_reports_if_changed(frame, tmp_path)
    assert plot.read_bytes() == untitled


def test_report_on_an_unchanged_store_leaves_its_files_and_says_they_are_current(sweep_dir: Path) -> None:
    """The second `dse report` prints the same tables and draws nothing (the files are as it would write
    them); after a file is edited it writes them all again."""
    import os

    first = runner.invoke(app, ["report", str(sweep_dir)])
    assert first.exit_code == 0, first.output
    files = [p for p in sweep_dir.iterdir() if not p.name.startswith(".") and "sqlite" not in p.name]
    for path in files:
        os.utime(path, (0, 0))
    again = runner.invoke(app, ["report", str(sweep_dir)])
    assert again.exit_code == 0, again.output
    tables = [result.stdout[:result.stdout.rindex(f"{len(files)} files")].rsplit("\n", 1)[0]
              for result in (first, again)]  # all but the last line, on the files
    assert tables[0] == tables[1] and "Summary over seeds" in tables[0]
    assert f"{len(files)} files in {sweep_dir} are up to date" in again.stdout
    assert all(path.stat().st_mtime == 0 for path in files)
    (sweep_dir / "pareto.md").write_text("edited\n")
    third = runner.invoke(app, ["report", str(sweep_dir)])
    assert f"wrote {len(files)} files" in third.stdout and (sweep_dir / "pareto.md").read_text() != "edited\n"


def test_a_results_folder_copied_elsewhere_keeps_its_reports_current(sweep_dir: Path, tmp_path: Path) -> None:
    """No report file holds the folder's path, so a copy (another machine, read-only media) needs no
    rewrite: before, its path in the reports' signature made `dse report` rewrite every file of a copy,
    and fail on read-only media after printing the tables."""
    import shutil

    assert runner.invoke(app, ["report", str(sweep_dir)]).exit_code == 0
    copy = tmp_path / "copied" / "results"
    shutil.copytree(sweep_dir, copy)
    before = {path.name: path.read_bytes() for path in copy.iterdir()}
    files = [name for name in before if not name.startswith(".") and "sqlite" not in name]
    again = runner.invoke(app, ["report", str(copy)])
    assert again.exit_code == 0, again.output
    assert "are up to date" in again.stdout and "wrote" not in again.stdout and files
    assert {path.name: path.read_bytes() for path in copy.iterdir()} == before


@pytest.mark.skipif(sys.platform != "linux", reason="figures are drawn in processes on Linux only")
def test_a_figure_process_that_dies_is_one_warning_line_naming_the_figures_drawn_instead(
        store_trials: Callable[[Path, pd.DataFrame], None], make_example_trials: Callable[..., pd.DataFrame],
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A figure process killed while it draws (here: it exits at its first figure) leaves the figures it
    had not saved to the main process: the report is whole and the same, and stderr says so in one
    `warning:` line naming them (no silent slowdown)."""
    import os

    import dse.report.files as files
    from dse.report import SweepTables

    expected, directory = tmp_path / "expected", tmp_path / "sweep"
    for path in (expected, directory):
        path.mkdir()
        store_trials(path, make_example_trials(workloads=("resnet50",)))
    assert runner.invoke(app, ["report", str(expected)]).exit_code == 0
    parent, save = os.getpid(), files.save_figure
    monkeypatch.setattr(files, "save_figure", lambda figure, stem: save(figure, stem)
                        if os.getpid() == parent else os._exit(1))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # processes even on a one-core machine
    result = runner.invoke(app, ["report", str(directory)])
    assert result.exit_code == 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: a figure process died; "), result.stderr
    named = lines[0].split("one after another: ")[1].split(", ")
    figures = {job.stem.name for job in files.figure_jobs(SweepTables.of(load_trials(directory)), directory)}
    assert named and set(named) <= figures and f"{len(named)} figure" in lines[0]
    for path in expected.iterdir():
        if "sqlite" not in path.name and path.name != ".reports.json":  # its signature hashes the folder
            assert (directory / path.name).read_bytes() == path.read_bytes(), path.name
    assert not list(directory.glob("*.tmp")) and not list(directory.glob(".*.tmp"))


_SLOW_SUMMARY = """
import sys, time
from pathlib import Path
import dse.report.files as files
from dse.cli import app
write_atomically = files.write_atomically

def slow(path, write):  # summary.csv: written whole to its temporary, then the process waits there
    def then_wait(temporary):
        write(temporary)
        if path.name == "summary.csv":
            Path(sys.argv[2]).touch()
            time.sleep(600)
    return write_atomically(path, then_wait)

files.write_atomically = slow
app(["report", sys.argv[1]])
"""


@pytest.mark.skipif(sys.platform != "linux", reason="signals and /proc as on Linux")
@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_report_stopped_by_a_signal_while_it_writes_leaves_no_temporary_file(
        number: signal.Signals, sweep_dir: Path, tmp_path: Path, repo_root: Path,
        process_tree: Callable[[int], dict[int, str]],
        survivors: Callable[[dict[int, str], float], dict[int, str]]) -> None:
    """SIGTERM (a scheduler, `kill`) or Ctrl-C while `dse report` writes its tables: the file being
    written keeps its previous content, no temporary file is left (its own or a figure process's), no
    process is left, one line says so and the exit code is 128 + the signal's number."""
    import os
    import shutil
    import subprocess
    import time

    directory, waiting = tmp_path / "sweep", tmp_path / "waiting"
    shutil.copytree(sweep_dir, directory)
    (directory / ".reports.json").unlink(missing_ok=True)  # written again
    (directory / "summary.csv").write_text("the previous summary\n")
    env = {**os.environ, "PYTHONPATH": f"{repo_root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen([sys.executable, "-c", _SLOW_SUMMARY, str(directory), str(waiting)],
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=env, cwd=repo_root)
    try:
        deadline = time.monotonic() + 120
        while not waiting.exists():
            assert process.poll() is None and time.monotonic() < deadline, "the report did not get there"
            time.sleep(0.05)
        started = process_tree(process.pid)
        process.send_signal(number)
        _, stderr = process.communicate(timeout=60)
        left = survivors(started, 30.0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == 128 + number, stderr
    assert stderr.decode().splitlines() == [f"interrupted by {number.name}: no file in {directory} is "
                                            "half-written; run the same command again to write them"]
    assert (directory / "summary.csv").read_text() == "the previous summary\n"
    assert not [path.name for path in directory.iterdir() if path.suffix == ".tmp"]
    assert not left, f"processes outlived the report: {left}"
    result = runner.invoke(app, ["report", str(directory)])  # as the line says
    assert result.exit_code == 0 and (directory / "summary.csv").read_text() != "the previous summary\n"


@pytest.fixture(scope="module")
def priced_dir(store_trials: Callable[..., None], make_example_trials: Callable[..., pd.DataFrame],
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sweep_dir's trials in a store whose energy rows price their runs: every configuration has a run
    mean (here each its iteration's energy)."""
    directory = tmp_path_factory.mktemp("priced")
    store_trials(directory, make_example_trials(workloads=("resnet50",)), priced_runs=True)
    return directory


@pytest.mark.parametrize("command", [["report"], ["export", "--to", "csv", "--table", "pareto"]])
def test_front_energy_chooses_the_energy_every_front_ranks_by(priced_dir: Path, tmp_path: Path,
                                                              command: list[str]) -> None:
    """By default a store with every run mean ranks by it (the one-iteration figure beside it); the
    option ranks by one iteration instead, or asks for the run mean explicitly."""
    fronts = {}
    for choice in (None, "iteration", "run-mean"):
        out = tmp_path / f"{choice}.csv"
        extra = [] if choice is None else ["--front-energy", choice]
        args = [command[0], str(priced_dir), *command[1:], *extra]
        if command[0] == "export":
            args += ["--output", str(out)]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        fronts[choice] = pd.read_csv(out if command[0] == "export" else priced_dir / "pareto.csv")
    assert "iteration_energy_mj" in fronts[None].columns  # ranked by the run's mean
    assert fronts["run-mean"].equals(fronts[None])
    assert "iteration_energy_mj" not in fronts["iteration"].columns
    assert fronts["iteration"]["energy_mj"].tolist() == fronts[None]["iteration_energy_mj"].tolist()


@pytest.mark.parametrize("command", [["report"], ["export", "--to", "csv", "--table", "pareto"]])
def test_front_energy_run_mean_on_a_store_without_it_is_one_line_exit_2_and_nothing_written(
        store_trials: Callable[..., None], make_example_trials: Callable[..., pd.DataFrame], tmp_path: Path,
        command: list[str]) -> None:
    """A store whose energy rows predate run pricing has no run mean: asked for it, the report names a
    configuration that lacks it and how to get it, and writes nothing; by iteration it reports."""
    directory = tmp_path / "old"
    directory.mkdir()
    store_trials(directory, make_example_trials(workloads=("resnet50",)))
    before = sorted(p.name for p in directory.iterdir())
    out = tmp_path / "pareto.csv"
    args = [command[0], str(directory), *command[1:], "--front-energy", "run-mean"]
    result = runner.invoke(app, args + (["--output", str(out)] if command[0] == "export" else []))
    assert result.exit_code == 2, result.output
    assert "--front-energy run-mean: configuration" in result.stderr and "has no run mean" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert sorted(p.name for p in directory.iterdir()) == before and not out.exists()
    wrong = runner.invoke(app, [command[0], str(directory), *command[1:], "--front-energy", "joules"])
    assert wrong.exit_code == 2 and "unknown --front-energy 'joules'" in wrong.stderr
    assert runner.invoke(app, args[:-1] + ["iteration"]).exit_code == 0
