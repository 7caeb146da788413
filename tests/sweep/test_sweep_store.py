"""The sweep store: round trip through load_trials, resume, --force, error and diverged rows, energy
columns, refusing another sweep's store, and no lost or duplicate row after a SIGKILL mid-sweep."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from dse.cli import app
from dse.errors import InputError
from dse.sweep import expand, load_trials, parse_config, run_sweep
from dse.sweep.executors import InlineExecutor
from dse.sweep.store import STORE_FILE
from dse.train.config import TrainConfig

DIGITS_MLP_WEIGHTS = 64 * 128 + 128 * 10
DIGITS_MLP_BIASES = 128 + 10
"""Weight-matrix parameters of the digits MLP 64-128-10 (biases belong to their layer's GEMM)."""


def _config(output: Path, seeds: str = "[0, 1]", name: str = "store-test", extra: str = "") -> str:
    return f"""\
name: {name}
seeds: {seeds}
task: {{model: mlp, dataset: digits, epochs: 1, full_precision_layers: []}}
energy: {{node: 7nm, workloads: [proxy, resnet18]}}
trials:
  - {{format: [fp32, int8, int4], optimizer: sgd}}
  - {{format: int8, lr: 20.0}}
{extra}output: {output}
"""


@pytest.fixture
def run_inline(fake_train: Callable[..., Any]) -> Callable[..., Any]:
    """run_inline(text, force=False): the sweep in `text` run in this process with fake_train."""

    def run(text: str, force: bool = False) -> Any:
        return run_sweep(parse_config(text, "s.yaml"), force=force, train_fn=fake_train,
                         executor=InlineExecutor(), reports=False)

    return run


def _log(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_store_round_trip(run_inline: Callable[..., Any], fake_accuracy: Callable[..., float],
                          tmp_path: Path) -> None:
    text = _config(tmp_path / "out")
    summary = run_inline(text)
    frame = load_trials(tmp_path / "out")
    trials = expand(parse_config(text, "s.yaml"))
    energy = [f"energy_mj:{w}{suffix}" for w in ("proxy", "resnet18")
              for suffix in ("", ":multiply", ":conversion", ":accumulation", ":update", ":memory")]
    assert list(frame.columns) == [
        "trial_id", "task", "label", "model", "dataset", "weights", "activations", "gradients",
        "weight_grads", "optimizer", "master_weights", "warmup_epochs", "seed", "status", "diverged", "error",
        "val_accuracy", "test_accuracy", "final_loss", "wall_time_s", "configuration", "tuning",
        *energy[:6], "memory_mib:proxy", "area_um2:proxy", "run_energy_mj:proxy", "run_mean_energy_mj:proxy",
        *energy[6:], "memory_mib:resnet18", "area_um2:resnet18", "run_energy_mj:resnet18",
        "run_mean_energy_mj:resnet18", "config"]
    assert list(frame["trial_id"]) == [t.trial_id for t in trials]  # one row per trial, in plan order
    assert frame.attrs["sweep"] == {"name": "store-test", "workloads": ["proxy", "resnet18"],
                                    "memory_objective": False, "baselines": {"mlp/digits": "fp32 sgd"},
                                    "output": str(tmp_path / "out")}
    by_id = {t.trial_id: t for t in trials}
    for _, row in frame.iterrows():
        trial = by_id[row["trial_id"]]
        assert TrainConfig.from_dict(json.loads(row["config"])) == trial.config
        assert (row["task"], row["label"], row["seed"]) == ("mlp/digits", trial.label, trial.config.seed)
        if trial.config.format == "int4":  # fake_train raises for int4
            assert row["status"] == "error" and not row["diverged"]
            assert row["error"] == "RuntimeError: int4 exploded"
            assert math.isnan(row["test_accuracy"]) and math.isnan(row["final_loss"])
        elif trial.config.lr == 20.0:  # and diverges for a large lr
            assert row["status"] == "diverged" and row["diverged"] and row["error"] == ""
            assert row["final_loss"] == math.inf
        else:
            assert row["status"] == "ok" and not row["diverged"] and row["error"] == ""
            assert row["test_accuracy"] == pytest.approx(fake_accuracy(trial.config))
        for workload in ("proxy", "resnet18"):
            parts = [row[f"energy_mj:{workload}:{u}"] for u in ("multiply", "conversion", "accumulation",
                                                                  "update", "memory")]
            assert row[f"energy_mj:{workload}"] == pytest.approx(sum(parts)) and min(parts) >= 0
    assert (summary.ok, summary.diverged, summary.errors) == (4, 2, 2)
    assert summary.best is not None and summary.best.status == "ok"
    assert summary.best.val_accuracy == frame["val_accuracy"].max()  # validation chooses, never test


def test_energy_follows_the_formats_not_the_seed(run_inline: Callable[..., Any], tmp_path: Path) -> None:
    run_inline(_config(tmp_path / "out"))
    frame = load_trials(tmp_path / "out").set_index(["label", "seed"])
    for column in ("energy_mj:proxy", "energy_mj:resnet18", "memory_mib:proxy"):
        for label in ("fp32 sgd", "int8 sgd", "int4 sgd"):
            assert frame.loc[(label, 0), column] == frame.loc[(label, 1), column]
    for workload in ("proxy", "resnet18"):
        fp32, int8, int4 = (frame.loc[(f"{fmt} sgd", 0), f"energy_mj:{workload}"]
                            for fmt in ("fp32", "int8", "int4"))
        assert fp32 > int8 > int4
    # weights + momentum (fp32) for fp32 training; int8 weights keep an fp32 master copy besides; the
    # biases stay fp32 (with their momentum) in both
    mib = 8 * 2**20
    params = DIGITS_MLP_WEIGHTS + DIGITS_MLP_BIASES
    assert frame.loc[("fp32 sgd", 0), "memory_mib:proxy"] == pytest.approx(params * 64 / mib)
    assert frame.loc[("int8 sgd", 0), "memory_mib:proxy"] == pytest.approx(
        (DIGITS_MLP_WEIGHTS * 72 + DIGITS_MLP_BIASES * 64) / mib)


def test_full_precision_layers_are_costed_in_fp32(run_inline: Callable[..., Any], tmp_path: Path) -> None:
    # the digits MLP has two weight layers: keeping the first and last in fp32 keeps them all
    text = f"""\
task: {{model: mlp, dataset: digits, epochs: 1}}
trials:
  - {{format: fp32, full_precision_layers: []}}
  - {{format: int8, master_weights: false, full_precision_layers: [[first, last], [first], []]}}
output: {tmp_path / 'out'}
"""
    run_inline(text)
    frame = load_trials(tmp_path / "out")
    energy = {(json.loads(c)["format"], tuple(json.loads(c)["full_precision_layers"])): e
              for c, e in zip(frame["config"], frame["energy_mj:proxy"], strict=True)}
    assert energy[("int8", ("first", "last"))] == pytest.approx(energy[("fp32", ())])
    assert energy[("fp32", ())] > energy[("int8", ("first",))] > energy[("int8", ())]


def test_resume_skips_finished_trials_and_force_reruns_them(run_inline: Callable[..., Any], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("DSE_FAKE_LOG", str(log))
    out = tmp_path / "out"
    first = run_inline(_config(out))
    assert len(_log(log)) == 8 and (first.ran, first.skipped) == (8, 0)
    before = load_trials(out)
    again = run_inline(_config(out))
    assert len(_log(log)) == 8 and (again.ran, again.skipped) == (0, 8)  # nothing trained twice
    assert load_trials(out).equals(before)
    grown = run_inline(_config(out, seeds="[0, 1, 2]"))  # a new seed: only its 4 trials run
    calls = _log(log)[8:]
    assert (grown.ran, grown.skipped) == (4, 8) and sorted(c["seed"] for c in calls) == [2, 2, 2, 2]
    assert len(load_trials(out)) == 12
    forced = run_inline(_config(out, seeds="[0, 1, 2]"), force=True)
    assert (forced.ran, forced.skipped) == (12, 0) and len(_log(log)) == 8 + 4 + 12
    assert len(load_trials(out)) == 12
    with sqlite3.connect(out / STORE_FILE) as connection:
        counts = connection.execute("SELECT COUNT(*), COUNT(DISTINCT trial_id) FROM trials").fetchone()
    assert counts == (12, 12)


def test_trials_dropped_from_the_file_leave_the_report_but_not_the_store(run_inline: Callable[..., Any],
                                                                         tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_inline(_config(out))
    run_inline(_config(out, seeds="[1]"))
    frame = load_trials(out)
    assert len(frame) == 4 and set(frame["seed"]) == {1}
    run_inline(_config(out))  # seed 0 is back: its rows were kept, nothing retrains
    assert len(load_trials(out)) == 8


def test_a_store_of_another_sweep_is_refused_then_replaced_with_force(run_inline: Callable[..., Any],
                                                                      fake_train: Callable[..., Any],
                                                                      tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_inline(_config(out, name="first"))
    store = out / STORE_FILE
    stamp = store.stat().st_mtime_ns, store.read_bytes()
    config = tmp_path / "second.yaml"
    config.write_text(_config(out, name="second"))
    result = CliRunner().invoke(app, ["sweep", str(config)])
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert "'first'" in message and "'second'" in message and "--force" in message and "output" in message
    assert (store.stat().st_mtime_ns, store.read_bytes()) == stamp  # untouched
    summary = run_sweep(parse_config(config.read_text(), "second.yaml"), force=True, train_fn=fake_train,
                        executor=InlineExecutor(), reports=False)
    assert summary.ran == 8
    frame = load_trials(out)
    assert frame.attrs["sweep"]["name"] == "second" and len(frame) == 8


def test_an_unwritable_output_path_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = tmp_path / "s.yaml"
    config.write_text(_config(blocker / "out"))
    result = CliRunner().invoke(app, ["sweep", str(config)])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: cannot create output directory")
    assert len(result.stderr.strip().splitlines()) == 1
    config.write_text(_config(blocker))
    result = CliRunner().invoke(app, ["sweep", str(config)])
    assert result.exit_code == 2 and "is not a directory" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "s.yaml"]


def test_load_trials_needs_a_store(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no sweep store"):
        load_trials(tmp_path)
    with pytest.raises(InputError, match="no sweep store"):
        load_trials(tmp_path / "missing")


def test_a_foreign_file_in_place_of_the_store_is_not_overwritten(run_inline: Callable[..., Any],
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / STORE_FILE).write_text("my notes")
    with pytest.raises(InputError, match="not a"):
        run_inline(_config(out))
    assert (out / STORE_FILE).read_text() == "my notes"


_KILLED_RUN = """\
import sys
sys.path.insert(0, {tests!r})
from {module} import {name}
from dse.sweep import load_config, run_sweep
run_sweep(load_config({config!r}), train_fn={name}, reports=False)
"""


def _rows(store: Path) -> list[tuple[object, ...]]:
    if not store.exists():
        return []
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5) as connection:
            return connection.execute("SELECT trial_id, status, config, finished_at FROM trials").fetchall()
    except sqlite3.OperationalError:  # the schema is not there yet
        return []


def test_sigkill_mid_sweep_loses_nothing_and_resume_finishes(run_inline: Callable[..., Any],
                                                             slow_train: Callable[..., Any], tests_dir: Path,
                                                             tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    config = tmp_path / "s.yaml"
    config.write_text(_config(out, seeds="[0, 1, 2]", extra="executor: {workers: 2}\n"))  # 12 trials
    script = _KILLED_RUN.format(tests=str(tests_dir), module=slow_train.__module__, name=slow_train.__name__,
                                config=str(config))
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    store = out / STORE_FILE
    deadline = time.monotonic() + 120
    try:
        while len(_rows(store)) < 3:
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            assert time.monotonic() < deadline, "the sweep made no progress"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the sweep and its workers: their own session
        process.wait()
    with sqlite3.connect(store) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        counts = connection.execute("SELECT COUNT(*), COUNT(DISTINCT trial_id) FROM trials").fetchone()
    survivors = _rows(store)
    assert counts == (len(survivors), len(survivors)) and 3 <= len(survivors) < 12
    for _, status, config_json, _ in survivors:  # every stored row is whole
        assert status in ("ok", "error", "diverged") and TrainConfig.from_dict(json.loads(config_json))

    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("DSE_FAKE_LOG", str(log))
    summary = run_inline(config.read_text())
    assert (summary.skipped, summary.ran) == (len(survivors), 12 - len(survivors))
    assert len(_log(log)) == 12 - len(survivors)
    after = {row[0]: row for row in _rows(store)}
    assert len(after) == 12 and len(load_trials(out)) == 12
    for row in survivors:  # finished trials were kept as they were, not rerun
        assert after[row[0]] == row


def test_trials_start_longest_first_and_results_do_not_depend_on_it(fake_train: Callable[..., Any],
                                                                    tmp_path: Path) -> None:
    """posit and MX trials (slow steps) and the longer task go out before fp32 ones."""
    from dse.train.config import TrainConfig

    class Recording(InlineExecutor):
        def __init__(self) -> None:
            self.order: list[dict] = []

        def run(self, jobs, on_done):  # type: ignore[no-untyped-def]
            self.order = [job.config for job in jobs]
            super().run(jobs, on_done)

    text = f"""
name: order
seeds: [0, 1]
task: {{model: mlp, dataset: digits, epochs: 2}}
trials:
  - {{format: [fp32, int8, posit8, mxfp8_e4m3]}}
  - {{format: fp32, epochs: 9}}
output: {tmp_path / "out"}
"""
    executor = Recording()
    run_sweep(parse_config(text, "s.yaml"), train_fn=fake_train, executor=executor, reports=False)
    from dse.sweep.trials import estimated_cost

    costs = [estimated_cost(TrainConfig.from_dict(config)) for config in executor.order]
    assert costs == sorted(costs, reverse=True)
    assert executor.order[0]["epochs"] == 9 and executor.order[-1]["format"] in (None, "fp32")
    assert estimated_cost(TrainConfig(format="posit8")) > estimated_cost(TrainConfig(format="int8")) > \
        estimated_cost(TrainConfig())


@pytest.mark.parametrize("workers", [1, 2, 16])
def test_the_reports_get_ready_once_when_a_worker_has_nothing_left(
        workers: int, fake_train: Callable[..., Any], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep starts importing what its reports need (FigureProcesses.prepare) as soon as fewer jobs
    are left than it has workers: after the 7th of 8 one-trial jobs with 2 workers, before the first
    with more workers than jobs; with 1 worker, once none is left. Not at all without reports."""
    from dse.report.drawing import FigureProcesses

    trained: list[str] = []
    prepared_after: list[int] = []

    def train_counting(config: TrainConfig) -> Any:
        trained.append(config.format)
        return fake_train(config)

    monkeypatch.setattr(FigureProcesses, "prepare", lambda self: prepared_after.append(len(trained)))
    text = _config(tmp_path / "out", extra=f"executor: {{backend: local, workers: {workers}}}\n")
    run_sweep(parse_config(text, "s.yaml"), train_fn=train_counting, executor=InlineExecutor(), reports=True)
    assert len(trained) == 8
    assert prepared_after[0] == {1: 8, 2: 7, 16: 0}[workers]  # (drawing the figures asks again: a no-op)
    prepared_after.clear()
    run_sweep(parse_config(text, "s.yaml"), force=True, train_fn=train_counting, executor=InlineExecutor(),
              reports=False)
    assert prepared_after == []
