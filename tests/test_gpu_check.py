"""benchmarks/gpu_check.py, the check a session with a GPU runs in one call, runs here on the CPU with
tiny settings (`--device cpu --quick`): each step writes its table, and the device path counts no
host synchronisation per training step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_the_gpu_check_runs_on_the_cpu_and_writes_its_tables(repo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "check"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick",
                           "--steps", "grouped,syncs", "--out", str(out)], cwd=repo_root, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "grouped speed: exit 0" in (out / "summary.txt").read_text()
    grouped = (out / "grouped.md").read_text().splitlines()
    rows = [line for line in grouped if line.startswith("| mnist1d | int8 |")]
    assert len(rows) == 2 and all(len(row.split("|")) == 7 for row in rows)  # MLP and CNN, alone, G = 1, 2
    table = (out / "syncs.md").read_text().splitlines()
    syncs = [line.split("|") for line in table if line.startswith("| format")]
    assert len(syncs) == 2
    for row in syncs:
        alone_per_step, alone_epoch, grouped_per_step = float(row[2]), int(row[3]), float(row[4])
        assert alone_per_step == 0 and grouped_per_step == 0 and alone_epoch > 0
    assert "CPU" in (out / "device.txt").read_text()
