"""OCP Microscaling (MX v1.0) block formats: blocks of 32 elements share one E8M0 scale.

A block's scale is X = 2^(floor(log2 max|v|) - emax_elem), where emax_elem is the exponent of the
element format's largest binade, clamped to E8M0's range 2^-127..2^127 (the spec's conversion
rule, and gfloat's `compute_scale_amax`). Each element v/X is rounded onto the element grid (ties
to even, or the requested mode) and saturates at the element's max, as the spec asks of
conversions. Edge cases, documented in docs/formats.md and tested in tests/test_mx.py:

* a block of zeros gets the smallest scale, 2^-127 (E8M0 code 0), as gfloat does;
* a block holding inf or NaN gets the NaN scale (E8M0 code 0xFF), so all its 32 values are NaN;
* MXINT8 elements are 8-bit two's complement with 6 fraction bits, kept symmetric in
  -127/64..127/64 as microxcaling does (`fixed(8,6,symmetric=1)`): gfloat's ocp_int8 also uses -2
  (code 0x80), but a block whose element rounds to -2X has max|v| = 2X and would re-quantize with
  twice the scale, so quantize would not be idempotent. Code 0x80 is never produced.

Nearest rounding of float32 (and float16/bfloat16) input takes a fused path built from integer
operations on the bit patterns (`MXFormat._quantize_blocks_nearest`), equal bit for bit to the
scale-divide-round-multiply formula that every other case runs.

`encode`/`decode`/`values`/`max` describe the element grid at unit scale, like every format;
`encode_blocks`/`decode_blocks` give the real MX bit stream: one scale code per block plus the
element codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from dse.formats.base import (
    NumberFormat,
    Scaling,
    constant,
    cpu_chunk_elements,
    float_exponent,
    power_of_two,
    to_blocks,
)
from dse.formats.fixed import FixedPoint
from dse.formats.floating import FloatFormat
from dse.formats.spec import Value, get, register_alias, register_family, scaling_arg

SCALE_BITS = 8
SCALE_EXPONENT_LIMIT = 127  # E8M0: codes 0..254 are 2^-127..2^127
SCALE_NAN_CODE = 255
MX_SCALING = Scaling(kind="block", axis=-1, block_size=32)
MX_SCALE_KINDS = ("block", "none")  # none: the bare element grid, without the shared scale

# Element names accepted by mx(...) and the spec of each element grid, saturating (OCP MX 6.3).
ELEMENTS: dict[str, str] = {
    "fp8_e4m3": "fp8_e4m3",
    "fp8_e5m2": "fp8_e5m2(overflow=saturate)",
    "fp6_e3m2": "fp6_e3m2",
    "fp6_e2m3": "fp6_e2m3",
    "fp4_e2m1": "fp4_e2m1",
    "int8": "fixed(8,6,symmetric=1)",
}


@dataclass(frozen=True)
class _NearestPlan:
    """Integer constants of MXFormat's fused nearest path (see `_quantize_blocks_nearest`)."""

    limit_floor: int  # max * 2^E has the bits max(F << 23, limit_floor) + limit_offset
    limit_offset: int
    factor: float  # FP elements: C = 2^max(exponent(v), emin + E) * factor; 0 for MXINT8
    floor_offset: int  # 2^(emin + E) has the bits max((F << 23) - floor_offset, 0)
    magic_offset: int  # MXINT8: C = 1.5 * 2^(E - frac + 23) has the bits (F << 23) + magic_offset
    lowest_field: int  # blocks with 0 < F < lowest_field or highest_field < F < 255 are redone
    highest_field: int


class _Constants(NamedTuple):
    """_NearestPlan's offsets and the float32 bit masks, as 0-dim int32 tensors on one device."""

    magnitude_mask: Tensor
    exponent_mask: Tensor
    sign_bit: Tensor
    limit_offset: Tensor
    floor_offset: Tensor
    magic_offset: Tensor


@dataclass(frozen=True)
class MXFormat(NumberFormat):
    """An OCP MX format: an element grid plus one shared power-of-two E8M0 scale per block."""

    element: NumberFormat
    scaling: Scaling = MX_SCALING
    element_name: str = field(init=False, compare=False)  # its name in mx(...), from ELEMENTS

    family: ClassVar[str] = "mx"
    scale_bits: ClassVar[int] = SCALE_BITS

    def __post_init__(self) -> None:
        if self.scaling.kind not in MX_SCALE_KINDS or self.scaling.pow2:
            raise ValueError(f"MX formats scale per block with E8M0 powers of two (or not at all: "
                             f"scale=none), got {self.scaling}")
        object.__setattr__(self, "element_name", element_name(self.element))

    @property
    def bits(self) -> int:
        """Bits of one element; the shared scale adds scale_bits / block_size per element."""
        return self.element.bits

    @property
    def block_size(self) -> int:
        return self.scaling.block_size

    @property
    def axis(self) -> int:
        return self.scaling.axis

    @property
    def element_emax(self) -> int:
        """Exponent of the element grid's largest binade (8 for E4M3, 0 for INT8)."""
        return math.frexp(self.element.max)[1] - 1

    @property
    def spec(self) -> str:
        options = self.scaling.options(MX_SCALING)
        names = [name for name, expansion in _ALIASES.items() if expansion == f"mx({self.element_name})"]
        name = min(names, key=len)
        return f"{name}({','.join(options)})" if options else name

    @property
    def max(self) -> float:
        return self.element.max

    @property
    def min_positive(self) -> float:
        return self.element.min_positive

    def quantize(self, x: Tensor, rounding: str = "nearest",
                 generator: torch.Generator | None = None) -> Tensor:
        """As NumberFormat.quantize; nearest rounding of float32 (or narrower) input takes the fused
        block path (`_quantize_blocks_nearest`), which gives the same values bit for bit (not for
        input that autograd records: its in-place passes would not be differentiable)."""
        if (rounding != "nearest" or self.scaling.kind != "block" or self._nearest_plan is None
                or x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.numel() == 0
                or (x.requires_grad and torch.is_grad_enabled())):
            return super().quantize(x, rounding, generator)
        work = x.float().reshape(1) if x.dim() == 0 else x.float()
        axis, size = self.axis % work.dim(), self.block_size
        length = work.shape[axis]
        if axis == work.dim() - 1 and length % size == 0:  # rows of whole blocks (Linear layers)
            blocks = work.contiguous().view(-1, 1, size, 1)
            out = torch.empty_like(blocks)
            self._quantize_blocks_nearest(blocks, out)
            return out.view(x.shape).to(x.dtype)
        # (outer, length, inner): blocks run along the middle axis, where they lie, with no copy.
        grid = work.contiguous().view(math.prod(work.shape[:axis]), length, -1)
        out = torch.empty_like(grid)
        full = length - length % size
        # Whole blocks, then one shorter block at the end: padding it with zeros changes nothing.
        for start, stop, width in ((0, full, size), (full, length, length - full)):
            if stop == start:
                continue
            shape = (grid.shape[0], (stop - start) // width, width, grid.shape[2])
            if stop - start == length:  # the whole axis: no slicing
                self._quantize_blocks_nearest(grid.view(shape), out.view(shape))
            else:
                self._quantize_blocks_nearest(grid[:, start:stop].view(shape), out[:, start:stop].view(shape))
        return out.view(x.shape).to(x.dtype)

    def _quantize_blocks_nearest(self, blocks: Tensor, out: Tensor) -> None:
        """Quantize float32 blocks (outer, n_blocks, width, inner) along dim 2 to nearest, into out:
        one pass, slice by slice along dim 0.

        Everything comes from bit patterns, with no division or log2. |v| is the pattern with the
        sign cleared (kept in the output), and the block's max of it has the exponent field F, so
        the E8M0 exponent is E = F - 127 - emax_elem, max * 2^E (the saturation bound; NaN when
        F = 255, as max has a non-zero mantissa) is F's field plus a constant, and so is the
        element grid's subnormal floor 2^(emin + E). The rounding runs in the input's units: the
        grid step of v is 2^k with k = max(exponent(v), emin + E) - m, and adding then
        subtracting C = 2^(23 + k) rounds |v| to it, ties to even (FloatFormat's magic rounding;
        for MXINT8 the step is 2^(E - 6) for the whole block and C = 1.5 * 2^(23 + E - 6) rounds
        the signed v, so that zero results are +0). Blocks for which a constant leaves float32's
        normal range (max|v| non-zero and below 2^-97 (e5m2) to 2^-126 (int8), or at least
        2^106 to 2^111) are redone with the reference formula, after a check that syncs.
        """
        plan = self._nearest_plan
        constants = self._constants(blocks.device)
        magnitude = out.view(torch.int32)
        amax = torch.empty((*blocks.shape[:2], 1, blocks.shape[3]), dtype=torch.int32, device=blocks.device)
        rows = max(cpu_chunk_elements(blocks) // math.prod(blocks.shape[1:]), 1)
        scratch = torch.empty((min(rows, blocks.shape[0]), *blocks.shape[1:]), dtype=torch.int32,
                              device=blocks.device)
        if blocks.shape[0] <= rows:  # one slice: no slicing
            self._round_rows_nearest(blocks, out, magnitude, amax, scratch, plan, constants)
        else:
            for start in range(0, blocks.shape[0], rows):
                chunk = slice(start, start + rows)
                self._round_rows_nearest(blocks[chunk], out[chunk], magnitude[chunk], amax[chunk],
                                         scratch[: out[chunk].shape[0]], plan, constants)
        # Blocks whose constants leave float32's normal range: 0 < F < lowest_field or
        # highest_field < F < 255. The extremes of max|v| over the blocks rule them out at once.
        low, high = torch.aminmax(amax)
        if int(low) < plan.lowest_field << 23 or int(high) >= (plan.highest_field + 1) << 23:
            exponent_field = amax >> 23
            bad = ((exponent_field < plan.lowest_field) & (amax != 0)
                   | (exponent_field > plan.highest_field) & (exponent_field < 255))
            if bool(bad.any()):
                scale = self.scale_from_amax(blocks.abs().amax(dim=2, keepdim=True))
                reference = self.round_unscaled(blocks / scale, "nearest", None) * scale
                out.copy_(torch.where(bad, reference, out))

    @staticmethod
    def _round_rows_nearest(blocks: Tensor, part: Tensor, mag: Tensor, block_max: Tensor, scratch: Tensor,
                            plan: _NearestPlan, constants: _Constants) -> None:
        """One slice of `_quantize_blocks_nearest`: part (float32) and mag (its int32 view) get the
        rounded blocks, block_max the max|v| bits of each block; scratch is int32 space of part's shape."""
        torch.bitwise_and(blocks.view(torch.int32), constants.magnitude_mask, out=mag)
        torch.amax(mag, dim=2, keepdim=True, out=block_max)
        field = torch.bitwise_and(block_max, constants.exponent_mask)  # F << 23
        limit = field.clamp_min(plan.limit_floor).add_(constants.limit_offset)
        if plan.factor:  # FP elements
            torch.bitwise_and(mag, constants.exponent_mask, out=scratch)
            torch.maximum(scratch, field.sub_(constants.floor_offset).clamp_min_(0), out=scratch)
            binade = scratch.view(torch.float32)  # 2^max(exponent(v), emin + E) = C / factor
            part.add_(binade, alpha=plan.factor).sub_(binade, alpha=plan.factor)
            torch.minimum(part, limit.view(torch.float32), out=part)
            part.copysign_(blocks)  # v's sign (zero results are +0 until here)
        else:  # MXINT8
            magic = field.clamp_max_(plan.highest_field << 23).add_(constants.magic_offset)
            magic = magic.view(torch.float32)
            torch.add(blocks, magic, out=part).sub_(magic)
            torch.minimum(part, limit.view(torch.float32), out=part)
            torch.maximum(part, limit.bitwise_or_(constants.sign_bit).view(torch.float32), out=part)

    @cached_property
    def _constants_by_device(self) -> dict[torch.device, _Constants]:
        return {}

    def _constants(self, device: torch.device) -> _Constants:
        """The fused paths' integer constants as 0-dim int32 tensors on `device` (cheap operands)."""
        constants = self._constants_by_device.get(device)
        if constants is None:
            plan = self._nearest_plan
            assert plan is not None

            constants = self._constants_by_device[device] = _Constants(*(
                constant(value, torch.int32, device) for value in
                (0x7FFFFFFF, 0x7F800000, -(2**31), plan.limit_offset, plan.floor_offset, plan.magic_offset)))
        return constants

    @cached_property
    def _nearest_plan(self) -> _NearestPlan | None:
        """The integer constants of `_quantize_blocks_nearest` for this element; None: no fast path."""
        element, emax = self.element, self.element_emax
        max_bits = int(torch.tensor(element.max, dtype=torch.float32).view(torch.int32))
        if max_bits & 0x7FFFFF == 0 or float(torch.tensor(element.max, dtype=torch.float32)) != element.max:
            return None  # max * 2^E would not be NaN for F = 255
        limit_offset = max_bits - ((127 + emax) << 23)
        if (isinstance(element, FloatFormat) and element.subnormals and element.overflow == "saturate"
                and self.element_has_negative_zero and emax >= 1):
            m, emin = element.man_bits, element.min_normal_exponent
            return _NearestPlan(limit_floor=emax << 23, limit_offset=limit_offset, factor=2.0 ** (23 - m),
                                floor_offset=(emax - emin) << 23, magic_offset=0,
                                lowest_field=1 + emax - emin, highest_field=231 + m)
        if isinstance(element, FixedPoint) and element.symmetric and 0 <= emax <= 21 - element.frac_bits:
            frac = element.frac_bits
            return _NearestPlan(limit_floor=emax << 23, limit_offset=limit_offset, factor=0.0, floor_offset=0,
                                magic_offset=((23 - frac - emax) << 23) | (1 << 22),
                                lowest_field=1 + emax, highest_field=231 + emax + frac)
        return None

    def round_unscaled(self, x: Tensor, rounding: str, generator: torch.Generator | None) -> Tensor:
        rounded = self.element.round_unscaled(x, rounding, generator)
        # An element without a -0 code (INT8) gives +0, so quantize equals the decoded bit stream.
        return rounded if self.element_has_negative_zero else rounded.add_(0.0)

    @cached_property
    def element_has_negative_zero(self) -> bool:
        negative_zero = self.element.decode(self.element.encode(torch.tensor([-0.0])))
        return bool(torch.signbit(negative_zero).item())

    def encode(self, x: Tensor) -> Tensor:
        return self.element.encode(x)

    def decode(self, codes: Tensor) -> Tensor:
        return self.element.decode(codes)

    # --- the shared scale ---------------------------------------------------------------------------
    def scale_exponents(self, amax: Tensor) -> tuple[Tensor, Tensor]:
        """E8M0 exponents (int64) of the blocks with these max|v|, and which blocks are finite."""
        exponent = (float_exponent(amax) - self.element_emax).clamp(-SCALE_EXPONENT_LIMIT,
                                                                     SCALE_EXPONENT_LIMIT)
        exponent = torch.where(amax == 0, -SCALE_EXPONENT_LIMIT, exponent)
        return exponent, torch.isfinite(amax)

    def scale_from_amax(self, amax: Tensor) -> Tensor:
        if amax.dtype == torch.float32:
            return self._scale_from_amax_float32(amax)
        exponent, finite = self.scale_exponents(amax)
        return torch.where(finite, power_of_two(exponent), math.nan).to(amax.dtype)

    def _scale_from_amax_float32(self, amax: Tensor) -> Tensor:
        """scale_from_amax for float32 max|v| (>= 0 or NaN), from its exponent field F: E = F - 127 -
        emax_elem clamped to -127..127 is the spec's exponent for every amax (F = 0, zero and
        subnormals, clamps to -127), built as a float64 power of two (exact, 2^-127 included) and
        cast; amax * 0 is NaN exactly for the inf and NaN blocks. Fewer operations than frexp."""
        exponent = torch.bitwise_right_shift(amax.view(torch.int32), 23).to(torch.int64)
        exponent = exponent.sub_(127 + self.element_emax).clamp_(-SCALE_EXPONENT_LIMIT, SCALE_EXPONENT_LIMIT)
        scale = exponent.add_(1023).bitwise_left_shift_(52).view(torch.float64).to(torch.float32)
        return torch.addcmul(scale, amax, constant(0.0, torch.float32, amax.device))

    def encode_blocks(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The MX bit stream of x: (scale codes, element codes), int64, in blocked layout.

        The blocked axis is moved last and zero-padded to a multiple of block_size: scale codes have
        shape (..., n_blocks) and element codes (..., n_blocks, block_size). A block holding inf or
        NaN gets scale code 0xFF and element codes 0. The blocks are those of block_size and axis,
        also for scale=none.
        """
        blocks, _, _ = to_blocks(x, self.axis, self.block_size)
        exponent, finite = self.scale_exponents(blocks.abs().amax(dim=-1, keepdim=True))
        scale_codes = torch.where(finite, exponent + SCALE_EXPONENT_LIMIT, SCALE_NAN_CODE)
        scaled = torch.where(finite, blocks.double() / power_of_two(exponent), 0.0)
        return scale_codes.squeeze(-1), self.element.encode(scaled)

    def decode_blocks(self, scale_codes: Tensor, element_codes: Tensor) -> Tensor:
        """Values (float64, blocked layout) of an MX bit stream from `encode_blocks`."""
        scale_codes = scale_codes.to(torch.int64)
        scales = torch.where(scale_codes == SCALE_NAN_CODE, math.nan,
                             power_of_two(scale_codes.clamp(max=2 * SCALE_EXPONENT_LIMIT)
                                          - SCALE_EXPONENT_LIMIT))
        return self.element.decode(element_codes) * scales.unsqueeze(-1)


def element_name(element: NumberFormat) -> str:
    """The name under which mx(...) knows this element grid."""
    for name, element_spec in ELEMENTS.items():
        if get(element_spec) == element:
            return name
    raise ValueError(f"MX element must be one of {', '.join(ELEMENTS)}, got {element.spec}")


def mx(element: Value | None = None, block: Value | None = None, axis: Value | None = None,
       scale: Value | None = None) -> MXFormat:
    """mx(ELEMENT, block=32, axis=-1, scale=block|none).

    ELEMENT in fp8_e4m3, fp8_e5m2, fp6_e3m2, fp6_e2m3, fp4_e2m1, int8; scale=none drops the shared
    scale (the bare element grid).
    """
    if element not in ELEMENTS:
        raise ValueError(f"mx element must be one of {', '.join(ELEMENTS)}, got {element!r}")
    return MXFormat(element=get(ELEMENTS[str(element)]),
                    scaling=scaling_arg(MX_SCALING, scale, None, axis, block, kinds=MX_SCALE_KINDS))


_ALIASES: dict[str, str] = {
    "mxfp8_e4m3": "mx(fp8_e4m3)",
    "mxfp8_e5m2": "mx(fp8_e5m2)",
    "mxfp6_e3m2": "mx(fp6_e3m2)",
    "mxfp6_e2m3": "mx(fp6_e2m3)",
    "mxfp4": "mx(fp4_e2m1)",
    "mxint8": "mx(int8)",
}

register_family("mx", mx)
for _name, _expansion in _ALIASES.items():
    register_alias(_name, _expansion)
