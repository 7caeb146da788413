"""What every helper process dse starts (a sweep's training workers, a report's figure processes) does
to end with the process that started it and to leave Ctrl-C and a hang-up to it.

A `concurrent.futures` pool's worker blocks on its task queue, whose two ends it holds itself, so a
worker whose parent was killed (SIGKILL, the out-of-memory killer) would wait there for ever: each
watches its parent instead and ends with it.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.connection import wait

from dse.interrupts import GROUP_SIGNALS

PARENT_PID_VARIABLE = "DSE_PARENT_PID"
"""The environment variable that tells a helper started through another program (the sweep's fork
server, started by multiprocessing) which process it ends with: read at its start, that process may
have ended already, and the helper's parent is then another."""

STOP_S = 5.0
"""How long a terminated worker has to exit before it is killed."""


def wait_for_exit(pid: int) -> None:
    """Return when process `pid` has ended (at once if it has already)."""
    try:
        descriptor: int | None = os.pidfd_open(pid)  # Linux >= 5.3: readable when the process ends
    except ProcessLookupError:
        return  # it has ended already
    except (AttributeError, OSError):  # another system, an older kernel, a sandbox: poll
        descriptor = None
    if descriptor is not None:
        select.select([descriptor], [], [])
        return
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            pass
        time.sleep(0.5)


def _exit_now() -> None:
    os._exit(1)


def end_with(pid: int, end: Callable[[], None] = _exit_now) -> None:
    """Call `end` (by default: exit at once) from a thread of this process when process `pid` ends."""
    def watch() -> None:
        wait_for_exit(pid)
        end()

    threading.Thread(target=watch, name="dse-parent-watch", daemon=True).start()


def become_helper(parent_pid: int | None, end: Callable[[], None] = _exit_now) -> None:
    """Set up a pool worker: Ctrl-C and a hang-up, which a terminal sends the whole process group, are
    its parent's to handle (the parent stops it), and it ends with its parent (`parent_pid`; None: no
    watch) by calling `end`."""
    for number in GROUP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    if parent_pid is not None:
        end_with(parent_pid, end)


def stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and end the workers now, their current jobs with them (SIGTERM,
    then SIGKILL after STOP_S): `shutdown` alone lets each finish its current job."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # pid -> Process (3.10-3.14)
    reaper = getattr(pool, "_executor_manager_thread", None)  # the pool's thread, which reaps workers too
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + STOP_S
    for process in processes:
        # The sentinel, not join/is_alive: a Process whose exit the pool's thread reaped first reads
        # as alive until that thread records it.
        if not wait([process.sentinel], max(deadline - time.monotonic(), 0.0)):
            process.kill()
    if reaper is not None:
        reaper.join(STOP_S)  # it ends once it has recorded every worker's exit
