"""The check the grouped-training tests share: a group's `train_group` gives every member the result
`train` gives it alone, bit for bit (every field but the wall time)."""

from __future__ import annotations

from collections.abc import Sequence

from dse.data.dataset import Dataset
from dse.train import TrainConfig, train
from dse.train.grouped import train_group


def assert_group_trains_as_alone(configs: Sequence[TrainConfig], data: Dataset) -> None:
    """Each config's result in one group equals its run alone (compared as the results' reprs, so a
    NaN equals a NaN and a float's last bit counts)."""
    together = [result.to_dict() for result in train_group(list(configs), data)]
    for config, grouped in zip(configs, together, strict=True):
        alone = train(config, data).to_dict()
        grouped.pop("wall_time_s"), alone.pop("wall_time_s")
        assert repr(grouped) == repr(alone), config.seed
