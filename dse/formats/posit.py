"""Posit(n, es) numbers with the 2022 Posit Standard's rounding, for n = 2..32 and es = 0..4.

Codes are the n-bit two's-complement patterns read as unsigned ints in [0, 2^n): 0 is zero and
2^(n-1) is NaR. Read as signed ints, the patterns are in value order.

Policies (tested in tests/formats/test_posit.py):
- nearest rounds the bit pattern to nearest, ties to the even pattern. Where exponent bits are cut
  off this is geometric: the tie between 2^a and 2^b is 2^((a+b)/2), the (n+1)-bit pattern between
  them, not their arithmetic mean.
- Saturation, in every rounding mode: a non-zero never rounds to zero and nothing rounds to NaR;
  |x| below minpos gives minpos, above maxpos gives maxpos.
- ±0 gives 0. NaN and ±inf give NaN from quantize and NaR from encode; decode(NaR) is NaN.
- toward_zero truncates the magnitude pattern. pseudo_stochastic applies NITI's rule to the
  discarded pattern bits. stochastic rounds up with probability (|x| - lo) / (hi - lo) between the
  neighbouring posits lo <= |x| < hi: unbiased, and the same as random bits added below the
  pattern's last bit wherever the pattern is linear in the value (lo and hi share regime and
  exponent, or hi is the next binade).

How it rounds: for |x| = 2^(k*2^es + ex) * (1 + f), the float's bits less the exponent bias are
B = (k*2^es + ex) * 2^F + f * 2^F (F fraction bits). Inside one regime k the posit pattern is linear
in B, so rounding the pattern is rounding B at bit d = es + F - (n - 1 - r), r the regime length;
a carry out of the exponent field moves to the next regime exactly as the pattern does. Adding
((n + 1) mod 2) * 2^(es+F) makes bit d of B the pattern's last bit also where only the regime is
kept. float32 inputs round with the float primitive on B * 2^-d held exactly in float64, float64
inputs with the integer primitive on B; either way every float32/float64 input rounds exactly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch
from torch import Tensor

from dse.formats.base import (
    NumberFormat,
    Scaling,
    constant,
    parse_rounding,
    power_of_two,
    shift_round,
    stochastic_bits,
    stochastic_up_,
)
from dse.formats.fast import posit as fast_posit
from dse.formats.fast.slices import for_slices
from dse.formats.spec import (
    Value,
    call_spec,
    int_arg,
    register_alias,
    register_family,
    register_pattern_alias,
    scaling_arg,
)

MIN_BITS, MAX_BITS = 2, 32
MIN_ES, MAX_ES = 0, 4
STANDARD_ES = 2  # the 2022 Posit Standard fixes es = 2: posit8, posit16, posit32

@dataclass(frozen=True)
class _Layout:
    """How a float dtype stores |x|: bits = (exponent + exp_bias) << frac_bits | fraction."""

    float_dtype: torch.dtype
    int_dtype: torch.dtype
    frac_bits: int
    exp_bias: int
    pattern_limit: int  # patterns must stay below this: the int dtype's range, or shift_round's 2^62

    @property
    def magnitude_mask(self) -> int:
        return (1 << (torch.iinfo(self.int_dtype).bits - 1)) - 1


_F32 = _Layout(torch.float32, torch.int32, 23, 127, 2**31)
_F64 = _Layout(torch.float64, torch.int64, 52, 1023, 2**62)
_LAYOUTS = {torch.float32: _F32, torch.float64: _F64}


@dataclass(frozen=True)
class _Frame:
    """Constants that place a posit's pattern on a float layout's bits (see the module docstring).

    pattern = |x| bits + offset: the bias removed, ((n + 1) mod 2) * 2^field_bits added for the
    pattern's parity, and an even multiple of 2^field_bits that makes it non-negative. The regime
    index pattern >> field_bits is k + regime_origin; shifts[index] is d for that regime.
    """

    layout: _Layout
    field_bits: int  # es + F: exponent and fraction bits below the regime
    low_bits: int  # float bits of minpos
    high_bits: int  # float bits of maxpos
    offset: int
    shifts: tuple[int, ...]
    regime_codes: tuple[int, ...]  # the regime's bits at the top of the n - 1 bits after the sign
    exact: bool  # the layout's normal range holds every posit and the patterns fit


@functools.cache
def _frame(bits: int, es: int, layout: _Layout) -> _Frame:
    frac = layout.frac_bits
    field_bits = es + frac
    scale_max = (bits - 2) << es
    regime_origin = (bits + 1) % 2 + 2 * ((bits - 1) // 2)
    offset = (regime_origin << field_bits) - (layout.exp_bias << frac)
    high_bits = (layout.exp_bias + scale_max) << frac
    largest_pattern = high_bits + offset

    def shift(regime: int) -> int:
        length = max(regime + 2, 1 - regime)  # k + 1 ones and a zero, or -k zeros and a one
        return min(max(field_bits - (bits - 1 - length), 0), field_bits)

    def regime_code(regime: int) -> int:
        if regime >= 0:
            return (1 << (bits - 1)) - (1 << max(bits - 2 - regime, 0))
        return 1 << max(bits - 2 + regime, 0)

    indices = range((largest_pattern >> field_bits) + 1)

    return _Frame(
        layout=layout,
        field_bits=field_bits,
        low_bits=(layout.exp_bias - scale_max) << frac,
        high_bits=high_bits,
        offset=offset,
        shifts=tuple(shift(index - regime_origin) for index in indices),
        regime_codes=tuple(regime_code(index - regime_origin) for index in indices),
        exact=scale_max < layout.exp_bias and largest_pattern < layout.pattern_limit,
    )


@dataclass(frozen=True)
class _Tables:
    """Per regime index: the shift d, 2^-d for the float route, and the regime's code bits; and the
    frame's constants as 0-dim tensors of the layout's int dtype (cheaper operands than Python ints)."""

    shift: Tensor
    step: Tensor
    minus_offset: Tensor  # -offset as a float64 scalar
    regime_code: Tensor
    unit: Tensor  # 2^d as an int of the layout
    magnitude_mask: Tensor
    offset: Tensor
    field_bits: Tensor


@functools.cache
def _tables(frame: _Frame, device: torch.device) -> _Tables:
    shift = torch.tensor(frame.shifts, dtype=torch.int64, device=device)
    minus_offset = torch.tensor(-frame.offset, dtype=torch.float64, device=device)
    regime_code = torch.tensor(frame.regime_codes, dtype=torch.int64, device=device)
    int_dtype = frame.layout.int_dtype
    unit = (torch.ones_like(shift) << shift).to(int_dtype)
    scalars = (constant(value, int_dtype, device) for value in
               (frame.layout.magnitude_mask, frame.offset, frame.field_bits))
    return _Tables(shift, power_of_two(-shift), minus_offset, regime_code, unit, *scalars)


@dataclass(frozen=True)
class Posit(NumberFormat):
    """posit(n, es): sign, regime, es exponent bits, fraction; n bits in all."""

    family: ClassVar[str] = "posit"
    bits: int
    es: int = STANDARD_ES
    scaling: Scaling = Scaling()

    def __post_init__(self) -> None:
        int_arg("n", self.bits, MIN_BITS, MAX_BITS)
        int_arg("es", self.es, MIN_ES, MAX_ES)

    @property
    def spec(self) -> str:
        options = self.scaling.options(Scaling())
        if self.es == STANDARD_ES:
            return f"posit{self.bits}" + (f"({','.join(options)})" if options else "")
        return call_spec("posit", [str(self.bits), str(self.es)], options)

    def spec_options(self) -> dict[str, str]:
        return {"n": str(self.bits), "es": str(self.es), **self.scaling.spec_options()}

    @property
    def _scale_max(self) -> int:
        """log2 of maxpos: (n - 2) * 2^es."""
        return (self.bits - 2) << self.es

    @property
    def max(self) -> float:
        return 2.0**self._scale_max

    @property
    def min_positive(self) -> float:
        return 2.0**-self._scale_max

    # --- rounding -------------------------------------------------------------------------------
    @cached_property
    def _tables_by_device(self) -> dict[tuple[torch.dtype, torch.device], _Tables]:
        return {}

    def _device_tables(self, frame: _Frame, device: torch.device) -> _Tables:
        """`_tables(frame, device)`, looked up per instance (hashing a frame costs more than a call)."""
        key = (frame.layout.float_dtype, device)
        tables = self._tables_by_device.get(key)
        if tables is None:
            tables = self._tables_by_device[key] = _tables(frame, device)
        return tables

    def round_unscaled(self, x: Tensor, rounding: str, generator: torch.Generator | None) -> Tensor:
        stochastic = parse_rounding(rounding)[0] == "stochastic"
        layout = _LAYOUTS[x.dtype]
        frame = _frame(self.bits, self.es, layout)
        if not stochastic and frame.exact:
            return self._round_flat(x, frame, rounding, generator)
        # posit(n, 3) for n >= 18 and posit(n, 4) for n >= 10 reach beyond float32's normal range,
        # and stochastic rounding needs the posit above |x|, which may lie beyond it too.
        wide = self._round_flat(x.double(), _frame(self.bits, self.es, _F64), rounding, generator,
                                unused_bits=_F64.frac_bits - layout.frac_bits)
        return wide.to(x.dtype)

    def _round_flat(self, x: Tensor, frame: _Frame, rounding: str, generator: torch.Generator | None,
                    unused_bits: int = 0) -> Tensor:
        """Round in slices; unused_bits: low fraction bits that are zero because x was float32."""
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous, whatever x's layout
        tables = self._device_tables(frame, x.device)
        # 1-d slices: the regime's table lookup takes a 1-d index.
        for_slices(x.reshape(-1), out.view(-1), lambda part, result: self._round_chunk(
            part, result, frame, tables, rounding, generator, unused_bits))
        return out

    def _round_chunk(self, x: Tensor, out: Tensor, frame: _Frame, tables: _Tables, rounding: str,
                     generator: torch.Generator | None, unused_bits: int) -> None:
        layout = frame.layout
        pattern = torch.bitwise_and(x.view(layout.int_dtype), tables.magnitude_mask)
        # Saturate: |x| < minpos (zero too) goes to minpos; |x| > maxpos (inf and NaN too) to maxpos.
        # Zero, inf and NaN are put right at the end.
        pattern.clamp_(frame.low_bits, frame.high_bits)
        pattern += tables.offset
        regime = torch.bitwise_right_shift(pattern, tables.field_bits)
        fast = fast_posit.round_pattern(pattern, regime, tables, rounding) if layout is _F32 else None
        if fast is not None:
            magnitude_bits = fast
        elif rounding.startswith("stochastic"):
            magnitude_bits = self._round_stochastic(pattern, regime, tables, generator,
                                                    stochastic_bits(rounding)).view(layout.int_dtype)
        else:
            shift = torch.index_select(tables.shift, 0, regime)
            # The discarded field is the input's own bits below the posit's last bit, so that
            # pseudo_stochastic sees the same field for a float32 input in either frame.
            if unused_bits:
                shift = (shift - unused_bits).clamp_(min=0)
                pattern = pattern >> unused_bits
            pattern = (shift_round(pattern, shift, rounding, generator) << shift) << unused_bits
            magnitude_bits = (pattern - frame.offset).to(layout.int_dtype)
        # sign(0) = 0 gives zero; x * 0 is NaN for inf and NaN inputs and a harmless ±0 otherwise.
        zero = constant(0.0, layout.float_dtype, x.device)
        torch.addcmul(torch.mul(x, zero), magnitude_bits.view(layout.float_dtype), x.sign(), out=out)

    @staticmethod
    def _round_stochastic(pattern: Tensor, regime: Tensor, tables: _Tables,
                          generator: torch.Generator | None, random_bit_count: int | None) -> Tensor:
        """|x| (float64 patterns shifted by the frame's offset) rounded up with probability
        (|x| - lo) / (hi - lo) between the neighbouring posits lo <= |x| < hi: their values.

        hi - lo is exact (hi <= 2 lo where lo has fraction bits, else both are powers of two), so
        lo + 1 * (hi - lo) is hi. The draw is `round_to_integer`'s for a fraction in [0, 1) (with k
        random bits for stochastic(k)).
        """
        unit = torch.index_select(tables.unit, 0, regime)  # 2^d: one step of the pattern
        low = torch.bitwise_and(pattern, unit.neg())
        low_value = torch.sub(low, tables.offset).view(torch.float64)
        high_value = low.add_(unit).sub_(tables.offset).view(torch.float64)
        difference = high_value - low_value
        fraction = torch.sub(pattern, tables.offset).view(torch.float64).sub_(low_value).div_(difference)
        return torch.addcmul(low_value, stochastic_up_(fraction, generator, random_bit_count), difference)

    # --- codes ----------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        value = self.round_unscaled(x.double(), "nearest", None)
        frame = _frame(self.bits, self.es, _F64)
        tables = _tables(frame, value.device)
        pattern = value.view(torch.int64) & _F64.magnitude_mask
        pattern.clamp_(frame.low_bits, frame.high_bits)  # zero and NaN are put right below
        pattern += frame.offset
        regime = pattern >> frame.field_bits
        field = pattern & ((1 << frame.field_bits) - 1)  # exponent and fraction below the regime
        code = torch.index_select(tables.regime_code, 0, regime.reshape(-1)).view(regime.shape)
        code += field >> torch.index_select(tables.shift, 0, regime.reshape(-1)).view(regime.shape)
        code = torch.where(value < 0, -code, code)
        code = torch.where(value == 0, 0, code)
        code = torch.where(value.isnan(), self._nar, code)
        return code & ((1 << self.bits) - 1)

    @property
    def _nar(self) -> int:
        return 1 << (self.bits - 1)

    def decode(self, codes: Tensor) -> Tensor:
        """Values (float64) of codes, taken modulo 2^n."""
        n = self.bits
        frame = _frame(n, self.es, _F64)
        code = codes.to(torch.int64) & ((1 << n) - 1)
        negative = code >> (n - 1)  # 1 for negative patterns and NaR
        magnitude = ((code ^ -negative) + negative) & ((1 << n) - 1)
        run_of_ones = (magnitude >> (n - 2)) & 1
        # Complementing a run of ones leaves, like a run of zeros, the terminator as the top set bit.
        below_run = magnitude ^ (-run_of_ones & ((1 << (n - 1)) - 1))
        _, bit_length = torch.frexp(below_run.double())
        bit_length = bit_length.to(torch.int64)
        run = (n - 1) - bit_length
        k = torch.where(run_of_ones == 1, run - 1, -run)
        tail_bits = (bit_length - 1).clamp(min=0)  # exponent and fraction bits after the terminator
        tail = magnitude & ((torch.ones_like(tail_bits) << tail_bits) - 1)
        unbiased = (k << frame.field_bits) + (tail << (frame.field_bits - tail_bits))
        value = (unbiased + (_F64.exp_bias << _F64.frac_bits)).view(torch.float64)
        value = torch.where(negative == 1, -value, value)
        value = torch.where(code == 0, 0.0, value)
        return torch.where(code == self._nar, torch.nan, value)


def posit(n: Value, es: Value = STANDARD_ES, *, scale: Value | None = None, pow2: Value | None = None,
          axis: Value | None = None, block: Value | None = None) -> Posit:
    """posit(n, es=2): n in 2..32 bits, es in 0..4; options scale=, pow2=, axis=, block= (default none)."""
    return Posit(int_arg("n", n, MIN_BITS, MAX_BITS), int_arg("es", es, MIN_ES, MAX_ES),
                 scaling_arg(Scaling(), scale, pow2, axis, block))


register_family("posit", posit)
for _width in (8, 16, 32):
    register_alias(f"posit{_width}", f"posit({_width},{STANDARD_ES})")
register_pattern_alias(r"posit(\d+)", lambda match: f"posit({match.group(1)},{STANDARD_ES})")
