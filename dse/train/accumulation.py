"""Emulated accumulation precision of the quantized GEMMs.

A hardware dot product adds its products into an accumulator register of limited precision. To
emulate it, each GEMM's reduction is split into chunks of `chunk` reduction indices; each chunk's
partial product is computed by torch in fp32, and the running sum is rounded onto the accumulator
format after every chunk:

    acc = Q(partial_0);  acc = Q(acc + partial_i) for i = 1, 2, ...;  result = acc

`chunk` = 1 rounds after every product (a scalar MAC); a larger chunk models an adder tree or a
dot-product unit that sums `chunk` products (in fp32 here) before each rounding; `chunk` >= the
reduction length rounds the finished fp32 sum once.

The functions below are the three GEMMs of each layer type, chunked along their reduction axis:

    Linear  forward y = x w^T over in_features; backward-data dx = dy w over out_features;
            backward-weight dw = dy^T x over the flattened batch rows
    Conv    forward over input channels (per group); a chunk is `chunk` input channels x every kernel
            tap; backward-data over output channels (per group), likewise x kernel taps;
            backward-weight over samples, a chunk is `chunk` samples x every output position
    Matmul  a @ b over the inner dim; da = dy b^T over b's columns; db = a^T dy over a's rows
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Partial = Callable[[int, int], Tensor]
"""(start, stop) -> the fp32 partial product of reduction indices start:stop."""

OperandPartial = Callable[..., Tensor]
"""(*operands, start, stop) -> the fp32 partial product of the operands' reduction indices start:stop."""


@dataclass(frozen=True)
class Accumulator:
    """An accumulator format (`quantize`: nearest rounding onto its grid) and its chunk length."""

    quantize: Callable[[Tensor], Tensor]
    chunk: int

    def fold(self, partial: Partial, length: int, first: Tensor | None = None) -> Tensor:
        """The running sum of the chunks' partial products, rounded after each chunk (`first`: the
        first chunk's partial product, where the caller has it already)."""
        if length <= 0:
            return self.quantize(partial(0, 0))
        acc = self.quantize(partial(0, min(self.chunk, length)) if first is None else first)
        for start in range(self.chunk, length, self.chunk):
            acc = self.quantize(acc.add_(partial(start, min(start + self.chunk, length))))
        return acc

    def fold_gemm(self, partial: OperandPartial, operands: tuple[Tensor, ...], length: int) -> Tensor:
        """`fold` of partial(*operands, start, stop): a GEMM whose operands a grouped run's
        accumulators (dse/train/stacked.py) may take apart along their leading member axis."""
        return self.fold(lambda start, stop: partial(*operands, start, stop), length)


# --- Linear ----------------------------------------------------------------------------------------


def linear_forward(x: Tensor, weight: Tensor, accumulator: Accumulator) -> Tensor:
    """x (..., in) w^T with w (out, in), reduced over in_features."""
    return accumulator.fold(lambda a, b: F.linear(x[..., a:b], weight[:, a:b]), x.shape[-1])


def linear_backward_data(dy: Tensor, weight: Tensor, accumulator: Accumulator) -> Tensor:
    """dy (..., out) w, reduced over out_features."""
    return accumulator.fold(lambda a, b: dy[..., a:b] @ weight[a:b], dy.shape[-1])


def linear_backward_weight(dy: Tensor, x: Tensor, accumulator: Accumulator) -> Tensor:
    """dy^T x over the flattened leading dims (the rows of the batch)."""
    rows_dy, rows_x = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    return accumulator.fold(lambda a, b: rows_dy[a:b].t() @ rows_x[a:b], rows_dy.shape[0])


# --- Conv ------------------------------------------------------------------------------------------


def _channels_of_each_group(t: Tensor, groups: int, start: int, stop: int, dim: int) -> Tensor:
    """Channels start:stop of every group of `groups` equal channel groups along `dim`."""
    if groups == 1:
        return t.narrow(dim, start, stop - start)
    return t.unflatten(dim, (groups, t.shape[dim] // groups)).narrow(dim + 1, start, stop - start).flatten(
        dim, dim + 1)


_CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def convolution(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """F.conv1d, conv2d or conv3d, as the weight's dimensions say (numeric padding)."""
    return _CONVOLUTIONS[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)


def convolution_grads(dy: Tensor, x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
                      dilation: Sequence[int], groups: int, need_data: bool,
                      need_weight: bool) -> tuple[Tensor | None, Tensor | None]:
    """(dL/dx, dL/dw) of a bias-free `convolution`, each None unless asked for."""
    dx, dw, _ = torch.ops.aten.convolution_backward(
        dy, x, weight, None, list(stride), list(padding), list(dilation), False, [0] * len(stride), groups,
        [need_data, need_weight, False])
    return (dx if need_data else None), (dw if need_weight else None)


def conv_forward(x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
                 dilation: Sequence[int], groups: int, accumulator: Accumulator) -> Tensor:
    """conv(x, w) without bias, reduced over the input channels of each group (x kernel taps)."""

    def partial(a: int, b: int) -> Tensor:
        return convolution(_channels_of_each_group(x, groups, a, b, 1), weight[:, a:b], None, stride, padding,
                           dilation, groups)

    return accumulator.fold(partial, weight.shape[1])


def conv_backward_data(dy: Tensor, x: Tensor, weight: Tensor, stride: Sequence[int],
                       padding: Sequence[int], dilation: Sequence[int], groups: int,
                       accumulator: Accumulator) -> Tensor:
    """dL/dx, reduced over the output channels of each group (x kernel taps)."""

    def partial(a: int, b: int) -> Tensor:
        dx, _ = convolution_grads(_channels_of_each_group(dy, groups, a, b, 1), x,
                                  _channels_of_each_group(weight, groups, a, b, 0), stride, padding, dilation,
                                  groups, need_data=True, need_weight=False)
        assert dx is not None
        return dx

    return accumulator.fold(partial, weight.shape[0] // groups)


def conv_backward_weight(dy: Tensor, x: Tensor, weight: Tensor, stride: Sequence[int],
                         padding: Sequence[int], dilation: Sequence[int], groups: int,
                         accumulator: Accumulator) -> Tensor:
    """dL/dw, reduced over the samples (x output positions)."""

    def partial(a: int, b: int) -> Tensor:
        _, dw = convolution_grads(dy[a:b], x[a:b], weight, stride, padding, dilation, groups,
                                  need_data=False, need_weight=True)
        assert dw is not None
        return dw

    return accumulator.fold(partial, x.shape[0])


# --- Matmul ----------------------------------------------------------------------------------------


def _matmul_partial(a: Tensor, b: Tensor, s: int, e: int) -> Tensor:
    return a[..., s:e] @ b[..., s:e, :]


def _matmul_a_partial(dy: Tensor, b: Tensor, s: int, e: int) -> Tensor:
    return dy[..., s:e] @ b[..., :, s:e].transpose(-1, -2)


def _matmul_b_partial(a: Tensor, dy: Tensor, s: int, e: int) -> Tensor:
    return a[..., s:e, :].transpose(-1, -2) @ dy[..., s:e, :]


def matmul_forward(a: Tensor, b: Tensor, accumulator: Accumulator) -> Tensor:
    """a (..., n, k) @ b (..., k, m), reduced over k."""
    return accumulator.fold_gemm(_matmul_partial, (a, b), a.shape[-1])


def matmul_backward_a(dy: Tensor, b: Tensor, accumulator: Accumulator) -> Tensor:
    """dy (..., n, m) @ b^T, reduced over m (before any sum over broadcast batch dims)."""
    return accumulator.fold_gemm(_matmul_a_partial, (dy, b), dy.shape[-1])


def matmul_backward_b(a: Tensor, dy: Tensor, accumulator: Accumulator) -> Tensor:
    """a^T @ dy (..., n, m), reduced over n (before any sum over broadcast batch dims)."""
    return accumulator.fold_gemm(_matmul_b_partial, (a, dy), dy.shape[-2])
