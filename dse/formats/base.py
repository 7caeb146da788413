"""The interface every number format implements, the shared rounding primitive and tensor scaling.

A format is a grid of values at unit scale (its *element grid*: what `encode`, `decode`, `values`,
`max` and `min_positive` describe) plus an optional scaling policy that `quantize` applies before
rounding onto that grid (per tensor, per channel, or per block of 32 for MX).

Every family rounds the same way: it maps a value to a real number whose integer points are the
codes it can represent (the value's significand at the grid's step, or a posit's bit pattern, or a
log code), and `round_to_integer` rounds that number with the requested mode. One primitive, four
rounding modes, for every family.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

import torch
from torch import Tensor
from torch.autograd import forward_ad

from dse.errors import InputError
from dse.formats.fast import host_shortcuts
from dse.formats.fast.slices import whole_tensors

Rounding = Literal["nearest", "stochastic", "pseudo_stochastic", "toward_zero"]
ROUNDINGS: tuple[str, ...] = ("nearest", "stochastic", "pseudo_stochastic", "toward_zero")
# stochastic(k): stochastic rounding with k random bits, as hardware does it (see round_to_integer).
MIN_STOCHASTIC_BITS, MAX_STOCHASTIC_BITS = 1, 23
ROUNDING_FORMS = "nearest, stochastic, stochastic(k) with k in 1..23, pseudo_stochastic, toward_zero"
_STOCHASTIC_K = re.compile(r"stochastic\((-?\d+)\)")

ScaleKind = Literal["none", "tensor", "channel", "block"]
SCALE_KINDS: tuple[str, ...] = ("none", "tensor", "channel", "block")

MAX_ENUMERABLE_BITS = 16

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)

# Stochastic rounding of float32 values draws this many random bits per element (one 32-bit draw
# of the generator): the chance of rounding up is exactly the discarded fraction whenever that
# fraction has at most this many bits.
STOCHASTIC_DRAW_BITS = 31


@functools.cache
def parse_rounding(rounding: str) -> tuple[str, int | None]:
    """(mode, k): mode one of ROUNDINGS, k the random bits of `stochastic(k)` (None otherwise).

    Raises InputError naming the rounding for anything else, k outside 1..23 included.
    """
    if rounding in ROUNDINGS:
        return rounding, None
    match = _STOCHASTIC_K.fullmatch(rounding) if isinstance(rounding, str) else None
    if match is None:
        raise InputError(f"unknown rounding {rounding!r}: expected one of {ROUNDING_FORMS}")
    bits = int(match.group(1))
    if not MIN_STOCHASTIC_BITS <= bits <= MAX_STOCHASTIC_BITS:
        raise InputError(f"rounding {rounding!r}: k (random bits) must be in "
                         f"{MIN_STOCHASTIC_BITS}..{MAX_STOCHASTIC_BITS}, got {bits}")
    return "stochastic", bits


def check_rounding(rounding: str) -> str:
    """`rounding` in canonical form (trimmed, lower case, no spaces) if it names a rounding mode
    (ROUNDINGS or stochastic(k)); InputError otherwise."""
    if rounding in ROUNDINGS:  # canonical already (the common case: every quantize checks, 1 us a parse)
        return rounding
    canonical = re.sub(r"\s+", "", rounding).lower() if isinstance(rounding, str) else rounding
    parse_rounding(canonical)
    return canonical


def stochastic_bits(rounding: str) -> int | None:
    """k of `stochastic(k)`; None for every other mode."""
    return parse_rounding(rounding)[1]


_FLOAT32 = struct.Struct("<f")


@functools.cache
def constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached 0-dim tensor holding `value` (exactly representable in dtype), to use as an operand.

    torch wraps a Python number operand into a fresh tensor on every call, which costs more than
    the operation itself on a small tensor; a cached tensor costs nothing. Never modify one.
    """
    return torch.tensor(value, dtype=dtype, device=device)


# float32's smallest normal: scales below it are float32 subnormals, which a CPU flushing denormals
# (torch.set_flush_denormal, as training runs) reads and writes as zero.
FLOAT32_MIN_NORMAL = 2.0**-126
# Scales from this power of two up are inf in float32: such a scale is used as its float64 value.
FLOAT32_SCALE_LIMIT = 2.0**128
_FLOAT32_SUBNORMAL_STEP_EXPONENT = -149


def round_to_float32(value: float) -> float:
    """A Python float rounded to the nearest float32 (ties to even, subnormals included), +-inf beyond
    float32's range; the same whether or not the CPU flushes denormals (the cast would flush them)."""
    if abs(value) < FLOAT32_MIN_NORMAL:  # onto the subnormal step, in float64 where it is a normal number
        step = _FLOAT32_SUBNORMAL_STEP_EXPONENT
        return math.copysign(math.ldexp(round(math.ldexp(value, -step)), step), value)
    try:
        return _FLOAT32.unpack(_FLOAT32.pack(value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def round_to_float32_significand(value: float) -> float:
    """A Python float rounded to float32's 24-bit significand (nearest, ties to even) with no bound
    on the exponent: float32 rounding wherever that gives a normal float32, and the same relative
    precision beyond float32's range, where float32 would give a subnormal, zero or inf."""
    mantissa, exponent = math.frexp(value)
    return math.ldexp(_FLOAT32.unpack(_FLOAT32.pack(mantissa))[0], exponent)


def float32_values(t: Tensor) -> Tensor:
    """float64 values rounded to float32 (nearest, ties to even, subnormals included, +-inf beyond
    float32's range) and kept in float64: float32 arithmetic's results with gradual underflow, also
    where the CPU flushes float32 denormals (float64 holds float32's subnormals as normal numbers)."""
    step = _FLOAT32_SUBNORMAL_STEP_EXPONENT
    subnormal = torch.round(t * 2.0**-step) * 2.0**step
    return torch.where(t.abs() < FLOAT32_MIN_NORMAL, subnormal, t.float().double())


def power_of_two(exponent: Tensor | int) -> Tensor:
    """2^exponent as float64 for integer exponents in [-1074, 2046], exactly on every device.

    Built from the exponent bits (two factors, so subnormal results are reached too): CUDA's
    exp2, pow and ldexp are not exact for every integer argument, and rounding must not depend
    on the device.
    """
    exponent = torch.as_tensor(exponent).to(torch.int64)
    half = exponent.div(2, rounding_mode="floor")
    first = ((half + 1023) << 52).view(torch.float64)
    second = ((exponent - half + 1023) << 52).view(torch.float64)
    return first * second


def normal_power_of_two(exponent: Tensor) -> Tensor:
    """2^exponent as float64 for integer exponents in [-1022, 1023] (float64's normals): the exponent
    shifted into float64's exponent field, exact on every device, in two operations where
    `power_of_two` (whose range reaches float64's subnormals and 2^2046) takes eight."""
    return ((exponent.to(torch.int64) + 1023) << 52).view(torch.float64)


class MemberGenerators:
    """One random generator per member of a stacked tensor (members along the leading axis).

    A draw of n values takes n / G of them from each member's generator in member order, so member g
    gets the values its own generator would give a tensor of its own: draws of a generator on the
    CPU concatenate (n1 then n2 values are n1 + n2 values), and the stacked tensor is drawn whole.
    Each member's values are drawn in place into its rows of one tensor (no copy, no concatenation).
    """

    def __init__(self, generators: Sequence[torch.Generator | None]) -> None:
        self.generators = list(generators)

    def __len__(self) -> int:
        return len(self.generators)

    @property
    def device(self) -> torch.device:
        """The members' generators' device (the CPU where they are None)."""
        first = self.generators[0] if self.generators else None
        return first.device if first is not None else torch.device("cpu")

    def draw(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str,
             fill_: Callable[[Tensor, torch.Generator | None], object]) -> Tensor:
        """A tensor of `shape` whose n / G values of each member, in member order, fill_(part,
        generator) draws in place from that member's generator."""
        count = math.prod(shape)
        if count % len(self.generators):
            raise ValueError(f"a draw of {count} values does not split over {len(self.generators)} members")
        out = torch.empty(tuple(shape), dtype=dtype, device=device)
        parts = out.view(len(self.generators), -1).unbind(0)
        for part, generator in zip(parts, self.generators, strict=True):
            fill_(part, generator)
        return out


@dataclass(frozen=True)
class BinaryLayout:
    """Bit layout of a torch float dtype, for building powers of two from exponent fields."""

    int_dtype: torch.dtype
    man_bits: int
    bias: int

    @property
    def exponent_mask(self) -> int:
        return (2 * self.bias + 1) << self.man_bits

    @property
    def min_normal_exponent(self) -> int:
        return 1 - self.bias

    @property
    def max_exponent(self) -> int:
        return self.bias

    def exponent_field(self, exponent: int) -> int:
        return (exponent + self.bias) << self.man_bits


FLOAT_LAYOUTS: dict[torch.dtype, BinaryLayout] = {
    torch.float32: BinaryLayout(torch.int32, 23, 127),
    torch.float64: BinaryLayout(torch.int64, 52, 1023),
}



def significand_digits(dtype: torch.dtype) -> int:
    """Significand bits (the implicit one included) of float32 or float64: p = 24, 53."""
    return {torch.float32: 24, torch.float64: 53}[dtype]


def shift_round(magnitude: Tensor, shift: Tensor | int, rounding: str,
                generator: torch.Generator | None = None) -> Tensor:
    """Right-shift non-negative integers by `shift` bits, rounding on the discarded bits.

    This is the integer form of rounding (NITI's shift of an int32 accumulator to int8): the
    discarded field r = magnitude mod 2^shift decides whether the kept part moves up by one.
    Shifts above 62 discard everything; magnitudes must stay below 2^62.
    """
    mode, random_bit_count = parse_rounding(rounding)
    magnitude = magnitude.to(torch.int64)
    shift_t = torch.as_tensor(shift, dtype=torch.int64, device=magnitude.device).clamp(0, 62)
    kept = magnitude >> shift_t
    field = magnitude - (kept << shift_t)
    if mode == "toward_zero":
        return kept
    if mode == "nearest":
        half = (torch.ones_like(shift_t) << shift_t) >> 1
        up = (field > half) | ((field == half) & (half > 0) & ((kept & 1) == 1))
    elif random_bit_count is not None:  # the field rounded to k bits, plus k random bits, carries
        k = random_bit_count
        widened = field << (k - shift_t).clamp(min=0)
        rounded = torch.where(shift_t > k, shift_round(field, (shift_t - k).clamp(min=0), "nearest"), widened)
        draws = random_bits(magnitude.shape, magnitude.device, generator).to(torch.int64) >> (31 - k)
        up = rounded + draws >= 1 << k
    elif mode == "stochastic":
        draw = draw_values(magnitude.shape, torch.int64, magnitude.device, generator,
                     lambda out, source: out.random_(0, 2**62, generator=source))  # torch.randint's draws
        up = (draw & ((torch.ones_like(shift_t) << shift_t) - 1)) < field
    else:  # pseudo_stochastic: the top half of the field is the probability, the bottom half the draw
        low_bits = shift_t >> 1
        high = field >> low_bits
        low = (field - (high << low_bits)) << (shift_t & 1)
        up = high > low
    return kept + up.to(torch.int64)


def round_to_integer(t: Tensor, rounding: str, generator: torch.Generator | MemberGenerators | None = None,
                     in_place: bool = False) -> Tensor:
    """Round real numbers whose integers are the representable codes; same dtype, sign-magnitude.

    `t` must hold the exact scaled value (a power-of-two rescaling of the input, or a code computed
    exactly). Nearest is ties-to-even, stochastic rounds up with probability equal to the
    fractional part, stochastic(k) with k random bits (`stochastic_up_`), pseudo_stochastic
    applies NITI's rule to the significand bits below the point. `in_place`: t is a temporary the
    caller gives up (a quotient x / scale), which nearest and toward_zero round in place: the same
    values, with no second tensor of t's size (on the CPU a pass that writes a fresh tensor the size
    of L2 costs several times one that rewrites t where it lies in cache). On a t autograd records
    the gradient is straight-through (identity), as `NumberFormat.quantize`'s, and t is not rounded
    in place.
    """
    if torch.is_grad_enabled() and t.requires_grad or transformed(t):
        return cast(Tensor, _StraightThrough.apply(
            t, lambda v: _round_to_integer(v, rounding, generator, False)))
    return _round_to_integer(t, rounding, generator, in_place)


def _round_to_integer(t: Tensor, rounding: str, generator: torch.Generator | MemberGenerators | None,
                      in_place: bool) -> Tensor:
    mode, random_bit_count = parse_rounding(rounding)
    if mode == "nearest":
        return t.round_() if in_place else torch.round(t)
    if mode == "toward_zero":
        return t.trunc_() if in_place else torch.trunc(t)
    magnitude = t.abs()
    floor = magnitude.floor()
    if rounding == "stochastic" and t.dtype == torch.float32:
        return _round_stochastic_float32(t, floor, magnitude.sub_(floor), generator)
    fraction = magnitude - floor
    if mode == "stochastic":
        up = stochastic_up_(fraction if random_bit_count else fraction.double(), generator, random_bit_count)
    else:
        # The discarded field runs from the binary point down to the last significand bit of t.
        precision = significand_digits(t.dtype)
        _, exponent = torch.frexp(magnitude)
        field_bits = (precision - exponent.to(torch.int64)).clamp(0, 2 * precision + 1)
        field_bits = torch.where(magnitude > 0, field_bits, torch.zeros_like(field_bits))
        field = fraction.double() * power_of_two(field_bits)
        low_bits = field_bits >> 1
        high = torch.floor(field * power_of_two(-low_bits))
        low = (field - high * power_of_two(low_bits)) * torch.where(field_bits % 2 == 1, 2.0, 1.0)
        up = high > low
    return torch.copysign(floor + up.to(t.dtype), t)


def stochastic_up_(fraction: Tensor, generator: torch.Generator | MemberGenerators | None,
                   random_bit_count: int | None = None) -> Tensor:
    """The up-step of stochastic rounding (1.0 or 0.0) for fractions in [0, 1), written into `fraction`.

    random_bit_count None: up where a float64 uniform draw falls below the fraction (float64).
    k random bits (stochastic(k), fraction float32 or float64): the fraction is rounded to k bits,
    ties to even, d = round(f * 2^k), and the value rounds up when d + r >= 2^k for r the top k bits
    of one `random_bits` draw (uniform in [0, 2^k)): so with probability d / 2^k. This is gfloat's
    RoundMode.Stochastic with srnumbits = k and srbits = r, and a k-bit adder's carry in hardware.
    d + r < 2^24 is exact in float32 for k <= 23.
    """
    if random_bit_count is None:
        draws = draw_values(fraction.shape, torch.float64, fraction.device, generator,
                      lambda out, source: out.uniform_(generator=source))  # torch.rand's draws
        return torch.lt(draws, fraction, out=fraction)
    draws = random_bits(fraction.shape, fraction.device, generator)
    draws = draws.bitwise_right_shift_(31 - random_bit_count).to(fraction.dtype)
    rounded = fraction.mul_(constant(2.0**random_bit_count, fraction.dtype, fraction.device)).round_()
    return torch.ge(rounded.add_(draws), constant(2.0**random_bit_count, fraction.dtype, fraction.device),
                    out=fraction)


def draw_values(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str,
                generator: torch.Generator | MemberGenerators | None,
                fill_: Callable[[Tensor, torch.Generator | None], object]) -> Tensor:
    """A new tensor filled in place by fill_(tensor, generator), or per member where the generator is
    `MemberGenerators`."""
    if isinstance(generator, MemberGenerators):
        return generator.draw(shape, dtype, device, fill_)
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    fill_(out, generator)
    return out


def random_bits(shape: torch.Size | tuple[int, ...], device: torch.device,
                generator: torch.Generator | MemberGenerators | None) -> Tensor:
    """Uniform int32 draws in [0, 2^31): one 32-bit draw of the generator per element, on every device."""
    return draw_values(shape, torch.int32, device, generator,
                       lambda out, source: out.random_(generator=source))


def _round_stochastic_float32(t: Tensor, floor: Tensor, fraction: Tensor,
                              generator: torch.Generator | MemberGenerators | None) -> Tensor:
    """Stochastic rounding of float32 t: up when a 31-bit draw is below the fraction's top 31 bits.

    fraction * 2^31 is exact (a power-of-two scaling of an exact difference) and below 2^31, so
    its integer part F fits int32, and P(draw < F) = F / 2^31: exactly the fraction whenever it has
    at most 31 bits, which every float32 t with |t| >= 2^-8 satisfies; smaller fractions are
    truncated to 31 bits. One 32-bit draw per element costs half a float64 draw. `floor` and
    `fraction` (floor(|t|) and |t| - floor(|t|)) are overwritten.
    """
    scale = constant(2.0**STOCHASTIC_DRAW_BITS, torch.float32, t.device)
    field = fraction.mul_(scale).to(torch.int32)  # where t is NaN or inf, so is floor: field is moot
    draws = random_bits(t.shape, t.device, generator)
    up = torch.lt(draws, field, out=fraction)  # 0.0 or 1.0 (adding a bool tensor would cost a cast)
    return floor.add_(up).copysign_(t)


def float_exponent(x: Tensor) -> Tensor:
    """floor(log2|x|) as int64, exactly (frexp, not log2), for finite non-zero x; 0 elsewhere."""
    _, exponent = torch.frexp(x)
    return torch.where((x != 0) & torch.isfinite(x), exponent.to(torch.int64) - 1, 0)


def pow2_ceil_exponent(x: Tensor) -> Tensor:
    """ceil(log2 x) for positive finite x, exactly."""
    mantissa, exponent = torch.frexp(x)
    return exponent.to(torch.int64) - (mantissa == 0.5).to(torch.int64)


@dataclass(frozen=True)
class Scaling:
    """How `quantize` maps a tensor onto the element grid before rounding.

    tensor/channel scales map max|x| onto the grid's max (or, with pow2, to the smallest power of
    two that keeps max|x| within it, as NITI's shared exponent does); block scales follow OCP MX.
    """

    kind: ScaleKind = "none"
    pow2: bool = False
    axis: int = 0
    block_size: int = 32

    def options(self, default: Scaling) -> list[str]:
        """The call-form options that differ from a family's default, for canonical specs."""
        out = []
        if self.kind != default.kind:
            out.append(f"scale={self.kind}")
        if self.pow2 != default.pow2:
            out.append(f"pow2={int(self.pow2)}")
        if self.axis != default.axis and self.kind in ("channel", "block"):
            out.append(f"axis={self.axis}")
        if self.block_size != default.block_size and self.kind == "block":
            out.append(f"block={self.block_size}")
        return out

    def spec_options(self) -> dict[str, str]:
        """scale=, pow2= and, where the kind uses them, axis= and block=, as a spec writes them."""
        out = {"scale": self.kind, "pow2": str(int(self.pow2))}
        if self.kind in ("channel", "block"):
            out["axis"] = str(self.axis)
        if self.kind == "block":
            out["block"] = str(self.block_size)
        return out


def to_blocks(x: Tensor, axis: int, block_size: int) -> tuple[Tensor, tuple[int, ...], int]:
    """Move `axis` last, zero-pad it to a multiple of block_size and split it into blocks."""
    moved = x.movedim(axis, -1)
    length = moved.shape[-1]
    pad = (-length) % block_size
    if pad:
        moved = torch.nn.functional.pad(moved, (0, pad))
    return moved.reshape(*moved.shape[:-1], -1, block_size), tuple(x.shape), pad


def from_blocks(blocks: Tensor, shape: tuple[int, ...], axis: int, pad: int) -> Tensor:
    """Inverse of `to_blocks`."""
    flat = blocks.reshape(*blocks.shape[:-2], -1)
    if pad:
        flat = flat[..., : flat.shape[-1] - pad]
    moved_shape = list(shape)
    moved_shape.append(moved_shape.pop(axis if axis >= 0 else len(shape) + axis))
    return flat.reshape(moved_shape).movedim(-1, axis)


# Below this many elements max|x| is |x|.amax() (two small operations); above, aminmax (one pass,
# no |x| copy).
SMALL_ABS_MAX_ELEMENTS = 1 << 16


def abs_max(x: Tensor, axis: int | None) -> Tensor:
    """max|x| over the whole tensor (axis None) or per slice along `axis`, kept broadcastable.

    aminmax reads x once and allocates no |x| copy: the scale costs one pass, not two.
    """
    if axis is None and x.numel() <= SMALL_ABS_MAX_ELEMENTS:
        return x.abs().amax()
    if axis is None or x.dim() == 0:
        low, high = torch.aminmax(x)
        return torch.maximum(-low, high)
    axis = axis % x.dim()
    low, high = torch.aminmax(x.movedim(axis, 0).reshape(x.shape[axis], -1), dim=1)
    shape = [1] * x.dim()
    shape[axis] = x.shape[axis]
    return torch.maximum(-low, high).reshape(shape)


def host_abs_max(x: Tensor) -> float:
    """max|x| over the whole tensor as a Python float (NaN if x holds one, 0 if it is empty): one
    aminmax pass and two scalar reads, cheaper than |x|.amax() or a device-side maximum."""
    if x.numel() == 0:
        return 0.0
    low, high = torch.aminmax(x.detach())
    return max(-float(low), float(high))  # both are NaN where x holds a NaN


@functools.lru_cache(maxsize=256)
def _with_axis(fmt: NumberFormat, axis: int) -> NumberFormat:
    """fmt with its scaling along `axis`: one object per (format, axis), so that what a format caches
    on itself (grids, constants) is built once, not on every call."""
    scaling = dataclasses.replace(fmt.scaling, axis=axis)
    # (families are dataclasses)
    return cast(NumberFormat, dataclasses.replace(cast(Any, fmt), scaling=scaling))


def transformed(x: Tensor) -> bool:
    """Whether autograd records x other than by grad mode and requires_grad: a torch.func transform
    is active (vmap, grad, jvp: a batched x's requires_grad says nothing of the grad transform
    around it), or forward-mode autograd (torch.autograd.forward_ad) gives x a tangent (asked only
    while a forward-mode level is open: unpacking costs about a microsecond, the level's check and
    the transforms' a few tens of nanoseconds)."""
    return torch._C._are_functorch_transforms_active() or (
        forward_ad._current_level >= 0 and forward_ad.unpack_dual(x).tangent is not None)


class _StraightThrough(torch.autograd.Function):
    """A quantizer's straight-through gradient: its rounded tensor (or tensors) of x in the forward,
    the gradient passed to x unchanged in the backward (summed over the outputs where there are
    several, as for `quantize_along`), and x's tangent passed to each output in forward mode.
    Under torch.func.vmap the forward runs batched (`generate_vmap_rule`), where its operations can."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, quantizer: Callable[[Tensor], Tensor | list[Tensor]]
                ) -> Tensor | tuple[Tensor, ...]:
        out = quantizer(x)  # (autograd records nothing in here)
        if forward_ad._current_level >= 0:  # forward mode takes no view of a temporary as an output
            out = [t.clone() if t._base is not None else t for t in out] if isinstance(out, list) else (
                out.clone() if out._base is not None else out)
        return tuple(out) if isinstance(out, list) else out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        """Only how many outputs there are (for `jvp`): the backward needs only the incoming gradients
        (a separate setup_context also lets torch.func.grad differentiate through quantize)."""
        ctx.outputs = len(output) if isinstance(output, tuple) else None

    @staticmethod
    def jvp(ctx: Any, x_tangent: Tensor, _: None) -> Tensor | tuple[Tensor, ...]:
        if ctx.outputs is None:
            return x_tangent
        return tuple(x_tangent.clone() for _ in range(ctx.outputs))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor, None]:
        total = grads[0]
        for grad in grads[1:]:
            total = total + grad
        return total, None


# The quantize-style entry points, whose gradient on an input autograd records is straight-through:
# those whose arguments after x are (rounding, generator), and those that take axes first.
STRAIGHT_THROUGH_METHODS: tuple[str, ...] = ("quantize", "quantize_members")
STRAIGHT_THROUGH_ALONG_METHODS: tuple[str, ...] = ("quantize_along", "quantize_members_along")


def straight_through(method: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """`method(self, x, rounding, generator)` with the straight-through gradient where autograd
    records x (`_StraightThrough`); elsewhere `method` itself. Grad mode is checked first: training's
    quantizers run where it is off (inside its autograd functions), so there the wrapper is one
    check and a call, no autograd function. The parameters are spelled out because a wrapper taking
    *args and **kwargs costs about three times as much per call, and one quantize crosses a few
    wrappers (its round_unscaled too): benchmarks/straight_through.py measures the total."""

    @functools.wraps(method)
    def quantizer(self: NumberFormat, x: Tensor, rounding: str = "nearest",
                  generator: torch.Generator | MemberGenerators | None = None) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad or transformed(x):
            return cast(Tensor, _StraightThrough.apply(x, lambda t: method(self, t, rounding, generator)))
        return method(self, x, rounding, generator)

    quantizer.__wrapped_straight_through__ = True  # type: ignore[attr-defined]
    return quantizer


def straight_through_along(method: Callable[..., list[Tensor]]) -> Callable[..., list[Tensor]]:
    """`straight_through` for `method(self, x, axes, rounding, generator)`, which returns a tensor per
    axis: x's gradient is the sum of theirs."""

    @functools.wraps(method)
    def quantizer(self: NumberFormat, x: Tensor, axes: Sequence[int], rounding: str = "nearest",
                  generator: torch.Generator | MemberGenerators | None = None) -> list[Tensor]:
        if torch.is_grad_enabled() and x.requires_grad or transformed(x):
            return list(_StraightThrough.apply(x, lambda t: method(self, t, axes, rounding, generator)))
        return method(self, x, axes, rounding, generator)

    quantizer.__wrapped_straight_through__ = True  # type: ignore[attr-defined]
    return quantizer


def round_unscaled_in_float32(method: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """`straight_through` for a family's `round_unscaled`, which rounds float32 and float64 tensors:
    x of a narrower float dtype (float16, bfloat16, float8) is rounded in float32 and the result
    cast back to x's dtype, as `quantize` computes it (so `round_unscaled` of such x is `quantize`'s
    result for a format without scaling, bit for bit, its stochastic draws included)."""

    @functools.wraps(method)
    def in_float32(self: NumberFormat, x: Tensor, rounding: str = "nearest",
                   generator: torch.Generator | MemberGenerators | None = None) -> Tensor:
        if x.dtype not in FLOAT_DTYPES and x.is_floating_point():
            return cast(Tensor, method(self, x.float(), rounding, generator)).to(x.dtype)
        return method(self, x, rounding, generator)

    return straight_through(in_float32)


def _round_copy_where_recorded(method: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """`round_unscaled_`, which may round x in place: where autograd records x, or x is narrower
    than float32, `round_unscaled` instead (the same values, straight-through, x left as it is; a
    narrower x is rounded as a float32 copy anyway)."""

    @functools.wraps(method)
    def round_(self: NumberFormat, x: Tensor, rounding: str = "nearest",
               generator: torch.Generator | None = None) -> Tensor:
        if (torch.is_grad_enabled() and x.requires_grad or transformed(x)
                or x.dtype not in FLOAT_DTYPES):
            return self.round_unscaled(x, rounding, generator)
        return method(self, x, rounding, generator)

    round_.__wrapped_straight_through__ = True  # type: ignore[attr-defined]
    return round_


def _straight_through_methods(cls: type) -> None:
    """Wrap the entry points `cls` itself defines, once (abstract ones are left to the families)."""
    wrappers: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
        **dict.fromkeys(STRAIGHT_THROUGH_METHODS, straight_through),
        **dict.fromkeys(STRAIGHT_THROUGH_ALONG_METHODS, straight_through_along),
        "round_unscaled": round_unscaled_in_float32, "round_unscaled_": _round_copy_where_recorded}
    for name, wrap in wrappers.items():
        method = vars(cls).get(name)
        if method is None or getattr(method, "__wrapped_straight_through__", False) or getattr(
                method, "__isabstractmethod__", False):
            continue
        setattr(cls, name, wrap(method))


class NumberFormat(ABC):
    """A number format: an element grid plus a scaling policy.

    Subclasses are frozen dataclasses with a `scaling` field and implement `round_unscaled`,
    `encode`, `decode`, `max`, `min_positive` and `spec`.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every family's quantize-style entry points get the straight-through gradient
        (`straight_through`), whichever of them it overrides."""
        super().__init_subclass__(**kwargs)
        _straight_through_methods(cls)

    family: ClassVar[str]
    scaling: Scaling
    if TYPE_CHECKING:  # a field of some families, computed by others
        @property
        def bits(self) -> int: ...

    # --- implemented by each family -------------------------------------------------------------
    @property
    @abstractmethod
    def spec(self) -> str:
        """Canonical spec string; `dse.formats.get(fmt.spec) == fmt`."""

    @abstractmethod
    def spec_options(self) -> dict[str, str]:
        """Every option of the family's call, defaults included, named and written as a spec writes
        them: `get(f"{fmt.family}(k=v,...)") == fmt` (what `dse formats show` lists)."""

    @abstractmethod
    def round_unscaled(self, x: Tensor, rounding: str, generator: torch.Generator | None) -> Tensor:
        """Round values onto the element grid, applying the family's overflow and special-value policy."""

    def round_unscaled_(self, x: Tensor, rounding: str, generator: torch.Generator | None) -> Tensor:
        """`round_unscaled` of a temporary the caller gives up (x / scale), which a family may round in
        place (the fixed-point family does); the same values."""
        return self.round_unscaled(x, rounding, generator)

    def round_unscaled_within_max_(self, x: Tensor, rounding: str, generator: torch.Generator | None
                                   ) -> Tensor:
        """`round_unscaled_` of quotients x / s known to lie within +-max (1 + u) / (1 - u), u = 2^-p
        for the p significand bits of x's dtype: s is the scale of a finite max|x|
        (`fast.scales.quotients_within_max`). A family whose rounding saturates may skip what cannot
        act there (FixedPoint's clamp); the same values."""
        return self.round_unscaled_(x, rounding, generator)

    @abstractmethod
    def encode(self, x: Tensor) -> Tensor:
        """Bit codes (int64, in [0, 2^bits)) of x rounded to nearest on the element grid."""

    @abstractmethod
    def decode(self, codes: Tensor) -> Tensor:
        """Values (float64) of bit codes."""

    def checked_codes(self, codes: Tensor) -> Tensor:
        """`codes` as int64, for `decode`: a ValueError naming the range where one is no code of the
        format (outside 0..2^bits - 1)."""
        codes = torch.as_tensor(codes, dtype=torch.int64)
        if bool(((codes < 0) | (codes >> self.bits != 0)).any()):
            raise ValueError(f"{self.spec} codes lie in 0..{2**self.bits - 1}")
        return codes

    @property
    @abstractmethod
    def max(self) -> float:
        """Largest finite value of the element grid."""

    @property
    @abstractmethod
    def min_positive(self) -> float:
        """Smallest positive value of the element grid (subnormals included)."""

    # --- shared --------------------------------------------------------------------------------
    @cached_property
    def fast_cache(self) -> dict[str, dict[Any, Any]]:  # (each fast path keys its own memo)
        """Per-format memo of the fast paths (dse.formats.fast): plans, kernels, constants, decided once."""
        return {}

    @property
    def dynamic_range_decades(self) -> float:
        return math.log10(self.max / self.min_positive)

    @property
    def float32_note(self) -> str | None:
        """How float32 tensors hold the grid, where not every value is a normal float32 (else None)."""
        return None

    @property
    def relative_precision(self) -> float:
        """Relative gap between the grid value nearest 1.0 and its upper neighbour (lower, at the top).

        Positive codes count up with magnitude in every family, so the neighbour is one code away.
        """
        one = self.round_unscaled(torch.tensor([1.0], dtype=torch.float64), "nearest", None)
        code = self.encode(one)
        above = self.decode(code + 1)
        if not (torch.isfinite(above).all() and (above > one).all()):
            above = one
            one = self.decode(code - 1)
        return float((above - one) / one)

    def values(self) -> Tensor:
        """All finite values of the element grid, sorted and unique (float64); formats up to 16 bits."""
        if self.bits > MAX_ENUMERABLE_BITS:
            raise ValueError(f"{self.spec} has {self.bits} bits: values() enumerates formats up to "
                             f"{MAX_ENUMERABLE_BITS} bits")
        decoded = self.decode(torch.arange(2**self.bits, dtype=torch.int64))
        return torch.unique(decoded[torch.isfinite(decoded)])

    def quantize(self, x: Tensor, rounding: str = "nearest",
                 generator: torch.Generator | None = None) -> Tensor:
        """Fake-quantize: scale, round onto the grid, scale back. Same shape and float dtype as x."""
        if rounding not in ROUNDINGS:
            check_rounding(rounding)
        if not torch.is_floating_point(x):
            raise TypeError(f"quantize expects a floating-point tensor, got {x.dtype}")
        work = x if x.dtype in FLOAT_DTYPES else x.float()
        if work.numel() == 0:
            return x.clone()
        kind = self.scaling.kind
        if kind == "none":
            out = self.round_unscaled(work, rounding, generator)
        elif kind == "tensor":
            out = self.quantize_per_tensor(work, rounding, generator)
        elif kind == "block":
            flat = work.reshape(1) if work.dim() == 0 else work  # a scalar is a block of one
            blocks, shape, pad = to_blocks(flat, self.scaling.axis, self.scaling.block_size)
            amax = blocks.abs().amax(dim=-1, keepdim=True)
            rounded = self.round_by_scale(blocks, amax, rounding, generator)
            out = from_blocks(rounded, shape, self.scaling.axis, pad).reshape(work.shape)
        else:
            out = self.round_by_scale(work, abs_max(work, self.scaling.axis), rounding, generator)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def quantize_members(self, x: Tensor, rounding: str = "nearest",
                         generator: torch.Generator | MemberGenerators | None = None) -> Tensor:
        """`quantize` of each x[g] as if it stood alone, in one call over the stacked tensor x.

        A per-tensor scale becomes one scale per member, a per-channel scale one per member and
        channel (axis counted within a member), and blocks lie within a member; the scale of each
        member is the value `quantize` computes for it alone (the same max and the same arithmetic),
        and rounding is elementwise, so every member comes out bit for bit as alone. Stochastic
        rounding draws each member's bits from its own generator with `MemberGenerators`.
        """
        if x.dim() == 0:
            raise ValueError("quantize_members expects a leading member axis")
        kind, axis = self.scaling.kind, self.scaling.axis
        member_axis = axis + 1 if axis >= 0 else axis
        draws = isinstance(generator, MemberGenerators) and parse_rounding(rounding)[0] == "stochastic"
        # MemberGenerators stands in for a generator: every draw goes through `draw_values`, which splits it.
        source = cast("torch.Generator | None", generator)
        with whole_tensors(draws):  # slices would cut across members' draws
            if kind in ("none", "block"):
                fmt = self if kind == "none" or x.dim() == 1 or member_axis == axis else _with_axis(
                    self, member_axis)
                if kind == "block" and x.dim() == 1:  # members are scalars: each is a block of one,
                    # along the last axis whatever the format's (along axis 0 blocks would span members)
                    return _with_axis(self, -1).quantize(x.reshape(-1, 1), rounding, source).reshape(x.shape)
                return fmt.quantize(x, rounding, source)
            if rounding not in ROUNDINGS:
                check_rounding(rounding)
            work = x if x.dtype in FLOAT_DTYPES else x.float()
            if work.numel() == 0:
                return x.clone()
            members = x.shape[0]
            if kind == "tensor" or x.dim() == 1:
                rows = work.reshape(members, -1)  # aminmax along a dim is slower than these two
                low, high = rows.amin(1), rows.amax(1)
                shape = [members] + [1] * (x.dim() - 1)
                fast = fast_scales.quantize_members_per_tensor(self, work, low, high, shape, rounding, source)
                if fast is not None:
                    return fast if fast.dtype == x.dtype else fast.to(x.dtype)
            else:
                moved = work.movedim(member_axis, 1)
                rows = moved.reshape(members, moved.shape[1], -1)
                low, high = rows.amin(2), rows.amax(2)
                shape = [members] + [1] * (x.dim() - 1)
                shape[member_axis] = x.shape[member_axis]
            out = self.round_by_scale(work, torch.maximum(-low, high).reshape(shape), rounding, source)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def quantize_along(self, x: Tensor, axes: Sequence[int], rounding: str = "nearest",
                       generator: torch.Generator | None = None) -> list[Tensor]:
        """x quantized with the scaling along each of `axes` in turn (training's per-GEMM reduction
        axes): `quantize` with the scaling's axis set to each, bit for bit, a stochastic
        rounding's draws included (the first axis's from `generator`, then the second's). Block
        formats compute what the quantizations share once (BlockFormat.quantize_along)."""
        return [_with_axis(self, axis).quantize(x, rounding, generator) for axis in axes]

    def quantize_members_along(self, x: Tensor, axes: Sequence[int], rounding: str = "nearest",
                               generator: torch.Generator | MemberGenerators | None = None) -> list[Tensor]:
        """`quantize_along` of each x[g] as if it stood alone: `quantize_members` along each of `axes`
        (counted within a member), in turn."""
        if x.dim() <= 1 or self.scaling.kind != "block":
            return [_with_axis(self, axis).quantize_members(x, rounding, generator) for axis in axes]
        draws = isinstance(generator, MemberGenerators) and parse_rounding(rounding)[0] == "stochastic"
        source = cast("torch.Generator | None", generator)  # MemberGenerators stands in for a generator
        with whole_tensors(draws):  # slices would cut across members' draws
            member_axes = [axis + 1 if axis >= 0 else axis for axis in axes]
            return self.quantize_along(x, member_axes, rounding, source)

    def quantize_per_tensor(self, x: Tensor, rounding: str, generator: torch.Generator | None) -> Tensor:
        """round(x / scale) * scale with one scale for the tensor (x float32 or float64): on the CPU
        with the scale taken on the host (`fast.scales`), else `round_by_scale`."""
        fast = fast_scales.quantize_per_tensor(self, x, rounding, generator)
        if fast is not None:
            return fast
        return self.round_by_scale(x, abs_max(x, None), rounding, generator)

    def round_scaled_on_host(self, x: Tensor, scale: float, rounding: str) -> Tensor | None:
        """round_unscaled(x / scale) * scale for a power-of-two scale known on the host, fused where
        a family's fast path can; None otherwise."""
        return None

    def round_scaled(self, x: Tensor, scale: Tensor, rounding: str, generator: torch.Generator | None,
                     within_max: bool = False) -> Tensor:
        """round_unscaled(x / scale) * scale for a scale tensor that broadcasts over x: 0-dim (one
        tensor's scale), or one per member (G, 1, ...) of a stacked x (`quantize_members`); a family's
        fast path may fuse a 0-dim one. `within_max`: every |x / scale| is within max (1 + u) / (1 - u)
        (`round_unscaled_within_max_`)."""
        rounder = self.round_unscaled_within_max_ if within_max else self.round_unscaled_
        return rounder(x / scale, rounding, generator).mul_(scale)

    def round_by_scale(self, x: Tensor, amax: Tensor, rounding: str, generator: torch.Generator | None
                       ) -> Tensor:
        """round_unscaled(x / s) * s for s = scale_from_amax(amax), amax (each group's max|x|) broadcast
        over x (float32 or float64).

        The same where the CPU flushes denormals (training sets it), with the denormals flushed: a
        group of zeros is divided by 1 (not by E8M0's 2^-127, which is a float32 subnormal: 0 / 0
        would be NaN), and where a float32 scale would leave float32's normals (a subnormal, zero or
        inf: max|x| of a group small against the grid's max, or huge against a grid's max below 1),
        the scale is exact (`float32_scale_values`) and the quotients and products are taken in
        float64 (`round_by_float32_scale_values`). Elsewhere (nearly always) one division and one
        product. Off the CPU (`host_shortcuts`) deciding would read a bool back to the host, which
        stalls the device: there float32 takes the exact path always (the same bits), unless every
        scale of the format is exact in float32 there (`float32_holds_scales_on`).
        """
        if x.dtype == torch.float32 and self._float32_scales_may_leave_normals(amax):
            return self.round_by_float32_scale_values(x, self.float32_scale_values(amax), rounding, generator)
        scale = self.divisor_from_amax(amax)
        return self.round_unscaled_(x / scale, rounding, generator).mul_(scale)

    def _float32_scales_may_leave_normals(self, amax: Tensor) -> bool:
        """Whether a float32 scale of these max|x| may be a subnormal, zero or inf: on the CPU read
        from amax (one bool back to the host), on a device from the format alone."""
        if not host_shortcuts(amax.device):
            return not self.float32_holds_scales_on(amax.device)
        outside = ((amax > 0) & (amax < self._subnormal_scale_amax)) | (amax > self._huge_scale_amax)
        return bool(outside.any())

    def float32_holds_scales_on(self, device: torch.device) -> bool:
        """Whether every float32 scale this format can compute is exact as a float32 on `device`, so
        that one division and one product need no exact fallback: not in general (a ratio below
        float32's normals loses bits, one past its max is inf; E8M0 block scales say otherwise)."""
        return False

    def round_by_float32_scale_values(self, x: Tensor, scale: Tensor, rounding: str,
                                      generator: torch.Generator | None) -> Tensor:
        """round_unscaled(x / s) * s for float32 x and float32 scales s given as their float64 values
        (subnormals included): each quotient and product is exact in float64 (or rounded to 53 bits,
        which rounding to 24 then leaves exactly as one float32 rounding), so the results are float32
        arithmetic's, bit for bit, and no float32 subnormal is read; a result below float32's normals
        is written as the CPU writes one (flushed or not)."""
        scaled = (x.double() / scale).float()
        return (self.round_unscaled_(scaled, rounding, generator).double() * scale).float()

    @cached_property
    def _subnormal_scale_amax(self) -> float:
        """A bound under which max|x| may give a float32 scale below float32's normals (0 excluded)."""
        return self.max_float32 * FLOAT32_MIN_NORMAL * 2

    @cached_property
    def _huge_scale_amax(self) -> float:
        """A bound over which max|x| (finite) may give a float32 scale of 2^128 or more (inf)."""
        return self.max_float32 * FLOAT32_SCALE_LIMIT / 4

    def divisor_from_amax(self, amax: Tensor) -> Tensor:
        """scale_from_amax, with 1 wherever max|x| is 0 (0 / s * s is 0 for every s; 1 is a normal
        float32 where a scale format's smallest scale may not be)."""
        return self.scale_from_amax(amax)

    def float32_scale_values(self, amax: Tensor) -> Tensor:
        """The scales of float32 amax as float64 values, exact where float32 cannot hold them: the
        ratio max|x| / max rounded to float32's significand (float32's rounding wherever the ratio
        is a normal float32), then its power of two with pow2; 1 where max|x| is 0 or not finite.
        `divisor_from_amax`'s values wherever those are normal float32s, whether or not the CPU
        flushes float32 denormals."""
        amax = amax.double()  # a flushed input max|x| reads as 0 here, as it does in float32
        usable = (amax > 0) & (amax < math.inf)
        # The ratio of a float32 max|x| (at least 2^-149) and a grid's max lies well inside float64's
        # normal exponents, so each power of two below is one shift (fewer kernels on a GPU).
        mantissa, exponent = torch.frexp(torch.where(usable, amax, 1.0) / self.max_float32)
        significand = mantissa.float().double()  # in [0.5, 1]: rounded to float32's 24 bits
        if self.scaling.pow2:  # ceil(log2(significand * 2^exponent))
            scale = normal_power_of_two(exponent - (significand == 0.5).to(exponent.dtype))
        else:
            scale = significand * normal_power_of_two(exponent)
        return torch.where(usable, scale, 1.0)

    @cached_property
    def max_float32(self) -> float:
        """The grid's max rounded to float32: the divisor of a float32 tensor's scale."""
        return round_to_float32(self.max)

    def scale_from_amax(self, amax: Tensor) -> Tensor:
        """The divisor that maps max|x| onto the grid; 1 where max|x| or the divisor is zero or not finite.

        Five small operations on the device: on a GPU each is a kernel launch, which costs more
        than its arithmetic on a per-tensor or per-channel max.
        """
        usable = (amax > 0) & (amax < math.inf)  # NaN fails both
        one = constant(1.0, amax.dtype, amax.device)
        # A tensor divisor, not a Python float: CUDA divides by a host scalar through its reciprocal,
        # which is not correctly rounded, and the scale must not depend on the device.
        grid_max = constant(self.max_float32 if amax.dtype == torch.float32 else self.max, amax.dtype,
                            amax.device)
        if self.scaling.pow2:
            safe = torch.where(usable, amax, one)
            scale = power_of_two(pow2_ceil_exponent(safe / grid_max)).to(amax.dtype)
        else:
            scale = amax / grid_max
            # amax / max below the dtype's smallest subnormal (a zero divisor) or past its max (float64
            # max|x| over a max below 1: an inf divisor, x / inf * inf NaN): 1, as pow2 has it
            usable &= (scale > 0) & (scale < math.inf)
        return torch.where(usable, scale, one)


from dse.formats.fast import scales as fast_scales  # noqa: E402  (it builds on this module)

_straight_through_methods(NumberFormat)
