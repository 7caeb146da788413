"""Shared by the training tests: one torch thread, the digits data, and the grouped-equals-alone check."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch

from dse.data import load_dataset
from dse.train import TrainConfig, train
from dse.train.grouped import group_reason, train_group

SameAsAlone = Callable[..., list[dict[str, Any]]]


@pytest.fixture
def one_thread() -> None:
    """One torch thread, as a sweep worker runs (files opt in with `pytestmark`)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_dataset("digits")


Subset = Callable[[str, int, int], Any]


def _subset(name: str, train: int, held_out: int) -> Any:
    """A dataset's first `train` training samples and `held_out` validation and test samples: small
    enough for a test to train on several times."""
    data = load_dataset(name)
    return dataclasses.replace(data, x_train=data.x_train[:train], y_train=data.y_train[:train],
                               x_val=data.x_val[:held_out], y_val=data.y_val[:held_out],
                               x_test=data.x_test[:held_out], y_test=data.y_test[:held_out])


@pytest.fixture(scope="session")
def subset() -> Subset:
    return _subset


def _same_as_alone(configs: list[TrainConfig], dataset: Any, stacked: bool = False) -> list[dict[str, Any]]:
    """Train `configs` as one group and each alone; every result must agree to the last bit
    (compared by repr: NaN == NaN, and every float's last bit). `stacked`: also require that they
    train stacked, not one by one."""
    if stacked:
        assert group_reason(configs[0]) is None
    grouped = [r.to_dict() for r in train_group(configs, dataset)]
    alone = [train(config, dataset).to_dict() for config in configs]
    for together, by_itself in zip(grouped, alone, strict=True):
        together.pop("wall_time_s")
        by_itself.pop("wall_time_s")
        assert repr(together) == repr(by_itself)
    return grouped


@pytest.fixture(scope="session")
def same_as_alone() -> SameAsAlone:
    return _same_as_alone


@pytest.fixture(scope="session")
def stacked_same_as_alone() -> SameAsAlone:
    """`same_as_alone` for configurations that must train stacked, not one by one."""
    return functools.partial(_same_as_alone, stacked=True)
