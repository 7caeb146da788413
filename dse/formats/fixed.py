"""Two's-complement fixed point: `int(n)` and `fixed(n, frac)` on one grid.

The grid is the n-bit two's-complement integers k times a step of 2^-frac. `int(n)` is frac = 0
with NITI's symmetric range [-(2^(n-1)-1), 2^(n-1)-1] and a per-tensor absmax scale by default;
`fixed(n, frac)` is the full two's-complement range with no scaling. Both round the same way:
t = x * 2^frac is exact (a power-of-two rescaling), is clamped to the code range, and
`round_to_integer` rounds it, so

* nearest is ties-to-even on the integer code; stochastic and toward_zero work on the code; and
  pseudo_stochastic applies NITI's rule to the discarded field, which for a float input is every bit
  of its significand below the grid step (NITI's PstoShift(m, s) on an integer m is the same when
  m's significand is full width; shift_round is the integer form for int32 accumulators);
* overflow saturates at the grid's ends (+-inf too), in quantize and encode alike;
* NaN stays NaN in quantize. Symmetric formats leave code 100...0 unused: decode maps it to NaN and
  encode maps NaN to it. Full-range formats have no NaN code, so encode(NaN) raises ValueError;
* there is one zero code (encode(-0.0) == 0); quantize keeps the sign of a zero result (-0.3 -> -0.0
  in int8 without scaling), as float arithmetic does.

With float32 tensors the grid values above 2^24 (formats wider than 24 bits) come out rounded to
float32; pass float64 tensors for those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dse.formats.base import (
    FLOAT_DTYPES,
    NumberFormat,
    Scaling,
    check_rounding,
    round_to_integer,
    significand_digits,
    transformed,
)
from dse.formats.fast import enabled
from dse.formats.fast import scales as fast_scales
from dse.formats.spec import (
    Value,
    bool_arg,
    call_spec,
    int_arg,
    register_family,
    register_pattern_alias,
    scaling_arg,
)

INT_SCALING = Scaling(kind="tensor")
FIXED_SCALING = Scaling()
MAX_BITS = 32
MAX_FRAC_BITS = 64


@dataclass(frozen=True)
class FixedPoint(NumberFormat):
    """n-bit two's-complement codes k with value k * 2^-frac_bits, saturating."""

    bits: int
    frac_bits: int
    symmetric: bool
    scaling: Scaling

    @property
    def family(self) -> str:  # type: ignore[override]  # int or fixed by frac_bits, not one ClassVar
        return "int" if self.frac_bits == 0 else "fixed"

    @property
    def spec(self) -> str:
        if self.frac_bits == 0:
            options = self.scaling.options(INT_SCALING) + ([] if self.symmetric else ["symmetric=0"])
            return call_spec("int", [str(self.bits)], options) if options else f"int{self.bits}"
        options = self.scaling.options(FIXED_SCALING) + (["symmetric=1"] if self.symmetric else [])
        return call_spec("fixed", [str(self.bits), str(self.frac_bits)], options)

    def spec_options(self) -> dict[str, str]:
        frac = {} if self.frac_bits == 0 else {"frac": str(self.frac_bits)}
        return {"bits": str(self.bits), **frac, "symmetric": str(int(self.symmetric)),
                **self.scaling.spec_options()}

    @property
    def lowest_code(self) -> int:
        return -(2 ** (self.bits - 1)) + int(self.symmetric)

    @property
    def highest_code(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def max(self) -> float:
        return self.highest_code * 2.0**-self.frac_bits

    @property
    def min_positive(self) -> float:
        return 2.0**-self.frac_bits

    def round_unscaled(self, x: Tensor, rounding: str, generator: torch.Generator | None) -> Tensor:
        return self._round_onto_grid(x, rounding, generator, in_place=False)

    def round_unscaled_(self, x: Tensor, rounding: str, generator: torch.Generator | None) -> Tensor:
        return self._round_onto_grid(x, rounding, generator, in_place=True)

    def round_unscaled_within_max_(self, x: Tensor, rounding: str, generator: torch.Generator | None
                                   ) -> Tensor:
        """round_unscaled_ without the clamp to the code range where it cannot act
        (`clamp_cannot_act_within_max`); x is given up, as for round_unscaled_."""
        if (not self.clamp_cannot_act_within_max(rounding, x.dtype)
                or torch.is_grad_enabled() and x.requires_grad or transformed(x)
                or not enabled(fast_scales.UNCLAMPED_QUOTIENT)):
            return self.round_unscaled_(x, rounding, generator)
        return self._round_onto_grid(x, rounding, generator, in_place=True, saturate=False)

    def clamp_cannot_act_within_max(self, rounding: str, dtype: torch.dtype) -> bool:
        """Whether rounding any quotient within +-max (1 + u) / (1 - u) (u = 2^-p, p: dtype's significand
        bits; see `round_unscaled_within_max_`) gives a code in range, so that the clamp changes
        nothing: those codes lie within +-(H + 2 H u / (1 - u)), H = highest_code, which is below
        H + 1/2 when H < 2^(p-2), where nearest rounds to at most H and toward zero too; stochastic and
        pseudo-stochastic rounding may step up to H + 1. Float32 has that for up to 23 bits, float64
        for every width."""
        return (rounding in ("nearest", "toward_zero") and dtype in FLOAT_DTYPES
                and self.highest_code < 2 ** (significand_digits(dtype) - 2))

    def _round_onto_grid(self, x: Tensor, rounding: str, generator: torch.Generator | None, in_place: bool,
                         saturate: bool = True) -> Tensor:
        """x rounded onto the grid; `in_place`: x is a temporary the caller gives up (as is x * 2^frac);
        `saturate`: clamp to the code range (left out only where it cannot act)."""
        check_rounding(rounding)
        # Clamping after rounding equals clamping before (the bounds are integers) and works in place.
        if self.frac_bits:
            x, in_place = x * 2.0**self.frac_bits, True
        code = round_to_integer(x, rounding, generator, in_place)
        if saturate:
            code.clamp_(self.lowest_code, self.highest_code)
        return code.mul_(2.0**-self.frac_bits) if self.frac_bits else code

    def encode(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x).double()
        is_nan = torch.isnan(x)
        if is_nan.any() and not self.symmetric:
            raise ValueError(f"{self.spec} has no NaN code: encode got NaN")
        code = self.round_unscaled(x, "nearest", None) * 2.0**self.frac_bits
        codes = torch.nan_to_num(code).to(torch.int64) & (2**self.bits - 1)
        return torch.where(is_nan, 2 ** (self.bits - 1), codes)

    def decode(self, codes: Tensor) -> Tensor:
        codes = self.checked_codes(codes)
        signed = codes - ((codes >> (self.bits - 1)) << self.bits)
        values = signed.double() * 2.0**-self.frac_bits
        if self.symmetric:
            values = torch.where(signed < self.lowest_code, torch.nan, values)
        return values


def int_format(bits: Value, *, scale: Value | None = None, pow2: Value | None = None,
               axis: Value | None = None, block: Value | None = None,
               symmetric: Value | None = None) -> FixedPoint:
    """int(n): n in 2..32 bits, frac 0; symmetric=1 (never -2^(n-1)) and scale=tensor by default."""
    return FixedPoint(
        bits=int_arg("bits", bits, 2, MAX_BITS),
        frac_bits=0,
        symmetric=True if symmetric is None else bool_arg("symmetric", symmetric),
        scaling=scaling_arg(INT_SCALING, scale, pow2, axis, block),
    )


def fixed_format(bits: Value, frac: Value | None = None, *, scale: Value | None = None,
                 pow2: Value | None = None, axis: Value | None = None, block: Value | None = None,
                 symmetric: Value | None = None) -> FixedPoint:
    """fixed(n, frac): n in 2..32 bits, frac in -64..64 fraction bits; full range, no scaling by default."""
    if frac is None:
        raise ValueError(f"fixed(n, frac) needs frac, the number of fraction bits in "
                         f"-{MAX_FRAC_BITS}..{MAX_FRAC_BITS}")
    return FixedPoint(
        bits=int_arg("bits", bits, 2, MAX_BITS),
        frac_bits=int_arg("frac", frac, -MAX_FRAC_BITS, MAX_FRAC_BITS),
        symmetric=False if symmetric is None else bool_arg("symmetric", symmetric),
        scaling=scaling_arg(FIXED_SCALING, scale, pow2, axis, block),
    )


register_family("int", int_format)
register_family("fixed", fixed_format)
register_pattern_alias(r"int(\d+)", lambda match: f"int({match.group(1)})")
