"""Grouped training of the integer and accumulating methods: NITI (per-member exponents, update
widths and rounding draws) and the accumulation emulation (narrow accumulators) stack, and each
member computes what `train` computes for it alone, bit for bit."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from dse.data import load_dataset
from dse.train import TrainConfig, train
from dse.train.grouped import group_reason, train_group

BASE = TrainConfig(model="mlp", dataset="digits", epochs=1, batch_size=64)


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_dataset("digits")


def _same_as_alone(configs: list[TrainConfig], dataset: Any) -> list[dict[str, Any]]:
    assert group_reason(configs[0]) is None  # they train stacked, not one by one
    grouped = [r.to_dict() for r in train_group(configs, dataset)]
    alone = [train(config, dataset).to_dict() for config in configs]
    for together, by_itself in zip(grouped, alone, strict=True):
        together.pop("wall_time_s")
        by_itself.pop("wall_time_s")
        assert repr(together) == repr(by_itself)  # repr: NaN == NaN, and every float's last bit
    return grouped


# --- accumulation emulation --------------------------------------------------------------------

@pytest.mark.parametrize("fields", [
    {"format": "fp8_e4m3", "accumulation": "fp16"},
    {"format": "int8", "accumulation": "bf16", "accumulation_chunk": 1},
    {"format": "fp8_e5m2", "rounding": "stochastic", "accumulation": "fp8_e5m2", "accumulation_chunk": 4,
     "layers": [{"match": "1", "format": "int8"}]},
], ids=["fp16-chunk16", "bf16-chunk1", "e5m2-chunk4-per-layer"])
def test_accumulating_members_equal_alone_runs_bit_for_bit(fields: dict[str, Any], digits: Any) -> None:
    """Each chunk is a batched matmul over the same reduction indices as the member's GEMM alone, and
    the accumulator rounds elementwise, so the chunks fold in the same order: no sum is reordered."""
    base = BASE.replace(**fields)
    configs = [base.replace(seed=0), base.replace(seed=1, lr=0.1), base.replace(seed=2)]
    results = _same_as_alone(configs, digits)
    assert len({r["final_loss"] for r in results}) == 3


def test_an_accumulating_member_that_diverges_does_not_disturb_the_others(digits: Any) -> None:
    base = BASE.replace(format="fp8_e4m3", accumulation="fp16", epochs=2)  # lr 100 overflows fp16
    results = _same_as_alone([base.replace(seed=0), base.replace(seed=1, lr=100.0), base.replace(seed=2)],
                             digits)
    assert [r["diverged"] for r in results] == [False, True, False]
    assert math.isnan(results[1]["final_loss"]) and results[0]["test_accuracy"] > 0.5
