"""Fast paths of binary floating point (FloatFormat, P3109): exact torch casts, the copy of a
grid that holds every input value, fused magic-constant and bit-pattern nearest rounding, and the
magic rounding with a power-of-two tensor scale folded in. Each equals `FloatFormat.round_reference`
(`round_by_grid`, in float64 where the input dtype cannot hold the grid) bit for bit."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dse.formats.base import FLOAT_LAYOUTS, ROUNDINGS, BinaryLayout, check_rounding, constant
from dse.formats.fast import FastPath, enabled, host_shortcuts, reference_only_active, register
from dse.formats.fast.slices import Kernel, map_chunks

if TYPE_CHECKING:
    from dse.formats.floating import FloatFormat

_REFERENCE = "FloatFormat.round_reference (round_by_grid; in float64 where the dtype cannot hold the grid)"
COPY = register(FastPath(
    name="fp-copy", reference=_REFERENCE, operation="round_unscaled",
    formats=("fp32", "fp(e=9,m=30)"),
    roundings=ROUNDINGS + ("stochastic(5)",)))
EXACT_CAST = register(FastPath(
    name="fp-exact-cast", reference=_REFERENCE, operation="round_unscaled",
    formats=("bf16", "fp16", "fp8_e5m2")))
EXACT_CAST_FLOAT64 = register(FastPath(
    name="fp-exact-cast-float64", reference=_REFERENCE, operation="round_unscaled",
    formats=("fp32",), dtypes=(torch.float64,)))
MAGIC = register(FastPath(
    name="fp-magic-constant", reference=_REFERENCE, operation="round_unscaled",
    formats=("fp8_e4m3", "fp8_e5m2(overflow=saturate)", "fp8_e4m3fnuz", "fp8_e5m2fnuz", "fp6_e3m2",
             "fp6_e2m3", "fp4_e2m1", "fp(e=4,m=3,overflow=nan,special=fn)", "fp(e=5,m=4)", "p3109(8,3)",
             "p3109(8,5)", "p3109(8,3,domain=finite)", "p3109(8,4,saturation=satfinite)", "fp(e=9,m=10)"),
    dtypes=(torch.float32, torch.float64)))
PATTERN = register(FastPath(
    name="fp-pattern-round", reference=_REFERENCE, operation="round_unscaled",
    formats=("tf32", "fp(e=8,m=4)")))
POW2_HOST_SCALE = register(FastPath(
    name="fp-pow2-host-scale",
    reference="NumberFormat.round_by_scale: x / 2^k rounded by round_reference, times 2^k",
    operation="quantize",
    formats=("fp8_e4m3(scale=tensor,pow2=1)", "fp8_e5m2(scale=tensor,pow2=1)",
             "fp4_e2m1(scale=tensor,pow2=1)", "p3109(8,3,scale=tensor,pow2=1)"),
    code_space="scaled"))


@dataclass(frozen=True)
class _Plan:
    """How FloatFormat.round_unscaled rounds one input dtype on one kind of device in one mode."""

    copy: bool  # every value of the dtype is on the grid
    cast: torch.dtype | None  # a torch cast that is this rounding, bit for bit
    work_dtype: torch.dtype  # the dtype the rounding runs in
    kernel: Kernel | None  # the fused nearest rounding, if any
    kernel_name: str  # its FastPath


def round_unscaled(fmt: FloatFormat, x: Tensor, rounding: str) -> Tensor | None:
    """fmt.round_unscaled(x) by a fast path (x float32 or float64); None where none applies."""
    if reference_only_active():
        return None
    plans = fmt.fast_cache.setdefault("fp-plans", {})
    key = (x.dtype, x.device, rounding, host_shortcuts(x.device))
    plan = plans.get(key)
    if plan is None:
        plan = plans[key] = _plan(fmt, x.dtype, x.device, rounding, key[3])
    if plan.copy and enabled(COPY):
        return x.clone()
    if plan.cast is not None and enabled(EXACT_CAST if x.dtype == torch.float32 else EXACT_CAST_FLOAT64):
        return x.to(plan.cast).to(x.dtype)
    if plan.kernel is None or not enabled(plan.kernel_name):
        return None
    work = x if plan.work_dtype == x.dtype else x.to(plan.work_dtype)
    out = map_chunks(plan.kernel, work, FLOAT_LAYOUTS[work.dtype].int_dtype)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _plan(fmt: FloatFormat, dtype: torch.dtype, device: torch.device, rounding: str, host: bool) -> _Plan:
    """`host`: CPU-only shortcuts allowed (`host_shortcuts`): torch's casts, checked on the CPU only."""
    check_rounding(rounding)
    cast = _exact_cast(fmt, dtype) if host and rounding == "nearest" else None
    work_dtype = dtype if fmt.computes_natively_in(dtype) else torch.float64
    kernel, name = _fused_nearest_kernel(fmt, work_dtype, device) if rounding == "nearest" else (None, "")
    return _Plan(_holds_every_value_of(fmt, dtype), cast, work_dtype, kernel, name)


def nearest_kernel(fmt: FloatFormat, dtype: torch.dtype, device: torch.device) -> Kernel | None:
    """The fused kernel that `round_unscaled(x, "nearest")` runs for x of `dtype` on `device`; None
    where it runs something else (a cast, a copy, another dtype, the reference)."""
    if reference_only_active():
        return None
    plans = fmt.fast_cache.setdefault("fp-plans", {})
    key = (dtype, device, "nearest", host_shortcuts(device))
    plan = plans.get(key)
    if plan is None:
        plan = plans[key] = _plan(fmt, dtype, device, "nearest", key[3])
    if plan.copy or plan.cast is not None or plan.work_dtype != dtype or plan.kernel is None:
        return None
    return plan.kernel if enabled(plan.kernel_name) else None


def without_overflow(kernel: Kernel) -> Kernel | None:
    """The magic-constant kernel `kernel` without its overflow pass (clamp, scaling through inf or
    NaN fill), for callers that know no input magnitude reaches `overflow_bound` (none then rounds
    past max: the pass would change nothing); None for other kernels."""
    if not (isinstance(kernel, functools.partial) and kernel.func is _magic_round):
        return None
    return functools.partial(kernel, overflow=_no_overflow)


def overflow_bound(fmt: FloatFormat) -> float:
    """max plus half the top binade's step: magnitudes below it round to at most max (the magic
    rounding's top binade runs on past max with that step)."""
    return fmt.max + 2.0 ** (fmt.max_exponent - fmt.man_bits - 1)


def _no_overflow(out: Tensor, scratch: Tensor) -> None:
    """No overflow pass (see `without_overflow`)."""


def round_scaled_on_host(fmt: FloatFormat, x: Tensor, scale: float, rounding: str) -> Tensor | None:
    """round(x / scale) * scale in one fused pass, for a power-of-two scale 2^k known on the host:
    nearest rounding onto the grid times 2^k is the magic rounding with every constant's
    exponent moved by k, which spares the division and the multiplication. It equals them bit
    for bit: x / 2^k is exact unless it falls below float32's normals, where both round to
    +-0 as long as half the smallest grid value lies above them. None where that or the
    constants' range does not hold (or for other modes and dtypes): the caller divides."""
    if rounding != "nearest" or reference_only_active() or x.dtype != torch.float32:
        return None
    k = math.frexp(scale)[1] - 1
    kernels = fmt.fast_cache.setdefault("fp-scaled-kernels", {})
    kernel = kernels.get((k, x.device), False)
    if kernel is False:
        kernel = kernels[(k, x.device)] = _scaled_kernel(fmt, k, x.device)
    if kernel is None or not enabled(POW2_HOST_SCALE):
        return None
    return map_chunks(kernel, x, torch.int32)


def _scaled_kernel(fmt: FloatFormat, k: int, device: torch.device) -> Kernel | None:
    """The magic nearest rounding of float32 onto the grid times 2^k (see round_scaled_on_host)."""
    layout = FLOAT_LAYOUTS[torch.float32]
    m, emin, emax = fmt.man_bits, fmt.min_normal_exponent, fmt.max_exponent
    if (not (fmt.computes_natively_in(torch.float32) and _magic_rounds_in(fmt, layout))
            or fmt.min_positive <= 2.0 ** (layout.min_normal_exponent + 1)  # (the +-0 argument)
            or emin + k < layout.min_normal_exponent  # the lowest binade is a normal float32
            or emax + k + layout.man_bits + 1 - m > layout.max_exponent  # C stays finite
            or (fmt.overflow == "inf" and k <= -emax)):  # 2^(127 - emax - k) is a normal float32
        return None
    return _magic_kernel(fmt, layout, device, k)


def _fused_nearest_kernel(fmt: FloatFormat, dtype: torch.dtype, device: torch.device
                          ) -> tuple[Kernel | None, str]:
    """A fused nearest rounding for x in `dtype` (which holds the grid), same results as round_by_grid.

    Magic-constant rounding: with C = 1.5 * 2^(P + k), P the dtype's mantissa bits and 2^k the
    grid step in x's binade (k = max(exponent(x), min_normal_exponent) - m), x + C lies in C's
    binade, whose spacing is 2^k, so the addition itself rounds x to the grid, ties to even
    (C is an even multiple of 2^k); (x + C) - C is exact. C comes from x's exponent field (two
    integer passes), and copying x's sign gives zero results x's sign. Exponents above
    the top binade use the top binade's C: the result then lies beyond max, as it should.
    Needs subnormals (the floor of k), m <= P - 2 and C within the dtype's range; formats with
    e = 8 in float32 (tf32) round the bit pattern instead (round half to even on the integer).
    None where neither applies: round_by_grid runs.
    """
    layout = FLOAT_LAYOUTS[dtype]
    if _magic_rounds_in(fmt, layout):
        return _magic_kernel(fmt, layout, device, 0), MAGIC
    if (fmt.subnormals and fmt.man_bits <= layout.man_bits - 2 and fmt.special == "ieee"
            and fmt.overflow == "inf" and fmt.min_normal_exponent == layout.min_normal_exponent):
        # Same exponent range as the dtype: the grid is every 2^(P-m)-th bit pattern, subnormals
        # included, and rounding the pattern up past the top finite binade gives inf.
        return functools.partial(_pattern_round, shift=layout.man_bits - fmt.man_bits), PATTERN
    return None, ""


def _magic_kernel(fmt: FloatFormat, layout: BinaryLayout, device: torch.device, k: int) -> Kernel:
    """The magic-constant nearest rounding onto the grid times 2^k in the layout's dtype.

    Its overflow pass is the policy of an equal format, made for it, whose fast_cache stays empty:
    fmt's own bound method would tie fmt, its fast_cache and the kernel cached there into a reference
    cycle, which only the cyclic garbage collector frees (11 objects for each format a run builds)."""
    policy = dataclasses.replace(fmt)
    return functools.partial(
        _magic_round, mask=constant(layout.exponent_mask, layout.int_dtype, device),
        lowest=layout.exponent_field(fmt.min_normal_exponent + k),
        highest=layout.exponent_field(fmt.max_exponent + k),
        factor=1.5 * 2.0 ** (layout.man_bits - fmt.man_bits),
        overflow=functools.partial(policy._overflow_nearest, scale_exponent=k),
        sign=fmt.special != "fnuz")  # fnuz: +0 is its only zero

def _magic_rounds_in(fmt: FloatFormat, layout: BinaryLayout) -> bool:
    """Whether the magic-constant rounding (`_fused_nearest_kernel`) works in the layout's dtype:
    subnormals on (the floor of the grid step), m <= P - 2, and every constant C finite."""
    return (fmt.subnormals and fmt.man_bits <= layout.man_bits - 2
            and fmt.max_exponent - fmt.man_bits + layout.man_bits <= layout.max_exponent)


def _holds_every_value_of(fmt: FloatFormat, dtype: torch.dtype) -> bool:
    """True when every value of float32 input is on the grid (fp32 and wider IEEE formats)."""
    return (dtype == torch.float32 and fmt.special == "ieee" and fmt.overflow == "inf"
            and fmt.man_bits >= 23 and (fmt.exp_bits > 8 or (fmt.exp_bits == 8 and fmt.subnormals)))


def _exact_cast(fmt: FloatFormat, dtype: torch.dtype) -> torch.dtype | None:
    """A torch dtype whose CPU cast from `dtype` is this format's nearest rounding, bit for bit.

    Checked on all 2^32 float32 patterns on CPU; other devices take the general rounding.
    """
    if fmt.special != "ieee" or fmt.overflow != "inf" or not fmt.subnormals:
        return None
    if dtype == torch.float32:
        return {(8, 7): torch.bfloat16, (5, 10): torch.float16,
                (5, 2): torch.float8_e5m2}.get((fmt.exp_bits, fmt.man_bits))
    if dtype == torch.float64 and (fmt.exp_bits, fmt.man_bits) == (8, 23):
        return torch.float32
    return None


def _magic_round(x: Tensor, out: Tensor, scratch: Tensor, *, mask: Tensor, lowest: int, highest: int,
                 factor: float, overflow: Callable[..., None], sign: bool) -> None:
    """out = x rounded to nearest by the magic constant (see _fused_nearest_kernel)."""
    bits = x.view(scratch.dtype)
    torch.bitwise_and(bits, mask, out=scratch)
    scratch.clamp_(lowest, highest)
    binade = scratch.view(x.dtype)  # 2^max(exponent(x), emin), capped at the top binade
    torch.add(x, binade, alpha=factor, out=out)  # binade * factor is C, exactly
    out.sub_(binade, alpha=factor)
    overflow(out, scratch=scratch)  # (the binade is spent: scratch is free)
    if sign:  # zero results are +0: x's sign makes them -0 where x is negative (others keep theirs)
        out.copysign_(x)


def _pattern_round(x: Tensor, out: Tensor, scratch: Tensor, *, shift: int) -> None:
    """Round the bit pattern half to even at `shift` bits; NaN is restored from x afterwards."""
    bits, rounded = x.view(scratch.dtype), out.view(scratch.dtype)
    torch.bitwise_right_shift(bits, shift, out=scratch)
    scratch.bitwise_and_(1).add_((1 << (shift - 1)) - 1)
    torch.add(bits, scratch, out=rounded)
    rounded.bitwise_and_(-(1 << shift))
    # A NaN pattern may have rounded into inf or wrapped: min(out, +inf or NaN) puts NaN back.
    torch.clamp(x, min=math.inf, out=scratch.view(x.dtype))
    torch.minimum(out, scratch.view(x.dtype), out=out)


