"""Quantized GEMM layers: autograd functions that quantize both operands of all three GEMMs.

For a layer y = op(x, w) (+ bias in fp32) the three GEMMs of a training step see:

    forward          y  = op(Qa(x), Qw(w)) + b
    backward-data    dx = op_backward_data(Qe(dy), Qw(w))
    backward-weight  dw = Qwg(op_backward_weight(Qa(x), Qe(dy)))      db = sum(Qe(dy))

The quantized operands saved in the forward pass are reused in the backward pass, and the
quantizers are straight-through: dx and dw go to x and w unchanged. The backward GEMMs are written
out (matmuls, `aten.convolution_backward`), not re-derived by autograd.

With an accumulator (`LayerQuant.accumulator`, from `policy.accumulation`) each of the three GEMMs
is instead folded chunk by chunk into a running sum rounded onto the accumulator format
(dse/train/accumulation.py); without one the GEMMs are the plain torch calls above.

`quantize_model` turns a model's nn.Linear / nn.Conv1d / nn.Conv2d / `Matmul` modules into their
quantized versions in place: the module objects stay (only their class changes), and so do their
Parameter objects, so an optimizer created before or after still updates the same tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dse.train import accumulation
from dse.train.accumulation import Accumulator
from dse.train.policy import QuantPolicy, TensorQuant
from models.layers import Matmul

Quantizer = Callable[[Tensor], Tensor]


# --- the GEMMs of each layer type ---------------------------------------------------------------


class LinearOp:
    """y = x w^T: x (..., in), w (out, in)."""

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


@dataclass
class LayerQuant:
    """A quantized layer's GEMM op, the quantizers of its operands (None: left in fp32) and the
    accumulator of its GEMMs (None: torch's fp32 accumulation).

    Any callables Tensor -> Tensor will do as quantizers, so other training methods can reuse
    `QuantGemm` with their own.
    """

    op: LinearOp | ConvOp | None
    activation: Quantizer | None
    weight: Quantizer | None
    error: Quantizer | None
    weight_grad: Quantizer | None
    switch: QuantSwitch
    accumulator: Accumulator | None = None


class QuantGemm(torch.autograd.Function):
    """y = op(Qa(x), Qw(w)) + b, with the quantized backward GEMMs of the module docstring."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, layer: LayerQuant) -> Tensor:
        qx = layer.activation(x) if layer.activation is not None else x
        qw = layer.weight(weight) if layer.weight is not None else weight
        ctx.save_for_backward(qx, qw)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        if layer.accumulator is not None:
            return layer.op.forward_accumulated(qx, qw, bias, layer.accumulator)
        return layer.op.forward(qx, qw, bias)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        layer: LayerQuant = ctx.layer
        qx, qw = ctx.saved_tensors
        qe = layer.error(dy) if layer.error is not None else dy
        need_data, need_weight, need_bias = ctx.needs_input_grad[:3]
        if layer.accumulator is not None:
            dx, dw = layer.op.backward_accumulated(qe, qx, qw, need_data, need_weight, layer.accumulator)
        else:
            dx, dw = layer.op.backward(qe, qx, qw, need_data, need_weight)
        if dw is not None and layer.weight_grad is not None:
            dw = layer.weight_grad(dw)
        db = layer.op.bias_grad(qe) if ctx.has_bias and need_bias else None
        return dx, dw, db, None


class QuantMatmulFn(torch.autograd.Function):
    """a @ b with both operands quantized as activations and the incoming error as an error."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, layer: LayerQuant) -> Tensor:
        qa = layer.activation(a) if layer.activation is not None else a
        qb = layer.activation(b) if layer.activation is not None else b
        ctx.save_for_backward(qa, qb)
        ctx.layer = layer
        if layer.accumulator is not None:
            return accumulation.matmul_forward(qa, qb, layer.accumulator)
        return qa @ qb

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        layer: LayerQuant = ctx.layer
        qa, qb = ctx.saved_tensors
        qe = layer.error(dy) if layer.error is not None else dy
        accumulator = layer.accumulator
        da = db = None
        if ctx.needs_input_grad[0]:
            da = (qe @ qb.transpose(-1, -2) if accumulator is None
                  else accumulation.matmul_backward_a(qe, qb, accumulator)).sum_to_size(qa.shape)
        if ctx.needs_input_grad[1]:
            db = (qa.transpose(-1, -2) @ qe if accumulator is None
                  else accumulation.matmul_backward_b(qa, qe, accumulator)).sum_to_size(qb.shape)
        return da, db, None


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

    def forward(self, x: Tensor) -> Tensor:
        if not self.gemm_quant.switch.enabled:
            return super().forward(x)  # type: ignore[misc]
        if self.conv_prepad is not None:
            widths, mode = self.conv_prepad
            x = F.pad(x, widths, mode=mode)
        return QuantGemm.apply(x, self.weight, self.bias, self.gemm_quant)  # type: ignore[attr-defined]


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
        squeeze_rows, squeeze_cols = a.dim() == 1, b.dim() == 1
        a = a.unsqueeze(0) if squeeze_rows else a
        b = b.unsqueeze(-1) if squeeze_cols else b
        y = QuantMatmulFn.apply(a, b, self.gemm_quant)
        y = y.squeeze(-1) if squeeze_cols else y
        return y.squeeze(-2) if squeeze_rows else y


_QUANT_CLASS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QuantLinear, nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, Matmul: QuantMatmul,
}
_PLAIN_CLASS: dict[type[nn.Module], type[nn.Module]] = {q: p for p, q in _QUANT_CLASS.items()}
WEIGHT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


def gemm_modules(model: nn.Module) -> list[nn.Module]:
    """Linear, Conv1d, Conv2d and Matmul modules (exactly those classes or their quantized
    versions; subclasses with their own forward are left alone), in registration order."""
    return [m for m in model.modules() if type(m) in _QUANT_CLASS or type(m) in _PLAIN_CLASS]


def quantized_layers(model: nn.Module) -> list[nn.Module]:
    """The modules `quantize_model` made quantized (Matmul included), in registration order."""
    return [m for m in model.modules() if type(m) in _PLAIN_CLASS]


def quant_switch(model: nn.Module) -> QuantSwitch | None:
    """The switch `quantize_model` attached to the model, if any."""
    switch = getattr(model, "dse_quant_switch", None)
    return switch if isinstance(switch, QuantSwitch) else None


def full_precision_modules(weight_layers: Sequence[nn.Module], names: Sequence[str]) -> set[int]:
    """ids of the layers `full_precision_layers` keeps in fp32: first/last Linear or Conv module in
    registration order (the order of `model.modules()`, which is the forward order in models that
    define their layers in the order they use them)."""
    keep: set[int] = set()
    if weight_layers and "first" in names:
        keep.add(id(weight_layers[0]))
    if weight_layers and "last" in names:
        keep.add(id(weight_layers[-1]))
    return keep


def _bind(quant: TensorQuant, generator: torch.Generator | None) -> Quantizer | None:
    if not quant.enabled:
        return None
    if generator is None:
        return quant
    return lambda x: quant(x, generator)


def _on_axis(quant: TensorQuant, axis: int) -> TensorQuant:
    """Block scaling along `axis` when the format blocks along the default last axis (conv
    reduction runs along the channel axis 1, not along the last spatial axis)."""
    fmt = quant.format
    if fmt is None or fmt.scaling.kind != "block" or fmt.scaling.axis != -1:
        return quant
    return dataclasses.replace(quant, format=dataclasses.replace(
        fmt, scaling=dataclasses.replace(fmt.scaling, axis=axis)))


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


def _layer_quant(module: nn.Module, policy: QuantPolicy, switch: QuantSwitch,
                 generator: torch.Generator | None) -> LayerQuant:
    accumulate = _bind(policy.accumulation, generator)
    accumulator = Accumulator(accumulate, policy.accumulation_chunk) if accumulate is not None else None
    if isinstance(module, Matmul):
        return LayerQuant(None, _bind(policy.activation, generator), None,
                          _bind(policy.error, generator), None, switch, accumulator)
    if isinstance(module, nn.Linear):
        return LayerQuant(LinearOp(), _bind(policy.activation, generator), _bind(policy.weight, generator),
                          _bind(policy.error, generator), _bind(policy.weight_grad, generator), switch,
                          accumulator)
    assert isinstance(module, nn.Conv1d | nn.Conv2d)
    padding, prepad = conv_geometry(module)
    module.conv_prepad = prepad
    op = ConvOp(tuple(module.stride), padding, tuple(module.dilation), module.groups)
    return LayerQuant(op, *(_bind(_on_axis(q, 1), generator) for q in (
        policy.activation, policy.weight, policy.error, policy.weight_grad)), switch=switch,
        accumulator=accumulator)


def quantize_model(model: nn.Module, policy: QuantPolicy,
                   generator: torch.Generator | None = None) -> nn.Module:
    """Quantize the model's GEMMs in place as `policy` says; returns the same model.

    Linear/Conv1d/Conv2d/Matmul modules change class to their quantized versions (same module
    objects, same Parameters); the first/last Linear or Conv module named in
    `policy.full_precision_layers` stay fp32, as do all other modules (norms, embeddings, ...).
    `generator` feeds stochastic rounding of the GEMM operands (None: torch's global generator).
    Calling it again re-quantizes with the new policy.
    """
    switch = quant_switch(model) or QuantSwitch()
    model.dse_quant_switch = switch
    modules = gemm_modules(model)
    weight_layers = [m for m in modules if isinstance(m, WEIGHT_LAYER_TYPES)]
    keep_fp32 = full_precision_modules(weight_layers, policy.full_precision_layers)
    for module in modules:
        plain = _PLAIN_CLASS.get(type(module), type(module))
        if id(module) in keep_fp32 or not policy.quantizes_gemms:
            module.__class__ = plain
            for name in ("gemm_quant", "conv_prepad"):
                module.__dict__.pop(name, None)
            continue
        module.__class__ = _QUANT_CLASS[plain]
        module.gemm_quant = _layer_quant(module, policy, switch, generator)
    return model


def set_quantization(model: nn.Module, enabled: bool) -> None:
    """Switch quantization on or off (warm-up in fp32): off, the model computes exactly as in fp32
    and the optimizer neither re-quantizes stored weights nor its state."""
    switch = quant_switch(model)
    if switch is not None:
        switch.enabled = enabled
