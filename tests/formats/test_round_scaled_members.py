"""`NumberFormat.round_scaled` with one scale per member ((G, 1, ...), the members' per-tensor path
`fast.scales.quantize_members_per_tensor` takes) gives each member what `round_scaled` with its own
0-dim scale gives it alone, bit for bit, whichever rounder `within_max` picks and whichever family
(a family's fused 0-dim path, LNS's scaled lookup, included); and `quantize_members` of a per-tensor
format, which runs that path, gives each member its `quantize` alone."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dse.formats import get
from dse.formats.base import MemberGenerators
from dse.formats.fast import recording
from dse.formats.fast.scales import HOST_SCALE, host_scale_of_amax, quotients_within_max
from dse.formats.fast.slices import whole_tensors

# One or more per family that takes a per-tensor scale: int, fixed, fp, p3109, posit, lns (pow2 or not)
FAMILIES = ("int8", "int4", "int(8,pow2=1)", "fixed(12,4,scale=tensor)", "fp8_e4m3(scale=tensor)",
            "fp8_e5m2(scale=tensor,pow2=1)", "p3109(8,3,scale=tensor)", "posit(8,0,scale=tensor)", "lns8",
            "lns(12,gamma=16,pow2=1)")
ROUNDINGS = ("nearest", "stochastic", "stochastic(5)", "pseudo_stochastic", "toward_zero")
SEEDS = (21, 22, 23, 24, 25)


def same_bits(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return actual.dtype == expected.dtype and actual.shape == expected.shape and bool(
        ((actual == expected) & (torch.signbit(actual) == torch.signbit(expected))
         | torch.isnan(actual) & torch.isnan(expected)).all())


@st.composite
def members(draw: st.DrawFn, within_max: bool) -> torch.Tensor:
    """2-5 members (each 1-3 dims, float32 or float64) of magnitudes up to 2^40 apart, with ties of a
    grid at unit scale; where not `within_max`, some members all zero or holding an inf or a NaN
    (scale 1: quotients unbounded)."""
    count = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.sampled_from([1, 3, 8, 17]), min_size=1, max_size=3)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn((count, *shape), generator=generator, dtype=torch.float64)
    for g in range(count):
        member = x[g].view(-1)
        member *= 2.0 ** draw(st.integers(-20, 20))
        unbounded = [] if within_max else ["zero", "inf", "nan"]
        kind = draw(st.sampled_from(["plain", "plain", "ties", *unbounded]))
        if kind == "ties":
            member[::2] = torch.tensor([0.5, -1.5, 2.5, -0.0])[torch.arange(member[::2].numel()) % 4].double()
        elif kind == "zero":
            member.zero_()
        elif kind == "inf":
            member[draw(st.integers(0, member.numel() - 1))] = math.inf
        elif kind == "nan":
            member[draw(st.integers(0, member.numel() - 1))] = math.nan
    return x.to(dtype)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), spec=st.sampled_from(FAMILIES), rounding=st.sampled_from(ROUNDINGS),
       within_max=st.booleans())
def test_round_scaled_by_member_scales_gives_each_member_its_round_scaled_alone(
        data: st.DataObject, spec: str, rounding: str, within_max: bool) -> None:
    fmt = get(spec)
    x = data.draw(members(within_max))
    amaxes = [float(x[g].abs().amax()) for g in range(x.shape[0])]
    scales = [host_scale_of_amax(fmt, amax, x.dtype) for amax in amaxes]
    if within_max:  # the rounder without the clamp only where the quotients are bounded, as the path
        within_max = all(quotients_within_max(fmt, amax, scale, x.dtype) for amax, scale in
                         zip(amaxes, scales, strict=True))
    scale_t = torch.tensor(scales, dtype=x.dtype).view(-1, *[1] * (x.dim() - 1))
    generators = [torch.Generator().manual_seed(seed) for seed in SEEDS[: x.shape[0]]]
    alone = torch.stack([fmt.round_scaled(x[g].clone(), scale_t[g].reshape(()), rounding, generators[g],
                                          within_max) for g in range(x.shape[0])])
    together_generators = [torch.Generator().manual_seed(seed) for seed in SEEDS[: x.shape[0]]]
    source = MemberGenerators(together_generators)
    with whole_tensors():  # as quantize_members: slices would cut across members' draws
        together = fmt.round_scaled(x.clone(), scale_t, rounding, source, within_max)  # type: ignore[arg-type]
    assert same_bits(together, alone)
    for mine, own in zip(together_generators, generators, strict=True):
        assert torch.equal(mine.get_state(), own.get_state())


@settings(max_examples=150, deadline=None)
@given(data=st.data(), spec=st.sampled_from(FAMILIES), rounding=st.sampled_from(ROUNDINGS),
       bounded=st.booleans())
def test_quantize_members_of_a_per_tensor_format_gives_each_member_its_quantize_alone(
        data: st.DataObject, spec: str, rounding: str, bounded: bool) -> None:
    """The members' path (host scales, `round_scaled` with (G, 1, ...) scales) against `quantize`
    alone (`quantize_per_tensor`: a 0-dim scale, fused where a family can)."""
    fmt = get(spec)
    x = data.draw(members(bounded))
    with recording() as used:
        together = fmt.quantize_members(x, rounding, MemberGenerators(
            [torch.Generator().manual_seed(seed) for seed in SEEDS[: x.shape[0]]]))
    alone = torch.stack([fmt.quantize(x[g], rounding, torch.Generator().manual_seed(SEEDS[g]))
                         for g in range(x.shape[0])])
    assert same_bits(together, alone)
    scales = [host_scale_of_amax(fmt, float(x[g].abs().amax()), x.dtype) for g in range(x.shape[0])]
    if x.dtype == torch.float64 and any(scale != 1.0 for scale in scales):
        assert HOST_SCALE in used  # the members' path ran (not the device's fallback)
