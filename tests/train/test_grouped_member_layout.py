"""A layer run member by member in a group (dse.train.stacked.PerMemberLayer) hands each member's
output on in the memory layout it has alone: a layout decides the order of later reductions."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from support.group_runs import assert_group_trains_as_alone
from support.random_sweeps import USER_MODELS

from dse.data import load_dataset
from dse.train import TrainConfig
from dse.train.member_kernels import cat_as_alone


@settings(max_examples=40, deadline=None)
@given(members=st.integers(1, 4), shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
       order=st.randoms(use_true_random=False))
@example(members=2, shape=[3, 8, 16], order=None)  # (B, L, C) as a (B, C, L) view: torch.cat made
# it contiguous
def test_members_outputs_joined_keep_the_layout_each_has_alone(members: int, shape: list[int],
                                                               order: object) -> None:
    """Each member's rows keep alone's order of axes in memory (its strides too where the batch axis
    is outermost: BatchInnerScale's batch-innermost layout strides over all members outside it)."""
    permutation = list(range(len(shape)))
    if order is None:
        permutation = [0, *permutation[:0:-1]]
    else:
        order.shuffle(permutation)  # type: ignore[attr-defined]
    back = [permutation.index(d) for d in range(len(shape))]
    parts = [torch.randn([shape[d] for d in permutation]).permute(back) for _ in range(members)]
    joined = cat_as_alone(parts)
    assert torch.equal(joined, torch.cat(parts))
    rows = shape[0]
    outermost = permutation[0] == 0 or all(shape[d] == 1 for d in permutation[:permutation.index(0)])
    for g, part in enumerate(parts):
        own = joined[g * rows:(g + 1) * rows]
        assert _axes_in_memory(own) == _axes_in_memory(part), (own.stride(), part.stride())
        if outermost:
            assert _order(own) == _order(part), (own.stride(), part.stride())


def _axes_in_memory(t: torch.Tensor) -> list[int]:
    """t's axes longer than 1, outermost in memory first."""
    return sorted((d for d in range(t.dim()) if t.shape[d] > 1), key=lambda d: -t.stride(d))


def _order(t: torch.Tensor) -> list[int]:
    """The strides of t's axes longer than 1 (a layout: an axis of one element has any stride)."""
    return [stride for stride, size in zip(t.stride(), t.shape, strict=True) if size > 1]


@pytest.mark.parametrize("model", ["scaled_pool", "batch_inner"])
def test_a_group_of_a_layer_returning_a_permuted_view_trains_each_member_as_alone(model: str) -> None:
    """Found on purpose (the audit's gap: PerMemberLayer joined its members' outputs with torch.cat):
    ScaledPool's per-channel scale returns (B, C, L) views, summed over L after it; member 0's final
    loss was 2.3300538063049316 grouped against 2.330053726832072 alone (fp32, 128 digits).
    BatchInnerScale's (B, C) view of a (C, B) tensor into a Linear (fixed(8,4,scale=tensor)): member 0's
    final loss was 2.3318892319997153 grouped against 2.331870714823405 alone."""
    data = load_dataset("digits")
    data = dataclasses.replace(data, x_train=data.x_train[:128], y_train=data.y_train[:128],
                               x_val=data.x_val[:100], y_val=data.y_val[:100], x_test=data.x_test[:100],
                               y_test=data.y_test[:100])
    base = TrainConfig(model=f"{USER_MODELS}:{model}", dataset="digits", epochs=1, batch_size=50,
                       rounding="pseudo_stochastic", optimizer="sgd", threads=1, lr=0.05,
                       format="fp32" if model == "scaled_pool" else "fixed(8,4,scale=tensor)")
    configs = [base.replace(seed=1), base.replace(seed=2)]
    assert_group_trains_as_alone(configs, data)
