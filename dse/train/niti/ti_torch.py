"""Integer primitives on int64 tensors or float tensors holding integers: the operations of the reference's
niti/ti_torch.py, under its names where it has them, so that the two read side by side.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dse.formats import shift_round
from dse.formats.base import MemberGenerators, draw_values, host_abs_max

INT8_BITWIDTH = 7
"""NITI's BITWIDTH: magnitude bits of an int8 mantissa (the sign takes the eighth)."""
FLOAT64_EXACT = 2.0**53
FLOAT32_EXACT = 2.0**24




def int_clip(m: Tensor, bitwidth: int = INT8_BITWIDTH) -> Tensor:
    """NITI's int8_clip: the symmetric range +-(2^bitwidth - 1); -2^bitwidth is never produced."""
    limit = 2**bitwidth - 1
    return m.clamp(-limit, limit)


def range_estimate(t: Tensor) -> int:
    """RangeEstimate: ceil(log2(max|t|)) of an integer-valued tensor, 0 when it is all zeros.

    Exact on the integer maximum (the reference takes log2 of its float32 copy, which can be one
    short just above a power of two beyond 2^24).
    """
    peak = int(host_abs_max(t))
    return (peak - 1).bit_length() if peak > 0 else 0


def _signed(magnitude: Tensor, like: Tensor) -> Tensor:
    return torch.where(like < 0, -magnitude, magnitude)


def round_shift(x: Tensor, shift: int, bitwidth: int = INT8_BITWIDTH) -> Tensor:
    """RoundShift: x / 2^shift rounded half away from zero, then clipped (sign-magnitude form).

    Integer tensors are shifted in int64. Float tensors holding integers (the GEMM accumulators)
    are shifted in their own dtype: floor(|x| 2^-shift + 1/2) is exact there, except just below
    2^(bitwidth+1), which the clip maps to the same limit anyway.
    """
    if shift < 0:
        raise ValueError(f"round_shift needs a non-negative shift, got {shift}")
    limit = 2**bitwidth - 1
    if x.is_floating_point():
        if shift == 0:
            return x.clamp(-limit, limit)
        rounded = x.abs().mul_(2.0**-shift).add_(0.5).floor_()
        return rounded.copysign_(x).clamp_(-limit, limit)
    x = x.to(torch.int64)
    magnitude = x.abs()
    if shift > 0:
        magnitude = (magnitude + (1 << (shift - 1))) >> shift
    return int_clip(_signed(magnitude, x), bitwidth)


def psto_shift(x: Tensor, shift: int | Tensor, bitwidth: int = INT8_BITWIDTH) -> Tensor:
    """PstoShift: pseudo-stochastic rounding; the low half of the discarded bits is the random draw.

    `shift` may be a tensor broadcast against x (a shift per member of a stacked tensor); a shift
    of 0 keeps x (clipped)."""
    if isinstance(shift, int) and shift < 0:
        raise ValueError(f"psto_shift needs a non-negative shift, got {shift}")
    x = x.to(torch.int64)
    return int_clip(_signed(shift_round(x.abs(), shift, "pseudo_stochastic"), x), bitwidth)


def sto_shift(x: Tensor, shift: int, generator: torch.Generator | MemberGenerators | None,
              bitwidth: int = INT8_BITWIDTH) -> Tensor:
    """StoShift: round |x| / 2^shift up iff its discarded bits r exceed a uniform draw in [0, 2^shift).

    The draw is one `torch.randint(0, 2**shift, x.shape, dtype=int64, generator=generator)` on the
    generator's device, so a run is reproducible from the generator's seed. With `MemberGenerators`
    (x stacked over group members) each member's part is drawn from its own generator, as alone.
    """
    x = x.to(torch.int64)
    magnitude = x.abs()
    kept = magnitude >> shift
    discarded = magnitude - (kept << shift)

    def fill_(out: Tensor, source: torch.Generator | None) -> Tensor:
        return out.random_(0, 2**shift, generator=source)  # torch.randint's draws

    device = generator.device if generator is not None else torch.device("cpu")  # the draws' device
    draw = draw_values(x.shape, torch.int64, device, generator, fill_)
    return int_clip(_signed(kept + (discarded > draw.to(x.device)).to(torch.int64), x), bitwidth)


def _ceil_log2(peak: float) -> int:
    """ceil(log2(peak)) for a positive finite float, exactly (frexp instead of a rounded log2)."""
    mantissa, exponent = math.frexp(peak)
    return exponent - 1 if mantissa == 0.5 else exponent


def _float_to_int(x: Tensor, bitwidth: int) -> tuple[Tensor, int]:
    """TiFloatToInt8 with the mantissa left in a float tensor (float32 when that is exact)."""
    values = torch.nan_to_num(x.detach(), nan=0.0, posinf=0.0, neginf=0.0)
    if not values.is_floating_point():
        values = values.double()
    peak = host_abs_max(values)
    if peak == 0.0:
        return torch.zeros_like(values), 0
    exp = _ceil_log2(peak) - bitwidth
    if values.dtype != torch.float32 or abs(exp) > 100:  # keep the power-of-two scaling exact
        values = values.double()
    mantissa = torch.round(values * 2.0**-exp).clamp(-(2**bitwidth), 2**bitwidth - 1)
    return mantissa, exp


def float_to_int(x: Tensor, bitwidth: int = INT8_BITWIDTH) -> tuple[Tensor, int]:
    """TiFloatToInt8: b = ceil(log2 max|x|), e = b - bitwidth, m = clamp(round(x * 2^-e)).

    Rounding is torch.round (half to even) and the clamp is [-2^bitwidth, 2^bitwidth - 1], as in
    the reference; an all-zero tensor gives m = 0, e = 0. Non-finite entries are treated as 0.
    Returns (m as int64, e).
    """
    mantissa, exp = _float_to_int(x, bitwidth)
    return mantissa.to(torch.int64), exp


def weight_quant(w: Tensor, bitwidth: int = INT8_BITWIDTH) -> tuple[Tensor, int]:
    """NITI's weight init: m = round(w / max|w| * (2^bitwidth - 1)), e = ceil(log2 max|w|) - bitwidth.

    m is normalised by max|w| rather than 2^b, so m * 2^e is a slightly rescaled w (as in the
    reference). The division and multiplication run in w's own dtype, like the reference.
    """
    peak = float(w.detach().abs().max())
    if not math.isfinite(peak) or peak == 0.0:
        raise ValueError(f"weight_quant needs a finite, non-zero weight tensor, got max|w| = {peak}")
    mantissa = torch.round(w.detach() / peak * (2**bitwidth - 1))
    return mantissa.to(torch.int64), _ceil_log2(peak) - bitwidth


def act_calc(acc: Tensor, bitwidth: int = INT8_BITWIDTH) -> tuple[Tensor, int]:
    """act_calc / err_calc: shift an integer accumulator back to `bitwidth` bits with RoundShift.

    s = RangeEstimate(acc) - bitwidth; s > 0 gives RoundShift(acc, s), otherwise acc as it is
    (clipped, where the reference's int8 cast would wrap +128 to -128). Returns (m, max(s, 0)),
    m in acc's dtype (int64, or a float tensor holding integers).
    """
    shift = range_estimate(acc) - bitwidth
    if shift > 0:
        return round_shift(acc, shift, bitwidth), shift
    return int_clip(acc, bitwidth), 0


def grad_calc(g32: Tensor, mu: int, bitwidth: int = INT8_BITWIDTH) -> Tensor:
    """grad_calc (2021 code): renormalise the weight gradient to mu bits, whatever its size.

    b = RangeEstimate(g32): b == 0 gives zeros, b - mu < 1 gives g32 itself (clipped), otherwise
    PstoShift(g32, b - mu). mu plays the role of the learning rate.
    """
    g32 = g32.to(torch.int64)
    b = range_estimate(g32)
    if b == 0:
        return torch.zeros_like(g32)
    if b - mu < 1:
        return int_clip(g32, bitwidth)
    return psto_shift(g32, b - mu, bitwidth)


# ----------------------------------------------------------------------------------------------
# Integer cross-entropy backward (ti_loss.py)
