"""The end-to-end audit of grouped sweeps, sampled (benchmarks/sweep_audit.py runs it at length): random
valid sweep files (tests/support/random_sweeps.py) on slices of the built-in datasets store, grouped,
exactly what they store with `--group-size 1`, and a stored trial is what `dse train` gives for it; plus
what the audit found, kept as regressions."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
from support.random_sweeps import (
    MODELS,
    TINY,
    draw_sweep,
    json_safe,
    snapshot_differences,
    store_snapshot,
    stored_results,
    train_arguments,
)
from typer.testing import CliRunner

from dse.cli import app
from dse.sweep import parse_config, run_sweep

runner = CliRunner()

FAST_NETWORKS = ("tiny", "functional", "conv", "gated", "bottleneck", "small_tokens", "one_token",
                 "residual_gate")
FAST_MODELS = [(model, data) for model, data in MODELS
               if model in ("mlp", "cnn") or model.split(":")[-1] in FAST_NETWORKS]


def _sweep(text: str, output: Path, group_size: int | None = None) -> None:
    """The sweep into `output` (its executor's group size, or `group_size`), without its reports."""
    text = re.sub(r"(?m)^output: .*$", "", text) + f"output: {json.dumps(str(output))}\n"
    if group_size is not None:
        text = re.sub(r'"?group_size"?: \d+', f"group_size: {group_size}", text)
    run_sweep(parse_config(text, str(output) + ".yaml"), reports=False)


def _alone(config: dict[str, Any]) -> dict[str, Any]:
    result = runner.invoke(app, ["train", "--json", *train_arguments(config)])
    assert result.exit_code == 0, result.output
    trained = json.loads(result.stdout)
    assert trained.pop("config") == json_safe(config)
    trained.pop("wall_time_s")
    return trained


def _assert_grouped_equals_alone(text: str, tmp_path: Path, trained_alone: int = 1) -> dict[str, Any]:
    _sweep(text, tmp_path / "grouped")
    _sweep(text, tmp_path / "alone", group_size=1)
    grouped = store_snapshot(tmp_path / "grouped")
    assert snapshot_differences(grouped, store_snapshot(tmp_path / "alone")) == []
    stored = stored_results(tmp_path / "grouped")
    for trial in sorted(stored)[:trained_alone]:
        config, result, _ = stored[trial]
        result.pop("wall_time_s")
        assert _alone(config) == json_safe(result), trial
    return stored


@pytest.mark.parametrize("seed", [5])
def test_a_drawn_grouped_sweep_stores_what_each_trial_gives_alone(seed: int, tmp_path: Path) -> None:
    drawn = draw_sweep(random.Random(seed), tmp_path / "unused", models=FAST_MODELS)
    text = drawn.text.replace('"epochs": 2', '"epochs": 1')
    stored = _assert_grouped_equals_alone(text, tmp_path)
    assert len(stored) >= 2 and len({c["seed"] for c, _, _ in stored.values()}) >= 2, drawn.description


def _text(trial: str, seeds: str = "[0, 1]", model: str = "mlp", data: str = "digits") -> str:
    return (f"name: audit\nseeds: {seeds}\ntask: {{model: {model}, dataset: '{TINY}:{data}', epochs: 1, "
            f"batch_size: 50}}\nenergy: {{workloads: [proxy]}}\ntrials:\n  - {trial}\n"
            "executor: {group_size: 4, workers: 1}\n")


def test_an_nvfp4_group_stores_what_its_trials_store_alone(tmp_path: Path) -> None:
    """NVFP4's per-tensor fp32 scale was the whole group's max, not each member's: every trial of an
    NVFP4 group differed from its run alone (found by the audit: 12 of 12 trials of a drawn sweep)."""
    _assert_grouped_equals_alone(_text("{format: nvfp4, optimizer: adamw, rounding: 'stochastic(4)', "
                                       "tune: {lr: [0.001, 0.003]}}"), tmp_path, trained_alone=2)


def test_a_diverging_member_is_stored_diverged_and_the_others_as_alone(tmp_path: Path) -> None:
    stored = _assert_grouped_equals_alone(_text("{format: fp16, optimizer: sgd, momentum: 0.9, "
                                                "tune: {lr: [0.05, 100.0]}}"), tmp_path, trained_alone=4)
    outcomes = [(config["lr"], result["diverged"], status) for config, result, status in stored.values()]
    steady = sorted((diverged, status) for lr, diverged, status in outcomes if lr == 0.05)
    assert steady == [(False, "ok")] * 2
    assert (100.0, True, "diverged") in outcomes


def test_the_drawer_draws_only_sweeps_that_plan_sweep_accepts(tmp_path: Path) -> None:
    """Every drawn sweep (with file datasets in a data_dir, as benchmarks/sweep_audit.py draws) passes
    every check before training; among them layer rules on a built-in dataset's slice, whose layers the
    drawer reads (it passed the data_dir to digits, which load_dataset refuses)."""
    from support.random_sweeps import write_file_datasets

    from dse.sweep.runner import plan_sweep

    data_dir = write_file_datasets(tmp_path / "files")
    rng = random.Random(3)
    drawn = [draw_sweep(rng, tmp_path / f"out{i}", data_dir=data_dir, threads=(1, 2)) for i in range(16)]
    assert any('"layers"' in d.text and "tiny_datasets" in d.text for d in drawn)
    for i, d in enumerate(drawn):
        plan_sweep(parse_config(d.text, str(tmp_path / f"sweep{i}.yaml")))
