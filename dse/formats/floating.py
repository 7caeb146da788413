"""Binary floating point FP(e, m): IEEE-style formats and the OCP FP8/FP6/FP4 variants.

A format has 1 sign bit, `exp_bits` exponent bits and `man_bits` mantissa bits, and one of four
special-value encodings (`special`):

* ``ieee``: the top exponent holds +-inf (mantissa 0) and NaN (any other mantissa); bias 2^(e-1)-1.
* ``fn`` (OCP E4M3): no inf; only the all-ones magnitude is NaN, so the top exponent holds values.
* ``fnuz``: no inf and no -0; NaN is the code of -0; bias 2^(e-1).
* ``none`` (OCP FP6/FP4): every code is a finite number; there is no NaN or inf code.

Policies (documented in docs/formats.md, tested in tests/formats/test_floating.py):

* Rounding: x is scaled by a power of two so that the integers are the grid points of x's binade
  (the significand at the grid step), rounded by `round_to_integer` and scaled back; so nearest is
  ties-to-even on the grid, including ties between the largest subnormal and the smallest normal.
  With `subnormals` off the grid below the smallest normal is {0, min_normal}, rounded the same way.
* Overflow applies to the rounded result: beyond `max` it becomes +-inf (``overflow=inf``, IEEE
  default: x >= max + half a step goes to inf under nearest), NaN (``overflow=nan``, ml_dtypes'
  E4M3FN behaviour) or +-max (``overflow=saturate``, the default of fn/fnuz/none; +-inf -> +-max
  too). Toward-zero rounding never overflows a finite input (IEEE): it gives +-max.
* NaN stays NaN under `quantize` for every format, including fp6/fp4 which have no NaN code;
  `encode` of NaN raises ValueError for those.
* -0 keeps its sign (fnuz has no -0: results are +0).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from typing import ClassVar

import torch
from torch import Tensor

from dse.formats.base import (
    NumberFormat,
    Scaling,
    check_rounding,
    constant,
    cpu_chunk_elements,
    fitted,
    float_exponent,
    for_slices,
    power_of_two,
    round_to_integer,
    slice_scratch,
)
from dse.formats.spec import (
    bool_arg,
    call_spec,
    choice_arg,
    get,
    int_arg,
    register_alias,
    register_family,
    scaling_arg,
)

SPECIALS: tuple[str, ...] = ("ieee", "fn", "fnuz", "none")
# The overflow policies each encoding allows; the first is its default.
OVERFLOWS: dict[str, tuple[str, ...]] = {
    "ieee": ("inf", "saturate"),
    "fn": ("saturate", "nan"),
    "fnuz": ("saturate", "nan"),
    "none": ("saturate",),
}
MAX_EXP_BITS = 10  # every grid and code stays exact in float64 and int64
MAX_MAN_BITS = 52



@dataclass(frozen=True)
class _BinaryLayout:
    """Bit layout of a torch float dtype, for building powers of two from exponent fields."""

    int_dtype: torch.dtype
    man_bits: int
    bias: int

    @property
    def exponent_mask(self) -> int:
        return (2 * self.bias + 1) << self.man_bits

    @property
    def min_normal_exponent(self) -> int:
        return 1 - self.bias

    @property
    def max_exponent(self) -> int:
        return self.bias

    def exponent_field(self, exponent: int) -> int:
        return (exponent + self.bias) << self.man_bits


_LAYOUTS: dict[torch.dtype, _BinaryLayout] = {
    torch.float32: _BinaryLayout(torch.int32, 23, 127),
    torch.float64: _BinaryLayout(torch.int64, 52, 1023),
}


@dataclass(frozen=True)
class _Plan:
    """How FloatFormat.round_unscaled rounds one input dtype on one kind of device in one mode."""

    copy: bool  # every value of the dtype is on the grid
    cast: torch.dtype | None  # a torch cast that is this rounding, bit for bit
    work_dtype: torch.dtype  # the dtype the rounding runs in
    kernel: Kernel | None  # the fused nearest rounding, if any


@dataclass(frozen=True)
class FloatFormat(NumberFormat):
    """FP(e, m) with a special-value encoding, an overflow policy and optional subnormals."""

    exp_bits: int
    man_bits: int
    special: str = "ieee"
    overflow: str | None = None  # None: the encoding's default (OVERFLOWS[special][0])
    subnormals: bool = True
    scaling: Scaling = Scaling()

    family: ClassVar[str] = "fp"

    def __post_init__(self) -> None:
        e, m = self.exp_bits, self.man_bits
        int_arg("e", e, 1, MAX_EXP_BITS)
        int_arg("m", m, 0, MAX_MAN_BITS)
        choice_arg("special", self.special, SPECIALS)
        if self.overflow is None:
            object.__setattr__(self, "overflow", OVERFLOWS[self.special][0])
        if self.overflow not in OVERFLOWS[self.special]:
            raise ValueError(f"overflow must be one of {', '.join(OVERFLOWS[self.special])} for "
                             f"special={self.special}, got {self.overflow!r}")
        if self.special == "ieee" and (e < 2 or m < 1):
            raise ValueError(f"special=ieee needs e >= 2 and m >= 1 (an exponent for inf/NaN and a "
                             f"mantissa bit for NaN), got e={e}, m={m}")
        if self.special == "fn" and e + m < 2:
            raise ValueError("special=fn needs e + m >= 2 (otherwise only 0 and NaN remain)")
        if m == 0 and not self.subnormals:
            object.__setattr__(self, "subnormals", True)  # no mantissa, no subnormals: one grid

    # --- the grid ---------------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1 + (self.special == "fnuz")

    @property
    def min_normal_exponent(self) -> int:
        return 1 - self.bias

    @cached_property
    def max_magnitude_code(self) -> int:
        if self.special == "ieee":  # below the inf/NaN exponent
            return ((2**self.exp_bits - 1) << self.man_bits) - 1
        all_ones = self.sign_bit - 1
        return all_ones - 1 if self.special == "fn" else all_ones  # fn: all ones is NaN

    @cached_property
    def max(self) -> float:
        return self._magnitude_value(self.max_magnitude_code)

    @property
    def max_exponent(self) -> int:
        """floor(log2(max)): the exponent of the top binade."""
        return math.frexp(self.max)[1] - 1

    @property
    def min_positive(self) -> float:
        if self.subnormals and self.man_bits > 0:
            return math.ldexp(1.0, self.min_normal_exponent - self.man_bits)
        return math.ldexp(1.0, self.min_normal_exponent)

    def _magnitude_value(self, code: int) -> float:
        biased, mantissa = code >> self.man_bits, code & (2**self.man_bits - 1)
        if biased == 0:
            scaled = mantissa if self.subnormals else 0
            return math.ldexp(float(scaled), self.min_normal_exponent - self.man_bits)
        return math.ldexp(float(2**self.man_bits + mantissa), biased - self.bias - self.man_bits)

    # --- spec -------------------------------------------------------------------------------------
    @cached_property
    def spec(self) -> str:
        options = [f"e={self.exp_bits}", f"m={self.man_bits}"]
        if self.special != "ieee":
            options.append(f"special={self.special}")
        if self.overflow != OVERFLOWS[self.special][0]:
            options.append(f"overflow={self.overflow}")
        if not self.subnormals:
            options.append("subnormals=0")
        unscaled = replace(self, scaling=Scaling())
        names = [name for name, expansion in _ALIASES.items() if get(expansion) == unscaled]
        scale_options = self.scaling.options(Scaling())
        if names:
            name = min(names, key=len)
            return f"{name}({','.join(scale_options)})" if scale_options else name
        return call_spec("fp", [], options + scale_options)

    # --- rounding ---------------------------------------------------------------------------------
    def round_unscaled(self, x: Tensor, rounding: str, generator: torch.Generator | None) -> Tensor:
        if x.dtype not in _LAYOUTS:
            check_rounding(rounding)
            return self.round_unscaled(x.float(), rounding, generator).to(x.dtype)
        plan = self._plans.get((x.dtype, x.device, rounding))
        if plan is None:
            plan = self._plan(x.dtype, x.device, rounding)
        if plan.copy:
            return x.clone()
        if plan.cast is not None:
            return x.to(plan.cast).to(x.dtype)
        work = x if plan.work_dtype == x.dtype else x.to(plan.work_dtype)
        if plan.kernel is not None and not (work.requires_grad and torch.is_grad_enabled()):
            out = map_chunks(plan.kernel, work)  # out= passes are not differentiable: not when recorded
        else:
            out = _in_chunks(lambda chunk: self.round_by_grid(chunk, rounding, generator), work)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    @cached_property
    def _plans(self) -> dict[tuple[torch.dtype, torch.device, str], _Plan]:
        """The rounding route per (input dtype, device, rounding mode), decided once."""
        return {}

    def _plan(self, dtype: torch.dtype, device: torch.device, rounding: str) -> _Plan:
        check_rounding(rounding)
        cast = self._exact_cast(dtype) if device.type == "cpu" and rounding == "nearest" else None
        work_dtype = dtype if self._computes_natively_in(dtype) else torch.float64
        kernel = self._nearest_kernel(work_dtype, device) if rounding == "nearest" else None
        plan = _Plan(self._holds_every_value_of(dtype), cast, work_dtype, kernel)
        self._plans[(dtype, device, rounding)] = plan
        return plan

    def nearest_kernel(self, dtype: torch.dtype, device: torch.device) -> Kernel | None:
        """The fused kernel(x, out, int scratch) that `round_unscaled(x, "nearest")` runs for x of
        `dtype` on `device` (x not recorded by autograd), for callers that round slices into their
        own space (block formats); None where it runs something else (a cast, a copy, another dtype)."""
        plan = self._plans.get((dtype, device, "nearest")) or self._plan(dtype, device, "nearest")
        if plan.copy or plan.cast is not None or plan.work_dtype != dtype:
            return None
        return plan.kernel

    def _round_scaled_on_host(self, x: Tensor, scale: float, rounding: str) -> Tensor | None:
        """round(x / scale) * scale in one fused pass, for a power-of-two scale 2^k known on the host:
        nearest rounding onto the grid times 2^k is the magic rounding with every constant's
        exponent moved by k, which spares the division and the multiplication. It equals them bit
        for bit: x / 2^k is exact unless it falls below float32's normals, where both round to
        +-0 as long as half the smallest grid value lies above them. None where that or the
        constants' range does not hold (or for other modes and dtypes): the caller divides."""
        if rounding != "nearest" or x.dtype != torch.float32 or (x.requires_grad and torch.is_grad_enabled()):
            return None
        k = math.frexp(scale)[1] - 1
        kernel = self._scaled_kernels.get((k, x.device), False)
        if kernel is False:
            kernel = self._scaled_kernels[(k, x.device)] = self._scaled_kernel(k, x.device)
        return None if kernel is None else map_chunks(kernel, x)

    @cached_property
    def _scaled_kernels(self) -> dict[tuple[int, torch.device], Kernel | None]:
        return {}

    def _scaled_kernel(self, k: int, device: torch.device) -> Kernel | None:
        """The magic nearest rounding of float32 onto the grid times 2^k (see _round_scaled_on_host)."""
        layout = _LAYOUTS[torch.float32]
        m, emin, emax = self.man_bits, self.min_normal_exponent, self.max_exponent
        if (not (self._computes_natively_in(torch.float32) and self._magic_rounds_in(layout))
                or self.min_positive <= 2.0 ** (layout.min_normal_exponent + 1)  # (the +-0 argument)
                or emin + k < layout.min_normal_exponent  # the lowest binade is a normal float32
                or emax + k + layout.man_bits + 1 - m > layout.max_exponent  # C stays finite
                or (self.overflow == "inf" and k <= -emax)):  # 2^(127 - emax - k) is a normal float32
            return None
        return self._magic_kernel(layout, device, k)

    def round_by_grid(self, x: Tensor, rounding: str, generator: torch.Generator | None) -> Tensor:
        """The general rounding (no cast shortcuts), natively in x's dtype, which must hold the grid.

        The grid step in x's binade is a power of two built from x's exponent field (clamped to the
        format's exponent range), t = x / step is rounded to an integer, and t * step is the result.
        """
        layout = _LAYOUTS[x.dtype]
        m = self.man_bits
        exponent_field = torch.bitwise_and(x.view(layout.int_dtype),
                                           constant(layout.exponent_mask, layout.int_dtype, x.device))
        lowest = layout.exponent_field(self.min_normal_exponent)
        highest = layout.exponent_field(min(self.max_exponent + 1, layout.max_exponent))
        below_normal = None if self.subnormals else exponent_field < lowest
        exponent_field.clamp_(lowest, highest)
        if self.min_normal_exponent - m >= layout.min_normal_exponent:
            # The step itself is a normal number of x's dtype: one division, one multiplication.
            step = exponent_field.sub_(constant(m << layout.man_bits, layout.int_dtype, x.device))
            if below_normal is not None:
                step.masked_fill_(below_normal, lowest)
            step = step.view(x.dtype)
            return self._apply_overflow(round_to_integer(x / step, rounding, generator).mul_(step), x,
                                        rounding)
        # Wide formats (e.g. bf16 in float32): steps below the dtype's normals; scale in two parts.
        binade = exponent_field.view(x.dtype)
        significand_scale: Tensor | float = 2.0**m
        if below_normal is not None:
            significand_scale = torch.where(below_normal, 1.0, 2.0**m).to(x.dtype)
        integers = round_to_integer((x / binade).mul_(significand_scale), rounding, generator)
        return self._apply_overflow(integers.div_(significand_scale).mul_(binade), x, rounding)

    def _nearest_kernel(self, dtype: torch.dtype, device: torch.device) -> Kernel | None:
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
        layout = _LAYOUTS[dtype]
        if self._magic_rounds_in(layout):
            return self._magic_kernel(layout, device, 0)
        if (self.subnormals and self.man_bits <= layout.man_bits - 2 and self.special == "ieee"
                and self.overflow == "inf" and self.min_normal_exponent == layout.min_normal_exponent):
            # Same exponent range as the dtype: the grid is every 2^(P-m)-th bit pattern, subnormals
            # included, and rounding the pattern up past the top finite binade gives inf.
            return functools.partial(_pattern_round, shift=layout.man_bits - self.man_bits)
        return None

    def _magic_kernel(self, layout: _BinaryLayout, device: torch.device, k: int) -> Kernel:
        """The magic-constant nearest rounding onto the grid times 2^k in the layout's dtype."""
        return functools.partial(
            _magic_round, mask=constant(layout.exponent_mask, layout.int_dtype, device),
            lowest=layout.exponent_field(self.min_normal_exponent + k),
            highest=layout.exponent_field(self.max_exponent + k),
            factor=1.5 * 2.0 ** (layout.man_bits - self.man_bits),
            overflow=functools.partial(self._overflow_nearest, scale_exponent=k),
            sign=self.special != "fnuz")  # fnuz: +0 is its only zero

    def _magic_rounds_in(self, layout: _BinaryLayout) -> bool:
        """Whether the magic-constant rounding (`_nearest_kernel`) works in the layout's dtype:
        subnormals on (the floor of the grid step), m <= P - 2, and every constant C finite."""
        return (self.subnormals and self.man_bits <= layout.man_bits - 2
                and self.max_exponent - self.man_bits + layout.man_bits <= layout.max_exponent)

    def _overflow_nearest(self, out: Tensor, scale_exponent: int = 0, scratch: Tensor | None = None) -> None:
        """The overflow policy after the magic rounding (in place), on the grid times 2^scale_exponent;
        scratch, where given, is spare space of out's size (any dtype of its width)."""
        limit = math.ldexp(self.max, scale_exponent)
        if self.overflow == "saturate":
            out.clamp_(-limit, limit)
        elif self.overflow == "inf":
            # The ieee grid fills its top binade: scaled so that it ends at the dtype's top binade,
            # every rounded value beyond max overflows to inf, and scaling back is exact.
            shift = _LAYOUTS[out.dtype].max_exponent - self.max_exponent - scale_exponent
            out.mul_(2.0**shift).mul_(2.0**-shift)
        else:
            out.masked_fill_(out.abs() > limit, math.nan)

    def _apply_overflow(self, rounded: Tensor, x: Tensor, rounding: str) -> Tensor:
        limit = self.max
        if self.overflow == "saturate":
            out = rounded.clamp_(-limit, limit)
        elif rounding == "toward_zero":
            # IEEE: rounding toward zero sends finite overflow to +-max; infinities keep the policy.
            at_infinity = x if self.overflow == "inf" else math.nan
            out = torch.where(torch.isinf(x), at_infinity, rounded.clamp_(-limit, limit))
        elif self.overflow == "inf":  # rounded values beyond max are 2^(emax+1) or more: scale through inf
            out = rounded
            self._overflow_nearest(out)
        else:
            out = rounded.masked_fill_(rounded.abs() > limit, math.nan)
        if self.special == "fnuz":
            out = out.add_(0.0)  # -0 + 0 = +0: fnuz has no negative zero
        return out

    def _holds_every_value_of(self, dtype: torch.dtype) -> bool:
        """True when every value of float32 input is on the grid (fp32 and wider IEEE formats)."""
        return (dtype == torch.float32 and self.special == "ieee" and self.overflow == "inf"
                and self.man_bits >= 23 and (self.exp_bits > 8 or (self.exp_bits == 8 and self.subnormals)))

    def _exact_cast(self, dtype: torch.dtype) -> torch.dtype | None:
        """A torch dtype whose CPU cast from `dtype` is this format's nearest rounding, bit for bit.

        Checked on all 2^32 float32 patterns on CPU; other devices take the general rounding.
        """
        if self.special != "ieee" or self.overflow != "inf" or not self.subnormals:
            return None
        if dtype == torch.float32:
            return {(8, 7): torch.bfloat16, (5, 10): torch.float16,
                    (5, 2): torch.float8_e5m2}.get((self.exp_bits, self.man_bits))
        if dtype == torch.float64 and (self.exp_bits, self.man_bits) == (8, 23):
            return torch.float32
        return None

    def _computes_natively_in(self, dtype: torch.dtype) -> bool:
        """Whether `round_by_grid` is exact in `dtype`: the grid, steps and max fit the dtype."""
        layout = _LAYOUTS[dtype]
        return (self.man_bits <= layout.man_bits
                and self.min_normal_exponent >= layout.min_normal_exponent
                and self.max_exponent <= layout.max_exponent)

    # --- codes ------------------------------------------------------------------------------------
    @property
    def sign_bit(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def nan_code(self) -> int | None:
        """The code `encode` gives NaN (positive quiet NaN); None for formats without NaN."""
        if self.special == "ieee":
            return ((2**self.exp_bits - 1) << self.man_bits) | (1 << (self.man_bits - 1))
        if self.special == "fn":
            return self.sign_bit - 1
        return self.sign_bit if self.special == "fnuz" else None

    def encode(self, x: Tensor) -> Tensor:
        rounded = self.round_unscaled(x.double(), "nearest", None)
        nan = torch.isnan(rounded)
        if self.nan_code is None and bool(nan.any()):
            raise ValueError(f"{self.spec} has no NaN code: cannot encode NaN")
        magnitude = rounded.abs()
        binade = torch.where(magnitude > 0, float_exponent(magnitude), self.min_normal_exponent)
        binade = binade.clamp(min=self.min_normal_exponent)
        finite = torch.where(torch.isfinite(magnitude), magnitude, 0.0)
        significand = (finite / power_of_two(binade - self.man_bits)).to(torch.int64)
        codes = ((binade - self.min_normal_exponent) << self.man_bits) + significand
        if self.special == "ieee":
            codes = torch.where(torch.isinf(magnitude), (2**self.exp_bits - 1) << self.man_bits, codes)
        codes = torch.where(torch.signbit(rounded), codes | self.sign_bit, codes)
        return torch.where(nan, self.nan_code or 0, codes)

    def decode(self, codes: Tensor) -> Tensor:
        codes = codes.to(torch.int64)
        if bool(((codes < 0) | (codes >> self.bits != 0)).any()):
            raise ValueError(f"{self.spec} codes lie in 0..{2**self.bits - 1}")
        m = self.man_bits
        magnitude = codes & (self.sign_bit - 1)
        biased, mantissa = magnitude >> m, magnitude & (2**m - 1)
        normal = biased > 0
        significand = (mantissa + (normal.to(torch.int64) << m)).double() * 2.0**-m
        values = significand * power_of_two(biased.clamp(min=1) - self.bias)
        if not self.subnormals:
            values = torch.where(normal, values, 0.0)
        if self.special == "ieee":
            top = biased == 2**self.exp_bits - 1
            values = torch.where(top, torch.where(mantissa == 0, math.inf, math.nan), values)
        elif self.special == "fn":
            values = torch.where(magnitude == self.sign_bit - 1, math.nan, values)
        values = torch.where(codes & self.sign_bit != 0, -values, values)
        if self.special == "fnuz":
            values = torch.where(codes == self.sign_bit, math.nan, values)
        return values


Kernel = Callable[[Tensor, Tensor, Tensor], None]


def _magic_round(x: Tensor, out: Tensor, scratch: Tensor, *, mask: Tensor, lowest: int, highest: int,
                 factor: float, overflow: Callable[..., None], sign: bool) -> None:
    """out = x rounded to nearest by the magic constant (see FloatFormat._nearest_kernel)."""
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


def map_chunks(kernel: Kernel, x: Tensor) -> Tensor:
    """out = kernel(x) for an elementwise kernel(x, out, scratch) that writes into out and may use
    an integer scratch of x's size; slice by slice (`for_slices`)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    scratch = slice_scratch(x, _LAYOUTS[x.dtype].int_dtype)
    for_slices(x, out, lambda part, result: kernel(part, result, fitted(scratch, part)))
    return out


def _in_chunks(round_chunk: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Apply an elementwise function slice by slice (`for_slices`): on the CPU its passes run in cache."""
    if x.numel() <= cpu_chunk_elements(x):
        return round_chunk(x)
    x = x.contiguous()
    out = torch.empty_like(x)
    for_slices(x, out, lambda part, result: result.copy_(round_chunk(part)))
    return out


def fp(e: int | None = None, m: int | None = None, special: str = "ieee", overflow: str | None = None,
       subnormals: int | str = 1, scale: str | None = None, pow2: int | str | None = None,
       axis: int | None = None, block: int | None = None) -> FloatFormat:
    """fp(e=E, m=M, special=ieee|fn|fnuz|none, overflow=inf|nan|saturate, subnormals=1|0, scale=...).

    e in 1..10, m in 0..52; overflow defaults to inf for ieee and saturate otherwise.
    """
    if e is None or m is None:
        raise ValueError(f"fp needs e and m: fp(e=E,m=M) with E in 1..{MAX_EXP_BITS}, M in 0..{MAX_MAN_BITS}")
    return FloatFormat(
        exp_bits=int_arg("e", e, 1, MAX_EXP_BITS),
        man_bits=int_arg("m", m, 0, MAX_MAN_BITS),
        special=choice_arg("special", special, SPECIALS),
        overflow=None if overflow is None else choice_arg("overflow", overflow, ("inf", "nan", "saturate")),
        subnormals=bool_arg("subnormals", subnormals),
        scaling=scaling_arg(Scaling(), scale, pow2, axis, block),
    )


_ALIASES: dict[str, str] = {
    "fp32": "fp(e=8,m=23)",
    "tf32": "fp(e=8,m=10)",
    "bf16": "fp(e=8,m=7)",
    "fp16": "fp(e=5,m=10)",
    "fp8_e4m3": "fp(e=4,m=3,special=fn)",
    "fp8_e5m2": "fp(e=5,m=2)",
    "fp8_e4m3fnuz": "fp(e=4,m=3,special=fnuz)",
    "fp8_e5m2fnuz": "fp(e=5,m=2,special=fnuz)",
    "fp6_e3m2": "fp(e=3,m=2,special=none)",
    "fp6_e2m3": "fp(e=2,m=3,special=none)",
    "fp4_e2m1": "fp(e=2,m=1,special=none)",
}

register_family("fp", fp)
for _name, _expansion in _ALIASES.items():
    register_alias(_name, _expansion)
