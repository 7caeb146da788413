"""Grouped sweeps: the groups come from the sweep file alone (not the worker count, not the store), a
grouped sweep stores what an ungrouped one stores, a partly stored group reruns whole and stores only
what is missing, and a killed grouped sweep resumes with every trial exactly once."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from dse.cli import app
from dse.sweep import load_trials, parse_config, run_sweep
from dse.sweep.executors import GroupJob, InlineExecutor
from dse.sweep.store import STORE_FILE

runner = CliRunner()


def _text(output: Path, seeds: str = "[0, 1, 2]", executor: str = "{group_size: 2}",
          model: str = "mlp") -> str:
    return f"""\
name: groups
seeds: {seeds}
task: {{model: {model}, dataset: digits, epochs: 1}}
energy: {{workloads: [proxy]}}
trials:
  - {{format: [fp32, int8], optimizer: sgd, tune: {{lr: [0.05, 0.1]}}}}
executor: {executor}
output: {output}
"""


class Recording(InlineExecutor):
    """Runs inline and keeps each job's trial ids."""

    def __init__(self) -> None:
        self.jobs: list[tuple[str, ...]] = []

    def run(self, jobs: Any, on_done: Any) -> None:
        jobs = list(jobs)
        self.jobs += [tuple(m.trial_id for m in job.members) if isinstance(job, GroupJob) else (job.trial_id,)
                      for job in jobs]
        super().run(jobs, on_done)


def _sweep(text: str, executor: InlineExecutor | None = None, force: bool = False) -> Any:
    return run_sweep(parse_config(text, "s.yaml"), executor=executor or InlineExecutor(), reports=False,
                     force=force)


def _finished(out: Path) -> dict[str, float]:
    with sqlite3.connect(out / STORE_FILE) as connection:
        rows = connection.execute("SELECT trial_id, finished_at FROM trials").fetchall()
    assert len(rows) == len({row[0] for row in rows})
    return dict(rows)


def _results(out: Path) -> dict[str, str]:
    """Each trial's stored outcome (accuracies, loss, curves) as text, its wall time left out."""
    with sqlite3.connect(out / STORE_FILE) as connection:
        rows = connection.execute("SELECT trial_id, status, val_accuracy, test_accuracy, final_loss, result "
                                  "FROM trials").fetchall()
    outcomes = {}
    for trial, *values, result in rows:
        extra = json.loads(result)
        extra.pop("wall_time_s")
        outcomes[trial] = repr((values, extra))
    return outcomes


def test_a_grouped_sweep_stores_what_an_ungrouped_one_stores(tmp_path: Path) -> None:
    recording = Recording()
    _sweep(_text(tmp_path / "grouped", executor="{group_size: 4}"), recording)
    _sweep(_text(tmp_path / "alone", executor="{group_size: 1}"))
    grouped, alone = _results(tmp_path / "grouped"), _results(tmp_path / "alone")
    assert len(grouped) == 12 and grouped == alone
    assert sorted(len(job) for job in recording.jobs) == [2, 2, 4, 4]  # 6 trials per format: 4 + 2


def test_groups_come_from_the_sweep_file_not_the_workers_or_the_store(tmp_path: Path) -> None:
    one, two = Recording(), Recording()
    _sweep(_text(tmp_path / "one", executor="{group_size: 2, workers: 1}"), one)
    _sweep(_text(tmp_path / "two", executor="{group_size: 2, workers: 2}"), two)
    assert sorted(one.jobs) == sorted(two.jobs) and all(len(job) == 2 for job in one.jobs)
    # resumed over a partial store: the same groups, whole, and only the missing trials stored
    out = tmp_path / "partial"
    _sweep(_text(out, seeds="[0]", executor="{group_size: 2}"))
    before = _finished(out)
    resumed = Recording()
    summary = _sweep(_text(out, executor="{group_size: 2}"), resumed)
    assert set(resumed.jobs) <= set(one.jobs)
    assert sum(len(job) for job in resumed.jobs) > summary.ran == 12 - len(before)
    after = _finished(out)
    assert len(after) == 12 and all(after[trial] == at for trial, at in before.items())


def test_group_size_one_turns_grouping_off_and_unstackable_models_say_so(tmp_path: Path) -> None:
    off = Recording()
    _sweep(_text(tmp_path / "off", seeds="[0, 1]", executor="{group_size: 1}"), off)
    assert all(len(job) == 1 for job in off.jobs) and len(off.jobs) == 8
    (tmp_path / "net.py").write_text("from torch import nn\n\n\ndef dropout(shape, classes):\n"
                                     "    return nn.Sequential(nn.Linear(shape[0], 16), nn.Dropout(0.5), "
                                     "nn.Linear(16, classes))\n")
    dropout = Recording()
    text = _text(tmp_path / "dropout", seeds="[0, 1]", model=f"{tmp_path / 'net.py'}:dropout")
    summary = _sweep(text, dropout)
    assert all(len(job) == 1 for job in dropout.jobs) and len(summary.notes) == 2
    assert all("one by one" in note and "random numbers" in note for note in summary.notes)


def test_a_group_that_would_not_fit_the_device_is_split_and_the_split_is_stated(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dse.train.grouped as grouped
    from dse.train.memory import MEMORY_FRACTION

    measure = grouped.group_memory

    def cramped(config: Any, model: Any, example: Any) -> tuple[int, int]:  # room for two members
        trial, _ = measure(config, model, example)
        return trial, int(2.5 * trial / MEMORY_FRACTION)

    monkeypatch.setattr(grouped, "group_memory", cramped)
    monkeypatch.setattr("dse.sweep.groups.group_memory", cramped)
    recording = Recording()
    summary = _sweep(_text(tmp_path / "split", executor="{group_size: 4}"), recording)
    assert sorted(len(job) for job in recording.jobs) == [2, 2, 2, 2, 2, 2]
    assert len(summary.notes) == 2 and all("groups of 4 split into groups of 2 to fit cpu" in note
                                           for note in summary.notes)
    with sqlite3.connect(tmp_path / "split" / STORE_FILE) as connection:
        stored = connection.execute("SELECT value FROM meta WHERE key = 'group_notes'").fetchone()[0]
    assert json.loads(stored) == summary.notes
    assert _results(tmp_path / "split") == _results(_sweep_alone(tmp_path))


def _sweep_alone(tmp_path: Path) -> Path:
    _sweep(_text(tmp_path / "alone", executor="{group_size: 1}"))
    return tmp_path / "alone"


def test_group_size_on_the_command_line_and_its_bad_values(tmp_path: Path) -> None:
    config = tmp_path / "s.yaml"
    config.write_text(_text(tmp_path / "out", seeds="[0]", executor="{group_size: 0}"))
    result = runner.invoke(app, ["sweep", str(config)])
    assert result.exit_code == 2 and "group_size" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    result = runner.invoke(app, ["sweep", str(config), "--group-size", "0"])
    assert result.exit_code == 2
    config.write_text(_text(tmp_path / "out", seeds="[0]"))
    result = runner.invoke(app, ["sweep", str(config), "--dry-run", "--group-size", "2"])
    assert result.exit_code == 0 and "2 jobs: trials trained in groups of up to 2" in result.output
    result = runner.invoke(app, ["sweep", str(config), "--group-size", "1", "-q"])
    assert result.exit_code == 0 and len(load_trials(tmp_path / "out")) == 4


_KILLED = """\
from dse.sweep import load_config, run_sweep
run_sweep(load_config({config!r}), reports=False)
"""


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="POSIX process groups")
def test_a_killed_grouped_sweep_resumes_with_every_trial_exactly_once(tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = tmp_path / "s.yaml"
    config.write_text(_text(out, executor="{group_size: 3, workers: 1}").replace("epochs: 1", "epochs: 3"))
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen([sys.executable, "-c", _KILLED.format(config=str(config))],
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=env, cwd=root)
    deadline = time.monotonic() + 180
    try:
        while True:
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            assert time.monotonic() < deadline, "the sweep made no progress"
            try:
                if len(_finished(out)) >= 1:
                    break
            except sqlite3.OperationalError:  # no store or no table yet
                pass
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    before = _finished(out)
    assert 1 <= len(before) < 12
    summary = _sweep(config.read_text())
    after = _finished(out)
    assert summary.ran == 12 - len(before) and len(after) == 12
    assert all(after[trial] == at for trial, at in before.items())


def test_niti_and_accumulating_trials_group_and_store_what_alone_runs_store(tmp_path: Path) -> None:
    """NITI trials that differ in seed and niti_mu, and accumulating trials that differ in seed, train
    as groups, each trial's stored numbers those of its run alone (`dse train`)."""
    text = _text(tmp_path / "grouped", seeds="[0, 1]", executor="{group_size: 4}").replace(
        "  - {format: [fp32, int8], optimizer: sgd, tune: {lr: [0.05, 0.1]}}",
        "  - {format: int8, optimizer: niti, tune: {niti_mu: [4, 5]}}\n"
        "  - {format: fp8_e4m3, accumulation: fp16, accumulation_chunk: 4}")
    grouped = Recording()
    summary = _sweep(text, grouped)
    _sweep(text.replace("grouped", "alone").replace("{group_size: 4}", "{group_size: 1}"))
    assert sorted(len(job) for job in grouped.jobs) == [2, 4] and not summary.notes
    assert _results(tmp_path / "grouped") == _results(tmp_path / "alone")


USER_MODELS = Path(__file__).resolve().parents[1] / "support" / "user_models.py"


@pytest.mark.parametrize("factory", ["encoder", "functional"])
def test_a_sweep_groups_a_users_model_with_attention_or_functional_gemms(tmp_path: Path,
                                                                          factory: str) -> None:
    model = f"{USER_MODELS}:{factory}"
    recording = Recording()
    summary = _sweep(_text(tmp_path / "grouped", seeds="[0]", model=model), recording)
    assert summary.notes == [] and sorted(len(job) for job in recording.jobs) == [2, 2]
    _sweep(_text(tmp_path / "alone", seeds="[0]", executor="{group_size: 1}", model=model))
    assert _results(tmp_path / "grouped") == _results(tmp_path / "alone")
