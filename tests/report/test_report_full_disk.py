"""A report that cannot be written whole (a full disk) writes none of its files: one line naming the file,
exit code 2, and the output folder as it was before the command."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dse.sweep.store import STORE_FILE


def _sweep_text(out: Path, seeds: str = "[0, 1]") -> str:
    return (f"name: full\nseeds: {seeds}\ntask: {{model: mlp, dataset: digits, epochs: 1}}\n"
            f"energy: {{workloads: [proxy]}}\ntrials: [{{format: [fp32, int8], optimizer: sgd}}]\n"
            f"executor: {{group_size: 1}}\noutput: {out}\n")


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def _limited(args: list[str], repo_root: Path, limit_bytes: int) -> subprocess.CompletedProcess[str]:
    import resource

    def full_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "dse.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(repo_root)}, preexec_fn=full_disk, timeout=600)


@pytest.mark.parametrize("before", ["no reports", "older reports"])
def test_a_report_that_cannot_be_written_whole_leaves_the_output_folder_as_it_was(
        tmp_path: Path, repo_root: Path, fake_train: Callable[..., Any], before: str) -> None:
    """`dse report` where no file may grow past 40 KB (RLIMIT_FSIZE, as a full disk: the tables fit, a
    plot does not) on a sweep's folder without reports and with older reports (written before the
    second seed's trials were stored): exit code 2, one line naming the plot, and every file of the
    folder byte for byte as before, nothing added. Before, the tables were written and the plots not: new
    tables beside old or missing plots."""
    from dse.sweep import parse_config, run_sweep
    from dse.sweep.executors import InlineExecutor

    out = tmp_path / "out"
    if before == "older reports":
        run_sweep(parse_config(_sweep_text(out, "[0]"), "s.yaml"), train_fn=fake_train,
                  executor=InlineExecutor())
    run_sweep(parse_config(_sweep_text(out), "s.yaml"), train_fn=fake_train, executor=InlineExecutor(),
              reports=False)
    assert ((out / "summary.csv").exists()) == (before == "older reports")
    kept = _files(out)
    names = sorted(path.name for path in out.iterdir())
    result = _limited(["report", str(out)], repo_root, 40_000)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert sorted(path.name for path in out.iterdir()) == names
    assert _files(out) == kept
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write {out}/"), lines
    assert "File too large (no report file was written)" in lines[0] and "Traceback" not in result.stderr
    assert (out / STORE_FILE).exists()


def test_a_sweeps_report_that_cannot_be_written_whole_writes_none_and_keeps_the_trials(
        tmp_path: Path, repo_root: Path, fake_train: Callable[..., Any]) -> None:
    """`dse sweep`'s report at its end on a full disk (40 KB a file), the trials all stored (trained
    here): exit code 2, one line naming the plot, and no report file in the folder (the store, which
    the rerun opens to write, aside: its other files byte for byte as before)."""
    from dse.sweep import parse_config, run_sweep
    from dse.sweep.executors import InlineExecutor

    out = tmp_path / "out"
    config = tmp_path / "s.yaml"
    config.write_text(_sweep_text(out))
    run_sweep(parse_config(_sweep_text(out), "s.yaml"), train_fn=fake_train, executor=InlineExecutor(),
              reports=False)
    kept = {name: data for name, data in _files(out).items() if not name.startswith(STORE_FILE)}
    result = _limited(["sweep", str(config)], repo_root, 40_000)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert {name: data for name, data in _files(out).items() if not name.startswith(STORE_FILE)} == kept
    assert sorted(path.name for path in out.iterdir() if not path.name.startswith(STORE_FILE)) == sorted(kept)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write {out}/"), lines
    assert "(no report file was written)" in lines[0] and "Traceback" not in result.stderr
