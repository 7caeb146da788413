"""A group gives a member's GEMM its operand at the address it has alone also where alone it is off
alignment: a column slice of an activation (8 bytes past 16 bytes alone), the validation split a view
one row (148 bytes) into its storage, the last batch partial. Alone the slice starts 8 bytes into
the activation's block; in the group member g's block lies g x 50 x 39 x 4 bytes further on, which
`batched_sums.at_alone_alignment` moves back to 8 bytes past a 64-byte boundary (without it member
55's final loss differed: 2.273071765899658 grouped against 2.272643725077311 alone, int8)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from support.group_runs import assert_group_trains_as_alone

from dse.data import load_dataset
from dse.train import TrainConfig

SLICE_MODELS = str(Path(__file__).resolve().parent.parent / "support" / "slice_models.py")


def _one_row_in(t: torch.Tensor, rows: int, features: int) -> torch.Tensor:
    """t's first `rows` rows as a view one row into its storage (off 64 bytes for 37 features)."""
    return torch.cat([t[:1], t[:rows]])[:, :features].contiguous()[1:]


@pytest.mark.parametrize("number_format", ["fp32", "int8"])
def test_a_member_fed_a_column_slice_trains_as_alone(number_format: str) -> None:
    data = load_dataset("digits")
    assert data.x_val is not None and data.y_val is not None
    x_val = _one_row_in(data.x_val, 70, 37)
    assert x_val.data_ptr() % 16 != 0
    data = dataclasses.replace(data, x_train=data.x_train[:114, :37].contiguous(), y_train=data.y_train[:114],
                               x_val=x_val, y_val=data.y_val[:70],
                               x_test=_one_row_in(data.x_test, 70, 37), y_test=data.y_test[:70])
    base = TrainConfig(model=f"{SLICE_MODELS}:column_slice", dataset="digits", epochs=2, batch_size=50,
                       optimizer="sgd", format=number_format, threads=1,
                       rounding="nearest" if number_format == "fp32" else "pseudo_stochastic")
    configs = [base.replace(seed=3, lr=0.03), base.replace(seed=55, lr=0.05), base.replace(seed=7, lr=0.02)]
    assert_group_trains_as_alone(configs, data)
