"""benchmarks/gpu_check.py, the check a session with a GPU runs in one call, runs here on the CPU with
tiny settings (`--device cpu --quick`): each step writes its table, and the device path counts no
host synchronisation per training step. The full check's steps fit the one call of the device tool."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

DEVICE_CALL_S = 540
"""The device tool's one call that runs the check (its command limit is 600 s; the session's 15
minutes of device time include the machine's start)."""


@pytest.fixture(scope="module")
def check(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the quick check on the CPU wrote, every step but the GPU tests."""
    out = tmp_path_factory.mktemp("gpu_check") / "check"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick",
                           "--steps", "grouped,alignment,syncs", "--out", str(out)], cwd=repo_root,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_the_gpu_check_runs_on_the_cpu_and_writes_its_tables(check: Path) -> None:
    summary = (check / "summary.txt").read_text()
    assert all(f"{step}: exit 0" in summary for step in ("grouped speed", "alignment", "syncs")), summary
    grouped = (check / "grouped.md").read_text().splitlines()
    rows = [line for line in grouped if line.startswith("| mnist1d | int8 |")]
    assert len(rows) == 2 and all(len(row.split("|")) == 7 for row in rows)  # MLP and CNN, alone, G = 1, 2
    table = (check / "syncs.md").read_text().splitlines()
    syncs = [line.split("|") for line in table if line.startswith("| format")]
    assert len(syncs) == 2
    for row in syncs:
        alone_per_step, alone_epoch, grouped_per_step = float(row[2]), int(row[3]), float(row[4])
        assert alone_per_step == 0 and grouped_per_step == 0 and alone_epoch > 0
    assert "CPU" in (check / "device.txt").read_text()


def test_the_alignment_step_tables_every_grouped_gemm_and_convolution(check: Path) -> None:
    """Its GEMM rows are the layouts the MLP's and CNN's grouped steps met (3 Linear layers' forward,
    2 backward-data and 3 backward-weight products in the MLP; the CNN's one Linear's 3), each with
    what dse decided for it; a cost row per model; a row per convolution of the CNN; a profile each."""
    lines = (check / "alignment.md").read_text().splitlines()
    gemms = [line.split(" | ") for line in lines if line.startswith("| ") and " | 2 | " in line]
    assert len(gemms) == 8 + 3
    assert all(row[-1] in ("batched |", "member by member |") for row in gemms)
    costs = [line.split(" | ") for line in lines if line.startswith(("| mlp | int8 |", "| cnn | int8 |"))]
    assert len(costs) == 2 and all(float(row[4]) > 0 and float(row[5]) > 0 for row in costs)
    assert sum(line.startswith(("| 1->25,", "| 25->25,")) for line in lines) == 3
    profile = (check / "profile.md").read_text()
    assert "### mlp, int8" in profile and "### cnn, int8" in profile


def test_the_full_gpu_check_fits_one_call_of_the_device_tool(repo_root: Path) -> None:
    spec = importlib.util.spec_from_file_location("gpu_check", repo_root / "benchmarks" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # (its dataclasses look their module up)
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["gpu_check"]
    assert module.Plan().planned_s() <= DEVICE_CALL_S
