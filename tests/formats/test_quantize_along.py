"""Quantizing one tensor along several axes in one call (training's per-GEMM reduction axes) equals
quantizing it along each axis on its own, bit for bit: values, signs of zero, NaN, and a stochastic
rounding's draws (each axis draws what it draws alone, in turn, from the same generator); alone and
per member of a stacked tensor. The fused E8M0 path equals the reference rounding (no fast path at
all) over blocks of every exponent, with odd block tails along every axis."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.aten_calls import AtenCalls

from dse.formats import get
from dse.formats.base import MemberGenerators, NumberFormat, _with_axis
from dse.formats.block import BlockFormat
from dse.formats.fast import block as fast_block
from dse.formats.fast import reference_only

SPECS = ("mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "mxint8", "mx(fp4_e2m1,block=16)",
         "mx(int8,block=7)", "nvfp4", "block(fp6_e2m3,size=16,scale=ue5m3)", "int8(scale=block,block=8)")
E8M0_SPECS = SPECS[:8]
ROUNDINGS = ("nearest", "stochastic", "stochastic(5)", "pseudo_stochastic", "toward_zero")


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    same = ((actual == expected) & (torch.signbit(actual) == torch.signbit(expected))
            | torch.isnan(actual) & torch.isnan(expected))
    assert bool(same.all()), f"{int((~same).sum())} of {actual.numel()} differ"


def each_axis(fmt: NumberFormat, x: torch.Tensor, axes: tuple[int, ...], rounding: str,
              generator: torch.Generator | None) -> list[torch.Tensor]:
    """The rule: one quantize per axis, in turn, with the format's axis set to it."""
    return [_with_axis(fmt, axis).quantize(x, rounding, generator) for axis in axes]


@st.composite
def tensors(draw: st.DrawFn, leading: int = 0) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A tensor of 1-4 dims (lengths with odd block tails) of values over many binades, with zero
    and tiny blocks, signed zeros and specials; and two axes (or one) to quantize along."""
    dims = draw(st.integers(1, 3 if leading else 4))
    shape = tuple(draw(st.lists(st.sampled_from([1, 3, 7, 16, 32, 33, 40, 64, 100]), min_size=dims,
                                max_size=dims)))
    while math.prod(shape) > 20000:
        shape = shape[1:]
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((leading, *shape) if leading else shape, generator=generator)
    x = x * 2.0 ** torch.randint(-40, 40, x.shape, generator=generator).float()
    x = x * 2.0 ** draw(st.sampled_from([0, -100, -126, 100]))  # whole tensors near float32's ends
    flat = x.view(-1)
    if draw(st.booleans()):
        flat[: flat.numel() // 2] = 0.0  # blocks of zeros (after a ReLU)
    for index, value in zip(draw(st.lists(st.integers(0, flat.numel() - 1), max_size=4)),
                            [-0.0, math.inf, math.nan, 1e-42], strict=False):
        flat[index] = value
    rank = len(shape)
    axes = tuple(draw(st.lists(st.integers(-rank, rank - 1), min_size=1, max_size=2)))
    return x, axes


@settings(max_examples=60, deadline=None)
@given(case=tensors(), spec=st.sampled_from(SPECS), rounding=st.sampled_from(ROUNDINGS))
def test_quantizing_along_several_axes_at_once_equals_each_axis_in_turn(
        case: tuple[torch.Tensor, tuple[int, ...]], spec: str, rounding: str) -> None:
    x, axes = case
    fmt = get(spec)
    together_draws, apart_draws = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    together = fmt.quantize_along(x, axes, rounding, together_draws)
    apart = each_axis(fmt, x, axes, rounding, apart_draws)
    for a, b in zip(together, apart, strict=True):
        assert_same_bits(a, b)
    # the same draws, as many: the generators leave in the same state
    assert torch.equal(together_draws.get_state(), apart_draws.get_state())


@settings(max_examples=30, deadline=None)
@given(case=tensors(leading=3), spec=st.sampled_from(SPECS), rounding=st.sampled_from(ROUNDINGS))
def test_each_member_quantized_along_several_axes_at_once_equals_each_axis_in_turn(
        case: tuple[torch.Tensor, tuple[int, ...]], spec: str, rounding: str) -> None:
    """Grouped training: axes counted within a member, each member's draws from its own generator."""
    x, axes = case
    fmt = get(spec)

    def generators() -> MemberGenerators:
        return MemberGenerators([torch.Generator().manual_seed(seed) for seed in (1, 2, 3)])

    together = fmt.quantize_members_along(x, axes, rounding, generators())
    members = generators()
    apart = [_with_axis(fmt, axis).quantize_members(x, rounding, members) for axis in axes]
    for a, b in zip(together, apart, strict=True):
        assert_same_bits(a, b)


@settings(max_examples=40, deadline=None)
@given(case=tensors(leading=3),
       spec=st.sampled_from((*SPECS, "nvfp4(axis=0)",
                             "block(fp6_e2m3,size=32,scale=e4m3,tensor_scale=fp32)")),
       rounding=st.sampled_from(ROUNDINGS), spread=st.sampled_from([1.0, 2.0**20]))
def test_each_member_quantized_along_several_axes_equals_the_member_quantized_alone(
        case: tuple[torch.Tensor, tuple[int, ...]], spec: str, rounding: str, spread: float) -> None:
    """Grouped training: each member's values, with members whose magnitudes differ (`spread` between
    the first and the last), are what the member alone gives, its draws from its own generator; NVFP4's
    per-tensor fp32 scale is each member's own (it was the whole group's: found by the end-to-end audit
    of grouped sweeps, every NVFP4 member of a group differed from its run alone)."""
    x, axes = case
    x = x * torch.tensor([1.0, spread**0.5, spread], dtype=x.dtype).reshape(-1, *[1] * (x.dim() - 1))
    fmt = get(spec)
    generators = MemberGenerators([torch.Generator().manual_seed(seed) for seed in (1, 2, 3)])
    together = fmt.quantize_members_along(x, axes, rounding, generators)
    one_axis = _with_axis(fmt, axes[0]).quantize_members(x, rounding, MemberGenerators(
        [torch.Generator().manual_seed(seed) for seed in (1, 2, 3)]))
    for g, seed in enumerate((1, 2, 3)):
        alone_draws = torch.Generator().manual_seed(seed)
        alone = fmt.quantize_along(x[g], axes, rounding, alone_draws)
        for a, b in zip(together, alone, strict=True):
            assert_same_bits(a[g], b)
        assert_same_bits(one_axis[g], alone[0])
        # as many draws as alone: the member's generator leaves in the state the member's alone leaves in
        assert torch.equal(generators.generators[g].get_state(), alone_draws.get_state())


@pytest.mark.parametrize("spec", SPECS)
@settings(max_examples=8, deadline=None)
@given(case=tensors(leading=2), rounding=st.sampled_from(["nearest", "nearest", "stochastic"]))
def test_a_view_inside_its_storage_quantizes_as_its_copy(case: tuple[torch.Tensor, tuple[int, ...]],
                                                         spec: str, rounding: str) -> None:
    """x[1] starts inside its storage: MXINT8's fused path along several axes read the elements of
    x[0] instead (as_strided's offset counts from the storage's start), a wrong value in most blocks."""
    x, axes = case
    fmt = get(spec)
    view = x[1]
    assert view.storage_offset() > 0
    on_view = fmt.quantize_along(view, axes, rounding, torch.Generator().manual_seed(3))
    on_copy = fmt.quantize_along(view.clone(), axes, rounding, torch.Generator().manual_seed(3))
    for a, b in zip(on_view, on_copy, strict=True):
        assert_same_bits(a, b)


def blocks_of_every_exponent(shape: tuple[int, ...]) -> torch.Tensor:
    """Values whose blocks (along any axis) have maxima of every float32 exponent field, elements up
    to 30 binades below, and zeros, -0, inf and NaN."""
    generator = torch.Generator().manual_seed(7)
    count = math.prod(shape)
    field = torch.arange(count) % 255
    top = torch.where(field > 0, 2.0 ** (field - 127).double(), 2.0**-140)
    x = torch.randn(count, generator=generator, dtype=torch.float64).sign() * top
    x = x * 2.0 ** -torch.randint(0, 30, (count,), generator=generator).double()
    x[::13] = 0.0
    x[1::17] = -0.0
    x[2::1019] = math.inf
    x[3::1021] = math.nan
    return x.float().reshape(shape)


@pytest.mark.parametrize("spec", E8M0_SPECS)
@pytest.mark.parametrize(("shape", "axes"), [
    ((100, 256), (-1, -2)),  # a Linear input: along the features, then the batch (100 = 3 x 32 + 4)
    ((256, 40), (-1, 0)),  # a Linear weight: along its input (a tail of 8), then its output
    ((7, 33, 9), (1, 0)),  # a convolution's channels, then its batch, tails on both
    ((3, 50, 31), (-1, -2)),  # a 3-d input: tails along the features and the sequence
    ((130,), (-1, 0)),
])
def test_fused_nearest_path_along_several_axes_equals_the_reference_rounding(
        spec: str, shape: tuple[int, ...], axes: tuple[int, ...]) -> None:
    fmt = get(spec)
    assert isinstance(fmt, BlockFormat)
    x = blocks_of_every_exponent(shape)
    fused = fast_block.quantize_e8m0_nearest_along(fmt, x, axes)
    assert fused is not None  # the path ran
    with reference_only():
        reference = each_axis(fmt, x, axes, "nearest", None)
    for a, b in zip(fused, reference, strict=True):
        assert_same_bits(a, b)


def test_fused_nearest_path_leaves_tensors_larger_than_a_slice_to_each_axis() -> None:
    """Past a cache-sized slice each axis quantizes on its own (in slices), with the same values."""
    fmt = get("mxfp8_e4m3")
    assert isinstance(fmt, BlockFormat)
    x = torch.randn(1024, 1024)
    assert fast_block.quantize_e8m0_nearest_along(fmt, x, (-1, 0)) is None
    for a, b in zip(fmt.quantize_along(x, (-1, 0)), each_axis(fmt, x, (-1, 0), "nearest", None), strict=True):
        assert_same_bits(a, b)


@pytest.mark.parametrize("spec", ["mxfp4", "mxint8"])
@pytest.mark.parametrize(("shape", "axis"), [((3, 100, 256), -1), ((3, 100, 256), -2), ((3, 256, 256), 1)])
def test_blocks_of_zeros_need_no_per_block_range_mask_on_either_path(
        spec: str, shape: tuple[int, ...], axis: int) -> None:
    """A block of zeros (a ReLU's output, its gradient) is rounded by the fused path as any other: it
    sends neither the single-axis path (a group's stacked tensors, larger than a slice) nor the
    several-axes one (a member's alone) to the mask of blocks whose constants leave float32's range,
    and the values equal the reference rounding's."""
    fmt = get(spec)
    assert isinstance(fmt, BlockFormat)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5)).relu_()
    x[:, :40] = 0.0  # whole blocks of zeros along every axis
    member = x[0].clone()
    along, member_axes = _with_axis(fmt, axis), (axis - 1 if axis > 0 else axis,)
    fast_block.quantize_e8m0_nearest(along, x, "nearest")  # the formats' plans, made once
    fast_block.quantize_e8m0_nearest_along(fmt, member, member_axes)
    with AtenCalls() as stacked:
        fused = fast_block.quantize_e8m0_nearest(along, x, "nearest")
    with AtenCalls() as alone:
        fused_alone = fast_block.quantize_e8m0_nearest_along(fmt, member, member_axes)
    assert fused is not None and fused_alone is not None
    assert "aten::any" not in stacked.names and "aten::any" not in alone.names, (stacked.names, alone.names)
    with reference_only():
        assert_same_bits(fused, along.quantize(x))
        assert_same_bits(fused_alone[0], _with_axis(fmt, member_axes[0]).quantize(member))
