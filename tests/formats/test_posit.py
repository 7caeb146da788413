"""Posit(n, es) against the 2022 Posit Standard, bit for bit, over whole code spaces and every tie.

References:
- `standard_value` below decodes a pattern from its bit string as the standard defines it (exact in
  float64 up to 33 bits). Round-to-nearest-even on the pattern then means: the tie between the
  neighbouring n-bit posits c and c+1 is the (n+1)-bit posit 2c+1, and a tie goes to the even code.
- softposit: pX2 = posit(n, 2) for n = 2..32 (the 2022 standard), posit8 (es 0) and posit16 (es 1).
- universal-dtypes: posit8e0, posit8e1, posit8, posit12, posit16e1, posit16, posit20 ... posit32.
Both libraries give NaR back as inf or nan; they are compared on codes and finite values.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import softposit
import torch
import universal_dtypes

from dse.errors import InputError
from dse.formats import get
from dse.formats.posit import Posit


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The references' big tensor ops run on one thread: waking a second costs ms on a busy CI box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL = [(n, es) for es in range(5) for n in range(2, 17)]
WIDE = [(n, es) for es in range(5) for n in range(17, 33)]
TABLE_BITS = 17  # one table of 17-bit patterns holds every n <= 16 posit and the ties between them


def standard_value(code: int, n: int, es: int) -> float:
    """The value of an n-bit posit pattern by the standard's definition; NaR is NaN."""
    if code == 0:
        return 0.0
    if code == 1 << (n - 1):
        return math.nan
    sign = 1.0
    if code >> (n - 1):
        sign, code = -1.0, (1 << n) - code
    body = format(code, f"0{n}b")[1:]
    run = len(body) - len(body.lstrip(body[0]))
    regime = run - 1 if body[0] == "1" else -run
    rest = body[run + 1:]
    exponent = int(rest[:es].ljust(es, "0"), 2) if es else 0
    fraction = rest[es:]
    return sign * math.ldexp(int("1" + fraction, 2), regime * 2**es + exponent - len(fraction))


@functools.cache
def table(es: int) -> torch.Tensor:
    """Values of the positive 17-bit patterns, indexed by code (index 0 holds 0)."""
    return torch.tensor([standard_value(c, TABLE_BITS, es) for c in range(2 ** (TABLE_BITS - 1))],
                        dtype=torch.float64)


def grid(n: int, es: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive values by code (index 0 holds 0) and the ties: ties[c] lies between codes c and c+1.

    Appending zero bits leaves a posit's value unchanged (checked below), so the n-bit code c is the
    17-bit code c << (17 - n) and the (n+1)-bit code 2c+1 is (2c+1) << (16 - n).
    """
    codes = torch.arange(2 ** (n - 1))
    return table(es)[codes << (TABLE_BITS - n)], table(es)[((2 * codes + 1) << (TABLE_BITS - 1 - n))]


def signed_code(magnitude_code: torch.Tensor, negative: bool, n: int) -> torch.Tensor:
    return ((1 << n) - magnitude_code) % (1 << n) if negative else magnitude_code


def nextafter(x: torch.Tensor, direction: float) -> torch.Tensor:
    return torch.nextafter(x, torch.full_like(x, direction))


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal element for element, NaN matching NaN."""
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))


def cases(n: int, es: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every positive value, every tie and the floats either side of it.

    Returns the inputs, the code just below or at each (toward_zero) and the nearest code. For
    float32, only values and ties that float32 holds exactly in its normal range are kept.
    """
    values, ties = grid(n, es)
    codes = torch.arange(values.numel())
    value_codes, lower, tie = codes[1:], codes[1:-1], ties[1:-1]
    if dtype == torch.float32:
        value_codes = value_codes[held_by_float32(values[value_codes])]
        kept = held_by_float32(tie) & held_by_float32(values[lower]) & held_by_float32(values[lower + 1])
        lower, tie = lower[kept], tie[kept]
    tie = tie.to(dtype)
    even = torch.where(lower % 2 == 0, lower, lower + 1)
    x = torch.cat([values[value_codes].to(dtype), tie, nextafter(tie, math.inf), nextafter(tie, -math.inf)])
    return x, torch.cat([value_codes, lower, lower, lower]), torch.cat([value_codes, even, lower + 1, lower])


def held_by_float32(x: torch.Tensor) -> torch.Tensor:
    """x (float64) is a normal float32 number."""
    return (x.float().double() == x) & (x.abs() >= torch.finfo(torch.float32).tiny)


# --- the reference itself -------------------------------------------------------------------------

@pytest.mark.parametrize("es", range(5))
def test_appending_zero_bits_keeps_the_value(es: int) -> None:
    for n in range(2, 13):
        direct = torch.tensor([standard_value(c, n, es) for c in range(2 ** (n - 1))], dtype=torch.float64)
        assert torch.equal(grid(n, es)[0], direct)


@pytest.mark.parametrize(("n", "es", "convert", "to_double"), [
    pytest.param(8, 0, softposit.convertDoubleToP8, softposit.convertP8ToDouble, id="p8"),
    pytest.param(16, 1, softposit.convertDoubleToP16, softposit.convertP16ToDouble, id="p16"),
    *[pytest.param(n, 2, lambda v, n=n: softposit.convertDoubleToPX2(v, n), softposit.convertPX2ToDouble,
                   id=f"pX2-{n}") for n in (2, 3, 5, 8, 11, 16)],
])
def test_the_reference_agrees_with_softposit_on_every_value_and_tie(n: int, es: int, convert: Callable,
                                                                    to_double: Callable) -> None:
    x, _, nearest = cases(n, es, torch.float64)
    expected = grid(n, es)[0][nearest]
    x, expected = torch.cat([x, -x]), torch.cat([expected, -expected])
    softposit_values = torch.tensor([to_double(convert(v)) for v in x.tolist()], dtype=torch.float64)
    assert torch.equal(softposit_values, expected)


# --- specs ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "bits", "es", "canonical"), [
    ("posit(8,0)", 8, 0, "posit(8,0)"), ("posit(16,1)", 16, 1, "posit(16,1)"), ("posit8", 8, 2, "posit8"),
    ("posit16", 16, 2, "posit16"), ("posit32", 32, 2, "posit32"), ("posit(8,2)", 8, 2, "posit8"),
    ("posit(12)", 12, 2, "posit12"), ("posit12", 12, 2, "posit12"), ("posit2", 2, 2, "posit2"),
    ("posit(32,4)", 32, 4, "posit(32,4)"),
    ("posit(16,1,scale=tensor,pow2=1)", 16, 1, "posit(16,1,scale=tensor,pow2=1)"),
    ("posit8(scale=channel,axis=1)", 8, 2, "posit8(scale=channel,axis=1)"),
])
def test_specs_parse_to_the_format_they_name(spec: str, bits: int, es: int, canonical: str) -> None:
    fmt = get(spec)
    assert (fmt.family, fmt.bits, fmt.es) == ("posit", bits, es)
    assert fmt.spec == canonical and get(canonical) == fmt


def test_every_posit_round_trips_through_its_canonical_spec() -> None:
    for n in range(2, 33):
        for es in range(5):
            fmt = Posit(n, es)
            assert get(fmt.spec) == fmt


@pytest.mark.parametrize(("spec", "needle"), [
    ("posit(8,9)", "es must be in 0..4"), ("posit(8,-1)", "0..4"), ("posit(1,0)", "n must be in 2..32"),
    ("posit(33)", "2..32"), ("posit40", "2..32"), ("posit(8,2,1)", "positional"),
    ("posit8(2)", "key=value"), ("posit(8,scale=block,block=0)", "block"),
])
def test_bad_specs_name_the_spec_and_the_valid_range(spec: str, needle: str) -> None:
    with pytest.raises(InputError) as raised:
        get(spec)
    assert spec in str(raised.value) and needle in str(raised.value)


def test_range_and_precision_follow_the_standard() -> None:
    assert (get("posit8").max, get("posit8").min_positive) == (2.0**24, 2.0**-24)
    assert (get("posit(8,0)").max, get("posit(8,0)").min_positive) == (64.0, 1 / 64)
    assert get("posit32").max == 2.0**120 and get("posit(32,4)").max == 2.0**480
    assert get("posit(8,0)").relative_precision == 2.0**-5  # 1 + 5 fraction bits after "10"
    assert get("posit(16,1)").relative_precision == 2.0**-12
    assert get("posit16").relative_precision == 2.0**-11
    assert get("posit32").relative_precision == 2.0**-27
    assert get("posit2").max == get("posit2").min_positive == 1.0


# --- codes --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "es"), SMALL)
def test_decode_and_encode_every_code(n: int, es: int) -> None:
    fmt = Posit(n, es)
    values, _ = grid(n, es)
    codes = torch.arange(2**n)
    nar = 2 ** (n - 1)
    magnitude = torch.where(codes < nar, codes, (2**n - codes) % 2**n)
    expected = torch.where(codes < nar, values[magnitude.clamp(max=nar - 1)],
                           -values[magnitude.clamp(max=nar - 1)])
    expected[nar] = math.nan
    decoded = fmt.decode(codes)
    assert decoded.dtype == torch.float64
    assert identical(decoded, expected)
    finite = codes != nar
    assert torch.equal(fmt.encode(decoded[finite]), codes[finite])
    specials = torch.tensor([math.nan, math.inf, -math.inf])
    assert torch.equal(fmt.encode(specials), torch.full((3,), nar))


def test_posit32_decodes_to_float64_with_27_fraction_bits() -> None:
    fmt = get("posit32")
    assert fmt.decode(torch.tensor([0x40000001, 0x3FFFFFFF])).tolist() == [1 + 2.0**-27, 1 - 2.0**-28]
    # Between 2^-20 and 2^20 posit32 has at least 23 fraction bits: every float32 is a posit32.
    generator = torch.Generator().manual_seed(5)
    exponent = torch.randint(-20, 20, (100_000,), generator=generator, dtype=torch.int32)
    fraction = torch.randint(0, 2**23, (100_000,), generator=generator, dtype=torch.int32)
    x32 = (((exponent + 127) << 23) | fraction).view(torch.float32)
    assert torch.equal(fmt.quantize(x32), x32)
    assert torch.equal(fmt.quantize(-x32, "toward_zero"), -x32)


# --- nearest: every value, every tie, one ulp either side ---------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("es", range(5))
def test_nearest_matches_the_standard_on_every_value_and_tie(es: int, dtype: torch.dtype) -> None:
    for n in range(2, 17):
        fmt = Posit(n, es)
        x, _, nearest = cases(n, es, dtype)
        expected = grid(n, es)[0][nearest]
        for negative in (False, True):
            signed = -x if negative else x
            out = fmt.quantize(signed)
            assert out.dtype == dtype
            wrong = out.double() != (-expected if negative else expected)
            assert not wrong.any(), (n, es, signed[wrong][:5].tolist(), out[wrong][:5].tolist())
            assert torch.equal(fmt.encode(signed), signed_code(nearest, negative, n))


@pytest.mark.parametrize(("n", "es"), [(2, 0), (3, 1), (5, 2), (8, 0), (8, 2), (10, 4), (16, 1), (16, 3),
                                       (18, 3), (24, 2), (32, 2), (32, 4)])
@pytest.mark.parametrize("rounding", ["nearest", "toward_zero", "pseudo_stochastic", "stochastic"])
def test_saturation_zero_and_specials(n: int, es: int, rounding: str) -> None:
    fmt = Posit(n, es)
    maxpos, minpos = fmt.max, fmt.min_positive
    useed = 2.0 ** (2**es)
    big = [maxpos * 2, maxpos * useed, maxpos * (1 + 2**-40), 1e300, 2.0**1023]
    small = [minpos / 2, minpos / 1e3, minpos / useed, minpos * (1 - 2**-40), 1e-300, 5e-324]
    x = torch.tensor(big + small + [0.0, -0.0, math.inf, -math.inf, math.nan], dtype=torch.float64)
    x = torch.cat([x, -x[: len(big) + len(small)]])
    expected = torch.tensor([maxpos] * len(big) + [minpos] * len(small) + [0.0, 0.0] + [math.nan] * 3
                            + [-maxpos] * len(big) + [-minpos] * len(small), dtype=torch.float64)
    assert identical(fmt.quantize(x, rounding, torch.Generator().manual_seed(0)), expected)
    if rounding == "nearest":
        nar, top = 2 ** (n - 1), 2 ** (n - 1) - 1
        codes = [top] * len(big) + [1] * len(small) + [0, 0, nar, nar, nar]
        codes += [2**n - top] * len(big) + [2**n - 1] * len(small)
        assert fmt.encode(x).tolist() == codes
    if maxpos < 3e38:
        x32 = torch.tensor([3e38, 1e-45, 0.0, math.inf, math.nan, -3e38, -1e-45])
        expected32 = torch.tensor([maxpos, minpos, 0.0, math.nan, math.nan, -maxpos, -minpos])
        assert identical(fmt.quantize(x32, rounding, torch.Generator().manual_seed(0)), expected32)


@pytest.mark.parametrize(("n", "es"), WIDE)
def test_nearest_on_random_ties_of_wide_posits(n: int, es: int) -> None:
    """n = 17..32: the tie between sampled neighbours, one float64 ulp either side, and float32 too."""
    fmt = Posit(n, es)
    generator = torch.Generator().manual_seed(n * 10 + es)
    lower = torch.randint(1, 2 ** (n - 1) - 1, (150,), generator=generator).tolist()
    low = torch.tensor([standard_value(c, n, es) for c in lower], dtype=torch.float64)
    high = torch.tensor([standard_value(c + 1, n, es) for c in lower], dtype=torch.float64)
    tie = torch.tensor([standard_value(2 * c + 1, n + 1, es) for c in lower], dtype=torch.float64)
    lower_t = torch.tensor(lower)
    even = torch.where(lower_t % 2 == 0, low, high)
    x = torch.cat([low, high, tie, nextafter(tie, math.inf), nextafter(tie, -math.inf)])
    expected = torch.cat([low, high, even, high, low])
    codes = torch.cat([lower_t, lower_t + 1, torch.where(lower_t % 2 == 0, lower_t, lower_t + 1),
                       lower_t + 1, lower_t])
    assert torch.equal(fmt.quantize(x), expected)
    assert torch.equal(fmt.quantize(-x), -expected)
    assert torch.equal(fmt.encode(x), codes)
    assert torch.equal(fmt.encode(-x), (2**n - codes) % 2**n)
    assert torch.equal(fmt.decode(codes), expected)
    held = held_by_float32(tie) & held_by_float32(low) & held_by_float32(high)
    tie32 = tie[held].float()
    x32 = torch.cat([tie32, nextafter(tie32, math.inf), nextafter(tie32, -math.inf)])
    expected32 = torch.cat([even[held], high[held], low[held]])
    assert torch.equal(fmt.quantize(x32).double(), expected32)


def random_inputs(fmt: Posit, count: int, seed: int) -> torch.Tensor:
    """Log-uniform magnitudes from a bit below minpos to a bit above maxpos, random signs (float64)."""
    generator = torch.Generator().manual_seed(seed)
    top = math.log2(fmt.max) + 2
    exponent = (torch.rand(count, generator=generator, dtype=torch.float64) * 2 - 1) * top
    sign = torch.randint(0, 2, (count,), generator=generator) * 2 - 1
    return torch.exp2(exponent) * sign


@pytest.mark.parametrize("n", range(2, 33))
def test_posit_n_2_matches_softposit_px2_on_random_inputs(n: int) -> None:
    fmt = Posit(n, 2)
    x64 = random_inputs(fmt, 3000, n)
    for x in (x64, x64.float()):
        raw = [softposit.convertDoubleToPX2(v, n) for v in x.double().tolist()]
        codes = torch.tensor([bits.v >> (32 - n) for bits in raw])
        values = torch.tensor([softposit.convertPX2ToDouble(bits) for bits in raw], dtype=torch.float64)
        assert torch.equal(fmt.encode(x), codes)
        assert torch.equal(fmt.quantize(x).double(), values)


@pytest.mark.parametrize(("name", "n", "es", "count"), [
    ("posit8e0", 8, 0, 100_000), ("posit8e1", 8, 1, 100_000), ("posit8", 8, 2, 100_000),
    ("posit12", 12, 2, 100_000), ("posit16e1", 16, 1, 200_000), ("posit16", 16, 2, 200_000),
    ("posit20", 20, 2, 300_000), ("posit24", 24, 2, 300_000), ("posit28", 28, 2, 300_000),
    ("posit32", 32, 2, 1_000_000),
])
def test_matches_universal_dtypes_on_random_inputs_and_codes(name: str, n: int, es: int, count: int) -> None:
    fmt = Posit(n, es)
    dtype = getattr(universal_dtypes, name)
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[np.dtype(dtype).itemsize]
    x64 = random_inputs(fmt, count, n + 100 * es)
    for x in (x64, x64[: count // 4].float()):
        with np.errstate(over="ignore"):
            converted = x.double().numpy().astype(dtype)
        assert torch.equal(fmt.quantize(x).double(), torch.from_numpy(converted.astype(np.float64)))
        assert torch.equal(fmt.encode(x), torch.from_numpy(converted.view(unsigned).astype(np.int64)))
    codes = torch.randint(0, 2**n, (min(count, 2**n, 100_000),), generator=torch.Generator().manual_seed(n))
    codes = codes[codes != 2 ** (n - 1)]
    expected = codes.numpy().astype(unsigned).view(dtype).astype(np.float64)
    assert torch.equal(fmt.decode(codes), torch.from_numpy(expected))


# --- the other rounding modes ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("es", range(5))
def test_toward_zero_truncates_the_pattern(es: int, dtype: torch.dtype) -> None:
    for n in range(2, 17):
        fmt = Posit(n, es)
        values = grid(n, es)[0]
        x, lower, _ = cases(n, es, dtype)
        above = torch.arange(2, values.numel())  # just under each code above 1: the code below
        above = above[held_by_float32(values[above]) | (dtype == torch.float64)]
        x = torch.cat([x, nextafter(values[above].to(dtype), -math.inf)])
        expected = values[torch.cat([lower, above - 1])]
        out = fmt.quantize(torch.cat([x, -x]), "toward_zero").double()
        assert torch.equal(out, torch.cat([expected, -expected]))


def niti_reference(x: float, n: int, es: int, fraction_bits: int) -> float:
    """NITI's pseudo-stochastic rule on the pattern bits of |x| past the posit's n bits.

    The pattern of |x| = 2^s * (1 + F / 2^fraction_bits) is regime, es exponent bits, then all of F.
    """
    mantissa, exponent = math.frexp(abs(x))
    scale = exponent - 1
    fraction = int(mantissa * 2 ** (fraction_bits + 1)) - (1 << fraction_bits)
    regime, exponent_field = scale >> es, scale & ((1 << es) - 1)
    regime_bits = "1" * (regime + 1) + "0" if regime >= 0 else "0" * -regime + "1"
    exponent_bits = format(exponent_field, f"0{es}b") if es else ""
    pattern = regime_bits + exponent_bits + format(fraction, f"0{fraction_bits}b")
    kept, field = pattern[: n - 1], pattern[n - 1:]
    code = int(kept.ljust(n - 1, "0"), 2)
    if field:
        width, value = len(field), int(field, 2)
        high = value >> (width // 2)
        low = (value & ((1 << (width // 2)) - 1)) << (width % 2)
        code += int(high > low)
    code = min(max(code, 1), 2 ** (n - 1) - 1)
    return math.copysign(standard_value(code, n, es), x)


@pytest.mark.parametrize(("n", "es"), [(3, 0), (8, 0), (8, 2), (9, 4), (12, 3), (16, 1), (16, 2), (20, 3),
                                       (24, 1), (32, 2), (32, 4)])
def test_pseudo_stochastic_applies_niti_to_the_discarded_pattern_bits(n: int, es: int) -> None:
    fmt = Posit(n, es)
    x64 = random_inputs(fmt, 2000, n + es)
    for x, fraction_bits in ((x64, 52), (x64.float(), 23)):
        x = x[(x.double().abs() >= fmt.min_positive) & (x.double().abs() <= fmt.max)]
        expected = torch.tensor([niti_reference(v, n, es, fraction_bits) for v in x.double().tolist()],
                                dtype=torch.float64)
        # (a posit beyond float32's range overflows a float32 result to inf, as the cast does)
        assert torch.equal(fmt.quantize(x, "pseudo_stochastic"), expected.to(x.dtype))


@pytest.mark.parametrize(("spec", "low", "high"), [
    ("posit(8,0)", 1.0, 1.03125),  # fraction bits: the pattern is linear in the value
    ("posit8", 1.0, 1.125),
    ("posit8", 2.0**16, 2.0**18),  # one of two exponent bits cut off
    ("posit8", 2.0**20, 2.0**24),  # regime bits only
    ("posit(16,4)", 2.0**192, 2.0**200),
    ("posit(6,1)", 2.0**-8, 2.0**-6),  # minpos and the next posit
])
@pytest.mark.parametrize("position", [0.05, 0.5, 0.9])
def test_stochastic_is_unbiased_in_value_between_neighbours(spec: str, low: float, high: float,
                                                            position: float) -> None:
    fmt = get(spec)
    neighbours = fmt.decode(fmt.encode(torch.tensor([low], dtype=torch.float64)) + torch.tensor([0, 1]))
    assert neighbours.tolist() == [low, high]
    x = low + position * (high - low)
    draws = 40_000
    q = fmt.quantize(torch.full((draws,), x, dtype=torch.float64), "stochastic",
                     torch.Generator().manual_seed(7))
    assert torch.all((q == low) | (q == high))
    sigma = (high - low) * math.sqrt(position * (1 - position) / draws)
    assert abs(float(q.mean()) - x) <= 5 * sigma


def test_stochastic_is_seeded_and_the_same_for_float32_and_float64() -> None:
    fmt = get("posit(16,1)")
    x = random_inputs(fmt, 50_000, 3).float()
    first = fmt.quantize(x, "stochastic", torch.Generator().manual_seed(1))
    assert torch.equal(first, fmt.quantize(x, "stochastic", torch.Generator().manual_seed(1)))
    assert not torch.equal(first, fmt.quantize(x, "stochastic", torch.Generator().manual_seed(2)))
    wide = fmt.quantize(x.double(), "stochastic", torch.Generator().manual_seed(1))
    assert torch.equal(first.double(), wide)
    nearest_down = fmt.quantize(x, "toward_zero").double()
    assert torch.all((wide == nearest_down) | (wide.abs() > nearest_down.abs()))


# --- dtypes, shapes, slices, scaling -----------------------------------------------------------------

@pytest.mark.parametrize("spec", ["posit(8,0)", "posit16", "posit(16,3)", "posit(20,3)", "posit32",
                                  "posit(32,4)"])
@pytest.mark.parametrize("rounding", ["nearest", "toward_zero"])
def test_float32_inputs_round_as_their_float64_values(spec: str, rounding: str) -> None:
    """Exactly, except that a posit beyond float32's range overflows a float32 result to inf."""
    fmt = get(spec)
    x = torch.cat([torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 100,
                   random_inputs(fmt, 100_000, 1).float()])
    x = x[x.isfinite()]
    wide = fmt.quantize(x.double(), rounding)
    out = fmt.quantize(x, rounding).double()
    fits = wide.abs() <= torch.finfo(torch.float32).max
    assert torch.equal(out[fits], wide[fits])
    assert torch.equal(out[~fits], wide[~fits].sign() * math.inf)


def test_several_cpu_threads_give_the_same_result_and_are_restored() -> None:
    fmt = get("posit(16,1)")
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    expected = fmt.quantize(x)
    torch.set_num_threads(2)
    assert torch.equal(fmt.quantize(x), expected)
    assert torch.get_num_threads() == 2


def test_shapes_slices_and_other_float_dtypes() -> None:
    fmt = get("posit(16,1)")
    x = torch.randn(3, 70_001, generator=torch.Generator().manual_seed(0))  # several CPU slices
    expected = torch.stack([fmt.quantize(row.clone()) for row in x])
    assert torch.equal(fmt.quantize(x), expected)
    assert torch.equal(fmt.quantize(x.t()), expected.t())
    assert fmt.quantize(torch.tensor(1.1)).shape == ()
    assert fmt.quantize(torch.empty(0, 4)).shape == (0, 4)
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(fmt.quantize(x.to(dtype)), fmt.quantize(x.to(dtype).float()).to(dtype))
    with pytest.raises(TypeError):
        fmt.quantize(torch.arange(3))
    assert torch.equal(fmt.quantize(x.requires_grad_()), expected)


def test_power_of_two_tensor_scale() -> None:
    """Lu et al.'s layer-wise scale: a power of two that brings max|x| within maxpos."""
    fmt = get("posit8(scale=tensor,pow2=1)")
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)).double() * 1e9
    scale = 2.0 ** math.ceil(math.log2(float(x.abs().max()) / fmt.max))
    assert torch.equal(fmt.quantize(x), get("posit8").quantize(x / scale) * scale)
