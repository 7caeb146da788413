"""Activation checkpointing (dse/train/recompute.py) as a user of `dse train` sees it: a checkpointed
network trains bit for bit as without checkpointing, stochastic rounding included, and a torch whose
checkpoint no longer recomputes through what dse replaces is refused with a clear error."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint
from torch import Tensor, nn

from dse.data import load_dataset
from dse.train import TrainConfig, train
from dse.train.grouped import backward_reason, train_group
from dse.train.recompute import (
    TORCH_CHECKPOINT_FUNCTION,
    CheckpointsNotFollowed,
    check_checkpoints_followed,
    follow_checkpoints,
)

USERS = Path(__file__).resolve().parents[1] / "support" / "user_models.py"


@pytest.fixture(scope="module")
def small_digits() -> object:
    data = load_dataset("digits")
    return dataclasses.replace(data, x_train=data.x_train[:100], y_train=data.y_train[:100],
                               x_val=data.x_val[:30], y_val=data.y_val[:30], x_test=data.x_test[:30],
                               y_test=data.y_test[:30])


def _same(a: object, b: object) -> bool:
    def seen(r: object) -> str:
        return repr({k: v for k, v in dataclasses.asdict(r).items()  # type: ignore[call-overload]
                     if k not in ("wall_time_s", "config")})
    return seen(a) == seen(b)


@pytest.mark.parametrize("network", ["checkpointed", "checkpointed_reentrant", "checkpointed_layer",
                                     "checkpointed_layer_reentrant"])
def test_a_checkpointed_network_trains_with_stochastic_rounding_as_without_checkpointing(
        network: str, small_digits: object) -> None:
    """Before recompute.py replayed the run's generator (torch 2.13, this setup), the recomputation
    drew new rounding numbers: the functional-GEMM block's final loss 2.3070564 against 2.3069679
    without checkpointing (test accuracy 1/30 against 2/30), the nn.Linear block's 2.3000735 against
    2.3000925, reentrant and non-reentrant alike; nearest rounding was already equal."""
    plain = network.replace("_reentrant", "") + "_plain"
    base = TrainConfig(dataset="digits", optimizer="sgd", format="int8", rounding="stochastic", epochs=1,
                       batch_size=50, threads=1, lr=0.05, seed=3)
    checkpointed = train(base.replace(model=f"{USERS}:{network}"), small_digits)  # type: ignore[arg-type]
    without = train(base.replace(model=f"{USERS}:{plain}"), small_digits)  # type: ignore[arg-type]
    assert _same(checkpointed, without), (checkpointed, without)


def test_a_checkpointed_group_trains_with_stochastic_rounding_as_each_member_without_checkpointing(
        small_digits: object) -> None:
    base = TrainConfig(dataset="digits", optimizer="sgd", format="int8", rounding="stochastic", epochs=1,
                       batch_size=50, threads=1, lr=0.05)
    together = train_group([base.replace(model=f"{USERS}:checkpointed", seed=s) for s in (3, 4)],
                           small_digits)  # type: ignore[arg-type]
    for member, seed in zip(together, (3, 4), strict=True):
        alone = train(base.replace(model=f"{USERS}:checkpointed_plain", seed=seed), small_digits)  # type: ignore[arg-type]
        assert _same(member, alone), (seed, member, alone)


def test_this_torchs_checkpoint_recomputes_through_what_dse_replaces() -> None:
    """What fails first on a torch upgrade that changes how `checkpoint` finds its parts."""
    follow_checkpoints()
    check_checkpoints_followed()


def test_a_torch_whose_checkpoint_does_not_look_up_the_replaced_parts_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """As a torch would be whose `checkpoint` called its reentrant Function by another name: the check
    raises, naming the torch version and the form, instead of training with other bits."""
    follow_checkpoints()
    torchs = torch_checkpoint.CheckpointFunction.__mro__[1]
    monkeypatch.setattr(torch_checkpoint, "CheckpointFunction", torchs)
    with pytest.raises(CheckpointsNotFollowed, match=rf"torch {re.escape(torch.__version__)}.*\(reentrant\)"):
        check_checkpoints_followed()


class _BoundBeforeDse(nn.Module):
    """Reentrant checkpointing by torch's own CheckpointFunction, as a user's file that ran `from
    torch.utils.checkpoint import CheckpointFunction` before dse replaced it calls it: its
    recomputation runs outside the member mode."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(64, 37), nn.Linear(37, 10)

    def forward(self, x: Tensor) -> Tensor:
        def block(h: Tensor) -> Tensor:
            return F.silu(h) * torch.sigmoid(h)

        return self.head(TORCH_CHECKPOINT_FUNCTION.apply(block, True, self.a(x)))


def test_torchs_own_checkpoint_function_bound_before_dse_trains_one_by_one_and_says_so() -> None:
    """Before, backward_reason let it stack (None), and the group gave members other gradients than
    alone (torch 2.13, 2 members of 50 rows: member 1's input gradient and a.weight's in 1 element
    each; 3 of 300 at 2 threads: member 0's a.weight in 2, member 1's input gradient in 4)."""
    torch.manual_seed(0)
    reason = backward_reason(_BoundBeforeDse(), torch.randn(2, 64))
    assert reason is not None and "autograd.Function CheckpointFunction calls" in reason, reason
