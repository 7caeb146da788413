"""Imported first by the sweep's fork server (its preload, dse/sweep/executors.py): Ctrl-C and a
hang-up are the sweep's to handle (it stops its workers and says so in one line). CPython's fork server
ignores SIGINT only once its preload is imported, so a Ctrl-C in the seconds the server spends
importing the trainer printed the server's own KeyboardInterrupt traceback under the sweep's line;
a hang-up killed it and its workers. The server starts with both blocked, so that none is lost
or acted on before this module ignores them.

A worker the server forks while the sweep is stopping finds no job data to read (the sweep has
closed its end): multiprocessing's spawn `_main` raises EOFError, which the server's child printed
as a traceback above the sweep's line (SIGTERM to a 2-worker sweep as its workers started, 1 of about
20 tries on the 2-vCPU VM). The children inherit `sys.excepthook` from the server: that one is quiet."""

from __future__ import annotations

import os
import signal
import sys
import traceback
from types import TracebackType

from dse.interrupts import GROUP_SIGNALS

for _number in GROUP_SIGNALS:  # (its workers inherit them ignored)
    signal.signal(_number, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_UNBLOCK, GROUP_SIGNALS)  # blocked from its start (start_worker_server)


def quiet_when_the_sweep_left(kind: type[BaseException], error: BaseException,
                              trace: TracebackType | None) -> None:
    """sys.excepthook: nothing for an EOFError raised while a forked worker reads the data of its
    start (`multiprocessing.spawn._main`), every other error as Python prints it."""
    spawn = os.path.join("multiprocessing", "spawn.py")
    if issubclass(kind, EOFError) and any(
            frame.f_code.co_name == "_main" and frame.f_code.co_filename.endswith(spawn)
            for frame, _ in traceback.walk_tb(trace)):
        return
    sys.__excepthook__(kind, error, trace)


sys.excepthook = quiet_when_the_sweep_left
