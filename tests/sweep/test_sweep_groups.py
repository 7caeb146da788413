"""Grouped sweeps: the groups come from the sweep file alone (not the worker count, not the store), a
grouped sweep stores what an ungrouped one stores, a partly stored group reruns whole and stores only
what is missing, and a killed grouped sweep resumes with every trial exactly once."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support.processes import Session
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


def test_groups_that_share_a_device_are_split_to_their_share_and_store_the_same_numbers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Room for one group of 4 on the device: one worker trains groups of 4; two workers, each
    training a group at once, get half the memory each, so their groups are split into groups of 2,
    and the sweep says so. The split never changes a number: both store what trials alone store."""
    import dse.sweep.groups as groups
    import dse.train.grouped as grouped
    from dse.train.memory import MEMORY_FRACTION

    mib = 2**20

    def one_mib(config: Any, model: Any, example: Any) -> int:  # each trial's training memory
        return mib

    for module in (groups, grouped):  # the plan and the worker size groups by the same estimate
        monkeypatch.setattr(module, "trial_training_bytes", one_mib)
    monkeypatch.setattr(groups, "available_memory_bytes", lambda device: int(4.5 * mib / MEMORY_FRACTION))
    one, two = Recording(), Recording()
    alone = _sweep(_text(tmp_path / "one", executor="{group_size: 4, workers: 1}"), one)
    assert sorted(len(job) for job in one.jobs) == [2, 2, 4, 4] and not alone.notes  # 6 per format: 4 + 2
    shared = _sweep(_text(tmp_path / "two", executor="{group_size: 4, workers: 2}"), two)
    assert sorted(len(job) for job in two.jobs) == [2] * 6
    assert len(shared.notes) == 2 and all(  # one per configuration, none from a worker splitting again
        note.endswith("groups of 4 split into groups of 2 to fit cpu: one trial needs about 1.0 MiB, "
                      "5.6 MiB available, shared by 2 groups training at once") for note in shared.notes)
    with sqlite3.connect(tmp_path / "two" / STORE_FILE) as connection:
        stored = connection.execute("SELECT value FROM meta WHERE key = 'group_notes'").fetchone()[0]
    assert json.loads(stored) == shared.notes
    assert _results(tmp_path / "one") == _results(tmp_path / "two") == _results(_sweep_alone(tmp_path))


def test_a_group_job_trains_within_the_share_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker splits a group by the share the sweep planned for it, not by the whole device's free
    memory (which its sibling workers share), and its outcomes say so."""
    import dse.train.grouped as grouped
    from dse.sweep.executors import TrialJob, execute
    from dse.train.config import TrainConfig
    from dse.train.memory import MEMORY_FRACTION

    monkeypatch.setattr(grouped, "trial_training_bytes", lambda config, model, example: 2**20)
    monkeypatch.setattr(grouped, "available_memory_bytes", lambda device: 2**40)  # the whole host: 1 TiB
    sizes: list[int] = []
    train_part = grouped._train_group
    monkeypatch.setattr(grouped, "_train_group", lambda configs, data: sizes.append(len(configs))
                        or train_part(configs, data))
    configs = [TrainConfig(model="mlp", dataset="digits", epochs=1, seed=seed).to_dict() for seed in range(4)]
    members = tuple(TrialJob(f"t{seed}", config) for seed, config in enumerate(configs))
    room = int(4.5 * 2**20 / MEMORY_FRACTION)  # room for 4 members, 2 in each of 2 groups at once
    outcomes = execute(GroupJob(members, available_bytes=room, groups_at_once=2))
    assert sizes == [2, 2] and all(outcome.result is not None for outcome in outcomes)
    assert {outcome.note for outcome in outcomes} == {
        "groups of 4 split into groups of 2 to fit cpu: one trial needs about 1.0 MiB, 5.6 MiB available, "
        "shared by 2 groups training at once"}
    sizes.clear()
    execute(GroupJob(members))  # no share given: the whole device, free now
    assert sizes == [4]


def _sweep_alone(tmp_path: Path) -> Path:
    _sweep(_text(tmp_path / "alone", executor="{group_size: 1}"))
    return tmp_path / "alone"


def test_the_dry_runs_group_line_states_the_groups_as_split(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the device's memory splits the groups, `--dry-run`'s line states the largest group as
    planned (2), not the group_size asked for (4) as if it held, above the line saying why."""
    import dse.sweep.groups as groups
    from dse.train.memory import MEMORY_FRACTION

    mib = 2**20
    monkeypatch.setattr(groups, "trial_training_bytes", lambda config, model, example: mib)
    monkeypatch.setattr(groups, "available_memory_bytes", lambda device: int(2.5 * mib / MEMORY_FRACTION))
    config = tmp_path / "s.yaml"
    config.write_text(_text(tmp_path / "out", executor="{group_size: 4, workers: 1}"))
    result = runner.invoke(app, ["sweep", str(config), "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    jobs = next(index for index, line in enumerate(lines) if "jobs: " in line)
    assert lines[jobs].endswith("trials trained in groups of up to 2 (group_size 4)"), lines[jobs]
    assert "groups of 4 split into groups of 2 to fit cpu" in lines[jobs + 1]
    assert not (tmp_path / "out").exists()


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
import threading

from dse.sweep import load_config, run_sweep
from dse.sweep.store import SweepStore

record = SweepStore.record
recorded = []


def record_then_hold(store, row):
    record(store, row)
    recorded.append(row)
    if len(recorded) == {held_after}:
        threading.Event().wait()  # until the test kills the sweep


SweepStore.record = record_then_hold
run_sweep(load_config({config!r}), reports=False)
"""
_HELD_AFTER = 2
"""Trials the killed sweep stores before it holds: 2 of its first group of 3, so that group is partly
stored. Holding, not racing: a test process that looks late (under load it was seen to miss a whole
sweep, which then ended before it could be killed: `started` was {}) still kills a running sweep."""


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="POSIX process groups")
def test_a_killed_grouped_sweep_resumes_with_every_trial_exactly_once(
        tmp_path: Path, session_of: type[Session]) -> None:
    """SIGKILL (or the out-of-memory killer) gives the sweep no chance to stop its workers: they end
    themselves when it ends, instead of waiting on their task queue for ever (and a rerun could
    never meet one of them)."""
    out = tmp_path / "out"
    config = tmp_path / "s.yaml"
    config.write_text(_text(out, executor="{group_size: 3, workers: 1}").replace("epochs: 1", "epochs: 3"))
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    script = _KILLED.format(config=str(config), held_after=_HELD_AFTER)
    process = subprocess.Popen([sys.executable, "-c", script],
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=env, cwd=root)
    deadline = time.monotonic() + 180
    with session_of(process) as session:
        while True:
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            assert time.monotonic() < deadline, "the sweep made no progress"
            try:
                if len(_finished(out)) >= _HELD_AFTER:
                    break
            except sqlite3.OperationalError:  # no store or no table yet
                pass
            time.sleep(0.02)
        # the sweep, its fork server and its worker at least; the sweep alone killed
        _, left = session.stop(process.kill, at_least=3)
    assert not left, f"processes outlived the killed sweep: {left}"
    before = _finished(out)
    assert len(before) == _HELD_AFTER
    resumed = Recording()
    summary = _sweep(config.read_text(), resumed)
    after = _finished(out)
    assert [len(job) for job in resumed.jobs] == [3, 3, 3, 3]  # the partly stored group reruns whole
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


def test_the_groups_sharing_a_device_follow_the_executor() -> None:
    """The local pool's workers share the host's memory and the one GPU they name; a local Ray
    instance runs its CPUs over `threads` CPU tasks at once and one task per GPU; a Ray cluster's
    nodes are not visible to the sweep (each task decides on its node)."""
    from dse.sweep.config import ExecutorConfig
    from dse.sweep.groups import groups_at_once

    local = ExecutorConfig(backend="local", workers=3, threads=2, address=None)
    ray = ExecutorConfig(backend="ray", workers=4, threads=2, address=None)
    cluster = ExecutorConfig(backend="ray", workers=4, threads=1, address="auto")
    assert [groups_at_once(local, "cpu"), groups_at_once(local, "cuda")] == [3, 3]
    assert [groups_at_once(ray, "cpu"), groups_at_once(ray, "cuda:0")] == [2, 1]
    assert [groups_at_once(cluster, "cpu"), groups_at_once(cluster, "cuda")] == [None, None]


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


def test_the_cli_sweeps_a_users_checkpointed_network_grouped_as_one_by_one(tmp_path: Path) -> None:
    """`dse sweep` of a user's network that checkpoints a block of a functional GEMM, SiLU and a
    sigmoid (recomputed in the backward) stores what `--group-size 1` stores, with no line; a
    network whose autograd.Function's backward calls sigmoid trains one by one, and a line says why."""
    config = tmp_path / "s.yaml"
    for name, extra in (("grouped", []), ("alone", ["--group-size", "1"])):
        config.write_text(_text(tmp_path / name, seeds="[0]", executor="{group_size: 2, workers: 1}",
                                model=f"{USER_MODELS}:checkpointed"))
        result = runner.invoke(app, ["sweep", str(config), "-q", *extra])
        assert result.exit_code == 0, result.output
        assert "one by one" not in result.output
    assert len(_results(tmp_path / "grouped")) == 4
    assert _results(tmp_path / "grouped") == _results(tmp_path / "alone")
    config.write_text(_text(tmp_path / "swish", seeds="[0]", model=f"{USER_MODELS}:swish_function"))
    result = runner.invoke(app, ["sweep", str(config), "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "trained one by one" in line]
    assert len(lines) == 2, result.output
    assert all("SwishFunction calls torch.sigmoid" in line for line in lines), result.output


def _planned(text: str) -> tuple[list[list[Any]], list[str]]:
    from dse.sweep.groups import plan_groups
    from dse.sweep.runner import plan_sweep, unique_runs

    sweep = parse_config(text, "s.yaml")
    runs = unique_runs(plan_sweep(sweep)[0])
    return plan_groups(runs, sweep.executor.group_size, shares={})


_TWO_MODELS = """\
name: defaults
seeds: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
tasks:
  - {{name: digits, model: mlp, dataset: digits, epochs: 1}}
  - {{name: sort, model: transformer, dataset: sort-easy, epochs: 1, device: {device}}}
energy: {{workloads: [proxy]}}
trials:
  - {{format: [fp32, int8]}}
{executor}output: {output}
"""


def test_the_default_group_size_is_the_measured_one_per_model_and_device(tmp_path: Path) -> None:
    """Without a group_size in the file the MLP groups by 8 and the transformer, measured not to gain
    from a group on the CPU (docs/training.md), trains one by one there, one line per configuration
    saying why; on CUDA it groups by 8. The file alone decides: the same file plans the same groups."""
    from dse.sweep.groups import GROUP_SIZE

    groups, notes = _planned(_TWO_MODELS.format(device="cpu", executor="", output=tmp_path / "out"))
    sizes = {(group[0].task, len(group)) for group in groups}
    assert sizes == {("digits", GROUP_SIZE), ("digits", 10 - GROUP_SIZE), ("sort", 1)}
    assert sum(len(group) for group in groups) == 40 and len(notes) == 2
    assert all(note.startswith("sort: ") and "one by one" in note and "group_size" in note for note in notes)
    assert _planned(_TWO_MODELS.format(device="cpu", executor="", output=tmp_path / "out")) == (groups, notes)


@pytest.mark.parametrize("executor", ["executor: {group_size: 4}\n", "executor: {group_size: 1}\n"])
def test_an_explicit_group_size_groups_every_model_by_it(tmp_path: Path, executor: str) -> None:
    """A user who asks for groups gets them, the transformer on the CPU included, and no line."""
    groups, notes = _planned(_TWO_MODELS.format(device="cpu", executor=executor, output=tmp_path / "out"))
    expected = [2, 2, 4, 4, 4, 4] if "4" in executor else [1] * 20  # two configurations of 10 seeds a task
    for task in ("digits", "sort"):
        assert sorted(len(g) for g in groups if g[0].task == task) == expected
    assert notes == []


def test_the_transformer_groups_by_default_on_cuda() -> None:
    from dse.sweep.groups import GROUP_SIZE, default_group_size
    from dse.train import TrainConfig

    on = {device: default_group_size(TrainConfig(model="transformer", dataset="sort-easy", device=device))
          for device in ("cpu", "cuda", "cuda:1")}
    assert on["cuda"] == on["cuda:1"] == (GROUP_SIZE, None)
    assert on["cpu"][0] == 1 and on["cpu"][1] is not None
    mlp = TrainConfig(model="mlp", dataset="digits")
    assert default_group_size(mlp) == default_group_size(mlp.replace(device="cuda")) == (GROUP_SIZE, None)


def test_the_command_lines_group_size_groups_a_model_whose_default_is_one(tmp_path: Path) -> None:
    """`--group-size N` is the user's choice, over each model's default: the transformer, which trains
    one by one on the CPU by default (a line per configuration says so), groups by N, without those
    lines; the dry run's count of jobs and its line say which."""
    config = tmp_path / "s.yaml"
    config.write_text(_text(tmp_path / "out", seeds="[0, 1, 2]", executor="{workers: 1}",
                            model="transformer").replace("dataset: digits", "dataset: sort-easy"))
    default = runner.invoke(app, ["sweep", str(config), "--dry-run"])
    assert default.exit_code == 0, default.output
    assert "12 jobs: trials trained in groups of up to 1" in default.output
    mlp = tmp_path / "mlp.yaml"  # 3 seeds a group: the line names the default (8), not the 3 as if it were
    mlp.write_text(_text(tmp_path / "out", seeds="[0, 1, 2]", executor="{workers: 1}"))
    line = next(line for line in runner.invoke(app, ["sweep", str(mlp), "--dry-run"]).output.splitlines()
                if "jobs: " in line)
    assert line.startswith("2 jobs: trials trained in groups of up to 6 (") and "default, 8," in line
    assert default.output.count("trained one by one") == 2  # one line per configuration, not per trial
    grouped = runner.invoke(app, ["sweep", str(config), "--dry-run", "--group-size", "4"])
    assert grouped.exit_code == 0, grouped.output
    assert "4 jobs: trials trained in groups of up to 4" in grouped.output  # 6 trials a configuration: 4 + 2
    assert "one by one" not in grouped.output
    assert not (tmp_path / "out").exists()
