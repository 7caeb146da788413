"""Where trials run: a local process pool, a Ray cluster, or this process (for debugging and tests).

Every executor calls `execute` on each job (one trial, or a group of trials trained together) and
hands each outcome to `on_done` in the parent as soon as it arrives, so the runner can commit it. A
trial that raises becomes an outcome with its error text; the others go on.

A run that is interrupted (a signal raises in the parent: dse/sweep/interrupt.py) stops its workers
before it re-raises: the local pool's processes are terminated, a cluster's Ray tasks cancelled and
a local Ray instance shut down with its workers (not cancelled first: Ray 2's driver can abort on a
force-cancel that races a task's completion, "Tried to complete task that was not pending", seen in
1 of 3 SIGTERMed local sweeps). Only the parent writes the store, so a stopped worker loses its current job
and nothing else; it reruns on resume. A local worker also ends itself when the sweep's process
ends without a chance to stop it (SIGKILL, the out-of-memory killer): it watches that process.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import socket
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from dse.errors import InputError, Unsupported
from dse.interrupts import GROUP_SIGNALS
from dse.processes import PARENT_PID_VARIABLE, become_helper, stop_workers

TrainFn = Callable[[Any], Any]
E = TypeVar("E")


@dataclass(frozen=True)
class TrialJob:
    trial_id: str
    config: dict[str, Any]
    """TrainConfig.to_dict(): plain data, cheap to ship to a worker."""
    threads: int = 1
    train_fn: TrainFn | None = None
    """None: dse.train.loop.train. Anything else must be picklable (a module-level function)."""
    sources: dict[str, str] = field(default_factory=dict)
    """Path -> text of the user's model and dataset files (`file.py:function`): the worker runs this
    text, so neither a process pool nor a Ray cluster needs the files on its disk."""


@dataclass(frozen=True)
class GroupJob:
    """Trials of one configuration trained together as one stacked network (dse/train/grouped.py)."""

    members: tuple[TrialJob, ...]
    available_bytes: int | None = None
    """The memory its device had available when the sweep was planned (None: measure when it starts)."""
    groups_at_once: int | None = None
    """Groups training at once on that device, sharing that memory equally (dse/sweep/groups.py);
    None: a Ray cluster's node, whose tasks at once are its CPUs over `threads` (one on a GPU)."""


Job = TrialJob | GroupJob


@dataclass
class TrialOutcome:
    trial_id: str
    result: dict[str, Any] | None
    """TrainResult.to_dict(), or None if the trial raised."""
    error: str = ""
    """`Type: message` (first line) if the trial raised."""
    traceback: str = ""
    wall_time_s: float = 0.0
    note: str = ""
    """A line the sweep prints, once per configuration, about how the trial trained (the GEMMs it left
    fp32, its group split on a Ray node)."""
    unsupported: bool = False
    """The trial raised dse.errors.Unsupported (this torch or device cannot run it): not the trial's
    result: the sweep runs every other trial, stores it, and then stops naming this one (unstored)."""


def _limit_threads(threads: int) -> None:
    import torch

    from dse.train.denormals import flush_denormals

    torch.set_num_threads(threads)
    flush_denormals(threads)  # on every thread of the worker's team, not only this one


_DATASETS: dict[tuple[str, str | None], Any] = {}
"""Datasets this worker has loaded: trials of one task share them (train never modifies its dataset)."""


def _dataset(name: str, data_dir: str | None) -> Any:
    key = (name, data_dir)
    if key not in _DATASETS:
        from dse.data import load_dataset

        _DATASETS[key] = load_dataset(name, data_dir)
    return _DATASETS[key]


@contextmanager
def _noted_warnings(notes: list[str], *noted: type[Warning]) -> Iterator[None]:
    """Training's warnings of the `noted` categories (and of the GEMMs it leaves fp32) as `notes`, each
    once: the sweep prints a configuration's note once, not each trial's warning (a group's would be
    lost in its worker); other warnings pass as they would."""
    from dse.train.layers import UnconvertedGemmWarning

    kinds: tuple[type[Warning], ...] = (UnconvertedGemmWarning, *noted)
    with warnings.catch_warnings(record=True) as caught:
        for kind in kinds:
            warnings.simplefilter("always", kind)
        try:
            yield
        finally:
            for w in caught:
                if not issubclass(w.category, kinds):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            notes.extend(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, kinds)))


def execute_trial(job: TrialJob) -> TrialOutcome:
    """Train one trial in this process with its own thread budget; never raises for a failing trial."""
    start = time.perf_counter()
    notes: list[str] = []
    try:
        from dse.train.config import TrainConfig
        from dse.usercode import provide_sources

        provide_sources(job.sources)
        # train() applies the thread budget and restores the caller's settings afterwards.
        config = TrainConfig.from_dict({**job.config, "threads": job.threads})
        if job.train_fn is None:
            from dse.train.loop import train

            with _noted_warnings(notes):
                data = train(config, dataset=_dataset(config.dataset, config.data_dir)).to_dict()
        else:
            result = job.train_fn(config)
            data = result.to_dict() if hasattr(result, "to_dict") else dict(result)  # a test's plain dict
        return TrialOutcome(job.trial_id, data, wall_time_s=time.perf_counter() - start,
                            note="; ".join(notes))
    except Exception as error:  # a failing trial is a result, recorded with its error
        message = str(error).splitlines()[0] if str(error) else ""
        text = f"{type(error).__name__}: {message}" if message else type(error).__name__
        return TrialOutcome(job.trial_id, None, error=text, traceback=traceback.format_exc(),
                            wall_time_s=time.perf_counter() - start,
                            unsupported=isinstance(error, Unsupported))


def execute_group(job: GroupJob) -> list[TrialOutcome]:
    """Train a group's trials together; if that raises, each trial alone (so one bad trial fails
    alone). With a test's `train_fn` the trials run one by one."""
    members = job.members
    if members[0].train_fn is not None:
        return [execute_trial(member) for member in members]
    start = time.perf_counter()
    notes: list[str] = []
    try:
        from dse.train.config import TrainConfig
        from dse.train.grouped import GroupSplitWarning, train_group
        from dse.usercode import provide_sources

        provide_sources(members[0].sources)
        configs = [TrainConfig.from_dict({**m.config, "threads": m.threads}) for m in members]
        at_once = job.groups_at_once
        if at_once is None:
            at_once = 1 if _on_cuda(job) else max(1, (os.cpu_count() or 1) // members[0].threads)
        with _noted_warnings(notes, GroupSplitWarning):
            results = train_group(configs, dataset=_dataset(configs[0].dataset, configs[0].data_dir),
                                  available_bytes=job.available_bytes, groups_at_once=at_once)
    except Exception:  # a failing member is found and recorded by training each alone
        return [execute_trial(member) for member in members]
    wall = (time.perf_counter() - start) / len(members)
    note = "; ".join(notes)
    return [TrialOutcome(member.trial_id, result.to_dict(), wall_time_s=wall, note=note)
            for member, result in zip(members, results, strict=True)]


def execute(job: Job) -> list[TrialOutcome]:
    """The outcomes of one job: a trial's, or each of a group's trials'."""
    return execute_group(job) if isinstance(job, GroupJob) else [execute_trial(job)]


def execute_in_worker(job: Job) -> list[TrialOutcome]:
    """`execute` in a worker process that is dse's own (a Ray worker): freed memory kept, as in the
    sweep's other workers."""
    from dse.train.allocator import keep_freed_memory

    keep_freed_memory()
    return execute(job)


class Executor(Protocol):
    """Where jobs run. Used as a context manager: entering acquires what the executor needs (a Ray
    cluster) before the sweep writes anything, leaving releases it."""

    def __enter__(self: E) -> E: ...

    def __exit__(self, *exc: object) -> None: ...

    def run(self, jobs: Sequence[Job], on_done: Callable[[TrialOutcome], None]) -> None: ...


class _NothingToAcquire:
    """An executor that holds nothing between runs: entering and leaving do nothing."""

    def __enter__(self: E) -> E:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class InlineExecutor(_NothingToAcquire):
    """Runs trials one after another in this process (no parallelism; for debugging and tests)."""

    def run(self, jobs: Sequence[Job], on_done: Callable[[TrialOutcome], None]) -> None:
        for job in jobs:
            for outcome in execute(job):
                on_done(outcome)


def _warm_up(threads: int, sweep_pid: int | None = None) -> None:
    """Worker initializer: set the thread budget and import the trainer before the first trial
    arrives; leave Ctrl-C to the sweep (which stops its workers) and end with the sweep's process."""
    _limit_threads(threads)
    become_helper(sweep_pid)
    import dse.train.loop  # noqa: F401
    from dse.train.allocator import keep_freed_memory

    keep_freed_memory()


def worker_context() -> multiprocessing.context.BaseContext:
    """Processes forked from a server that has imported the trainer once (POSIX), else spawned.

    Spawning N workers makes each import torch and dse at once, seconds of work that a short sweep
    feels; the fork server pays it once, before any torch thread pool exists, and forks from there.
    It also imports torch._dynamo, which torch imports when the first optimizer is built.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["dse.sweep.server_start", "dse.train.loop",
                                    "dse.train.grouped", "torch._dynamo", "dse.sweep.server_ready"])
    return context


def start_worker_server() -> None:
    """Start the fork server now: it imports the trainer (and what the first optimizer imports) in a
    process of its own while the caller plans the sweep, instead of after it; no-op where workers
    are spawned. It ends with this process: a sweep that stops before training (a file found invalid,
    an interrupt) leaves no server behind finishing seconds of imports for nothing, even one killed
    outright (dse/sweep/server_start.py). It serves every later sweep of the process, whichever thread
    runs it."""
    context = worker_context()
    if context.get_start_method() == "forkserver":
        from multiprocessing import forkserver, resource_tracker

        # The resource tracker and the server inherit the signals a terminal sends the whole group
        # blocked, until they ignore them: the tracker ignores SIGINT itself but not SIGHUP, which
        # killed it, so that a closed terminal printed its successor's KeyError tracebacks. The
        # tracker's start unblocks SIGINT after it (CPython 3.11-3.13), so they are blocked again for
        # the server's; its start probes the tracker once more, which warns where the tracker dies at
        # start (as under tests/test_permissions.py's other user) above the command's own error line.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)
        try:
            resource_tracker.ensure_running()
            signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)
            os.environ[PARENT_PID_VARIABLE] = str(os.getpid())  # (the server's, read as it starts)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "resource_tracker: process died unexpectedly")
                forkserver.ensure_running()
        finally:
            os.environ.pop(PARENT_PID_VARIABLE, None)
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        atexit.unregister(stop_worker_server)  # once
        atexit.register(stop_worker_server)


def _worker_server_pid() -> int | None:
    """The process id of this process's fork server; None: none runs."""
    from multiprocessing import forkserver

    return getattr(forkserver._forkserver, "_forkserver_pid", None)


def worker_server_running() -> bool:
    """Whether this process has started its fork server already (then `start_worker_server` is a no-op)."""
    return _worker_server_pid() is not None


def stop_worker_server() -> None:
    """End this process's fork server now, if one runs. Closing its pipe alone (multiprocessing's way)
    ends it only once it has imported what it preloads, so it is sent SIGTERM first."""
    from multiprocessing import forkserver

    pid = _worker_server_pid()
    stop = getattr(forkserver._forkserver, "_stop", None)  # closes the pipe, reaps it (CPython 3.8-3.14)
    if pid is None or stop is None:
        return
    with suppress(ProcessLookupError):  # ended already
        os.kill(pid, signal.SIGTERM)
    with suppress(OSError):  # reaped already
        stop()


class LocalExecutor(_NothingToAcquire):
    """A pool of `workers` processes with fresh interpreter state (no forked torch thread pools)."""

    def __init__(self, workers: int, threads: int = 1) -> None:
        self.workers = workers
        self.threads = threads

    def run(self, jobs: Sequence[Job], on_done: Callable[[TrialOutcome], None]) -> None:
        if not jobs:
            return
        pool = ProcessPoolExecutor(max_workers=min(self.workers, len(jobs)), mp_context=worker_context(),
                                   initializer=_warm_up, initargs=(self.threads, os.getpid()))
        try:
            pending: set[Future[list[TrialOutcome]]] = {pool.submit(execute, job) for job in jobs}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                broken = [future for future in done if isinstance(future.exception(), BrokenProcessPool)]
                stopped: InputError | None = None
                for future in done:  # every job that finished is stored before the run stops
                    if future not in broken:
                        for outcome in future.result():
                            try:
                                on_done(outcome)
                            except InputError as error:  # (a trial this torch cannot run)
                                stopped = stopped or error
                if stopped is not None:
                    raise stopped
                if broken:
                    raise InputError("a worker process died (out of memory, or killed) and the sweep stopped "
                                     "its others; the trials that finished are stored: run the same command "
                                     "again to resume")
        except BaseException:
            stop_workers(pool)
            raise
        pool.shutdown(wait=True)


RAY_CONNECT_TIMEOUT_S = 10.0
RAY_LOCAL_STARTS = 3
"""Tries to start a local Ray instance. Ray gives its raylet a fixed 30 s to register during `ray.init`;
its start costs about 4.5 CPU-seconds over nine processes, so on a starved CPU it can miss that
deadline (measured on the 2-vCPU VM: 8 s at load 5, 35 s with a sixth of a core, a timeout with a
ninth). A start that missed it is tried again; the processes it left are Ray's to end (its reaper
ends them with this process)."""


def _check_reachable(address: str) -> None:
    """Fail fast on a `host:port` or `ray://host:port` nobody listens on (ray.init retries for minutes)."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return  # 'auto' and other forms: ray.init resolves them and fails quickly if there is nothing
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise InputError(f"executor.address: cannot reach Ray at {address!r}: {reason}") from None


def _on_cuda(job: Job) -> bool:
    """Whether a job trains on a CUDA device (its trials' `device`)."""
    member = job.members[0] if isinstance(job, GroupJob) else job
    return str(member.config.get("device", "cpu")).startswith("cuda")


@contextmanager
def _own_sigterm_handler() -> Iterator[None]:
    """Keep this process's SIGTERM handler across `ray.init`, which replaces it with `sys.exit(15)`:
    the sweep's handler (dse.interrupts.signals_interrupt) stops the tasks and exits with 143."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if handler is not None:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signal.SIGTERM, handler)


class RayExecutor:
    """Trials as Ray tasks, each reserving `threads` CPUs and, when it trains on CUDA, one GPU; no address:
    a local instance of `workers` CPUs. A task whose worker dies (a node lost, a process killed) is
    retried up to `retries` times; a trial that raises is a result and is not retried."""

    def __init__(self, workers: int, threads: int = 1, address: str | None = None, retries: int = 2) -> None:
        try:
            import ray
        except ImportError:
            raise InputError("executor.backend ray: Ray is not installed: pip install 'dse[ray]'") from None
        self.ray = ray
        self.workers = workers
        self.threads = threads
        self.address = address
        self.retries = retries
        self.started = False

    def __enter__(self) -> RayExecutor:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        """Join the cluster (or start a local instance) before anything is written."""
        ray = self.ray
        if ray.is_initialized():
            return
        if self.address is not None:
            _check_reachable(self.address)
        tries = RAY_LOCAL_STARTS if self.address is None else 1  # a cluster that is not there stays so
        for attempt in range(1, tries + 1):
            try:
                with _own_sigterm_handler():
                    if self.address is None:
                        ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False,
                                 configure_logging=False)
                    else:
                        ray.init(address=self.address, log_to_driver=False, configure_logging=False)
                break
            except Exception as error:  # ConnectionError, RuntimeError, ValueError: all mean "no cluster"
                message = str(error).splitlines()[0] if str(error) else type(error).__name__
                if self.address is None and "timed out during startup" in message:
                    ray.shutdown()
                    if attempt < tries:
                        continue
                    message = f"{message} ({tries} tries; the machine may be too busy to start Ray)"
                where = repr(self.address) if self.address is not None else "a local instance"
                raise InputError(f"executor: cannot start Ray at {where}: {message}") from None
        self.started = True

    def task_options(self, job: Job) -> dict[str, Any]:
        """What one job reserves on the cluster and how often a lost worker is retried."""
        return {"num_cpus": self.threads, "num_gpus": 1 if _on_cuda(job) else 0, "max_retries": self.retries}

    def run(self, jobs: Sequence[Job], on_done: Callable[[TrialOutcome], None]) -> None:
        if not jobs:
            return
        self.connect()
        ray = self.ray
        remote = ray.remote(execute_in_worker)
        pending = [remote.options(**self.task_options(job)).remote(job) for job in jobs]
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    for outcome in self._outcomes(ref):
                        on_done(outcome)
        except BaseException:
            if self.address is not None:  # a local instance ends with its tasks at `close`
                for ref in pending:
                    ray.cancel(ref, force=True)
            raise

    def _outcomes(self, ref: Any) -> list[TrialOutcome]:
        """A finished task's outcomes; a task Ray lost (its worker or node died past `retries` retries)
        an InputError: the run stops, the trials stored so far kept."""
        try:
            outcomes: list[TrialOutcome] = self.ray.get(ref)
        except self.ray.exceptions.RayError as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise InputError(f"a Ray task failed after {self.retries} retries ({type(error).__name__}: "
                             f"{message}); the trials that finished are stored: run the same command "
                             "again to resume") from None
        return outcomes

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False
