"""Block-scaled formats: blocks of `size` elements along `axis` share one scale in a scale format,
optionally under a second, per-tensor fp32 scale. OCP Microscaling (MX v1.0) and NVIDIA's NVFP4
are two instances of the one rule.

    block(ELEMENT, size=32, scale=e8m0, tensor_scale=none, axis=-1)

ELEMENT is any unscaled format of the zoo (fp, int/fixed, p3109, posit, lns); its values beyond max
saturate (OCP MX 6.3 asks conversions to clamp; NVFP4 clamps to +-6). The scale formats:

* ``e8m0`` (OCP MX): X = 2^(floor(log2 max|v|) - emax_elem), emax_elem the exponent of the element
  grid's largest binade, clamped to E8M0's range 2^-127..2^127 (the spec's conversion rule, and
  gfloat's `compute_scale_amax`); a block of zeros gets 2^-127 (E8M0 code 0), as gfloat does;
* a floating-point grid (``e4m3``; ``ue4m3``, the same values stored without the sign bit, as NVFP4
  stores them; ``ue5m3``, unsigned 5 exponent and 3 mantissa bits, bias 15, NaN only at all ones;
  ``fp32``; or any fp(...) spec), NVIDIA's rule as torchao computes it for NVFP4: the block scale is
  max|v| / max_elem rounded to nearest onto the scale grid after clamping to [smallest normal, max];
  with ``tensor_scale=fp32`` first s_t = max|x| / (max_scale * max_elem) over the whole tensor
  (1 where that is zero or not finite) and the block scale is (max|v| / max_elem) / s_t. Elements
  are v * ((1 / s_t) / s_b) (a reciprocal, then a multiply: NVIDIA's kernels and torchao) rounded
  onto the element grid, and the values are q * (s_t * s_b).

A block holding inf or NaN gets a NaN scale, so all its values are NaN (as microxcaling does).
MXINT8 elements are 8-bit two's complement with 6 fraction bits, kept symmetric in
-127/64..127/64 as microxcaling does (`fixed(8,6,symmetric=1)`): gfloat's ocp_int8 also uses -2
(code 0x80), but a block whose element rounds to -2X has max|v| = 2X and would re-quantize with
twice the scale, so quantize would not be idempotent. Code 0x80 is never produced.

Nearest rounding of float32 (and float16/bfloat16) input with an E8M0 scale takes a fused path built
from integer operations on the bit patterns (`BlockFormat._quantize_blocks_nearest`), equal bit for
bit to the scale-divide-round-multiply formula that every other case runs.

`encode`/`decode`/`values`/`max` describe the element grid at unit scale, like every format;
`encode_blocks`/`decode_blocks` give the real bit stream: one scale code per block plus the
element codes (and `tensor_scale_of(x)`, the fp32 tensor scale, where there is one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from dse.formats.base import (
    FLOAT32_MIN_NORMAL,
    FLOAT_DTYPES,
    NumberFormat,
    Scaling,
    constant,
    cpu_chunk_elements,
    float_exponent,
    from_blocks,
    power_of_two,
    round_to_float32,
    to_blocks,
)
from dse.formats.fixed import FixedPoint
from dse.formats.floating import FloatFormat, Kernel
from dse.formats.p3109 import P3109Format
from dse.formats.spec import Value, choice_arg, get, int_arg, register_alias, register_family

_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64}  # bit patterns of FLOAT_DTYPES
SCALE_EXPONENT_LIMIT = 127  # E8M0: codes 0..254 are 2^-127..2^127
SCALE_NAN_CODE = 255
DEFAULT_SCALING = Scaling(kind="block", axis=-1, block_size=32)
MAX_BLOCK_SIZE = 4096
E8M0 = "e8m0"
# Named scale formats: the grid of each (None: E8M0's powers of two) and its stored bits.
SCALES: dict[str, tuple[str | None, int]] = {
    "e8m0": (None, 8),
    "e4m3": ("fp8_e4m3", 8),
    "ue4m3": ("fp8_e4m3", 7),
    "ue5m3": ("fp(e=5,m=3,special=fn)", 8),
    "fp32": ("fp32", 32),
}
SCALE_SYNONYMS = {"ue8m0": "e8m0", "fp8_e4m3": "e4m3"}
TENSOR_SCALES: tuple[str, ...] = ("none", "fp32")

# OCP MX element names accepted by mx(...) and the spec of each element grid, saturating (OCP MX 6.3).
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
    """Integer constants of the fused E8M0 nearest path (see `_quantize_blocks_nearest`)."""

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
class BlockFormat(NumberFormat):
    """An element grid plus one scale per block in a scale format (and an optional fp32 tensor scale)."""

    element: NumberFormat
    scaling: Scaling = DEFAULT_SCALING
    scale: str = E8M0  # a SCALES name, or the spec of a floating-point grid
    tensor_scale: bool = False

    family: ClassVar[str] = "block"

    def __post_init__(self) -> None:
        if self.scaling.kind not in ("block", "none") or self.scaling.pow2:
            raise ValueError(f"block formats scale per block (or not at all: scale=none), got {self.scaling}")
        if self.element.scaling != Scaling() or isinstance(self.element, BlockFormat):
            raise ValueError(f"a block element is an unscaled grid, got {self.element.spec}")
        grid = self.scale_grid
        if grid is not None and not (grid.min_positive < 1 < grid.max):
            raise ValueError(f"scale {self.scale} cannot hold the block maxima: a block scale must reach "
                             f"below 1 (blocks under the element max) and above 1 (blocks over it), "
                             f"{self.scale} spans {grid.min_positive:g}..{grid.max:g}")
        if self.tensor_scale and (grid is None or grid.bits > 16):
            raise ValueError(f"tensor_scale=fp32 goes with a narrow block scale (16 bits or fewer, e.g. "
                             f"e4m3): scale {self.scale} spans its range alone")

    @property
    def bits(self) -> int:
        """Bits of one element; the block scale adds scale_bits / block_size per element."""
        return self.element.bits

    @property
    def block_size(self) -> int:
        return self.scaling.block_size

    @property
    def axis(self) -> int:
        return self.scaling.axis

    @property
    def scale_bits(self) -> int:
        """Stored bits of one block scale (the fp32 tensor scale is one number per tensor)."""
        return SCALES[self.scale][1] if self.scale in SCALES else get(self.scale).bits

    @cached_property
    def scale_grid(self) -> FloatFormat | None:
        """The block scale's grid; None for E8M0 (powers of two by OCP's rule)."""
        if self.scale in SCALES:
            spec = SCALES[self.scale][0]
            return None if spec is None else get(spec)  # type: ignore[return-value]
        return get(self.scale)  # type: ignore[return-value]

    @property
    def element_emax(self) -> int:
        """Exponent of the element grid's largest binade (8 for E4M3, 0 for INT8)."""
        return math.frexp(self.element.max)[1] - 1

    @cached_property
    def spec(self) -> str:
        for name, expansion in _ALIASES.items():
            named = get(expansion)
            assert isinstance(named, BlockFormat)
            if replace(named, scaling=self.scaling) == self:
                options = self.scaling.options(named.scaling)
                if not expansion.startswith("mx("):  # block(...) calls the block size size=
                    options = [option.replace("block=", "size=") for option in options]
                return f"{name}({','.join(options)})" if options else name
        options = [f"size={self.block_size}"]
        if self.scaling.kind == "none":
            options.append("scale=none")
        elif self.scale != E8M0:
            options.append(f"scale={self.scale}")
        if self.tensor_scale:
            options.append("tensor_scale=fp32")
        if self.axis != DEFAULT_SCALING.axis:
            options.append(f"axis={self.axis}")
        return f"block({self.element.spec},{','.join(options)})"

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
        if self.scaling.kind == "block" and self.scale_grid is not None:
            return self._quantize_by_scale_grid(x, rounding, generator)
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
                amax_float = blocks.abs().amax(dim=2, keepdim=True)
                reference = self.round_by_scale(blocks, amax_float, "nearest", None)
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
        if self.scale != E8M0 or self.tensor_scale:
            return None
        max_bits = int(torch.tensor(element.max, dtype=torch.float32).view(torch.int32))
        if max_bits & 0x7FFFFF == 0 or float(torch.tensor(element.max, dtype=torch.float32)) != element.max:
            return None  # max * 2^E would not be NaN for F = 255
        limit_offset = max_bits - ((127 + emax) << 23)
        if (type(element) is FloatFormat and element.subnormals and element.overflow == "saturate"
                and self.element_has_negative_zero and emax >= 1):
            m, emin = element.man_bits, element.min_normal_exponent
            return _NearestPlan(limit_floor=emax << 23, limit_offset=limit_offset, factor=2.0 ** (23 - m),
                                floor_offset=(emax - emin) << 23, magic_offset=0,
                                lowest_field=1 + emax - emin, highest_field=231 + m)
        if isinstance(element, FixedPoint) and element.symmetric and 0 <= emax <= 21 - element.frac_bits:
            frac = element.frac_bits
            # F = 0 (blocks of zeros: others with F = 0 are redone) takes F = 1's bound, a normal float32:
            # max * 2^-127 is a subnormal, which a CPU flushing denormals reads as 0 with its sign, -0.
            return _NearestPlan(limit_floor=max(emax, 1) << 23, limit_offset=limit_offset, factor=0.0,
                                floor_offset=0, magic_offset=((23 - frac - emax) << 23) | (1 << 22),
                                lowest_field=1 + emax, highest_field=231 + emax + frac)
        return None

    def _quantize_by_scale_grid(self, x: Tensor, rounding: str, generator: torch.Generator | None) -> Tensor:
        """quantize with a floating-point block scale (NVIDIA's rule, see the module docstring).

        Two sweeps over rows of blocks, a cache-sized slice at a time, into preallocated space: the
        block maxima (`_rows_abs_max`), then, after the scales, v * r, the element rounding and the
        product with s per slice. Nearest rounding of an element with a fused kernel (the magic
        constant of `FloatFormat`) runs that kernel itself, which is what its `round_unscaled` runs.
        """
        if not torch.is_floating_point(x):
            raise TypeError(f"quantize expects a floating-point tensor, got {x.dtype}")
        work = x if x.dtype in FLOAT_DTYPES else x.float()
        if work.numel() == 0:
            return x.clone()
        flat = work.reshape(1) if work.dim() == 0 else work
        blocks, shape, pad = to_blocks(flat, self.axis, self.block_size)
        rows = blocks.reshape(-1, self.block_size)  # a copy only where the blocks are not contiguous
        step = max(cpu_chunk_elements(rows) // self.block_size, 1)
        amax = _rows_abs_max(rows, step)
        tensor_scale = self._tensor_scale_from_amax(amax) if self.tensor_scale else None
        block_scale = self.block_scales(amax, tensor_scale)
        if tensor_scale is None:
            reciprocal, scale = torch.reciprocal(block_scale), block_scale
        else:
            reciprocal, scale = torch.reciprocal(tensor_scale) / block_scale, tensor_scale * block_scale
        recorded = rows.requires_grad and torch.is_grad_enabled()
        kernel = None if rounding != "nearest" or recorded else self._element_kernel(rows.dtype, rows.device)
        out = torch.empty_like(rows)
        scaled = torch.empty_like(rows[:step])
        scratch = None if kernel is None else torch.empty_like(scaled, dtype=_INT_OF[rows.dtype])
        for start in range(0, rows.shape[0], step):
            part = slice(start, start + step)
            result = out[part]
            y = torch.mul(rows[part], reciprocal[part], out=scaled[: result.shape[0]])
            if kernel is None:
                torch.mul(self.round_unscaled(y, rounding, generator), scale[part], out=result)
                continue
            assert scratch is not None
            kernel(y, result, scratch[: result.shape[0]])
            if not self.element_has_negative_zero:
                result.add_(0.0)
            result.mul_(scale[part])
        out = from_blocks(out.view(blocks.shape), shape, self.axis, pad).reshape(work.shape)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def _element_kernel(self, dtype: torch.dtype, device: torch.device) -> Kernel | None:
        """The element's fused nearest rounding of `dtype` (kernel(x, out, int scratch)), where its
        round_unscaled runs exactly that; None for other elements."""
        element = self.element
        if not isinstance(element, FloatFormat):
            return None
        return element.nearest_kernel(dtype, device)

    def _tensor_scale_from_amax(self, block_amax: Tensor) -> Tensor:
        """s_t = max|x| / (max_scale * max_elem) (0-dim, block_amax's dtype); 1 where max|x| is zero or
        not finite (torchao would divide by zero there). In float32, s_t is at least 2^-126 / s_min
        (s_min the scale grid's smallest normal, 2^-6 for E4M3: s_t >= 2^-120), so that every block's
        s_t * s_b is a normal float32 and its reciprocal finite: below it (max|x| under 2^-108.6 for
        NVFP4) torchao's reciprocal (1 / s_t) / s_b overflows to inf for the smallest blocks, whose
        zeros become NaN, and a CPU that flushes denormals reads a subnormal s_t as 0. Clamped, such
        a tensor is quantized as one whose max|x| is that bound."""
        grid = self.scale_grid
        assert grid is not None
        amax = block_amax.amax()
        dtype = amax.dtype
        divisor = grid.max * self.element.max
        divisor = round_to_float32(divisor) if dtype == torch.float32 else divisor
        scale = amax / constant(divisor, dtype, amax.device)
        if dtype == torch.float32:
            scale = scale.clamp_min(FLOAT32_MIN_NORMAL * 2.0**-grid.min_normal_exponent)
        usable = (amax > 0) & (amax < math.inf)
        return torch.where(usable, scale, constant(1.0, dtype, amax.device))

    def tensor_scale_of(self, x: Tensor) -> Tensor | None:
        """The fp32 per-tensor scale s_t of x (0-dim, x's float dtype); None without a tensor scale."""
        if not self.tensor_scale:
            return None
        return self._tensor_scale_from_amax(x.abs().amax().reshape(1) if x.dtype in FLOAT_DTYPES
                                            else x.float().abs().amax().reshape(1))

    def block_scales(self, amax: Tensor, tensor_scale: Tensor | None = None) -> Tensor:
        """The block scales of blocks with these max|v| (scale-grid formats): (max|v| / max_elem)
        [/ s_t], clamped to [smallest normal, max] of the scale grid and rounded to nearest onto it;
        NaN for blocks holding inf or NaN."""
        grid = self.scale_grid
        assert grid is not None
        dtype, device = amax.dtype, amax.device
        element_max = self.element.max
        element_max = round_to_float32(element_max) if dtype == torch.float32 else element_max
        ratio = amax / constant(element_max, dtype, device)
        if tensor_scale is not None:
            ratio = ratio / tensor_scale
        low = 2.0**grid.min_normal_exponent
        ratio = ratio.clamp(low, grid.max)
        scale = grid.round_unscaled(ratio, "nearest", None)
        # max|v| >= 0 is finite where it is below inf (NaN compares false): one pass, not isfinite's three
        return torch.where(amax < math.inf, scale, constant(math.nan, dtype, device))

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

    def divisor_from_amax(self, amax: Tensor) -> Tensor:
        """As NumberFormat's: 1 for blocks of zeros, whose E8M0 scale 2^-127 is a float32 subnormal."""
        scale = self.scale_from_amax(amax)
        if amax.dtype != torch.float32:
            return scale
        return torch.where(amax == 0, constant(1.0, torch.float32, amax.device), scale)

    def float32_scale_values(self, amax: Tensor) -> Tensor:
        """The E8M0 divisors of float32 max|v| as float64 values (2^-127 included)."""
        amax = amax.double()  # a flushed max|v| reads as 0 here, as it does in float32
        exponent, finite = self.scale_exponents(amax)
        scale = torch.where(amax == 0, 1.0, power_of_two(exponent))
        return torch.where(finite, scale, math.nan)

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
        """The bit stream of x: (scale codes, element codes), int64, in blocked layout.

        The blocked axis is moved last and zero-padded to a multiple of block_size: scale codes have
        shape (..., n_blocks) and element codes (..., n_blocks, block_size). A block holding inf or
        NaN gets the scale's NaN code (0xFF for E8M0) and element codes 0. The blocks are those of
        block_size and axis, also for scale=none. Scale-grid codes are the grid's codes of the
        (positive) block scales; the tensor scale, if any, is `tensor_scale_of(x)`.
        """
        blocks, _, _ = to_blocks(x, self.axis, self.block_size)
        if self.scale_grid is not None:
            return self._encode_grid_blocks(blocks)
        exponent, finite = self.scale_exponents(blocks.abs().amax(dim=-1, keepdim=True))
        scale_codes = torch.where(finite, exponent + SCALE_EXPONENT_LIMIT, SCALE_NAN_CODE)
        scaled = torch.where(finite, blocks.double() / power_of_two(exponent), 0.0)
        return scale_codes.squeeze(-1), self.element.encode(scaled)

    def _encode_grid_blocks(self, blocks: Tensor) -> tuple[Tensor, Tensor]:
        grid = self.scale_grid
        assert grid is not None
        work = blocks if blocks.dtype in FLOAT_DTYPES else blocks.float()
        amax = work.abs().amax(dim=-1, keepdim=True)
        tensor_scale = self._tensor_scale_from_amax(amax) if self.tensor_scale else None
        block_scale = self.block_scales(amax, tensor_scale)
        reciprocal = torch.reciprocal(block_scale) if tensor_scale is None else (
            torch.reciprocal(tensor_scale) / block_scale)
        finite = torch.isfinite(block_scale)
        scaled = torch.where(finite, work * reciprocal, 0.0).double()
        return grid.encode(block_scale.double()).squeeze(-1), self.element.encode(scaled)

    def decode_blocks(self, scale_codes: Tensor, element_codes: Tensor,
                      tensor_scale: Tensor | float | None = None) -> Tensor:
        """Values (float64, blocked layout) of a bit stream from `encode_blocks`; `tensor_scale` is
        `tensor_scale_of(x)` for formats with one, and q * (s_t * s_b) is then taken in its dtype,
        as quantize does (float32 for float32 input)."""
        grid = self.scale_grid
        if grid is not None:
            scales = grid.decode(scale_codes.to(torch.int64)).unsqueeze(-1)
            elements = self.element.decode(element_codes)
            if tensor_scale is None:
                return elements * scales
            tensor_scale = torch.as_tensor(tensor_scale)
            dtype = tensor_scale.dtype
            return (elements.to(dtype) * (tensor_scale * scales.to(dtype))).double()
        scale_codes = scale_codes.to(torch.int64)
        scales = torch.where(scale_codes == SCALE_NAN_CODE, math.nan,
                             power_of_two(scale_codes.clamp(max=2 * SCALE_EXPONENT_LIMIT)
                                          - SCALE_EXPONENT_LIMIT))
        return self.element.decode(element_codes) * scales.unsqueeze(-1)


def _rows_abs_max(rows: Tensor, step: int) -> Tensor:
    """max|v| of each row (float32 or float64 rows, shape (n, width)) as (n, 1): the max of the bit
    patterns with the sign cleared, `step` rows at a time through one cache-sized integer scratch
    (one integer pass and a reduction per slice; NaN patterns sort above inf, so a row holding NaN
    has a NaN max, as amax gives)."""
    int_dtype = _INT_OF[rows.dtype]
    mask = constant((1 << (8 * rows.element_size() - 1)) - 1, int_dtype, rows.device)
    bits = rows.view(int_dtype)
    amax = torch.empty((rows.shape[0], 1), dtype=int_dtype, device=rows.device)
    scratch = torch.empty((min(step, rows.shape[0]), rows.shape[1]), dtype=int_dtype, device=rows.device)
    for start in range(0, rows.shape[0], step):
        part = bits[start:start + step]
        magnitude = torch.bitwise_and(part, mask, out=scratch[: part.shape[0]])
        torch.amax(magnitude, dim=1, keepdim=True, out=amax[start:start + step])
    return amax.view(rows.dtype)


def _saturating(element: NumberFormat) -> NumberFormat:
    """The element grid as a block element: unscaled, saturating at its max."""
    element = replace(element, scaling=Scaling())  # type: ignore[type-var]
    if isinstance(element, P3109Format):
        return replace(element, saturation="satfinite", overflow="saturate")  # (p3109's pair)
    if isinstance(element, FloatFormat) and element.overflow != "saturate":
        return replace(element, overflow="saturate")
    return element


def scale_name(scale: Value) -> str:
    """The canonical name of a block scale format: a SCALES name, or the spec of an fp grid."""
    text = SCALE_SYNONYMS.get(str(scale), str(scale))
    if text in SCALES:
        return text
    try:
        grid: NumberFormat | None = get(text)
    except ValueError:
        grid = None
    if grid is None:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, none, or an unscaled fp(...) grid, "
                         f"got {scale!r}")
    if not isinstance(grid, FloatFormat) or isinstance(grid, P3109Format) or grid.scaling != Scaling():
        raise ValueError(f"scale {scale} cannot hold the block maxima: a block scale is a power of two "
                         f"(e8m0) or an unscaled fp(...) grid with binades above and below 1, and "
                         f"{grid.spec} is not")
    for name, (spec, _) in SCALES.items():
        if spec is not None and name != "ue4m3" and get(spec) == grid:
            return name
    return grid.spec


def _block_scaling(kind: str, size_name: str, size: Value | None, axis: Value | None) -> Scaling:
    """Blocks of `size` (option `size_name`) along `axis`, or none; the defaults are OCP MX's."""
    return Scaling(kind=kind,  # type: ignore[arg-type]
                   axis=DEFAULT_SCALING.axis if axis is None else int_arg("axis", axis, -8, 7),
                   block_size=DEFAULT_SCALING.block_size if size is None
                   else int_arg(size_name, size, 1, MAX_BLOCK_SIZE))


def block(element: Value | None = None, size: Value | None = None, scale: Value = E8M0,
          tensor_scale: Value = "none", axis: Value | None = None) -> BlockFormat:
    """block(ELEMENT, size=32, scale=e8m0|e4m3|ue4m3|ue5m3|fp32|FP_SPEC|none, tensor_scale=none|fp32,
    axis=-1).

    ELEMENT is any unscaled format spec (fp, int/fixed, p3109, posit, lns); size in 1..4096.
    """
    if element is None:
        raise ValueError("block needs an element format: block(ELEMENT, size=N, scale=S)")
    inner = get(str(element))
    if isinstance(inner, BlockFormat):
        raise ValueError(f"a block element is an unscaled grid, got the block format {inner.spec}")
    kind = "none" if scale == "none" else "block"
    return BlockFormat(
        element=_saturating(inner),
        scaling=_block_scaling(kind, "size", size, axis),
        scale=E8M0 if kind == "none" else scale_name(scale),
        tensor_scale=choice_arg("tensor_scale", tensor_scale, TENSOR_SCALES) == "fp32" and kind == "block",
    )


def mx(element: Value | None = None, block: Value | None = None, axis: Value | None = None,
       scale: Value | None = None) -> BlockFormat:
    """mx(ELEMENT, block=32, axis=-1, scale=block|none): OCP MX, block(ELEMENT, size=block, scale=e8m0).

    ELEMENT in fp8_e4m3, fp8_e5m2, fp6_e3m2, fp6_e2m3, fp4_e2m1, int8; scale=none drops the shared
    scale (the bare element grid).
    """
    if element not in ELEMENTS:
        raise ValueError(f"mx element must be one of {', '.join(ELEMENTS)}, got {element!r}")
    kind = DEFAULT_SCALING.kind if scale is None else choice_arg("scale", scale, ("block", "none"))
    return BlockFormat(
        element=get(ELEMENTS[str(element)]),
        scaling=_block_scaling(kind, "block", block, axis))


_ALIASES: dict[str, str] = {
    "mxfp8_e4m3": "mx(fp8_e4m3)",
    "mxfp8_e5m2": "mx(fp8_e5m2)",
    "mxfp6_e3m2": "mx(fp6_e3m2)",
    "mxfp6_e2m3": "mx(fp6_e2m3)",
    "mxfp4": "mx(fp4_e2m1)",
    "mxint8": "mx(int8)",
    "nvfp4": "block(fp4_e2m1,size=16,scale=e4m3,tensor_scale=fp32)",
}

register_family("block", block)
register_family("mx", mx)
for _name, _expansion in _ALIASES.items():
    register_alias(_name, _expansion)
