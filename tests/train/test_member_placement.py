"""MemberKernelMode follows where each member's elements lie from the group's input (`place`) through
the calls that make a tensor (dse.train.member_kernels.Placement), and splits a placed tensor along the
axis that holds each member's block, whatever its shape; only a tensor it did not follow is read by
its shape (`_member_axis`). Two layouts a shape cannot tell apart are split as alone when placed:
rows straddling samples whose length is a multiple of the group's batch, and a sequence-first tensor
flattened behind its samples whose sequence is a multiple of it. Results are compared with each
member's own tensor alone, built fresh (benchmarks/member_placement.py counts the blocks)."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from dse.train.member_kernels import AmbiguousMemberAxisWarning, MemberAxisLost, MemberKernelMode


def _reshaped(x: Tensor, rng: random.Random) -> Tensor:
    """x in a random shape of its element count (its prime factors shuffled into 1-4 axes)."""
    left, factors, d = x.numel(), [], 2
    while left > 1:
        while left % d == 0:
            factors.append(d)
            left //= d
        d += 1
    rng.shuffle(factors)
    axes = [1] * rng.randint(1, 4)
    for f in factors:
        axes[rng.randrange(len(axes))] *= f
    return x.reshape(axes)


def _axis(x: Tensor, rng: random.Random) -> int:
    return rng.randrange(x.dim()) if x.dim() else 0


def _whole_block_axis(ids: Tensor, members: int) -> int | None:
    """The axis of `ids` (each element its member's number) that holds each member's block: member g's
    elements are the g-th of `members` equal chunks along it, at every place of the other axes."""
    for axis in range(ids.dim()):
        if ids.shape[axis] > 1 and ids.shape[axis] % members == 0:
            chunks = ids.movedim(axis, 0).reshape(members, -1)
            if all(bool((chunks[g] == g).all()) for g in range(members)):
                return axis
    return None


Step = Callable[[Tensor, random.Random, "int | None"], Tensor]
"""A call on x, given a random source and the axis of x that holds each member's block (None: none)."""


def _elsewhere(call: Callable[[Tensor, int, random.Random], Tensor]) -> Step:
    """A step that calls call(x, axis, rng) on an axis of x other than the one holding each member's
    block (x as it is where there is none, or no other)."""
    def step(x: Tensor, rng: random.Random, held: int | None) -> Tensor:
        others = [d for d in range(x.dim()) if d != held]
        return x if held is None or not others else call(x, rng.choice(others), rng)
    return step


def _plus_a_column(x: Tensor, rng: random.Random, held: int | None) -> Tensor:
    """x plus zeros broadcast along its last axis ((n, 1) against x's last two axes, or (1,))."""
    return torch.zeros(x.shape[-2:-1] + (1,)) + x


KEEPING: dict[str, Step] = {
    "reshape": lambda x, rng, held: _reshaped(x, rng),
    "flatten": lambda x, rng, held: x.flatten(),
    "permute": lambda x, rng, held: x.permute(rng.sample(range(x.dim()), x.dim())),
    "transpose": lambda x, rng, held: x.transpose(_axis(x, rng), _axis(x, rng)),
    "T": lambda x, rng, held: x.T if x.dim() == 2 else x.mT if x.dim() > 2 else x,
    "movedim": lambda x, rng, held: torch.movedim(x, _axis(x, rng), _axis(x, rng)),
    "unsqueeze": lambda x, rng, held: x.unsqueeze(rng.randint(0, x.dim())),
    "contiguous": lambda x, rng, held: x.contiguous(),
    "times one": lambda x, rng, held: x * 1.0,
    "plus a row": lambda x, rng, held: x + torch.zeros(x.shape[-1:]),
    "plus a column": _plus_a_column,
    "amax elsewhere": _elsewhere(lambda x, d, rng: x.amax(d, keepdim=rng.random() < 0.5)),
    "mean elsewhere": _elsewhere(lambda x, d, rng: torch.mean(x, dim=(d,))),
    "index elsewhere": _elsewhere(lambda x, d, rng: x[(slice(None),) * d + (-1,)]),
    "select elsewhere": _elsewhere(lambda x, d, rng: x.select(d, 0)),
}
"""Calls after which a tensor's placement must be known: they keep each element's member and the axis
holding each member's block."""

OTHERS: dict[str, Step] = {
    "cat": lambda x, rng, held: torch.cat([x, x], _axis(x, rng)),
    "stack": lambda x, rng, held: torch.stack([x, x], rng.randint(0, x.dim())),
    "narrow": lambda x, rng, held: x.narrow(d := _axis(x, rng), 0, max(1, x.shape[d] // 2)),
    "first": lambda x, rng, held: x[0],
    "last column": lambda x, rng, held: x[..., -1],
    "amax": lambda x, rng, held: x.amax(_axis(x, rng)),
    "amax kept": lambda x, rng, held: x.amax(_axis(x, rng), keepdim=True),
    "chunk": lambda x, rng, held: x.chunk(2, _axis(x, rng))[0],
    "einsum": lambda x, rng, held: torch.einsum("ij->ji", x) if x.dim() == 2 else x,
}
"""Calls that may move an element to another member's place or drop the member axis: a placement, if
any, must still say each element's member."""

PERMUTING = {"permute", "transpose", "T", "movedim"}


@settings(max_examples=500, deadline=None)
@given(members=st.integers(2, 4), rows=st.integers(1, 5),
       features=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       steps=st.lists(st.sampled_from(sorted({*KEEPING, *OTHERS})), min_size=1, max_size=6),
       seed=st.integers(0, 2**16))
def test_a_placement_says_which_member_holds_each_element(members: int, rows: int, features: list[int],
                                                          steps: list[str], seed: int) -> None:
    """A tensor of its elements' member numbers, placed, through random chains of calls: where the
    result has a placement, element f (row-major) holds member (f // unit) % G; after calls that keep
    each element's member (reshapes, permutations, elementwise and broadcast calls) it has one, unless
    an axis permutation met a tensor with no axis holding each member's block (a reshape cut rows
    across two members: no placement describes the permuted order)."""
    rng = random.Random(seed)
    ids = torch.arange(members, dtype=torch.float64).repeat_interleave(rows)
    x = ids.reshape(-1, *[1] * len(features)).expand(members * rows, *features).contiguous()
    mode = MemberKernelMode(members, rows)
    mode.place(x)
    unplaceable = False
    for step in steps:
        if x.dim() == 0:  # (reduced to one number: nothing more to follow)
            break
        held = _whole_block_axis(x, members)
        unplaceable |= step in PERMUTING and held is None
        with mode:
            x = {**KEEPING, **OTHERS}[step](x, rng, held)
    placement = mode.placement(x)
    if placement is None:
        assert unplaceable or not set(steps) <= set(KEEPING), steps
        return
    expected = (torch.arange(x.numel()) // placement.unit) % members
    assert torch.equal(x.reshape(-1), expected.to(x.dtype)), (steps, tuple(x.shape), placement.unit)


def _silu_of_placed(blocks: list[Tensor], reshape: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """The members' blocks joined into a group's folded batch (tracked), placed, reshaped and through
    F.silu under the mode, which must neither warn nor refuse: the folded batch and the result."""
    folded = torch.cat([b.clone() for b in blocks]).requires_grad_()
    mode = MemberKernelMode(len(blocks), blocks[0].shape[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AmbiguousMemberAxisWarning)
        with mode:
            mode.place(folded)
            grouped = F.silu(reshape(folded))
    assert not caught
    return folded, grouped


@settings(max_examples=40, deadline=None)
@given(members=st.integers(2, 3), rows=st.integers(2, 8), times=st.integers(1, 3), width=st.integers(1, 5),
       seed=st.integers(0, 99))
def test_placed_rows_straddling_samples_are_split_as_each_members_rows_alone(
        members: int, rows: int, times: int, width: int, seed: int) -> None:
    """A placed batch-first (G*B, H) tensor reshaped into rows of K = times * G * B values (an axis of
    exactly G * B when times is 1, a multiple of it else; B*H a multiple of K, as a member alone can
    reshape it, H not one, so that rows straddle samples): each member's rows, values and input
    gradient, are its alone, with no refusal and no warning. Read by its shape, at G 2 B 4 H 12 the
    mode took axis 1 and F.silu's values differed from alone, silently."""
    chunk = times * members * rows
    hidden = chunk // rows * width  # B*H = width * chunk; H a multiple of K only when B divides width
    if hidden % chunk == 0:
        hidden += chunk // rows
    if (rows * hidden) % chunk:
        return
    generator = torch.Generator().manual_seed(seed)
    blocks = [torch.randn(rows, hidden, generator=generator, dtype=torch.float32) * 3 for _ in range(members)]
    folded, grouped = _silu_of_placed(blocks, lambda t: t.reshape(-1, chunk))
    grouped = grouped.reshape(members * rows, hidden)
    grouped.backward(torch.arange(grouped.numel(), dtype=grouped.dtype).reshape(grouped.shape) / 7)
    assert folded.grad is not None
    for g, block in enumerate(blocks):
        own = block.clone().requires_grad_()
        alone = F.silu(own.reshape(-1, chunk)).reshape(rows, hidden)
        alone.backward(torch.arange(g * alone.numel(), (g + 1) * alone.numel(), dtype=alone.dtype)
                       .reshape(alone.shape) / 7)
        assert torch.equal(grouped[g * rows:(g + 1) * rows], alone), g
        assert own.grad is not None and torch.equal(folded.grad[g * rows:(g + 1) * rows], own.grad), g


@settings(max_examples=40, deadline=None)
@given(members=st.integers(2, 4), rows=st.integers(1, 6), times=st.integers(1, 3), features=st.integers(1, 9),
       seed=st.integers(0, 99))
def test_a_placed_sequence_first_tensor_flattened_behind_its_samples_is_split_along_them_at_any_length(
        members: int, rows: int, times: int, features: int, seed: int) -> None:
    """A placed batch-first (G*B, L, E) tensor made sequence-first and flattened behind its samples,
    (L, G*B*E), with L a multiple of G*B (times G*B; as a reading of its shape, axis 0 is taken for
    the samples'): each member's block of axis 1, values and input gradient, is its alone, with no
    refusal and no warning. Read by its shape, 8 of 40 member blocks differed from alone
    (benchmarks/member_placement.py, G 2-3, B 2-5, E 3-4, under a warning)."""
    length = times * members * rows
    generator = torch.Generator().manual_seed(seed)
    blocks = [torch.randn(rows, length, features, generator=generator) * 3 for _ in range(members)]

    def flat(t: Tensor) -> Tensor:
        return t.transpose(0, 1).contiguous().flatten(1)

    folded, grouped = _silu_of_placed(blocks, flat)
    grouped.sum().backward()
    assert folded.grad is not None
    each = rows * features
    for g, block in enumerate(blocks):
        own = block.clone().requires_grad_()
        alone = F.silu(flat(own))
        alone.sum().backward()
        assert torch.equal(grouped[:, g * each:(g + 1) * each], alone), g
        assert own.grad is not None and torch.equal(folded.grad[g * rows:(g + 1) * rows], own.grad), g


@settings(max_examples=25, deadline=None)
@given(members=st.integers(2, 4), rows=st.integers(2, 9), length=st.integers(2, 6))
def test_a_placed_sequence_first_tensor_folded_into_rows_is_refused_where_a_call_splits_it(
        members: int, rows: int, length: int) -> None:
    """A placed batch-first (G*B, L, E) tensor made sequence-first and folded into (L*G*B, E) rows, at
    any L (a multiple of G*B too, where a reading of the shape takes the first axis and splits it as
    member-major rows): an elementwise product of it runs; a SiLU over it raises MemberAxisLost (the
    group's trials train one by one)."""
    x = torch.randn(members * rows, length, 5)
    mode = MemberKernelMode(members, rows)
    with mode:
        mode.place(x)
        folded = x.transpose(0, 1).reshape(-1, 5)
        folded * 2.0
        with pytest.raises(MemberAxisLost, match="interleaves"):
            F.silu(folded)


def test_a_placement_from_an_earlier_forward_is_not_read() -> None:
    """A tensor kept from another forward (`begin`) is read by its shape, as one the mode never placed."""
    mode = MemberKernelMode(2, 3)
    x = torch.randn(6, 4)
    mode.place(x)
    assert mode.placement(x) is not None
    mode.begin()
    assert mode.placement(x) is None
