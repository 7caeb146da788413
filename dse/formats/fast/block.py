"""Fast paths of block-scaled formats (BlockFormat): the fused E8M0 nearest rounding on float bit
patterns, and scale-grid (NVFP4-style) quantization in cache-sized slices of rows with the element's
fused kernel. Each equals the reference in block.py bit for bit: `NumberFormat.quantize`'s block
path (`round_by_scale`) for E8M0, `BlockFormat.quantize_by_scale_grid` for scale grids."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from dse.formats.base import ROUNDINGS, _with_axis, constant
from dse.formats.fast import FastPath, enabled, host_shortcuts, reference_only_active, register
from dse.formats.fast import floating as fast_floating
from dse.formats.fast.slices import Kernel, cpu_chunk_elements
from dse.formats.fixed import FixedPoint
from dse.formats.floating import FloatFormat

if TYPE_CHECKING:
    from dse.formats.block import BlockFormat

E8M0_NEAREST = register(FastPath(
    name="block-e8m0-nearest",
    reference="NumberFormat.quantize's block path: round_by_scale (blocks / 2^E rounded, times 2^E)",
    operation="quantize",
    formats=("mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "mxint8",
             "mx(fp4_e2m1,block=16)", "mxfp8_e5m2(axis=0)", "mx(int8,block=7)", "mxfp8_e4m3(axis=1)"),
    code_space="blocks",
))
SCALE_GRID_SLICES = register(FastPath(
    name="block-scale-grid-slices",
    reference="BlockFormat.quantize_by_scale_grid's whole-tensor formula",
    operation="quantize",
    formats=("nvfp4", "nvfp4(tensor_scale=none)", "block(fp4_e2m1,size=16,scale=ue5m3)",
             "block(fp6_e2m3,size=32,scale=e4m3,tensor_scale=fp32)", "block(int4,size=16,scale=fp16)",
             "block(posit8,size=32,scale=bf16)", "block(fp4_e2m1,size=16,scale=fp32)"),
    roundings=ROUNDINGS + ("stochastic(3)",),
    dtypes=(torch.float32, torch.float64),
    code_space="blocks",
))

_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64}  # bit patterns of FLOAT_DTYPES


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


def quantize_e8m0_nearest(fmt: BlockFormat, x: Tensor, rounding: str) -> Tensor | None:
    """fmt.quantize(x) for an E8M0 block format by the fused nearest path; None where it does not apply
    (other roundings, dtypes or elements, inside reference_only(), and off the CPU: its check of the
    block maxima reads them back to the host)."""
    if (rounding != "nearest" or reference_only_active() or not host_shortcuts(x.device)
            or _nearest_plan(fmt) is None
            or x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.numel() == 0
            or not enabled(E8M0_NEAREST)):
        return None
    work = x.float().reshape(1) if x.dim() == 0 else x.float()
    axis, size = fmt.axis % work.dim(), fmt.block_size
    length = work.shape[axis]
    if axis == work.dim() - 1 and length % size == 0:  # rows of whole blocks (Linear layers)
        blocks = work.contiguous().view(-1, 1, size, 1)
        out = torch.empty_like(blocks)
        _quantize_blocks_nearest(fmt, blocks, out)
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
            _quantize_blocks_nearest(fmt, grid.view(shape), out.view(shape))
        else:
            _quantize_blocks_nearest(fmt, grid[:, start:stop].view(shape), out[:, start:stop].view(shape))
    return out.view(x.shape).to(x.dtype)

def _quantize_blocks_nearest(fmt: BlockFormat, blocks: Tensor, out: Tensor) -> None:
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
    plan = _nearest_plan(fmt)
    assert plan is not None
    constants = _constants(fmt, blocks.device)
    magnitude = out.view(torch.int32)
    amax = torch.empty((*blocks.shape[:2], 1, blocks.shape[3]), dtype=torch.int32, device=blocks.device)
    rows = max(cpu_chunk_elements(blocks) // math.prod(blocks.shape[1:]), 1)
    scratch = torch.empty((min(rows, blocks.shape[0]), *blocks.shape[1:]), dtype=torch.int32,
                          device=blocks.device)
    if blocks.shape[0] <= rows:  # one slice: no slicing
        _round_rows_nearest(blocks, out, magnitude, amax, scratch, plan, constants)
    else:
        for start in range(0, blocks.shape[0], rows):
            chunk = slice(start, start + rows)
            _round_rows_nearest(blocks[chunk], out[chunk], magnitude[chunk], amax[chunk],
                                     scratch[: out[chunk].shape[0]], plan, constants)
    # Blocks whose constants leave float32's normal range: 0 < F < lowest_field or
    # highest_field < F < 255. The extremes of max|v| over the blocks rule them out at once, blocks
    # of zeros (a ReLU's) included.
    if _may_leave_normal_range(plan, amax):
        exponent_field = amax >> 23
        bad = ((exponent_field < plan.lowest_field) & (amax != 0)
               | (exponent_field > plan.highest_field) & (exponent_field < 255))
        if bool(bad.any()):
            amax_float = blocks.abs().amax(dim=2, keepdim=True)
            reference = fmt.round_by_scale(blocks, amax_float, "nearest", None)
            out.copy_(torch.where(bad, reference, out))

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

def _constants(fmt: BlockFormat, device: torch.device) -> _Constants:
    """The fused paths' integer constants as 0-dim int32 tensors on `device` (cheap operands)."""
    by_device = fmt.fast_cache.setdefault("block-constants", {})
    constants = by_device.get(device)
    if constants is None:
        plan = _nearest_plan(fmt)
        assert plan is not None

        constants = by_device[device] = _Constants(*(
            constant(value, torch.int32, device) for value in
            (0x7FFFFFFF, 0x7F800000, -(2**31), plan.limit_offset, plan.floor_offset, plan.magic_offset)))
    return constants

def _nearest_plan(fmt: BlockFormat) -> _NearestPlan | None:
    """The integer constants of `_quantize_blocks_nearest` for this element; None: no fast path."""
    memo = fmt.fast_cache.setdefault("block-plan", {})
    if "plan" not in memo:
        memo["plan"] = _make_nearest_plan(fmt)
    return memo["plan"]


def _make_nearest_plan(fmt: BlockFormat) -> _NearestPlan | None:
    element, emax = fmt.element, fmt.element_emax
    if fmt.scale != "e8m0" or fmt.tensor_scale:
        return None
    max_bits = int(torch.tensor(element.max, dtype=torch.float32).view(torch.int32))
    if max_bits & 0x7FFFFF == 0 or float(torch.tensor(element.max, dtype=torch.float32)) != element.max:
        return None  # max * 2^E would not be NaN for F = 255
    limit_offset = max_bits - ((127 + emax) << 23)
    if (type(element) is FloatFormat and element.subnormals and element.overflow == "saturate"
            and fmt.element_has_negative_zero and emax >= 1):
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


def round_scale_grid_blocks(fmt: BlockFormat, blocks: Tensor, rounding: str,
                            generator: torch.Generator | None, members: int = 1) -> Tensor | None:
    """The body of `BlockFormat.quantize_by_scale_grid` on its blocks (float32 or float64, (..., n, size);
    `members` along the leading axis, each with its own tensor scale), in slices; None inside
    reference_only().

    Two sweeps over rows of blocks, a cache-sized slice at a time, into preallocated space: the
    block maxima (`_rows_abs_max`), then, after the scales, v * r, the element rounding and the
    product with s per slice. Nearest rounding of an element with a fused kernel (the magic
    constant of `FloatFormat`) runs that kernel itself, which is what its `round_unscaled` runs.
    """
    if reference_only_active() or not enabled(SCALE_GRID_SLICES):
        return None
    rows = blocks.reshape(-1, fmt.block_size)  # a copy only where the blocks are not contiguous
    amax = _rows_abs_max(rows, max(cpu_chunk_elements(rows) // fmt.block_size, 1))
    # The rounding sweep keeps four slices in cache: the input's, y, the integer scratch, the output's.
    step = max(cpu_chunk_elements(rows, buffers=4) // fmt.block_size, 1)
    reciprocal, scale = fmt.scale_factors(amax, members)
    kernel = None if rounding != "nearest" else _element_kernel(fmt, rows.dtype, rows.device)
    if kernel is not None:
        kernel = _skip_overflow_if_in_range(fmt, kernel, amax, reciprocal)
    out = torch.empty_like(rows)
    scaled = torch.empty_like(rows[:step])
    scratch = None if kernel is None else torch.empty_like(scaled, dtype=_INT_OF[rows.dtype])
    for start in range(0, rows.shape[0], step):
        part = slice(start, start + step)
        result = out[part]
        y = torch.mul(rows[part], reciprocal[part], out=scaled[: result.shape[0]])
        if kernel is None:
            torch.mul(fmt.round_unscaled(y, rounding, generator), scale[part], out=result)
            continue
        assert scratch is not None
        kernel(y, result, scratch[: result.shape[0]])
        if not fmt.element_has_negative_zero:
            result.add_(0.0)
        result.mul_(scale[part])
    return out.view(blocks.shape)


def _element_kernel(fmt: BlockFormat, dtype: torch.dtype, device: torch.device) -> Kernel | None:
    """The element's fused nearest rounding of `dtype` (kernel(x, out, int scratch)), where its
    round_unscaled runs exactly that; None for other elements."""
    element = fmt.element
    if not isinstance(element, FloatFormat):
        return None
    return element.nearest_kernel(dtype, device)


def _skip_overflow_if_in_range(fmt: BlockFormat, kernel: Kernel, amax: Tensor, reciprocal: Tensor) -> Kernel:
    """The element kernel without its overflow pass (the saturation clamp) where no v * r can round
    past the element's max: |v * r| is largest at the block's max|v| (rounding is monotonic), so
    one product over the block maxima and a read-back decide it (NaN, from inf or NaN blocks,
    keeps the pass); off the CPU the pass stays, as a read-back would stall the device."""
    unbounded = fast_floating.without_overflow(kernel)
    element = fmt.element
    if unbounded is None or not isinstance(element, FloatFormat) or not host_shortcuts(amax.device):
        return kernel
    largest = float(torch.mul(amax, reciprocal).max())
    return unbounded if largest < fast_floating.overflow_bound(element) else kernel


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


def quantize_e8m0_nearest_along(fmt: BlockFormat, x: Tensor, axes: tuple[int, ...]) -> list[Tensor] | None:
    """[fmt with its blocks along a].quantize(x) for each a in `axes`, nearest, in one call: the
    same values bit for bit as `quantize_e8m0_nearest` along each axis (the fused rounding of
    `_quantize_blocks_nearest`); None where that path does not apply or x is larger than a
    cache-sized slice (each axis then quantizes on its own, in slices), and off the CPU (its check
    of the block maxima reads them back to the host, which stalls a GPU).

    On a training step's tensors an operation costs about its dispatch, whatever its size, so
    what counts is their number. What the quantizations of one tensor share is done once: the bit
    patterns with the sign cleared (|v|, whose block maxima give each axis's scales) and their
    exponent fields (the grid step's binade before each block's floor), the allocations, and the
    check for blocks whose constants leave float32's normal range (one read-back for all axes,
    which also tells blocks of zeros, common after a ReLU, from those that need the reference).
    A shorter last block along the leading axis (a batch of 100 in blocks of 32) is rounded with
    the others, not on its own: the shared buffers run on past the tensor in zeros, which change
    no block's maximum (the reference pads its blocks with zeros). Per axis there remain the block
    maxima and five passes: the floored binade, the magic rounding (two), the saturation, the sign.
    """
    if (reference_only_active() or not host_shortcuts(x.device)
            or x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.dim() == 0
            or x.numel() == 0 or x.numel() > cpu_chunk_elements(x, buffers=4)):
        return None
    plan = _nearest_plan(fmt)
    if plan is None or not enabled(E8M0_NEAREST):
        return None
    constants = _constants(fmt, x.device)
    work = x.float().contiguous()
    geometry = _geometry(tuple(work.shape), tuple(axis % work.dim() for axis in axes), fmt.block_size,
                         bool(plan.factor))
    count = work.numel()
    magnitude = torch.empty(geometry.length, dtype=torch.int32, device=x.device)
    if geometry.length > count:
        torch.bitwise_and(work.view(-1).view(torch.int32), constants.magnitude_mask, out=magnitude[:count])
        magnitude[count:].zero_()
    else:
        torch.bitwise_and(work.view(-1).view(torch.int32), constants.magnitude_mask, out=magnitude)
    block_max = torch.empty(geometry.blocks, dtype=torch.int32, device=x.device)
    outs: list[Tensor] = []
    if plan.factor:  # FP elements: the exponent fields of |v| shared, the floored binade per axis
        exponent = torch.bitwise_and(magnitude, constants.exponent_mask)
        binade = torch.empty_like(magnitude)
        magnitude_float, binade_float = magnitude.view(torch.float32), binade.view(torch.float32)
        for out_length, runs in geometry.axes:
            out = torch.empty(out_length, dtype=torch.float32, device=x.device)
            for run in runs:
                mag, amax = run.view(magnitude), run.amax_view(block_max)
                torch.amax(mag, dim=2, keepdim=True, out=amax)
                field = torch.bitwise_and(amax, constants.exponent_mask)  # F << 23
                limit = field.clamp_min(plan.limit_floor).add_(constants.limit_offset)
                torch.maximum(run.view(exponent), field.sub_(constants.floor_offset).clamp_min_(0),
                              out=run.view(binade))
                step, result = run.view(binade_float), run.view(out)  # step: 2^max(exponent(v), emin + E)
                torch.add(run.view(magnitude_float), step, alpha=plan.factor, out=result)
                result.sub_(step, alpha=plan.factor)
                torch.minimum(result, limit.view(torch.float32), out=result)
            value = (out if out_length == count else out[:count]).view(work.shape)
            outs.append(value.copysign_(work))  # v's sign (zero results are +0 until here)
    else:  # MXINT8: the signed values, as _round_rows_nearest rounds them (no padding)
        signed = work.view(-1)
        for out_length, runs in geometry.axes:
            out = torch.empty(out_length, dtype=torch.float32, device=x.device)
            for run in runs:
                amax = run.amax_view(block_max)
                torch.amax(run.view(magnitude), dim=2, keepdim=True, out=amax)
                field = torch.bitwise_and(amax, constants.exponent_mask)
                limit = field.clamp_min(plan.limit_floor).add_(constants.limit_offset)
                magic = field.clamp_max_(plan.highest_field << 23).add_(constants.magic_offset)
                magic, result = magic.view(torch.float32), run.view(out)
                torch.add(run.view(signed), magic, out=result).sub_(magic)
                torch.minimum(result, limit.view(torch.float32), out=result)
                torch.maximum(result, limit.bitwise_or_(constants.sign_bit).view(torch.float32), out=result)
            outs.append(out.view(work.shape))
    if _may_leave_normal_range(plan, block_max):
        exponent_field = block_max >> 23
        bad = ((exponent_field < plan.lowest_field) & (block_max != 0)
               | (exponent_field > plan.highest_field) & (exponent_field < 255))
        if bool(bad.any()):  # rare (max|v| below 2^-97 or above 2^105): each axis by its own path
            outs = [_quantize_one_axis(fmt, work, axis) for axis in axes]
    return [out if out.dtype == x.dtype else out.to(x.dtype) for out in outs]


@dataclass(frozen=True)
class _Run:
    """A run of equal blocks along one axis of a flat buffer: its (outer, blocks, width, inner) view
    (the blocks along dim 2), by size, strides and offset, and where its block maxima lie."""

    size: tuple[int, int, int, int]
    stride: tuple[int, int, int, int]
    offset: int
    amax_offset: int

    def view(self, flat: Tensor) -> Tensor:
        # as_strided's offset counts from the storage's start, not the view's: a flat view of a tensor
        # that starts inside its storage (a member's x[g], a chunk) would read the elements before it
        return flat.as_strided(self.size, self.stride, flat.storage_offset() + self.offset)

    def amax_view(self, block_max: Tensor) -> Tensor:
        outer, blocks, _, inner = self.size
        return block_max.as_strided((outer, blocks, 1, inner), (blocks * inner, inner, inner, 1),
                                    self.amax_offset)


@dataclass(frozen=True)
class _Geometry:
    """The blocks of a tensor along several axes: per axis its output's length and its runs; the
    length of the shared buffers (padding included) and the number of blocks of all axes."""

    axes: tuple[tuple[int, tuple[_Run, ...]], ...]
    length: int
    blocks: int


@functools.lru_cache(maxsize=512)
def _geometry(shape: tuple[int, ...], axes: tuple[int, ...], size: int, pad: bool) -> _Geometry:
    """Where the blocks along each axis of a contiguous tensor of `shape` lie: around the axis an
    (outer, length, inner) grid, in it a run of whole blocks and a shorter last block. With `pad`, a
    leading axis (outer 1) runs on in zeros to whole blocks: one run, a longer buffer."""
    count, used = math.prod(shape), 0
    per_axis = []
    for axis in axes:
        outer, length, inner = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])
        full = length - length % size
        if pad and outer == 1 and full < length:
            length = full = full + size
        runs = []
        for start, stop, width in ((0, full, size), (full, length, length - full)):
            if stop > start:
                blocks = (stop - start) // width
                runs.append(_Run((outer, blocks, width, inner), (length * inner, width * inner, inner, 1),
                                 start * inner, used))
                used += outer * blocks * inner
        per_axis.append((outer * length * inner, tuple(runs)))
    return _Geometry(tuple(per_axis), max(count, *(length for length, _ in per_axis)), used)


def _may_leave_normal_range(plan: _NearestPlan, block_max: Tensor) -> bool:
    """Whether some block's max|v| bits (int32) may have 0 < F < lowest_field or highest_field < F < 255:
    one read-back of the extremes; where the smallest is a block of zeros (which the fused rounding
    handles), a second over max|v| - 1 with zeros wrapped to the top."""
    low, high = (int(value) for value in torch.aminmax(block_max))
    if high >= (plan.highest_field + 1) << 23:
        return True
    if low >= plan.lowest_field << 23:
        return False
    if low > 0:
        return True
    nonzero_low = int(torch.bitwise_and(block_max - 1, 0x7FFFFFFF).amin())
    return nonzero_low < (plan.lowest_field << 23) - 1


def _quantize_one_axis(fmt: BlockFormat, x: Tensor, axis: int) -> Tensor:
    """x quantized along `axis` by the single-axis fused path (which redoes out-of-range blocks)."""
    along = _with_axis(fmt, axis)
    out = quantize_e8m0_nearest(along, x, "nearest")  # type: ignore[arg-type]  # a BlockFormat's own axis
    assert out is not None
    return out
