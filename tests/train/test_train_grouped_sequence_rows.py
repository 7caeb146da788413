"""A sequence-first tensor (L, G*B, E) folded into rows, (L*G*B, E), holds each member's samples in L
stretches, sequence-major: no axis holds a member's block, and the member mode would have split it as
member-major rows (a position-dependent kernel's scalar tail on other elements than alone). The mode
finds the fold (dse.train.member_kernels.MemberAxisLost) and the group's trials train one by one,
saying so. Layouts a reading of the shape cannot tell apart (rows straddling samples; a sequence-first
tensor flattened behind its samples) train grouped where the mode followed the members' placement
from the group's input. The op-level tests here give the mode fresh tensors, whose shape it reads
(tests/train/test_member_placement.py gives it placed ones). Grouped results are compared with runs
alone on fresh models and tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from support.group_runs import assert_group_trains_as_alone, short_digits, train_group_saying
from support.leaf_models import chunked_silu, sequence_first_flat6, sequence_first_rows, sequence_first_rows12

from dse.train import TrainConfig
from dse.train.grouped import group_reason
from dse.train.member_kernels import MemberAxisLost, MemberKernelMode

LEAF_MODELS = str(Path(__file__).resolve().parent.parent / "support" / "leaf_models.py")
FOLDS = {
    "reshape(-1, E)": lambda t: t.reshape(-1, t.shape[-1]),
    "view(L * N, E)": lambda t: t.contiguous().view(t.shape[0] * t.shape[1], t.shape[2]),
    "flatten(0, 1)": lambda t: t.flatten(0, 1),
    "torch.flatten(t)": lambda t: torch.flatten(t),
    "torch.reshape(input=, shape=)": lambda t: torch.reshape(input=t, shape=(-1, t.shape[-1])),
}
KEPT = {
    "flatten(1)": lambda t: t.flatten(1),  # (L, G*B*E): each member's block one stretch of axis 1
    "view(L, N, E, 1)": lambda t: t.contiguous().view(*t.shape, 1),
    "back to batch-first": lambda t: t.transpose(0, 1).reshape(t.shape[1], -1),
}


@settings(max_examples=25, deadline=None)
@given(members=st.integers(2, 4), rows=st.integers(2, 20), length=st.integers(2, 9),
       fold=st.sampled_from(sorted(FOLDS)))
def test_a_split_after_a_sequence_first_tensor_was_folded_into_rows_is_refused(
        members: int, rows: int, length: int, fold: str) -> None:
    if length % (members * rows) == 0:  # (the mode takes the first axis: it says so)
        length += 1
    x = torch.randn(length, members * rows, 5)
    mode = MemberKernelMode(members, rows)
    with mode:
        folded = FOLDS[fold](x)
        folded * 2.0  # (no split: a fold that feeds no split alone runs)
        with pytest.raises(MemberAxisLost, match="interleaves"):
            F.silu(folded)


@pytest.mark.parametrize("reshape", sorted(KEPT))
def test_a_reshape_that_keeps_each_members_block_on_one_axis_runs_as_it_is(reshape: str) -> None:
    x = torch.randn(7, 3 * 5, 4)
    mode = MemberKernelMode(3, 5)
    with mode:
        F.silu(KEPT[reshape](x))  # (no MemberAxisLost)
    assert mode.lost is None


def test_a_network_folding_sequence_first_rows_trains_one_by_one_and_says_so() -> None:
    """leaf_models' sequence_first_rows ((L, B, E) = (4, B, 10) folded into rows for a SiLU). Before,
    it stacked and 2 of 9 runs differed from alone (fp32, batch 7, 13, 50, seeds 11-13: seed 11 at
    batch 7 2.0406443581861606 grouped against 2.040644372210783 alone). Now the checks' forward
    finds the fold."""
    base = TrainConfig(model=f"{LEAF_MODELS}:sequence_first_rows", dataset="digits", epochs=2, batch_size=7,
                       optimizer="sgd", format="fp32", threads=1)
    data = short_digits()
    reason = group_reason(base, sequence_first_rows((64,), 10), data)
    assert reason is not None and "MemberAxisLost" in reason
    assert_group_trains_as_alone([base.replace(seed=seed, lr=lr) for seed, lr in ((11, 0.03), (12, 0.05))],
                                 data)


def test_a_fold_whose_sequence_is_a_multiple_of_the_checks_batches_is_found_by_the_checks() -> None:
    """leaf_models' sequence_first_rows12: a sequence of 12, a multiple of the checks' folded batches,
    where a reading of the shape takes its first axis for the samples'. Before, the checks passed and
    the fold was found only at the group's first forward; the placement followed from the input finds
    it in the checks."""
    data = short_digits()
    base = TrainConfig(model=f"{LEAF_MODELS}:sequence_first_rows12", dataset="digits", epochs=2,
                       batch_size=7, optimizer="sgd", format="fp32", threads=1)
    reason = group_reason(base, sequence_first_rows12((64,), 10), data, range(2, 4))
    assert reason is not None and "MemberAxisLost" in reason and "a (12, 4, 4) tensor" in reason


def test_a_fold_the_checks_cannot_see_is_found_while_the_group_trains() -> None:
    """leaf_models' late_sequence_first_rows folds from its third forward on, after the checks' forwards:
    a batch of 7 in a group of 3 is found at that forward, and the group's trials train one by one from
    the start with a GroupSplitWarning naming the shapes. (sequence_first_rows12 was this case before
    placements were followed: 2 of 9 runs differed before it was found at all, seed 11 at batch 7
    2.0606847791110767 grouped against 2.060684793135699 alone.)"""
    base = TrainConfig(model=f"{LEAF_MODELS}:late_sequence_first_rows", dataset="digits", epochs=2,
                       batch_size=7, optimizer="sgd", format="fp32", threads=1)
    data = short_digits()
    configs = [base.replace(seed=seed, lr=lr) for seed, lr in ((11, 0.03), (12, 0.05), (13, 0.02))]
    assert group_reason(base, data=data, members=range(2, 4)) is None
    _, notes = train_group_saying(configs, data)
    assert len(notes) == 1 and "a (4, 21, 10) tensor" in notes[0] and "trained one by one" in notes[0]
    assert_group_trains_as_alone(configs, data)


@settings(max_examples=25, deadline=None)
@given(members=st.integers(2, 4), rows=st.integers(1, 9), length=st.integers(1, 8),
       features=st.integers(1, 9), name=st.sampled_from(["silu", "sigmoid", "softplus"]))
def test_a_sequence_first_tensor_flattened_behind_its_samples_is_split_along_its_samples(
        members: int, rows: int, length: int, features: int, name: str) -> None:
    """(L, G*B*E): each member's block one stretch of axis 1 where L does not divide into G. Where it
    does (and E > 1), axis 0 may hold the members as well (rows straddling samples): the mode raises
    MemberAxisLost (one by one) rather than guess. Before, the mode split it along axis 0 where L
    divided into G (and not at all where it did not): F.silu's values differed from alone for
    members=2, rows=7, length=6, features=8."""
    if length % (members * rows) == 0:  # (the first axis looks batch-first: `_member_axis` takes it)
        length += 1
    op = getattr(F, name)
    x = torch.randn(length, members * rows * features, generator=torch.Generator().manual_seed(length)) * 3
    if length % members == 0 and features > 1:  # ((L, G*B): an axis of exactly G*B is taken for it)
        with pytest.raises(MemberAxisLost, match="its shape cannot tell which"):
            with MemberKernelMode(members, rows):
                op(x)
        return
    with MemberKernelMode(members, rows):
        grouped = op(x)
    each = rows * features
    for g in range(members):
        alone = op(x[:, g * each:(g + 1) * each].clone())
        assert torch.equal(grouped[:, g * each:(g + 1) * each], alone), g


@pytest.mark.parametrize(("batch", "members"), [(7, 2), (3, 2), (7, 3)])
def test_a_sequence_first_tensor_flattened_behind_its_samples_trains_grouped_as_alone(batch: int,
                                                                                     members: int) -> None:
    """leaf_models' sequence_first_flat6: a SiLU over a (6, B*8) tensor, in a group (6, G*B*8), whose
    members' blocks lie along axis 1, where 6 divides into G (axis 0 may hold them too, by its shape)
    and at batch 3 in a group of 2 is itself G*B (a reading of the shape takes axis 0). Its placement,
    followed from the group's input through the transpose and the flatten, says axis 1: it trains
    grouped, silently, as alone. Before placements were followed, it trained one by one (the mode
    raised MemberAxisLost, its shape could not tell); before that, the mode took axis 0 where 6
    divided into G and 10 of 27 runs differed silently (fp32, batch 7/13/50, G 2-4)."""
    base = TrainConfig(model=f"{LEAF_MODELS}:sequence_first_flat6", dataset="digits", epochs=2,
                       batch_size=batch, optimizer="sgd", format="fp32", threads=1)
    data = short_digits()
    configs = [base.replace(seed=11 + g) for g in range(members)]
    assert group_reason(base, sequence_first_flat6((64,), 10), data, range(2, members + 1)) is None
    _, notes = train_group_saying(configs, data)
    assert notes == []
    assert_group_trains_as_alone(configs, data)


@settings(max_examples=25, deadline=None)
@given(members=st.integers(2, 4), rows=st.integers(2, 9), times=st.integers(2, 3), width=st.integers(1, 5),
       seed=st.integers(0, 99))
def test_rows_straddling_samples_whose_length_is_a_multiple_of_the_folded_batch_are_never_split_silently(
        members: int, rows: int, times: int, width: int, seed: int) -> None:
    """A batch-first (G*B, H) tensor reshaped into rows of K = times * G * B values (times > 1: an axis
    of exactly G * B is taken for the members' samples, as a sequence-first layout's), where K does not
    divide H: its first axis (G*B*H/K rows, each member's a block of them) divides into G, its second is
    a multiple of G * B. The mode either gives each member its bits alone or raises MemberAxisLost.
    Before, it took axis 1 (a multiple of G * B) and F.silu's values differed from alone, silently
    (members=2, rows=7, K=28, H=12: the first axis 6 rows, 3 each member's)."""
    chunk = times * members * rows
    hidden = width * times * members  # (B * H a multiple of K; H not one, or K rows would hold samples)
    hidden += times * members if hidden % chunk == 0 else 0
    generator = torch.Generator().manual_seed(seed)
    blocks = [torch.randn(rows, hidden, generator=generator) * 3 for _ in range(members)]
    folded = torch.cat(blocks).reshape(-1, chunk)
    try:
        with MemberKernelMode(members, rows):
            grouped = F.silu(folded).reshape(members * rows, hidden)
    except MemberAxisLost:
        return
    for g, block in enumerate(blocks):
        alone = F.silu(block.clone().reshape(-1, chunk)).reshape(rows, hidden)
        assert torch.equal(grouped[g * rows:(g + 1) * rows], alone), g


def test_a_network_taking_rows_that_straddle_its_samples_trains_grouped_as_alone() -> None:
    """leaf_models' chunked_silu: a hidden layer of 12 taken in rows of 28 values for a SiLU, (6, 28) in
    a group of 2 at batch 7, each member's 3 rows, which its placement, followed from the group's
    input through the Linear and the reshape, says. Before placements were followed, its trials
    trained one by one (its shape could not tell which axis held the members); before that, the mode
    split those rows along axis 1 and both runs differed silently (seed 11: 2.1002594232559204
    grouped against 2.100259451305165 alone)."""
    base = TrainConfig(model=f"{LEAF_MODELS}:chunked_silu", dataset="digits", epochs=2, batch_size=7,
                       optimizer="sgd", format="fp32", threads=1)
    configs, data = [base.replace(seed=seed) for seed in (11, 12)], short_digits()
    assert group_reason(base, chunked_silu((64,), 10), data, range(2, 3)) is None
    _, lines = train_group_saying(configs, data)
    assert lines == []
    assert_group_trains_as_alone(configs, data)
