"""A network whose forward depends on its batch's size trains one by one, saying why, and gives what it
gives alone; the check (dse/train/batch_dependence.py) finds a branch at every size a run uses, passes
every network that does not branch (the built-in proxies, attention, BatchNorm, users' networks), and
leaves the network and every global random generator as it found them."""

from __future__ import annotations

import dataclasses
import random
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.batch_size_models import Normed, SizeSwitch
from support.random_sweeps import USER_MODELS, USER_NETWORKS

from dse.data import load_dataset, with_validation
from dse.models.proxies import build_model
from dse.train import TrainConfig, train
from dse.train.batch_dependence import Forward, batch_size_reason, forwards_of
from dse.train.grouped import GROUP_MEMBERS, _train_group, group_reason, run_forwards, train_group
from dse.train.loop import EXAMPLE_SAMPLES

SIZE_MODELS = Path(__file__).resolve().parents[1] / "support" / "batch_size_models.py"
ROOT = Path(__file__).resolve().parents[2]
DEPENDS = "its forward depends on its batch's size"
SILU = TrainConfig(model=f"{SIZE_MODELS}:silu_switch", dataset="digits", format="fp32", optimizer="sgd",
                   lr=0.1, epochs=1, batch_size=7, threads=1)


def _without_time(result: Any) -> str:
    return repr(dataclasses.replace(result, wall_time_s=0.0))


def test_a_forward_that_switches_its_activation_on_the_batch_size_trains_one_by_one_as_alone(
        subset: Any) -> None:
    """F.silu at 10 rows or more, h * sigmoid(h) below (equal to rounding): at 7 rows a member a group
    of 2 folds 14 and took the other path, training otherwise than alone (the ablation: the stacked
    loop forced); the check finds it and train_group trains each alone."""
    data = with_validation(subset("digits", 400, 100))
    configs = [SILU.replace(seed=seed) for seed in (3, 4)]
    reason = group_reason(configs[0], data=data, members=[2])
    assert reason is not None and DEPENDS in reason and "silu" in reason, reason
    alone = [train(config, data) for config in configs]
    together = train_group(configs, data)
    assert [_without_time(r) for r in together] == [_without_time(r) for r in alone]
    stacked = _train_group(configs, data)  # what grouping it would give: other losses
    assert [r.final_loss for r in stacked] != [r.final_loss for r in alone]


def test_an_int_that_a_group_of_two_doubles_by_chance_is_found(subset: Any) -> None:
    """h * (1 if len(h) < 10 else 2) at 7 rows: a group of 2 passes 2 where alone passes 1, as a size
    would scale; groups of 2 (a sweep of two seeds) check no other count, so a group of 3 tells them
    apart. The ablation: the stacked loop forced trains otherwise than alone."""
    data = with_validation(subset("digits", 400, 100))
    configs = [SILU.replace(model=f"{SIZE_MODELS}:int_factor", seed=seed) for seed in (3, 4)]
    reason = group_reason(configs[0], data=data, members=[2])
    assert reason is not None and DEPENDS in reason and "Tensor.mul" in reason, reason
    alone = [train(config, data) for config in configs]
    assert [_without_time(r) for r in train_group(configs, data)] == [_without_time(r) for r in alone]
    assert [r.final_loss for r in _train_group(configs, data)] != [r.final_loss for r in alone]


def test_a_sweep_trains_a_batch_size_dependent_network_one_by_one_and_says_why(tmp_path: Path) -> None:
    from dse.sweep import parse_config, run_sweep
    from dse.sweep.executors import InlineExecutor
    from dse.sweep.store import STORE_FILE

    def sweep(name: str, group_size: int) -> Any:
        text = f"""\
name: sizes
seeds: [3, 4]
task: {{model: {SILU.model}, dataset: digits, epochs: 1, batch_size: 7}}
energy: {{workloads: [proxy]}}
trials:
  - {{format: fp32, optimizer: sgd, lr: 0.1}}
executor: {{group_size: {group_size}}}
output: {tmp_path / name}
"""
        return run_sweep(parse_config(text, "s.yaml"), executor=InlineExecutor(), reports=False)

    grouped = sweep("grouped", 2)
    assert len(grouped.notes) == 1 and "trained one by one" in grouped.notes[0], grouped.notes
    assert DEPENDS in grouped.notes[0]
    sweep("alone", 1)

    def results(name: str) -> list[Any]:
        with sqlite3.connect(tmp_path / name / STORE_FILE) as db:
            return db.execute("SELECT trial_id, status, val_accuracy, test_accuracy, final_loss, "
                              "json_remove(result, '$.wall_time_s') FROM trials ORDER BY trial_id").fetchall()

    assert results("grouped") == results("alone") and len(results("grouped")) == 2


@pytest.mark.parametrize(("factory", "batch_size", "where"), [
    ("per_row", 64, "torch.stack on B rows, torch.tanh on G x B"),  # a loop over rows: G times the calls
    ("last_batch_switch", 64, "a training batch of 13 rows"),  # only the epoch's last batch, 13 rows
    ("eval_switch", 64, "an evaluation batch of 144 rows"),  # only evaluation, digits' 144 validation rows
    ("size_scalar", 7, "Tensor.mul, takes other arguments"),  # h * (2.0 if len(h) > 8 else 3.0)
])
def test_every_kind_of_batch_size_dependence_is_found(factory: str, batch_size: int, where: str) -> None:
    config = SILU.replace(model=f"{SIZE_MODELS}:{factory}", batch_size=batch_size)
    reason = group_reason(config)
    assert reason is not None and DEPENDS in reason and where in reason, reason


@pytest.mark.parametrize("factory", ["divided_by_size", "row_positions"])
def test_a_value_that_scales_with_the_batch_is_found_by_the_stacked_forward(factory: str) -> None:
    """h / x.size(0) and h + torch.arange(len(x)): the calls of a group are those alone with the size
    scaled by G, as a reshape's, so the calls cannot tell; the values differ at any two sizes, and
    stack_reason's forward of two members on two samples each finds them."""
    config = SILU.replace(model=f"{SIZE_MODELS}:{factory}", batch_size=64)
    data = with_validation(load_dataset("digits"))
    assert batch_size_reason(build_model(config.model, data), data.x_train[:EXAMPLE_SAMPLES],
                             run_forwards(config, data), GROUP_MEMBERS) is None
    reason = group_reason(config)
    assert reason is not None and "not its own when stacked" in reason, reason


def test_the_last_batch_switch_is_found_only_where_a_last_batch_takes_another_path() -> None:
    """At a batch of 64 digits' last training batch is 13 rows (alone: h * sigmoid(h), in a group: 26
    rows, F.silu); at 431 (1293 = 3 x 431) there is no last partial batch and every size is past 20."""
    config = SILU.replace(model=f"{SIZE_MODELS}:last_batch_switch")
    assert group_reason(config.replace(batch_size=431)) is None
    assert group_reason(config.replace(batch_size=64)) is not None


EXAMPLE = ROOT / "examples" / "own_model"
PROXIES = [("mlp", "digits"), ("cnn", "digits"), ("cnn", "mnist1d"), ("resnet", "mnist1d"),
           ("transformer", "sort"), (f"{EXAMPLE}/model.py:small_resnet", f"{EXAMPLE}/data.py:digit_images")]


@pytest.mark.parametrize(("model", "dataset"), PROXIES)
@pytest.mark.parametrize("optimizer", ["sgd", "niti"])
def test_the_built_in_proxies_and_the_example_network_do_not_depend_on_the_batch_size(
        model: str, dataset: str, optimizer: str) -> None:
    """Every proxy (BatchNorm in the ResNets, LayerNorm and attention in the transformer) at a batch that
    leaves a last partial one, in groups of 2 to 8; NITI evaluates at the training batch."""
    config = TrainConfig(model=model, dataset=dataset, batch_size=50, optimizer=optimizer)
    data = with_validation(load_dataset(dataset))
    assert batch_size_reason(build_model(model, data), data.x_train[:EXAMPLE_SAMPLES],
                             run_forwards(config, data), GROUP_MEMBERS) is None


@pytest.mark.parametrize("name", USER_NETWORKS)
@pytest.mark.parametrize("batch_size", [7, 64])
def test_users_networks_that_do_not_branch_on_the_batch_size_pass(name: str, batch_size: int) -> None:
    """The audit's 30 users' networks (attention, TransformerEncoder, recurrent, checkpointed, dropout:
    its draws differ, its calls do not, ...)."""
    config = TrainConfig(model=f"{USER_MODELS}:{name}", dataset="digits", batch_size=batch_size)
    data = with_validation(load_dataset("digits"))
    assert batch_size_reason(build_model(config.model, data), data.x_train[:EXAMPLE_SAMPLES],
                             run_forwards(config, data), GROUP_MEMBERS) is None


@settings(max_examples=60, deadline=None)
@given(threshold=st.integers(1, 400), batch_size=st.integers(1, 300), train_rows=st.integers(1, 600),
       eval_rows=st.lists(st.integers(1, 500), min_size=1, max_size=2), eval_batch=st.integers(1, 400),
       members=st.sets(st.integers(2, 8), min_size=1, max_size=3))
def test_a_size_switch_is_found_exactly_where_a_member_and_its_group_take_other_paths(
        threshold: int, batch_size: int, train_rows: int, eval_rows: list[int], eval_batch: int,
        members: set[int]) -> None:
    batch_size = min(batch_size, train_rows)
    forwards = forwards_of(batch_size, eval_batch, train_rows, eval_rows)
    differs = any((f.rows >= threshold) != (f.rows * g >= threshold) for f in forwards for g in members)
    model = SizeSwitch(64, 10, threshold)
    reason = batch_size_reason(model, torch.randn(2, 64), forwards, members)
    assert (reason is not None) == differs, reason


class _Recording(torch.nn.Module):
    """A Linear that records each batch's size and mode."""

    def __init__(self, width: int, classes: int, seen: set[Forward]) -> None:
        super().__init__()
        self.a, self.seen = torch.nn.Linear(width, classes), seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.add(Forward(len(x), self.training))
        return self.a(x)


def test_run_forwards_names_every_size_train_runs_the_network_at(subset: Any) -> None:
    """A network that records each batch's size and mode, trained by `train`: the sizes are those
    `run_forwards` gives, besides the checks on EXAMPLE_SAMPLES rows that train nothing (build_model's
    output check, quantize_model's search for functional GEMMs)."""
    seen: set[Forward] = set()

    def recording(shape: tuple[int, ...], classes: int) -> torch.nn.Module:
        return _Recording(shape[0], classes, seen)

    data = with_validation(subset("digits", 300, 70))
    config = TrainConfig(model="mlp", dataset="digits", batch_size=32, epochs=1, threads=1)
    train(config, data, model=recording)
    checks = {Forward(EXAMPLE_SAMPLES, True), Forward(EXAMPLE_SAMPLES, False)}
    assert seen - checks == set(run_forwards(config, data))


@settings(max_examples=10, deadline=None)
@given(batch_size=st.integers(1, 40), members=st.sets(st.integers(2, 8), min_size=1, max_size=3),
       training=st.booleans(), threshold=st.integers(1, 100))
def test_the_check_leaves_the_network_and_every_generator_as_it_found_them(
        batch_size: int, members: set[int], training: bool, threshold: int) -> None:
    """BatchNorm's running statistics, a Python attribute the forward counts in, the training flag,
    torch's, Python's and numpy's global generators: all as they were, flagged or not."""
    torch.manual_seed(batch_size)
    model = torch.nn.Sequential(Normed(64, 10), SizeSwitch(10, 10, threshold)).train(training)
    with torch.no_grad():
        model[0](torch.randn(5, 64))  # running statistics away from their initial values
    state = {name: value.clone() for name, value in model.state_dict().items()}
    forwards_before = model[0].forwards
    example = torch.randn(3, 64)
    generators = torch.get_rng_state(), random.getstate(), np.random.get_state()
    batch_size_reason(model, example, forwards_of(batch_size, 50, 97, [30]), members)
    assert model.training == training and model[0].forwards == forwards_before
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), generators[0]) and random.getstate() == generators[1]
    numpy_after = np.random.get_state()
    assert numpy_after[0] == generators[2][0] and np.array_equal(numpy_after[1], generators[2][1])
    assert numpy_after[2:] == generators[2][2:]
