"""A scaled format's quantize is x / s rounded onto the element grid, times s, for every scale s the
definition gives, also where s lies outside float32's normals (2^-150 for a wide grid at a small
max|x|, 2^127 for a narrow one at a large max|x|). Checked against an exact model (fractions and
float64) over scales 2^-150..2^127, per tensor, per channel and per block, for float, int/fixed,
posit and LNS elements, float32/float64/bfloat16/float16 inputs, with denormals flushed or not."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from dse.formats import fast, get
from dse.formats.base import NumberFormat

# Every exponent near float32's edges (where the scale leaves its normals), every fifth between.
SCALE_EXPONENTS = sorted(set(range(-150, -110)) | set(range(-110, 110, 5)) | set(range(110, 128)))
FLOAT32_MIN_NORMAL = 2.0**-126

SCALED_SPECS = [
    "bf16(scale=tensor,pow2=1)", "bf16(scale=tensor)", "fp16(scale=tensor,pow2=1)",
    "fp8_e4m3(scale=tensor)", "fp8_e5m2(scale=tensor,pow2=1)", "fp4_e2m1(scale=tensor,pow2=1)",
    "p3109(8,3,scale=tensor,pow2=1)", "int8", "int8(pow2=1)", "fixed(8,20,scale=tensor)",
    "fixed(16,8,scale=tensor,pow2=1)", "posit8(scale=tensor)", "posit16(scale=tensor,pow2=1)",
    "lns8", "lns(16,gamma=128)", "lns(12,gamma=8,pow2=1)",
    "bf16(scale=channel,pow2=1)", "fp8_e4m3(scale=channel)", "int8(scale=channel,pow2=1)",
    "posit8(scale=channel)", "lns(16,gamma=128,scale=channel)",
    "mxfp8_e4m3", "mxfp4", "block(int8)", "block(posit8)", "block(bf16)",
]

# Magnitudes of each group's values relative to its max: the max itself, ties and ordinary values,
# all at least 1/16 of it, so that x / s stays clear of the element grid's subnormals.
RELATIVE = [1.0, -0.75, 0.3, -0.0625, 0.5 + 2.0**-9, 0.0]


def round_significand(value: Fraction, bits: int) -> Fraction:
    """value > 0 rounded to `bits` significant bits, nearest, ties to even, no exponent bound."""
    exponent = value.numerator.bit_length() - value.denominator.bit_length()
    if Fraction(2) ** exponent > value:
        exponent -= 1
    unit = Fraction(2) ** (exponent - bits + 1)
    steps = value / unit
    whole = steps.numerator // steps.denominator
    rest = steps - whole
    whole += rest > Fraction(1, 2) or (rest == Fraction(1, 2) and whole % 2 == 1)
    return whole * unit


def pow2_ceil(value: Fraction) -> Fraction:
    """The smallest power of two >= value > 0."""
    exponent = value.numerator.bit_length() - value.denominator.bit_length() - 1
    while Fraction(2) ** exponent < value:
        exponent += 1
    while Fraction(2) ** (exponent - 1) >= value:
        exponent -= 1
    return Fraction(2) ** exponent


def model_scale(fmt: NumberFormat, amax: Fraction, float32_work: bool) -> Fraction:
    """The definition's scale of a group with max|x| = amax > 0 (finite)."""
    if fmt.scaling.kind == "block":  # OCP MX: 2^(floor(log2 amax) - emax_elem), within E8M0's range
        exponent = amax.numerator.bit_length() - amax.denominator.bit_length()
        if Fraction(2) ** exponent > amax:
            exponent -= 1
        emax = math.frexp(fmt.element.max)[1] - 1  # type: ignore[attr-defined]
        return Fraction(2) ** min(max(exponent - emax, -127), 127)
    grid_max = Fraction(float(np.float32(fmt.max))) if float32_work else Fraction(fmt.max)
    ratio = round_significand(amax / grid_max, 24 if float32_work else 53)
    return pow2_ceil(ratio) if fmt.scaling.pow2 else ratio


def to_float32(value: Fraction, flush: bool) -> float:
    """value rounded to float32 (subnormals, or zero where flushed)."""
    if value == 0:
        return 0.0
    step = Fraction(2) ** -149
    rounded = float(round_significand(abs(value), 24)) if abs(value) >= FLOAT32_MIN_NORMAL else float(
        round(abs(value) / step) * step)
    if flush and rounded < FLOAT32_MIN_NORMAL:
        rounded = 0.0
    return math.copysign(rounded, value)


def model_quantize(fmt: NumberFormat, x: torch.Tensor, flush: bool) -> np.ndarray:
    """x / s rounded to the work dtype (float32 for all but float64 input), rounded onto the element
    grid (the format's unit-scale reference rounding, tested elsewhere), times s, rounded to the work
    dtype: exact fractions, so no scale is bounded by float32's range."""
    float32_work = x.dtype != torch.float64
    values = x.double() if float32_work else x
    rows = values.numpy().astype(np.float64)
    if float32_work and flush:  # the CPU reads float32 subnormals as zero
        rows = np.where(np.abs(rows) < FLOAT32_MIN_NORMAL, 0.0 * rows, rows)
    if fmt.scaling.kind == "tensor":
        groups = [rows.reshape(-1)]
    else:
        groups = list(rows)  # channels along axis 0, or one block per row
    out = []
    for group in groups:
        amax = Fraction(float(np.abs(group).max()))
        scale = model_scale(fmt, amax, float32_work) if amax > 0 else Fraction(1)
        quotients = [Fraction(float(v)) / scale for v in group]
        if float32_work:
            quotients = [Fraction(to_float32(q, flush=False)) for q in quotients]
        with fast.reference_only():
            # (in float32 work the grid is held as float32 values: an LNS grid's are rounded)
            rounded = fmt.round_unscaled(torch.tensor([float(q) for q in quotients], dtype=torch.float32
                                                      if float32_work else torch.float64), "nearest", None)
        products = [Fraction(float(r)) * scale for r in rounded]
        out.append([to_float32(p, flush) if float32_work else float(p) for p in products])
    return np.array(out).reshape(rows.shape)


def inputs(fmt: NumberFormat, dtype: torch.dtype, exponents: list[int]) -> torch.Tensor:
    """One row per scale exponent e: max|row| = max * 2^e, just above (pow2 scales: 2^e) a power of
    two times the grid's max, and the RELATIVE values of it."""
    element_max = fmt.element.max if fmt.scaling.kind == "block" else fmt.max  # type: ignore[attr-defined]
    rows = [[r * element_max * 2.0**e * (1 + 2.0**-6) for r in RELATIVE] for e in exponents]
    return torch.tensor(rows, dtype=torch.float64).to(dtype)


def usable_rows(x: torch.Tensor) -> list[int]:
    """Rows whose max is finite and a normal number of x's dtype (in range for that dtype)."""
    amax = x.double().abs().amax(dim=1)
    return [i for i, a in enumerate(amax.tolist()) if torch.finfo(x.dtype).tiny <= a < math.inf]


@pytest.mark.parametrize("flush", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", SCALED_SPECS)
def test_scaled_quantize_is_finite_and_exact_for_every_scale(spec: str, dtype: torch.dtype, flush: bool
                                                             ) -> None:
    fmt = get(spec)
    x = inputs(fmt, dtype, SCALE_EXPONENTS)
    x = x[usable_rows(x)]
    torch.set_flush_denormal(flush)
    try:
        for reference in (False, True):
            with fast.reference_only() if reference else fast.recording():
                if fmt.scaling.kind == "tensor":  # one tensor per scale, two rows each
                    results = [fmt.quantize(x[i:i + 1]) for i in range(len(x))]
                    expected = [model_quantize(fmt, x[i:i + 1].to(x.dtype), flush) for i in range(len(x))]
                else:
                    results = [fmt.quantize(x)]
                    expected = [model_quantize(fmt, x, flush)]
                for row, (got, want) in enumerate(zip(results, expected, strict=True)):
                    assert got.dtype == x.dtype
                    want_t = torch.from_numpy(want).to(x.dtype)
                    # finite wherever x / s rounded, times s, is within the dtype's range (a posit
                    # rounding x / s up to its max can pass float32's max: that is inf)
                    assert bool(torch.isfinite(got[torch.isfinite(want_t)]).all()), (
                        spec, dtype, flush, reference, row, got)
                    assert torch.equal(got, want_t), (spec, dtype, flush, reference, row, got, want_t)
    finally:
        torch.set_flush_denormal(False)
