"""The fast path of posit rounding for float32 input: nearest and toward-zero rounding of the pattern
by float64 arithmetic (a multiply by 2^-d, round or trunc, a divide), which equals `shift_round` on the
integer pattern (Posit's reference) because every float32 pattern is below 2^31 and so exact in float64."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dse.formats.fast import FastPath, enabled, reference_only_active, register

if TYPE_CHECKING:
    from dse.formats.posit import _Tables

FLOAT_ROUTE = register(FastPath(
    name="posit-float-route",
    reference="Posit's integer route: shift_round of the pattern at the regime's bit d",
    operation="round_unscaled",
    formats=("posit8", "posit16", "posit32", "posit(8,0)", "posit(16,1)", "posit(5,3)", "posit(9,4)"),
    roundings=("nearest", "toward_zero"),
))


def round_pattern(pattern: Tensor, regime: Tensor, tables: _Tables, rounding: str) -> Tensor | None:
    """The rounded magnitude bits (int32) of float32 patterns (offset by the frame), or None where this
    path does not apply (other roundings, inside reference_only())."""
    if rounding not in ("nearest", "toward_zero") or reference_only_active() or not enabled(FLOAT_ROUTE):
        return None
    step = torch.index_select(tables.step, 0, regime)
    scaled = pattern.double()
    scaled *= step
    rounded = scaled.round_() if rounding == "nearest" else scaled.trunc_()
    return torch.addcdiv(tables.minus_offset, rounded, step).to(torch.int32)
