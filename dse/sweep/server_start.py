"""Imported first by the sweep's fork server (its preload, dse/sweep/executors.py), before seconds of
imports of the trainer, at whose end CPython's server starts to watch the sweep and to ignore SIGINT.

It ends with the sweep at once: killed outright (SIGKILL, the out-of-memory killer) in its first
seconds, the sweep left its server importing for those seconds (11-15 s at load 14-19), and the
resource tracker with it. A thread of the server now watches the sweep while it imports, and ends
the server when the sweep has ended (dse/sweep/server_ready.py, its last preloaded module, ends that
thread: from there CPython's server watches the sweep itself, and forks its workers from one thread).
Not Linux's parent-death signal: the kernel sends it when the *thread* that started the server ends,
and a sweep run from a thread (a notebook's, a thread pool's) that ended killed the server of the
process, and the workers of the sweep beside it.

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
import threading
import traceback
from types import FrameType, TracebackType

from dse.interrupts import GROUP_SIGNALS
from dse.processes import PARENT_PID_VARIABLE


def _sweeps_pipe() -> int | None:
    """The read end of the pipe whose other end the sweep holds (`alive_r` of multiprocessing's
    forkserver.main, which imports this module): at its end of file the sweep has ended. None: not
    found (another CPython's server)."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "main" and frame.f_globals.get("__name__") == "multiprocessing.forkserver":
            descriptor = frame.f_locals.get("alive_r")
            return descriptor if isinstance(descriptor, int) else None
        frame = frame.f_back
    return None


WATCH_S = 0.05
"""How often the server checks, while it imports, that the sweep is still its parent."""


def _end_with_the_sweep(sweep: int, stop: int) -> None:
    """Exit at once when process `sweep`, the server's parent, has ended (then the server has another
    parent), unless `stop` becomes readable first. Not the sweep's pipe: a worker the sweep asked for
    while the server imports waits in the server's socket with the sweep's end of that pipe in it."""
    while not select.select([stop], [], [], WATCH_S)[0]:
        if os.getppid() != sweep:
            os._exit(1)


class _SweepWatch:
    """The thread that ends the server with the sweep while it imports (`stop` ends it)."""

    def __init__(self, sweep: int) -> None:
        self.stop_r, self.stop_w = os.pipe()
        self.thread = threading.Thread(target=_end_with_the_sweep, args=(sweep, self.stop_r),
                                       name="dse-sweep-watch", daemon=True)
        self.thread.start()  # (with the group's signals blocked, as the server started: never its to handle)

    def stop(self) -> None:
        os.close(self.stop_w)
        self.thread.join()
        os.close(self.stop_r)


def _sweeps_pid() -> int:
    """The sweep's process id, as the sweep gave it (PARENT_PID_VARIABLE): the server's parent now is
    another where the sweep ended before this module ran, and its pipe is not at its end where a worker
    request with the sweep's end of it waits in the server's socket (the server imported on to the
    end). The parent now, where the variable is not set (a server started otherwise)."""
    given = os.environ.pop(PARENT_PID_VARIABLE, "")  # (not passed on to the workers)
    return int(given) if given.isdigit() else os.getppid()


_WATCH: _SweepWatch | None = None
if (_pipe := _sweeps_pipe()) is not None:  # (in the fork server only)
    _WATCH = _SweepWatch(_sweeps_pid())
    if select.select([_pipe], [], [], 0)[0]:  # the sweep ended before the line above, no request waiting
        os._exit(1)

for _number in GROUP_SIGNALS:  # (its workers inherit them ignored)
    signal.signal(_number, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_UNBLOCK, GROUP_SIGNALS)  # blocked from its start (start_worker_server)


def stop_watching_the_sweep() -> None:
    """The imports have ended (dse/sweep/server_ready.py): the server's own loop watches the sweep."""
    global _WATCH
    if _WATCH is not None:
        _WATCH.stop()
        _WATCH = None


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
