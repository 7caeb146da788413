"""int(n) and fixed(n, frac) against exact integer models and reference libraries, bit for bit.

The model: k = clip(round_half_even(x * 2^frac)) and value k * 2^-frac, in float64 numpy, where
every step is exact for float32 inputs. Inputs per format: every code, every tie between adjacent
codes and one and two float32 ulps either side, the ends of the range plus and minus half a step,
+-0, +-inf, NaN, and 10^6 random float32 values spread over the range and beyond.
"""

from __future__ import annotations

import math
from fractions import Fraction

import gfloat
import numpy as np
import pytest
import torch
import universal_dtypes
from gfloat.formats import format_info_ocp_int8

from dse.errors import InputError
from dse.formats import Scaling, get, shift_round
from dse.formats.fixed import FixedPoint

UNSCALED = ["int8(scale=none)", "int(8,scale=none,symmetric=0)", "int4(scale=none)", "int(2,scale=none)",
            "fixed(8,4)", "fixed(16,8)", "fixed(8,6)", "fixed(8,-2)", "fixed(12,10,symmetric=1)",
            "int(16,scale=none)", "fixed(16,16)"]


def model(x: np.ndarray, fmt: FixedPoint, mode: str = "nearest") -> np.ndarray:
    """clip(round(x * 2^frac)) * 2^-frac in float64 (exact for float32 x); NaN stays NaN."""
    t = x.astype(np.float64) * 2.0**fmt.frac_bits
    k = np.round(t) if mode == "nearest" else np.trunc(t)
    return np.clip(k, fmt.lowest_code, fmt.highest_code) * 2.0**-fmt.frac_bits


def model_codes(x: np.ndarray, fmt: FixedPoint) -> np.ndarray:
    k = np.clip(np.round(x.astype(np.float64) * 2.0**fmt.frac_bits), fmt.lowest_code, fmt.highest_code)
    return k.astype(np.int64) & (2**fmt.bits - 1)


def edge_inputs(fmt: FixedPoint) -> np.ndarray:
    """Every code, every tie and +-1, +-2 float32 ulps around it, the range ends, specials (float32)."""
    step = 2.0**-fmt.frac_bits
    codes = np.arange(fmt.lowest_code - 1, fmt.highest_code + 2, dtype=np.float64)
    points = np.concatenate([codes * step, (codes + 0.5) * step]).astype(np.float32)
    around = [points]
    up, down = points, points
    for _ in range(2):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
        around += [up, down]
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e30, -1e30, 1e-30, -1e-30, 1e-45, -1e-45,
                         2 * fmt.max, -2 * fmt.max, step / 2, -step / 2, step / 4], dtype=np.float32)
    return np.concatenate(around + [specials])


def random_inputs(fmt: FixedPoint, n: int, seed: int) -> np.ndarray:
    """Normal draws at scales from a thousandth of a step to ten times the max, both signs."""
    rng = np.random.default_rng(seed)
    scale = np.exp2(rng.uniform(math.log2(fmt.min_positive) - 10, math.log2(fmt.max) + 3, n))
    return (rng.standard_normal(n) * scale).astype(np.float32)


def assert_bits_equal(actual: torch.Tensor, expected: np.ndarray) -> None:
    """Equal as float32 bit patterns (so -0 != +0), with any NaN equal to any NaN."""
    got = actual.numpy()
    want = expected.astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    mismatch = got[~nan].view(np.int32) != want[~nan].view(np.int32)
    assert not mismatch.any(), f"{mismatch.sum()} mismatches, e.g. {got[~nan][mismatch][:5]} vs " \
                               f"{want[~nan][mismatch][:5]}"


@pytest.mark.parametrize("spec", UNSCALED)
def test_quantize_matches_the_integer_model_on_edges_and_random_inputs(spec: str) -> None:
    fmt = get(spec)
    assert isinstance(fmt, FixedPoint) and fmt.scaling.kind == "none"
    n_random = 10**6 if spec == "int8(scale=none)" else 10**5
    x = np.concatenate([edge_inputs(fmt), random_inputs(fmt, n_random, 0)])
    assert_bits_equal(fmt.quantize(torch.from_numpy(x)), model(x, fmt))
    assert_bits_equal(fmt.quantize(torch.from_numpy(x), "toward_zero"), model(x, fmt, "toward_zero"))
    finite = np.isfinite(x)
    assert torch.equal(fmt.encode(torch.from_numpy(x[finite])), torch.from_numpy(model_codes(x[finite], fmt)))


@pytest.mark.parametrize("spec", ["int(24,scale=none)", "int(32,scale=none)", "fixed(32,16)", "fixed(32,-64)",
                                  "fixed(20,64)"])
def test_wide_formats_match_the_model_on_float64_inputs(spec: str) -> None:
    fmt = get(spec)
    rng = np.random.default_rng(1)
    k = rng.integers(fmt.lowest_code - 2**10, fmt.highest_code + 2**10, 10**5)
    ties = (k + rng.choice([0.0, 0.5, 0.25], k.size)) * 2.0**-fmt.frac_bits
    x = np.concatenate([ties, np.nextafter(ties, np.inf), np.nextafter(ties, -np.inf), [fmt.max * 2, np.nan]])
    expected = model(x, fmt)
    got = fmt.quantize(torch.from_numpy(x)).numpy()
    assert np.array_equal(got, expected, equal_nan=True)


@pytest.mark.parametrize("spec", UNSCALED)
def test_every_code_decodes_exactly_and_round_trips(spec: str) -> None:
    fmt = get(spec)
    codes = torch.arange(2**fmt.bits)
    decoded = fmt.decode(codes)
    for code, value in zip(codes.tolist(), decoded.tolist(), strict=True):
        signed = code - 2**fmt.bits if code >= 2 ** (fmt.bits - 1) else code
        if fmt.symmetric and signed == -(2 ** (fmt.bits - 1)):
            assert math.isnan(value)  # the unused code of a symmetric format
        else:
            assert Fraction(value) == signed * Fraction(2) ** -fmt.frac_bits
    assert torch.equal(fmt.encode(decoded), codes)
    values = fmt.values()
    assert values.numel() == 2**fmt.bits - int(fmt.symmetric)
    assert float(values[-1]) == fmt.max and float(values[values > 0][0]) == fmt.min_positive


def test_encode_nan_needs_a_nan_code() -> None:
    with pytest.raises(ValueError, match="no NaN code"):
        get("fixed(8,4)").encode(torch.tensor([1.0, math.nan]))
    assert get("int8").encode(torch.tensor([math.nan])).item() == 0x80
    assert get("int8").encode(torch.tensor([math.inf, -math.inf, -0.0])).tolist() == [0x7F, 0x81, 0]
    with pytest.raises(ValueError, match="0..255"):
        get("int8").decode(torch.tensor([256]))


@pytest.mark.parametrize(("spec", "universal"), [("fixed(8,4)", universal_dtypes.fixpnt8),
                                                 ("fixed(16,8)", universal_dtypes.fixpnt16)])
def test_matches_universal_fixpnt(spec: str, universal: object) -> None:
    """Universal's Q4.4 and Q8.8 round to nearest even and saturate; they map NaN to 0 and -0 to +0."""
    fmt = get(spec)
    x = np.concatenate([edge_inputs(fmt), random_inputs(fmt, 10**5, 2)])
    x = x[~np.isnan(x)]
    with np.errstate(over="ignore"):  # universal's cast of out-of-range values warns, then saturates
        expected = x.astype(np.float64).astype(universal).astype(np.float64)
    assert np.array_equal(fmt.quantize(torch.from_numpy(x)).double().numpy(), expected)


def test_fixed_8_6_is_the_ocp_mxint8_element_grid_of_gfloat() -> None:
    """OCP MXINT8 elements: two's complement with an implicit 2^-6, -2.0 included (gfloat's ocp_int8)."""
    fmt = get("fixed(8,6)")
    assert fmt.spec == "fixed(8,6)" and fmt.scaling == Scaling() and not fmt.symmetric
    gfloat_values = [gfloat.decode_float(format_info_ocp_int8, code).fval for code in range(256)]
    assert fmt.decode(torch.arange(256)).tolist() == gfloat_values
    assert [gfloat.encode_float(format_info_ocp_int8, v) for v in gfloat_values] == list(range(256))
    x = np.concatenate([edge_inputs(fmt), random_inputs(fmt, 10**5, 3)])
    x = x[np.isfinite(x)].astype(np.float64)
    expected = gfloat.round_ndarray(format_info_ocp_int8, x, sat=True)
    assert np.array_equal(fmt.quantize(torch.from_numpy(x)).numpy(), expected)


@pytest.mark.parametrize("spec", ["int8(scale=none)", "int(8,scale=none,symmetric=0)", "fixed(8,4)",
                                  "fixed(16,8)"])
def test_matches_torch_fake_quantize_with_a_power_of_two_scale(spec: str) -> None:
    """torch computes round(x / scale) exactly for a power-of-two scale; it gives +0 where we keep -0."""
    fmt = get(spec)
    x = np.concatenate([edge_inputs(fmt), random_inputs(fmt, 10**5, 4)])
    x = torch.from_numpy(x[np.isfinite(x)])
    expected = torch.fake_quantize_per_tensor_affine(x, 2.0**-fmt.frac_bits, 0, fmt.lowest_code,
                                                     fmt.highest_code)
    assert torch.equal(fmt.quantize(x), expected)  # equal as numbers: -0 == +0


def test_int8_per_tensor_absmax_scale_is_bit_exact() -> None:
    """scale = max|x| / 127 in float32, then x / scale rounded, clipped, times scale (all float32)."""
    fmt = get("int8")
    x = random_inputs(get("int8(scale=none)"), 4096, 5).reshape(64, 64) / np.float32(300.0)
    scale = np.abs(x).max() / np.float32(127.0)
    expected = (model(x / scale, fmt).astype(np.float32) * scale).astype(np.float32)
    assert_bits_equal(fmt.quantize(torch.from_numpy(x)), expected)
    assert np.abs(fmt.quantize(torch.from_numpy(x)).numpy()).max() == pytest.approx(np.abs(x).max(), rel=1e-6)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_channel_scales_are_bit_exact(axis: int) -> None:
    fmt = get(f"int(8,scale=channel,axis={axis})")
    x = random_inputs(get("int8(scale=none)"), 64 * 48, 6).reshape(64, 48)
    x[3 if axis == 0 else slice(None), 5 if axis != 0 else slice(None)] = 0.0  # an all-zero channel
    amax = np.abs(x).max(axis=1 - (axis % 2), keepdims=True)
    scale = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    expected = (model(x / scale, fmt).astype(np.float32) * scale).astype(np.float32)
    assert_bits_equal(fmt.quantize(torch.from_numpy(x)), expected)


def niti_pow2_exponent(amax: float, grid_max: int) -> int:
    """The smallest e with amax / 2^e <= grid_max, exactly."""
    e = -200
    while Fraction(amax) / Fraction(2) ** e > grid_max:
        e += 1
    return e


@pytest.mark.parametrize("amax", [1.0, 127.0, 128.0, 3.0e-3, 5.5e4, 2.0**-20 * 127])
def test_pow2_scale_is_niti_shared_exponent(amax: float) -> None:
    fmt = get("int(8,pow2=1)")
    x = random_inputs(get("int8(scale=none)"), 10**4, 7)
    x = (x / np.abs(x).max() * np.float32(amax)).astype(np.float32)
    x[0] = np.float32(amax)
    e = niti_pow2_exponent(float(np.abs(x).max()), 127)
    expected = model(x.astype(np.float64) * 2.0**-e, fmt) * 2.0**e
    assert_bits_equal(fmt.quantize(torch.from_numpy(x)), expected)
    fake = torch.fake_quantize_per_tensor_affine(torch.from_numpy(x), 2.0**e, 0, -127, 127)
    assert torch.equal(fmt.quantize(torch.from_numpy(x)), fake)


def psto_shift(m: int, s: int) -> int:
    """NITI's PstoShift of a magnitude m by s bits (wangmaolin/niti, ti_torch.py): top half of the field
    vs bottom half."""
    if s <= 0:
        return m << -s
    q, r = m >> s, m & ((1 << s) - 1)
    h = s // 2
    hi, lo = r >> h, r & ((1 << h) - 1)
    if s % 2:
        lo <<= 1
    return q + (hi > lo)


def test_shift_round_pseudo_stochastic_is_niti_psto_shift() -> None:
    rng = np.random.default_rng(8)
    m = rng.integers(0, 2**31, 20000)
    s = rng.integers(0, 33, 20000)
    got = shift_round(torch.from_numpy(m), torch.from_numpy(s), "pseudo_stochastic").tolist()
    assert got == [psto_shift(int(a), int(b)) for a, b in zip(m, s, strict=True)]


def test_pseudo_stochastic_on_full_width_integers_is_niti_int8_requantisation() -> None:
    """int32 values whose float32 significand is the integer itself, shifted to int8 by NITI's exponent."""
    rng = np.random.default_rng(9)
    m = rng.integers(2**23, 2**24, 20000) * rng.choice([-1, 1], 20000)
    x = torch.from_numpy(m.astype(np.float32))
    e = niti_pow2_exponent(float(np.abs(m).max()), 127)
    expected = [math.copysign(min(psto_shift(abs(int(v)), e), 127) * 2.0**e, v) for v in m]
    assert get("int(8,pow2=1)").quantize(x, "pseudo_stochastic").tolist() == expected


@pytest.mark.parametrize("spec", ["fixed(8,4)", "int8(scale=none)", "fixed(16,-3)"])
def test_pseudo_stochastic_is_niti_on_the_significand_below_the_grid(spec: str) -> None:
    """For any float32 x = M * 2^(E-23), the discarded field is the s = 23 - E - frac low bits of M."""
    fmt = get(spec)
    x = np.concatenate([random_inputs(fmt, 50000, 10), edge_inputs(fmt)])
    x = x[np.isfinite(x) & (x != 0)]
    expected = []
    for value in x.tolist():
        mantissa, exponent = math.frexp(abs(value))  # value = mantissa * 2^exponent, mantissa in [0.5, 1)
        significand = int(mantissa * 2**24)
        shift = 24 - exponent - fmt.frac_bits
        q = min(psto_shift(significand, shift), fmt.highest_code if value > 0 else -fmt.lowest_code)
        expected.append(math.copysign(q * 2.0**-fmt.frac_bits, value))
    got = fmt.quantize(torch.from_numpy(x), "pseudo_stochastic")
    assert_bits_equal(got, np.array(expected))


@pytest.mark.parametrize("rounding", ["stochastic", "pseudo_stochastic"])
def test_random_roundings_pick_a_neighbour_and_saturate(rounding: str) -> None:
    fmt = get("fixed(8,4)")
    x = torch.from_numpy(np.concatenate([edge_inputs(fmt), random_inputs(fmt, 10**5, 11)]))
    q = fmt.quantize(x, rounding, torch.Generator().manual_seed(0)).numpy()
    below = np.clip(np.floor(x.numpy().astype(np.float64) * 16), -128, 127) / 16
    above = np.clip(np.ceil(x.numpy().astype(np.float64) * 16), -128, 127) / 16
    finite = np.isfinite(x.numpy())
    assert np.all((q[finite] == below[finite]) | (q[finite] == above[finite]))
    assert np.isnan(q[np.isnan(x.numpy())]).all()


def test_quantize_keeps_dtype_shape_and_the_sign_of_zero() -> None:
    fmt = get("int8")
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        x = torch.tensor([[-0.001, 0.5], [127.0, -300.0]], dtype=dtype)
        q = fmt.quantize(x)
        assert q.dtype == dtype and q.shape == x.shape
    q = get("int8(scale=none)").quantize(torch.tensor([-0.3, -0.0, 0.3]))
    assert torch.signbit(q).tolist() == [True, True, False] and q.abs().max() == 0
    for spec in ("int8", "int(8,scale=channel)", "int(8,scale=block,block=4)", "fixed(8,4)"):
        assert get(spec).quantize(torch.tensor(-3.3)).shape == ()  # a scalar is its own tensor/channel/block
    assert get("fixed(8,4)").quantize(torch.tensor(-3.3)).item() == -3.3125


@pytest.mark.parametrize(("spec", "canonical", "family", "frac_bits"), [
    ("int8", "int8", "int", 0), ("int(4)", "int4", "int", 0), ("INT( 8 , scale = tensor )", "int8", "int", 0),
    ("int(8,axis=1)", "int8", "int", 0),
    ("int8(scale=channel,axis=1)", "int(8,scale=channel,axis=1)", "int", 0),
    ("int(8,symmetric=0,scale=none)", "int(8,scale=none,symmetric=0)", "int", 0),
    ("fixed(8,0)", "int(8,scale=none,symmetric=0)", "int", 0), ("fixed(16,8)", "fixed(16,8)", "fixed", 8),
    ("fixed(8,6,symmetric=1,pow2=1)", "fixed(8,6,pow2=1,symmetric=1)", "fixed", 6),
    ("int32", "int32", "int", 0), ("fixed(4,-3,scale=tensor)", "fixed(4,-3,scale=tensor)", "fixed", -3),
])
def test_specs_canonicalise(spec: str, canonical: str, family: str, frac_bits: int) -> None:
    fmt = get(spec)
    assert (fmt.spec, fmt.family, fmt.frac_bits) == (canonical, family, frac_bits)
    assert get(fmt.spec) == fmt


@pytest.mark.parametrize(("spec", "needle"), [
    ("int(0)", "bits must be in 2..32"), ("int33", "bits must be in 2..32"), ("int(1)", "2..32"),
    ("fixed(8)", "frac"), ("fixed(8,65)", "frac must be in -64..64"), ("fixed(8,2.5)", "frac"),
    ("int(8,symmetric=maybe)", "symmetric"), ("int(8,scale=rows)", "scale"), ("int8(frac=3)", "frac"),
])
def test_bad_specs_name_the_spec_and_the_range(spec: str, needle: str) -> None:
    with pytest.raises(InputError) as raised:
        get(spec)
    assert spec in str(raised.value) and needle in str(raised.value)


def test_grid_properties() -> None:
    assert (get("int8").max, get("int8").min_positive) == (127.0, 1.0)
    assert get("int(8,symmetric=0)").decode(torch.tensor([0x80])).item() == -128.0
    assert (get("fixed(16,8)").max, get("fixed(16,8)").min_positive) == (127.99609375, 2.0**-8)
    assert get("fixed(8,6)").values()[0].item() == -2.0
    assert get("int4").values().tolist() == list(range(-7, 8))
    assert get("fixed(8,4)").relative_precision == 1 / 16
