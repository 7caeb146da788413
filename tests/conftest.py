"""Shared by every test folder (tests/ mirrors the package: formats, energy, models, train, sweep,
report, data; the package's top-level modules are tested at the top).

Tests reach the shared helpers only through the fixtures below, never by importing a helper module:
`support.frames` builds synthetic sweep results, `support.fakes` holds stand-in training functions,
`support.processes` finds the processes a sweep started, `support.host_syncs` counts what would make
the host wait for a GPU.
The fakes stay in a module of their own because sweep worker processes unpickle them by their dotted
name; pytest puts this folder on sys.path when it loads this conftest (and process pools hand their
workers that sys.path), so `support.fakes` imports there too. The helper fixtures are session-scoped
functions, so module-scoped fixtures and hypothesis tests can use them.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from support import fakes, processes
from support.host_syncs import HostSyncs

# A suite started in the background of a non-interactive shell (`pytest &`) inherits SIGINT ignored
# (POSIX), and so does every process a test starts: the Ctrl-C tests failed for the launcher's sake.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository's root folder (examples/, docs/, cli.py)."""
    return ROOT


@pytest.fixture(scope="session")
def tests_dir() -> Path:
    """tests/: the folder a subprocess puts on sys.path to import a fake by its module name."""
    return TESTS


# Stand-in training functions (support.fakes), picklable for worker processes.

@pytest.fixture(scope="session")
def fake_train() -> Callable[..., Any]:
    """Raises for format int4, diverges for lr >= 10, else 'trains' instantly; logs to $DSE_FAKE_LOG."""
    return fakes.fake_train


@pytest.fixture(scope="session")
def fake_accuracy() -> Callable[..., float]:
    """The test (split 0) or validation (split 1) accuracy fake_train reports for a TrainConfig."""
    return fakes.fake_accuracy


@pytest.fixture(scope="session")
def slow_train() -> Callable[..., Any]:
    """fake_train taking 0.25 s a trial, so a sweep can be killed in the middle."""
    return fakes.slow_train


@pytest.fixture(scope="session")
def validated_train() -> Callable[..., Any]:
    """fake_train whose validation prefers lr 0.03 and test lr 0.1 when lr is tuned over [0.01, 0.03, 0.1]."""
    return fakes.validated_train


# Synthetic sweep results (support.frames), in the shape dse.sweep.store.load_trials returns.

def _frames() -> Any:
    """support.frames, imported when a fixture first needs it: it builds on the sweep code (and so on
    pydantic), which the tests that need a GPU do not (benchmarks/gpu_check.py runs them where
    pydantic may be missing)."""
    from support import frames

    return frames


@pytest.fixture(scope="session")
def make_trial_row() -> Callable[..., dict[str, Any]]:
    """One trial row: make_trial_row(task, label, seed, accuracy, energy_mj_per_workload, **options)."""
    return _frames().trial_row


@pytest.fixture(scope="session")
def make_trials_frame() -> Callable[..., pd.DataFrame]:
    """A trials frame with the sweep's attrs: make_trials_frame(rows, workloads, memory_objective=False)."""
    return _frames().trials_frame


@pytest.fixture(scope="session")
def unit_shares() -> tuple[float, ...]:
    """How make_trial_row splits a workload's energy over the units (dse.sweep.store.UNITS' order)."""
    return _frames().UNIT_SHARES


@pytest.fixture(scope="session")
def make_example_trials() -> Callable[..., pd.DataFrame]:
    """The example sweep on the given workloads (default proxy and resnet50): two tasks, three seeds,
    a diverged seed, an all-error configuration, LaTeX-hostile labels."""
    return _frames().example_trials


@pytest.fixture
def example_trials(make_example_trials: Callable[..., pd.DataFrame]) -> pd.DataFrame:
    """A fresh copy of the example sweep on proxy and resnet50."""
    return make_example_trials()


@pytest.fixture(scope="session")
def store_trials() -> Callable[[Path, pd.DataFrame], None]:
    """store_trials(directory, trials) writes a trials frame into a sweep store as the runner does."""
    return _frames().store_trials


@pytest.fixture
def built_store(tmp_path: Path, store_trials: Callable[[Path, pd.DataFrame], None],
                example_trials: pd.DataFrame) -> Path:
    """A sweep store of the example sweep at tmp_path/results/quickstart (where the quickstart writes)."""
    store = tmp_path / "results" / "quickstart"
    store.mkdir(parents=True)
    store_trials(store, example_trials)
    return store


# Host synchronisations (support.host_syncs), counted on CPU tensors on the device path.

@pytest.fixture(scope="session")
def host_syncs() -> type[HostSyncs]:
    """HostSyncs: `with host_syncs() as seen:` records in seen.syncs every read back to the host, output
    sized by the data and tensor made from host data (run it inside dse.formats.fast.device_path())."""
    return HostSyncs


# The processes a test started (support.processes: Linux /proc).

@pytest.fixture(scope="session")
def process_tree() -> Callable[[int], dict[int, str]]:
    """process_tree(pid): pid -> name of the live processes descended from pid or in its session
    (skips the test where there is no /proc)."""
    if not processes.available():
        pytest.skip("reads processes from /proc (Linux)")
    return processes.processes_of


@pytest.fixture(scope="session")
def survivors() -> Callable[[dict[int, str], float], dict[int, str]]:
    """survivors(processes, within_s): those still alive after waiting up to within_s for them to end."""
    return processes.survivors


@pytest.fixture(scope="session")
def session_of() -> type[processes.Session]:
    """session_of(process): `with session_of(process) as session:` ... `code, left = session.stop(...)`:
    a process started in a session of its own, stopped, and every process it started checked and reaped
    (support.processes.Session; skips the test where there is no /proc)."""
    if not processes.available():
        pytest.skip("reads processes from /proc (Linux)")
    return processes.Session
