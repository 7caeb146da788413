"""A sweep stopped by a signal stops its workers, keeps its store whole and says how to resume.

While a sweep runs, SIGINT (Ctrl-C), SIGTERM and SIGHUP raise `dse.interrupts.Interrupted` in the main
thread (`signals_interrupt`, only the first one: the ones that arrive while the run unwinds are
ignored, so the workers are always stopped). The exception unwinds the run: the executor stops its
workers before it re-raises (dse/sweep/executors.py), the store's transaction of a trial that was
being committed rolls back (each trial is committed whole or not at all, dse/sweep/store.py), and the
run re-raises it as `SweepInterrupted`, which counts the stored trials; `dse sweep` prints its line
and exits with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from dse.interrupts import Interrupted


class SweepInterrupted(Interrupted):
    """A sweep stopped by a signal; `stored` of `total` trials are in its store (None: not yet known)."""

    def __init__(self, signal_number: int = signal.SIGINT, stored: int | None = None,
                 total: int | None = None) -> None:
        super().__init__(signal_number)
        self.stored = stored
        self.total = total

    @classmethod
    def of(cls, error: KeyboardInterrupt) -> SweepInterrupted:
        """`error` itself, or the sweep's of its signal (SIGINT's for a plain KeyboardInterrupt)."""
        return error if isinstance(error, SweepInterrupted) else cls(Interrupted.of(error).signal_number)

    def line(self, output: Path) -> str:
        """What `dse sweep` prints: which signal, what the store holds, how to resume."""
        saved = ("the finished trials are" if self.stored is None
                 else f"{self.stored} of {self.total} trials are")
        return f"{self}: {saved} saved in {output}; run the same command again to resume"


def sweep_line(output: Path) -> Callable[[Interrupted], str]:
    """What `dse sweep` says when a signal stops it (`dse.interrupts.CommandSignals.stopped_by`)."""
    return lambda interrupted: SweepInterrupted.of(interrupted).line(output)
