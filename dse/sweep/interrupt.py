"""A sweep stopped by a signal stops its workers, keeps its store whole and says how to resume.

While a sweep runs, SIGINT (Ctrl-C), SIGTERM (`kill`, a batch scheduler's time limit) and SIGHUP (the
terminal or the session that started it went away) raise `SweepInterrupted` in the main thread, as
Ctrl-C raises KeyboardInterrupt (a subclass, so code that handles one handles the other). The
exception unwinds the run: the executor stops its workers before it re-raises (dse/sweep/executors.py),
the store's transaction of a trial that was being committed rolls back (each trial is committed whole
or not at all, dse/sweep/store.py), and `dse sweep` prints one line and exits with 128 + the signal's
number (130 for SIGINT, 143 for SIGTERM), as a shell reports a process the signal ended. Only the
first signal raises: the ones that arrive while the run unwinds are ignored, so the workers are always
stopped. A handler the caller installed is left in place (only the defaults are replaced).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

INTERRUPTING_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
"""The signals that stop a sweep (SIGHUP where the platform has it)."""


class SweepInterrupted(KeyboardInterrupt):
    """A sweep stopped by a signal; `stored` of `total` trials are in its store (None: not yet known)."""

    def __init__(self, signal_number: int = signal.SIGINT, stored: int | None = None,
                 total: int | None = None) -> None:
        super().__init__(signal_number)
        self.signal_number = int(signal_number)
        self.stored = stored
        self.total = total

    @classmethod
    def of(cls, error: KeyboardInterrupt) -> SweepInterrupted:
        """`error` itself, or a plain KeyboardInterrupt as SIGINT's."""
        return error if isinstance(error, SweepInterrupted) else cls(signal.SIGINT)

    @property
    def name(self) -> str:
        """The signal's name: SIGINT, SIGTERM, SIGHUP."""
        return signal.Signals(self.signal_number).name

    @property
    def exit_code(self) -> int:
        """128 + the signal's number: what a shell reports for a process the signal ended."""
        return 128 + self.signal_number

    def line(self, output: Path) -> str:
        """What `dse sweep` prints: which signal, what the store holds, how to resume."""
        saved = ("the finished trials are" if self.stored is None
                 else f"{self.stored} of {self.total} trials are")
        return (f"interrupted by {self.name}: {saved} saved in {output}; run "
                "the same command again to resume")


def _is_default(handler: object) -> bool:
    return handler in (signal.SIG_DFL, signal.default_int_handler)


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block, the first of INTERRUPTING_SIGNALS raises SweepInterrupted and later ones are
    ignored; the handlers are restored after it. Outside the main thread (where Python cannot set
    handlers) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = False

    def interrupt(number: int, frame: FrameType | None) -> None:
        nonlocal raised
        if raised:
            return  # the run is already unwinding: let it stop its workers
        raised = True
        raise SweepInterrupted(number)

    previous = {number: signal.getsignal(number) for number in INTERRUPTING_SIGNALS}
    replaced = [number for number, handler in previous.items() if _is_default(handler)]
    for number in replaced:
        signal.signal(number, interrupt)
    try:
        yield
    finally:
        for number in replaced:
            signal.signal(number, previous[number])
