"""Elementwise kernels whose last bits depend on where an element sits, run on a stacked tensor so
that each member's elements get the bits they get alone.

torch's CPU elementwise loops run a vector kernel over blocks of twice the vector width and the
scalar function over the rest of a contiguous stretch (ATen's cpu/Loops.h `vectorized_loop`), and on
several threads an operation over PARALLEL_GRAIN elements or more is split among them. Where the
vector and scalar functions disagree in the last bit (measured on torch 2.13, AVX-512, on two
2-vCPU VMs alike, one an AMD EPYC, by `benchmarks/stacked_kernels.py`: pow with a tensor
exponent, exp2, sigmoid, SiLU, softplus, Mish, ELU, SELU, CELU, tanh-approximated GELU, float64
GELU, and their backward kernels; GLU where a row is long enough to be split among threads), an
element's bits depend on where the stretch ends: alone at the end of the member's own tensor,
stacked at the end of the group's. exp, log, log2, erf, tanh, sqrt, exact IEEE arithmetic,
logsigmoid, hardswish, hardsigmoid, softsign, and the norms (layer, RMS, group, instance, batch,
`F.normalize`) give the same bits anywhere (benchmarks/user_kernels.py checks users' networks made
of them). On CUDA every element takes one scalar function wherever it sits.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from dse.train.recompute import RecomputedMode, follow_checkpoints, function_modes, set_function_modes

PARALLEL_GRAIN = 32768
"""at::internal::GRAIN_SIZE: torch runs an elementwise operation over fewer elements on one thread."""

VECTOR_BLOCK = 64
"""A multiple of every CPU vector loop's block (2 x the vector width, at most 32 float32 elements
on AVX-512): a stretch of a multiple of this many elements has no scalar tail."""


def _thread_stretches_aligned(numel: int) -> bool:
    """Whether torch's split of `numel` elements among its threads leaves every stretch a whole
    number of vector blocks (at::parallel_for: min(threads, ceil(numel / grain)) stretches of
    ceil(numel / stretches) elements)."""
    stretches = min(torch.get_num_threads(), -(-numel // PARALLEL_GRAIN))
    return stretches <= 1 or (-(-numel // stretches)) % VECTOR_BLOCK == 0


def whole_is_as_alone(x: Tensor, members: int) -> bool:
    """Whether one call over x gives each member's block its bits alone anyway: on CUDA; or where x
    is contiguous and each member's block and every thread's stretch, alone and stacked, are whole
    vector blocks, so that no element takes the scalar tail in either."""
    if members <= 1 or x.device.type != "cpu":
        return True
    each = x.numel() // members
    return (x.is_contiguous() and each % VECTOR_BLOCK == 0 and _thread_stretches_aligned(x.numel())
            and _thread_stretches_aligned(each))


def member_kernel(op: Callable[[Tensor], Tensor], x: Tensor, members: int) -> Tensor:
    """op(x), for an elementwise `op` and an x whose leading axis holds `members` equal blocks (a
    stacked tensor, or a folded batch), with each member's block given the bits op gives it alone:
    one call where `whole_is_as_alone`, else member by member on the members' own blocks
    (differentiable: torch.cat's backward hands each member's op its own gradient block)."""
    if whole_is_as_alone(x, members):
        return op(x)
    return torch.cat([op(block) for block in x.chunk(members)])

IN_PLACE_FUNCTIONS: frozenset[Any] = frozenset({
    Tensor.sigmoid_, torch.sigmoid_, Tensor.exp2_, torch.exp2_, Tensor.pow_, Tensor.__ipow__,
    Tensor.float_power_, F.elu_, F.celu_, torch.celu_, torch.selu_,
})
"""The in-place forms of POSITION_DEPENDENT_FUNCTIONS (`x.sigmoid_()`, `x **= y`, `F.elu_`)."""

POSITION_DEPENDENT_FUNCTIONS: frozenset[Any] = frozenset({
    F.gelu, F.silu, F.softplus, F.mish, F.elu, F.selu, F.celu, F.sigmoid, F.glu,
    torch.sigmoid, Tensor.sigmoid, torch.special.expit, torch.exp2, Tensor.exp2, torch.special.exp2,
    torch.pow, Tensor.pow, Tensor.__pow__, Tensor.__rpow__, torch.float_power, Tensor.float_power,
}) | IN_PLACE_FUNCTIONS
"""The elementwise functions whose CPU vector and scalar kernels (forward or backward) measurably
disagree in the last bit, or (GLU) whose thread split does (benchmarks/stacked_kernels.py), as a
network's forward may call them."""


RESULT_GRADIENT_REDUCTIONS: frozenset[Any] = frozenset({torch.logsumexp, Tensor.logsumexp})
"""LAYOUT_DEPENDENT_REDUCTIONS whose gradient takes their result: logsumexp's, dy * exp(x - result)
(torch's logsumexp_backward: an exact subtraction, exp, which gives the same bits anywhere, and an
exact product), computed once over the group's x with the members' own results (`_LogSumExpOf`)."""

LAYOUT_DEPENDENT_REDUCTIONS: frozenset[Any] = frozenset({
    torch.sum, Tensor.sum, torch.mean, Tensor.mean, torch.nansum, Tensor.nansum,
}) | RESULT_GRADIENT_REDUCTIONS
"""Reductions whose CPU kernel, over an axis that lies outside the batch in memory (a batch-innermost
(B, C) view of a (C, B) tensor summed over C), runs across the outputs, the batch's samples, and adds
a sample's terms in an order set by how many samples the call holds (BROADCASTING_FUNCTIONS), G x B
where alone B (measured on torch 2.13, a 2-vCPU AMD EPYC, one thread, B in 7, 14, 50, 64, C in
37, 40, G in 2, 3: sum, mean and nansum differed from the member's own in 26 of 40 member blocks,
logsumexp in 15; var, std, amax, prod, softmax, log_softmax, norm, cumsum, F.normalize and
layer_norm in none). The gradient of sum, mean and nansum (the output's gradient expanded, divided by
the count for a mean) does not depend on their result; logsumexp's does (RESULT_GRADIENT_REDUCTIONS)."""


def positional_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A torch function's arguments with its input passed by keyword (`torch.sum(input=x, dim=1)`)
    moved to the front of the positional ones, and `axis` (numpy's spelling) named `dim`: every
    spelling of a call goes one path."""
    if "input" in kwargs or "axis" in kwargs:
        kwargs = dict(kwargs)
        if "input" in kwargs:
            args = (kwargs.pop("input"), *args)
        if "axis" in kwargs:
            kwargs["dim"] = kwargs.pop("axis")
    return args, kwargs


BROADCASTING_FUNCTIONS: frozenset[Any] = frozenset({
    torch.add, Tensor.add, Tensor.add_, Tensor.__add__, Tensor.__radd__, Tensor.__iadd__,
    torch.sub, torch.subtract, torch.rsub, Tensor.sub, Tensor.subtract, Tensor.sub_, Tensor.__sub__,
    Tensor.__rsub__, Tensor.__isub__, torch.mul, torch.multiply, Tensor.mul, Tensor.multiply, Tensor.mul_,
    Tensor.__mul__, Tensor.__rmul__, Tensor.__imul__, torch.div, torch.divide, torch.true_divide,
    Tensor.div, Tensor.divide, Tensor.true_divide, Tensor.div_, Tensor.__truediv__, Tensor.__rtruediv__,
    Tensor.__itruediv__, torch.where, Tensor.where, torch.maximum, Tensor.maximum, torch.minimum,
    Tensor.minimum, torch.addcmul, Tensor.addcmul, torch.addcdiv, Tensor.addcdiv, torch.lerp, Tensor.lerp,
    torch.atan2, Tensor.atan2, torch.hypot, Tensor.hypot, torch.fmax, Tensor.fmax, torch.fmin, Tensor.fmin,
    torch.clamp, Tensor.clamp, Tensor.clamp_, torch.clip, Tensor.clip, Tensor.clip_, torch.clamp_min,
    Tensor.clamp_min, Tensor.clamp_min_, torch.clamp_max, Tensor.clamp_max, Tensor.clamp_max_,
    torch.copysign, Tensor.copysign, torch.xlogy, Tensor.xlogy, torch.special.xlogy, torch.fmod, Tensor.fmod,
    torch.remainder, Tensor.remainder, Tensor.__mod__,
})
"""Elementwise functions of several tensors, which broadcast them to one shape. A tracked operand's
gradient is then the output's summed over the axes it was broadcast along (autograd's at::sum_to, in
C++, outside any mode), a sum as LAYOUT_DEPENDENT_REDUCTIONS: over an axis outside the members' samples
in memory, the order in which it adds a sample's terms depends on how many samples the call holds (G x
B, alone B; 1-69 samples of 37 and of 40 terms, one thread: four orders, for 1; 2-3 and 8-31; 4, 32
and 64; 5-7, 33-63 and 65-69 samples). A batch-innermost gradient of `h - h.mean(1, keepdim=True)`
gave 26 of 40 member blocks of h's gradient other bits than alone (B in 7, 14, 50, 64, C in 37, 40, G
in 2, 3, fp32, one thread)."""

EXPANDING_FUNCTIONS: frozenset[Any] = frozenset({
    Tensor.expand, Tensor.expand_as, torch.broadcast_to, Tensor.broadcast_to,
})
"""Explicit broadcasts, whose backward is that sum too."""

def einsum_of_one(x: Tensor, equation: str) -> Tensor:
    """torch.einsum(equation, x): an einsum of one operand, a sum over the letters its output drops
    (torch sums in C++), with x first, as INNER_SUM_FUNCTIONS take their input."""
    return torch.einsum(equation, x)


INNER_SUM_FUNCTIONS: frozenset[Any] = frozenset({
    torch.var, Tensor.var, torch.std, Tensor.std, torch.var_mean, torch.std_mean, Tensor.repeat,
    torch.tile, Tensor.tile, torch.repeat_interleave, Tensor.repeat_interleave, F.normalize, F.rms_norm,
    F.cosine_similarity, F.instance_norm, einsum_of_one,
})
"""Functions that sum a sample's terms inside torch's C++, where no mode sees the sum: in their backward
var and std (the input's mean, torch's var_backward), repeat, tile and repeat_interleave (the copies'
gradients), F.normalize (its norm's broadcast) and instance_norm (its statistics'); rms_norm,
cosine_similarity and a one-operand einsum in their forward too (einsum's 26 of 30 member blocks'
values, instance_norm's with the samples on its channel axis 26 of 30 gradients, under the mode
without them). Over an axis outside the samples in memory (the input batch-innermost for var, std,
rms_norm and cosine_similarity, the output's gradient for the others), that sum's order depends on how many
samples the call holds, G x B where alone B (measured on torch 2.13, a 2-vCPU AMD EPYC, fp32, one
thread, G 2-3, B 7/14/50, C 37/40, 30 member blocks, under the mode without them: the input's
gradient differed in 25-26 of them, rms_norm's and cosine_similarity's values in 22-25; with them
none, at 2 threads with B 400, C 37/100 neither; benchmarks/member_inner_sums.py). norm,
linalg.vector_norm, softmax, log_softmax, layer_norm, cumsum, prod and amax differed in none."""


INPUT_LAYOUT_SUMS: frozenset[Any] = frozenset({
    torch.var, Tensor.var, torch.std, Tensor.std, torch.var_mean, torch.std_mean, einsum_of_one,
})
"""INNER_SUM_FUNCTIONS whose backward sums in the input's layout only (the output's gradient is
expanded over the reduced axes): over an input with its samples outermost they run as they are."""


def _sums_outside(x: Tensor, axis: int, dims: Sequence[int]) -> bool:
    """Whether a sum of x over `dims`, where x holds the members' samples along `axis`, keeps `axis` and
    reduces an axis that lies outside it in memory (a larger stride), where the order of each sample's
    sum depends on how many samples the call holds."""
    reduced = {d % x.dim() for d in dims}
    return axis not in reduced and any(x.shape[d] > 1 and x.stride(d) > x.stride(axis) for d in reduced)


def _may_sum_outside(x: Tensor, reduced: Sequence[int]) -> bool:
    """Whether some axis that a sum of x over `reduced` keeps lies inside a reduced one in memory (a
    smaller stride): only then can `_sums_outside` hold for the axis holding the members' samples."""
    kept = [x.stride(d) for d in range(x.dim()) if d not in reduced]
    return bool(kept) and any(x.shape[d] > 1 and x.stride(d) > min(kept) for d in reduced)


def _reduced_dims(x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...]:
    """The dims (non-negative) a reduction of x over the dims in `args` / `kwargs` reduces (empty: none
    given, or not as ints)."""
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    dims = (dim,) if isinstance(dim, int) else tuple(dim) if isinstance(dim, list | tuple) else ()
    if not all(isinstance(d, int) for d in dims) or x.dim() == 0:
        return ()
    return tuple(sorted({d % x.dim() for d in dims}))


def _exact_gelu(func: Any, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """float32 GELU with erf (the transformer proxy's): the same bits anywhere, forward and backward
    (measured on AVX-512 and, with ATEN_CPU_CAPABILITY=avx2, AVX2), so it needs no mode."""
    approximate = args[1] if len(args) > 1 else kwargs.get("approximate", "none")
    return func is F.gelu and x.dtype == torch.float32 and approximate == "none"


def _member_axis(x: Tensor, members: int, rows: int | None) -> int | None:
    """The axis of x that holds the members' samples, member-major, read from its shape (what
    `MemberKernelMode` uses for a tensor whose `Placement` it did not follow; None: x has none, so
    every member computes the same tensor alone). With `rows` (a member's batch) known: the first
    axis when its size is a multiple of the group's folded batch G * rows (the batch, rows of
    samples, heads of samples), else an axis of exactly G * rows (a sequence-first (L, G*B, E) layout, as
    nn.MultiheadAttention's with batch_first=False), else one of a multiple of it (that layout
    flattened behind its samples, (L, G*B*E): each member's block one stretch of it, as
    `_members_interleaved` keeps it) where the first does not divide into G, else the first when it
    divides into G; without `rows`, the first when it divides into G. Where the first divides into G
    and an inner axis is a multiple of G * rows, either may hold the members' samples ((6, 28): rows
    of 28 values straddling samples of 12, G 2 B 7; or (L, G*B*E) with L a multiple of G), and the
    wrong one gives them other last bits than alone: raises MemberAxisLost (one by one)."""
    if x.dim() == 0:
        return None
    if rows is not None:
        folded = members * rows
        if x.shape[0] % folded == 0:
            if folded > 1 and folded in x.shape[1:]:
                warnings.warn(
                    f"MemberKernelMode: a {tuple(x.shape)} tensor has the group's {members} x {rows} samples "
                    f"on its first axis and on another; the first is taken (a sequence-first layout whose "
                    f"sequence length is a multiple of the group's batch would give its members other last "
                    f"bits than alone: use another batch size, batch_first, or group_size 1)",
                    AmbiguousMemberAxisWarning, stacklevel=4)
            return 0
        inner = x.shape[1:]
        if folded in inner:
            return 1 + inner.index(folded)
        whole = next((axis for axis, size in enumerate(inner, 1) if size % folded == 0), None)
        if whole is not None and x.shape[0] % members == 0:
            raise MemberAxisLost(
                f"a {tuple(x.shape)} tensor may hold the group's {members} x {rows} samples on its first "
                f"axis ({members} blocks of rows that straddle samples) or on axis {whole} (a multiple of "
                f"{folded}: a sequence-first layout flattened behind its samples), and its shape cannot "
                f"tell which")
        if whole is not None:
            return whole
    return 0 if x.shape[0] % members == 0 else None


def _has_member_axis(x: Tensor, members: int, rows: int | None) -> bool:
    """Whether an axis of x may hold the members' samples (`_member_axis`: one does, or two may)."""
    try:
        return _member_axis(x, members, rows) is not None
    except MemberAxisLost:
        return True


class SummedTermsWarning(UserWarning):
    """A function's gradient terms for an input used more than once reached it as their sum."""


class AmbiguousMemberAxisWarning(UserWarning):
    """The mode cannot tell which axis of a tensor holds the members' samples."""


class MemberAxisLost(Exception):
    """Found while a group ran a forward: a tensor holding the members' samples on an inner axis
    (a sequence-first (L, G*B, E) one) was reshaped so that other axes' elements lie between a
    member's samples ((L*G*B, E) rows, sequence-major): no axis of it holds each member's block, and
    a call the mode then splits member by member (a position-dependent kernel, a reduction, a
    broadcast's gradient) may split it wrongly and give a member other bits than alone. The group's
    trials train one by one instead (a fold that no split follows, as a Linear's rows, runs)."""


VALUE_READS: frozenset[Any] = frozenset({
    Tensor.item, Tensor.__float__, Tensor.__int__, Tensor.__index__, Tensor.__complex__, Tensor.tolist,
    Tensor.numpy, Tensor.__format__, Tensor.__array__, Tensor.__bool__,
})
"""The calls that read a tensor's values into Python (`float(h.mean())`, `.item()`, `.tolist()`, a
branch `if h.abs().max() > 1:` on a comparison's bool): on a group's tensor, a number of the group's,
where alone each member reads its own (`MemberKernelMode.read`)."""


RESHAPING_FUNCTIONS: frozenset[Any] = frozenset({
    Tensor.reshape, torch.reshape, Tensor.view, Tensor.flatten, torch.flatten, Tensor.reshape_as,
    Tensor.view_as, Tensor.unflatten, torch.unflatten, Tensor.ravel, torch.ravel, Tensor.squeeze,
    torch.squeeze, Tensor.squeeze_, Tensor.unsqueeze, torch.unsqueeze, Tensor.unsqueeze_,
})
"""The calls that give a tensor another shape and keep its elements' row-major order: they may fold
its axes together (`_members_interleaved`), and its members' elements keep their places in that order
(`Placement`)."""

def _getter(name: str) -> Any:
    """What a torch-function mode is handed for reading the tensor property `name` (`x.T`)."""
    return getattr(Tensor, name).__get__


TRANSPOSED, MATRIX_TRANSPOSED, MATRIX_ADJOINT, ADJOINT = (_getter(name) for name in ("T", "mT", "mH", "H"))

PERMUTING_FUNCTIONS: frozenset[Any] = frozenset({
    Tensor.permute, torch.permute, Tensor.transpose, torch.transpose, Tensor.transpose_, Tensor.swapaxes,
    torch.swapaxes, Tensor.swapaxes_, Tensor.swapdims, torch.swapdims, Tensor.swapdims_, Tensor.t, torch.t,
    Tensor.t_, Tensor.movedim, torch.movedim, Tensor.moveaxis, torch.moveaxis, Tensor.adjoint, torch.adjoint,
    TRANSPOSED, MATRIX_TRANSPOSED, MATRIX_ADJOINT, ADJOINT,
})
"""The calls that reorder a tensor's axes (`_permutation`): the axis holding the members' samples moves."""

UNPLACEABLE_FUNCTIONS: frozenset[Any] = frozenset({
    Tensor.as_strided, torch.as_strided, Tensor.as_strided_, Tensor.resize_, Tensor.resize_as_, Tensor.set_,
    torch.rot90, Tensor.rot90, torch.diagonal, Tensor.diagonal, torch.diag_embed, Tensor.diag_embed,
    Tensor.unfold, F.unfold, F.fold, F.pixel_shuffle, F.pixel_unshuffle, F.channel_shuffle, torch.kron,
    torch.tensordot,
})
"""Calls that move elements between axes in ways `MemberKernelMode._follow`'s rules do not describe:
their results are not placed (their shape is read, `_member_axis`)."""

PLACEMENT = "_dse_placement"
"""The attribute of a tensor computed in a group's forward that holds its `Placement`."""


class Placement(NamedTuple):
    """Where a tensor of a group's forward holds each member's elements, followed from the group's
    input through the calls that made it (`MemberKernelMode`): the element at row-major index f is
    member (f // unit) % G's (member-major blocks of `unit` elements, repeated along the axes before:
    (G*B, H) has unit B*H, a sequence-first (L, G*B, E) B*E, so does its fold into rows (L*G*B, E),
    which holds them in L stretches each). `forward` is the forward it was followed in (a tensor kept
    from another is read by its shape); `why` says how a reshape left no axis holding each member's
    block (`_placed_axis`)."""

    forward: object
    unit: int
    why: str | None


def _placed_axis(shape: Sequence[int], unit: int, members: int) -> int | None:
    """The axis that holds each member's block of a tensor of `shape` whose members' elements lie in
    blocks of `unit` (`Placement`): the one whose span (its elements and those of the axes after it)
    is the members' G blocks, whose size is a multiple of G (None: no axis holds them, as a
    sequence-first layout folded into rows, or rows straddling two members)."""
    block = members * unit
    span = 1
    for axis in range(len(shape) - 1, -1, -1):
        inner, span = span, span * shape[axis]
        if span == block:
            return axis if unit % inner == 0 else None
        if span > block:
            return None
    return None


def _unit_at(shape: Sequence[int], axis: int, members: int) -> int | None:
    """The `Placement.unit` of a tensor of `shape` that holds the members' samples along `axis`."""
    if axis < 0 or axis >= len(shape) or shape[axis] % members:
        return None
    return math.prod(shape[axis + 1:]) * (shape[axis] // members)


def _through_shape(unit: int, source: Sequence[int], out: Sequence[int], members: int) -> int | None:
    """The unit of a call's result of shape `out` from an operand of shape `source` (unit `unit`), for a
    call that works at each place of the axes it keeps and has no fewer axes: the axes both shapes
    begin with (a Linear or matmul over the last axes, a slice, join or pad of later axes, new axes
    after them) where the members' blocks span whole stretches of the rest, or the axes both end with
    where those hold the members' samples (an operand broadcast along new leading axes, a
    sequence-first tensor's sequence sliced or joined). None: neither, both disagreeing, or fewer axes
    (which axes went, the shape cannot tell: `_kept_axis` reads the call's arguments)."""
    if tuple(source) == tuple(out):
        return unit
    if len(out) < len(source):
        return None
    units = set()
    prefix = 0
    while prefix < len(source) and source[prefix] == out[prefix]:
        prefix += 1
    rest = math.prod(source[prefix:])
    if rest and unit % rest == 0:
        units.add(unit // rest * math.prod(out[prefix:]))
    axis = _placed_axis(source, unit, members)
    if axis is not None:
        suffix = 0
        while suffix < len(source) and source[-1 - suffix] == out[-1 - suffix]:
            suffix += 1
        if axis >= len(source) - suffix:
            units.add(unit)
    return units.pop() if len(units) == 1 else None


REDUCING_FUNCTIONS: dict[Any, tuple[int, int | None]] = {
    **{func: (1, 2) for func in (
        torch.sum, Tensor.sum, torch.mean, Tensor.mean, torch.nansum, Tensor.nansum, torch.nanmean,
        Tensor.nanmean, torch.amax, Tensor.amax, torch.amin, Tensor.amin, torch.max, Tensor.max, torch.min,
        Tensor.min, torch.argmax, Tensor.argmax, torch.argmin, Tensor.argmin, torch.prod, Tensor.prod,
        torch.logsumexp, Tensor.logsumexp, torch.all, Tensor.all, torch.any, Tensor.any, torch.median,
        Tensor.median, torch.nanmedian, Tensor.nanmedian, torch.mode, Tensor.mode)},
    **{func: (1, 3) for func in (torch.var, Tensor.var, torch.std, Tensor.std, torch.var_mean,
                                 torch.std_mean)},
    **{func: (2, 3) for func in (torch.norm, Tensor.norm)},
    **{func: (1, None) for func in (torch.count_nonzero, Tensor.count_nonzero, torch.select, Tensor.select,
                                    torch.unbind, Tensor.unbind)},
}
"""Calls that drop the axes they are given (reductions; select and unbind their one), with where their
`dim` and `keepdim` arguments sit (None: no keepdim)."""


FOLLOWING_RULES: dict[Any, str] = {
    **dict.fromkeys(UNPLACEABLE_FUNCTIONS, "unplaceable"), **dict.fromkeys(RESHAPING_FUNCTIONS, "reshape"),
    **dict.fromkeys(PERMUTING_FUNCTIONS, "permute"), torch.einsum: "einsum",
    **dict.fromkeys((*REDUCING_FUNCTIONS, Tensor.__getitem__), "drop"),
}
"""How `MemberKernelMode._follow` places a call's result: by its operand's order of elements (a
reshape), its axes' order (`_permutation`), an einsum's letters (`_einsum_unit`), the axes it drops
(`_kept_axis`), not at all; any other call by shape (`_through_shape`)."""


def _kept_axis(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], axis: int, ndim: int) -> int | None:
    """Where the axis `axis` of a tensor of `ndim` axes lands in the result of one of REDUCING_FUNCTIONS
    on it, or of an index (`x[0]`, `x[:, -1]`, `x[..., None]`; Tensor.__getitem__). None: the call
    drops or cuts that axis, or reads arguments not of the plain kinds read here."""
    if func is Tensor.__getitem__:
        return _indexed_axis(args[1] if len(args) > 1 else None, axis, ndim)
    dim_at, keep_at = REDUCING_FUNCTIONS[func]
    dims = _dims_of(args[dim_at] if len(args) > dim_at else kwargs.get("dim"))
    keepdim = keep_at is not None and bool(args[keep_at] if len(args) > keep_at
                                           else kwargs.get("keepdim", False))
    if not dims:
        return None
    dropped = {d % ndim for d in dims}
    if axis in dropped:
        return None
    return axis if keepdim else axis - sum(d < axis for d in dropped)


def _indexed_axis(index: Any, axis: int, ndim: int) -> int | None:
    """Where the axis `axis` of a tensor of `ndim` axes lands in x[index], for a basic index (ints,
    slices, None, Ellipsis) that takes all of that axis (None: it cuts or picks in it, or the index
    has tensors or lists)."""
    items = index if isinstance(index, tuple) else (index,)
    if not all(item is None or item is Ellipsis or isinstance(item, slice)
               or (isinstance(item, int) and not isinstance(item, bool)) for item in items):
        return None
    consumed = sum(item is not None and item is not Ellipsis for item in items)
    at = out = 0
    for item in items:
        if item is Ellipsis:
            skipped = ndim - consumed
            if at <= axis < at + skipped:
                return out + axis - at
            at, out = at + skipped, out + skipped
        elif item is None:
            out += 1
        elif at == axis:
            return out if isinstance(item, slice) and item == slice(None) else None
        else:
            at, out = at + 1, out + (not isinstance(item, int))
    return out + axis - at if axis >= at else None


def _dims_given(args: tuple[Any, ...], names: tuple[str, ...], kwargs: dict[str, Any]) -> list[Any]:
    """The arguments after the tensor, positional or by any of `names`."""
    given = list(args[1:])
    return given if given else [kwargs[name] for name in names if name in kwargs]


def _permutation(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], ndim: int) -> list[int] | None:
    """For one of PERMUTING_FUNCTIONS on a tensor of `ndim` axes: the input axis each output axis takes
    (None: arguments not read here)."""
    order = list(range(ndim))
    name = getattr(func, "__name__", "")
    if func in (Tensor.permute, torch.permute):
        dims = _dims_given(args, ("dims",), kwargs)
        dims = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], list | tuple) else dims
        if len(dims) != ndim or not all(isinstance(d, int) for d in dims):
            return None
        return [d % ndim for d in dims]
    if func in (Tensor.movedim, torch.movedim, Tensor.moveaxis, torch.moveaxis):
        given = _dims_given(args, ("source", "destination"), kwargs)
        if len(given) != 2:
            return None
        sources, targets = ([d] if isinstance(d, int) else list(d) for d in given)
        if len(sources) != len(targets) or not all(isinstance(d, int) for d in (*sources, *targets)):
            return None
        placed = {t % ndim: s % ndim for s, t in zip(sources, targets, strict=True)}
        others = iter(d for d in range(ndim) if d not in placed.values())
        return [placed[d] if d in placed else next(others) for d in range(ndim)]
    if func == TRANSPOSED:
        return order[::-1]
    if name in ("t", "t_") or func in (MATRIX_TRANSPOSED, MATRIX_ADJOINT, ADJOINT, Tensor.adjoint,
                                       torch.adjoint):
        if ndim < 2:
            return order
        first = 0 if name in ("t", "t_") or func == ADJOINT else ndim - 2
        pair = [first, first + 1]
    else:
        pair = _dims_given(args, ("dim0", "dim1"), kwargs) or _dims_given(args, ("axis0", "axis1"), kwargs)
        if len(pair) != 2 or not all(isinstance(d, int) for d in pair):
            return None
    a, b = (d % ndim for d in pair)
    order[a], order[b] = order[b], order[a]
    return order


def _einsum_unit(args: tuple[Any, ...], placed: Sequence[tuple[int, Tensor, Placement]], out: Tensor,
                 members: int) -> int | None:
    """torch.einsum's result's unit, from the letter of each placed operand's member axis (None: the
    equation drops it or spans axes with `...`, or the operands disagree)."""
    equation = args[0] if args and isinstance(args[0], str) else None
    if equation is None or equation.count("->") != 1 or "." in equation:
        return None
    inputs, kept = equation.replace(" ", "").split("->")
    letters = inputs.split(",")
    units = set()
    for index, t, placement in placed:
        axis = _placed_axis(t.shape, placement.unit, members)
        own = letters[index] if index < len(letters) else ""
        if axis is None or len(own) != t.dim() or own[axis] not in kept:
            return None
        units.add(_unit_at(out.shape, kept.index(own[axis]), members))
    return units.pop() if len(units) == 1 else None


def _members_interleaved(x: Tensor, y: Tensor, members: int, rows: int | None) -> str | None:
    """Where `y`, a reshape of a floating-point `x` whose members' samples lie on an inner axis
    (`_member_axis`, behind axes of more than one element), has no axis that starts with them behind
    the same outer elements (a member's samples are no longer one block of an axis): what happened;
    None where the members' blocks survive (or x holds them on its first axis)."""
    if rows is None or not x.is_floating_point() or x.dim() < 2 or x.shape == y.shape:
        return None
    try:
        axis = _member_axis(x, members, rows)
    except MemberAxisLost as ambiguous:  # (a split after it could not tell the members' blocks)
        return str(ambiguous)
    if axis is None or axis == 0:
        return None
    outer = math.prod(x.shape[:axis])
    if outer == 1:
        return None
    folded = members * rows
    leading = 1
    for size in y.shape:
        if leading == outer and size % folded == 0:
            return None
        leading *= size
        if leading > outer:
            break
    return (f"a {tuple(x.shape)} tensor holding the group's {members} x {rows} samples on axis {axis} was "
            f"reshaped to {tuple(y.shape)}, which interleaves the members' samples with its axes before "
            f"(a sequence-first layout folded into rows): no axis holds each member's own block")


def _dense_strides(shape: Sequence[int], order: Sequence[int]) -> tuple[int, ...]:
    """The strides of a dense tensor of `shape` whose axes run from fastest to slowest in `order`."""
    strides = [0] * len(shape)
    step = 1
    for axis in order:
        strides[axis] = step
        step *= max(shape[axis], 1)
    return tuple(strides)


def _alone_strides(shape: Sequence[int], strides: Sequence[int], axis: int, each: int
                   ) -> tuple[int, ...] | None:
    """The strides a member's tensor has alone, where the group's tensor (`shape`, `strides`) is dense
    with the members' samples along `axis`: the group's axis order with `each` samples on `axis`
    (a contiguous (L, G*B, E) is each member's contiguous (L, B, E); a batch-slowest layout is its
    member's slice as it is). None where the group's tensor is not dense (a view whose member's
    layout alone the group cannot know): the member's slice of it is used as it is."""
    dims = range(len(shape))
    order = sorted(dims, key=lambda d: (strides[d], d))
    if any(shape[d] > 1 and strides[d] != s for d, s in zip(dims, _dense_strides(shape, order), strict=True)):
        return None
    alone = list(shape)
    alone[axis] = each
    return _dense_strides(alone, order)


def _as_alone(part: Tensor, axis: int, members: int) -> Tensor:
    """A member's slice `part` (a narrow along `axis` of a group's tensor with the strides it has)
    laid out as the member's tensor alone (a copy where the slice is laid out otherwise)."""
    shape = list(part.shape)
    shape[axis] *= members
    strides = _alone_strides(shape, part.stride(), axis, part.shape[axis])
    if strides is None or part.stride() == strides:
        return part
    return torch.empty_strided(part.shape, strides, dtype=part.dtype, device=part.device).copy_(part)


def cat_as_alone(parts: Sequence[Tensor], axis: int = 0) -> Tensor:
    """Members' outputs joined along `axis` (their samples), each member's part in the order of axes in
    memory it has alone: the parts joined along `axis` where it lies in that order (its strides alone
    where it is outermost; where not, the axes outside it stride over all members, as a
    sequence-first layout's do).

    torch.cat keeps a contiguous or channels-last layout and makes any other contiguous, and a layout
    decides the order of later reductions: a layer with a weight of its own that returns its tokens
    (B, L, C) scaled per channel as a (B, C, L) view, summed over L after it, summed in another order
    in a group than alone (a digits network of it: member 0's final loss 2.3300538063049316 grouped
    against 2.330053726832072 alone, fp32); so did a (B, C) view of a (C, B) tensor summed over C.
    Parts expanded along other axes (stride 0: a sum's or an einsum's gradient) are joined expanded,
    as each is alone. Another layout that is not dense (a sliced view) has no joined equal: torch.cat's."""
    first = parts[0]
    if first.is_contiguous():  # the common case first (the built-in proxies' layers)
        return torch.cat(list(parts), axis)
    strides = first.stride()
    expanded = [d for d in range(first.dim()) if strides[d] == 0 and first.shape[d] > 1 and d != axis]
    if expanded and all(t.stride() == strides and t.shape == first.shape for t in parts):
        cores = list(parts)
        for d in expanded:
            cores = [t.narrow(d, 0, 1) for t in cores]
        joined = cat_as_alone(cores, axis)
        shape = list(first.shape)
        shape[axis] = joined.shape[axis]
        return joined.expand(shape)
    if torch.empty_like(first).stride() != strides or any(t.stride() != strides for t in parts):
        return torch.cat(list(parts), axis)  # not dense, or the members' layouts differ
    order = sorted(range(first.dim()), key=lambda d: (-strides[d], d))
    joined = torch.cat([t.permute(order) for t in parts], order.index(axis))  # each part contiguous so
    return joined.permute([order.index(d) for d in range(first.dim())])


class _GradAsAlone(torch.autograd.Function):
    """Identity forward; the backward hands on a member's slice of the group's gradient laid out as
    the member's gradient alone (`_as_alone`): a backward kernel's tail depends on its gradient's
    layout too (a sequence-first gradient's slice is strided, alone it may be dense)."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, axis: int, members: int) -> Tensor:
        ctx.axis, ctx.members = axis, members
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return _as_alone(grad, ctx.axis, ctx.members), None, None


class _ValuesOf(torch.autograd.Function):
    """The members' own results of a reduction, joined along `axis`, forward; the gradient goes to `whole`
    (the same reduction over the group's tensor), whose backward (the output's gradient expanded: exact
    arithmetic, independent of the result) hands x one gradient term in x's layout, as alone. The members'
    own calls' gradients would reach x as one full-size term each (a narrow's backward fills zeros around
    its slice), G x the work and memory, in a contiguous layout."""

    @staticmethod
    def forward(ctx: Any, whole: Tensor, axis: int, *values: Tensor) -> Tensor:
        ctx.members = len(values)
        return torch.cat(values, axis)  # (a new tensor, not a view: the caller may modify it in place)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return (grad, None, *[None] * ctx.members)


class _LogSumExpOf(torch.autograd.Function):
    """The members' own logsumexps, joined, forward; the backward is torch's logsumexp_backward,
    dy * exp(x - result), over the group's x at once with the members' own results (each element's
    bits are its own: exact subtraction and product, exp the same anywhere), as each member's own
    backward gives it alone."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, result: Tensor, dims: tuple[int, ...], keepdim: bool) -> Tensor:
        ctx.save_for_backward(x, result)
        ctx.dims, ctx.keepdim = dims, keepdim
        return result

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        x, result = ctx.saved_tensors
        if not ctx.keepdim:
            for dim in sorted(ctx.dims):
                grad, result = grad.unsqueeze(dim), result.unsqueeze(dim)
        return grad * (x - result).exp(), None, None, None


class _BroadcastAsAlone(torch.autograd.Function):
    """x expanded to `shape` (a view, as a broadcast's operand is); the backward sums the gradient over
    the broadcast axes (at::sum_to, as autograd does alone) member by member along x's `axis` (the
    members' samples), each member's block laid out as alone (`_as_alone`), where that sum reduces
    outside the samples in memory, once otherwise."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, shape: torch.Size, axis: int, members: int) -> Tensor:
        ctx.shape, ctx.axis, ctx.members = x.shape, axis, members
        return x.expand(shape)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        shape, members = ctx.shape, ctx.members
        lead = grad.dim() - len(shape)
        axis = lead + ctx.axis
        summed = [*range(lead), *(d for d in range(lead, grad.dim())
                                  if shape[d - lead] == 1 and grad.shape[d] != 1)]
        if not _sums_outside(grad, axis, summed):
            return grad.sum_to_size(shape), None, None, None
        each = grad.shape[axis] // members
        own = list(shape)
        own[ctx.axis] = each
        return torch.cat([_as_alone(grad.narrow(axis, g * each, each), axis, members).sum_to_size(own)
                          for g in range(members)], ctx.axis), None, None, None


def _samples_outermost(t: Tensor, axis: int) -> bool:
    """Whether t's samples (along `axis`) are its outermost axis in memory, so that each member's block
    of it is laid out as alone and a call over t sums each sample's terms as over the member's alone
    (measured for INNER_SUM_FUNCTIONS: none of 30 member blocks differed)."""
    step = t.stride(axis)
    return all(t.shape[d] <= 1 or t.stride(d) < step for d in range(t.dim()) if d != axis)


def _own_part(t: Tensor, axis: int, part: int, parts: int) -> Tensor:
    """Member `part`'s block of t (of `parts` equal blocks along `axis`) laid out as alone; t itself
    where it is one part."""
    if parts == 1:
        return t
    each = t.shape[axis] // parts
    return _as_alone(t.narrow(axis, part * each, each), axis, parts)


def _fresh(t: Tensor) -> Tensor:
    """t, or a copy of it in its layout where it is a view: autograd forbids modifying a custom
    Function's view output in place, as the caller may."""
    return t if t._base is None else t.clone(memory_format=torch.preserve_format)


def _dims_of(value: Any) -> tuple[int, ...] | None:
    """A dim argument as a tuple of ints (None: none given, a bool, or not ints)."""
    dims = (value,) if isinstance(value, int) else tuple(value) if isinstance(value, list | tuple) else None
    if dims is None or any(isinstance(d, bool) or not isinstance(d, int) for d in dims):
        return None
    return dims


def _output_axis(func: Any, x: Tensor, axis: int, args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> int | None:
    """The axis of the result of one of INNER_SUM_FUNCTIONS over x that holds the samples x holds along
    `axis` (None: the call reduces or flattens across them, or its arguments are not the plain kinds
    read here: such a call runs as it is)."""
    if func in (torch.var, Tensor.var, torch.std, Tensor.std, torch.var_mean, torch.std_mean):
        dims = _dims_of(args[1] if len(args) > 1 else kwargs.get("dim"))
        if not dims:
            return None
        reduced = {d % x.dim() for d in dims}
        keepdim = args[3] if len(args) > 3 else kwargs.get("keepdim", False)
        return None if axis in reduced else axis if keepdim else axis - sum(d < axis for d in reduced)
    if func in (F.normalize, F.cosine_similarity):
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 1)
        if not isinstance(dim, int) or dim % x.dim() == axis:
            return None
        return axis if func is F.normalize or dim % x.dim() > axis else axis - 1
    if func is einsum_of_one:
        equation = args[1] if len(args) > 1 else kwargs.get("equation")
        if not isinstance(equation, str) or equation.count("->") != 1 or "." in equation:
            return None
        letters, kept = (side.replace(" ", "") for side in equation.split("->"))
        if len(letters) != x.dim() or len(set(letters)) != len(letters) or letters[axis] not in kept:
            return None
        return kept.index(letters[axis])
    if func is F.instance_norm:  # (statistics of each sample and channel; running ones mix the samples)
        names = ("running_mean", "running_var", "weight", "bias")
        others = (*args[1:5], *(kwargs.get(name) for name in names))
        return None if any(t is not None for t in others) else axis
    if func is F.rms_norm:
        shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
        count = 1 if isinstance(shape, int) else len(shape) if isinstance(shape, list | tuple) else x.dim()
        return axis if axis < x.dim() - count else None
    if func is Tensor.repeat:
        sizes = _dims_of(args[1] if len(args) == 2 else list(args[1:]) or kwargs.get("repeats"))
        return None if sizes is None or len(sizes) < x.dim() else axis + len(sizes) - x.dim()
    if func in (torch.tile, Tensor.tile):
        sizes = _dims_of(args[1] if len(args) == 2 else list(args[1:]) or kwargs.get("dims"))
        return None if sizes is None else axis + max(0, len(sizes) - x.dim())
    dim = args[2] if len(args) > 2 else kwargs.get("dim")  # repeat_interleave: flattened without a dim
    return axis if isinstance(dim, int) or axis == 0 else None


def _member_graphs(call: Callable[..., Any], tensors: Sequence[Tensor], wanted: Sequence[int], axis: int,
                   parts: int) -> tuple[list[list[Tensor]], list[tuple[Tensor, ...]]]:
    """`call` on each of `parts` members' blocks of `tensors` (along `axis`), laid out as alone, with
    its autograd graph: per part, its leaves (tracked: those of `wanted`) and its outputs."""
    leaves, outputs = [], []
    with torch.enable_grad():
        for part in range(parts):
            own = [_own_part(t, axis, part, parts).detach().requires_grad_(i in wanted)
                   for i, t in enumerate(tensors)]
            values = call(*own)
            leaves.append(own)
            outputs.append(values if isinstance(values, tuple) else (values,))
    return leaves, outputs


def _edges_into(outputs: Sequence[Tensor], leaf: Tensor) -> list[tuple[Any, int]]:
    """The edges of the graph behind `outputs` into `leaf` (a node and its input's index), in the order
    autograd's engine adds their gradients into the leaf's: by the node's sequence number, latest
    first (on one device the engine runs the ready node created last first), then by index."""
    found, seen = [], set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for index, (following, _) in enumerate(node.next_functions):
            if following is None:
                continue
            if getattr(following, "variable", None) is leaf:
                found.append((node, index))
            else:
                stack.append(following)
    return sorted(found, key=lambda edge: (-edge[0]._sequence_nr(), edge[1]))


def _call_on(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], keys: Sequence[int | str]
             ) -> Callable[..., Any]:
    """func(*args, **kwargs) as a function of the tensors at `keys` (positions or names)."""
    def call(*own: Tensor) -> Any:
        own_args, own_kwargs = list(args), dict(kwargs)
        for key, t in zip(keys, own, strict=True):
            if isinstance(key, str):
                own_kwargs[key] = t
            else:
                own_args[key] = t
        return func(*own_args, **own_kwargs)
    call.__name__ = getattr(func, "__name__", "a function")
    return call


def a_term_per_use(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                   reads: Callable[[Tensor, int], list[Tensor]]) -> Any:
    """func(*args, **kwargs), one of INNER_SUM_FUNCTIONS called by a user's layer run member by member
    on one member's tensors, where its graph uses a tracked tensor more than once (rms_norm and
    cosine_similarity are C++ composites): through `_OwnBackwards`, each use's gradient reaching its
    own read of the tensor (`reads(t, uses)`: `uses` reads, the one whose gradient is added first
    alone first), not their sum, so that the member's input adds them and its other uses' terms in
    alone's order. NotImplemented where no tensor is used more than once (the call as it is)."""
    arguments: list[tuple[int | str, Any]] = [*enumerate(args), *kwargs.items()]
    named = [(key, a) for key, a in arguments if isinstance(a, Tensor)]
    tensors = [a for _, a in named]
    wanted = [i for i, t in enumerate(tensors) if t.requires_grad]
    if not wanted:
        return NotImplemented
    call = _call_on(func, args, kwargs, [key for key, _ in named])
    graphs = _member_graphs(call, tensors, wanted, 0, 1)
    edges = tuple(max(1, len(_edges_into(graphs[1][0], leaf))) if i in wanted else 1
                  for i, leaf in enumerate(graphs[0][0]))
    if all(count == 1 for count in edges):
        return NotImplemented
    repeated = [read for t, count in zip(tensors, edges, strict=True) for read in reads(t, count)]
    return _OwnBackwards.apply(call, 0, 0, 1, False, graphs, edges, *repeated)


def _keeper(held: list[Tensor | None], term: int, index: int) -> Callable[..., None]:
    """A node's hook that keeps the gradient it hands its input `index` as `held[term]`."""
    def keep(inputs: Sequence[Tensor | None], _: Any) -> None:
        held[term] = inputs[index]
    return keep


class _OwnBackwards(torch.autograd.Function):
    """A function of the members' tensors (`call`, one of INNER_SUM_FUNCTIONS with its other arguments)
    whose values are those of `graphs` (each member's own call, from `_member_graphs`, or the group's
    call where `whole`: every input with its samples outermost in memory), joined as alone
    (`cat_as_alone`), and whose backward runs each member's own backward, with its block of the output's
    gradient laid out as alone (one torch.autograd.grad over the members' graphs, built again from the
    saved inputs: kept from the forward, they held the members' outputs and inputs laid out as alone
    beside the group's, 6.0x one trial's memory in a group of 4): torch sums inside it, where no mode
    sees it. Where `whole`, the backward runs once over the group's graph when the output's gradient
    has its samples outermost too (each sample's terms summed as alone). Each input comes `edges`
    times, once for each edge of the function's graph into it (F.normalize divides its input by its
    own norm: two): each edge's gradient is handed on as its own term, in the order the engine adds
    them alone, so that the input's other uses add theirs before or after them as alone, not to their
    sum."""

    @staticmethod
    def forward(ctx: Any, call: Callable[..., Any], axis: int, out_axis: int, members: int, whole: bool,
                graphs: tuple[list[list[Tensor]], list[tuple[Tensor, ...]]], edges: tuple[int, ...],
                *tensors: Tensor) -> Any:
        ctx.call, ctx.axis, ctx.out_axis, ctx.members, ctx.whole = call, axis, out_axis, members, whole
        ctx.edges = edges
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tensors)
        outputs = graphs[1]
        joined = tuple(_fresh(cat_as_alone([own[k] for own in outputs], out_axis))
                       for k in range(len(outputs[0])))
        return joined if len(joined) > 1 else joined[0]

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        axis, out_axis, members, edges = ctx.axis, ctx.out_axis, ctx.members, ctx.edges
        firsts = [sum(edges[:i]) for i in range(len(edges))]
        wanted = [i for i, first in enumerate(firsts) if ctx.needs_input_grad[7 + first]]
        given = [(k, g) for k, g in enumerate(grads) if g is not None]
        result: list[Tensor | None] = [None] * sum(edges)
        if not wanted or not given:
            return (None,) * 7 + (*result,)
        parts = 1 if ctx.whole and all(_samples_outermost(g, out_axis) for _, g in given) else members
        tensors = [ctx.saved_tensors[first] for first in firsts]
        leaves, outputs = _member_graphs(ctx.call, tensors, wanted, axis, parts)
        terms: dict[tuple[int, int], list[Tensor | None]] = {}
        hooks = []
        for part in range(parts):
            for i in wanted:
                found = _edges_into(outputs[part], leaves[part][i]) if edges[i] > 1 else []
                terms[part, i] = [None] * edges[i]
                for term, (node, index) in enumerate(found[:edges[i]]):
                    hooks.append(node.register_hook(_keeper(terms[part, i], term, index)))
        try:
            found_gradients = torch.autograd.grad(
                [own[k] for own in outputs for k, _ in given], [own[i] for own in leaves for i in wanted],
                [_own_part(g, out_axis, part, parts) for part in range(parts) for _, g in given],
                retain_graph=True, allow_unused=True, materialize_grads=True)
        finally:
            for hook in hooks:
                hook.remove()
        for j, i in enumerate(wanted):
            if edges[i] > 1 and all(term is not None for part in range(parts) for term in terms[part, i]):
                for term in range(edges[i]):
                    result[firsts[i] + term] = cat_as_alone(
                        [cast(Tensor, terms[part, i][term]) for part in range(parts)], axis)
            else:
                if edges[i] > 1:  # (every edge's node lies on the output's one path: not seen to happen)
                    warnings.warn(
                        f"MemberKernelMode: {getattr(ctx.call, '__name__', 'a function')}'s gradient terms "
                        f"for its input {i} did not all come; their sum is handed on, which a later use of "
                        f"the input may add in another order than alone (its last bits may differ)",
                        SummedTermsWarning, stacklevel=2)
                result[firsts[i]] = cat_as_alone(
                    [found_gradients[part * len(wanted) + j] for part in range(parts)], axis)
        return (None,) * 7 + (*result,)


class MemberKernelMode(RecomputedMode):
    """Runs a stacked network's POSITION_DEPENDENT_FUNCTIONS on a folded batch (member g's samples
    are rows g*B to (g+1)*B-1, or columns of a sequence-first layout: `_axis`) member by
    member, each on its own samples laid out as alone, so each member gets its bits alone, and so
    LAYOUT_DEPENDENT_REDUCTIONS over an axis outside the samples in memory, the gradient's sum of
    an operand that BROADCASTING_FUNCTIONS or EXPANDING_FUNCTIONS broadcast along such an axis
    (`_BroadcastAsAlone`), and INNER_SUM_FUNCTIONS, forward and backward (`_OwnBackwards`); every
    other call runs as it is. `rows` is a member's batch B of the
    current forward (None: the members' blocks are the first axis's). `seen` tells whether the
    forward called any of them.

    Each tensor a call returns gets its `Placement`, followed from its operands' (`_follow`) from the
    group's input (`place`) on: a tensor whose placement is known is split along the axis that
    holds each member's block, whatever its shape; only one the forward did not follow (made
    from no placed tensor, or by a call the rules do not describe) is read by its shape
    (`_member_axis`)."""

    def __init__(self, members: int, rows: int | None = None) -> None:
        super().__init__()
        self.members = members
        self.rows = rows
        self.seen = False
        self.lost: str | None = None
        """What interleaved the members' samples in this forward where their placement was not
        followed on (`_members_interleaved`; a folded tensor's result that `_follow` could not
        place): a split after it raises MemberAxisLost."""
        self.unplaced: str | None = None
        """Why the tensor `_axis` read last has no axis holding each member's block (its
        `Placement.why`): a split of it raises MemberAxisLost."""
        self.forward = object()
        """This forward's token (`Placement.forward`): `begin` starts another."""
        self.placements: dict[tuple[int, str | None], Placement] = {}
        """This forward's placements by unit and why (`_placement`)."""
        self.read: str | None = None
        """The first of VALUE_READS of a floating-point or bool tensor (a comparison of floating-point
        values) in this forward, outside our own layers
        (a user's layer run member by member reads its member's own): a number that holds the whole
        group's values, as a running statistic kept in a Python attribute would
        (`StackedModel._shared_state_guarded`)."""

    def begin(self) -> None:
        """A new forward of the group: the placements and reads of the last are forgotten."""
        self.forward = object()
        self.placements.clear()
        self.lost = self.read = None

    def place(self, x: Tensor, axis: int = 0) -> None:
        """Record that x holds the group's members' samples along `axis`, member-major (the group's
        folded input: along its first)."""
        unit = _unit_at(x.shape, axis, self.members)
        if unit:
            setattr(x, PLACEMENT, self._placement(unit, None))

    def _placement(self, unit: int, why: str | None) -> Placement:
        """This forward's Placement of `unit` and `why` (one object for each: a forward's tensors share
        a few)."""
        key = unit, why
        placement = self.placements.get(key)
        if placement is None or placement.forward is not self.forward:
            placement = self.placements[key] = Placement(self.forward, unit, why)
        return placement

    def placement(self, x: Tensor) -> Placement | None:
        """x's placement followed in this forward (None: not followed)."""
        placement: Placement | None = getattr(x, PLACEMENT, None)
        return placement if placement is not None and placement.forward is self.forward else None

    def recompute_state(self) -> Callable[[], contextlib.AbstractContextManager[None]]:
        """A checkpointed block recomputed in the backward splits its calls by the rows of its forward,
        and reads the placements of that forward's tensors."""
        rows, forward = self.rows, self.forward

        @contextlib.contextmanager
        def as_then() -> Iterator[None]:
            previous = self.rows, self.forward
            self.rows, self.forward = rows, forward
            try:
                yield
            finally:
                self.rows, self.forward = previous

        return as_then

    def _axis(self, x: Tensor) -> tuple[int | None, bool]:
        """The axis of x that holds the members' samples, member-major, and whether it was followed:
        its `Placement`'s where that has one; else `_member_axis`'s reading of its shape (which may
        raise MemberAxisLost), and for a placed tensor with no such axis (a sequence-first layout
        folded into rows) `unplaced` says why, so that a split of it raises."""
        self.unplaced = None
        placement = self.placement(x)
        if placement is not None:
            axis = _placed_axis(x.shape, placement.unit, self.members)
            if axis is not None:
                return axis, True
            self.unplaced = placement.why or (
                f"a {tuple(x.shape)} tensor holds the group's {self.members} members' samples in blocks "
                f"of {placement.unit} elements that no axis holds whole")
        return _member_axis(x, self.members, self.rows), False

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = self._call(func, args, kwargs)
        if isinstance(out, Tensor) or (isinstance(out, tuple | list) and not isinstance(out, torch.Size)):
            if torch._C._len_torch_function_stack():  # (the modes below would see its shape reads)
                with torch._C.DisableTorchFunction():
                    self._follow_outputs(func, args, kwargs, out)
            else:
                self._follow_outputs(func, args, kwargs, out)
        return out

    def _follow_outputs(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """`_follow` each tensor func(*args, **kwargs) returned (`out`, or in a tuple or list)."""
        if isinstance(out, Tensor):
            self._follow(func, args, kwargs, out)
            return
        for item in out:
            if isinstance(item, Tensor):
                self._follow(func, args, kwargs, item)

    def _follow(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Tensor) -> None:
        """Give `out`, a result of func(*args, **kwargs), its placement from its operands' placements:
        a reshape keeps the order of elements (the unit), a permutation moves the axis, an einsum maps
        its letters, any other call goes by shape (`_through_shape`), its placed operands agreeing.
        Where a placed operand with no axis holding each member's block reaches a result left
        unplaced, `lost` keeps why (a later split raises MemberAxisLost, as it would on it)."""
        if kwargs:
            args, kwargs = positional_input(args, kwargs)
        members, forward = self.members, self.forward
        tensors: list[Tensor] = []
        for a in (*args, *(v for name, v in kwargs.items() if name != "out")) if kwargs else args:
            if isinstance(a, Tensor):
                tensors.append(a)
            elif isinstance(a, list | tuple):
                tensors += [t for t in a if isinstance(t, Tensor)]
        placed = [(i, t, p) for i, t in enumerate(tensors)
                  if (p := getattr(t, PLACEMENT, None)) is not None and p.forward is forward]
        rule = FOLLOWING_RULES.get(func)
        if not placed:
            if rule == "reshape" and tensors and tensors[0] is not out:
                self.lost = self.lost or _members_interleaved(tensors[0], out, members, self.rows)
            return
        if rule is None and len(placed) == 1 and placed[0][1].shape == out.shape:
            setattr(out, PLACEMENT, placed[0][2])  # (the common case: an elementwise call)
            return
        unit: int | None = None
        why: str | None = None
        first = placed[0][1] if placed[0][0] == 0 else None
        if rule == "unplaceable":
            pass
        elif rule == "reshape":
            if first is not None and out.numel() == first.numel():
                unit, why = placed[0][2].unit, placed[0][2].why
                if why is None and _placed_axis(out.shape, unit, members) is None:
                    why = (f"a {tuple(first.shape)} tensor holding the group's {members} x {self.rows} "
                           f"samples was reshaped to {tuple(out.shape)}, which interleaves the members' "
                           f"samples with its axes before or cuts rows across two members: no axis holds "
                           f"each member's own block")
        elif rule == "permute":
            order = None if first is None else _permutation(func, args, kwargs, out.dim())
            if order is not None:
                source = [0] * len(order)
                for i, d in enumerate(order):
                    source[d] = out.shape[i]
                axis = _placed_axis(source, placed[0][2].unit, members)
                unit = None if axis is None else _unit_at(out.shape, order.index(axis), members)
        elif rule == "einsum":
            unit = _einsum_unit(args, placed, out, members)
        elif rule == "drop" and first is not None and out.dim() < first.dim():
            axis = _placed_axis(first.shape, placed[0][2].unit, members)
            kept = None if axis is None else _kept_axis(func, args, kwargs, axis, first.dim())
            unit = None if kept is None else _unit_at(out.shape, kept, members)
        else:
            shape = out.shape
            units = {_through_shape(p.unit, t.shape, shape, members) for _, t, p in placed}
            units.discard(None)
            unit = units.pop() if len(units) == 1 else None
            why = next((p.why for _, _, p in placed if p.why is not None), None)
        if unit:
            setattr(out, PLACEMENT, self._placement(unit, why))
            return
        if getattr(out, PLACEMENT, None) is not None:  # (in place: its old placement no longer holds)
            delattr(out, PLACEMENT)
        folded = next((t for _, t, p in placed if _placed_axis(t.shape, p.unit, members) is None), None)
        if folded is not None and self.lost is None:
            self.lost = cast(Placement, self.placement(folded)).why or (
                f"a {tuple(folded.shape)} tensor holding the group's members' samples where no axis holds "
                f"each member's block went through {torch.overrides.resolve_name(func) or func}")

    def follow_layer(self, args: tuple[Any, ...], output: Any) -> None:
        """Place the outputs of one of our own layers (which take the members' samples on the first axis
        of their first input and give them on the first axis of their outputs): an output of its
        input's shape as the input, one of its first axis's size on that axis."""
        x = next((a for a in args if isinstance(a, Tensor)), None)
        placement = None if x is None else self.placement(x)
        if placement is None or x is None:
            return
        axis = _placed_axis(x.shape, placement.unit, self.members)
        for out in output if isinstance(output, tuple | list) else (output,):
            if not isinstance(out, Tensor):
                continue
            if out.shape == x.shape:
                setattr(out, PLACEMENT, placement)
            elif axis == 0 and out.dim() and out.shape[0] == x.shape[0]:
                setattr(out, PLACEMENT, self._placement(out.numel() // self.members, None))
            elif axis is None and self.lost is None:
                self.lost = placement.why

    def _call(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """func(*args, **kwargs), run member by member where the call needs it (the class's text)."""
        if func in LAYOUT_DEPENDENT_REDUCTIONS:
            return self._reduction(func, *positional_input(args, kwargs))
        if func is torch.einsum and len(args) == 2 and isinstance(args[1], Tensor) and not kwargs:
            func, args = einsum_of_one, (args[1], args[0])
        if func in INNER_SUM_FUNCTIONS:
            return self._own_backwards(func, *positional_input(args, kwargs))
        if func in BROADCASTING_FUNCTIONS and torch.is_grad_enabled():
            return self._broadcast(func, args, kwargs)
        if func in EXPANDING_FUNCTIONS and torch.is_grad_enabled():
            expanded = func(*args, **kwargs)
            return self._broadcast_as_alone(args[0], expanded.shape, expanded)
        if func not in POSITION_DEPENDENT_FUNCTIONS:
            if (func in VALUE_READS and self.read is None and args and isinstance(args[0], Tensor)
                    and (args[0].is_floating_point() or args[0].dtype == torch.bool)):
                self.read = (f"{torch.overrides.resolve_name(func) or func} of a {tuple(args[0].shape)} "
                             f"{args[0].dtype} tensor")
            return func(*args, **kwargs)
        args, kwargs = positional_input(args, kwargs)
        folded = next((a for a in args if isinstance(a, Tensor)), None)
        members = self.members
        if (folded is None or not folded.is_floating_point() or folded.device.type != "cpu"
                or _exact_gelu(func, folded, args, kwargs)):
            return func(*args, **kwargs)
        axis, _ = self._axis(folded)
        if axis is None:
            return func(*args, **kwargs)
        self._splits()
        size = folded.shape[axis]
        each = size // members

        def call(block: int, own_copy: bool = False) -> Any:
            def own(a: Any) -> Any:
                if not isinstance(a, Tensor) or a.dim() <= axis or a.shape[axis] != size:
                    return a
                part = a.narrow(axis, block * each, each)
                if own_copy and a is folded:
                    part = part.clone()
                return _as_alone(part, axis, members) if a.shape == folded.shape else part

            return func(*[own(a) for a in args], **{name: own(a) for name, a in kwargs.items()})

        if kwargs.get("inplace") or func in IN_PLACE_FUNCTIONS:
            # each member's samples in place on a copy of their own, as alone, then written back at
            # once: writing into the folded tensor's views one by one changes a tensor pow_'s backward
            return folded.copy_(torch.cat([call(block, own_copy=True) for block in range(members)], axis))
        if axis == 0 and whole_is_as_alone(folded, members):
            return func(*args, **kwargs)
        outputs = [call(block) for block in range(members)]
        return cat_as_alone([_GradAsAlone.apply(y, axis, members) if y.requires_grad else y for y in outputs],
                            axis)

    def _splits(self) -> None:
        """A call this mode runs member by member: where the tensor it splits has no axis holding each
        member's block (`unplaced`), or the forward interleaved the members' samples before it where
        their placement was not followed (`lost`), that tensor's members may be split wrongly, so the
        group cannot go on."""
        self.seen = True
        if self.unplaced is not None:
            raise MemberAxisLost(self.unplaced)
        if self.lost is not None:
            raise MemberAxisLost(self.lost)

    def _broadcast_as_alone(self, x: Any, shape: torch.Size, otherwise: Any) -> Any:
        """x broadcast to `shape` through `_BroadcastAsAlone` where x is a tracked floating-point tensor
        with the members' samples on an axis (`_member_axis`: a multiple of the group's folded batch,
        as the first axis, or the folded batch, as a sequence-first layout's second) that the call
        keeps, broadcast along another; `otherwise` else."""
        if (not isinstance(x, Tensor) or not x.requires_grad or x.shape == shape or x.dim() == 0
                or not x.is_floating_point() or x.device.type != "cpu" or x.dim() > len(shape)):
            return otherwise
        axis, placed = self._axis(x)
        if (axis is None or x.shape[axis] % (self.members * (1 if placed else self.rows or 1))
                or x.shape[axis] != shape[len(shape) - x.dim() + axis]):
            return otherwise
        self._splits()
        return _BroadcastAsAlone.apply(x, shape, axis, self.members)

    def _broadcast(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """One of BROADCASTING_FUNCTIONS: each operand with the members' samples on its first axis that
        the call broadcasts along another axis expanded through `_BroadcastAsAlone` (its gradient summed
        member by member as alone); the call as it is where no operand needs it."""
        operands = [t for name, t in (*enumerate(args), *kwargs.items())
                    if isinstance(t, Tensor) and name != "out"]
        if len(operands) < 2 or all(t.shape == operands[0].shape for t in operands):
            return func(*args, **kwargs)
        try:
            shape = torch.broadcast_shapes(*(t.shape for t in operands))
        except RuntimeError:  # (torch's own call says what is wrong)
            return func(*args, **kwargs)
        args = tuple(self._broadcast_as_alone(a, shape, a) for a in args)
        kwargs = {name: a if name == "out" else self._broadcast_as_alone(a, shape, a)
                  for name, a in kwargs.items()}
        return func(*args, **kwargs)

    def _reduction(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """One of LAYOUT_DEPENDENT_REDUCTIONS: member by member, each member's samples laid out as
        alone (`_as_alone`), where it keeps the axis holding the members' samples (`_member_axis`: the
        first of a batch-first tensor, the second of a channel-first (C, G*B) or sequence-first
        (L, G*B, E) one) and reduces an axis outside it in memory; as it is otherwise (each sample's
        reduction its own, or none holds the samples)."""
        x = args[0] if args and isinstance(args[0], Tensor) else None
        out = kwargs.get("out")
        tracked = x is not None and torch.is_grad_enabled() and x.requires_grad
        if (x is None or not x.is_floating_point() or x.device.type != "cpu"
                or (out is not None and tracked)):  # (torch refuses out= under autograd: as alone)
            return func(*args, **kwargs)
        reduced = _reduced_dims(x, args, kwargs)
        axis = self._axis(x)[0] if reduced and _may_sum_outside(x, reduced) else None
        if axis is None or not _sums_outside(x, axis, reduced):
            return func(*args, **kwargs)
        self._splits()
        each = x.shape[axis] // self.members
        keepdim = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
        joined = axis if keepdim else axis - sum(d < axis for d in reduced)
        own = {name: value for name, value in kwargs.items() if name != "out"}
        with torch.no_grad():
            values = [func(_as_alone(x.narrow(axis, g * each, each), axis, self.members), *args[1:], **own)
                      for g in range(self.members)]
        if not tracked:
            return torch.cat(values, joined, out=out)
        if func in RESULT_GRADIENT_REDUCTIONS:
            return _LogSumExpOf.apply(x, torch.cat(values, joined), reduced, keepdim)
        return _ValuesOf.apply(func(*args, **kwargs), joined, *values)


    def _own_backwards(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """One of INNER_SUM_FUNCTIONS, member by member on each member's tensors (those with the members'
        samples along the axis x, the first, holds them on: `_member_axis`), forward and backward
        (`_OwnBackwards`), where a tensor's samples are not its outermost axis in memory or a gradient
        is tracked; as it is otherwise, and where a tensor shared by the members (a weight) is tracked."""
        x = args[0] if args and isinstance(args[0], Tensor) else None
        if x is None or not x.is_floating_point() or x.device.type != "cpu" or kwargs.get("out") is not None:
            return func(*args, **kwargs)
        members = self.members
        axis, _ = self._axis(x)
        size = 0 if axis is None else x.shape[axis]
        out_axis = None if axis is None or size % members else _output_axis(func, x, axis, args, kwargs)
        if axis is None or out_axis is None:
            return func(*args, **kwargs)
        named: list[tuple[int | str, Any]] = [*enumerate(args), *kwargs.items()]
        keys = [key for key, a in named if isinstance(a, Tensor) and a.dim() > axis and a.shape[axis] == size]
        tensors = [a for key, a in named if key in keys]
        grad = torch.is_grad_enabled()
        if grad and any(isinstance(a, Tensor) and a.requires_grad and key not in keys for key, a in named):
            return func(*args, **kwargs)
        tracked = grad and any(t.requires_grad for t in tensors)
        whole = all(_samples_outermost(t, axis) for t in tensors)
        if whole and (not tracked or func in INPUT_LAYOUT_SUMS):
            return func(*args, **kwargs)
        self._splits()
        call = _call_on(func, args, kwargs, keys)
        if tracked:
            wanted = [i for i, t in enumerate(tensors) if t.requires_grad]
            graphs = _member_graphs(call, tensors, wanted, axis, 1 if whole else members)
            edges = tuple(max(1, len(_edges_into(graphs[1][0], leaf))) if i in wanted else 1
                          for i, leaf in enumerate(graphs[0][0]))
            repeated = [t for t, count in zip(tensors, edges, strict=True) for _ in range(count)]
            return _OwnBackwards.apply(call, axis, out_axis, members, whole, graphs, edges, *repeated)
        parts: list[Tensor] = []
        with torch.no_grad():
            for g in range(members):
                values = call(*(_own_part(t, axis, g, members) for t in tensors))
                parts += values if isinstance(values, tuple) else [values]
        count = len(parts) // members
        joined = tuple(cat_as_alone(parts[k::count], out_axis) for k in range(count))
        return joined if count > 1 else joined[0]


class UnsplitCalls(TorchFunctionMode):
    """Records the POSITION_DEPENDENT_FUNCTIONS called on a group's tensors (`_member_axis` finds
    the members' samples in them) that no MemberKernelMode runs member by member, as in a backward,
    where our modes are off the stack unless a recomputation puts them back (dse/train/recompute.py).
    A member mode above this one hands it each member's own block, which has no member axis where a
    member's batch `rows` is no multiple of `members` and no other axis a multiple of the group's
    folded batch (where one is, the call counts: the group trains one by one, as alone)."""

    def __init__(self, members: int, rows: int) -> None:
        super().__init__()
        self.members = members
        self.rows = rows
        self.calls: dict[str, None] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in POSITION_DEPENDENT_FUNCTIONS:
            x = next((a for a in positional_input(args, kwargs)[0] if isinstance(a, Tensor)), None)
            if (x is not None and x.is_floating_point() and x.device.type == "cpu"
                    and not _exact_gelu(func, x, args, kwargs)
                    and _has_member_axis(x, self.members, self.rows)):
                self.calls.setdefault(torch.overrides.resolve_name(func) or repr(func))
        return func(*args, **kwargs)


@contextlib.contextmanager
def modes_paused(pause: Callable[[Any], bool]) -> Iterator[None]:
    """Run the block with the active torch-function modes for which `pause` is true taken off the
    mode stack (the others stay, in their order); they are put back after it."""
    stack = function_modes()
    first = next((i for i, mode in enumerate(stack) if pause(mode)), None)
    if first is None:
        yield
        return
    above = stack[first:]
    kept = [mode for mode in above if not pause(mode)]
    for _ in above:
        torch._C._pop_torch_function_stack()
    for mode in kept:
        torch._C._push_on_torch_function_stack(mode)
    try:
        yield
    finally:
        for _ in kept:
            torch._C._pop_torch_function_stack()
        for mode in above:
            torch._C._push_on_torch_function_stack(mode)


def _is_member_mode(mode: Any) -> bool:
    return isinstance(mode, MemberKernelMode)


def _is_own_mode(mode: Any) -> bool:
    return type(mode).__module__.startswith(OWN_PACKAGE)


class MemberKernels:
    """`MemberKernelMode` over every forward of a stacked network `net` whose modules may call one of
    POSITION_DEPENDENT_FUNCTIONS (`may_call_position_dependent`), entered by a hook on `net` (on top
    of the other modes: dse's functional-GEMM mode, entered by its own earlier hook, then sees only
    the calls the member mode hands on). It is taken off inside our own layers, which call none of
    them: a torch call there then costs no Python handler, and a layer that runs member by member
    (`PerMemberLayer`: the user's layer, each member's own call) is not split again. Inside the
    layers of `gemm_layers` (stacked GEMMs: quantizers and GEMMs only) every mode of ours is taken
    off, the functional-GEMM mode too, which hands those calls on as they are."""

    def __init__(self, net: nn.Module, members: int, gemm_layers: tuple[type[nn.Module], ...] = ()) -> None:
        self.mode = MemberKernelMode(members)
        self.members = members
        self.gemm_layers = gemm_layers
        self.paused: list[contextlib.AbstractContextManager[None]] = []
        self.entered: list[tuple[bool, int | None]] = []
        """Per forward of the net now running: whether it runs inside another (re-entered), and the
        rows of the forward it runs in."""
        self.handles = [net.register_forward_pre_hook(self._enter),
                        net.register_forward_hook(self._exit, prepend=True, always_call=True)]
        for module in net.modules():
            if module is not net and type(module).__module__.startswith(OWN_PACKAGE):
                self.handles += [module.register_forward_pre_hook(self._pause),
                                 module.register_forward_hook(self._resume, always_call=True)]
        follow_checkpoints()  # (a run checks this torch where it first checkpoints)

    def remove(self) -> None:
        """Take the hooks off: the net then runs without the mode (for comparison)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    @contextlib.contextmanager
    def interrupt_safe(self) -> Iterator[None]:
        """The block (a forward of the net) with the torch-function mode stack put back as it was
        before it where the block ends by an exception: nn.Module runs its always_call hooks on an
        Exception only, so a KeyboardInterrupt inside the forward left this mode on the process's
        stack, where every later call of one of the functions (a member alone, another run in the
        same process) was split into `members` blocks."""
        before = function_modes()
        try:
            yield
        except BaseException:
            while self.paused:  # closed first: their exits put modes back (as would their collection)
                self.paused.pop().__exit__(None, None, None)
            self.entered.clear()
            set_function_modes(before)
            raise

    def _enter(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Put the mode on the stack for the net's forward, splitting by the rows of its input; a net
        called inside its own forward (re-entered) keeps the one mode on the stack: a second copy of
        it would split each member's block again, into `members` blocks of its rows. The input's
        tensors of the folded batch's size hold the members' samples on their first axis (`place`)."""
        folded = next((a for a in args if isinstance(a, Tensor)), None)
        outer = self.mode in function_modes()
        self.entered.append((outer, self.mode.rows))
        self.mode.rows = None if folded is None or folded.dim() == 0 else folded.shape[0] // self.members
        if not outer:
            self.mode.begin()
        if self.mode.rows is not None and folded is not None:
            with torch._C.DisableTorchFunction():
                for x in args:
                    if (isinstance(x, Tensor) and x.dim() and x.shape[0] == folded.shape[0]
                            and self.mode.placement(x) is None):
                        self.mode.place(x)
        if not outer:
            torch._C._push_on_torch_function_stack(self.mode)

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        """Take the mode off the stack wherever it is (the modes above it stay, in their order), unless
        this forward ran inside another of the net (its rows are put back)."""
        nested, self.mode.rows = self.entered.pop() if self.entered else (False, self.mode.rows)
        if nested:
            return
        stack = function_modes()
        if self.mode in stack:
            index = stack.index(self.mode)
            set_function_modes(stack[:index] + stack[index + 1:])

    def _pause(self, module: nn.Module, args: Any) -> None:
        paused = modes_paused(_is_own_mode if isinstance(module, self.gemm_layers) else _is_member_mode)
        paused.__enter__()
        self.paused.append(paused)

    def _resume(self, module: nn.Module, args: Any, output: Any) -> None:
        with torch._C.DisableTorchFunction():  # (no mode needs to see its shape reads)
            self.mode.follow_layer(args, output)
        if self.paused:
            self.paused.pop().__exit__(None, None, None)


CALLS_NONE_TORCH_LAYERS: frozenset[type[nn.Module]] = frozenset({
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.ReLU, nn.Sequential, nn.ModuleList, nn.Flatten, nn.Identity,
    nn.LayerNorm, nn.Embedding, nn.MaxPool1d, nn.MaxPool2d, nn.BatchNorm1d, nn.BatchNorm2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
})
"""torch.nn layers whose forward calls none of POSITION_DEPENDENT_FUNCTIONS (those the built-in
proxies are made of); a subclass is not one of them."""

OWN_PACKAGE = "dse."
"""Where our modules are defined (dse.models' proxies, dse.train's layers; a user's file loads as
dse_user_...): they call none of them (tests/train/test_member_kernels.py runs every proxy under
the mode, in train and eval mode)."""


def may_call_position_dependent(net: nn.Module) -> bool:
    """Whether a forward of `net` may call one of POSITION_DEPENDENT_FUNCTIONS: unless every module
    in it is our own or one of CALLS_NONE_TORCH_LAYERS. Decided from the modules, not from a forward:
    a user's module may call one on any later forward only (in eval mode, for some inputs)."""
    return not all(type(module) in CALLS_NONE_TORCH_LAYERS or type(module).__module__.startswith(OWN_PACKAGE)
                   for module in net.modules())
