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
from integer operations on the bit patterns (`dse.formats.fast.block`), equal bit for
bit to the scale-divide-round-multiply formula that every other case runs.

`encode`/`decode`/`values`/`max` describe the element grid at unit scale, like every format;
`encode_blocks`/`decode_blocks` give the real bit stream: one scale code per block plus the
element codes (and `tensor_scale_of(x)`, the fp32 tensor scale, where there is one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import ClassVar, cast

import torch
from torch import Tensor

from dse.formats.base import (
    FLOAT32_MIN_NORMAL,
    FLOAT_DTYPES,
    ROUNDINGS,
    MemberGenerators,
    NumberFormat,
    Scaling,
    _with_axis,
    check_rounding,
    constant,
    float_exponent,
    from_blocks,
    parse_rounding,
    power_of_two,
    round_to_float32,
    to_blocks,
)
from dse.formats.fast.slices import whole_tensors
from dse.formats.floating import FloatFormat
from dse.formats.p3109 import P3109Format
from dse.formats.spec import Value, choice_arg, get, int_arg, register_alias, register_family

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
            return None if spec is None else get(spec)  # type: ignore[return-value]  # SCALES are fp grids
        return get(self.scale)  # type: ignore[return-value]  # scale_name admits only fp grids

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

    def spec_options(self) -> dict[str, str]:
        scaled = self.scaling.kind == "block"
        return {"element": self.element.spec, "size": str(self.block_size),
                "scale": self.scale if scaled else "none",
                "tensor_scale": "fp32" if self.tensor_scale else "none", "axis": str(self.axis)}

    @property
    def max(self) -> float:
        return self.element.max

    @property
    def min_positive(self) -> float:
        return self.element.min_positive

    def quantize(self, x: Tensor, rounding: str = "nearest",
                 generator: torch.Generator | None = None) -> Tensor:
        """As NumberFormat.quantize, with a scale grid by `quantize_by_scale_grid`; fast.block's fused
        paths give the same values bit for bit."""
        if self.scaling.kind == "block" and self.scale_grid is not None:
            return self.quantize_by_scale_grid(x, rounding, generator)
        if self.scaling.kind == "block":
            fast = fast_block.quantize_e8m0_nearest(self, x, rounding)
            if fast is not None:
                return fast
        return super().quantize(x, rounding, generator)

    def quantize_along(self, x: Tensor, axes: Sequence[int], rounding: str = "nearest",
                       generator: torch.Generator | None = None) -> list[Tensor]:
        """As NumberFormat.quantize_along; nearest rounding with an E8M0 scale computes what the
        quantizations share once (`fast.block.quantize_e8m0_nearest_along`)."""
        if self.scaling.kind == "block" and self.scale_grid is None and rounding == "nearest":
            fast = fast_block.quantize_e8m0_nearest_along(self, x, tuple(axes))
            if fast is not None:
                return fast
        return super().quantize_along(x, axes, rounding, generator)

    def quantize_members(self, x: Tensor, rounding: str = "nearest",
                         generator: torch.Generator | MemberGenerators | None = None) -> Tensor:
        """As NumberFormat.quantize_members; with a tensor scale (NVFP4's s_t, from the max of the
        whole tensor) each member's own s_t, all members in one pass (`_members_by_scale_grid`)."""
        if not self.tensor_scale or x.dim() == 0:
            return super().quantize_members(x, rounding, generator)
        return self._members_by_scale_grid(x, (self.axis,), rounding, generator)[0]

    def quantize_members_along(self, x: Tensor, axes: Sequence[int], rounding: str = "nearest",
                               generator: torch.Generator | MemberGenerators | None = None) -> list[Tensor]:
        """As NumberFormat.quantize_members_along; with a tensor scale each member's own s_t (above),
        its draws along each axis in turn from its own generator, as alone."""
        if not self.tensor_scale or x.dim() == 0:
            return super().quantize_members_along(x, axes, rounding, generator)
        return self._members_by_scale_grid(x, axes, rounding, generator)

    def _members_by_scale_grid(self, x: Tensor, axes: Sequence[int], rounding: str,
                               generator: torch.Generator | MemberGenerators | None) -> list[Tensor]:
        """Each member x[g] quantized as alone along each of `axes` (counted within a member) in turn,
        the whole stack at once: blocks lie within a member, and the tensor scale is each member's
        own, from the max of its own blocks' maxima by the same arithmetic (`scale_factors` with
        `members`). The block maxima, scales and rounding are then one pass over the stack, not G
        (each member's slice, scale and concatenation). Stochastic draws come from each member's
        generator (`MemberGenerators`) in the order of its own elements, as alone; scalar members
        are blocks of one, as alone."""
        if rounding not in ROUNDINGS:
            check_rounding(rounding)
        draws = isinstance(generator, MemberGenerators) and parse_rounding(rounding)[0] == "stochastic"
        source = cast("torch.Generator | None", generator)  # MemberGenerators stands in for a generator
        stacked = x.reshape(-1, 1) if x.dim() == 1 else x
        outs = []
        with whole_tensors(draws):  # slices would cut across members' draws
            for axis in axes:
                along = _with_axis(self, -1 if x.dim() == 1 else axis + 1 if axis >= 0 else axis)
                assert isinstance(along, BlockFormat)
                out = along.quantize_by_scale_grid(stacked, rounding, source, members=x.shape[0])
                outs.append(out.reshape(x.shape))
        return outs

    def quantize_by_scale_grid(self, x: Tensor, rounding: str, generator: torch.Generator | None,
                               members: int = 1) -> Tensor:
        """quantize with a floating-point block scale (NVIDIA's rule, see the module docstring): the
        block maxima, the tensor scale, the block scales, then v * r rounded onto the element grid,
        times s. `members`: x stacks that many members along its leading axis (not the blocked one),
        each with its own tensor scale."""
        if not torch.is_floating_point(x):
            raise TypeError(f"quantize expects a floating-point tensor, got {x.dtype}")
        work = x if x.dtype in FLOAT_DTYPES else x.float()
        if work.numel() == 0:
            return x.clone()
        flat = work.reshape(1) if work.dim() == 0 else work
        if members > 1 and self.axis % flat.dim() == 0:
            raise ValueError("a stack of members is blocked within each member, not along its leading axis")
        blocks, shape, pad = to_blocks(flat, self.axis, self.block_size)
        out = fast_block.round_scale_grid_blocks(self, blocks, rounding, generator, members)
        if out is None:
            reciprocal, scale = self.scale_factors(blocks.abs().amax(dim=-1, keepdim=True), members)
            out = self.round_unscaled_(blocks * reciprocal, rounding, generator).mul_(scale)
        out = from_blocks(out, shape, self.axis, pad).reshape(work.shape)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def scale_factors(self, amax: Tensor, members: int = 1) -> tuple[Tensor, Tensor]:
        """(r, s) of blocks with these max|v| (scale-grid formats): elements are v * r rounded, values
        q * s; r = 1 / s_b and s = s_b, or with a tensor scale r = (1 / s_t) / s_b, s = s_t * s_b,
        s_t from the max of the blocks' maxima of each of `members` (amax's leading axis, or its
        first rows: the member axis leads every blocked layout)."""
        if not self.tensor_scale:
            block_scale = self.block_scales(amax)
            return torch.reciprocal(block_scale), block_scale
        by_member = amax.reshape(members, -1)
        tensor_scale = self._tensor_scale_from_amax(by_member)
        block_scale = self.block_scales(by_member, tensor_scale)
        return ((torch.reciprocal(tensor_scale) / block_scale).view(amax.shape),
                (tensor_scale * block_scale).view(amax.shape))

    def _tensor_scale_from_amax(self, block_amax: Tensor) -> Tensor:
        """s_t = max|x| / (max_scale * max_elem) of each row of block maxima ((members, n) -> (members,
        1), block_amax's dtype); 1 where max|x| is zero or not finite (torchao would divide by zero
        there). In float32, s_t is at least 2^-126 / s_min
        (s_min the scale grid's smallest normal, 2^-6 for E4M3: s_t >= 2^-120), so that every block's
        s_t * s_b is a normal float32 and its reciprocal finite: below it (max|x| under 2^-108.6 for
        NVFP4) torchao's reciprocal (1 / s_t) / s_b overflows to inf for the smallest blocks, whose
        zeros become NaN, and a CPU that flushes denormals reads a subnormal s_t as 0. Clamped, such
        a tensor is quantized as one whose max|x| is that bound."""
        grid = self.scale_grid
        assert grid is not None
        amax = block_amax.amax(dim=-1, keepdim=True)  # NaN where a row holds one, as amax() of it
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
        work = x if x.dtype in FLOAT_DTYPES else x.float()
        return self._tensor_scale_from_amax(work.abs().amax().reshape(1, 1)).reshape(())

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
        return self._signed_zeros(self.element.round_unscaled(x, rounding, generator))

    def round_unscaled_(self, x: Tensor, rounding: str, generator: torch.Generator | None) -> Tensor:
        return self._signed_zeros(self.element.round_unscaled_(x, rounding, generator))

    def _signed_zeros(self, rounded: Tensor) -> Tensor:
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

    def float32_holds_scales_on(self, device: torch.device) -> bool:
        """E8M0 scales are powers of two from 2^-127 to 2^127, each exact in float32 where subnormals
        are kept: on a GPU (torch's CUDA kernels keep them), not on a CPU, which may flush them."""
        return self.scale_grid is None and device.type != "cpu"

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
        tensor_scale = self._tensor_scale_from_amax(amax.reshape(1, -1)) if self.tensor_scale else None
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


def _saturating(element: NumberFormat) -> NumberFormat:
    """The element grid as a block element: unscaled, saturating at its max."""
    element = replace(element, scaling=Scaling())  # type: ignore[type-var]  # every family is a dataclass
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
    return Scaling(kind=kind,  # type: ignore[arg-type]  # "block" or "none", from the callers
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

from dse.formats.fast import block as fast_block  # noqa: E402  (it builds on this module)
