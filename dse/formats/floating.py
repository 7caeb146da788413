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

import math
from dataclasses import dataclass, replace
from functools import cached_property
from typing import ClassVar

import torch
from torch import Tensor

from dse.formats.base import (
    FLOAT_LAYOUTS,
    NumberFormat,
    Scaling,
    constant,
    float_exponent,
    power_of_two,
    round_to_integer,
)
from dse.formats.fast import floating as fast_floating
from dse.formats.fast.slices import Kernel, in_chunks
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
    def spec_options(self) -> dict[str, str]:
        return {"e": str(self.exp_bits), "m": str(self.man_bits), "special": self.special,
                "overflow": str(self.overflow), "subnormals": str(int(self.subnormals)),
                **self.scaling.spec_options()}

    def round_unscaled(self, x: Tensor, rounding: str, generator: torch.Generator | None) -> Tensor:
        fast = fast_floating.round_unscaled(self, x, rounding)
        return fast if fast is not None else self.round_reference(x, rounding, generator)

    def round_reference(self, x: Tensor, rounding: str, generator: torch.Generator | None) -> Tensor:
        """The reference rounding: `round_by_grid` in x's dtype (float32 or float64) where it holds the
        grid, else in float64, slice by slice."""
        work = x if self.computes_natively_in(x.dtype) else x.double()
        out = in_chunks(lambda chunk: self.round_by_grid(chunk, rounding, generator), work)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def nearest_kernel(self, dtype: torch.dtype, device: torch.device) -> Kernel | None:
        """The fused kernel(x, out, int scratch) that `round_unscaled(x, "nearest")` runs for x of
        `dtype` on `device`, for callers that round slices into their own space (block formats); None
        where it runs something else (fast.floating)."""
        return fast_floating.nearest_kernel(self, dtype, device)

    def round_scaled_on_host(self, x: Tensor, scale: float, rounding: str) -> Tensor | None:
        return fast_floating.round_scaled_on_host(self, x, scale, rounding)

    def round_by_grid(self, x: Tensor, rounding: str, generator: torch.Generator | None) -> Tensor:
        """The general rounding (no cast shortcuts), natively in x's dtype, which must hold the grid.

        The grid step in x's binade is a power of two built from x's exponent field (clamped to the
        format's exponent range), t = x / step is rounded to an integer, and t * step is the result.
        """
        layout = FLOAT_LAYOUTS[x.dtype]
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
            rounded = round_to_integer(x / step, rounding, generator, in_place=True)
            return self._apply_overflow(rounded.mul_(step), x, rounding)
        # Wide formats (e.g. bf16 in float32): steps below the dtype's normals; scale in two parts.
        binade = exponent_field.view(x.dtype)
        significand_scale: Tensor | float = 2.0**m
        if below_normal is not None:
            significand_scale = torch.where(below_normal, 1.0, 2.0**m).to(x.dtype)
        integers = round_to_integer((x / binade).mul_(significand_scale), rounding, generator, in_place=True)
        return self._apply_overflow(integers.div_(significand_scale).mul_(binade), x, rounding)

    def _overflow_nearest(self, out: Tensor, scale_exponent: int = 0, scratch: Tensor | None = None) -> None:
        """The overflow policy after the magic rounding (in place), on the grid times 2^scale_exponent;
        scratch, where given, is spare space of out's size (any dtype of its width)."""
        limit = math.ldexp(self.max, scale_exponent)
        if self.overflow == "saturate":
            out.clamp_(-limit, limit)
        elif self.overflow == "inf":
            # The ieee grid fills its top binade: scaled so that it ends at the dtype's top binade,
            # every rounded value beyond max overflows to inf, and scaling back is exact.
            shift = FLOAT_LAYOUTS[out.dtype].max_exponent - self.max_exponent - scale_exponent
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

    def computes_natively_in(self, dtype: torch.dtype) -> bool:
        """Whether `round_by_grid` is exact in `dtype`: the grid, steps and max fit the dtype."""
        layout = FLOAT_LAYOUTS[dtype]
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
        codes = self.checked_codes(codes)
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
