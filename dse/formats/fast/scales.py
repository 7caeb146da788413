"""Per-tensor scales taken on the host: on the CPU, reading max|x| back once and computing the scale
in Python costs less than the dozen scalar tensor operations of `scale_from_amax` (five, and about
twenty for a power of two), and it gives the same value bit for bit; a power-of-two scale may then
be fused into a family's rounding (`NumberFormat.round_scaled_on_host`)."""

from __future__ import annotations

import array
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dse.formats.base import (
    FLOAT32_MIN_NORMAL,
    FLOAT32_SCALE_LIMIT,
    ROUNDINGS,
    constant,
    host_abs_max,
    round_to_float32_significand,
)
from dse.formats.fast import FastPath, enabled, host_shortcuts, register

if TYPE_CHECKING:
    from dse.formats.base import NumberFormat

HOST_SCALE = register(FastPath(
    name="host-tensor-scale",
    reference="NumberFormat.round_by_scale with scale_from_amax(max|x|) computed on the device",
    operation="quantize",
    formats=("int8", "int4", "int(8,pow2=1)", "fp8_e4m3(scale=tensor)", "fp8_e5m2(scale=tensor,pow2=1)",
             "p3109(8,3,scale=tensor)", "posit(8,0,scale=tensor)", "lns8", "lns(12,gamma=16,pow2=1)"),
    roundings=ROUNDINGS + ("stochastic(5)",),
    dtypes=(torch.float32, torch.float64),
    code_space="scaled",
))

UNCLAMPED_QUOTIENT = register(FastPath(
    name="fixed-quotient-unclamped",
    reference="FixedPoint.round_unscaled_: the quotient x / s rounded, then clamped to the code range",
    operation="quantize",
    formats=("int8", "int4", "int(16)", "int(23)", "int(8,symmetric=0)", "int(8,pow2=1)",
             "fixed(12,4,scale=tensor)"),
    roundings=("nearest", "toward_zero"),
    dtypes=(torch.float32, torch.float64),
    code_space="scaled",
))
"""Per-tensor scales from a finite max|x| bound every quotient x / s (`quotients_within_max`), and
with nearest or toward-zero rounding the fixed-point family's clamp to its code range cannot act
there (`FixedPoint.clamp_cannot_act_within_max`): the pass is left out."""

_ARRAY_TYPECODE = {torch.float32: "f", torch.float64: "d"}
"""The array module's typecode of a float dtype: a member's scale (normal in x's dtype, checked
before) converts to it exactly."""


def host_tensor_scale(fmt: NumberFormat, x: Tensor) -> float:
    """`fmt.scale_from_amax(max|x|)` for the whole of x (float32 or float64), as a Python float.

    The same value bit for bit: the float32 division max|x| / max is the float64 quotient
    rounded to float32 (float64 carries more than twice float32's digits, so that double
    rounding is exact), and the power of two comes from the same frexp.
    """
    return host_scale_of_amax(fmt, host_abs_max(x), x.dtype)


def host_scale_of_amax(fmt: NumberFormat, amax: float, dtype: torch.dtype) -> float:
    """`fmt.scale_from_amax` of max|x| = `amax` of a float32 or float64 tensor, as a Python float."""
    if not 0.0 < amax < math.inf:  # zero, inf or NaN
        return 1.0
    if dtype == torch.float32:  # float32's rounding, with no bound on the exponent (a float64 value)
        ratio = round_to_float32_significand(amax / fmt.max_float32)
    else:
        ratio = amax / fmt.max
    if not fmt.scaling.pow2:
        return ratio if 0.0 < ratio < math.inf else 1.0  # as scale_from_amax: never a zero or inf divisor
    mantissa, exponent = math.frexp(ratio)
    exponent -= mantissa == 0.5
    # float64 ratio >= the smallest subnormal (or 0: exponent 0), so 2^exponent is a float64 value
    # unless it passes the top, where the cast gives inf.
    return math.ldexp(1.0, exponent) if exponent <= 1023 else math.inf


def quotients_within_max(fmt: NumberFormat, amax: float, scale: float, dtype: torch.dtype) -> bool:
    """Whether every |x / scale| lies within max (1 + u) / (1 - u) (u = 2^-p, p: the significand bits of
    x's dtype) for x of max|x| = `amax` and its scale `host_scale_of_amax(fmt, amax)`: where the ratio
    max|x| / max is finite and non-zero and the scale a normal of the dtype, the scale is that ratio
    rounded once, s >= (max|x| / max) (1 - u) (a power of two above it only lowers the quotients), so
    |x / s| <= max|x| / s <= max / (1 - u) and its rounding at most max (1 + u) / (1 - u). Not where
    max|x| is inf or NaN (scale 1, the values unbounded), the ratio overflows (float64 max|x| over a
    max below 1: its scale is the 1 that stands for it, the quotients up to max|x|) or the
    ratio was flushed or replaced (a subnormal ratio, rounded with a larger relative error, or the 1
    that stands for a zero one)."""
    ratio = amax / (fmt.max_float32 if dtype == torch.float32 else fmt.max)  # as host_scale_of_amax
    return 0.0 < ratio < math.inf and torch.finfo(dtype).tiny <= scale < (
        FLOAT32_SCALE_LIMIT if dtype == torch.float32 else math.inf)


def quantize_per_tensor(fmt: NumberFormat, x: Tensor, rounding: str, generator: torch.Generator | None
                        ) -> Tensor | None:
    """round(x / scale) * scale with the scale taken on the host (`host_shortcuts`); None elsewhere.

    The scale comes back as a 0-dim tensor of x's dtype holding the same value (the CPU divides by
    it exactly); a scale of 1 skips the division and product (both exact), a float32 subnormal one
    takes `round_by_float32_scale_values`, as does one that float32 cannot hold (below its subnormals
    or above its max: the scale is exact in float64); a power of two may be fused into the rounding.
    """
    if not host_shortcuts(x.device) or not enabled(HOST_SCALE):
        return None
    amax = host_abs_max(x)
    scale = host_scale_of_amax(fmt, amax, x.dtype)
    if scale == 1.0:  # x / 1 and y * 1 are exact: skip both
        return fmt.round_unscaled(x, rounding, generator)
    if x.dtype == torch.float32 and not FLOAT32_MIN_NORMAL <= scale < FLOAT32_SCALE_LIMIT:
        scale64 = constant(scale, torch.float64, x.device)
        return fmt.round_by_float32_scale_values(x, scale64, rounding, generator)
    fused = fmt.round_scaled_on_host(x, scale, rounding) if fmt.scaling.pow2 else None
    if fused is not None:
        return fused
    scale_t = torch.scalar_tensor(scale, dtype=x.dtype)  # cheaper to operate with than a float
    return fmt.round_scaled(x, scale_t, rounding, generator, quotients_within_max(fmt, amax, scale, x.dtype))


def quantize_members_per_tensor(fmt: NumberFormat, x: Tensor, low: Tensor, high: Tensor,
                                shape: list[int], rounding: str, generator: torch.Generator | None
                                ) -> Tensor | None:
    """`quantize_per_tensor` of each member x[g] of a stacked tensor, with one scale per member taken
    on the host (`host_shortcuts`): the members' minima and maxima (`low`, `high`, (G,)) read back as
    two lists and each member's scale computed as `host_tensor_scale` computes it alone, so two reads
    and one small tensor replace the dozen scalar operations of `scale_from_amax` and its range check.
    `shape` broadcasts the (G,) scales over x. None off the CPU, with fast paths off, or where a
    member's float32 scale would leave float32's normals (the caller's exact path takes those)."""
    if not host_shortcuts(x.device) or not enabled(HOST_SCALE):
        return None
    dtype = x.dtype
    float32 = dtype == torch.float32
    scales, ones, within_max = [], True, True  # one pass over the members: its cost is per member
    for lo, hi in zip(low.tolist(), high.tolist(), strict=True):
        amax = max(-lo, hi)
        scale = host_scale_of_amax(fmt, amax, dtype)
        if float32 and not FLOAT32_MIN_NORMAL <= scale < FLOAT32_SCALE_LIMIT:
            return None
        scales.append(scale)
        ones = ones and scale == 1.0
        within_max = within_max and quotients_within_max(fmt, amax, scale, dtype)
    if ones:  # x / 1 and y * 1 are exact: skip both
        return fmt.round_unscaled(x, rounding, generator)
    # array to tensor without a copy: torch.tensor from a list costs about ten small operations here
    scale_t = torch.frombuffer(array.array(_ARRAY_TYPECODE[dtype], scales), dtype=dtype).view(shape)
    return fmt.round_scaled(x, scale_t, rounding, generator, within_max)
