"""What a process started: the processes descended from it or in its session, read from /proc (Linux), so a
test can check that none outlives a stopped sweep (a worker forked by a fork server is a grandchild,
and an orphan's parent becomes init: the session finds it still)."""

from __future__ import annotations

import os
import time
from pathlib import Path

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
