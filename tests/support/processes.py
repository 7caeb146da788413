"""What a process started: the processes descended from it or in its session, read from /proc (Linux), so a
test can check that none outlives a stopped sweep (a worker forked by a fork server is a grandchild,
and an orphan's parent becomes init: the session finds it still)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROC = Path("/proc")


def _table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, name) of every live process (zombies left out)."""
    table = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended while we read
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        state, parent, _, session = stat[stat.rindex(")") + 2:].split()[:4]
        if state not in ("Z", "X"):
            table[int(entry.name)] = (int(parent), int(session), name)
    return table


def processes_of(root: int) -> dict[int, str]:
    """pid -> name of the live processes descended from `root` or in the session `root` leads
    (`root` itself included while it lives)."""
    table = _table()
    found = {root}
    grew = True
    while grew:
        grew = False
        for pid, (parent, session, _) in table.items():
            if pid not in found and (parent in found or session == root):
                found.add(pid)
                grew = True
    return {pid: table[pid][2] for pid in found if pid in table}


def survivors(processes: dict[int, str], within_s: float) -> dict[int, str]:
    """Those of `processes` still alive after waiting up to `within_s` for them to end."""
    deadline = time.monotonic() + within_s
    while True:
        table = _table()
        alive = {pid: name for pid, name in processes.items() if pid in table}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def available() -> bool:
    """Whether this platform shows processes the way these helpers read them."""
    return (PROC / str(os.getpid()) / "stat").is_file()


class Session:
    """`process`, started in a session of its own (start_new_session=True), and every process it starts:
    stopped by the test (`stop`), which checks that none outlives it; however the test ends, whatever
    is left of the session is killed (SIGKILL) and `process` reaped."""

    def __init__(self, process: subprocess.Popen[Any]) -> None:
        self.process = process

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(ProcessLookupError):  # (ended whole already)
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self, stop: Callable[[], object], at_least: int, within_s: float = 30.0,
             exit_within_s: float = 120.0) -> tuple[int, dict[int, str]]:
        """Take the session's processes (at least `at_least`: asserted), call `stop`, wait for `process`
        to end (up to `exit_within_s`): its exit code, and those of the processes taken still alive
        `within_s` later."""
        started = processes_of(self.process.pid)
        assert len(started) >= at_least, started
        stop()
        code = self.process.wait(timeout=exit_within_s)
        return code, survivors(started, within_s)
