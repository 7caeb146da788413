"""Draw a report's figures on every core: each figure is built and saved (PNG and PDF) in a process of
its own, forked from this one once it has imported what drawing needs, so that no process imports
matplotlib again; a sweep imports it (and scipy.stats, for the tables) while its last trials train
and a core is idle (`FigureProcesses.prepare`).

Rendering is most of a report's cost (the quickstart's five figures: ten saves, about 1.8 CPU-seconds,
one after another in one process before). A figure drawn in another process is the same file byte
for byte: the same code, the same data, the same matplotlib settings (inherited), and the writers
are deterministic (dse.report.files). Forking is Linux's (elsewhere the figures are drawn in this
process, one after another); the children touch nothing of torch's, whose idle threads a sweep's
process has. Forking a process with threads can still leave a child waiting on a lock another thread
held at the fork: a child that finishes no figure for FIGURE_STALL_S, or dies, is stopped and what
is left is drawn in this process, so a report never hangs. A child stopped while it saves (SIGTERM,
SIGHUP) removes its temporary file before it exits: nothing half-written is left.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from dse.processes import STOP_S, become_helper, stop_workers

if TYPE_CHECKING:
    import pandas as pd

PLOT_SUFFIXES: tuple[str, ...] = ("png", "pdf")


@dataclass(frozen=True)
class FigureJob:
    """One figure of a report: what it plots (`kind`: pareto, breakdown or area) and where it goes
    (`stem`.png and `stem`.pdf)."""

    kind: str
    task: str
    workload: str
    stem: Path


@dataclass(frozen=True)
class FigureData:
    """What every figure of a report is drawn from (plain frames: cheap to send to a process)."""

    summary: pd.DataFrame
    fronts: pd.DataFrame
    memory_objective: bool
    titles: bool


def draw(job: FigureJob, data: FigureData) -> list[Path]:
    """Build one figure and save it as PNG and PDF; the paths written (none when the figure has
    nothing to show)."""
    from dse.report.files import save_figure
    from dse.report.plots import accuracy_area_figure, accuracy_energy_figure, breakdown_figure

    if job.kind == "pareto":
        figure = accuracy_energy_figure(data.summary, job.task, job.workload, data.memory_objective,
                                        data.titles)
    elif job.kind == "breakdown":
        figure = breakdown_figure(data.fronts, job.task, job.workload, data.titles)
    else:
        figure = accuracy_area_figure(data.summary, job.task, job.workload, data.titles)
    return [] if figure is None else save_figure(figure, job.stem)


class FigureFallbackWarning(UserWarning):
    """The figure processes stalled or one died, so the figures they had not saved were drawn in the
    main process (the same files, later): the command line prints it as one `warning:` line."""


FIGURE_STALL_S = 120.0
"""How long the figure processes may go without finishing a figure (one takes well under a second)
before they are stopped and the rest are drawn in this process."""


class _Stopped(BaseException):
    """Raised in a figure process by SIGTERM or SIGHUP while it draws: the save unwinds (its temporary
    file removed, dse.atomic_write.write_atomically) before the process exits. Not an Exception, which
    library code may catch, as KeyboardInterrupt is not."""


_drawing = False
"""Whether this figure process is inside `_draw_in_child` (then a stop unwinds; else it exits at once)."""


def _on_stop(number: int, frame: FrameType | None) -> None:
    if _drawing:
        raise _Stopped(number)
    os._exit(128 + number)


def _draw_in_child(job: FigureJob, data: FigureData) -> list[Path]:
    """`draw` in a figure process, which a stop ends once the save has unwound."""
    global _drawing
    _drawing = True
    try:
        return draw(job, data)
    except _Stopped as stop:
        os._exit(128 + stop.args[0])
    finally:
        _drawing = False


def _stop_this_process() -> None:
    """Its parent ended: stop as SIGTERM does (the main thread's wait or save is interrupted), and
    exit after STOP_S in any case (a main thread stuck on a lock runs no handler)."""
    signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGTERM)
    time.sleep(STOP_S)
    os._exit(1)


def _become_helper(parent_pid: int) -> None:
    """A figure process's start: it leaves Ctrl-C to its parent, and a stop (its parent's SIGTERM, a
    hang-up, its parent's end) ends it without a half-written file (the command's own handlers, inherited
    by the fork, would raise dse.interrupts.Interrupted in the child)."""
    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, _on_stop)
    become_helper(parent_pid, _stop_this_process)


DRAWING_MODULES: tuple[str, ...] = ("scipy.stats", "matplotlib.backends.backend_agg",
                                    "matplotlib.backends.backend_pdf", "dse.report.plots")
"""What a report imports besides pandas: scipy.stats for the tables' intervals, matplotlib and its PNG
and PDF writers for the figures."""


class FigureProcesses:
    """Processes that draw a report's figures (`processes`; None: one per core), forked when the
    figures are handed over and stopped on leaving the context. One process, fewer than two figures,
    or no fork (not Linux): the figures are drawn in this process, one after another."""

    def __init__(self, processes: int | None = None, stall_s: float = FIGURE_STALL_S) -> None:
        self.processes = max(1, processes or os.cpu_count() or 1) if sys.platform == "linux" else 1
        self.stall_s = stall_s
        self.pool: ProcessPoolExecutor | None = None
        self.imports: threading.Thread | None = None
        self.handed: list[FigureJob] = []
        """The figures handed to the processes (what a process stopped half-way may have left)."""

    def __enter__(self) -> FigureProcesses:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if self.pool is None:
            return
        if kind is None:
            self.pool.shutdown(wait=True)
            self.pool = None
        else:
            self._stop(self.handed)

    def prepare(self) -> None:
        """Import DRAWING_MODULES in a thread of this process, from now (a core is idle: a sweep's
        last trials train); once only."""
        if self.imports is None:
            self.imports = threading.Thread(target=_import, args=(DRAWING_MODULES,), daemon=True,
                                            name="dse-report-imports")
            self.imports.start()

    def start_drawing(self, jobs: list[FigureJob], data: FigureData) -> Callable[[], list[Path]]:
        """Hand every figure to the processes now (where there are several); returns what waits for
        them: the paths written, in the jobs' order. In this process the figures are drawn by that
        call."""
        if len(jobs) < 2 or self.processes < 2:
            return lambda: [path for job in jobs for path in draw(job, data)]
        if self.pool is None:
            self.prepare()
            if self.imports is not None:
                self.imports.join()  # no fork while a thread imports: the child would inherit its locks
            _import(DRAWING_MODULES)  # loaded already, unless that thread failed
            for stream in (sys.stdout, sys.stderr):  # a child would write what is still buffered again
                stream.flush()
            self.pool = ProcessPoolExecutor(min(self.processes, len(jobs)),
                                            mp_context=multiprocessing.get_context("fork"),
                                            initializer=_become_helper, initargs=(os.getpid(),))
        self.handed += jobs
        futures: list[Future[list[Path]]] = [self.pool.submit(_draw_in_child, job, data) for job in jobs]
        return lambda: self._collect(jobs, futures, data)

    def _collect(self, jobs: list[FigureJob], futures: list[Future[list[Path]]],
                 data: FigureData) -> list[Path]:
        """The paths the processes wrote, in the jobs' order. A figure's own error is raised here; a
        process that died or finished nothing for `stall_s` has the processes stopped (no more are
        forked) and the figures not yet saved drawn in this process."""
        written: list[Path] = []
        for index, future in enumerate(futures):
            try:
                written += future.result(timeout=self.stall_s)
            except (FutureTimeout, BrokenProcessPool) as error:  # FutureTimeout: TimeoutError from 3.11
                self._stop(jobs[index:])
                left = [(job, late if _saved(late) else None) for job, late in
                        zip(jobs[index:], futures[index:], strict=True)]
                reason = ("a figure process died" if isinstance(error, BrokenProcessPool)
                          else f"the figure processes finished no figure in {self.stall_s:g} s")
                redrawn = [job.stem.name for job, late in left if late is None]
                figures = f"{len(redrawn)} figure{'s' * (len(redrawn) != 1)}"
                warnings.warn(f"{reason}; {figures} drawn in the main process instead, one after another: "
                              f"{', '.join(redrawn)}", FigureFallbackWarning, stacklevel=3)
                for job, late in left:
                    written += draw(job, data) if late is None else late.result()
                break
        return written

    def stop(self) -> None:
        """Stop the processes now (what they drew is not wanted: the report failed); draw in this
        process from now."""
        self._stop(self.handed)

    def _stop(self, jobs: list[FigureJob]) -> None:
        """Stop the processes and remove what a killed one may have left of `jobs`' files (temporary
        files only: a figure's file is replaced whole or not at all); draw in this process from now.
        (A process stopped while it saves removes its temporary file itself, unless it is killed
        first: it did not exit within STOP_S, on a machine under heavy load.)"""
        if self.pool is not None:
            stop_workers(self.pool)
        self.pool, self.processes = None, 1
        from dse.atomic_write import temporary_files

        for job in jobs:
            for suffix in PLOT_SUFFIXES:
                for temporary in temporary_files(job.stem.with_name(f"{job.stem.name}.{suffix}")):
                    temporary.unlink(missing_ok=True)


def _saved(future: Future[list[Path]]) -> bool:
    """Whether a figure process finished this figure (stopped processes leave the rest unsaved)."""
    return future.done() and not future.cancelled() and future.exception() is None


def _import(modules: tuple[str, ...]) -> None:
    for module in modules:
        importlib.import_module(module)
