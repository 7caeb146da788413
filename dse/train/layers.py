"""Quantized GEMM layers: autograd functions that quantize both operands of all three GEMMs.

For a layer y = op(x, w) (+ bias in fp32) the three GEMMs of a training step see:

    forward          y  = op(Qa(x), Qw(w)) + b
    backward-data    dx = op_backward_data(Qe(dy), Qw(w))
    backward-weight  dw = Qwg(op_backward_weight(Qa(x), Qe(dy)))      db = sum(Qe(dy))

Each GEMM quantizes its operands along its own reduction axis, from the unquantized tensors, as
the OCP MX authors' library does (microsoft/microxcaling, mx/linear.py, mx/convolution.py,
mx/matmul.py): a block-scaled format (MX, NVFP4, `block(...)`) puts its blocks along that axis, so
a block-scaled tensor class is quantized once per GEMM that uses it (`GemmAxes` lists the axes;
forward x and w along the input features / channels, backward-data dy along the output features
/ channels and w along its output axis, backward-weight x and dy along the batch axis), and db
sums the unquantized dy. A tensor class without block scaling (per-tensor, per-channel or none)
gives the same values along any axis, so it is quantized once, in the GEMM that first uses it, and
the quantized tensor is reused (the forward's saved for the backward). Stochastic rounding draws
once per quantization, in this order: forward x, w; backward dy (once, or along the
backward-data axis), w (backward-data), x and dy (backward-weight); a GEMM not needed (no dx for
the first layer) draws nothing. A rounding that draws nothing (nearest) gives the same values in
any order, so there a block-scaled tensor's two quantizations run in one call that computes what
they share once (`BlockFormat.quantize_along`): x and w in the forward, where the backward's
copies are saved in place of x and w (as much memory), dy's two at the start of the backward.
The quantizers are straight-through: dx and dw go to x and w unchanged. The backward GEMMs are
written out (matmuls, `aten.convolution_backward`), not re-derived by autograd. An activation x activation
GEMM (attention's `q @ k^T`, `p @ v`) quantizes both operands as activations and has two
backward-data GEMMs, one per operand.

With an accumulator (`LayerQuant.accumulator`, from `policy.accumulation`) each of the three GEMMs
is instead folded chunk by chunk into a running sum rounded onto the accumulator format
(dse/train/accumulation.py); without one the GEMMs are the plain torch calls above.

`quantize_model` reaches a model's GEMMs two ways:
- modules: nn.Linear / nn.Conv1d / nn.Conv2d / `Matmul` change class, in place, to their quantized
  versions: the module objects stay, and so do their Parameter objects, so an optimizer created before
  or after still updates the same tensors;
- functions (dse/train/functional.py): the GEMMs a forward calls as functions (`F.linear`,
  `torch.matmul` / `@`, `torch.bmm`, `torch.mm`, `F.conv1d/2d`, `F.scaled_dot_product_attention`)
  and nn.MultiheadAttention's four (in- and out-projections, scores, context) run through the same
  autograd functions under a torch-function mode while the model's forward runs.
Each GEMM takes its formats from the policy's per-layer rules (dse/precision.py), by its name.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dse.formats.base import MemberGenerators, parse_rounding
from dse.models.layers import Matmul
from dse.precision import Layer, TensorFormats, full_precision_rules, resolve_layers
from dse.train import accumulation
from dse.train.accumulation import Accumulator
from dse.train.batched_sums import aligned_sums_as_members, bmm_sums_as_mm
from dse.train.policy import QuantPolicy, TensorQuant, with_scaling

Quantizer = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class GemmAxes:
    """The reduction axis of each operand in each of a layer type's three GEMMs (axes of one
    member's tensors; a stacked tensor's leading member axis is not counted)."""

    forward: tuple[int, int]
    """x, w."""
    backward_data: tuple[int, int]
    """dy, w."""
    backward_weight: tuple[int, int]
    """x, dy."""


LINEAR_AXES = GemmAxes(forward=(-1, -1), backward_data=(-1, 0), backward_weight=(-2, -2))
"""microxcaling's mx/linear.py: x (..., in) and w (out, in) along in; dy along out and w along its
axis 0 (out); x and dy along axis -2, the examples (a 3-d x: its sequence axis)."""
CONV_AXES = GemmAxes(forward=(1, 1), backward_data=(1, 0), backward_weight=(0, 0))
"""microxcaling's mx/convolution.py: x (N, C_in, ...) and w (C_out, C_in/groups, ...) along the input
channels; dy along the output channels and w along C_out; x and dy along the batch axis N."""


class BlockQuantizer:
    """A block-scaled tensor class's quantizer: `along(x, axis)` quantizes with the blocks along `axis`
    (a GEMM's reduction axis), `along_axes(x, axes)` along each of several axes in one call (what
    the quantizations share is computed once, `BlockFormat.quantize_along`); called plainly it
    quantizes along the format's own axis. With the layer's generator, or each member's
    (`members`: a stacked tensor, grouped training)."""

    def __init__(self, quant: TensorQuant, generator: torch.Generator | MemberGenerators | None = None,
                 members: bool = False, shape: torch.Size | None = None) -> None:
        assert quant.format is not None
        self.quant, self.format, self.generator, self.members = quant, quant.format, generator, members
        self.shape = shape
        """Where set, x is quantized as a tensor of this shape (its axes counted in it), then viewed back."""
        self.draws = parse_rounding(quant.rounding)[0] == "stochastic"
        """Whether a quantization draws from the generator (then the order of quantizations matters)."""

    def reshaped(self, shape: torch.Size) -> BlockQuantizer:
        """This quantizer on tensors seen as `shape` (a member weight that a matmul sees with singleton
        axes): each is quantized in that shape."""
        return BlockQuantizer(self.quant, self.generator, self.members, shape)

    def __call__(self, x: Tensor) -> Tensor:
        seen = x if self.shape is None else x.reshape(self.shape)
        if self.members:
            out = self.quant.members(seen, self.generator)
        else:
            out = self.quant(seen, cast("torch.Generator | None", self.generator))
        return out if self.shape is None else out.reshape(x.shape)

    def along(self, x: Tensor, axis: int) -> Tensor:
        return self.along_axes(x, (axis,))[0]

    def along_axes(self, x: Tensor, axes: Sequence[int]) -> list[Tensor]:
        """x quantized along each of `axes`, in that order (a stochastic rounding's draws too)."""
        if self.shape is not None:
            seen = x.reshape(self.shape)
            return [out.reshape(x.shape) for out in self._along_axes(seen, axes)]
        return self._along_axes(x, axes)

    def _along_axes(self, x: Tensor, axes: Sequence[int]) -> list[Tensor]:
        short = max((-axis for axis in axes if axis < 0), default=0) - x.dim()
        if short > 0:  # a 1-d Linear input: one example, blocks of one along it
            shaped = x.reshape((1,) * short + x.shape)
            return [out.reshape(x.shape) for out in self._along_axes(shaped, [
                axis + short if axis >= 0 else axis for axis in axes])]
        rounding = self.quant.rounding
        if self.members:
            return self.format.quantize_members_along(x, axes, rounding, self.generator)
        return self.format.quantize_along(x, axes, rounding, cast("torch.Generator | None", self.generator))


def is_block_scaled(quant: TensorQuant) -> bool:
    return quant.format is not None and quant.format.scaling.kind == "block"


def _blocked(quantizer: Quantizer | None) -> bool:
    return isinstance(quantizer, BlockQuantizer)


def _for_gemm(quantizer: Quantizer | None, x: Tensor, axis: int) -> Tensor:
    """x as one GEMM sees it: a block-scaled class along that GEMM's reduction axis `axis`."""
    if quantizer is None:
        return x
    if isinstance(quantizer, BlockQuantizer):
        return quantizer.along(x, axis)
    return quantizer(x)


def _for_gemms(quantizer: Quantizer | None, x: Tensor, axis: int, later_axis: int | None
               ) -> tuple[Tensor, Tensor | None]:
    """x as one GEMM sees it now (`_for_gemm` along `axis`) and as a later GEMM will (along
    `later_axis`; None: no later GEMM needs x) where that can be computed now, in the same call: a
    block-scaled class whose rounding draws nothing (the order of quantizations then changes no
    value); else (x quantized now, None), and the later GEMM quantizes x itself, in its turn."""
    if later_axis is None or not isinstance(quantizer, BlockQuantizer) or quantizer.draws:
        return _for_gemm(quantizer, x, axis), None
    now, later = quantizer.along_axes(x, (axis, later_axis))
    return now, later


# --- the GEMMs of each layer type ---------------------------------------------------------------


class LinearOp:
    """y = x w^T: x (..., in), w (out, in)."""

    @property
    def axes(self) -> GemmAxes:
        return LINEAR_AXES

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def backward(self, dy: Tensor, x: Tensor, weight: Tensor, need_data: bool,
                 need_weight: bool) -> tuple[Tensor | None, Tensor | None]:
        dx = dy @ weight if need_data else None
        dw = None
        if need_weight:
            dw = dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return dx, dw

    def bias_grad(self, dy: Tensor) -> Tensor:
        return dy.reshape(-1, dy.shape[-1]).sum(0)

    def forward_accumulated(self, x: Tensor, weight: Tensor, bias: Tensor | None,
                            accumulator: Accumulator) -> Tensor:
        y = accumulation.linear_forward(x, weight, accumulator)
        return y if bias is None else y + bias

    def backward_accumulated(self, dy: Tensor, x: Tensor, weight: Tensor, need_data: bool, need_weight: bool,
                             accumulator: Accumulator) -> tuple[Tensor | None, Tensor | None]:
        dx = accumulation.linear_backward_data(dy, weight, accumulator) if need_data else None
        dw = accumulation.linear_backward_weight(dy, x, accumulator) if need_weight else None
        return dx, dw


@dataclass(frozen=True)
class ConvOp:
    """N-d convolution with numeric padding (string padding and padding modes are applied before)."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    @property
    def axes(self) -> GemmAxes:
        return CONV_AXES

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return accumulation.convolution(x, weight, bias, self.stride, self.padding, self.dilation,
                                        self.groups)

    def backward(self, dy: Tensor, x: Tensor, weight: Tensor, need_data: bool,
                 need_weight: bool) -> tuple[Tensor | None, Tensor | None]:
        return accumulation.convolution_grads(dy, x, weight, self.stride, self.padding, self.dilation,
                                              self.groups, need_data, need_weight)

    def bias_grad(self, dy: Tensor) -> Tensor:
        return dy.sum(dim=[0, *range(2, dy.dim())])

    def forward_accumulated(self, x: Tensor, weight: Tensor, bias: Tensor | None,
                            accumulator: Accumulator) -> Tensor:
        y = accumulation.conv_forward(x, weight, self.stride, self.padding, self.dilation, self.groups,
                                      accumulator)
        return y if bias is None else y + bias.reshape(-1, *[1] * (y.dim() - 2))

    def backward_accumulated(self, dy: Tensor, x: Tensor, weight: Tensor, need_data: bool, need_weight: bool,
                             accumulator: Accumulator) -> tuple[Tensor | None, Tensor | None]:
        geometry = (self.stride, self.padding, self.dilation, self.groups, accumulator)
        dx = accumulation.conv_backward_data(dy, x, weight, *geometry) if need_data else None
        dw = accumulation.conv_backward_weight(dy, x, weight, *geometry) if need_weight else None
        return dx, dw


class QuantSwitch:
    """One on/off flag shared by a model's quantized layers and its optimizer (fp32 warm-up)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled


class GemmOp(Protocol):
    """The three GEMMs of a layer type (LinearOp, ConvOp, stacked.StackedLinearOp). An op used with
    an accumulator also has forward_accumulated/backward_accumulated, as LinearOp and ConvOp do."""

    @property
    def axes(self) -> GemmAxes: ...

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor: ...

    def backward(self, dy: Tensor, x: Tensor, weight: Tensor, need_data: bool,
                 need_weight: bool) -> tuple[Tensor | None, Tensor | None]: ...

    def bias_grad(self, dy: Tensor) -> Tensor: ...


class AccumulatingGemmOp(GemmOp, Protocol):
    """A GemmOp that also computes its GEMMs with an emulated accumulator (dse/train/accumulation.py)."""

    def forward_accumulated(self, x: Tensor, weight: Tensor, bias: Tensor | None,
                            accumulator: Accumulator) -> Tensor: ...

    def backward_accumulated(self, dy: Tensor, x: Tensor, weight: Tensor, need_data: bool, need_weight: bool,
                             accumulator: Accumulator) -> tuple[Tensor | None, Tensor | None]: ...


_ACCUMULATED_GEMMS: tuple[str, ...] = ("forward_accumulated", "backward_accumulated")


@dataclass
class LayerQuant:
    """A quantized layer's GEMM op, the quantizers of its operands (None: left in fp32) and the
    accumulator of its GEMMs (None: torch's fp32 accumulation).

    Any callables Tensor -> Tensor will do as quantizers, so other training methods can reuse
    `QuantGemm` with their own.
    """

    op: GemmOp | None
    """None: a functional GEMM (`QuantMatmulFn`), whose operands are quantized without an op."""
    activations: Quantizer | None
    weights: Quantizer | None
    gradients: Quantizer | None
    weight_grads: Quantizer | None
    switch: QuantSwitch
    accumulator: Accumulator | None = None
    master_weights: TensorQuant | None = None
    """The format the layer's weights live in between steps (None: fp32)."""

    def __post_init__(self) -> None:
        if self.accumulator is not None and self.op is not None and \
                not all(hasattr(self.op, name) for name in _ACCUMULATED_GEMMS):
            raise TypeError(f"{type(self.op).__name__} has no accumulated GEMMs, so it takes no accumulator")

    @property
    def operands_blocked(self) -> bool:
        """Whether x or w is block-scaled (then the forward quantizes it along the backward's axes too).
        Read at each call, not kept: methods may set a layer's quantizers after construction."""
        return _blocked(self.activations) or _blocked(self.weights)

    @property
    def any_blocked(self) -> bool:
        return self.operands_blocked or _blocked(self.gradients)

    @property
    def gemm(self) -> GemmOp:
        """The op of a module's GEMMs (QuantGemm needs one)."""
        if self.op is None:
            raise TypeError("a functional GEMM's LayerQuant has no op: it runs through QuantMatmulFn")
        return self.op

    @property
    def accumulating_gemm(self) -> AccumulatingGemmOp:
        """The op with its accumulated GEMMs (used when `accumulator` is set)."""
        return cast(AccumulatingGemmOp, self.gemm)  # __post_init__ checked that it has them


_GRAD_MODE = contextvars.ContextVar("dse_quant_gemm_grad_mode", default=True)
"""Grad mode where a quantized GEMM was applied (inside its forward grad mode is always off)."""


def _apply_recording_grad_mode(apply: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    token = _GRAD_MODE.set(torch.is_grad_enabled())
    try:
        return apply(*args)
    finally:
        _GRAD_MODE.reset(token)


def _backward_needs(ctx: Any, inputs: int) -> tuple[bool, ...]:
    """Which of the first `inputs` inputs a backward will need gradients for, as a forward sees it:
    none where the GEMM was applied without grad mode (an evaluation), whose `needs_input_grad`
    still says which inputs require grad."""
    if not _GRAD_MODE.get():
        return (False,) * inputs
    return tuple(ctx.needs_input_grad[:inputs])


class QuantGemm(torch.autograd.Function):
    """y = op(Qa(x), Qw(w)) + b, with the quantized backward GEMMs of the module docstring.

    A block-scaled operand the backward quantizes again along another axis is quantized along
    both in one call where its rounding draws nothing (`_for_gemms`): x and w in the forward (the
    backward's copies saved in place of x and w), dy's two at once."""

    @classmethod
    def apply(cls, *args: Any) -> Any:  # Function.apply, recording the grad mode where forward reads it
        if cast(LayerQuant, args[3]).operands_blocked:
            return _apply_recording_grad_mode(super().apply, args)
        return super().apply(*args)

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, layer: LayerQuant) -> Tensor:
        qx_later = qw_later = None
        if layer.operands_blocked:
            axes = layer.gemm.axes
            need_data, need_weight = _backward_needs(ctx, 2)
            qx, qx_later = _for_gemms(layer.activations, x, axes.forward[0],
                                      axes.backward_weight[0] if need_weight else None)
            qw, qw_later = _for_gemms(layer.weights, weight, axes.forward[1],
                                      axes.backward_data[1] if need_data else None)
        else:
            qx = layer.activations(x) if layer.activations is not None else x
            qw = layer.weights(weight) if layer.weights is not None else weight
        # a block-scaled operand is quantized again along each backward GEMM's axis: keep it unquantized,
        # or its backward copy where that is quantized already
        ctx.save_for_backward(qx_later if qx_later is not None else x if _blocked(layer.activations) else qx,
                              qw_later if qw_later is not None else weight if _blocked(layer.weights) else qw)
        ctx.ready = (qx_later is not None, qw_later is not None)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        if layer.accumulator is not None:
            return layer.accumulating_gemm.forward_accumulated(qx, qw, bias, layer.accumulator)
        return layer.gemm.forward(qx, qw, bias)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        layer: LayerQuant = ctx.layer
        x, weight = ctx.saved_tensors  # quantized already unless block-scaled (and not `ready`)
        x_ready, weight_ready = ctx.ready
        need_data, need_weight, need_bias = ctx.needs_input_grad[:3]

        def gemms(e: Tensor, x: Tensor, w: Tensor, data: bool,
                  wgt: bool) -> tuple[Tensor | None, Tensor | None]:
            if layer.accumulator is not None:
                return layer.accumulating_gemm.backward_accumulated(e, x, w, data, wgt, layer.accumulator)
            return layer.gemm.backward(e, x, w, data, wgt)

        if not layer.any_blocked:
            qe = layer.gradients(dy) if layer.gradients is not None else dy
            dx, dw = gemms(qe, x, weight, need_data, need_weight)
        else:
            axes = layer.gemm.axes
            qe = dy if _blocked(layer.gradients) else _for_gemm(layer.gradients, dy, 0)
            e_data: Tensor = qe  # dy once, unless block-scaled: then along backward-data's axis, and
            e_weight: Tensor | None = qe
            if _blocked(layer.gradients):  # along backward-weight's in the same call where it may
                e_data, e_weight = _for_gemms(layer.gradients, dy, axes.backward_data[0],
                                              axes.backward_weight[1] if need_weight else None) \
                    if need_data else (dy, None)
            dx = dw = None
            if need_data:
                w = weight if weight_ready or not _blocked(layer.weights) else \
                    _for_gemm(layer.weights, weight, axes.backward_data[1])
                dx = gemms(e_data, x, w, True, False)[0]
            if need_weight:
                qx = x if x_ready or not _blocked(layer.activations) else \
                    _for_gemm(layer.activations, x, axes.backward_weight[0])
                if e_weight is None:  # in its turn, after x (a stochastic rounding's order of draws)
                    e_weight = _for_gemm(layer.gradients, dy, axes.backward_weight[1])
                dw = gemms(e_weight, qx, weight, False, True)[1]
        if dw is not None and layer.weight_grads is not None:
            dw = layer.weight_grads(dw)
        db = layer.gemm.bias_grad(qe) if ctx.has_bias and need_bias else None
        return dx, dw, db, None


class QuantMatmulFn(torch.autograd.Function):
    """a @ b: an operand is quantized as an activation, or as a weight where `weight_operand` names it
    (0: neither, 1: a, 2: b; its gradient is then a weight gradient); the incoming error as an error.
    Axes as microxcaling's mx/matmul.py: forward a along -1 and b along -2; da = dy b^T with dy and b
    along -1; db = a^T dy with a and dy along -2. As in QuantGemm, an operand the backward quantizes
    again is quantized along both axes in one call where its rounding draws nothing. `members` (a
    group's matmul, dse/train/stacked.py and stacked_functional.py): the operands carry a leading
    member axis; each product runs batched where that sums as each member's own, else member by
    member, as alone (`_product`)."""

    @classmethod
    def apply(cls, *args: Any) -> Any:  # Function.apply, recording the grad mode
        return _apply_recording_grad_mode(super().apply, args)

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, layer: LayerQuant, weight_operand: int = 0,
                members: MemberRanks | None = None) -> Tensor:
        qa_fn, qb_fn = _matmul_quantizers(layer, weight_operand)
        need_a, need_b = _backward_needs(ctx, 2)
        qa, qa_later = _for_gemms(qa_fn, a, -1, -2 if need_b else None)
        qb, qb_later = _for_gemms(qb_fn, b, -2, -1 if need_a else None)
        ctx.save_for_backward(qa_later if qa_later is not None else a if _blocked(qa_fn) else qa,
                              qb_later if qb_later is not None else b if _blocked(qb_fn) else qb)
        ctx.ready = (qa_later is not None, qb_later is not None)
        ctx.layer = layer
        ctx.weight_operand = weight_operand
        ctx.members = members
        if layer.accumulator is not None:
            return accumulation.matmul_forward(qa, qb, layer.accumulator)
        return _product(qa, qb, members)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        layer: LayerQuant = ctx.layer
        qa_fn, qb_fn = _matmul_quantizers(layer, ctx.weight_operand)
        qa, qb = ctx.saved_tensors  # quantized already unless block-scaled (and not `ready`)
        a_ready, b_ready = ctx.ready
        need_a, need_b = ctx.needs_input_grad[:2]
        qe = dy if _blocked(layer.gradients) else _for_gemm(layer.gradients, dy, 0)
        e_a: Tensor = qe
        e_b: Tensor | None = qe
        if _blocked(layer.gradients):
            e_a, e_b = _for_gemms(layer.gradients, dy, -1, -2 if need_b else None) if need_a else (dy, None)
        accumulator = layer.accumulator
        members: MemberRanks | None = ctx.members
        ranks_da = None if members is None else members.of_data_gradient()
        ranks_db = None if members is None else members.of_weight_gradient()
        da = db = None
        if need_a:
            b = _for_gemm(qb_fn, qb, -1) if _blocked(qb_fn) and not b_ready else qb
            da = (_product(e_a, b.transpose(-1, -2), ranks_da) if accumulator is None
                  else accumulation.matmul_backward_a(e_a, b, accumulator)).sum_to_size(qa.shape)
            if ctx.weight_operand == 1 and layer.weight_grads is not None:
                da = layer.weight_grads(da)
        if need_b:
            a = _for_gemm(qa_fn, qa, -2) if _blocked(qa_fn) and not a_ready else qa
            if e_b is None:  # in its turn, after a (a stochastic rounding's order of draws)
                e_b = _for_gemm(layer.gradients, dy, -2)
            db = (_product(a.transpose(-1, -2), e_b, ranks_db) if accumulator is None
                  else accumulation.matmul_backward_b(a, e_b, accumulator)).sum_to_size(qb.shape)
            if ctx.weight_operand == 2 and layer.weight_grads is not None:
                db = layer.weight_grads(db)
        return da, db, None, None, None


@dataclass(frozen=True)
class MemberRanks:
    """A group's matmul, its operands with a leading member axis: each member's operands' ranks alone
    (a member's weight broadcast with leading singleton axes drops them), and whether the member's
    product alone is a batched matmul too (attention's q k^T: no rule, the probe decides); otherwise
    `bmm_sums_as_mm` is the CPU's rule: alone torch.matmul folds a (B, n, k) @ W (k, m) into one mm."""

    a: int
    b: int
    batched_alone: bool = False

    def of_data_gradient(self) -> MemberRanks:
        """da = dy b^T: dy's rank a member is the output's."""
        return dataclasses.replace(self, a=max(self.a, self.b))

    def of_weight_gradient(self) -> MemberRanks:
        """db = a^T dy."""
        return dataclasses.replace(self, b=max(self.a, self.b))


def _product(a: Tensor, b: Tensor, members: MemberRanks | None) -> Tensor:
    """a @ b; with `members`, one batched matmul where it sums as each member's own product
    (`batched_sums.aligned_sums_as_members`), else member by member, each member's operands at their
    ranks and alignment alone."""
    if members is None:
        return a @ b
    own = functools.partial(_member_product, members.a, members.b)
    rule = members.batched_alone or bmm_sums_as_mm(a.shape[-2], a.shape[-1], b.shape[-1])
    sums, (a, b) = aligned_sums_as_members(("matmul", members.a, members.b), torch.matmul, own, (a, b), rule,
                                           aligning=2)  # each member's operands where they are alone
    if sums:
        return a @ b
    return torch.stack([own(a_g, b_g) for a_g, b_g in zip(a.unbind(0), b.unbind(0), strict=True)])


def _member_product(rank_a: int, rank_b: int, a: Tensor, b: Tensor) -> Tensor:
    """A member's a @ b at its operands' ranks alone."""
    return a.reshape(a.shape[a.dim() - rank_a:]) @ b.reshape(b.shape[b.dim() - rank_b:])


def _matmul_quantizers(layer: LayerQuant, weight_operand: int) -> tuple[Quantizer | None, Quantizer | None]:
    return (layer.weights if weight_operand == 1 else layer.activations,
            layer.weights if weight_operand == 2 else layer.activations)


def quant_matmul(a: Tensor, b: Tensor, layer: LayerQuant, weight_operand: int = 0,
                 members: MemberRanks | None = None) -> Tensor:
    """torch.matmul semantics (1-d operands, broadcast batch dims) through QuantMatmulFn (`members`: a
    group's, operands of rank 3 or more with a leading member axis)."""
    squeeze_rows, squeeze_cols = a.dim() == 1, b.dim() == 1
    a = a.unsqueeze(0) if squeeze_rows else a
    b = b.unsqueeze(-1) if squeeze_cols else b
    y = QuantMatmulFn.apply(a, b, layer, weight_operand, members)
    y = y.squeeze(-1) if squeeze_cols else y
    return y.squeeze(-2) if squeeze_rows else y


# --- quantized modules: the original classes with a quantized forward -----------------------------


class QuantLinear(nn.Linear):
    """nn.Linear whose GEMMs are quantized by `self.gemm_quant` while its switch is on."""

    gemm_quant: LayerQuant

    def forward(self, x: Tensor) -> Tensor:
        if not self.gemm_quant.switch.enabled:
            return super().forward(x)
        return QuantGemm.apply(x, self.weight, self.bias, self.gemm_quant)


class _QuantConvMixin:
    gemm_quant: LayerQuant
    conv_prepad: tuple[tuple[int, ...], str] | None
    """(F.pad widths, mode) applied before the convolution: padding modes and asymmetric 'same'."""
    weight: Tensor  # the nn.ConvNd's, which this mixin precedes
    bias: Tensor | None

    def forward(self, x: Tensor) -> Tensor:
        if not self.gemm_quant.switch.enabled:
            return super().forward(x)  # type: ignore[misc]  # a mixin: super() is the nn.ConvNd it precedes
        if self.conv_prepad is not None:
            widths, mode = self.conv_prepad
            x = F.pad(x, widths, mode=mode)
        return QuantGemm.apply(x, self.weight, self.bias, self.gemm_quant)


class QuantConv1d(_QuantConvMixin, nn.Conv1d):
    """nn.Conv1d whose GEMMs are quantized while its switch is on."""


class QuantConv2d(_QuantConvMixin, nn.Conv2d):
    """nn.Conv2d whose GEMMs are quantized while its switch is on."""


class QuantMatmul(Matmul):
    """`Matmul` with both operands quantized as activations (and its error as an error)."""

    gemm_quant: LayerQuant

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if not self.gemm_quant.switch.enabled:
            return a @ b
        return quant_matmul(a, b, self.gemm_quant)


_QUANT_CLASS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QuantLinear, nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, Matmul: QuantMatmul,
}
_PLAIN_CLASS: dict[type[nn.Module], type[nn.Module]] = {q: p for p, q in _QUANT_CLASS.items()}
WEIGHT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
UNCONVERTIBLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.RNNBase, nn.RNNCellBase, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Bilinear,
)
"""Modules with GEMMs inside that quantize_model cannot convert (it warns about each)."""


class UnconvertedGemmWarning(UserWarning):
    """A GEMM that quantize_model leaves in fp32 because it cannot convert it."""


@dataclass(frozen=True)
class Gemm:
    """A GEMM quantize_model took charge of: its name, what computes it, its formats."""

    name: str
    """The module's qualified name; a functional GEMM's owner module name plus what it is
    (`attn.in_proj`, `attn.scores`, `block.matmul0`)."""
    kind: str
    """linear, conv1d, conv2d, matmul (module GEMMs); F.linear, F.conv2d, matmul, bmm, mm, sdpa,
    mha (functional GEMMs)."""
    formats: TensorFormats | None
    """Its tensor classes' formats (None: a hand-built policy without spec strings)."""
    quantized: bool
    has_weight: bool = True
    """False for activation x activation GEMMs (attention), whose operands are both activations."""

    def describe(self) -> str:
        if not self.quantized:
            return f"{self.name} ({self.kind}): fp32"
        if self.formats is None:
            return f"{self.name} ({self.kind}): quantized"
        f = self.formats
        if not self.has_weight:
            return f"{self.name} ({self.kind}): A={f.activations} G={f.gradients}"
        return (f"{self.name} ({self.kind}): W={f.weights} A={f.activations} G={f.gradients} "
                f"dW={f.weight_grads}")


def gemm_modules(model: nn.Module) -> list[nn.Module]:
    """Linear, Conv1d, Conv2d and Matmul modules (exactly those classes or their quantized
    versions; subclasses with their own forward are left alone), in registration order."""
    return [m for m in model.modules() if is_module_gemm(m)]


def is_module_gemm(module: nn.Module) -> bool:
    return type(module) in _QUANT_CLASS or type(module) in _PLAIN_CLASS


def quantized_layers(model: nn.Module) -> list[nn.Module]:
    """The modules `quantize_model` made quantized (Matmul included), in registration order."""
    return [m for m in model.modules() if type(m) in _PLAIN_CLASS]


def set_plain_attribute(module: nn.Module, name: str, value: object) -> None:
    """module.name = value for a value that is neither a tensor nor a module (a quantizer, a switch):
    what nn.Module.__setattr__ does with one, which its type hints do not admit."""
    module.__dict__[name] = value


def layer_quant(module: nn.Module) -> LayerQuant:
    """The LayerQuant `quantize_model` gave a quantized module (a plain attribute, not a submodule)."""
    quant = module.__dict__.get("gemm_quant")
    if not isinstance(quant, LayerQuant):
        raise TypeError(f"{type(module).__name__} is not a quantized GEMM module")
    return quant


def stored_weights(model: nn.Module) -> list[tuple[Tensor, TensorQuant]]:
    """The weights of quantized GEMMs (modules and functional) and the format each is stored in
    between steps when there is no fp32 master copy; weights with no storage format are left out."""
    from dse.train.functional import functional_gemms

    out: dict[int, tuple[Tensor, TensorQuant]] = {}
    for module in quantized_layers(model):
        weight, storage = getattr(module, "weight", None), layer_quant(module).master_weights
        if isinstance(weight, Tensor) and storage is not None and storage.enabled:
            out.setdefault(id(weight), (weight, storage))
    gemms = functional_gemms(model)
    if gemms is not None:
        for weight, storage in gemms.stored_weights():
            out.setdefault(id(weight), (weight, storage))
    return list(out.values())


def quant_switch(model: nn.Module) -> QuantSwitch | None:
    """The switch `quantize_model` attached to the model, if any."""
    switch = getattr(model, "dse_quant_switch", None)
    return switch if isinstance(switch, QuantSwitch) else None


def _bind(quant: TensorQuant, generator: torch.Generator | None) -> Quantizer | None:
    if not quant.enabled:
        return None
    if is_block_scaled(quant):
        return BlockQuantizer(quant, generator)
    if generator is None:
        return quant
    return functools.partial(quant, generator=generator)  # (a partial pickles, a lambda does not)


def _on_axis(quant: TensorQuant, axis: int) -> TensorQuant:
    """Block scaling along `axis` when the format blocks along the default last axis (conv
    reduction runs along the channel axis 1, not along the last spatial axis)."""
    fmt = quant.format
    if fmt is None or fmt.scaling.kind != "block" or fmt.scaling.axis != -1:
        return quant
    return dataclasses.replace(quant, format=with_scaling(fmt, dataclasses.replace(fmt.scaling, axis=axis)))


def conv_geometry(module: nn.Module) -> tuple[tuple[int, ...], tuple[tuple[int, ...], str] | None]:
    """Numeric padding for the convolution, plus any F.pad to apply to the input first."""
    assert isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d)
    if module.padding_mode != "zeros":
        return (0,) * len(module.kernel_size), (tuple(module._reversed_padding_repeated_twice),
                                               module.padding_mode)
    if isinstance(module.padding, str):
        pads = module._reversed_padding_repeated_twice  # (left, right) per dim, last dim first
        lefts, rights = pads[0::2], pads[1::2]
        if list(lefts) == list(rights):
            return tuple(reversed(lefts)), None
        return (0,) * len(module.kernel_size), (tuple(pads), "constant")
    return tuple(module.padding), None


def gemm_quant(op: LinearOp | ConvOp | None, policy: QuantPolicy, switch: QuantSwitch,
               generator: torch.Generator | None) -> LayerQuant:
    """The quantizers of one GEMM layer under `policy` (op None: a matmul)."""
    accumulate = _bind(policy.accumulation, generator)
    accumulator = Accumulator(accumulate, policy.accumulation_chunk) if accumulate is not None else None
    axis = 1 if isinstance(op, ConvOp) else None

    def bound(quant: TensorQuant) -> Quantizer | None:
        return _bind(quant if axis is None else _on_axis(quant, axis), generator)

    master = policy.master_weights if policy.master_weights.enabled else None
    return LayerQuant(op, activations=bound(policy.activations), weights=bound(policy.weights),
                      gradients=bound(policy.gradients), weight_grads=bound(policy.weight_grads),
                      switch=switch, accumulator=accumulator, master_weights=master)


def _layer_quant(module: nn.Module, policy: QuantPolicy, switch: QuantSwitch,
                 generator: torch.Generator | None) -> LayerQuant:
    if isinstance(module, Matmul):
        return dataclasses.replace(gemm_quant(None, policy, switch, generator), weights=None,
                                   weight_grads=None, master_weights=None)
    if isinstance(module, nn.Linear):
        return gemm_quant(LinearOp(), policy, switch, generator)
    assert isinstance(module, nn.Conv1d | nn.Conv2d)
    padding, prepad = conv_geometry(module)
    set_plain_attribute(module, "conv_prepad", prepad)
    op = ConvOp(tuple(module.stride), padding, tuple(module.dilation), module.groups)
    return gemm_quant(op, policy, switch, generator)


def class_names(cls: type) -> tuple[str, ...]:
    """A class and its bases up to nn.Module, by name (what `type:Name` rules match)."""
    return tuple(c.__name__ for c in cls.__mro__ if issubclass(c, nn.Module) and c is not nn.Module)


def _fp32(policy: QuantPolicy) -> QuantPolicy:
    none = TensorQuant(None)
    return dataclasses.replace(policy, weights=none, activations=none, gradients=none,
                               weight_grads=none, accumulation=none, master_weights=none)


class LayerPolicies:
    """Each GEMM layer's policy: the per-layer rules (and full_precision_layers) over the trial's."""

    def __init__(self, policy: QuantPolicy, layers: Sequence[Layer]) -> None:
        self.policy = policy
        self.by_name: dict[str, QuantPolicy] = {}
        self.formats: dict[str, TensorFormats | None] = {}
        if policy.formats is None:  # a hand-built policy: one policy, first/last kept fp32
            keep = full_precision_rules(layers, policy.full_precision_layers)
            for layer in layers:
                fp32 = any(rule.matches(layer) for rule in keep)
                self.by_name[layer.name] = _fp32(policy) if fp32 else policy
                self.formats[layer.name] = None
            return
        resolved = resolve_layers(layers, policy.layers, policy.formats, policy.full_precision_layers)
        for name, formats in resolved.items():
            self.formats[name] = formats
            self.by_name[name] = self._policy(formats)

    def _policy(self, formats: TensorFormats) -> QuantPolicy:
        """The trial's policy for a layer no rule matched; a rule's formats; fp32 (no accumulator
        either) for a layer a rule keeps entirely in full precision."""
        if formats == self.policy.formats or formats.quantizes_gemms:
            return self.policy.for_layer(formats)
        return _fp32(self.policy)

    def of(self, layer: Layer) -> QuantPolicy:
        """A layer's policy (one first seen after quantize_model, e.g. on a branch not taken then)."""
        if layer.name not in self.by_name:
            if self.policy.formats is None:
                self.by_name[layer.name], self.formats[layer.name] = self.policy, None
            else:
                formats = resolve_layers([layer], self.policy.layers, self.policy.formats,
                                         require_match=False)[layer.name]
                self.formats[layer.name] = formats
                self.by_name[layer.name] = self._policy(formats)
        return self.by_name[layer.name]

    def gemm(self, layer: Layer, kind: str) -> Gemm:
        policy = self.of(layer)
        return Gemm(layer.name, kind, self.formats[layer.name], policy.quantizes_gemms, layer.has_weight)


class QuantizedGemms(list[Gemm]):
    """What quantize_model returns: every GEMM it took, in order, and kept complete while the model runs.

    A functional GEMM the example forward did not reach (a branch it did not take; no example given)
    is still quantized when it first runs, and joins the end of this list then; a GEMM function
    quantize_model cannot convert, first seen then, joins `unconverted` (and is warned about).
    """

    def __init__(self, gemms: Iterable[Gemm] = (), unconverted: Iterable[str] = ()) -> None:
        super().__init__(gemms)
        self.unconverted: list[str] = list(unconverted)
        """One line per GEMM left in fp32 (the messages of the UnconvertedGemmWarnings)."""


MODULE_GEMM_KINDS: dict[type[nn.Module], str] = {
    nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", Matmul: "matmul",
}


def quantize_model(model: nn.Module, policy: QuantPolicy, generator: torch.Generator | None = None,
                   example_input: Tensor | tuple[Any, ...] | None = None) -> QuantizedGemms:
    """Quantize the model's GEMMs in place as `policy` says; returns every GEMM it took, in order
    (a live list: a functional GEMM first run after this call joins it then, see QuantizedGemms).

    Linear/Conv1d/Conv2d/Matmul modules change class to their quantized versions (same module
    objects, same Parameters). nn.MultiheadAttention (in- and out-projections, scores, context) and
    the GEMMs a forward calls as functions run quantized through a torch-function mode
    (dse/train/functional.py); with `example_input` (a tensor, or a tuple of the forward's
    positional arguments) one forward finds those functional GEMMs (model
    state, buffers and random generators are left as they were), without it they are found as they
    run. Each GEMM takes its layer's formats: the first of `policy.layers` that matches it, else
    the trial's; `policy.full_precision_layers` keeps the first/last weight layer in fp32; a rule
    that matches no GEMM is an InputError. Modules with GEMMs it cannot convert (LSTM, Conv3d,
    ConvTranspose, ...) and GEMM functions it does not handle (einsum, ...) stay fp32, each with an
    `UnconvertedGemmWarning`. `generator` feeds stochastic rounding of the GEMM operands (None:
    torch's global generator). Calling it again re-quantizes with the new policy.
    """
    from dse.train import functional

    switch = quant_switch(model) or QuantSwitch()
    set_plain_attribute(model, "dse_quant_switch", switch)
    found = functional.find_gemms(model, example_input)
    layers = [site.layer for site in found.sites]
    policies = LayerPolicies(policy, layers)
    gemms = QuantizedGemms(unconverted=found.unconverted)
    for site in found.sites:
        gemms.append(policies.gemm(site.layer, site.kind))
        module = site.module
        if module is None:
            continue
        layer_policy = policies.of(site.layer)
        plain = _PLAIN_CLASS.get(type(module), type(module))
        if not layer_policy.quantizes_gemms:
            module.__class__ = plain
            for name in ("gemm_quant", "conv_prepad"):
                module.__dict__.pop(name, None)
            continue
        module.__class__ = _QUANT_CLASS[plain]
        set_plain_attribute(module, "gemm_quant", _layer_quant(module, layer_policy, switch, generator))
    functional.attach(model, found, policies, switch, generator, gemms)
    for message in found.unconverted:
        warnings.warn(message, UnconvertedGemmWarning, stacklevel=2)
    return gemms


def set_quantization(model: nn.Module, enabled: bool) -> None:
    """Switch quantization on or off (warm-up in fp32): off, the model computes exactly as in fp32
    and the optimizer neither re-quantizes stored weights nor its state."""
    switch = quant_switch(model)
    if switch is not None:
        switch.enabled = enabled
