"""Imported first by the sweep's fork server (its preload, dse/sweep/executors.py), before seconds of
imports of the trainer, at whose end CPython's server starts to watch the sweep and to ignore SIGINT.

It ends with the sweep at once: killed outright (SIGKILL, the out-of-memory killer) in its first
seconds, the sweep left its server importing for those seconds (11-15 s at load 14-19), and the
resource tracker with it. The kernel now kills the server when the sweep's thread that started it ends
(`dse.processes.killed_with_parent`).

Ctrl-C and a hang-up are the sweep's to handle (it stops its workers and says so in one line): a
Ctrl-C in the seconds the server spends importing printed the server's own KeyboardInterrupt traceback
under the sweep's line; a hang-up killed it and its workers. The server starts with both blocked, so
that none is lost or acted on before this module ignores them.

A worker the server forks while the sweep is stopping finds no job data to read (the sweep has
closed its end), or a semaphore in it that the sweep has released: multiprocessing's spawn `_main`
raises EOFError or FileNotFoundError, which the server's child printed as a traceback above the
sweep's line (SIGTERM to a 2-worker sweep as its workers started, 1 of about 20 tries on the 2-vCPU
VM; a hang-up, 2 of 8). The children inherit `sys.excepthook` from the server: that one is quiet."""

from __future__ import annotations

import os
import select
import signal
import sys
import traceback
from types import FrameType, TracebackType

from dse.interrupts import GROUP_SIGNALS
from dse.processes import killed_with_parent


def _sweeps_pipe() -> int | None:
    """The read end of the pipe whose other end only the sweep holds (`alive_r` of multiprocessing's
    forkserver.main, which imports this module): at its end of file the sweep has ended. None: not
    found (another CPython's server)."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "main" and frame.f_globals.get("__name__") == "multiprocessing.forkserver":
            descriptor = frame.f_locals.get("alive_r")
            return descriptor if isinstance(descriptor, int) else None
        frame = frame.f_back
    return None


if killed_with_parent():
    _pipe = _sweeps_pipe()  # (a sweep that ended before the line above sent no signal)
    if _pipe is not None and select.select([_pipe], [], [], 0)[0]:
        os._exit(1)

for _number in GROUP_SIGNALS:  # (its workers inherit them ignored)
    signal.signal(_number, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_UNBLOCK, GROUP_SIGNALS)  # blocked from its start (start_worker_server)


def quiet_when_the_sweep_left(kind: type[BaseException], error: BaseException,
                              trace: TracebackType | None) -> None:
    """sys.excepthook: nothing for what a forked worker meets while it reads the data of its start
    (`multiprocessing.spawn._main`) from a sweep that has left: the end of that data (EOFError), or a
    semaphore the sweep released (FileNotFoundError, multiprocessing's synchronize.py: a hang-up to a
    2-worker sweep's group as its second worker started, 2 of 8 tries); every other error as Python
    prints it."""
    frames = [frame.f_code for frame, _ in traceback.walk_tb(trace)]
    if any(code.co_name == "_main" and code.co_filename.endswith(_SPAWN) for code in frames) and (
            issubclass(kind, EOFError) or issubclass(kind, FileNotFoundError)
            and any(code.co_filename.endswith(_SYNCHRONIZE) for code in frames)):
        return
    sys.__excepthook__(kind, error, trace)


_SPAWN = os.path.join("multiprocessing", "spawn.py")
_SYNCHRONIZE = os.path.join("multiprocessing", "synchronize.py")
sys.excepthook = quiet_when_the_sweep_left
