"""`tune:` in sweep files: every configuration is trained at every tuning point and seed, tuning runs are
ordinary stored trials (a run two configurations share trains once), and a bad `tune` or baseline is
one line with file:line, exit 2, nothing written. Old stores (schema 1) still read and resume."""

from __future__ import annotations

import json
import math
import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from dse.sweep import expand, load_trials, parse_config, run_sweep
from dse.sweep.config import TUNABLE_FIELDS
from dse.sweep.executors import InlineExecutor
from dse.sweep.store import STORE_FILE

runner = CliRunner()

TUNED = """\
seeds: [0, 1]
task: {model: mlp, dataset: digits, epochs: 1}
trials:
  - {format: [fp32, int8], tune: {lr: [0.01, 0.1], momentum: [0.8, 0.9]}}
"""


def test_each_configuration_is_trained_at_every_tuning_point_and_seed() -> None:
    trials = expand(parse_config(TUNED, "t.yaml"))
    assert len(trials) == 2 * (2 * 2) * 2 == len({t.trial_id for t in trials})
    for label in ("fp32 sgd", "int8 sgd"):  # the label names the configuration, not the point
        own = [t for t in trials if t.label == label]
        assert len({t.configuration for t in own}) == 1
        points = Counter(json.dumps(t.tuning, sort_keys=True) for t in own)
        assert points == {json.dumps({"lr": lr, "momentum": m}, sort_keys=True): 2
                          for lr in (0.01, 0.1) for m in (0.8, 0.9)}
        for trial in own:
            assert (trial.config.lr, trial.config.momentum) == (trial.tuning["lr"], trial.tuning["momentum"])
    assert len({t.configuration for t in trials}) == 2


def test_a_task_tunes_every_entry_unless_the_entry_sets_or_retunes() -> None:
    text = """\
task: {model: mlp, dataset: digits, tune: {lr: [0.01, 0.1], momentum: [0.5, 0.9]}}
trials:
  - {format: fp32}
  - {format: int8, momentum: 0.0}
  - {format: int4, tune: {batch_size: [32, 64]}}
  - {format: lns8, tune: {}}
"""
    trials = expand(parse_config(text, "t.yaml"))
    tuned = {t.config.format: set() for t in trials}
    for trial in trials:
        tuned[trial.config.format].add(tuple(sorted(trial.tuning.items())))
    assert len(tuned["fp32"]) == 4
    assert tuned["int8"] == {(("lr", 0.01),), (("lr", 0.1),)}  # momentum is set: only lr is tuned
    assert tuned["int4"] == {(("batch_size", 32),), (("batch_size", 64),)}  # its own tune replaces the task's
    assert tuned["lns8"] == {()}


def test_a_run_two_configurations_share_is_listed_under_each_and_trained_once(
        fake_train: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = f"""\
name: shared
task: {{model: mlp, dataset: digits, epochs: 1}}
trials:
  - {{format: fp32, lr: 0.1}}
  - {{format: fp32, tune: {{lr: [0.03, 0.1]}}}}
output: {tmp_path / 'out'}
"""
    trials = expand(parse_config(text, "s.yaml"))
    assert [(t.label, t.tuning) for t in trials] == [
        ("fp32 sgd lr=0.1", {}), ("fp32 sgd lr=tuned", {"lr": 0.03}), ("fp32 sgd lr=tuned", {"lr": 0.1})]
    assert trials[0].trial_id == trials[2].trial_id
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv("DSE_FAKE_LOG", str(log))
    summary = run_sweep(parse_config(text, "s.yaml"), train_fn=fake_train, executor=InlineExecutor(),
                        reports=False)
    assert summary.total == summary.ran == 2 == len(log.read_text().splitlines())
    frame = load_trials(tmp_path / "out")
    assert list(frame["label"]) == [t.label for t in trials]
    assert list(frame["tuned:lr"].fillna(-1)) == [-1, 0.03, 0.1]
    assert frame["test_accuracy"].iloc[0] == frame["test_accuracy"].iloc[2]
    assert len(set(frame["configuration"])) == 2
    # running again resumes: nothing retrains
    assert run_sweep(parse_config(text, "s.yaml"), train_fn=fake_train, executor=InlineExecutor(),
                     reports=False).ran == 0


def test_the_issues_example_tunes_lr_and_p_scale() -> None:
    text = """\
seeds: [0, 1]
task: {model: mlp, dataset: digits, epochs: 1}
trials:
  - {format: lns8, optimizer: lns-madam, master_weights: false,
     tune: {lr: [0.01, 0.03, 0.1], p_scale: [3, 10]}}
"""
    trials = expand(parse_config(text, "t.yaml"))
    assert len(trials) == 3 * 2 * 2 and len({t.configuration for t in trials}) == 1
    assert {(t.config.lr, t.config.p_scale) for t in trials} == {
        (lr, p) for lr in (0.01, 0.03, 0.1) for p in (3, 10)}


def test_the_tunable_fields_are_the_numeric_train_config_fields() -> None:
    assert {"lr", "momentum", "weight_decay", "epochs", "batch_size", "niti_mu"} <= set(TUNABLE_FIELDS)
    untunable = {"format", "optimizer", "master_weights", "layer_scaling", "seed", "threads"}
    assert not untunable & set(TUNABLE_FIELDS)


def test_the_default_baseline_is_fp32_and_a_given_one_may_be_a_label_spec_or_fields(tmp_path: Path) -> None:
    from dse.sweep.trials import baseline_labels

    base = ("task: {model: mlp, dataset: digits}\n"
            "trials:\n  - {format: [int8, fp32], optimizer: [adam, sgd]}\n")
    cases = {"": "fp32 adam", "report: {baseline: fp32}\n": "fp32 adam",
             "report: {baseline: {format: fp32, optimizer: sgd}}\n": "fp32 sgd",
             "report: {baseline: int8 sgd}\n": "int8 sgd"}
    for extra, label in cases.items():
        sweep = parse_config(base + extra, "b.yaml")
        assert baseline_labels(sweep, expand(sweep)) == {"mlp/digits": label}
    no_fp32 = parse_config("task: {model: mlp, dataset: digits}\ntrials: [{format: int8}]\n", "n.yaml")
    assert baseline_labels(no_fp32, expand(no_fp32)) == {}


# --- stores written before schema 2 ------------------------------------------------------------------

_SCHEMA_1 = """
CREATE TABLE plan (trial_id TEXT PRIMARY KEY, position INTEGER NOT NULL, task TEXT NOT NULL,
    label TEXT NOT NULL, energy_key TEXT NOT NULL);
CREATE TABLE trials_old (
    trial_id TEXT PRIMARY KEY, task TEXT NOT NULL, label TEXT NOT NULL, model TEXT NOT NULL,
    dataset TEXT NOT NULL, weights TEXT NOT NULL, activations TEXT NOT NULL, gradients TEXT NOT NULL,
    weight_grads TEXT NOT NULL, optimizer TEXT NOT NULL, master_weights INTEGER NOT NULL,
    warmup_epochs INTEGER NOT NULL, seed INTEGER NOT NULL, status TEXT NOT NULL, diverged INTEGER NOT NULL,
    error TEXT NOT NULL, test_accuracy REAL, final_loss REAL, wall_time_s REAL NOT NULL,
    config TEXT NOT NULL, result TEXT NOT NULL, finished_at REAL NOT NULL);
"""


def _downgrade(store: Path) -> None:
    """Rewrite a store in schema 1: the old plan, no val_accuracy, master_weights as 0/1."""
    connection = sqlite3.connect(store)
    with connection:
        plan = connection.execute("SELECT trial_id, position, task, label, energy_key FROM plan").fetchall()
        connection.execute("DROP TABLE plan")
        connection.executescript(_SCHEMA_1)
        connection.executemany("INSERT INTO plan VALUES (?, ?, ?, ?, ?)", plan)
        columns = [r[1] for r in connection.execute("PRAGMA table_info(trials_old)")]
        mapped = ", ".join("CASE master_weights WHEN 'true' THEN 1 ELSE 0 END" if c == "master_weights" else c
                           for c in columns)
        connection.execute(f"INSERT INTO trials_old SELECT {mapped} FROM trials")
        connection.execute("DROP TABLE trials")
        connection.execute("ALTER TABLE trials_old RENAME TO trials")
        connection.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
    connection.close()


def test_a_schema_1_store_reads_and_resumes(fake_train: Callable[..., Any], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    text = f"""\
name: old
seeds: [0, 1]
task: {{model: mlp, dataset: digits, epochs: 1}}
trials:
  - {{format: [fp32, int8]}}
  - {{format: int8, master_weights: false}}
output: {tmp_path / 'out'}
"""
    run_sweep(parse_config(text, "o.yaml"), train_fn=fake_train, executor=InlineExecutor(), reports=False)
    before = load_trials(tmp_path / "out")
    _downgrade(tmp_path / "out" / STORE_FILE)
    old = load_trials(tmp_path / "out")
    assert list(old["test_accuracy"]) == list(before["test_accuracy"])
    assert list(old["master_weights"]) == [True] * 4 + [False] * 2
    assert old["val_accuracy"].isna().all() and list(old["configuration"]) == list(old["label"])
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv("DSE_FAKE_LOG", str(log))
    again = run_sweep(parse_config(text.replace("[0, 1]", "[0, 1, 2]"), "o.yaml"), train_fn=fake_train,
                      executor=InlineExecutor(), reports=False)
    assert (again.skipped, again.ran) == (6, 3) and len(log.read_text().splitlines()) == 3
    after = load_trials(tmp_path / "out")
    assert len(after) == 9 and list(after["master_weights"]).count(False) == 3
    kept = after.set_index("trial_id").loc[list(before["trial_id"])]
    assert list(kept["test_accuracy"]) == list(before["test_accuracy"])


def test_master_weights_may_be_a_format_spec_in_the_store(make_trial_row: Callable[..., dict[str, Any]],
                                                          make_trials_frame: Callable[..., pd.DataFrame],
                                                          store_trials: Callable[[Path, pd.DataFrame], None],
                                                          tmp_path: Path) -> None:

    rows = [make_trial_row("mlp-digits", "lns8 lns-madam", seed, 0.9, {"proxy": 1.0}, format="lns8",
                           master_weights="lns(16,gamma=128)") for seed in (0, 1)]
    rows.append(make_trial_row("mlp-digits", "fp32 sgd", 0, 0.95, {"proxy": 2.0}, master_weights=False))
    store_trials(tmp_path, make_trials_frame(rows, ["proxy"]))
    frame = load_trials(tmp_path)
    assert list(frame["master_weights"]) == ["lns(16,gamma=128)", "lns(16,gamma=128)", False]
    assert math.isclose(frame["val_accuracy"].iloc[0], 0.9)


def test_the_progress_names_the_best_trial_by_validation_never_by_test(validated_train: Callable[..., Any],
                                                                       tmp_path: Path) -> None:
    """Tuning lr over three points where validation prefers 0.03 and test 0.1 (the validated_train fixture):
    the live display's best trial, and the summary's, are trials of the point validation prefers."""
    from io import StringIO

    from rich.console import Console

    from dse.sweep.progress import RichReporter

    text = f"""\
seeds: [0, 1]
task: {{model: mlp, dataset: digits, epochs: 1}}
trials:
  - {{format: int8, tune: {{lr: [0.01, 0.03, 0.1]}}}}
output: {tmp_path / 'out'}
"""
    console = Console(file=StringIO(), width=200)
    reporter = RichReporter(console, console)
    summary = run_sweep(parse_config(text, "t.yaml"), train_fn=validated_train, executor=InlineExecutor(),
                        reporter=reporter, reports=False)
    trials = load_trials(tmp_path / "out").set_index("trial_id")
    assert trials["test_accuracy"].idxmax() in set(trials.index[trials["tuned:lr"] == 0.1])
    assert reporter.best is not None and summary.best is not None
    assert trials.loc[reporter.best.trial_id, "tuned:lr"] == 0.03
    assert trials.loc[summary.best.trial_id, "tuned:lr"] == 0.03
    assert f"{reporter.best.val_accuracy:.4f}" in console.file.getvalue()
