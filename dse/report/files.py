"""Write every report file of a sweep into its output directory, all together (a hidden folder + renames).

A reader (or a sweep that is killed) never sees a half-written table or plot, nor new tables beside old
plots: every file is written into a hidden folder in the output directory, and the files are renamed
over the old ones once all are complete.
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dse import atomic_write
from dse.digests import file_sha256, sha256_of_parts
from dse.errors import InputError
from dse.report.drawing import PLOT_SUFFIXES, FigureData, FigureJob, FigureProcesses
from dse.report.pareto import area_column
from dse.report.plots import slug
from dse.report.tables import SweepTables, latex_table, markdown_table

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """`dse.atomic_write.write_atomically`, an OS refusal (unwritable or non-directory parent, a directory
    in the way) an InputError naming the path."""
    try:
        return atomic_write.write_atomically(path, write)
    except OSError as error:
        raise InputError(f"cannot write {path}: {error.strerror or error}") from error


def write_text_atomically(path: Path, text: str) -> Path:
    def write(temporary: Path) -> None:
        temporary.write_text(text, encoding="utf-8")

    return write_atomically(path, write)


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """Save as PNG and PDF (PDF without a creation date, so the same results give the same bytes)."""
    written = []
    for suffix in PLOT_SUFFIXES:
        metadata = {"CreationDate": None} if suffix == "pdf" else {}
        def save(temporary: Path, suffix: str = suffix, metadata: dict[str, Any] = metadata) -> None:
            fig.savefig(temporary, format=suffix, dpi=150, metadata=metadata)

        written.append(write_atomically(stem.with_name(f"{stem.name}.{suffix}"), save))
    return written


def _area_values(summary: pd.DataFrame, task: str, workload: str) -> np.ndarray | None:
    column = area_column(workload)
    if column not in summary.columns:
        return None
    return pd.to_numeric(summary.loc[summary["task"] == task, column], errors="coerce").to_numpy(dtype=float)


def figure_jobs(tables: SweepTables, out_dir: Path) -> list[FigureJob]:
    """Every figure of a report, in write order: per task and workload the accuracy-energy figure and
    the front's breakdown, and the accuracy-area figure once per distinct set of areas (a node, not a
    workload). A figure with nothing to show is skipped when it is drawn."""
    summary = tables.summary
    jobs = []
    for task in pd.unique(summary["task"]):
        areas_drawn: list[np.ndarray] = []
        for workload in tables.workloads:
            kinds = ["pareto", "breakdown"]
            area = _area_values(summary, task, workload)
            if area is not None and not any(np.array_equal(area, seen, equal_nan=True)
                                            for seen in areas_drawn):
                areas_drawn.append(area)
                kinds.append("area")
            jobs += [FigureJob(kind, task, workload, out_dir / f"{kind}_{slug(task)}_{slug(workload)}")
                     for kind in kinds]
    return jobs


def write_reports(frame: pd.DataFrame, out_dir: Path, memory_objective: bool = False,
                  tables: SweepTables | None = None, titles: bool = False,
                  figures: FigureProcesses | None = None) -> list[Path]:
    """Write the tables and plots of a sweep's trials (`load_trials`'s frame) into `out_dir`.

    Files: trials.csv, summary.csv, pareto.csv (every task and workload), all_points.csv (every
    tuning point of every configuration), summary.tex/.md,
    pareto.tex/.md, and per task and workload `pareto_<task>_<workload>.png/.pdf` (accuracy vs
    energy with the front) and `breakdown_<task>_<workload>.png/.pdf` (the front's energy by unit), and
    `area_<task>_<workload>.png/.pdf` (accuracy vs datapath area) once per distinct set of areas.
    `tables`: the frame's SweepTables where the caller has them already; `titles`: a title in each
    figure (none by default: the caption belongs to the paper); `figures`: processes that draw the
    figures on every core (none: one after another in this process; the same files). Returns the
    paths written, in that order; the hidden REPORTS_STAMP records what they were written from.
    All or nothing: every file is written into a hidden folder in out_dir first and renamed into place
    once all are (dse.atomic_write.written_together), so a write that fails (a full disk) leaves out_dir
    as it was, and an InputError names the file.
    """
    out_dir = Path(out_dir)
    tables = tables or SweepTables.of(frame, memory_objective)
    drawing = figures or FigureProcesses(1)
    try:
        with atomic_write.written_together(out_dir) as stage:
            try:
                names = _write_reports_into(stage, frame, tables, memory_objective, titles, drawing)
            except BaseException:
                drawing.stop()  # no figure process is left writing into the stage as it is removed
                raise
            atomic_write.move_together(stage, out_dir, names)
    except InputError as error:  # a file's write failed: named where it was to go
        raise InputError(f"{str(error).replace(str(stage), str(out_dir))} (no report file was "
                         "written)") from error
    except OSError as error:  # the hidden folder, or a rename onto a file (a directory in its place)
        where = error.filename2 or f"the report files into {out_dir}"
        raise InputError(f"cannot write {where}: {error.strerror or error} (no report file was "
                         "written)") from error
    return [out_dir / name for name in names[:-1]]


def _write_reports_into(stage: Path, frame: pd.DataFrame, tables: SweepTables, memory_objective: bool,
                        titles: bool, figures: FigureProcesses) -> list[str]:
    """`write_reports`' files written into `stage`; their names, in write order, REPORTS_STAMP last."""
    summary, fronts = tables.summary, tables.fronts
    jobs = figure_jobs(tables, stage)
    data = FigureData(summary, fronts, tables.memory_objective, titles)
    drawn = figures.start_drawing(jobs, data)  # drawn while the text is written
    written = [
        write_text_atomically(stage / "trials.csv", frame.to_csv(index=False)),
        write_text_atomically(stage / "summary.csv", summary.to_csv(index=False)),
        write_text_atomically(stage / "pareto.csv", fronts.to_csv(index=False)),
        write_text_atomically(stage / "all_points.csv", tables.points.to_csv(index=False)),
    ]
    for name in ("summary", "pareto"):
        table = tables.text_table(name)
        written.append(write_text_atomically(stage / f"{name}.tex", latex_table(table)))
        written.append(write_text_atomically(stage / f"{name}.md", markdown_table(table)))
    written += drawn()
    stamp = {"signature": _reports_signature(frame, memory_objective, titles),
             "files": {path.name: file_sha256(path) for path in written}}
    write_text_atomically(stage / REPORTS_STAMP, json.dumps(stamp))
    return [path.name for path in written] + [REPORTS_STAMP]


REPORTS_STAMP = ".reports.json"
"""What the report files in a directory were written from (a hash), and each file's sha256 as written."""


_REPORT_LIBRARIES: tuple[str, ...] = ("numpy", "pandas", "scipy", "matplotlib")


def _reports_signature(frame: pd.DataFrame, memory_objective: bool, titles: bool) -> str:
    """A hash of the trials, the report options and the report code (dse.report's and the libraries' that
    format the tables and draw the plots): equal hashes, equal files. Where the directory is (the sweep's
    `output`) is no part of any file, so a results folder moved or copied elsewhere (read-only media
    included) keeps its reports current."""
    libraries = {name: importlib.metadata.version(name) for name in _REPORT_LIBRARIES}
    attrs = {**frame.attrs, "sweep": {key: value for key, value in (frame.attrs.get("sweep") or {}).items()
                                      if key != "output"}}
    options = json.dumps([attrs, memory_objective, titles, libraries], sort_keys=True, default=str)
    sources = (source.read_bytes() for source in sorted(Path(__file__).parent.glob("*.py")))
    return sha256_of_parts([frame.to_csv(index=False), options, *sources])


def current_reports(frame: pd.DataFrame, out_dir: Path, memory_objective: bool = False, titles: bool = False
                    ) -> list[Path] | None:
    """The report files in out_dir, in write order, if `write_reports` would write them byte for byte as
    they are: written from these very trials, with these options, by this report code, and none of them
    changed or removed since (each file's sha256 as written is in the stamp). Else None."""
    out_dir = Path(out_dir)
    try:
        recorded = json.loads((out_dir / REPORTS_STAMP).read_text(encoding="utf-8"))
        if recorded["signature"] != _reports_signature(frame, memory_objective, titles):
            return None
        files = {out_dir / name: digest for name, digest in recorded["files"].items()}
        if all(file_sha256(path) == digest for path, digest in files.items()):
            return list(files)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no stamp, an older stamp's layout, a file gone or unreadable: written anew
    return None


def writable_current_reports(frame: pd.DataFrame, out_dir: Path, memory_objective: bool = False,
                             titles: bool = False) -> list[Path] | None:
    """`current_reports`, where there are files to write an InputError first if out_dir refuses them, so
    that a command says so before it prints anything (the folder counts, not the files: each is
    written under a temporary name there and renamed)."""
    current = current_reports(frame, out_dir, memory_objective, titles)
    problem = None if current is not None else atomic_write.folder_problem(Path(out_dir))
    if problem is not None:
        raise InputError(f"cannot write the report files into {out_dir}: {problem} (nothing was printed or "
                         "written)")
    return current


def write_reports_if_changed(frame: pd.DataFrame, out_dir: Path, memory_objective: bool = False,
                             titles: bool = False, figures: FigureProcesses | None = None
                             ) -> tuple[list[Path], SweepTables | None]:
    """`write_reports`, unless the files in out_dir are what it would write (`current_reports`: a sweep
    rerun with nothing left to train, `dse report` on an unchanged store): then their paths, unwritten.
    Plots are most of a report's cost (2-3 s of matplotlib on the quickstart). Also returns the
    SweepTables built to write them (None where nothing was written), for the caller to print from."""
    current = current_reports(frame, out_dir, memory_objective, titles)
    if current is not None:
        return current, None
    tables = SweepTables.of(frame, memory_objective)
    return write_reports(frame, out_dir, memory_objective, tables, titles, figures), tables
