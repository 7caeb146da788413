"""Users' networks whose GEMMs are function calls (F.linear on a parameter, x @ W, torch.bmm,
F.conv2d, F.scaled_dot_product_attention) or torch's attention modules (nn.MultiheadAttention,
nn.TransformerEncoderLayer) train stacked, each member bit for bit as alone, under every method
(dse/train/stacked_functional.py); the ones that cannot stack say precisely why."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from dse.data import load_dataset
from dse.train import TrainConfig
from dse.train.grouped import group_reason

MODELS = "tests/support/user_models.py"
MEMBERS: list[dict[str, Any]] = [{"seed": 0}, {"seed": 1, "lr": 0.1, "momentum": 0.5}, {"seed": 2}]
MADAM_MEMBERS: list[dict[str, Any]] = [{"seed": 0}, {"seed": 1, "p_scale": 10.0}, {"seed": 2, "lr": 1 / 64}]

SameAsAlone = Callable[..., list[dict[str, Any]]]

pytestmark = pytest.mark.usefixtures("one_thread")

SGD_COPY = {"format": "int8"}  # SGD with an fp32 master copy, per-tensor scales
LNS_MADAM = {"format": "lns8", "optimizer": "lns-madam", "master_weights": False}
MADAM = {"format": "lns8", "optimizer": "madam", "master_weights": False, "rounding": "stochastic"}
MX = {"format": "mxfp4"}  # blocks along each GEMM's own reduction axis
STOCHASTIC = {"format": "fp8_e4m3", "rounding": "stochastic", "optimizer": "adam", "optimizer_state": "bf16"}
ACCUMULATING = {"format": "fp8_e5m2", "rounding": "stochastic", "accumulation": "fp16",
                "accumulation_chunk": 8}
WARMUP = {"format": "posit(8,1)", "layer_scaling": True, "warmup_epochs": 1, "epochs": 2}  # fp32, then posit
RULES = {"format": "int8", "full_precision_layers": ["first"],
         "layers": [{"match": "*.scores", "format": "fp8_e5m2"},
                    {"match": "layer.linear2", "weights": "int(6)"}]}

CASES: list[tuple[str, dict[str, Any]]] = [
    ("functional", SGD_COPY), ("functional", LNS_MADAM), ("functional", MX), ("functional", ACCUMULATING),
    ("conv", SGD_COPY), ("conv", MX), ("conv", MADAM),
    ("encoder", SGD_COPY), ("encoder", LNS_MADAM), ("encoder", MX), ("encoder", STOCHASTIC),
    ("encoder", WARMUP), ("encoder", RULES),
    ("attention", SGD_COPY), ("attention", ACCUMULATING), ("attention", WARMUP),
    ("sdpa", MX), ("sdpa", WARMUP), ("sdpa", MADAM),
    ("transposed", SGD_COPY), ("transposed", MX), ("transposed", LNS_MADAM),
]


@pytest.fixture(scope="module")
def digits_subset() -> Any:
    data = load_dataset("digits")
    return dataclasses.replace(data, x_train=data.x_train[:320], y_train=data.y_train[:320],
                               x_val=data.x_val[:200], y_val=data.y_val[:200],
                               x_test=data.x_test[:200], y_test=data.y_test[:200])


def _id(case: tuple[str, dict[str, Any]]) -> str:
    factory, fields = case
    return factory + ":" + ",".join(f"{k}={v}" for k, v in fields.items())


@pytest.mark.parametrize("case", CASES, ids=[_id(case) for case in CASES])
def test_a_users_functional_and_attention_gemms_stack_and_members_equal_alone_runs(
        case: tuple[str, dict[str, Any]], digits_subset: Any, stacked_same_as_alone: SameAsAlone) -> None:
    factory, fields = case
    base = TrainConfig(model=f"{MODELS}:{factory}", dataset="digits", epochs=1,
                       batch_size=64).replace(**fields)
    members = MADAM_MEMBERS if base.optimizer in ("madam", "lns-madam") else MEMBERS
    results = stacked_same_as_alone([base.replace(**member) for member in members], digits_subset)
    assert len({r["final_loss"] for r in results}) == len(members)  # distinct runs, not one repeated


@pytest.mark.parametrize("fields", [{}, SGD_COPY], ids=["fp32", "int8"])
def test_x_at_w_with_a_3_axis_input_stacks_and_members_equal_alone_runs(
        fields: dict[str, Any], digits_subset: Any, stacked_same_as_alone: SameAsAlone) -> None:
    """Alone, torch folds x (B, 4, 16) @ W into one mm whose weight gradient sums the batch's tokens
    in one order; a batched matmul over the members' samples sums them in another (fp32 differed
    from the second epoch on)."""
    base = TrainConfig(model=f"{MODELS}:tokens", dataset="digits", epochs=2, batch_size=50).replace(**fields)
    stacked_same_as_alone([base.replace(**member) for member in MEMBERS], digits_subset)


@pytest.mark.parametrize("factory, why", [
    ("attention_bias_kv", "its MultiheadAttention attn adds bias_k, bias_v to every member's keys"),
    ("attention_dropout", "random numbers"),
    ("scaled_scores", "runs member by member (it holds weights or buffers used outside GEMMs) and calls the "
                      "GEMM matmul0"),
])
def test_a_users_model_whose_gemms_cannot_stack_trains_one_by_one_and_says_why(
        factory: str, why: str, digits_subset: Any, same_as_alone: SameAsAlone) -> None:
    base = TrainConfig(model=f"{MODELS}:{factory}", dataset="digits", epochs=1, batch_size=64, format="int8")
    reason = group_reason(base)
    assert reason is not None and why in reason and "function calls" not in reason
    same_as_alone([base.replace(seed=0), base.replace(seed=1)], digits_subset)


@pytest.mark.parametrize(("factory", "batch", "fields"), [
    ("tiny", 4, {}), ("tiny", 4, SGD_COPY), ("bottleneck", 64, {}), ("bottleneck", 64, SGD_COPY),
    ("small_tokens", 32, SGD_COPY), ("one_token", 32, SGD_COPY),
], ids=["tiny-fp32", "tiny-int8", "bottleneck-fp32", "bottleneck-int8", "matmul-256-int8",
        "matmul-one-row-int8"])
def test_gemms_torchs_batched_kernel_sums_otherwise_run_member_by_member_and_equal_alone_runs(
        factory: str, batch: int, fields: dict[str, Any], digits_subset: Any,
        stacked_same_as_alone: SameAsAlone) -> None:
    """Where torch's CPU bmm would not sum a member's product as its mm alone
    (dse.train.batched_sums.bmm_sums_as_mm: under 400 multiply-adds, or a single row, column or reduction
    index) a group runs the product member by member: three hidden units at a batch of 4, a one-unit
    bottleneck at a batch of 64 (a batched GEMM there changed the int8 run's final loss), and a
    quantized functional x @ W whose product a sample is small or a single row (alone one mm over
    the batch's rows, in a group a batch entry a sample: each int8 run's final loss differed before)."""
    data = dataclasses.replace(digits_subset, x_train=digits_subset.x_train[:96],
                               y_train=digits_subset.y_train[:96])
    base = TrainConfig(model=f"{MODELS}:{factory}", dataset="digits", epochs=1,
                       batch_size=batch).replace(**fields)
    stacked_same_as_alone([base.replace(**member) for member in MEMBERS], data)
