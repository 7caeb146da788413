"""write_reports: every table and plot file, CSV round trips, PNG/PDF magic bytes, atomic replacement."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from dse.errors import InputError
from dse.report import summarize_trials, write_reports
from dse.report.files import REPORTS_STAMP, write_atomically, write_text_atomically

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PDF_MAGIC = b"%PDF-"


@pytest.fixture(scope="module")
def reports(make_example_trials: Callable[..., pd.DataFrame],
            tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """The example sweep's reports, written once for the tests that only read them."""
    out = tmp_path_factory.mktemp("reports") / "results" / "sweep"
    return out, write_reports(make_example_trials(), out)


def test_write_reports_writes_every_file(reports: tuple[Path, list[Path]]) -> None:
    out, written = reports
    tables = {"trials.csv", "summary.csv", "pareto.csv", "all_points.csv", "summary.tex", "summary.md",
              "pareto.tex", "pareto.md"}
    plots = {f"{kind}_{task}_{workload}.{suffix}" for kind in ("pareto", "breakdown")
             for task in ("mlp-digits", "cnn-m1d") for workload in ("proxy", "resnet50")
             for suffix in ("png", "pdf")}
    assert [p.parent for p in written] == [out] * len(written)
    assert {p.name for p in written} == tables | plots
    assert len(written) == len(tables | plots)
    assert {p.name for p in out.iterdir()} == tables | plots | {REPORTS_STAMP}  # no temporary file left
    for path in written:
        data = path.read_bytes()
        if path.suffix == ".png":
            assert data.startswith(PNG_MAGIC) and len(data) > 5000
        elif path.suffix == ".pdf":
            assert data.startswith(PDF_MAGIC) and len(data) > 1000
        else:
            assert data


def test_csv_files_round_trip(example_trials: pd.DataFrame, reports: tuple[Path, list[Path]]) -> None:
    out, _ = reports
    trials = example_trials
    read = pd.read_csv(out / "trials.csv")
    # CSV writes None (weight_grads: same as gradients) and "" (no error) as empty fields: NaN when read
    expected = trials.astype({"weight_grads": float}).replace({"error": {"": math.nan}})
    pd.testing.assert_frame_equal(read, expected, check_dtype=False)
    summary = pd.read_csv(out / "summary.csv")
    expected = summarize_trials(trials)
    assert list(summary.columns) == list(expected.columns)
    pd.testing.assert_series_equal(summary["accuracy_std"], expected["accuracy_std"])
    pareto = pd.read_csv(out / "pareto.csv")
    # mlp-digits on proxy: lns8 (0.94, 1.0) and fp32 (0.95, 4.0); on resnet50 also int8 (0.90, 200)
    digits = pareto[pareto["task"] == "mlp-digits"]
    assert list(digits[digits["workload"] == "proxy"]["label"]) == ["lns8 madam", "fp32 sgd"]
    assert list(digits[digits["workload"] == "resnet50"]["label"]) == ["int8 niti", "lns8 madam", "fp32 sgd"]
    assert set(pareto["task"]) == {"mlp-digits", "cnn-m1d"}


def test_markdown_and_latex_files_hold_the_summary(reports: tuple[Path, list[Path]]) -> None:
    out, _ = reports
    markdown = (out / "summary.md").read_text()
    assert len(markdown.splitlines()) == 2 + 12
    latex = (out / "pareto.tex").read_text()
    assert r"\toprule" in latex and r"\bottomrule" in latex and "lns(8,gamma=8)" in latex


def test_memory_objective_adds_memory_columns(make_trial_row: Callable[..., dict[str, Any]],
                                              make_trials_frame: Callable[..., pd.DataFrame],
                                              tmp_path: Path) -> None:
    rows = [make_trial_row("t", "small", 0, 0.9, {"w": 2.0}, memory_mib={"w": 1.0}),
            make_trial_row("t", "fast", 0, 0.9, {"w": 1.0}, memory_mib={"w": 5.0})]
    written = write_reports(make_trials_frame(rows, ["w"]), tmp_path, memory_objective=True)
    pareto = pd.read_csv(tmp_path / "pareto.csv")
    assert list(pareto["label"]) == ["fast", "small"]  # "small" is on the front only thanks to memory
    assert "Memory (MiB)" in (tmp_path / "pareto.md").read_text()
    assert "Memory w (MiB)" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "pareto_t_w.png") in written


def test_a_task_whose_every_trial_raised_gets_tables_but_no_plots(
        make_trial_row: Callable[..., dict[str, Any]], make_trials_frame: Callable[..., pd.DataFrame],
        tmp_path: Path) -> None:
    rows = [make_trial_row("good", "a", 0, 0.9, {"w": 1.0}),
            make_trial_row("bad/task", "a", 0, 0.0, {"w": 1.0}, status="error")]
    names = {p.name for p in write_reports(make_trials_frame(rows, ["w"]), tmp_path)}
    assert "pareto_good_w.png" in names and "breakdown_good_w.pdf" in names
    assert not any("bad" in name for name in names)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "summary.csv"
    target.write_text("old")

    def fail(path: Path) -> None:
        path.write_text("half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_atomically(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.csv"]
    write_text_atomically(target, "new")
    assert target.read_text() == "new"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_report_files_get_the_permissions_of_any_new_file(tmp_path: Path, umask: int) -> None:
    """Not a temporary file's 0600: with umask 022 a report in a shared folder is readable by all."""
    import os

    previous = os.umask(umask)
    try:
        written = write_text_atomically(tmp_path / "summary.md", "| a |\n")
    finally:
        os.umask(previous)
    assert written.stat().st_mode & 0o777 == 0o666 & ~umask


def test_unwritable_output_is_one_line_input_error(example_trials: pd.DataFrame, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="cannot write the report files into .*file/out: Not a "
                                         "directory") as caught:
        write_reports(example_trials, blocker / "out")
    assert "\n" not in str(caught.value)


def test_a_sweep_with_nothing_new_does_not_rewrite_its_reports(example_trials: pd.DataFrame,
                                                               tmp_path: Path) -> None:
    """write_reports_if_changed: the same trials and code leave the files as they are; a changed
    trial or a missing file writes them all again."""
    import os

    from dse.report.files import write_reports_if_changed

    frame = example_trials
    written, _ = write_reports_if_changed(frame, tmp_path)
    assert {p.name for p in written} == {p.name for p in tmp_path.iterdir() if not p.name.startswith(".")}
    for path in written:
        os.utime(path, (0, 0))
    assert write_reports_if_changed(frame, tmp_path) == (written, None)
    assert all(path.stat().st_mtime == 0 for path in written)
    changed = frame.copy()
    changed.loc[changed.index[0], "test_accuracy"] = 0.123
    write_reports_if_changed(changed, tmp_path)
    assert "0.123" in (tmp_path / "trials.csv").read_text() and (tmp_path / "summary.csv").stat().st_mtime > 0
    written[-1].unlink()
    assert write_reports_if_changed(changed, tmp_path)[0] == written and written[-1].is_file()


def test_a_report_file_changed_since_it_was_written_is_written_again(example_trials: pd.DataFrame,
                                                                     tmp_path: Path) -> None:
    """The stamp holds each file's sha256 as written: a file edited, truncated or replaced by another
    run's is never served as current, whatever its name and the trials say."""
    from dse.report.files import current_reports, write_reports_if_changed

    written, _ = write_reports_if_changed(example_trials, tmp_path)
    assert current_reports(example_trials, tmp_path) == written
    expected = {path.name: path.read_bytes() for path in written}
    table, plot = tmp_path / "summary.csv", next(p for p in written if p.suffix == ".png")
    table.write_text(table.read_text().replace("0", "1"))
    plot.write_bytes(plot.read_bytes()[:100])
    assert current_reports(example_trials, tmp_path) is None
    assert current_reports(example_trials, tmp_path, titles=True) is None  # other options: other files
    write_reports_if_changed(example_trials, tmp_path)
    assert {path.name: path.read_bytes() for path in written} == expected
    assert current_reports(example_trials, tmp_path) == written


@pytest.mark.skipif(sys.platform != "linux", reason="figures are drawn in processes on Linux only")
def test_figures_drawn_in_processes_are_the_files_drawn_in_this_process(
        example_trials: pd.DataFrame, reports: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """FigureProcesses forks a process per core and draws each figure there: every file, figures and
    stamp included, is byte for byte what drawing one after another in this process writes; the
    processes are gone when the context is left."""
    import multiprocessing

    from dse.report.drawing import FigureProcesses

    out, written = reports
    with FigureProcesses(2) as figures:
        drawn = write_reports(example_trials, tmp_path, figures=figures)
        assert figures.pool is not None  # they did draw elsewhere (2 processes even on one core)
        children = list(multiprocessing.active_children())
    assert [path.name for path in drawn] == [path.name for path in written]
    for path in [*written, out / REPORTS_STAMP]:
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
    assert not any(child.is_alive() for child in children)


def test_a_figure_that_cannot_be_written_in_its_process_is_the_callers_one_line_error(
        example_trials: pd.DataFrame, tmp_path: Path) -> None:
    """An error in a figure process (here: a directory where a plot goes) reaches the caller as the
    same one-line InputError, and the processes are stopped."""
    import multiprocessing

    from dse.report.drawing import FigureProcesses

    (tmp_path / "pareto_mlp-digits_proxy.png").mkdir()
    with (pytest.raises(InputError, match="pareto_mlp-digits_proxy.png") as caught,
          FigureProcesses(2) as figures):
        write_reports(example_trials, tmp_path, figures=figures)
    assert "\n" not in str(caught.value)
    assert not any(child.is_alive() for child in multiprocessing.active_children())


def _same_files(directory: Path, reports: tuple[Path, list[Path]]) -> None:
    out, written = reports
    for path in [*written, out / REPORTS_STAMP]:
        assert (directory / path.name).read_bytes() == path.read_bytes(), path.name
    assert not [path.name for path in directory.iterdir() if path.suffix == ".tmp"]


def _in_figure_processes(monkeypatch: pytest.MonkeyPatch, child_save: Callable[..., list[Path]]) -> None:
    """Figure processes forked from here save their figures with `child_save`; this process as before."""
    import os

    import dse.report.files as files

    parent, save = os.getpid(), files.save_figure
    monkeypatch.setattr(files, "save_figure", lambda figure, stem: save(figure, stem)
                        if os.getpid() == parent else child_save(figure, stem))


@pytest.mark.skipif(sys.platform != "linux", reason="figures are drawn in processes on Linux only")
@pytest.mark.parametrize("child", ["stuck", "killed"])
def test_figure_processes_stuck_or_killed_leave_their_figures_to_this_process(
        example_trials: pd.DataFrame, reports: tuple[Path, list[Path]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, child: str) -> None:
    """A figure process that waits for ever (a lock held by another thread at the fork) or dies (the
    out-of-memory killer) does not hang or fail the report: the processes are stopped and the figures
    are drawn in this process, the same files; no process and no temporary file is left. It warns
    (FigureFallbackWarning: why, and which figures), which the command line prints as one line."""
    import multiprocessing
    import os
    import threading
    import time

    from dse.report.drawing import FigureFallbackWarning, FigureProcesses

    def child_save(figure: object, stem: Path) -> list[Path]:
        if child == "stuck":
            time.sleep(600)
        os._exit(1)

    _in_figure_processes(monkeypatch, child_save)
    drawn: list[Path] = []
    reason = "finished no figure in 1 s" if child == "stuck" else "a figure process died"
    with pytest.warns(FigureFallbackWarning, match=reason) as warned, FigureProcesses(2) as figures:
        figures.stall_s = 1.0
        waiting = threading.Thread(target=lambda: drawn.extend(write_reports(example_trials, tmp_path,
                                                                             figures=figures)),
                                   daemon=True)
        waiting.start()
        waiting.join(60)
        assert not waiting.is_alive(), "the report waits for its figure processes for ever"
    assert [path.name for path in drawn] == [path.name for path in reports[1]]
    assert len(warned) == 1 and str(warned[0].message).endswith(
        "drawn in the main process instead, one after another: " + ", ".join(
            dict.fromkeys(path.name.rsplit(".", 1)[0] for path in drawn if path.suffix == ".png")))
    _same_files(tmp_path, reports)
    assert not any(child.is_alive() for child in multiprocessing.active_children())


@pytest.mark.skipif(sys.platform != "linux", reason="figures are drawn in processes on Linux only")
@pytest.mark.parametrize("child", ["stops", "is killed"])
def test_figure_processes_stopped_while_saving_leave_no_temporary_file(
        example_trials: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, child: str) -> None:
    """Ctrl-C or SIGTERM while figures are saved: the caller stops its figure processes (SIGTERM), and a
    figure half-saved leaves neither its file nor its temporary file; also where a process does not
    exit within STOP_S (a machine under heavy load; here: it ignores SIGTERM) and is killed."""
    import signal
    import time

    import dse.processes
    from dse.report.drawing import FigureData, FigureProcesses
    from dse.report.files import figure_jobs
    from dse.report.tables import SweepTables

    saving = tmp_path / "saving"

    def child_save(figure: object, stem: Path) -> list[Path]:
        def write(temporary: Path) -> None:
            if child == "is killed":
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            temporary.write_bytes(b"half a figure")
            saving.touch()
            time.sleep(600)

        return [write_atomically(stem.with_suffix(".png"), write)]

    _in_figure_processes(monkeypatch, child_save)
    monkeypatch.setattr(dse.processes, "STOP_S", 1.0)
    out = tmp_path / "out"
    tables = SweepTables.of(example_trials, False)
    data = FigureData(tables.summary, tables.fronts, tables.memory_objective, False)
    with pytest.raises(KeyboardInterrupt), FigureProcesses(2) as figures:
        figures.start_drawing(figure_jobs(tables, out), data)
        deadline = time.monotonic() + 60
        while not saving.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        raise KeyboardInterrupt  # the sweep's interrupt unwinds through FigureProcesses
    assert saving.exists()
    assert not [path.name for path in out.iterdir() if path.suffix in (".png", ".pdf", ".tmp")]


@pytest.mark.skipif(sys.platform != "linux", reason="figures are drawn in processes on Linux only")
def test_figure_processes_whose_parent_dies_while_saving_leave_no_temporary_file(tmp_path: Path) -> None:
    """`dse report` killed (SIGTERM's default, SIGKILL) while its figure processes save: each ends, and
    removes the temporary file of the figure it was saving."""
    import os
    import subprocess
    import time

    parent = """
import os, sys, time
from pathlib import Path
import dse.report.drawing as drawing
from dse.report.files import write_atomically
out = Path(sys.argv[1])
def draw(job, data):
    def write(temporary):
        temporary.write_bytes(b"half a figure")
        (out / f"saving-{os.getpid()}").touch()
        time.sleep(600)
    return [write_atomically(job.stem.with_suffix(".png"), write)]
drawing.draw = draw
jobs = [drawing.FigureJob("pareto", "task", "proxy", out / f"figure{i}") for i in range(2)]
drawing.FigureProcesses(2).start_drawing(jobs, drawing.FigureData(None, None, False, False))
while len(list(out.glob("saving-*"))) < 2:
    time.sleep(0.05)
os._exit(0)
"""
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    subprocess.run([sys.executable, "-c", parent, str(tmp_path)], env=environment, check=True, timeout=120)
    children = [int(path.name.split("-")[1]) for path in tmp_path.glob("saving-*")]

    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 30
    while any(running(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(running(pid) for pid in children)
    assert sorted(path.name for path in tmp_path.iterdir() if not path.name.startswith("saving-")) == []


def test_figures_are_drawn_in_this_process_where_processes_are_not_forked(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Not Linux (macOS, Windows: no fork of a process with torch's threads): FigureProcesses draws every
    figure in the caller, in order, and starts no process."""
    import os

    import dse.report.drawing as drawing

    drawn: list[tuple[str, int]] = []
    monkeypatch.setattr(drawing, "draw", lambda job, data: drawn.append((job.kind, os.getpid())) or [])
    monkeypatch.setattr(sys, "platform", "darwin")
    kinds = ("pareto", "breakdown", "area")
    jobs = [drawing.FigureJob(kind, "task", "proxy", tmp_path / kind) for kind in kinds]
    with drawing.FigureProcesses(4) as figures:
        assert figures.processes == 1
        assert figures.start_drawing(jobs, drawing.FigureData(None, None, False, False))() == []
        assert figures.pool is None and figures.imports is None
    assert drawn == [(kind, os.getpid()) for kind in kinds]
