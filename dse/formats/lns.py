"""Logarithmic number system: `lns(bits, gamma=...)`, a sign and an integer log code in base 2^(1/gamma).

Layout (the layout of Stillwater Universal's lns<16,8>, so `lns(16,gamma=256,scale=none)` has the
same codes as universal-dtypes `lns16`): bit bits-1 is the sign; the low bits-1 bits are a
two's-complement log code e, and the value is (-1)^sign * 2^(e/gamma). The most negative code
e = -2^(bits-2) is reserved: with sign 0 it is zero, with sign 1 NaN. The grid is symmetric around
1 in the log domain: max = 2^((2^(bits-2)-1)/gamma), min_positive = 1/max. gamma is a power of two
(LNS-Madam's base factor; each tensor class can have its own) from 2^max(0, bits-8), which keeps
the grid within 2^-64..2^64 (exact in float32), to 2^(bits-2); 8 by default, or the nearest valid
value.

Rounding is in the log domain, on the position t = gamma*log2|x| + 2^(bits-2), where code index
t = 0 is zero and t = 1 the smallest magnitude:

* nearest: to the nearest code in the log domain. Its ties 2^((e+1/2)/gamma) are irrational, so no
  input is ever a tie, and a float log2 cannot decide inputs within an ulp of one: the code is
  the floor of an approximate t (off by at most one) plus an exact comparison with the tie point,
  precomputed (60 digits) as the largest float below it. Bit-exact for float32 and float64 inputs.
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
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from dse.formats.base import NumberFormat, Scaling, check_rounding, round_to_integer
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


def gamma_range(bits: int) -> tuple[int, int]:
    """Valid base factors: from where the grid stays within 2^-64..2^64 to where it spans one octave."""
    return 2 ** max(0, bits - 8), 2 ** (bits - 2)


def default_gamma(bits: int) -> int:
    low, high = gamma_range(bits)
    return min(max(DEFAULT_GAMMA, low), high)


class _Grid(NamedTuple):
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
def _grid(bits: int, gamma: int, underflow: str, dtype: torch.dtype, device: torch.device) -> _Grid:
    precision, bits_dtype = {torch.float32: (24, torch.int32), torch.float64: (53, torch.int64)}[dtype]
    values, ties = _mantissa_integers(gamma, precision)
    exponent = torch.arange(2 ** (bits - 1), dtype=torch.int64) - 2 ** (bits - 2)  # e of each index
    octave, step = exponent.div(gamma, rounding_mode="floor"), exponent.remainder(gamma)
    shift = (octave - (precision - 1)).double()
    grid_values = torch.ldexp(torch.tensor(values, dtype=torch.float64)[step], shift)
    grid_ties = torch.ldexp(torch.tensor(ties, dtype=torch.float64)[step], shift)
    grid_values[0] = 0.0
    grid_ties[-1] = torch.inf
    if underflow == "saturate":  # every non-zero magnitude is past the tie between zero and min_positive
        grid_ties[0] = 0.0
    nan_slot = torch.tensor([torch.nan], dtype=dtype)
    never_above = torch.tensor([torch.iinfo(bits_dtype).max], dtype=bits_dtype)
    return _Grid(torch.cat([grid_values.to(dtype), nan_slot]).to(device),
                 torch.cat([grid_ties.to(dtype).view(bits_dtype), never_above]).to(device))


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

    @property
    def zero_offset(self) -> int:
        """Index of log code e is e + zero_offset; index 0 (the reserved code) is zero."""
        return 2 ** (self.bits - 2)

    @property
    def top_index(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def max(self) -> float:
        return float(self._grid(torch.float64, torch.device("cpu")).values[self.top_index])

    @property
    def min_positive(self) -> float:
        return float(self._grid(torch.float64, torch.device("cpu")).values[1])

    def _grid(self, dtype: torch.dtype, device: torch.device) -> _Grid:
        return _grid(self.bits, self.gamma, self.underflow, dtype, device)

    def _position(self, magnitude: Tensor) -> Tensor:
        """gamma*log2|x| + zero_offset clamped to the index range, NaN to the NaN slot: the index, give
        or take a rounding error far below one code."""
        position = magnitude.log2().mul_(self.gamma).add_(self.zero_offset).clamp_(0, self.top_index)
        return position.nan_to_num_(nan=self.top_index + 1)

    def _nearest_index(self, magnitude: Tensor, grid: _Grid) -> tuple[Tensor, Tensor]:
        """The floor of the approximate position, plus one exact comparison with the tie above it.

        Works in two buffers of magnitude's size, the second one returned for reuse: at 10^6
        elements a fresh tensor costs more in page faults than the arithmetic does.
        """
        position = self._position(magnitude)
        index = position.view(grid.tie_bits.dtype).copy_(position)  # truncate in place: the floor
        above = grid.tie_bits.index_select(0, index).lt_(magnitude.view(grid.tie_bits.dtype))
        index += above
        return index, above

    def _directed_index(self, magnitude: Tensor, grid: _Grid, rounding: str,
                        generator: torch.Generator | None) -> Tensor:
        """The exact floor index plus the log-domain fraction above it (float64), rounded by `rounding`."""
        position = self._position(magnitude.double())
        nearest = round_to_integer(position, "nearest").to(torch.int32)
        grid_value = grid.values.index_select(0, nearest)
        floor = nearest - (magnitude < grid_value).to(torch.int32)
        fraction = (position - floor).clamp_(0.0, _BELOW_ONE).mul_(magnitude != grid_value)
        index = floor + round_to_integer(fraction, rounding, generator).to(torch.int32)
        if self.underflow == "saturate":
            index = torch.maximum(index, (magnitude > 0).to(torch.int32))
        return index

    def round_unscaled(self, x: Tensor, rounding: str, generator: torch.Generator | None) -> Tensor:
        check_rounding(rounding)
        grid = self._grid(x.dtype, x.device)
        flat = x.reshape(-1)
        magnitude = flat.abs()
        if rounding == "nearest":
            index, spare = self._nearest_index(magnitude, grid)
            out = torch.index_select(grid.values, 0, index, out=spare.view(x.dtype))
        else:
            out = grid.values.index_select(0, self._directed_index(magnitude, grid, rounding, generator))
        return out.copysign_(flat).view(x.shape)

    def encode(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x)
        if x.dtype not in (torch.float32, torch.float64):
            x = x.double()
        flat = x.reshape(-1)
        index, _ = self._nearest_index(flat.abs(), self._grid(x.dtype, x.device))
        index = index.to(torch.int64)
        negative = (flat < 0) & (index > 0)
        codes = ((index + self.zero_offset) & self.top_index) | (negative.to(torch.int64) << (self.bits - 1))
        nan_code = 2 ** (self.bits - 1) + self.zero_offset
        return torch.where(torch.isnan(flat), nan_code, codes).view(x.shape)

    def decode(self, codes: Tensor) -> Tensor:
        codes = torch.as_tensor(codes, dtype=torch.int64)
        if torch.any((codes < 0) | (codes >= 2**self.bits)):
            raise ValueError(f"{self.spec} codes lie in 0..{2**self.bits - 1}")
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
        raise ValueError(f"gamma must be a power of two in {low}..{high} for {bits} bits "
                         f"({', '.join(map(str, valid))}), got {gamma!r}")
    return LNS(
        bits=bits,
        gamma=int(gamma),
        underflow="zero" if underflow is None else choice_arg("underflow", underflow, UNDERFLOWS),
        scaling=scaling_arg(LNS_SCALING, scale, pow2, axis, block),
    )


register_family("lns", lns_format)
register_alias("lns8", "lns(8,gamma=8)")
