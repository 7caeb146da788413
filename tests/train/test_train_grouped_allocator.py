"""Freed memory kept for the next step (dse/train/allocator.py): a grouped run faults in fewer fresh
pages with it; dse's own processes (`dse train`, `dse sweep`, its workers) keep it, and the library
leaves a caller's process (a notebook) as it is. Each check runs in a child process: the setting is
process-wide and cannot be undone."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

GROUP_FAULTS = """
import resource, sys
from dse.data import load_dataset
from dse.train.allocator import keep_freed_memory
from dse.train.config import TrainConfig
from dse.train.grouped import train_group
if sys.argv[1] == "kept":
    keep_freed_memory()
data = load_dataset("mnist1d")
configs = [TrainConfig(model="mlp", dataset="mnist1d", epochs=2, batch_size=100, seed=s) for s in range(4)]
train_group([c.replace(epochs=1) for c in configs], data)  # imports, probes, the heap's growth
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
train_group(configs, data)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

KEPT_BY = """
import sys
from dse.train.allocator import keep_freed_memory
if sys.argv[1] == "train_group":
    from dse.data import load_dataset
    from dse.train.config import TrainConfig
    from dse.train.grouped import train_group
    train_group([TrainConfig(model="mlp", dataset="mnist1d", epochs=1, seed=s) for s in range(2)],
                load_dataset("mnist1d"))
elif sys.argv[1] == "sweep worker":
    from dse.sweep.executors import _warm_up
    _warm_up(1)
elif sys.argv[1] == "dse train":
    from dse.cli import app
    app(["train", "--model", "mlp", "--dataset", "mnist1d", "--epochs", "1", "-q"], standalone_mode=False)
print(keep_freed_memory.cache_info().currsize, keep_freed_memory() if sys.argv[1] == "called" else "")
"""

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")


def _child(script: str, argument: str) -> str:
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-c", script, argument]
    return subprocess.run(command, check=True, capture_output=True, text=True, env=env, cwd=ROOT).stdout


def test_a_grouped_run_faults_in_fewer_fresh_pages_with_freed_memory_kept() -> None:
    kept, glibc = int(_child(GROUP_FAULTS, "kept")), int(_child(GROUP_FAULTS, "glibc"))
    assert kept * 4 < glibc, (kept, glibc)


@pytest.mark.parametrize(("process", "kept"), [("train_group", False), ("sweep worker", True),
                                               ("dse train", True)])
def test_dses_own_processes_keep_freed_memory_and_the_library_leaves_a_callers_alone(
        process: str, kept: bool) -> None:
    assert _child(KEPT_BY, process).split()[-1:] == (["1"] if kept else ["0"])


def test_keeping_freed_memory_takes_on_glibc() -> None:
    assert _child(KEPT_BY, "called").split() == ["0", "True"]
