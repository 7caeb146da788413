"""Denormals flushed on every thread a run computes on, and each thread's setting back afterwards.

Training flushes denormals (they appear as training goes on and slow the CPU down). torch's
`set_flush_denormal` sets the floating-point control (MXCSR) of the calling thread only; a worker
of torch's OpenMP thread pool keeps the control it inherited from the thread that created it. So at
more than one thread, flushing on the caller alone depends on the process's history: a 2^20-element
multiply of 1e-39 at 2 threads left its worker's half (524,288 elements) unflushed where a parallel
operation had run before flushing was turned on, none where it had not; and a group's stack, which
crosses torch's parallel grain where a member's tensor does not, flushed where the member alone did
not (docs/training.md). Where torch runs on GNU OpenMP, the caller starts a team of the run's size in
the very libgomp instance torch uses (`GOMP_parallel`, what `#pragma omp parallel` compiles to), and
every thread of it sets (later: restores) its own control. A thread a larger team creates later
inherits the control of the thread that creates it (POSIX), the caller's. Elsewhere (another OpenMP
runtime, no OpenMP) or where the team had fewer threads than asked for, a parallel probe checks
whether every thread flushes, and a warning says once where one does not. At one thread nothing of
this runs: only the caller computes.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import warnings
from collections.abc import Callable, Iterator
from functools import cache

import torch
from torch.utils._python_dispatch import _disable_current_modes

TINY_BITS = 0x000AE398
"""The bits of 1e-39, a float32 subnormal, which a multiply flushes to zero where denormals are
flushed. Written as bits: converting the number 1e-39 to float32 on a flushing thread gives 0."""

PROBE_ELEMENTS_PER_THREAD = 1 << 16
"""The parallel probe's multiply has this many elements per thread: twice torch's parallel grain
(32,768 elements, at::internal::GRAIN_SIZE), so that every thread of the team takes a share."""


class UnflushedThreadsWarning(UserWarning):
    """Some of torch's threads keep denormals where the run flushes them: at more than one thread a
    result may then differ from the same run at one thread, and a group's member from its run alone."""


def flushes_denormals() -> bool:
    """Whether the calling thread flushes denormals (a one-element multiply never leaves it)."""
    with _disable_current_modes(), torch._C.DisableTorchFunction():
        return bool(_tiny(1).mul(1.0)[0] == 0)


@contextlib.contextmanager
def denormals_flushed(threads: int) -> Iterator[None]:
    """Denormals flushed on the calling thread and, at more than one thread, on every thread of
    torch's `threads`-thread team (call it with torch's thread count already set); every thread's
    own setting back afterwards, as a library call should leave its caller's."""
    caller = flushes_denormals()
    if threads <= 1:
        torch.set_flush_denormal(True)
        try:
            yield
        finally:
            torch.set_flush_denormal(caller)
        return
    before = _set_on_team(threads, lambda: True, caller)
    try:
        if len(before) < threads:  # no team, or a smaller one than asked for (OMP_DYNAMIC, a limit)
            _check_all_flush(threads)
        yield
    finally:
        _set_on_team(max(threads, torch.get_num_threads()), lambda: before.get(threading.get_ident(), caller),
                     caller)


def flush_denormals(threads: int) -> None:
    """Denormals flushed for good on the calling thread and every thread of a `threads`-thread team:
    a sweep worker's process setting, for anything it runs besides `train` (which sets its own)."""
    if len(_set_on_team(threads, lambda: True, flushes_denormals())) < threads:
        _check_all_flush(threads)


def _set_on_team(threads: int, flush: Callable[[], bool], caller: bool) -> dict[int, bool]:
    """Set each thread of a `threads`-thread OpenMP team to `flush()` (called on that thread), the
    calling thread too; each thread's setting before, by thread id. The team starts before the
    calling thread's setting changes, so a thread it creates starts with the caller's `caller` (and
    counts that as its own before)."""
    before: dict[int, bool] = {threading.get_ident(): caller}
    team = _gnu_openmp_team() if threads > 1 else None
    if team is not None:
        lock = threading.Lock()
        errors: list[BaseException] = []

        def each_thread() -> None:
            try:
                own = flushes_denormals()
                torch.set_flush_denormal(flush())
                with lock:
                    before[threading.get_ident()] = own
            except BaseException as error:  # a ctypes callback cannot raise: hand it to the caller
                errors.append(error)

        team(threads, each_thread)
        if errors:
            raise errors[0]
    torch.set_flush_denormal(flush())  # the calling thread (also the team's first thread)
    return before


def _check_all_flush(threads: int) -> None:
    """Warn once per process where a multiply that every thread of the team shares leaves subnormals
    while the calling thread flushes them (the CPU may flush nothing at all: then no thread does)."""
    if not flushes_denormals() or _warned:
        return
    with _disable_current_modes(), torch._C.DisableTorchFunction():
        x = _tiny(threads * PROBE_ELEMENTS_PER_THREAD)
        unflushed = int(torch.count_nonzero(x.mul(1.0)))
    if unflushed:
        _warned.append(True)
        warnings.warn(
            f"denormals are flushed on the calling thread only: {unflushed} of {x.numel()} subnormals "
            f"stayed at {threads} threads ({_parallel_backend()}); a run at more than one thread may "
            f"differ from the same run at one thread", UnflushedThreadsWarning, stacklevel=4)


def _tiny(count: int) -> torch.Tensor:
    """`count` float32 subnormals (1e-39), written as bits whatever the caller flushes."""
    return torch.full((count,), TINY_BITS, dtype=torch.int32).view(torch.float32)


_warned: list[bool] = []
"""Whether this process has warned about threads that do not flush (once is enough)."""

_TEAM_BODY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


@cache
def _gnu_openmp() -> ctypes.CDLL | None:
    """The libgomp that torch's intra-op threads run on, or None where torch's parallel backend is
    not OpenMP, or no libgomp loaded in this process (this is not Linux: no /proc/self/maps; or its
    file cannot be opened again, replaced on disk since) is it.
    A process may hold several (scikit-learn's wheels bring their own): the one is the instance whose
    thread count follows `torch.set_num_threads` (the count is each instance's own); opening a loaded
    library's path again gives that same instance."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(maxsplit=5)[-1].strip() for line in maps if "libgomp" in line}
    except OSError:
        return None
    for path in sorted(p for p in paths if p.startswith("/")):
        try:
            library = ctypes.CDLL(path)
        except OSError:  # a mapped file replaced since (its path reads "... (deleted)"): not openable
            continue
        if hasattr(library, "GOMP_parallel") and hasattr(library, "omp_get_max_threads") \
                and _is_torchs(library):
            library.GOMP_parallel.argtypes = [_TEAM_BODY, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
            library.GOMP_parallel.restype = None
            return library
    return None


def _is_torchs(library: ctypes.CDLL) -> bool:
    """Whether `library`'s OpenMP thread count follows torch's, at two counts (then torch's back)."""
    threads = torch.get_num_threads()
    try:
        follows = []
        for count in (threads + 1, threads):
            torch.set_num_threads(count)
            follows.append(library.omp_get_max_threads() == count)
    finally:
        torch.set_num_threads(threads)
    return all(follows)


def _gnu_openmp_team() -> Callable[[int, Callable[[], None]], None] | None:
    """A function that runs its callable once on each thread of a team of the given size in torch's
    libgomp, the calling thread first among them; None where there is none."""
    library = _gnu_openmp()
    if library is None:
        return None

    def team(threads: int, body: Callable[[], None]) -> None:
        callback = _TEAM_BODY(lambda _data: body())
        library.GOMP_parallel(callback, None, threads, 0)

    return team


def _parallel_backend() -> str:
    lines = torch.__config__.parallel_info().splitlines()
    return next((line.split(":", 1)[1].strip() for line in lines if "parallel backend" in line), "unknown")
