"""Logarithmic number system: `lns(bits, gamma=...)`, a sign and an integer log code in base 2^(1/gamma).

Layout (the layout of Stillwater Universal's lns<16,8>, so `lns(16,gamma=256,scale=none)` has the
same codes as universal-dtypes `lns16`): bit bits-1 is the sign; the low bits-1 bits are a
two's-complement log code e, and the value is (-1)^sign * 2^(e/gamma). The most negative code
e = -2^(bits-2) is reserved: with sign 0 it is zero, with sign 1 NaN. The grid is symmetric around
1 in the log domain: max = 2^((2^(bits-2)-1)/gamma), min_positive = 1/max. gamma is a power of two
(LNS-Madam's base factor; each tensor class can have its own) from 2^max(0, bits-9), which keeps max
below 2^128, float32's overflow threshold, to 2^(bits-2); by default 8, or the nearest value that
keeps the grid within 2^-64..2^64 (so lns(16) is gamma 256, Universal's lns16). A smaller gamma
would give codes past float32's largest finite value (no float32 tensor can hold them), so the spec
is refused. With gamma = 2^(bits-9) (bits >= 10: lns(16,gamma=128), lns(12,gamma=8)) the grid spans
2^-128..2^128 and its lowest codes, below 2^-126, are float32 subnormals: in float32 each such
code's value is its exact value rounded to nearest as float32 stores it (fewer significant bits,
still one distinct float per code) and rounding decides the code from the float64 tables (a float32
input is exact in float64), so every code stays usable.

Rounding is in the log domain, on the position t = gamma*log2|x| + 2^(bits-2), where code index
t = 0 is zero and t = 1 the smallest magnitude:

* nearest: to the nearest code in the log domain. Its ties 2^((e+1/2)/gamma) are irrational, so no
  input is ever a tie, and a float log2 cannot decide inputs within an ulp of one. Instead the index
  is the number of ties below |x|, each precomputed (60 digits) as the largest float below it
  (`LNS.nearest_index`, a search over the float64 ties); bit-exact for float32 and float64 inputs.
  `dse.formats.fast.lns` finds the same index with integer operations on x's bit pattern and a
  lookup table, slice by slice, with a per-tensor scale fused in.
* stochastic, pseudo_stochastic, toward_zero: the floor code is exact (compared with the grid values
  rounded to the input's dtype, so grid values map to themselves); `round_to_integer` then rounds
  the log-domain fraction above it (float64), so stochastic rounding is unbiased in log2|x|;
  toward_zero never increases the magnitude; pseudo_stochastic applies NITI's rule to the bits of
  that fraction.
* overflow saturates at +-max (+-inf too), as Universal does;
* underflow: `underflow=zero` (default, Universal's rule) rounds a magnitude to zero when its log
  code is below the tie between zero and the smallest magnitude, 2^((1/2-2^(bits-2))/gamma): zero
  sits one code below min_positive in the log domain. `underflow=saturate` keeps every non-zero
  magnitude at min_positive or above (LNS-Madam's clamp); only 0 maps to 0.
* NaN stays NaN (encode gives the NaN code). -0.0 encodes as zero (sign 1 with the zero code is
  NaN); quantize keeps the sign of zero results.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from decimal import ROUND_FLOOR, ROUND_HALF_EVEN, Context, Decimal
from functools import cached_property
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from dse.formats.base import (
    NumberFormat,
    Scaling,
    check_rounding,
    round_to_integer,
    stochastic_bits,
    stochastic_up_,
)
from dse.formats.spec import (
    Value,
    call_spec,
    choice_arg,
    int_arg,
    register_alias,
    register_family,
    scaling_arg,
)

MIN_BITS, MAX_BITS = 3, 16
DEFAULT_GAMMA = 8
LNS_SCALING = Scaling(kind="tensor")
UNDERFLOWS = ("zero", "saturate")
_DIGITS = Context(prec=60)
_SAFETY = Decimal("1e-30")  # a grid point this close to a rounding boundary would need more digits
_BELOW_ONE = 1.0 - 2.0**-53
FLOAT32_NORMAL_EXPONENT = -126  # 2^-126, float32's smallest normal; below it float32 has fewer digits


def gamma_range(bits: int) -> tuple[int, int]:
    """Valid base factors: from where max stays below float32's 2^128 to where the grid spans one octave."""
    return 2 ** max(0, bits - 9), 2 ** (bits - 2)


def float32_subnormal_codes(bits: int, gamma: int) -> bool:
    """Whether the grid's lowest codes lie below 2^-126, where float32 values are subnormal."""
    return (2 ** (bits - 2) - 1) > -FLOAT32_NORMAL_EXPONENT * gamma


def default_gamma(bits: int) -> int:
    """8, or the nearest value that keeps the grid within 2^-64..2^64 (lns(16) is Universal's lns16)."""
    return min(max(DEFAULT_GAMMA, 2 ** max(0, bits - 8)), gamma_range(bits)[1])


class LnsGrid(NamedTuple):
    """Per code index (0 = zero, then increasing magnitude, then one NaN slot), in one dtype and device."""

    values: Tensor  # the grid value rounded to nearest in the dtype; NaN in the slot
    tie_bits: Tensor  # bit pattern (as a signed int; non-negative floats order like their bit patterns)
    #                   of the largest dtype value below the tie with the next index; inf for the
    #                   last index and the largest int for the slot, so nothing rounds past them


@functools.cache
def _mantissa_integers(gamma: int, precision: int) -> tuple[list[int], list[int]]:
    """2^(r/gamma) rounded to nearest, and 2^((r+1/2)/gamma) rounded down, as precision-bit integers."""
    root = Decimal(2)
    for _ in range(gamma.bit_length()):  # gamma = 2^b: b + 1 square roots give 2^(1/(2 gamma))
        root = root.sqrt(_DIGITS)
    half_steps = [Decimal(1)]
    for _ in range(2 * gamma - 1):
        half_steps.append(_DIGITS.multiply(half_steps[-1], root))
    unit = Decimal(2 ** (precision - 1))
    values, ties = [], []
    for r in range(gamma):
        value = _DIGITS.multiply(half_steps[2 * r], unit)
        nearest = value.to_integral_value(ROUND_HALF_EVEN)
        if r and abs(abs(value - nearest) - Decimal("0.5")) < _SAFETY:
            raise ArithmeticError(f"2^({r}/{gamma}) is too close to a rounding boundary")
        tie = _DIGITS.multiply(half_steps[2 * r + 1], unit)
        below = tie.to_integral_value(ROUND_FLOOR)
        if tie - below < _SAFETY:
            raise ArithmeticError(f"2^({r + 0.5}/{gamma}) is too close to a float")
        values.append(int(nearest))
        ties.append(int(below))
    return values, ties


@functools.cache
def lns_grid(bits: int, gamma: int, underflow: str, dtype: torch.dtype, device: torch.device) -> LnsGrid:
    precision, bits_dtype = {torch.float32: (24, torch.int32), torch.float64: (53, torch.int64)}[dtype]
    values, ties = _mantissa_integers(gamma, precision)
    exponent = torch.arange(2 ** (bits - 1), dtype=torch.int64) - 2 ** (bits - 2)  # e of each index
    octave, step = exponent.div(gamma, rounding_mode="floor"), exponent.remainder(gamma)
    shift = (octave - (precision - 1)).double()
    grid_values = torch.ldexp(torch.tensor(values, dtype=torch.float64)[step], shift)
    grid_ties = torch.ldexp(torch.tensor(ties, dtype=torch.float64)[step], shift)
    if dtype == torch.float32 and float32_subnormal_codes(bits, gamma):
        grid_values = _float32_subnormals(grid_values, gamma, octave, step)
    grid_values[0] = 0.0
    grid_ties[-1] = torch.inf
    if underflow == "saturate":  # every non-zero magnitude is past the tie between zero and min_positive
        grid_ties[0] = 0.0
    nan_slot = torch.tensor([torch.nan], dtype=dtype)
    never_above = torch.tensor([torch.iinfo(bits_dtype).max], dtype=bits_dtype)
    return LnsGrid(torch.cat([grid_values.to(dtype), nan_slot]).to(device),
                 torch.cat([grid_ties.to(dtype).view(bits_dtype), never_above]).to(device))


def _float32_subnormals(values: Tensor, gamma: int, octave: Tensor, step: Tensor) -> Tensor:
    """`values` (24-bit significands, in float64) with those below 2^-126 replaced by their float64
    values, which cast to float32 rounds to nearest once: the float64 value lies on the exact value's
    side of every float32 midpoint unless it is one (then it raises)."""
    wide, _ = _mantissa_integers(gamma, 53)
    exact = torch.ldexp(torch.tensor(wide, dtype=torch.float64)[step], (octave - 52).double())
    subnormal = exact < 2.0**FLOAT32_NORMAL_EXPONENT
    if bool((torch.ldexp(exact[subnormal], torch.tensor(149.0)).frac() == 0.5).any()):
        raise ArithmeticError("a subnormal grid value's float64 rounding is a float32 midpoint")
    return torch.where(subnormal, exact, values)


@dataclass(frozen=True)
class LNS(NumberFormat):
    """Sign plus a (bits-1)-bit two's-complement log code e: value 2^(e/gamma); code -2^(bits-2) is zero."""

    family: ClassVar[str] = "lns"
    bits: int
    gamma: int
    underflow: str
    scaling: Scaling

    @property
    def spec(self) -> str:
        options = [] if self.gamma == default_gamma(self.bits) else [f"gamma={self.gamma}"]
        options += self.scaling.options(LNS_SCALING)
        options += [] if self.underflow == "zero" else [f"underflow={self.underflow}"]
        if self.bits == 8 and not options:
            return "lns8"
        return call_spec("lns", [str(self.bits)], options)

    def spec_options(self) -> dict[str, str]:
        return {"bits": str(self.bits), "gamma": str(self.gamma), "underflow": self.underflow,
                **self.scaling.spec_options()}

    @property
    def zero_offset(self) -> int:
        """Index of log code e is e + zero_offset; index 0 (the reserved code) is zero."""
        return 2 ** (self.bits - 2)

    @property
    def top_index(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @cached_property
    def max(self) -> float:
        return float(self._grid(torch.float64, torch.device("cpu")).values[self.top_index])

    @cached_property
    def min_positive(self) -> float:
        return float(self._grid(torch.float64, torch.device("cpu")).values[1])

    def _grid(self, dtype: torch.dtype, device: torch.device) -> LnsGrid:
        return lns_grid(self.bits, self.gamma, self.underflow, dtype, device)

    def _position(self, magnitude: Tensor) -> Tensor:
        """gamma*log2|x| + zero_offset clamped to the index range, NaN to the NaN slot: the index, give
        or take a rounding error far below one code."""
        position = magnitude.log2().mul_(self.gamma).add_(self.zero_offset).clamp_(0, self.top_index)
        return position.nan_to_num_(nan=self.top_index + 1)

    @property
    def float32_note(self) -> str | None:
        if not self._float32_subnormals:
            return None
        subnormal = self.zero_offset + FLOAT32_NORMAL_EXPONENT * self.gamma - 1  # magnitudes below 2^-126
        return (f"the lowest {subnormal} magnitudes (below 2^-126) are float32 subnormals: in float32 each "
                f"is its value rounded to nearest with fewer digits (still one float per code); scaled "
                f"results below float32's smallest subnormal are 0")

    @cached_property
    def _float32_subnormals(self) -> bool:
        return float32_subnormal_codes(self.bits, self.gamma)

    def _directed_index(self, magnitude: Tensor, grid: LnsGrid, rounding: str,
                        generator: torch.Generator | None) -> Tensor:
        """The exact floor index plus the log-domain fraction above it (float64), rounded by `rounding`."""
        position = self._position(magnitude.double())
        nearest = torch.round(position)  # an index, give or take one
        grid_value = grid.values.index_select(0, nearest.to(torch.int32))
        below = torch.lt(magnitude, grid_value, out=torch.empty_like(position))  # 0.0 or 1.0
        floor = nearest.sub_(below)
        fraction = position.sub_(floor).clamp_(0.0, _BELOW_ONE)
        fraction.mul_(torch.ne(magnitude, grid_value, out=below))  # grid values never move
        if rounding.startswith("stochastic"):  # round_to_integer's draw; the fraction needs no sign work
            floor.add_(stochastic_up_(fraction, generator, stochastic_bits(rounding)))
        else:
            floor.add_(round_to_integer(fraction, rounding, generator))
        index = floor.to(torch.int32)
        if self.underflow == "saturate":
            index = torch.maximum(index, (magnitude > 0).to(torch.int32))
        return index

    def nearest_index(self, x: Tensor) -> Tensor:
        """The index of |x| rounded to nearest (int64, x's shape): the number of ties below |x|, each
        tie held as the largest float64 below it (a float32 or float64 |x| lies above a tie exactly
        when it lies above that float); NaN gives the NaN slot. The reference of fast.lns's tables."""
        grid = self._grid(torch.float64, x.device)
        ties = grid.tie_bits[:-1].view(torch.float64)  # ascending, inf last
        magnitude = x.detach().double().abs()
        index = torch.searchsorted(ties, magnitude.reshape(-1)).view(x.shape)
        return torch.where(torch.isnan(magnitude), self.top_index + 1, index)

    def round_reference(self, x: Tensor, rounding: str, generator: torch.Generator | None) -> Tensor:
        """Nearest by `nearest_index`, the directed modes by `_directed_index`; values in x's dtype,
        with x's sign."""
        check_rounding(rounding)
        grid = self._grid(x.dtype, x.device)
        flat = x.reshape(-1)
        if rounding == "nearest":
            index = self.nearest_index(flat)
        else:
            index = self._directed_index(flat.abs(), grid, rounding, generator)
        return grid.values.index_select(0, index).copysign_(flat).view(x.shape)

    def round_unscaled(self, x: Tensor, rounding: str, generator: torch.Generator | None) -> Tensor:
        if rounding == "nearest":
            fast = fast_lns.round_nearest(self, x)
            if fast is not None:
                return fast
        return self.round_reference(x, rounding, generator)

    def round_scaled(self, x: Tensor, scale: Tensor, rounding: str, generator: torch.Generator | None,
                     within_max: bool = False) -> Tensor:
        # (the lookup multiplies its grid by one scale: a per-member scale takes the reference)
        fast = fast_lns.round_nearest(self, x, scale) if rounding == "nearest" and scale.dim() == 0 else None
        return fast if fast is not None else super().round_scaled(x, scale, rounding, generator, within_max)

    def encode(self, x: Tensor) -> Tensor:
        flat = torch.as_tensor(x).detach().reshape(-1)
        index = self.nearest_index(flat)
        negative = (flat < 0) & (index > 0)
        codes = ((index + self.zero_offset) & self.top_index) | (negative.to(torch.int64) << (self.bits - 1))
        nan_code = 2 ** (self.bits - 1) + self.zero_offset
        return torch.where(torch.isnan(flat), nan_code, codes).view(torch.as_tensor(x).shape)

    def decode(self, codes: Tensor) -> Tensor:
        codes = self.checked_codes(codes)
        index = (codes + self.zero_offset) & self.top_index
        negative = (codes >> (self.bits - 1)) == 1
        values = self._grid(torch.float64, codes.device).values[index]
        values = torch.where(negative, -values, values)
        return torch.where(negative & (index == 0), torch.nan, values)


def lns_format(bits: Value, *, gamma: Value | None = None, scale: Value | None = None,
               pow2: Value | None = None, axis: Value | None = None, block: Value | None = None,
               underflow: Value | None = None) -> LNS:
    """lns(bits, gamma=...): bits in 3..16, gamma a power of two (see gamma_range); scale=tensor."""
    bits = int_arg("bits", bits, MIN_BITS, MAX_BITS)
    low, high = gamma_range(bits)
    if gamma is None:
        gamma = default_gamma(bits)
    valid = [2**b for b in range(low.bit_length() - 1, high.bit_length())]
    if gamma not in valid or isinstance(gamma, bool):
        why = ""
        if isinstance(gamma, int) and not isinstance(gamma, bool) and 0 < gamma < low:
            why = (f"; with gamma={gamma} the largest code 2^({2 ** (bits - 2) - 1}/{gamma}) passes "
                   f"float32's largest finite value (about 2^128)")
        raise ValueError(f"gamma must be a power of two in {low}..{high} for {bits} bits "
                         f"({', '.join(map(str, valid))}), got {gamma!r}{why}")
    return LNS(
        bits=bits,
        gamma=int(gamma),
        underflow="zero" if underflow is None else choice_arg("underflow", underflow, UNDERFLOWS),
        scaling=scaling_arg(LNS_SCALING, scale, pow2, axis, block),
    )


register_family("lns", lns_format)
register_alias("lns8", "lns(8,gamma=8)")

from dse.formats.fast import lns as fast_lns  # noqa: E402  (it builds on this module)
