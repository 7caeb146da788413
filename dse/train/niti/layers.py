"""NITI layers: Linear, Conv, Embedding and Matmul on integer mantissas, and the model conversion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from dse.errors import InputError
from dse.train.accumulation import convolution, convolution_grads
from dse.train.layers import conv_geometry
from dse.train.niti.exponents import (
    _EXACT_SCALING,
    Exponent,
    _Activation,
    _activation_of,
    _error_of,
    _ErrorSlot,
    _exact_dtype,
    _float_dtype,
    _largest,
    _mantissa_bound,
    _negated,
    _plain,
    _pow2,
    _tag,
    _value,
)
from dse.train.niti.ti_torch import act_calc, weight_quant

# ----------------------------------------------------------------------------------------------

def weight_mantissa(param: Tensor, exp: Exponent, dtype: torch.dtype = torch.int64) -> Tensor:
    """The integer mantissa of a NITI weight whose value is mantissa * 2^exp (per member where exp is
    a tuple), as `dtype`. Within _value's exponent range the scaling by 2^-exp is exact in the
    weight's own dtype, so only the float64 fallback needs a wider copy."""
    weight = param.detach()
    if not (_largest(exp) <= _EXACT_SCALING and weight.dtype in (torch.float32, torch.float64)):
        weight = weight.double()
    return (weight * _pow2(_negated(exp), weight, weight.dtype)).round_().to(dtype)


@dataclass(eq=False)
class NitiWeight:
    """A NITI layer's weight: the parameter (value m * 2^exp, m an integer of `bitwidth` magnitude
    bits), its exponent, fixed for the run, and the exact int32 accumulator of the weight gradient
    of the current step, (g32 as int64, its exponent), which the optimizer applies and clears. A
    stacked weight (grouped training, dse/train/niti/stacked.py) has one exponent per member."""

    param: Tensor
    exp: Exponent
    bitwidth: int
    grad: tuple[Tensor, Exponent] | None = None

    def mantissa(self, dtype: torch.dtype = torch.int64) -> Tensor:
        return weight_mantissa(self.param, self.exp, dtype)

    def accumulate(self, g32: Tensor, exp: Exponent) -> None:
        """Add a weight-gradient accumulator (a weight used twice sums both), aligning exponents."""
        g32 = g32.to(torch.int64)
        if self.grad is None:
            self.grad = (g32, exp)
            return
        previous, previous_exp = self.grad
        if isinstance(exp, int) and isinstance(previous_exp, int):
            lowest = min(previous_exp, exp)
            self.grad = ((previous << (previous_exp - lowest)) + (g32 << (exp - lowest)), lowest)
            return
        assert isinstance(exp, tuple) and isinstance(previous_exp, tuple)
        low = tuple(map(min, previous_exp, exp))
        shape = (len(low), *[1] * (g32.dim() - 1))

        def up(values: Tensor, by: list[int]) -> Tensor:
            return values << torch.tensor(by, device=values.device).view(shape)

        self.grad = (up(previous, [p - lo for p, lo in zip(previous_exp, low, strict=True)])
                     + up(g32, [e - lo for e, lo in zip(exp, low, strict=True)]), low)


def _per_tensor_exp(exp: Exponent) -> int:
    assert isinstance(exp, int), "a stacked NITI weight in a layer of one network"
    return exp


SharedWeights = dict[int, NitiWeight]
"""The NITI weights made so far, by id of their parameter: a parameter two layers share (tied
embeddings) is initialised once and keeps one state."""


def _init_weight(param: Tensor, bitwidth: int, generator: torch.Generator) -> int:
    """NITI's initial weights (ti_torch.py UniformWeights, Nov 2021): Xavier-uniform drawn from the
    run's generator, then weight_quant, in place; returns the weight exponent.

    The model's own initialisation is replaced, as the reference draws its own: the exponent fixed
    here bounds the weights for the whole run, so the initial scale matters (docs/niti.md).
    """
    with torch.no_grad():
        nn.init.xavier_uniform_(param, generator=generator)
        mantissa, exp = weight_quant(param, bitwidth)
        param.copy_(_value(mantissa, exp, param.dtype))
    return exp


def niti_weight(param: Tensor, bitwidth: int, generator: torch.Generator,
                shared: SharedWeights | None = None) -> NitiWeight:
    """The NITI state of `param`, initialised now unless `shared` already holds it."""
    if shared is not None and id(param) in shared and shared[id(param)].bitwidth == bitwidth:
        return shared[id(param)]
    weight = NitiWeight(param, _init_weight(param, bitwidth, generator), bitwidth)
    if shared is not None:
        shared[id(param)] = weight
    return weight


def _freeze_bias(bias: Tensor | None) -> None:
    """NITI nets have no biases: a layer's bias is set to zero and frozen (docs/niti.md)."""
    if bias is not None:
        with torch.no_grad():
            bias.zero_()
        bias.requires_grad_(False)


class _IntegerGemm(Protocol):
    """What _GemmFunction needs of a layer: its width, weight and three exact GEMMs."""

    bitwidth: int
    niti_weight: NitiWeight

    @property
    def weight_exp(self) -> int: ...

    def int_forward(self, m_x: Tensor, m_w: Tensor) -> Tensor: ...

    def int_input_grad(self, m_err: Tensor, m_w: Tensor, m_x: Tensor) -> Tensor: ...

    def int_weight_grad(self, m_err: Tensor, m_x: Tensor, m_w: Tensor) -> Tensor: ...


class _GemmFunction(torch.autograd.Function):
    """One NITI GEMM layer: int8 x int8 -> int32, RoundShift back to int8, exponent bookkeeping.

    Its outputs are the value m * 2^e, the exponent e and the slot the error's exponent comes back in
    (autograd passes non-tensor outputs through; their gradients are None).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, layer: _IntegerGemm, m_x: Tensor, exp_x: int,
                in_slot: _ErrorSlot | None) -> tuple[Tensor, int, _ErrorSlot]:
        weight_exp = layer.weight_exp
        m_w = weight_mantissa(weight, weight_exp, torch.float32)
        acc = layer.int_forward(m_x, m_w)
        m_out, shift = act_calc(acc, layer.bitwidth)
        exp_out = exp_x + weight_exp + shift
        out_slot = _ErrorSlot()
        ctx.layer, ctx.weight, ctx.m_x, ctx.m_w = layer, weight, m_x, m_w
        ctx.exp_x, ctx.in_slot, ctx.out_slot = exp_x, in_slot, out_slot
        return _value(m_out, exp_out, _float_dtype(x)), exp_out, out_slot

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, *_: None) -> tuple[Tensor | None, ...]:
        layer: _IntegerGemm = ctx.layer
        weight_exp = layer.weight_exp
        m_err, exp_err = _error_of(grad_out, ctx.out_slot, layer.bitwidth)
        grad_x = None
        if ctx.needs_input_grad[0]:
            acc = layer.int_input_grad(m_err, ctx.m_w, ctx.m_x)
            err_out, shift = act_calc(acc, layer.bitwidth)
            exp_out = exp_err + weight_exp + shift
            if ctx.in_slot is not None:
                ctx.in_slot.write(exp_out)
            grad_x = _value(err_out, exp_out, grad_out.dtype)
        if not ctx.needs_input_grad[1]:  # a frozen weight (requires_grad=False): no gradient, no update
            return grad_x, None, None, None, None, None
        g32 = layer.int_weight_grad(m_err, ctx.m_x, ctx.m_w).to(torch.int64)
        layer.niti_weight.accumulate(g32, exp_err + ctx.exp_x)
        grad_w = _value(g32, exp_err + ctx.exp_x, ctx.weight.dtype)
        return grad_x, grad_w, None, None, None, None


class _NitiGemm(nn.Module):
    """Shared forward of the weight layers: read the input's (m, e), run the integer GEMM, tag."""

    weight: Tensor
    niti_weight: NitiWeight
    bitwidth: int

    @property
    def weight_exp(self) -> int:
        return _per_tensor_exp(self.niti_weight.exp)

    def forward(self, x: Tensor) -> Tensor:
        m_x, exp_x, slot = _activation_of(x, self.bitwidth)
        out, exp, out_slot = _GemmFunction.apply(_plain(x), self.weight, self, m_x, exp_x, slot)
        return _tag(out, exp, out_slot)


class NitiLinear(_NitiGemm):
    """nn.Linear as NITI's TiLinear (no bias: the original bias is zeroed and frozen)."""

    def __init__(self, linear: nn.Linear, bitwidth: int, generator: torch.Generator,
                 shared: SharedWeights | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bitwidth = linear.in_features, linear.out_features, bitwidth
        self.weight = linear.weight
        self.bias = linear.bias
        self.niti_weight = niti_weight(self.weight, bitwidth, generator, shared)
        _freeze_bias(self.bias)

    def int_forward(self, m_x: Tensor, m_w: Tensor) -> Tensor:
        dtype = _exact_dtype(self.in_features * _mantissa_bound(self.bitwidth))
        return m_x.to(dtype) @ m_w.to(dtype).t()

    def int_input_grad(self, m_err: Tensor, m_w: Tensor, m_x: Tensor) -> Tensor:
        dtype = _exact_dtype(self.out_features * _mantissa_bound(self.bitwidth))
        return m_err.to(dtype) @ m_w.to(dtype)

    def int_weight_grad(self, m_err: Tensor, m_x: Tensor, m_w: Tensor) -> Tensor:
        rows = m_x.numel() // self.in_features
        dtype = _exact_dtype(rows * _mantissa_bound(self.bitwidth))
        return m_err.reshape(rows, self.out_features).to(dtype).t() @ m_x.reshape(rows, -1).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bitwidth + 1}"


class NitiConv(_NitiGemm):
    """nn.Conv1d/2d/3d as NITI's TiConv2d: integer convolution, exact int32 accumulation, no bias."""

    def __init__(self, conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, bitwidth: int,
                 generator: torch.Generator, shared: SharedWeights | None = None) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise InputError(f"NITI supports zero-padded convolutions only, got padding_mode="
                             f"{conv.padding_mode!r} in {conv}")
        self.bitwidth = bitwidth
        self.stride, self.dilation, self.groups = tuple(conv.stride), tuple(conv.dilation), conv.groups
        self.kernel_size = tuple(conv.kernel_size)
        self.padding, prepad = conv_geometry(conv)
        if prepad is not None:  # zero padding: only an asymmetric padding='same' needs a pad first
            raise InputError(f"NITI needs symmetric padding; padding='same' is asymmetric in {conv}")
        self.weight = conv.weight
        self.bias = conv.bias
        self.niti_weight = niti_weight(self.weight, bitwidth, generator, shared)
        _freeze_bias(self.bias)

    def _taps(self) -> int:
        return math.prod(self.kernel_size)

    def int_forward(self, m_x: Tensor, m_w: Tensor) -> Tensor:
        fan_in = self.weight.shape[1] * self._taps()
        dtype = _exact_dtype(fan_in * _mantissa_bound(self.bitwidth))
        return convolution(m_x.to(dtype), m_w.to(dtype), None, self.stride, self.padding, self.dilation,
                           self.groups)

    def _backward(self, m_err: Tensor, m_x: Tensor, m_w: Tensor, want_input: bool) -> Tensor:
        """The input gradient (want_input) or the weight gradient, each in the narrowest exact dtype."""
        fan_out = self.weight.shape[0] // self.groups * self._taps()
        positions = m_err.numel() // self.weight.shape[0]
        terms = fan_out if want_input else max(fan_out, positions)
        dtype = _exact_dtype(terms * _mantissa_bound(self.bitwidth))
        grad_input, grad_weight = convolution_grads(
            m_err.to(dtype), m_x.to(dtype), m_w.to(dtype), self.stride, self.padding, self.dilation,
            self.groups, want_input, not want_input)
        grad = grad_input if want_input else grad_weight
        assert grad is not None
        return grad

    def int_input_grad(self, m_err: Tensor, m_w: Tensor, m_x: Tensor) -> Tensor:
        return self._backward(m_err, m_x, m_w, want_input=True)

    def int_weight_grad(self, m_err: Tensor, m_x: Tensor, m_w: Tensor) -> Tensor:
        return self._backward(m_err, m_x, m_w, want_input=False)

    def extra_repr(self) -> str:
        channels = f"{self.weight.shape[1] * self.groups}, {self.weight.shape[0]}"
        return (f"{channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, int{self.bitwidth + 1}")


def matmul_product(m_a: Tensor, m_b: Tensor, bitwidth: int) -> Tensor:
    """The integer accumulator of m_a @ m_b, exact (float32 or float64 as the sum's bound needs)."""
    dtype = _exact_dtype(m_a.shape[-1] * _mantissa_bound(bitwidth))
    return m_a.to(dtype) @ m_b.to(dtype)


def matmul_error(index: int, m_err: Tensor, other: Tensor, shape: torch.Size, bitwidth: int,
                 members: int = 1) -> Tensor:
    """The integer accumulator of the error of operand `index` (0: a, 1: b) of a @ b, summed to its
    `shape` over broadcast batches; its dtype is chosen from one member's sums (`members` stacked
    along the leading axis), so that a stacked operand gets the dtype it gets alone."""
    # Each gradient entry sums at most this many products (broadcast batches included).
    terms = m_err.numel() // members // max(1, m_err.shape[-2 if index == 0 else -1])
    dtype = _exact_dtype(terms * _mantissa_bound(bitwidth))
    if index == 0:  # d(a @ b)/da = err @ b^T
        acc = m_err.to(dtype) @ other.to(dtype).transpose(-1, -2)
    else:  # d(a @ b)/db = a^T @ err
        acc = other.to(dtype).transpose(-1, -2) @ m_err.to(dtype)
    return acc.sum_to_size(shape)


class _MatmulFunction(torch.autograd.Function):
    """a @ b of two NITI activations (attention): integer GEMM forward, both errors backward."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor, bitwidth: int, inputs: tuple[_Activation, _Activation]
                ) -> tuple[Tensor, int, _ErrorSlot]:
        (m_a, exp_a, _), (m_b, exp_b, _) = inputs
        m_out, shift = act_calc(matmul_product(m_a, m_b, bitwidth), bitwidth)
        exp_out = exp_a + exp_b + shift
        out_slot = _ErrorSlot()
        ctx.bitwidth, ctx.inputs, ctx.out_slot = bitwidth, inputs, out_slot
        return _value(m_out, exp_out, _float_dtype(a)), exp_out, out_slot

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, *_: None) -> tuple[Tensor | None, ...]:
        (m_a, exp_a, slot_a), (m_b, exp_b, slot_b) = ctx.inputs
        m_err, exp_err = _error_of(grad_out, ctx.out_slot, ctx.bitwidth)
        grads: list[Tensor | None] = [None, None]
        operands = ((m_a, exp_b, slot_a, m_b), (m_b, exp_a, slot_b, m_a))
        for index, (mine, other_exp, slot, other) in enumerate(operands):
            if not ctx.needs_input_grad[index]:
                continue
            err, shift = act_calc(matmul_error(index, m_err, other, mine.shape, ctx.bitwidth), ctx.bitwidth)
            exp_out = exp_err + other_exp + shift
            if slot is not None:
                slot.write(exp_out)
            grads[index] = _value(err, exp_out, grad_out.dtype)
        return grads[0], grads[1], None, None


class NitiMatmul(nn.Module):
    """dse.train.layers.Matmul (attention's a @ b) as a NITI integer GEMM."""

    def __init__(self, bitwidth: int) -> None:
        super().__init__()
        self.bitwidth = bitwidth

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        inputs = (_activation_of(a, self.bitwidth), _activation_of(b, self.bitwidth))
        out, exp, slot = _MatmulFunction.apply(_plain(a), _plain(b), self.bitwidth, inputs)
        return _tag(out, exp, slot)


class _EmbeddingFunction(torch.autograd.Function):
    """A table lookup is a GEMM with a one-hot input: rows of m_w with exponent e_w, exact."""

    @staticmethod
    def forward(ctx: Any, indices: Tensor, weight: Tensor, layer: NitiEmbedding
                ) -> tuple[Tensor, int, _ErrorSlot]:
        out_slot = _ErrorSlot()
        ctx.layer, ctx.weight, ctx.indices, ctx.out_slot = layer, weight, indices, out_slot
        return weight.detach()[indices].clone(), layer.weight_exp, out_slot

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, *_: None) -> tuple[Tensor | None, ...]:
        weight: Tensor = ctx.weight
        layer: NitiEmbedding = ctx.layer
        m_err, exp_err = _error_of(grad_out, ctx.out_slot, layer.bitwidth)
        rows = m_err.reshape(-1, weight.shape[1]).double()
        g32 = torch.zeros(weight.shape, dtype=torch.float64, device=weight.device)
        g32.index_add_(0, ctx.indices.reshape(-1), rows)
        if layer.padding_idx is not None:
            g32[layer.padding_idx] = 0
        layer.niti_weight.accumulate(g32.to(torch.int64), exp_err)
        return None, _value(g32, exp_err, weight.dtype), None


class NitiEmbedding(nn.Module):
    """nn.Embedding as an integer table updated by the NITI rule (a one-hot GEMM; not in the paper)."""

    def __init__(self, embedding: nn.Embedding, bitwidth: int, generator: torch.Generator,
                 shared: SharedWeights | None = None) -> None:
        super().__init__()
        if embedding.max_norm is not None:
            raise InputError(f"NITI cannot renormalise embeddings: max_norm={embedding.max_norm} "
                             f"in {embedding}")
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx, self.bitwidth = embedding.padding_idx, bitwidth
        self.weight = embedding.weight
        self.niti_weight = niti_weight(self.weight, bitwidth, generator, shared)

    @property
    def weight_exp(self) -> int:
        return _per_tensor_exp(self.niti_weight.exp)

    def forward(self, indices: Tensor) -> Tensor:
        out, exp, slot = _EmbeddingFunction.apply(indices, self.weight, self)
        return _tag(out, exp, slot)


# ----------------------------------------------------------------------------------------------
# Loss and optimizer
