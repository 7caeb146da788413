"""A stacked convolution (dse/train/stacked.py, `StackedConvOp`) runs each of its three products as
one grouped convolution where a probe of that layout finds each member's bits, else member by member:
the probe decides as a direct comparison of the grouped call with each member's own call on fresh
tensors does, the group's product is each member's own in its layout alone either way, and grouped
CNN and ResNet trainings equal their members' runs alone at one and two threads."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from support.group_gemms import torch_threads

from dse.train import TrainConfig, batched_sums
from dse.train.layers import ConvOp
from dse.train.stacked import StackedConvOp

PRODUCTS = ["forward", "backward-data", "backward-weight", "backward-weight-and-bias"]


UNDERFLOWING = 2.0 ** -83
"""A scale of fp32 operands whose every product underflows to a signed zero: sums of signed zeros,
whose sign depends on how a kernel starts its sums (a dead ReLU region against all-negative weights)."""


@contextmanager
def fresh_decisions() -> Iterator[None]:
    """No decision of the process before (a hypothesis example cannot take a function fixture)."""
    saved = batched_sums._DECIDED, batched_sums._MEMBER_LAYOUTS
    batched_sums._DECIDED, batched_sums._MEMBER_LAYOUTS = {}, {}
    try:
        yield
    finally:
        batched_sums._DECIDED, batched_sums._MEMBER_LAYOUTS = saved


def _operands(op: StackedConvOp, members: int, batch: int, c_in: int, c_out: int, size: tuple[int, ...],
              kernel: int, channels_last: bool, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """x (G, B, C, ...), weight (G, O, C / groups, k...), bias (G, O) and an output gradient dy; x with
    channels innermost where `channels_last` (as an MX quantizer hands a convolution its input)."""
    x = torch.randn(members, batch, *size, c_in, generator=generator).movedim(-1, 2) if channels_last \
        else torch.randn(members, batch, c_in, *size, generator=generator)
    weight = torch.randn(members, c_out, c_in // op.op.groups, *[kernel] * len(size), generator=generator)
    bias = torch.randn(members, c_out, generator=generator)
    y = op.op.forward(x[0], weight[0], None)
    dy = torch.randn(members, *y.shape, generator=generator)
    return x, weight, bias, dy


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` in its strides, on a fresh allocation (as a member's tensor is alone)."""
    return torch.empty_like(t).copy_(t)  # (empty_like keeps a dense tensor's strides)


def _product(op: StackedConvOp, product: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
             dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The group's product (a leading member axis), as a group computes it."""
    if product == "forward":
        return (op.forward(x, weight, bias),)
    mask = {"backward-data": (True, False, False), "backward-weight": (False, True, False),
            "backward-weight-and-bias": (False, True, True)}[product]
    return tuple(g for g in op.plain_grads(dy, x, weight, mask) if g is not None)


def _own(op: StackedConvOp, product: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
         dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One member's product alone, on fresh tensors: its own F.conv / convolution_backward call."""
    x, weight, bias, dy = map(_fresh, (x, weight, bias, dy))
    conv = op.op
    if product == "forward":
        return (conv.forward(x, weight, bias),)
    mask = {"backward-data": [True, False, False], "backward-weight": [False, True, False],
            "backward-weight-and-bias": [False, True, True]}[product]
    grads = torch.ops.aten.convolution_backward(
        dy, x, weight, [weight.shape[0]] if mask[2] else None, list(conv.stride), list(conv.padding),
        list(conv.dilation), False, [0] * len(conv.stride), conv.groups, mask)
    return tuple(g for g, needed in zip(grads, mask, strict=True) if needed)


def _grouped(op: StackedConvOp, product: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
             dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The product as one grouped convolution (what the group runs where the probe finds it alike)."""
    if product == "forward":
        return (op._grouped_forward(x, weight, bias),)
    if product == "backward-data":
        return (op._grouped_data(dy, x, weight),)
    return op._grouped_weight((False, True, product.endswith("bias")), dy, x, weight)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32),
                                              b.contiguous().view(torch.int32))


def _grouped_is_each_members_own(op: StackedConvOp, product: str, seed: int, shape: dict[str, Any]) -> bool:
    """A direct comparison: the grouped call against each member's own call on fresh tensors, on
    random operands drawn again until 4096 output elements were compared (as a probe draws), and on
    operands whose products all underflow (signed zeros)."""
    generator = torch.Generator().manual_seed(seed)
    compared = 0
    while compared < 4096:
        operands = _operands(op, generator=generator, **shape)
        compared += sum(t.numel() for t in _grouped(op, product, *operands))
        if not _grouped_gives_each_members_own(op, product, operands) or not _grouped_gives_each_members_own(
                op, product, tuple(t * UNDERFLOWING for t in operands)):
            return False
    return True


def _grouped_gives_each_members_own(op: StackedConvOp, product: str,
                                    operands: tuple[torch.Tensor, ...]) -> bool:
    together = _grouped(op, product, *operands)
    return all(_same_bits(t[g], o) for g in range(len(operands[0]))
               for t, o in zip(together, _own(op, product, *(t[g] for t in operands)), strict=True))


@settings(max_examples=60, deadline=None)
@given(members=st.integers(2, 4), batch=st.sampled_from([1, 3, 16, 50]),
       channels=st.sampled_from([(1, 8), (4, 4), (16, 32), (25, 25), (32, 64)]),
       size=st.sampled_from([(40,), (19,), (7,), (8, 8), (4, 4), (5, 3)]),
       kernel=st.sampled_from([1, 3, 5]), stride=st.sampled_from([1, 2]), padding=st.sampled_from([0, 1]),
       groups=st.sampled_from([1, 2]), channels_last=st.booleans(), product=st.sampled_from(PRODUCTS),
       thread_count=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_the_convolution_probe_decides_as_a_direct_bit_comparison_and_the_group_gives_each_members_own(
        members: int, batch: int, channels: tuple[int, int], size: tuple[int, ...], kernel: int, stride: int,
        padding: int, groups: int, channels_last: bool, product: str, thread_count: int, seed: int) -> None:
    c_in, c_out = channels
    assume(c_in % groups == 0 and c_out % groups == 0 and all(s + 2 * padding >= kernel for s in size))
    dims = len(size)
    op = StackedConvOp(ConvOp((stride,) * dims, (padding,) * dims, (1,) * dims, groups))
    shape: dict[str, Any] = {"members": members, "batch": batch, "c_in": c_in, "c_out": c_out, "size": size,
                             "kernel": kernel, "channels_last": channels_last}
    drawn = _operands(op, generator=torch.Generator().manual_seed(seed), **shape)
    with torch_threads(thread_count), fresh_decisions():
        for operands in (drawn, tuple(t * UNDERFLOWING for t in drawn)):  # (the second: signed zeros)
            together = _product(op, product, *operands)
            owns = [_own(op, product, *(t[g] for t in operands)) for g in range(members)]
            for g, own in enumerate(owns):
                for stacked, alone in zip(together, own, strict=True):
                    assert _same_bits(stacked[g], alone)
                    assert stacked[g].stride() == alone.stride() or \
                        alone.is_contiguous() and stacked[g].is_contiguous()  # (size-1 axes' strides aside)
        grouped = [key for key, alike in batched_sums.decided().items() if alike]
        alike = _grouped_is_each_members_own(op, product, seed + 1, shape)
    assert bool(grouped) == alike, (product, shape)


CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("cnn", "mnist1d", {}),
    ("cnn", "digits", {"format": "int8"}),
    ("cnn", "mnist1d", {"format": "mxint8", "rounding": "pseudo_stochastic", "optimizer": "adamw",
                        "lr": 0.003}),
    ("resnet", "mnist1d", {"format": "int8"}),
    ("resnet", "digits", {}),
    ("resnet", "mnist1d", {"format": "mxfp8_e4m3", "rounding": "pseudo_stochastic", "optimizer": "adamw",
                           "lr": 0.003}),
    ("resnet", "digits", {"format": "fp8_e4m3", "rounding": "stochastic"}),
    ("tests/support/user_models.py:conv", "digits", {}),  # F.conv2d on a parameter: the functional path
]


@pytest.mark.parametrize("thread_count", [1, 2])
@pytest.mark.parametrize(("model", "dataset", "fields"), CASES,
                         ids=[f"{m.split(':')[-1]}-{d}-{f.get('format', 'fp32')}" for m, d, f in CASES])
def test_a_group_whose_convolutions_run_grouped_where_probed_equals_each_members_run_alone(
        model: str, dataset: str, fields: dict[str, Any], thread_count: int, subset: Callable[..., Any],
        stacked_same_as_alone: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each member of a CNN or ResNet group equals its run alone, bit for bit, with every convolution
    product the probe finds alike run as one grouped convolution, the rest member by member."""
    monkeypatch.setattr(batched_sums, "_DECIDED", {})
    monkeypatch.setattr(batched_sums, "_MEMBER_LAYOUTS", {})
    base = TrainConfig(model=model, dataset=dataset, epochs=1, batch_size=50, threads=thread_count, **fields)
    results = stacked_same_as_alone([base.replace(seed=0), base.replace(seed=1)],
                                    subset(dataset, 150, 50))
    assert len({r["final_loss"] for r in results}) == 2
