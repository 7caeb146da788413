"""Properties every format in the zoo must have, checked with hypothesis over random inputs.

Bit-exactness against reference libraries lives in the per-family test files; these tests check the
contract downstream code relies on: idempotence, monotonicity, outputs on the grid, rounding to a
neighbour within half a step, and stochastic rounding that is unbiased and reproducible.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dse.formats import ZOO, NumberFormat, Scaling, get
from dse.formats.fast.scales import host_tensor_scale

ENUMERABLE = [spec for spec in ZOO if get(spec).bits <= 16]
# Rounding in the value domain (posit/LNS are geometric).
LINEAR_FAMILIES = {"fp", "int", "fixed", "p3109", "block"}


def unscaled(fmt: NumberFormat) -> NumberFormat:
    """The same element grid with no scaling, so properties can be stated on the grid itself."""
    return dataclasses.replace(fmt, scaling=Scaling())  # type: ignore[type-var]


@functools.cache
def grid_values(spec: str) -> torch.Tensor:
    return unscaled(get(spec)).values()


def finite_floats(fmt: NumberFormat) -> st.SearchStrategy[float]:
    """Magnitudes spread over the grid's whole range, a bit beyond it on both sides."""
    low, high = math.log2(fmt.min_positive) - 2, math.log2(fmt.max) + 1
    magnitude = st.floats(min_value=low, max_value=high).map(lambda e: 2.0**e)
    return st.tuples(st.sampled_from([-1.0, 1.0]), magnitude).map(lambda sm: sm[0] * sm[1])


def batch(fmt: NumberFormat) -> st.SearchStrategy[torch.Tensor]:
    return st.lists(finite_floats(fmt), min_size=1, max_size=64).map(
        lambda xs: torch.tensor(xs, dtype=torch.float32))


@pytest.mark.parametrize("spec", ZOO)
def test_every_zoo_spec_round_trips_through_its_canonical_spec(spec: str) -> None:
    fmt = get(spec)
    assert get(fmt.spec) == fmt
    assert fmt.max > fmt.min_positive > 0


@pytest.mark.parametrize("spec", ZOO)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_quantize_is_idempotent(spec: str, data: st.DataObject) -> None:
    fmt = get(spec)
    # Scales that are not powers of two (amax / max, NVFP4's rounded E4M3 block scales) move when the
    # quantized tensor's maxima do: those formats are idempotent on their element grid.
    rescaled = (fmt.scaling.kind in ("tensor", "channel") and not fmt.scaling.pow2
                or getattr(fmt, "scale_grid", None) is not None)
    grid = unscaled(fmt) if rescaled else fmt
    x = data.draw(batch(fmt))
    once = grid.quantize(x)
    assert torch.equal(grid.quantize(once), once)


@pytest.mark.parametrize("spec", ZOO)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_quantize_is_monotone(spec: str, data: st.DataObject) -> None:
    fmt = get(spec)
    x = torch.sort(data.draw(batch(fmt))).values
    for grid in (unscaled(fmt), fmt):
        q = grid.quantize(x.double() if fmt.bits > 24 else x)
        # Values that share a scale keep their order; across MX blocks they need not (a block whose
        # max is larger has a coarser grid: [-1]*31 + [0.5 | 0.5, 8] in mxfp4 gives 0.5 | 0, 8).
        for part in q.split(grid.scaling.block_size if grid.scaling.kind == "block" else q.numel()):
            part = part[~torch.isnan(part)]
            assert torch.all(part[1:] >= part[:-1])


@pytest.mark.parametrize("spec", ENUMERABLE)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_rounds_to_a_neighbour_on_the_grid(spec: str, data: st.DataObject) -> None:
    fmt = unscaled(get(spec))
    values = grid_values(spec)
    x = data.draw(batch(fmt)).double()
    inside = x.abs() <= fmt.max
    x = x[inside]
    q = fmt.quantize(x)
    assert torch.all(torch.isin(q, values)), "quantize produced a value outside values()"
    below = values[(torch.searchsorted(values, x, right=True) - 1).clamp(min=0)]
    above = values[torch.searchsorted(values, x).clamp(max=values.numel() - 1)]
    assert torch.all((q == below) | (q == above))
    if fmt.family in LINEAR_FAMILIES:
        assert torch.all((q - x).abs() <= (above - below) / 2)
    else:  # geometric rounding: nearest in the log domain or on the bit pattern, so within one step
        assert torch.all((q - x).abs() <= (above - below))


@pytest.mark.parametrize("spec", ZOO)
def test_stochastic_rounding_is_reproducible_for_a_seed(spec: str) -> None:
    fmt = get(spec)
    # float64, so that even 32-bit grids have discarded bits to round
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x * min(fmt.max / 8, 4.0)

    def draw(seed: int) -> torch.Tensor:
        return fmt.quantize(x, "stochastic", torch.Generator().manual_seed(seed))

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


@pytest.mark.parametrize("spec", [s for s in ENUMERABLE if get(s).family != "block"])
@pytest.mark.parametrize("position", [0.1, 0.5, 0.77])
def test_stochastic_rounding_is_unbiased(spec: str, position: float) -> None:
    """Between two neighbours a < b the mean of many draws is x (or log x for LNS), within 5 sigma."""
    fmt = unscaled(get(spec))
    values = fmt.values()
    positive = values[values > 0]
    a, b = positive[positive.numel() // 2 - 1], positive[positive.numel() // 2]
    if fmt.family == "lns":
        x_log = torch.log2(a) + position * (torch.log2(b) - torch.log2(a))
        x, target = 2.0**x_log, x_log
    else:
        x = a + position * (b - a)
        target = x
    n = 20000
    q = fmt.quantize(torch.full((n,), float(x), dtype=torch.float64), "stochastic",
                     torch.Generator().manual_seed(3))
    assert torch.all((q == a) | (q == b))
    observed = torch.log2(q).mean() if fmt.family == "lns" else q.mean()
    step = (torch.log2(b) - torch.log2(a)) if fmt.family == "lns" else (b - a)
    sigma = step * math.sqrt(position * (1 - position) / n)
    assert abs(float(observed - target)) <= 5 * float(sigma) + 1e-12 * float(step)


@pytest.mark.parametrize("spec", ENUMERABLE)
def test_toward_zero_never_increases_magnitude(spec: str) -> None:
    fmt = unscaled(get(spec))
    x = torch.linspace(-fmt.max, fmt.max, 5001, dtype=torch.float64)
    if fmt.family == "posit":  # posits never round a non-zero value to zero
        x = x[(x.abs() >= fmt.min_positive) | (x == 0)]
    q = fmt.quantize(x, "toward_zero")
    assert torch.all(q.abs() <= x.abs())
    assert torch.all(torch.isin(q, fmt.values()))


@pytest.mark.parametrize("spec", ENUMERABLE)
def test_encode_decode_are_inverse_on_values(spec: str) -> None:
    fmt = get(spec)
    values = fmt.values()
    assert torch.equal(fmt.decode(fmt.encode(values)), values)
    codes = fmt.encode(values)
    assert codes.dtype == torch.int64
    assert torch.all((codes >= 0) & (codes < 2**fmt.bits))


@pytest.mark.parametrize("spec", ZOO)
@pytest.mark.parametrize("shape", [(0,), (3, 0), (), (2, 3, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_quantize_keeps_shape_and_dtype(spec: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    q = get(spec).quantize(x)
    assert q.shape == x.shape and q.dtype == x.dtype
    assert not torch.isnan(q).any()


# --- the fast paths equal the general ones --------------------------------------------------------

def scale_probes(dtype: torch.dtype) -> list[torch.Tensor]:
    """Tensors whose max|x| covers the per-tensor scale's cases: ordinary, zero, subnormal, tiny and
    huge (ratios that underflow or overflow the dtype for small and large grids), inf and NaN."""
    generator = torch.Generator().manual_seed(11)
    body = torch.randn(300, generator=generator, dtype=torch.float64)
    tiny = torch.finfo(dtype).tiny
    amaxes = [1.0, 0.75, 3.0e-3, 448.0, 1e-30, tiny, tiny * 2.0**-20, 1e30, torch.finfo(dtype).max,
              2.0**-60, 2.0**60]
    probes = [(body / body.abs().max() * a).to(dtype) for a in amaxes]
    probes += [torch.zeros(7, dtype=dtype), torch.tensor([-0.0, 0.0], dtype=dtype)]
    probes += [torch.tensor([1.0, -2.5, special], dtype=dtype) for special in (math.inf, -math.inf, math.nan)]
    return probes


TENSOR_SCALED = ["int8", "int4", "int8(pow2=1)", "fixed(8,20,scale=tensor)",
                 "fixed(16,8,scale=tensor,pow2=1)", "fp8_e4m3(scale=tensor)",
                 "fp8_e4m3(scale=tensor,pow2=1)", "fp8_e5m2(scale=tensor,pow2=1)",
                 "bf16(scale=tensor,pow2=1)", "fp4_e2m1(scale=tensor,pow2=1)", "lns8",
                 "lns(16,gamma=256)", "lns(16,gamma=128)", "lns(12,gamma=8,pow2=1)", "lns(8,pow2=1)",
                 "posit8(scale=tensor)",
                 "posit16(scale=tensor,pow2=1)"]


def same_bits(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal values with the same sign of zero, NaN where NaN."""
    nan = torch.isnan(expected)
    return (torch.equal(torch.isnan(actual), nan)
            and torch.equal(actual[~nan], expected[~nan])
            and torch.equal(torch.signbit(actual[~nan]), torch.signbit(expected[~nan])))


@pytest.mark.parametrize("spec", TENSOR_SCALED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_host_tensor_scale_is_scale_from_amax_bit_for_bit(spec: str, dtype: torch.dtype) -> None:
    """The CPU takes the per-tensor scale on the host; it must be the device formula's value (for a
    float32 scale outside float32's normals, the exact value `float32_scale_values` gives), and
    quantize must equal round_unscaled(x / scale) * scale with that scale (in float64 arithmetic
    rounded to float32 where float32 cannot hold the scale)."""
    fmt = get(spec)
    for x in scale_probes(dtype):
        amax = x.abs().amax()
        device_scale = fmt.scale_from_amax(amax).double()
        exact_scale = fmt.float32_scale_values(amax) if dtype == torch.float32 else device_scale
        outside = dtype == torch.float32 and not 2.0**-126 <= float(exact_scale) < 2.0**128
        if not outside:
            assert torch.equal(exact_scale, device_scale), (spec, float(amax))
        host = torch.tensor(host_tensor_scale(fmt, x), dtype=torch.float64)
        assert torch.equal(host, exact_scale), (spec, dtype, float(amax))
        for rounding in ("nearest", "toward_zero", "pseudo_stochastic"):
            expected = divide_round_multiply(fmt, x, rounding)
            assert same_bits(fmt.quantize(x, rounding), expected), (spec, rounding, float(amax))


def divide_round_multiply(fmt: NumberFormat, x: torch.Tensor, rounding: str) -> torch.Tensor:
    """round_unscaled(x / s) * s for x's per-tensor scale s: in x's dtype, or for a float32 scale
    outside float32's normals (its exact value from `float32_scale_values`) in float64, rounded to
    float32 (exact quotients and products, each rounded once)."""
    amax = x.abs().amax()
    if x.dtype == torch.float32:
        exact_scale = fmt.float32_scale_values(amax)
        if not 2.0**-126 <= float(exact_scale) < 2.0**128:
            quotient = (x.double() / exact_scale).float()
            return (fmt.round_unscaled(quotient, rounding, None).double() * exact_scale).float()
    scale = fmt.scale_from_amax(amax)
    return fmt.round_unscaled(x / scale, rounding, None) * scale


FUSED_POW2 = ["fp8_e4m3", "fp8_e5m2", "fp8_e4m3(overflow=nan)", "fp8_e4m3fnuz", "fp8_e5m2fnuz", "fp6_e3m2",
              "fp6_e2m3", "fp4_e2m1", "fp16", "bf16", "fp(e=3,m=2,subnormals=0)", "fp(e=6,m=9)"]


@pytest.mark.parametrize("spec", FUSED_POW2)
def test_power_of_two_tensor_scale_fused_into_fp_rounding_is_bit_exact(spec: str) -> None:
    """On the CPU a power-of-two tensor scale 2^k is folded into the FP rounding's constants: the
    result must equal dividing by 2^k, rounding and multiplying back, for every k float32 allows
    (the grid's values, ties and neighbours at each scale, subnormal inputs, +-0), and the float64
    path for scales float32 cannot hold."""
    element = get(spec)
    fmt = dataclasses.replace(element, scaling=Scaling(kind="tensor", pow2=True))
    values = element.values()
    low = torch.arange(0, values.numel() - 1, max(values.numel() // 1024, 1))  # 16 bits: a sample
    lower, upper = values[low], values[low + 1]
    edges = torch.tensor([0.0, -0.0, element.min_positive / 3])
    points = torch.cat([lower, upper, (lower + upper) / 2, edges])
    for k in range(-150, 130, 3):
        x = (points * 2.0**k).float()
        x = torch.cat([x, torch.nextafter(x, torch.full_like(x, math.inf)),
                       torch.nextafter(x, torch.full_like(x, -math.inf)),
                       torch.tensor([2.0**-149, -(2.0**-140), 3.0e-39])])
        assert same_bits(fmt.quantize(x), divide_round_multiply(fmt, x, "nearest")), (spec, k)


SLICED = [*ZOO, "fp8_e4m3(scale=tensor,pow2=1)", "int8(pow2=1)", "lns(8,underflow=saturate)",
          "lns(16,gamma=256,scale=none)", "lns(16,gamma=128)", "posit(16,3)", "mxfp8_e4m3(axis=0)",
          "fp(e=3,m=2,subnormals=0)"]


@pytest.mark.parametrize("spec", SLICED)
@pytest.mark.parametrize("rounding", ["nearest", "toward_zero", "pseudo_stochastic"])
def test_small_tensors_take_the_same_rounding_as_sliced_ones(spec: str, rounding: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors within one CPU slice skip the slicing; with slices shrunk to 256 elements per thread
    the same tensor goes through the sliced path: both must agree bit for bit."""
    from dse.formats.fast import slices

    fmt = get(spec)
    generator = torch.Generator().manual_seed(4)
    magnitudes = 2.0 ** torch.randint(-30, 30, (96, 64), generator=generator).double()
    x = torch.randn(96, 64, generator=generator, dtype=torch.float64) * magnitudes
    x[0, :8] = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, -3e38, 2.0**-130])
    for dtype in (torch.float32, torch.float64):
        data = x.to(dtype)
        whole = fmt.quantize(data, rounding)
        with monkeypatch.context() as patch:
            patch.setattr(slices, "CPU_SLICE_ELEMENTS_PER_THREAD", 256)
            sliced = fmt.quantize(data, rounding)
        assert same_bits(whole, sliced), (spec, rounding, dtype)


@pytest.mark.parametrize("spec", ["int8(scale=none)", "fixed(16,8)", "fixed(8,-3)"])
def test_float32_stochastic_rounding_follows_its_31_bit_rule(spec: str) -> None:
    """float32 codes t round up exactly when the draw k (31 bits, from the generator) is below
    floor(frac(|t|) * 2^31), in sign-magnitude: modelled here in float64 (exact for float32 t)."""
    from dse.formats.base import random_bits

    fmt = get(spec)
    generator = torch.Generator().manual_seed(8)
    magnitudes = 2.0 ** torch.randint(-45, 8, (20000,), generator=generator).double()
    x = (torch.randn(20000, generator=generator, dtype=torch.float64) * magnitudes).float()
    t = x.double() * 2.0**fmt.frac_bits
    draws = random_bits(x.shape, x.device, torch.Generator().manual_seed(2)).double()
    floor = t.abs().floor()
    field = ((t.abs() - floor) * 2.0**31).floor()
    code = (floor + (draws < field).double()).copysign(t).clamp(fmt.lowest_code, fmt.highest_code)
    expected = (code * 2.0**-fmt.frac_bits).float()
    actual = fmt.quantize(x, "stochastic", torch.Generator().manual_seed(2))
    assert same_bits(actual, expected)
    assert ((actual.double() - x.double()).abs() > 0).any()  # something was rounded


@pytest.mark.parametrize("spec", ["fp8_e4m3", "int8", "bf16", "mxfp4"])
def test_float32_stochastic_rounding_is_unbiased_and_works_under_autograd(spec: str) -> None:
    fmt = unscaled(get(spec)) if get(spec).family != "block" else get(spec)
    values = unscaled(fmt).values()
    positive = values[values > 0]
    a, b = positive[positive.numel() // 2 - 1], positive[positive.numel() // 2]
    x = float(a + 0.3 * (b - a))
    n = 40000
    data = torch.full((n // 32, 32), x, dtype=torch.float32)
    if fmt.family == "block":  # one block max that fixes the scale at 1
        data[:, 0] = float(positive.max())
    q = fmt.quantize(data, "stochastic", torch.Generator().manual_seed(3))
    body = q[:, 1:] if fmt.family == "block" else q
    assert torch.all((body == a) | (body == b))
    sigma = float(b - a) * math.sqrt(0.3 * 0.7 / body.numel())
    assert abs(float(body.double().mean()) - float(torch.tensor(x, dtype=torch.float32))) <= 5 * sigma
    recorded = fmt.quantize(data.clone().requires_grad_(), "stochastic", torch.Generator().manual_seed(3))
    assert torch.equal(recorded.detach(), q)
