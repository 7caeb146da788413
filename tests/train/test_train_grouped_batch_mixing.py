"""A user's network that mixes its samples along the batch (sorts or reverses a hidden layer over it)
gives each sample an output that depends on the others'; in a group the others are the other members'
samples too. The member mode finds such a call on the axis that holds the members' samples
(dse.train.member_kernels.MIXING_FUNCTIONS, an index cutting that axis) and raises MemberAxisLost:
the checks refuse the network up front, or, where it starts mixing after the checks' forwards, its
trials train one by one, saying so. Grouped results are compared with runs alone."""

from __future__ import annotations

from pathlib import Path

from support.group_runs import assert_results_as_alone, short_digits, train_group_saying
from support.leaf_models import batch_sorted

from dse.train import TrainConfig
from dse.train.grouped import group_reason

LEAF_MODELS = str(Path(__file__).resolve().parent.parent / "support" / "leaf_models.py")


def _configs(model: str) -> list[TrainConfig]:
    base = TrainConfig(model=f"{LEAF_MODELS}:{model}", dataset="digits", epochs=1, batch_size=7,
                       optimizer="sgd", format="fp32", threads=1)
    return [base.replace(seed=11 + g) for g in range(2)]


def test_a_network_sorting_its_hidden_layer_over_the_batch_is_refused_up_front() -> None:
    """Before, the checks let it stack and both members' results differed from alone, silently (the
    sort's result kept its operand's placement)."""
    config = _configs("batch_sorted")[0]
    reason = group_reason(config, batch_sorted((64,), 10), short_digits(), range(2, 3))
    assert reason is not None and "sort" in reason and "mixes" in reason


def test_a_network_mixing_its_batch_only_after_the_checks_trains_one_by_one_as_alone() -> None:
    """leaf_models' late_batch_flipped reverses its hidden layer's samples from its fifth forward on:
    the checks' forwards never do, a group's training does. Before, both members' results differed
    from alone, silently; now the group's trials train one by one, saying why."""
    configs, data = _configs("late_batch_flipped"), short_digits()
    results, lines = train_group_saying(configs, data)
    assert len(lines) == 1 and "flip" in lines[0] and "mixes" in lines[0], lines
    assert_results_as_alone(configs, results, data)
