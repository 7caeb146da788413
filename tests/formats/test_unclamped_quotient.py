"""The fixed-point family leaves out its clamp to the code range exactly where the clamp cannot act:
a per-tensor (or per-member) scale taken on the host from a finite max|x|, a normal of x's dtype,
and nearest or toward-zero rounding, with codes below 2^(p-2) (p: the dtype's significand bits).
Skipping gives the clamp's bits over the code spaces and adversarial inputs (values at max|x|, ties,
the largest float below a rounding boundary, scales at the bottom of float32's normals); where the
clamp acts (stochastic rounding, an inf in the tensor, a flushed scale, codes too wide for the
dtype, MX blocks' power-of-two scales) it stays, and these tests fail if it were skipped there."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dse.formats import get
from dse.formats.base import MemberGenerators, significand_digits
from dse.formats.fast import device_path, recording, reference_only
from dse.formats.fast.scales import UNCLAMPED_QUOTIENT, host_scale_of_amax
from dse.formats.fixed import FixedPoint
from dse.train.denormals import flushes_denormals

SKIPPED = ("int8", "int4", "int(2)", "int(16)", "int(23)", "int(8,symmetric=0)", "int(8,pow2=1)",
           "fixed(12,4,scale=tensor)", "fixed(6,-3,scale=tensor)")
DTYPES = (torch.float32, torch.float64)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    same = ((actual == expected) & (torch.signbit(actual) == torch.signbit(expected))
            | torch.isnan(actual) & torch.isnan(expected))
    assert bool(same.all()), f"{int((~same).sum())} of {actual.numel()} differ, e.g. {actual[~same][:3]} " \
                             f"against {expected[~same][:3]}"


def fixed(spec: str) -> FixedPoint:
    fmt = get(spec)
    assert isinstance(fmt, FixedPoint)
    return fmt


def codes_of(fmt: FixedPoint, limit: int = 1 << 17) -> torch.Tensor:
    """Every code of the format (float64), or the lowest and highest `limit` / 2 of a wide one and
    random ones between."""
    low, high = fmt.lowest_code, fmt.highest_code
    if high - low < limit:
        return torch.arange(low, high + 1, dtype=torch.float64)
    half = limit // 2
    middle = torch.randint(low, high, (half,), generator=torch.Generator().manual_seed(1), dtype=torch.int64)
    top = torch.arange(high - half + 1, high + 1)
    return torch.cat([torch.arange(low, low + half), middle, top]).double()


def adversarial(fmt: FixedPoint, amax: float, dtype: torch.dtype) -> torch.Tensor:
    """x with max|x| = amax exactly: every code, every tie between neighbours and the dtype's
    neighbours of each (the largest float below a rounding boundary), times x's scale, and +-amax."""
    scale = host_scale_of_amax(fmt, amax, dtype)
    codes = codes_of(fmt)
    points = torch.cat([codes, codes[:-1] + 0.5]) * 2.0**-fmt.frac_bits * scale
    points = points.to(dtype)
    points = torch.cat([points, torch.nextafter(points, torch.zeros_like(points)),
                        torch.nextafter(points, torch.full_like(points, math.inf)),
                        torch.tensor([amax, -amax], dtype=dtype)])
    return points[points.abs() <= amax]


def amaxes(fmt: FixedPoint, dtype: torch.dtype) -> list[float]:
    """max|x| of moderate size, with a scale at float32's smallest normals and just above, and at
    float64's, and mantissas that round the ratio max|x| / max either way."""
    top = fmt.max
    normal = torch.finfo(dtype).tiny
    values = [1.0, 3.0, 0.7 * top, top, top * (1 + 2.0**-20), 2.0**100, 1.0 - 2.0**-24]
    values += [top * normal * m for m in (1.0, 1.0 + 2.0**-23, 1.5, 1.9999999)]
    return [float(torch.tensor(v, dtype=dtype)) for v in values]


def unclamped_and_clamped(fmt: FixedPoint, x: torch.Tensor, rounding: str
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes of x / s rounded without and with the clamp (s the host scale of x)."""
    scale = host_scale_of_amax(fmt, float(x.abs().max()), x.dtype)
    quotient = x / torch.scalar_tensor(scale, dtype=x.dtype)
    return (fmt._round_onto_grid(quotient.clone(), rounding, torch.Generator().manual_seed(2), True, False),
            fmt._round_onto_grid(quotient.clone(), rounding, torch.Generator().manual_seed(2), True, True))


@pytest.mark.parametrize("spec", SKIPPED)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rounding", ["nearest", "toward_zero"])
def test_skipping_the_clamp_gives_the_clamped_bits_where_it_cannot_act(
        spec: str, dtype: torch.dtype, rounding: str) -> None:
    fmt = fixed(spec)
    assert fmt.clamp_cannot_act_within_max(rounding, dtype)
    for amax in amaxes(fmt, dtype):
        x = adversarial(fmt, amax, dtype)
        unclamped, clamped = unclamped_and_clamped(fmt, x, rounding)
        assert_same_bits(unclamped, clamped)
        with recording() as used:
            skipped = fmt.quantize(x, rounding)
        # (a scale of 1 skips the division and the product, and keeps the clamp)
        assert (UNCLAMPED_QUOTIENT in used) == (host_scale_of_amax(fmt, amax, dtype) != 1.0), amax
        with reference_only():
            reference = fmt.quantize(x, rounding)
        assert_same_bits(skipped, reference)


@pytest.mark.parametrize("spec", ["int8", "int(23)", "fixed(12,4,scale=tensor)"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_members_skip_the_clamp_as_alone_does(spec: str, dtype: torch.dtype) -> None:
    fmt = fixed(spec)
    x = adversarial(fmt, fmt.max * 0.37, dtype)
    stack = torch.stack([x, x * 2.0**-60, -x * 3.0])
    with recording() as used:
        together = fmt.quantize_members(stack, "nearest", MemberGenerators([None, None, None]))
    assert UNCLAMPED_QUOTIENT in used
    for g in range(3):
        with reference_only():
            assert_same_bits(together[g], fmt.quantize(stack[g]))


@settings(max_examples=60, deadline=None)
@given(spec=st.sampled_from(SKIPPED), dtype=st.sampled_from(DTYPES),
       rounding=st.sampled_from(["nearest", "toward_zero", "stochastic", "pseudo_stochastic"]),
       exponent=st.integers(-140, 120), seed=st.integers(0, 2**31 - 1), members=st.integers(1, 4))
def test_quantize_equals_the_clamping_reference_on_any_tensor(
        spec: str, dtype: torch.dtype, rounding: str, exponent: int, seed: int, members: int) -> None:
    fmt = fixed(spec)
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(members, 257, generator=generator, dtype=torch.float64) * 2.0**exponent).to(dtype)
    x[:, 0] = x[:, 1:].abs().amax(dim=1)  # one value at max|x| per member (negated below for some)
    x[::2, 0] *= -1
    draws = [torch.Generator().manual_seed(g) for g in range(members)]
    together = fmt.quantize_members(x, rounding, MemberGenerators(draws))
    for g in range(members):
        with reference_only():
            alone = fmt.quantize(x[g], rounding, torch.Generator().manual_seed(g))
        assert_same_bits(together[g], alone)
    with reference_only():
        expected = fmt.quantize(x[0], rounding, torch.Generator().manual_seed(5))
    assert_same_bits(fmt.quantize(x[0], rounding, torch.Generator().manual_seed(5)), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_rule_for_code_widths_is_tight(dtype: torch.dtype) -> None:
    """For every width n, the largest quotient within max (1 + u) / (1 - u) rounds to at most H =
    2^(n-1) - 1 exactly where the rule says the clamp cannot act; at the first width the rule refuses
    (24 bits in float32) it rounds past H: the rule is not loose by a width."""
    u = 2.0 ** -significand_digits(dtype)
    refused = []
    for bits in range(2, 33):
        fmt = fixed(f"int({bits})")
        bound = fmt.max * (1 + u) / (1 - u)  # float64 arithmetic: within 2^-52 of the real bound
        largest = torch.tensor(bound, dtype=dtype)
        if float(largest) > bound:
            largest = torch.nextafter(largest, torch.tensor(0.0, dtype=dtype))
        rounds_past = float(torch.round(largest)) > fmt.highest_code
        if fmt.clamp_cannot_act_within_max("nearest", dtype):
            assert not rounds_past, bits
        else:
            refused.append((bits, rounds_past))
    if dtype == torch.float32:
        assert refused[0] == (24, True)
    else:
        assert refused == []


def test_the_clamp_stays_where_it_can_act() -> None:
    """Each case has inputs on which the clamp changes the result; quantize gives the clamped result
    there and does not take the unclamped path."""
    int8 = fixed("int8")
    # Stochastic rounding: a quotient at max|x| just above 127 rounds up to 128 for some draws.
    amax = next(a for a in (float(torch.tensor(1000.0 + k * 2.0**-13)) for k in range(1, 4000))
                if float(torch.tensor(a) / torch.tensor(host_scale_of_amax(int8, a, torch.float32))) > 127)
    x = torch.full((1 << 20,), amax, dtype=torch.float32)  # up with probability 2^-17 each
    unclamped, clamped = unclamped_and_clamped(int8, x, "stochastic")
    assert not torch.equal(unclamped, clamped)
    # A tensor holding inf: its scale is 1 and inf saturates at the top code.
    x_inf = torch.tensor([1.0, -math.inf, 0.5])
    # A float64 max|x| whose ratio to max is subnormal: the scale is rounded far from max|x| / max.
    tiny = 178 * 2.0**-1074
    x_tiny = torch.tensor([tiny, -tiny / 2], dtype=torch.float64)
    assert host_scale_of_amax(int8, tiny, torch.float64) == 2.0**-1074
    # Codes too wide for float32 (24 bits): the quotient at max|x| rounds to H + 1.
    int24 = fixed("int(24)")
    wide = 796934335889408.0  # a float32 (found by a random search): its quotient is H + 1/2
    assert _rounds_past(int24, wide)
    x_wide = torch.tensor([wide, 1.0], dtype=torch.float32)
    cases = [(int8, x, "stochastic"), (int8, x_inf, "nearest"), (int8, x_tiny, "nearest"),
             (int24, x_wide, "nearest")]
    for fmt, values, rounding in cases:
        with recording() as used:
            out = fmt.quantize(values, rounding, torch.Generator().manual_seed(2))
        assert UNCLAMPED_QUOTIENT not in used
        with reference_only():
            assert_same_bits(out, fmt.quantize(values, rounding, torch.Generator().manual_seed(2)))
        with recording() as used:
            members = fmt.quantize_members(values.reshape(1, -1), rounding,
                                           MemberGenerators([torch.Generator().manual_seed(2)]))
        assert UNCLAMPED_QUOTIENT not in used
        assert_same_bits(members[0], out)
    assert float(int8.quantize(x_inf)[1]) == -127.0  # clamped: -inf would stay -inf unclamped
    assert float(int8.quantize(x_tiny)[0]) == 127 * 2.0**-1074  # clamped from 178 * 2^-1074
    assert float(int24.quantize(x_wide)[0]) <= int24.highest_code * float(
        torch.tensor(host_scale_of_amax(int24, wide, torch.float32), dtype=torch.float32)) * (1 + 2.0**-23)


def _rounds_past(fmt: FixedPoint, amax: float) -> bool:
    x = torch.tensor([amax], dtype=torch.float32)
    unclamped, clamped = unclamped_and_clamped(fmt, x, "nearest")
    return not torch.equal(unclamped, clamped)


def test_mx_integer_elements_keep_the_clamp() -> None:
    """MXINT8's power-of-two block scale 2^floor(log2 max|v|) leaves quotients up to 2 * 64: a block
    whose max is 1.999 * 2^k rounds to the code 128 and the clamp takes it to 127 (and the E8M0 path
    never asks the fixed-point element to skip it)."""
    fmt = get("mxint8")
    x = torch.tensor([[1.999] + [0.5] * 31]) * 2.0**5
    with recording() as used:
        fused = fmt.quantize(x)
    with reference_only(), recording() as used_by_reference:
        reference = fmt.quantize(x)
    assert UNCLAMPED_QUOTIENT not in used | used_by_reference
    assert float(fused[0, 0]) == float(reference[0, 0]) == 127 / 64 * 2.0**5


def test_a_ratio_past_float64s_max_keeps_the_clamp() -> None:
    """A float64 max|x| whose ratio to a max below 1 overflows: with pow2 the scale is the 1 that
    stands for it (alone and in the reference), so the quotients reach max|x| and the clamp acts.
    A member with such a max|x| beside members with ordinary scales saturated alone but came out
    inf (its quotient 5e300 * 2^49 unclamped) when the stack skipped the clamp."""
    fmt = fixed("fixed(24,49,scale=tensor,pow2=1)")
    amax = 5e300
    assert amax / fmt.max == math.inf and host_scale_of_amax(fmt, amax, torch.float64) == 1.0
    stack = torch.tensor([[amax, -1.0], [1.0, 0.5]], dtype=torch.float64)
    with recording() as used:
        together = fmt.quantize_members(stack, "nearest")
    assert UNCLAMPED_QUOTIENT not in used
    for g in range(2):
        with reference_only():
            assert_same_bits(together[g], fmt.quantize(stack[g]))
    assert float(together[0, 0]) == fmt.max


@pytest.mark.parametrize("spec", ["fixed(24,49,scale=tensor)", "fixed(24,49,scale=tensor,pow2=1)"])
def test_a_ratio_past_float64s_max_saturates_on_every_path(spec: str) -> None:
    """Finite inputs whose ratio max|x| / max overflows float64 saturate at the grid's ends, with or
    without pow2, alone (host scale, reference, device path) and as a member: without pow2 the scale
    was that inf ratio, and x / inf * inf made every element NaN, 1.0 and 0.5 included."""
    fmt = fixed(spec)
    x = torch.tensor([5e300, -5e300, 1.0, 0.5], dtype=torch.float64)
    assert x[0] / fmt.max == math.inf
    with reference_only():
        reference = fmt.quantize(x)
    with device_path():
        on_device = fmt.quantize(x)
    stack = torch.stack([x, x / 2**60])
    results = {"alone": fmt.quantize(x), "device": on_device, "member": fmt.quantize_members(stack)[0]}
    for result in (reference, *results.values()):
        assert result.tolist() == [fmt.max, fmt.lowest_code * fmt.min_positive, fmt.max, fmt.max]
    for result in results.values():
        assert_same_bits(result, reference)


@st.composite
def fixed_point_specs(draw: st.DrawFn) -> str:
    """Any tensor-scaled fixed-point spec the parser takes: int(n) and fixed(n, frac), 2..32 bits, frac
    in -64..64, either range (symmetric or the two's-complement -H-1), with or without pow2."""
    bits = draw(st.integers(2, 32))
    symmetric, pow2 = draw(st.integers(0, 1)), draw(st.integers(0, 1))
    if draw(st.booleans()):
        return f"int({bits},symmetric={symmetric},pow2={pow2})"
    return f"fixed({bits},{draw(st.integers(-64, 64))},scale=tensor,symmetric={symmetric},pow2={pow2})"


@settings(max_examples=200, deadline=None)
@given(spec=fixed_point_specs(), dtype=st.sampled_from(DTYPES),
       rounding=st.sampled_from(["nearest", "toward_zero"]), flush=st.booleans(),
       magnitude=st.sampled_from(["ordinary", "smallest normals", "largest", "subnormal"]),
       exponent=st.floats(0, 1), seed=st.integers(0, 2**31 - 1), members=st.integers(0, 4))
def test_any_fixed_point_spec_equals_the_clamping_reference(
        spec: str, dtype: torch.dtype, rounding: str, flush: bool, magnitude: str, exponent: float, seed: int,
        members: int) -> None:
    """Quantize (members = 0) or quantize_members gives the clamping reference's bits, alone, for
    every configuration the parser takes, max|x| anywhere in the dtype's range (its largest values
    over a max below 1 overflow the ratio; the members' maxima apart), with denormals flushed or not
    (training flushes them)."""
    fmt = fixed(spec)
    info = torch.finfo(dtype)
    amax = {"ordinary": 2.0 ** (40 * exponent - 20),
            "smallest normals": info.tiny * 2.0 ** (30 * exponent),
            "largest": info.max * 2.0 ** (-30 * exponent),
            "subnormal": info.tiny * 2.0 ** (-20 * exponent - 1)}[magnitude]
    amax = float(torch.tensor(amax, dtype=torch.float64).to(dtype))
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(-fmt.highest_code, fmt.highest_code + 1, (max(members, 1), 64), generator=generator)
    halves = torch.randint(-1, 2, codes.shape, generator=generator) * 0.5  # ties between codes
    x = ((codes.double() + halves) / fmt.highest_code * amax).clamp(-amax, amax).to(dtype)
    x[:, 0] = amax
    x = torch.cat([x, torch.nextafter(x, torch.zeros_like(x))], dim=1)
    x[1:] *= 2.0 ** -torch.randint(0, 200, (x.shape[0] - 1, 1), generator=generator).to(dtype)  # own scales
    flushing, threads = flushes_denormals(), torch.get_num_threads()
    torch.set_num_threads(1)  # (as training: test_member_tensor_scales says why)
    torch.set_flush_denormal(flush)
    try:
        actual = fmt.quantize(x[0], rounding) if members == 0 else fmt.quantize_members(x, rounding)
        with reference_only():
            expected = torch.stack([fmt.quantize(member, rounding) for member in x])
    finally:
        torch.set_flush_denormal(flushing)
        torch.set_num_threads(threads)
    assert_same_bits(actual, expected[0] if members == 0 else expected)
