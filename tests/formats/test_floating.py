"""FP(e, m) bit for bit against ml_dtypes, gfloat, MPFR (gmpy2) and an exact rational model.

Probe sets (`probes`) hold every grid value, every tie between adjacent values and one ulp of the
input dtype either side of each, half the smallest subnormal, max plus half a step, beyond max,
+-0, +-inf and NaN. The generic rounding (`round_by_grid`) is checked as well as `round_unscaled`,
which takes torch-cast shortcuts for bf16/fp16/e5m2.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import gmpy2
import ml_dtypes
import numpy as np
import pytest
import torch
from gfloat import RoundMode, round_ndarray
from gfloat.formats import (
    format_info_bfloat16,
    format_info_binary16,
    format_info_ocp_e2m1,
    format_info_ocp_e2m3,
    format_info_ocp_e3m2,
    format_info_ocp_e4m3,
    format_info_ocp_e5m2,
)
from gfloat.types import Domain, FormatInfo

from dse.errors import InputError
from dse.formats import get, round_to_integer
from dse.formats.base import random_bits
from dse.formats.floating import FloatFormat
from dse.train.denormals import flushes_denormals

INF, NAN = math.inf, math.nan

ML_DTYPES = {  # spec -> ml_dtypes type with the same grid and overflow behaviour
    "fp8_e4m3(overflow=nan)": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp8_e4m3fnuz(overflow=nan)": ml_dtypes.float8_e4m3fnuz,
    "fp8_e5m2fnuz(overflow=nan)": ml_dtypes.float8_e5m2fnuz,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
    "fp(e=3,m=4)": ml_dtypes.float8_e3m4,
    "fp(e=4,m=3)": ml_dtypes.float8_e4m3,
    "bf16": ml_dtypes.bfloat16,
    "fp16": np.float16,
}
SMALL = [spec for spec in ML_DTYPES if get(spec).bits <= 8]


def gfloat_info(fmt: FloatFormat) -> FormatInfo:
    """The same format described to gfloat (fnuz: no -0, its code is the NaN)."""
    return FormatInfo(
        fmt.spec, fmt.bits, fmt.man_bits + 1, bias=fmt.bias, is_signed=True,
        domain=Domain.Extended if fmt.special == "ieee" else Domain.Finite,
        has_nz=fmt.special != "fnuz",
        num_high_nans={"ieee": 2**fmt.man_bits - 1, "fn": 1}.get(fmt.special, 0),
        has_subnormals=True, is_twos_complement=False)


@functools.cache
def grid(fmt: FloatFormat) -> torch.Tensor:
    """Every finite grid value, both signs, from the format's own definition (not decode)."""
    m, bias = fmt.man_bits, fmt.bias
    magnitudes = [0.0]
    for biased in range(2**fmt.exp_bits):
        for mantissa in range(2**m):
            if biased == 0:
                value = math.ldexp(mantissa, 1 - bias - m) if fmt.subnormals else 0.0
            else:
                value = math.ldexp(2**m + mantissa, biased - bias - m)
            if value <= fmt.max:
                magnitudes.append(value)
    positive = torch.tensor(sorted(set(magnitudes)), dtype=torch.float64)
    return torch.cat([-positive.flip(0), positive[1:]])


@functools.cache
def probes(fmt: FloatFormat, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    values = grid(fmt)
    ties = (values[1:] + values[:-1]) / 2
    top_step = float(values[-1] - values[-2])
    edges = torch.tensor([fmt.max + top_step / 2, fmt.max + top_step, 2 * fmt.max, 1e30, -1e30,
                          fmt.min_positive / 2, fmt.min_positive / 4, 0.0, -0.0, INF, -INF, NAN],
                         dtype=torch.float64)
    points = torch.cat([values, ties, edges, -edges]).to(dtype)
    inf = torch.full_like(points, INF)
    return torch.cat([points, torch.nextafter(points, inf), torch.nextafter(points, -inf)])


def assert_same(actual: torch.Tensor, expected: torch.Tensor, x: torch.Tensor) -> None:
    """Equal values, NaN where NaN, and the same sign of zero."""
    a, e = actual.double(), expected.double()
    same = (a == e) | (torch.isnan(a) & torch.isnan(e))
    same &= (torch.signbit(a) == torch.signbit(e)) | torch.isnan(e)
    bad = ~same
    assert not bad.any(), (f"{int(bad.sum())} of {x.numel()} differ, e.g. x={x[bad][:4].tolist()} "
                           f"got {a[bad][:4].tolist()} expected {e[bad][:4].tolist()}")


def ml_reference(spec: str, x: torch.Tensor) -> torch.Tensor:
    """ml_dtypes' cast from float32; its FP6/FP4 types have no NaN and give -0 for it: we keep NaN."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = torch.from_numpy(x.numpy().astype(ML_DTYPES[spec]).astype(np.float32))
    return torch.where(torch.isnan(x), NAN, out)


def generic(fmt: FloatFormat, x: torch.Tensor, rounding: str = "nearest",
            generator: torch.Generator | None = None) -> torch.Tensor:
    return fmt.round_by_grid(x, rounding, generator)


# --- specs ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "fields", "max_value", "min_positive"), [
    ("fp32", (8, 23, "ieee", "inf"), 3.4028234663852886e38, 2.0**-149),
    ("bf16", (8, 7, "ieee", "inf"), 3.3895313892515355e38, 2.0**-133),
    ("fp16", (5, 10, "ieee", "inf"), 65504.0, 2.0**-24),
    ("tf32", (8, 10, "ieee", "inf"), (2 - 2.0**-10) * 2.0**127, 2.0**-136),
    ("fp8_e4m3", (4, 3, "fn", "saturate"), 448.0, 2.0**-9),
    ("fp8_e5m2", (5, 2, "ieee", "inf"), 57344.0, 2.0**-16),
    ("fp8_e4m3fnuz", (4, 3, "fnuz", "saturate"), 240.0, 2.0**-10),
    ("fp8_e5m2fnuz", (5, 2, "fnuz", "saturate"), 57344.0, 2.0**-17),
    ("fp6_e3m2", (3, 2, "none", "saturate"), 28.0, 0.0625),
    ("fp6_e2m3", (2, 3, "none", "saturate"), 7.5, 0.125),
    ("fp4_e2m1", (2, 1, "none", "saturate"), 6.0, 0.5),
    ("fp(e=5,m=2)", (5, 2, "ieee", "inf"), 57344.0, 2.0**-16),
])
def test_named_formats(spec: str, fields: tuple, max_value: float, min_positive: float) -> None:
    fmt = get(spec)
    assert (fmt.exp_bits, fmt.man_bits, fmt.special, fmt.overflow) == fields
    assert fmt.family == "fp" and fmt.bits == 1 + fmt.exp_bits + fmt.man_bits
    assert (fmt.max, fmt.min_positive) == (max_value, min_positive)
    assert get(fmt.spec) == fmt and fmt.scaling.kind == "none"


@pytest.mark.parametrize(("spec", "canonical"), [
    ("fp(e=4,m=3,special=fn,overflow=saturate)", "fp8_e4m3"),
    ("fp(e=8,m=7,subnormals=on)", "bf16"),
    ("fp(5,10)", "fp16"),
    ("fp8_e4m3(overflow=nan)", "fp(e=4,m=3,special=fn,overflow=nan)"),
    ("fp8_e5m2(overflow=saturate)", "fp(e=5,m=2,overflow=saturate)"),
    ("fp(e=3,m=3,subnormals=off)", "fp(e=3,m=3,subnormals=0)"),
    ("fp(e=3,m=0,special=none,subnormals=0)", "fp(e=3,m=0,special=none)"),  # m=0 has no subnormals
    ("bf16(scale=channel,axis=1)", "bf16(scale=channel,axis=1)"),
])
def test_canonical_specs(spec: str, canonical: str) -> None:
    assert get(spec).spec == canonical
    assert get(canonical) == get(spec)


@pytest.mark.parametrize(("spec", "message"), [
    ("fp(e=0,m=3)", "e must be in 1..10, got 0"),
    ("fp(e=11,m=3)", "e must be in 1..10"),
    ("fp(e=4,m=53)", "m must be in 0..52"),
    ("fp(e=4)", "fp needs e and m"),
    ("fp(e=4,m=3,special=fn,overflow=inf)", "overflow must be one of saturate, nan for special=fn"),
    ("fp4_e2m1(overflow=nan)", "overflow must be one of saturate for special=none"),
    ("fp(e=1,m=2)", "special=ieee needs e >= 2 and m >= 1"),
    ("fp(e=5,m=0)", "special=ieee needs e >= 2 and m >= 1"),
    ("fp(e=4,m=3,special=ocp)", "special must be one of ieee, fn, fnuz, none"),
])
def test_bad_specs_name_the_spec_and_the_range(spec: str, message: str) -> None:
    with pytest.raises(InputError, match=f"invalid format spec '{re_escape(spec)}': .*{re_escape(message)}"):
        get(spec)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


# --- codes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", list(ML_DTYPES))
def test_decode_every_code_like_ml_dtypes(spec: str) -> None:
    fmt = get(spec)
    codes = np.arange(2**fmt.bits, dtype=np.uint16 if fmt.bits == 16 else np.uint8)
    expected = torch.from_numpy(codes.view(ML_DTYPES[spec]).astype(np.float64))
    actual = fmt.decode(torch.from_numpy(codes.astype(np.int64)))
    assert_same(actual, expected, torch.from_numpy(codes.astype(np.int64)))


@pytest.mark.parametrize("spec", list(ML_DTYPES))
def test_encode_gives_ml_dtypes_bit_patterns(spec: str) -> None:
    fmt = get(spec)
    x = probes(fmt)
    if fmt.special == "none":
        x = x[~torch.isnan(x)]
    width = np.uint16 if fmt.bits == 16 else np.uint8
    with np.errstate(over="ignore", invalid="ignore"):
        expected = x.numpy().astype(ML_DTYPES[spec]).view(width).astype(np.int64)
    actual = fmt.encode(x)
    nan = torch.isnan(fmt.decode(torch.from_numpy(expected)))
    assert torch.equal(actual[~nan], torch.from_numpy(expected)[~nan])
    assert torch.isnan(fmt.decode(actual[nan])).all()


@pytest.mark.parametrize("spec", ["fp8_e4m3", "fp8_e5m2", "fp8_e4m3fnuz", "fp6_e3m2", "fp4_e2m1",
                                  "fp(e=3,m=3,subnormals=0)", "fp(e=2,m=2,special=fn)", "bf16", "fp16"])
def test_encode_and_decode_are_inverse_on_every_code(spec: str) -> None:
    fmt = get(spec)
    codes = torch.arange(2**fmt.bits)
    values = fmt.decode(codes)
    finite = torch.isfinite(values)
    assert torch.equal(torch.unique(values[finite]), grid(fmt))
    real_codes = codes[finite & ((values != 0) | (codes & (2**fmt.man_bits - 1) == 0))]  # not flushed
    assert torch.equal(fmt.encode(fmt.decode(real_codes)), real_codes)
    if fmt.nan_code is not None:
        assert torch.isnan(fmt.decode(torch.tensor([fmt.nan_code]))).all()
        assert fmt.encode(torch.tensor([NAN])).item() == fmt.nan_code


def test_zero_nan_and_inf_codes() -> None:
    assert get("fp8_e4m3").encode(torch.tensor([-0.0, NAN, 1e9])).tolist() == [0x80, 0x7F, 0x7E]
    assert get("fp8_e5m2").encode(torch.tensor([-0.0, NAN, INF, -INF])).tolist() == [0x80, 0x7E, 0x7C, 0xFC]
    assert get("fp8_e4m3fnuz").encode(torch.tensor([-0.0, NAN, -1e-9])).tolist() == [0x00, 0x80, 0x00]
    assert get("fp16").encode(torch.tensor([NAN])).item() == 0x7E00


def test_decode_rejects_codes_outside_the_format() -> None:
    with pytest.raises(ValueError, match=r"fp8_e4m3 codes lie in 0..255"):
        get("fp8_e4m3").decode(torch.tensor([256]))


@pytest.mark.parametrize("spec", ["fp4_e2m1", "fp6_e2m3", "fp6_e3m2"])
def test_encode_of_nan_raises_where_there_is_no_nan_code(spec: str) -> None:
    with pytest.raises(ValueError, match=f"{spec} has no NaN code"):
        get(spec).encode(torch.tensor([1.0, NAN]))


# --- nearest --------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", list(ML_DTYPES))
def test_nearest_matches_ml_dtypes_on_every_tie(spec: str) -> None:
    fmt = get(spec)
    x = probes(fmt)
    expected = ml_reference(spec, x)
    assert_same(fmt.quantize(x), expected, x)
    assert_same(generic(fmt, x), expected, x)


@pytest.mark.parametrize("spec", ["bf16", "fp16", "fp8_e5m2"])
def test_cast_shortcut_equals_generic_rounding_on_random_floats(spec: str) -> None:
    """10^6 float32 inputs: random bit patterns (every binade, subnormals, inf, NaN) and ties."""
    fmt = get(spec)
    generator = torch.Generator().manual_seed(7)
    bits = torch.randint(-(2**31), 2**31 - 1, (500_000,), generator=generator, dtype=torch.int64)
    patterns = bits.to(torch.int32).view(torch.float32)
    scale = fmt.max * torch.rand(500_000, generator=generator)
    ties = generic(fmt, scale)
    ties = ties + (generic(fmt, torch.nextafter(ties, torch.full_like(ties, INF))) - ties) / 2
    x = torch.cat([patterns, ties])
    assert_same(fmt.quantize(x), generic(fmt, x), x)
    assert_same(fmt.quantize(x), ml_reference(spec, x), x)


def test_wide_ieee_formats_match_gfloat_on_a_million_float32_ties() -> None:
    """tf32 (e8m10) has no cast: 10^6 float32 inputs (random, ties, +-1 ulp) against gfloat."""
    fmt = get("tf32")
    generator = torch.Generator().manual_seed(3)
    exponent = torch.randint(-140, 128, (170_000,), generator=generator)
    x = (torch.rand(170_000, generator=generator, dtype=torch.float64) + 1) * 2.0**exponent
    x = x.float()
    midpoint = generic(fmt, x)
    half_step = torch.ldexp(torch.ones_like(x), (torch.frexp(midpoint)[1] - 12).clamp(min=-137))
    x = torch.cat([x, midpoint + half_step, -(midpoint - half_step)])
    x = torch.cat([x, torch.nextafter(x, torch.zeros_like(x))])
    expected = torch.from_numpy(round_ndarray(gfloat_info(fmt), x.double().numpy()))
    assert_same(fmt.quantize(x), expected, x)


def mpfr_round(fmt: FloatFormat, x: torch.Tensor, mode: int) -> torch.Tensor:
    """MPFR with the IEEE-like (e, m) context: the exact reference for IEEE formats."""
    context = gmpy2.context(precision=fmt.man_bits + 1, emax=2 ** (fmt.exp_bits - 1),
                            emin=3 - 2 ** (fmt.exp_bits - 1) - fmt.man_bits, subnormalize=True,
                            round=mode)
    out = []
    with context:
        for value in x.tolist():
            out.append(float(context.check_range(gmpy2.mpfr(value))))
    return torch.tensor(out, dtype=torch.float64)


IEEE_SHAPES = [(e, m) for e in (2, 3, 4, 5) for m in (1, 2, 4)] + [(6, 5), (7, 4), (8, 7), (8, 10)]


@pytest.mark.parametrize(("e", "m"), IEEE_SHAPES)
@pytest.mark.parametrize("rounding", ["nearest", "toward_zero"])
def test_ieee_formats_match_mpfr(e: int, m: int, rounding: str) -> None:
    fmt = get(f"fp(e={e},m={m})")
    mode = gmpy2.RoundToNearest if rounding == "nearest" else gmpy2.RoundToZero
    for dtype in (torch.float32, torch.float64):
        x = probes(fmt, dtype) if fmt.bits <= 12 else sample_probes(fmt, dtype)
        expected = mpfr_round(fmt, x, mode)
        assert_same(fmt.quantize(x, rounding), expected, x)


def sample_probes(fmt: FloatFormat, dtype: torch.dtype) -> torch.Tensor:
    """For formats too big to walk: ties around a few thousand random grid points and the edges."""
    generator = torch.Generator().manual_seed(fmt.bits)
    x = probes(FloatFormat(fmt.exp_bits, 1), dtype)  # the binade edges of the same exponent range
    mags = torch.rand(1000, generator=generator, dtype=torch.float64) + 1
    mags = mags * 2.0 ** torch.randint(fmt.min_normal_exponent - fmt.man_bits - 1, fmt.max_exponent + 2,
                                      (1000,), generator=generator)
    points = fmt.round_by_grid(mags, "nearest", None)
    above = points + torch.ldexp(torch.ones_like(points),
                                 (torch.frexp(points)[1] - 2 - fmt.man_bits).clamp(
                                     min=fmt.min_normal_exponent - fmt.man_bits - 1))
    points = torch.cat([points, above, -above]).to(dtype)
    inf = torch.full_like(points, INF)
    return torch.cat([x, points, torch.nextafter(points, inf), torch.nextafter(points, -inf)])


# --- other rounding modes ---------------------------------------------------------------------------

GFLOAT = [  # (spec, gfloat format, saturate?)
    ("fp8_e4m3", format_info_ocp_e4m3, True),
    ("fp8_e4m3(overflow=nan)", format_info_ocp_e4m3, False),
    ("fp8_e5m2", format_info_ocp_e5m2, False),
    ("fp8_e5m2(overflow=saturate)", format_info_ocp_e5m2, True),
    ("fp6_e3m2", format_info_ocp_e3m2, True),
    ("fp6_e2m3", format_info_ocp_e2m3, True),
    ("fp4_e2m1", format_info_ocp_e2m1, True),
    ("fp8_e4m3fnuz(overflow=nan)", None, False),
    ("fp8_e5m2fnuz", None, True),
    ("bf16", format_info_bfloat16, False),
    ("fp16", format_info_binary16, False),
]


@pytest.mark.parametrize(("spec", "info", "saturate"), GFLOAT)
@pytest.mark.parametrize(("rounding", "mode"), [("nearest", RoundMode.TiesToEven),
                                                ("toward_zero", RoundMode.TowardZero)])
def test_modes_match_gfloat(spec: str, info: FormatInfo | None, saturate: bool, rounding: str,
                            mode: RoundMode) -> None:
    fmt = get(spec)
    info = info or gfloat_info(fmt)
    assert (info.max, info.smallest_subnormal) == (fmt.max, fmt.min_positive)
    for dtype in (torch.float32, torch.float64):
        x = probes(fmt, dtype)
        expected = torch.from_numpy(round_ndarray(info, x.double().numpy(), mode, sat=saturate))
        assert_same(fmt.quantize(x, rounding), expected, x)


@pytest.mark.parametrize(("spec", "info", "saturate"), GFLOAT)
def test_stochastic_matches_gfloat_with_the_same_random_bits(spec: str, info: FormatInfo | None,
                                                              saturate: bool) -> None:
    """Replays quantize's 31-bit integer draws k (float32 input) as gfloat's srbits = 2^31 - 1 - k,
    and its uniform draws u = k / 2^53 (float64 input) as srbits = 2^53 - 1 - k."""
    fmt = get(spec)
    info = info or gfloat_info(fmt)
    x = probes(fmt) if fmt.bits <= 12 else sample_probes(fmt, torch.float32)
    x = x[(x.abs() >= fmt.min_positive / 4) | (x == 0) | ~torch.isfinite(x)]  # fractions on 31 bits
    x = torch.cat([x, torch.randn(20000, generator=torch.Generator().manual_seed(1)) * fmt.max / 3])
    draws = random_bits(x.shape, x.device, torch.Generator().manual_seed(5)).long()
    assert 0 <= int(draws.min()) and int(draws.max()) < 2**31
    expected = round_ndarray(info, x.double().numpy(), RoundMode.Stochastic, sat=saturate,
                             srbits=(2**31 - 1 - draws).numpy(), srnumbits=31)
    actual = fmt.quantize(x, "stochastic", torch.Generator().manual_seed(5))
    assert_same(actual, torch.from_numpy(expected), x)
    wide = x.double()
    uniform = torch.rand(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    k = (uniform * 2.0**53).to(torch.int64)
    assert torch.equal(k.double() * 2.0**-53, uniform)
    expected = round_ndarray(info, wide.numpy(), RoundMode.Stochastic, sat=saturate,
                             srbits=(2**53 - 1 - k).numpy(), srnumbits=53)
    actual = fmt.quantize(wide, "stochastic", torch.Generator().manual_seed(5))
    assert_same(actual, torch.from_numpy(expected), x)


# --- an exact rational model: subnormals off, pseudo-stochastic -----------------------------------

def model_step(fmt: FloatFormat, magnitude: float) -> Fraction:
    """The grid step at a finite non-zero magnitude, from the format's definition."""
    binade = math.frexp(magnitude)[1] - 1
    emin, m = fmt.min_normal_exponent, fmt.man_bits
    if binade >= emin:
        return Fraction(2) ** (binade - m)
    return Fraction(2) ** (emin - m if fmt.subnormals else emin)


def model_policy(fmt: FloatFormat, x: float, rounded: float, rounding: str) -> float:
    """Overflow, sign and zero policy applied to the rounded magnitude of x."""
    if math.isnan(x):
        return NAN
    if rounded > fmt.max:
        if fmt.overflow == "saturate" or (rounding == "toward_zero" and math.isfinite(x)):
            rounded = fmt.max
        elif fmt.overflow == "inf":
            rounded = INF
        else:
            return NAN
    if fmt.special == "fnuz" and rounded == 0:
        return 0.0
    return math.copysign(rounded, x)


def model_round(fmt: FloatFormat, x: float, rounding: str) -> float:
    """Nearest-even or toward-zero in exact rational arithmetic (independent of the implementation)."""
    magnitude = abs(x)
    if magnitude == 0 or not math.isfinite(magnitude):
        return model_policy(fmt, x, magnitude, rounding)
    step = model_step(fmt, magnitude)
    t = Fraction(magnitude) / step
    floor = math.floor(t)
    half = Fraction(1, 2)
    up = rounding == "nearest" and (t - floor > half or (t - floor == half and floor % 2 == 1))
    rounded = (floor + up) * step
    return model_policy(fmt, x, float(rounded) if rounded <= fmt.max else INF, rounding)


MODEL_SPECS = [
    "fp(e=3,m=3,subnormals=0)", "fp(e=4,m=3,special=fn,subnormals=0)",
    "fp(e=2,m=1,special=none,subnormals=0)", "fp(e=5,m=2,subnormals=0,overflow=saturate)",
    "fp(e=4,m=2,special=fnuz,overflow=nan,subnormals=0)", "fp(e=8,m=7,subnormals=0)",
    "fp8_e4m3", "fp8_e4m3fnuz", "fp(e=3,m=0,special=none)", "fp(e=1,m=2,special=none)",
    "fp(e=2,m=0,special=fn)", "fp(e=1,m=1,special=fnuz)",
]


@pytest.mark.parametrize("spec", MODEL_SPECS)
@pytest.mark.parametrize("rounding", ["nearest", "toward_zero"])
def test_matches_the_exact_model(spec: str, rounding: str) -> None:
    fmt = get(spec)
    for dtype in (torch.float32, torch.float64):
        x = probes(fmt, dtype) if fmt.bits <= 12 else sample_probes(fmt, dtype)
        expected = torch.tensor([model_round(fmt, v, rounding) for v in x.tolist()], dtype=torch.float64)
        assert_same(fmt.quantize(x, rounding), expected, x)


@pytest.mark.parametrize("spec", ["fp8_e4m3", "fp8_e5m2", "fp(e=3,m=3,subnormals=0)", "fp4_e2m1", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pseudo_stochastic_rounds_the_exactly_scaled_value(spec: str, dtype: torch.dtype) -> None:
    """NITI's rule (the shared primitive) applied to t = |x| / step computed exactly by the model."""
    fmt = get(spec)
    x = torch.randn(2000, generator=torch.Generator().manual_seed(2), dtype=dtype) * fmt.max / 4
    x = torch.cat([x, probes(fmt, dtype) if fmt.bits <= 12 else sample_probes(fmt, dtype)])
    x = x[(x.abs() >= fmt.min_positive / 4) & torch.isfinite(x)]
    steps = [model_step(fmt, abs(v)) for v in x.tolist()]
    t = [float(Fraction(abs(v)) / step) for v, step in zip(x.tolist(), steps, strict=True)]
    t = torch.tensor(t, dtype=dtype)
    rounded = round_to_integer(t, "pseudo_stochastic").double() * torch.tensor([float(s) for s in steps])
    expected = torch.tensor([model_policy(fmt, v, r, "pseudo_stochastic")
                             for v, r in zip(x.tolist(), rounded.tolist(), strict=True)], dtype=torch.float64)
    assert_same(fmt.quantize(x, "pseudo_stochastic"), expected, x)


# --- overflow and special-value policies -----------------------------------------------------------

@pytest.mark.parametrize(("spec", "inputs", "expected"), [
    ("fp8_e4m3", [448, 464, 465, 480, 1000, INF, -INF, NAN, -1000],
     [448, 448, 448, 448, 448, 448, -448, NAN, -448]),
    ("fp8_e4m3(overflow=nan)", [448, 464, 465, 480, INF, -INF, NAN, -465],
     [448, 448, NAN, NAN, NAN, NAN, NAN, NAN]),
    ("fp8_e5m2", [57344, 61439.99, 61440, 1e9, INF, -61440, NAN],
     [57344, 57344, INF, INF, INF, -INF, NAN]),
    ("fp8_e5m2(overflow=saturate)", [61440, 1e9, INF, -INF, NAN], [57344, 57344, 57344, -57344, NAN]),
    ("fp8_e4m3fnuz", [240, 248, INF, -INF, NAN, -0.0, -1e-9], [240, 240, 240, -240, NAN, 0.0, 0.0]),
    ("fp4_e2m1", [6, 7, 1e30, INF, -INF, NAN, -0.0, -0.2], [6, 6, 6, 6, -6, NAN, -0.0, -0.0]),
    ("fp6_e2m3", [7.5, 7.75, 8, INF, NAN], [7.5, 7.5, 7.5, 7.5, NAN]),
    ("fp16", [65504, 65519.99, 65520, 2.0**-25, 2.0**-25 * 1.0001, -(2.0**-26)],
     [65504, 65504, INF, 0, 2.0**-24, -0.0]),
    ("fp(e=3,m=3,subnormals=0)", [0.125, 0.25, 0.2, 0.125001, -0.1], [0, 0.25, 0.25, 0.25, -0.0]),
])
def test_overflow_and_special_value_policy(spec: str, inputs: list[float], expected: list[float]) -> None:
    x = torch.tensor(inputs, dtype=torch.float64)
    assert_same(get(spec).quantize(x), torch.tensor(expected, dtype=torch.float64), x)


@pytest.mark.parametrize(("spec", "at_infinity"), [("fp8_e5m2", INF), ("fp8_e4m3(overflow=nan)", NAN),
                                                   ("fp8_e4m3", 448.0), ("fp4_e2m1", 6.0)])
def test_toward_zero_saturates_finite_overflow(spec: str, at_infinity: float) -> None:
    fmt = get(spec)
    x = torch.tensor([fmt.max * 1.9, 1e30, -1e30, INF, -INF])
    expected = torch.tensor([fmt.max, fmt.max, -fmt.max, at_infinity, -at_infinity])
    assert_same(fmt.quantize(x, "toward_zero"), expected, x)


def test_stochastic_overflow_follows_the_policy() -> None:
    x = torch.full((4000,), 60000.0)  # between max 57344 and the next binade 65536
    generator = torch.Generator().manual_seed(0)
    ieee = get("fp8_e5m2").quantize(x, "stochastic", generator)
    assert set(ieee.tolist()) == {57344.0, INF}
    saturated = get("fp8_e5m2(overflow=saturate)").quantize(x, "stochastic", generator)
    assert set(saturated.tolist()) == {57344.0}


# --- dtypes, shapes and paths ----------------------------------------------------------------------

def test_quantize_keeps_shape_and_dtype() -> None:
    fmt = get("fp8_e4m3")
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = torch.randn(3, 4, 5).to(dtype)
        q = fmt.quantize(x)
        assert q.shape == x.shape and q.dtype == dtype
        assert torch.equal(q, fmt.quantize(x.float()).to(dtype))


def test_fp32_is_exact_for_float32_and_rounds_float64() -> None:
    fmt = get("fp32")
    x = torch.randint(-(2**31), 2**31 - 1, (100_000,), dtype=torch.int64).to(torch.int32).view(torch.float32)
    assert_same(fmt.quantize(x), x, x)
    wide = torch.randn(100_000, dtype=torch.float64) * 2.0 ** torch.randint(-160, 130, (100_000,))
    assert_same(fmt.quantize(wide), fmt.round_by_grid(wide, "nearest", None), wide)
    assert_same(fmt.quantize(wide), wide.float().double(), wide)


def test_formats_wider_than_float32_compute_in_float64() -> None:
    fmt = get("fp(e=9,m=10)")  # below float32's range: rounds in float64, returns float32
    x = torch.tensor([2.0**-140 * 1.3, 1e-40, 3e38, 1.0 + 2.0**-11, 1.0 + 2.0**-11 + 2.0**-20])
    assert_same(fmt.quantize(x), fmt.quantize(x.double()).float(), x)
    assert fmt.quantize(x)[3].item() == 1.0 and fmt.quantize(x)[4].item() == 1.0 + 2.0**-10
    fine = get("fp(e=5,m=30)")  # finer than float32: in-range float32 values stay as they are
    y = torch.randn(10_000) * 1000
    assert_same(fine.quantize(y), y, y)


def test_large_tensors_round_in_chunks_like_small_ones() -> None:
    fmt = get("fp6_e3m2")
    x = torch.randn(300_001) * 10
    chunked = fmt.quantize(x)
    assert_same(chunked, torch.cat([fmt.quantize(part) for part in x.split(50_000)]), x)


def test_widest_format_is_exact_on_float64() -> None:
    fmt = get("fp(e=10,m=52)")
    assert fmt.bits == 63
    x = torch.randn(10_000, dtype=torch.float64) * 2.0 ** torch.randint(-500, 500, (10_000,))
    assert_same(fmt.quantize(x), x, x)
    assert fmt.quantize(torch.tensor([2.0**513], dtype=torch.float64)).item() == INF
    assert torch.equal(fmt.decode(fmt.encode(x)), x)


def test_relative_precision_and_range() -> None:
    assert get("fp8_e4m3").relative_precision == 0.125
    assert get("bf16").relative_precision == 2.0**-7
    assert get("fp32").relative_precision == 2.0**-23
    assert get("fp8_e4m3").dynamic_range_decades == pytest.approx(math.log10(448 * 2**9))


@pytest.mark.parametrize("spec", ["fp8_e4m3", "fp8_e4m3(overflow=nan)", "fp8_e4m3fnuz",
                                  "fp8_e5m2fnuz(overflow=nan)", "fp8_e5m2(overflow=saturate)", "fp6_e3m2",
                                  "fp6_e2m3", "fp4_e2m1", "tf32", "fp(e=4,m=3)", "fp(e=7,m=4)", "fp(e=2,m=1)",
                                  "fp(e=3,m=0,special=none)", "fp(e=6,m=21)", "fp(e=9,m=10)"])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_nearest_equals_generic_rounding_on_random_floats(spec: str, threads: int) -> None:
    """round_unscaled's fused nearest rounding (magic constant, or the bit pattern for tf32) against
    round_by_grid in float64: random float32 and float64 patterns (every binade, subnormals, inf,
    NaN), grid values, ties and their neighbours, over several CPU chunks."""
    fmt = get(spec)
    generator = torch.Generator().manual_seed(5)
    bits = torch.randint(-(2**31), 2**31 - 1, (400_000,), generator=generator, dtype=torch.int64)
    wide = torch.randint(-(2**63), 2**63 - 1, (200_000,), generator=generator, dtype=torch.int64)
    ties = generic(fmt, fmt.max * torch.rand(200_000, generator=generator, dtype=torch.float64) *
                   2.0 ** -torch.randint(0, 40, (200_000,), generator=generator).double())
    ties = ties + (generic(fmt, torch.nextafter(ties, torch.full_like(ties, INF))) - ties) / 2
    edges = probes(fmt, torch.float64) if fmt.bits <= 12 else sample_probes(fmt, torch.float64)
    ties = torch.cat([ties, -ties, edges])
    ties = torch.cat([ties, torch.nextafter(ties, torch.full_like(ties, INF)),
                      torch.nextafter(ties, torch.full_like(ties, -INF))])
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for x in (torch.cat([bits.to(torch.int32).view(torch.float32), ties.float()]),
                  torch.cat([wide.view(torch.float64), ties])):
            assert_same(fmt.round_unscaled(x, "nearest", None), generic(fmt, x.double()).to(x.dtype), x)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("spec", ["fp8_e4m3", "tf32"])
def test_input_that_autograd_records_gets_the_same_values(spec: str) -> None:
    fmt = get(spec)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 100
    recorded = fmt.quantize(x.clone().requires_grad_())
    assert recorded.requires_grad and torch.equal(recorded.detach(), fmt.quantize(x))


@pytest.mark.parametrize("spec", ["fp16(scale=tensor,pow2=1)", "fp8_e5m2(scale=tensor,pow2=1)",
                                  "fp8_e4m3(scale=tensor,pow2=1)"])
def test_tensor_scaled_rounding_is_the_same_with_denormals_flushed(spec: str) -> None:
    """Training flushes float32 denormals (torch.set_flush_denormal): a fused kernel whose constants
    fall below float32's normals would then multiply by zero. Over every power-of-two scale the
    format reaches, the result must not depend on the flush."""
    fmt = get(spec)
    base = torch.linspace(-1.0, 1.0, 101)
    previous = flushes_denormals()  # (set_flush_denormal returns support, not state)
    torch.set_flush_denormal(False)
    try:
        for exponent in range(-40, 41):
            x = base * 2.0**exponent
            reference = fmt.quantize(x, "nearest")
            torch.set_flush_denormal(True)
            flushed = fmt.quantize(x, "nearest")
            torch.set_flush_denormal(False)
            assert torch.equal(flushed, reference), f"max|x| = 2^{exponent}"
    finally:
        torch.set_flush_denormal(previous)
