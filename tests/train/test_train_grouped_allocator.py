"""A grouped run keeps the memory its steps free for the next step (dse/train/allocator.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

GROUP_FAULTS = """
import resource, sys
import dse.train.grouped as grouped
from dse.data import load_dataset
from dse.train.config import TrainConfig
if sys.argv[1] == "glibc":
    grouped.keep_freed_memory = lambda: False  # glibc's own thresholds
data = load_dataset("mnist1d")
configs = [TrainConfig(model="mlp", dataset="mnist1d", epochs=2, batch_size=100, seed=s) for s in range(4)]
grouped.train_group([c.replace(epochs=1) for c in configs], data)  # imports, probes, the heap's growth
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
grouped.train_group(configs, data)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(os, "confstr")
                                or not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"),
                                reason="glibc's malloc only")


def _faults(allocator: str) -> int:
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-c", GROUP_FAULTS, allocator]
    return int(subprocess.run(command, check=True, capture_output=True, text=True, env=env, cwd=ROOT).stdout)


def test_a_grouped_run_faults_in_fewer_fresh_pages_than_with_glibcs_own_thresholds() -> None:
    kept, glibc = _faults("kept"), _faults("glibc")
    assert kept * 4 < glibc, (kept, glibc)


def test_keeping_freed_memory_takes_on_glibc() -> None:
    from dse.train.allocator import keep_freed_memory

    assert keep_freed_memory() is True
