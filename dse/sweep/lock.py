"""One sweep at a time per output folder: `dse sweep` holds an OS lock on `sweep.lock` there while it runs.

Two sweeps writing one store would both train the trials neither has stored yet (each reads what is
stored when it starts) and both write the reports. So a sweep takes an exclusive `flock` on the file
`sweep.lock` in its output folder before it writes anything, holds it to its end, and a second sweep
on that folder is refused at once with one line naming the folder and the running sweep (its pid,
host and start time, which the holder writes into the file). Only the sweep's own process writes the
store (its local or Ray workers send their results back to it), so one holder is the whole rule.
Reading (`dse report`, `dse export`) takes no lock: SQLite's WAL lets readers run beside the writer.

The lock is the kernel's, not the file's existence: a sweep killed outright (SIGKILL, the out-of-memory
killer, a power loss) holds nothing once its process is gone, and the file it leaves (stale text) is
taken over by the next run. The holder removes the file when it ends; a taker checks that the file it
locked is still the one at the path (a holder may remove it between the taker's open and its lock).
Processes the sweep forks (figure processes) close their copy of the descriptor, so none of them
keeps the lock after the sweep has ended. The early check before a sweep's imports (`refuse_if_held`)
holds a shared lock for an instant, which `take` waits out. A holder that may not write the file
(another user's) leaves the previous holder's text: one naming a process of this host that is gone
is not quoted.

On NFS, Linux implements `flock` with the server's byte-range locks (NFSv4, or NFSv3 with its lock
manager): two hosts see each other's lock, and a client that dies loses it when its lease expires (90 s
by default). A mount with `nolock` (or `local_lock=flock`) keeps locks on each host, so sweeps on two
hosts are not kept apart there; SQLite's WAL needs one host anyway (docs/config.md). Where the file
system cannot lock at all (flock fails with ENOLCK or EOPNOTSUPP), the sweep runs unguarded and
says so (UnlockedWarning) rather than leave such a folder unusable.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from dse.errors import InputError

LOCK_FILE = "sweep.lock"

_HELD: dict[int, Path] = {}
"""Descriptors of the locks this process holds (closed in a child it forks)."""


def _close_in_child() -> None:
    for descriptor in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(descriptor)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
"""What flock raises on a file system that does not lock (some FUSE and SMB mounts)."""


def lock_path(directory: Path) -> Path:
    return Path(directory) / LOCK_FILE


def _holder(descriptor: int) -> str:
    """What the holder wrote into the lock file ('pid 12 on host h since 2026-01-01 10:00:00 UTC'), or a
    plain description while it has not written it yet, or where the text names a process of this host
    that is gone (a holder that may not write the file, in another user's folder, leaves an earlier
    holder's text there)."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = os.pread(descriptor, 512, 0).decode("utf-8").strip()
        if text and not _names_a_process_gone(text.splitlines()[0]):
            return text.splitlines()[0]
        if text:
            return "pid unknown: the lock file names an earlier sweep, its holder could not rewrite it"
    return "pid unknown"


def _names_a_process_gone(line: str) -> bool:
    """Whether `line` ('pid N on host H since ...') names a process of this host that does not run."""
    words = line.split()
    if len(words) < 5 or words[0] != "pid" or not words[1].isdigit() or words[3] != "host":
        return False
    if words[4] != socket.gethostname():
        return False
    try:
        os.kill(int(words[1]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # (another user's process: it runs)
        return False
    return False


def _open(path: Path) -> int:
    """A descriptor on the lock file, created where missing; read-only where this user may not write it
    (flock needs no write access, so a folder shared with another user still locks)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except PermissionError:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        on_path = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(descriptor)
    return (mine.st_dev, mine.st_ino) == (on_path.st_dev, on_path.st_ino)


def take(directory: Path) -> int:
    """Lock `directory`'s sweep.lock for this process; InputError where another sweep holds it. OSError
    where the file cannot be made (an unwritable folder: the caller's own checks name it)."""
    path = lock_path(directory)
    deadline = time.monotonic() + PROBE_WAIT_S
    while True:
        descriptor = _open(path)
        try:
            _lock_waiting_out_probes(descriptor, deadline)
        except OSError as error:
            holder = _holder(descriptor)
            empty = os.fstat(descriptor).st_size == 0
            os.close(descriptor)
            if error.errno in _UNSUPPORTED and empty:  # (made just now: no lock, no file)
                with contextlib.suppress(OSError):
                    path.unlink()
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise InputError(_in_use(directory, holder, path)) from None
        if _same_file(descriptor, path):
            break
        os.close(descriptor)  # its holder removed it between our open and our lock: take the new one
    _HELD[descriptor] = path
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    holder = f"pid {os.getpid()} on host {socket.gethostname()} since {started}\n"
    with contextlib.suppress(OSError):  # (the text only names the holder; a full disk may refuse it)
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, holder.encode(), 0)
    return descriptor


def release(descriptor: int) -> None:
    """Remove the lock file (while still holding it, so no other sweep holds a removed file) and unlock."""
    path = _HELD.pop(descriptor, None)
    try:
        if path is not None and _same_file(descriptor, path):
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        os.close(descriptor)


PROBE_WAIT_S = 0.5
"""How long `take` waits out a lock held by `refuse_if_held` (a shared lock held for microseconds) before
it refuses: a sweep's holder keeps its lock for the sweep's whole run."""


def _lock_waiting_out_probes(descriptor: int, deadline: float) -> None:
    """flock(LOCK_EX) without blocking, tried again until `deadline` while another process holds it
    (OSError EWOULDBLOCK after that)."""
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or time.monotonic() >= deadline:
                raise
        time.sleep(0.01)


def refuse_if_held(directory: Path) -> None:
    """InputError where another sweep holds `directory`'s lock: a command refused at once, before its
    seconds of imports and its workers' start. Found by a shared lock, taken and let go, on the file
    where there is one: it never conflicts with another such check, writes no holder text and makes or
    removes no file, so a sweep starting in the same instant (whose `take` waits out a shared lock) is
    not refused in the name of a command that was only checking. Nothing where the folder or its lock
    file is not there or cannot be read (the sweep's own `holding` decides then)."""
    path = lock_path(directory)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise InputError(_in_use(directory, _holder(descriptor), path)) from None
    finally:
        os.close(descriptor)  # (unlocks)


def _in_use(directory: Path, holder: str, path: Path) -> str:
    return (f"output folder {str(directory)!r} is in use by another dse sweep ({holder}; its lock: {path}): "
            "nothing was written; wait until it has finished, or choose another output path (output: or "
            "--output)")


class UnlockedWarning(UserWarning):
    """The output folder's file system does not lock (`flock` unsupported): the sweep runs unguarded."""


@contextlib.contextmanager
def holding(directory: Path) -> Iterator[None]:
    """The block runs holding `directory`'s lock (`take`, `release`); where the file system cannot lock,
    without one, said by an UnlockedWarning (refusing would leave such a folder unusable)."""
    try:
        descriptor = take(directory)
    except OSError as error:
        if error.errno not in _UNSUPPORTED:
            raise
        warnings.warn(f"{directory}: its file system does not support locks ({error.strerror}): nothing "
                      "keeps a second dse sweep from writing there at the same time", UnlockedWarning,
                      stacklevel=3)
        yield
        return
    try:
        yield
    finally:
        release(descriptor)

