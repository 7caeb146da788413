"""The checks the grouped-training tests share: a group's `train_group` gives every member the result
`train` gives it alone, bit for bit (every field but the wall time), and the lines a group says when it
splits."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

from dse.data import load_dataset
from dse.data.dataset import Dataset
from dse.train import TrainConfig, TrainResult, train
from dse.train.grouped import GroupSplitWarning, group_reason, train_group


def assert_group_trains_as_alone(configs: Sequence[TrainConfig], data: Dataset) -> None:
    """Each config's result in one group equals its run alone (compared as the results' reprs, so a
    NaN equals a NaN and a float's last bit counts)."""
    assert_results_as_alone(configs, train_group(list(configs), data), data)


def assert_results_as_alone(configs: Sequence[TrainConfig], results: Sequence[TrainResult], data: Dataset
                            ) -> None:
    """Each config's result (`results`, of a group) equals its run alone, as above."""
    together = [result.to_dict() for result in results]
    for config, grouped in zip(configs, together, strict=True):
        alone = train(config, data).to_dict()
        grouped.pop("wall_time_s"), alone.pop("wall_time_s")
        assert repr(grouped) == repr(alone), config.seed


def assert_grouped_as_alone(configs: Sequence[TrainConfig], data: Dataset) -> None:
    """The configs' group is not refused (`group_reason`), trains with no GroupSplitWarning, and gives
    each config its result alone (`assert_results_as_alone`)."""
    assert group_reason(configs[0], data=data) is None
    results, said = train_group_saying(configs, data)
    assert said == []
    assert_results_as_alone(configs, results, data)


def short_digits() -> Dataset:
    """digits cut to 114 training samples (two batches of 50 and one of 14) and 50 validation and
    test samples: a short grouped-against-alone run."""
    data = load_dataset("digits")
    return dataclasses.replace(data, x_train=data.x_train[:114], y_train=data.y_train[:114],
                               x_val=data.x_val[:50], y_val=data.y_val[:50], x_test=data.x_test[:50],
                               y_test=data.y_test[:50])


def train_group_saying(configs: Sequence[TrainConfig], data: Dataset) -> tuple[list[TrainResult], list[str]]:
    """`train_group`'s results and the line of every GroupSplitWarning it gave (each one recorded, not
    left out by Python's once-per-place rule)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GroupSplitWarning)
        results = train_group(configs, data)
    return results, [str(w.message) for w in caught if issubclass(w.category, GroupSplitWarning)]


def lines_of_a_stacking_group(configs: Sequence[TrainConfig], data: Dataset) -> list[str]:
    """The GroupSplitWarning lines a group of `configs` gives, once checked that `group_reason` lets
    its network stack (in groups of 2 to one more than it) and that each member's result equals its
    run alone: a network every check up front passes, judged while it trains."""
    assert group_reason(configs[0], data=data, members=range(2, len(configs) + 2)) is None
    _, lines = train_group_saying(configs, data)
    assert_group_trains_as_alone(configs, data)
    return lines
