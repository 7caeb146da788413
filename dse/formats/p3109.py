"""IEEE P3109 binary formats: `p3109(K, P)`, K bits of which P are precision (the implicit bit included).

The formats of the IEEE P3109 working group's interim report (2024), as gfloat's
`format_info_p3109(k, precision, signedness, domain)` defines them, code for code:

* **signed** (default): a sign bit, K - P exponent bits and P - 1 mantissa bits, bias
  2^(K-P-1); no -0: the code 100...0 is the only NaN; P in 1..K-1.
* **unsigned** (`signed=0`): K - P + 1 exponent bits, bias 2^(K-P); the top code 11...1 is NaN;
  P in 1..K.
* **domain**: `extended` (default) has +-inf at the largest magnitude code (and for unsigned +inf at
  the code below NaN); `finite` has no inf, every other code is a number.
* Subnormals always; zero is code 0.

Rounding is FloatFormat's (a grid of 2^(P-1) steps per binade, `round_to_integer` on the
significand), with two P3109 rules on top:

* ties go to the **even code**, which for P >= 2 is the even significand; for P = 1 (no mantissa bits)
  a tie 1.5 * 2^a goes to whichever of 2^a and 2^(a+1) has the even exponent code;
* **saturation modes** (`saturation=`), the report's names: `ovfinf` (default, gfloat's sat=False): a
  rounded value beyond max becomes +-inf in the extended domain and NaN in the finite one, and so
  does an infinite input; `satfinite` (gfloat's sat=True): +-max, infinities included;
  `satpropagate`: finite values saturate to +-max, infinities stay +-inf (NaN in the finite domain).
  Toward-zero rounding never overflows a finite input, as IEEE 754 and gfloat do.

Unsigned formats have no negative values, and gfloat leaves negative inputs undefined: here a
negative input gives 0 under `satfinite` (the lowest value, as saturation does at the top) and
NaN otherwise; -0 gives 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch
from torch import Tensor

from dse.formats.base import FLOAT_LAYOUTS, Scaling, constant, parse_rounding, power_of_two
from dse.formats.fast.slices import Kernel
from dse.formats.floating import MAX_EXP_BITS, FloatFormat
from dse.formats.spec import Value, bool_arg, call_spec, choice_arg, int_arg, register_family, scaling_arg

MIN_WIDTH, MAX_WIDTH = 3, 16  # K = 2 holds at most one finite non-zero value (gfloat misreports max)
DOMAINS: tuple[str, ...] = ("extended", "finite")
SATURATIONS: tuple[str, ...] = ("ovfinf", "satfinite", "satpropagate")


def _overflow(saturation: str, domain: str) -> str:
    """FloatFormat's overflow policy under a saturation mode: inf (extended) or NaN (finite) for ovfinf."""
    if saturation != "ovfinf":
        return "saturate"
    return "inf" if domain == "extended" else "nan"


@dataclass(frozen=True)
class P3109Format(FloatFormat):
    """P3109 K-bit format of precision P; rounds as FloatFormat(e, P - 1, fnuz) with its own codes."""

    width: int = 8
    precision: int = 3
    signed: bool = True
    domain: str = "extended"
    saturation: str = "ovfinf"

    family: ClassVar[str] = "p3109"

    def __post_init__(self) -> None:
        """FloatFormat's checks, with overflow=inf allowed: the extended domain has inf codes."""
        int_arg("e", self.exp_bits, 1, MAX_EXP_BITS)
        int_arg("m", self.man_bits, 0, self.width)
        if self.overflow != _overflow(self.saturation, self.domain):
            raise ValueError(f"p3109 overflow follows saturation and domain, got {self.overflow!r}")

    # --- the grid ---------------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return self.width

    @property
    def bias(self) -> int:
        return 2 ** (self.width - self.precision - (1 if self.signed else 0))

    @property
    def magnitude_codes(self) -> int:
        """Number of magnitude codes: 2^(K-1) signed (the sign bit aside), 2^K unsigned."""
        return 2 ** (self.width - 1) if self.signed else 2**self.width

    @cached_property
    def max_magnitude_code(self) -> int:
        top = self.magnitude_codes - 1 if self.signed else self.magnitude_codes - 2  # unsigned: top is NaN
        return top - 1 if self.domain == "extended" else top  # extended: the top number code is inf

    @property
    def inf_code(self) -> int | None:
        return self.max_magnitude_code + 1 if self.domain == "extended" else None

    @property
    def nan_code(self) -> int:
        return 2 ** (self.width - 1) if self.signed else 2**self.width - 1

    # --- spec -------------------------------------------------------------------------------------
    @cached_property
    def spec(self) -> str:
        options = [] if self.signed else ["signed=0"]
        if self.domain != "extended":
            options.append(f"domain={self.domain}")
        if self.saturation != "ovfinf":
            options.append(f"saturation={self.saturation}")
        options += self.scaling.options(Scaling())
        return call_spec("p3109", [str(self.width), str(self.precision)], options)

    def spec_options(self) -> dict[str, str]:
        return {"width": str(self.width), "precision": str(self.precision), "signed": str(int(self.signed)),
                "domain": self.domain, "saturation": self.saturation, **self.scaling.spec_options()}

    # --- rounding ---------------------------------------------------------------------------------
    def round_unscaled(self, x: Tensor, rounding: str, generator: torch.Generator | None) -> Tensor:
        # FloatFormat's overflow policy (`_overflow`) does ovfinf and satfinite; satpropagate puts the
        # infinities back.
        out = super().round_unscaled(x, rounding, generator)
        if self.man_bits == 0 and parse_rounding(rounding)[0] == "nearest":
            out = self._ties_to_even_exponent(x, out)
        extended = self.domain == "extended"
        if self.saturation == "satpropagate":
            out = torch.where(torch.isinf(x), x if extended else constant(math.nan, x.dtype, x.device), out)
        if not self.signed:  # negative x: NaN, or 0 under satfinite
            if self.saturation == "satfinite":
                out = out.clamp_(min=0.0).add_(0.0)  # the rounded negative values, to +0
            else:
                out = out.masked_fill_(x < 0, math.nan)
        return out

    def nearest_kernel(self, dtype: torch.dtype, device: torch.device) -> Kernel | None:
        """FloatFormat's, where round_unscaled adds nothing to it (P >= 2, signed, no satpropagate)."""
        if self.man_bits == 0 or self.saturation == "satpropagate" or not self.signed:
            return None
        return super().nearest_kernel(dtype, device)

    def _overflow_nearest(self, out: Tensor, scale_exponent: int = 0, scratch: Tensor | None = None) -> None:
        """overflow=inf beyond max, which here need not end a full binade (the top code is inf).

        Without a comparison: out is on the grid (times 2^scale_exponent), so a value beyond max lies
        at least a top-binade step 2^s beyond it; with t = clamp(out, -max, max), out - t is 0 or at
        least 2^s in magnitude, and t + (out - t) * 2^(E + 1 - s) (E the dtype's top exponent) is
        t or overflows to +-inf (NaN stays NaN). Three fast passes instead of two compare-and-fill
        pairs; where 2^(E + 1 - s) is no number of the dtype (s < 1), the fills run.
        """
        if self.overflow != "inf":
            super()._overflow_nearest(out, scale_exponent, scratch)
            return
        limit = math.ldexp(self.max, scale_exponent)
        top = FLOAT_LAYOUTS[out.dtype].max_exponent
        shift = top + 1 - (self.max_exponent - self.man_bits + scale_exponent)
        if shift > FLOAT_LAYOUTS[out.dtype].max_exponent:
            out.masked_fill_(out > limit, math.inf).masked_fill_(out < -limit, -math.inf)
            return
        clamped = torch.clamp(out, -limit, limit, out=None if scratch is None else scratch.view(out.dtype))
        torch.add(clamped, out.sub_(clamped), alpha=2.0**shift, out=out)

    def _ties_to_even_exponent(self, x: Tensor, rounded: Tensor) -> Tensor:
        """P = 1: a tie 1.5 * 2^a between 2^a and 2^(a+1) goes to the even exponent code a + bias;
        the significand rounding sent every such tie up."""
        mantissa, exponent = torch.frexp(x)  # a tie: |mantissa| 0.75, a = exponent - 1
        magnitude = x.abs()
        low, high = 1.5 * 2.0**self.min_normal_exponent, 1.5 * 2.0**self.max_exponent
        tie = ((mantissa.abs() == 0.75) & (exponent.add_(self.bias - 1).bitwise_and_(1) == 0)
               & (magnitude >= low) & (magnitude <= high))
        return torch.where(tie, x / 1.5, rounded)  # 1.5 * 2^a / 1.5 = 2^a exactly, with x's sign

    # --- codes ------------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        rounded = self.round_unscaled(x.double(), "nearest", None)
        magnitude = rounded.abs()
        finite = torch.where(torch.isfinite(magnitude), magnitude, 0.0)
        mantissa, exponent = torch.frexp(finite)
        binade = torch.where(finite > 0, exponent.to(torch.int64) - 1, self.min_normal_exponent)
        binade = binade.clamp(min=self.min_normal_exponent)
        significand = (finite / power_of_two(binade - self.man_bits)).to(torch.int64)
        codes = ((binade - self.min_normal_exponent) << self.man_bits) + significand
        if self.inf_code is not None:
            codes = torch.where(torch.isinf(magnitude), self.inf_code, codes)
        if self.signed:
            codes = torch.where((rounded < 0) & (codes != 0), codes | 2 ** (self.width - 1), codes)
        return torch.where(torch.isnan(rounded), self.nan_code, codes)

    def decode(self, codes: Tensor) -> Tensor:
        codes = self.checked_codes(codes)
        m = self.man_bits
        magnitude = codes & (self.magnitude_codes - 1)
        biased, mantissa = magnitude >> m, magnitude & (2**m - 1)
        normal = biased > 0
        significand = (mantissa + (normal.to(torch.int64) << m)).double()
        values = significand * power_of_two(biased.clamp(min=1) - self.bias - m)
        if self.inf_code is not None:
            values = torch.where(magnitude == self.inf_code, math.inf, values)
        if self.signed:
            values = torch.where(codes >> (self.width - 1) == 1, -values, values)
        return torch.where(codes == self.nan_code, math.nan, values)


def p3109(width: Value | None = None, precision: Value | None = None, *, signed: Value = 1,
          domain: Value = "extended", saturation: Value = "ovfinf", scale: Value | None = None,
          pow2: Value | None = None, axis: Value | None = None, block: Value | None = None) -> P3109Format:
    """p3109(K, P, signed=1|0, domain=extended|finite, saturation=ovfinf|satfinite|satpropagate).

    K in 3..16; P in 1..K-1 (signed) or 1..K (unsigned), with at most 10 exponent bits (K - P signed,
    K - P + 1 unsigned) so that the grid is exact in float64. Shared options scale=, pow2=, axis=, block=.
    """
    if width is None or precision is None:
        raise ValueError("p3109 needs a width and a precision: p3109(K,P)")
    k = int_arg("K (width)", width, MIN_WIDTH, MAX_WIDTH)
    is_signed = bool_arg("signed", signed)
    p = int_arg("P (precision)", precision, 1, k - 1 if is_signed else k)
    exp_bits = k - p + (0 if is_signed else 1)
    if exp_bits > MAX_EXP_BITS:
        lowest = k - MAX_EXP_BITS + (0 if is_signed else 1)
        raise ValueError(f"P (precision) {p} gives {exp_bits} exponent bits, beyond float64's range "
                         f"(at most {MAX_EXP_BITS}): P must be at least {lowest} for K={k}")
    saturation_mode = choice_arg("saturation", saturation, SATURATIONS)
    domain_name = choice_arg("domain", domain, DOMAINS)
    return P3109Format(exp_bits=exp_bits, man_bits=p - 1, special="fnuz",
                       overflow=_overflow(saturation_mode, domain_name),
                       scaling=scaling_arg(Scaling(), scale, pow2, axis, block),
                       width=k, precision=p, signed=is_signed, domain=domain_name,
                       saturation=saturation_mode)


register_family("p3109", p3109)
