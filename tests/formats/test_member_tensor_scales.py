"""A stack of members quantized at once by a two-level-scaled block format (NVFP4: an fp32 tensor
scale over E4M3 block scales) gives each member what it gives alone, bit for bit: each member's own
tensor scale (from its own max|x|, by the same arithmetic), its own blocks, and its stochastic draws
from its own generator in the order alone draws them (the generators leave in the same state).
Alone is the rule: `quantize` of x[g] on its own, along each axis in turn."""

from __future__ import annotations

import contextlib
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dse.formats import get
from dse.formats.base import MemberGenerators, _with_axis
from dse.formats.block import BlockFormat
from dse.formats.fast import device_path, recording, reference_only
from dse.formats.fast.block import SCALE_GRID_SLICES
from dse.train.denormals import flushes_denormals

TWO_LEVEL = ("nvfp4", "nvfp4(axis=0)", "block(fp6_e2m3,size=32,scale=e4m3,tensor_scale=fp32)",
             "block(int4,size=16,scale=e4m3,tensor_scale=fp32)",
             "block(fp4_e2m1,size=16,scale=ue5m3,tensor_scale=fp32)",
             # every element family the spec parser takes, the other narrow scale grids, blocks of one
             "block(posit(8,1),size=16,scale=e4m3,tensor_scale=fp32)",
             "block(lns8,size=16,scale=ue4m3,tensor_scale=fp32)",
             "block(p3109(8,3),size=8,scale=e4m3,tensor_scale=fp32)",
             "block(fixed(8,6),size=16,scale=bf16,tensor_scale=fp32)",
             "block(fp8_e5m2,size=4,scale=fp16,tensor_scale=fp32)", "nvfp4(size=1)")
ROUNDINGS = ("nearest", "stochastic", "stochastic(5)", "pseudo_stochastic", "toward_zero")
SEEDS = (11, 12, 13, 14, 15)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    same = ((actual == expected) & (torch.signbit(actual) == torch.signbit(expected))
            | torch.isnan(actual) & torch.isnan(expected))
    assert bool(same.all()), f"{int((~same).sum())} of {actual.numel()} differ"


def member_contents(draw: st.DrawFn, members: int, shape: tuple[int, ...], dtype: torch.dtype
                    ) -> torch.Tensor:
    """Members of different magnitudes (a factor up to 2^60 apart, some near float32's ends, where
    the tensor scale is clamped), some all zero, some holding inf or NaN, with -0 and ties."""
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn((members, *shape), generator=generator, dtype=torch.float64)
    x = x * 2.0 ** torch.randint(-12, 12, x.shape, generator=generator).double()
    for g in range(members):
        member = x[g].view(-1)
        kind = draw(st.sampled_from(["plain", "plain", "zero", "inf", "nan", "tiny", "huge", "ties"]))
        member *= 2.0 ** draw(st.integers(-30, 30))
        if kind == "zero":
            member.zero_()
        elif kind == "inf":
            member[draw(st.integers(0, member.numel() - 1))] = -math.inf
        elif kind == "nan":
            member[draw(st.integers(0, member.numel() - 1))] = math.nan
        elif kind == "tiny":  # max|x| below 2^-108.6: NVFP4's float32 tensor scale is clamped
            member *= 2.0**-125
        elif kind == "huge":
            member *= 2.0**110
        elif kind == "ties":  # element ties at unit scale: halves of the FP4 grid times 6
            member.copy_(torch.tensor([6.0, 0.25, 0.75, -1.25, 2.5, -5.0, 0.0, -0.0]).repeat(
                member.numel() // 8 + 1)[: member.numel()].double())
    return x.to(dtype)


@st.composite
def stacks(draw: st.DrawFn) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A stack of 1-5 members of 0-3 dims (odd lengths: blocks with short tails), float32 or float64,
    sometimes a view that starts inside its storage; and one or two axes within a member."""
    members = draw(st.integers(1, 5))
    dims = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(st.sampled_from([1, 3, 7, 16, 17, 33, 40]), min_size=dims, max_size=dims)))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64]))
    x = member_contents(draw, members + 1, shape, dtype)
    x = x[1:] if draw(st.booleans()) else x[:members].clone()  # x[1:] starts inside its storage
    axes = (0,) if dims == 0 else tuple(draw(st.lists(st.integers(-dims, dims - 1), min_size=1, max_size=2)))
    return x, axes


def alone(spec: str, x: torch.Tensor, axes: tuple[int, ...], rounding: str
          ) -> tuple[list[torch.Tensor], list[torch.Generator]]:
    """Each member quantized on its own along each axis in turn, from its own generator."""
    fmt = get(spec)
    generators = [torch.Generator().manual_seed(seed) for seed in SEEDS[: x.shape[0]]]
    per_member = [[_with_axis(fmt, axis).quantize(x[g], rounding, generators[g]) if x.dim() > 1
                   else fmt.quantize(x[g], rounding, generators[g]) for axis in axes]
                  for g in range(x.shape[0])]
    return [torch.stack(parts) for parts in zip(*per_member, strict=True)], generators


def together(spec: str, x: torch.Tensor, axes: tuple[int, ...], rounding: str
             ) -> tuple[list[torch.Tensor], list[torch.Generator]]:
    fmt = get(spec)
    generators = MemberGenerators([torch.Generator().manual_seed(seed) for seed in SEEDS[: x.shape[0]]])
    if len(axes) == 1 and x.dim() > 1:
        out = [_with_axis(fmt, axes[0]).quantize_members(x, rounding, generators)]
    else:
        out = fmt.quantize_members_along(x, axes, rounding, generators)
    return out, [g for g in generators.generators if g is not None]


@settings(max_examples=150, deadline=None)
@given(case=stacks(), spec=st.sampled_from(TWO_LEVEL), rounding=st.sampled_from(ROUNDINGS),
       path=st.sampled_from(["fast", "reference", "device"]), flush=st.booleans())
def test_a_stack_of_members_quantizes_each_member_as_alone(
        case: tuple[torch.Tensor, tuple[int, ...]], spec: str, rounding: str, path: str, flush: bool) -> None:
    """Alone on the CPU's fast path; together on it, on the reference and on the device path (a GPU's,
    on CPU tensors), with denormals flushed or not (training flushes them)."""
    x, axes = case
    flushing = flushes_denormals()  # the caller's setting, put back after
    threads = torch.get_num_threads()
    # One thread: torch.set_flush_denormal sets the calling thread only, so at 2 threads a worker of
    # torch's pool could keep subnormals (a member's element then came out otherwise than alone);
    # training flushes every thread of its team (dse/train/denormals.py), this test the caller only
    torch.set_num_threads(1)
    torch.set_flush_denormal(flush)
    try:
        expected, alone_generators = alone(spec, x, axes, rounding)
        with recording() as used:
            with reference_only() if path == "reference" else device_path() if path == "device" \
                    else contextlib.nullcontext():
                actual, generators = together(spec, x, axes, rounding)
    finally:
        torch.set_flush_denormal(flushing)
        torch.set_num_threads(threads)
    assert (SCALE_GRID_SLICES in used) == (path != "reference")  # (whole tensors on a device)
    for a, b in zip(actual, expected, strict=True):
        assert_same_bits(a, b)
    for g, (mine, own) in enumerate(zip(generators, alone_generators, strict=True)):
        assert torch.equal(mine.get_state(), own.get_state()), f"member {g} drew another number of values"


def test_each_member_has_its_own_tensor_scale_in_the_one_pass() -> None:
    """Fails where the stack shares one tensor scale (the bug fixed before, which gave every member of
    a group the group's s_t): a member 2^20 below the other rounds onto a coarser grid then."""
    fmt = get("nvfp4")
    assert isinstance(fmt, BlockFormat)
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))
    x[1] *= 2.0**-20
    out = fmt.quantize_members(x)
    assert torch.equal(out[1], fmt.quantize(x[1]))
    assert not torch.equal(out[1], fmt.quantize(x)[1])  # the group's s_t differs for this member


def test_scalar_members_are_blocks_of_one_whatever_the_block_axis() -> None:
    """A stack of scalars (G,) quantized per member: each member is a block of one, as alone; a block
    format along axis 0 blocked them across the members (the largest member's scale for all)."""
    x = torch.tensor([1000.0, 0.3, 0.001, -7.0])
    for spec in ("mxint8(axis=0)", "int8(scale=block,block=8,axis=0)", "nvfp4(axis=0)", "mxfp4"):
        fmt = get(spec)
        together = fmt.quantize_members(x)
        along = fmt.quantize_members_along(x, (0,))[0]
        for g in range(x.shape[0]):
            assert_same_bits(together[g], fmt.quantize(x[g]))
            assert_same_bits(along[g], fmt.quantize(x[g]))
