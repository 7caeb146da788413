"""A layer a group runs member by member hands its input the gradient in the layout it has alone. A
user's layer, or any on a non-contiguous input, joins its members' gradients as each has it
(`_UnbindAsAlone`); torch's own layers of READS_INPUT_ONCE on a contiguous input join them as
torch.stack does, contiguous, at no extra cost, which is alone's layout only while those layers hand
a contiguous input a contiguous gradient whatever the layout of their output's gradient."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from dse.models.layers import PositionEmbedding
from dse.train.stacked import READS_INPUT_ONCE

ROWS = 7
LAYERS: list[tuple[nn.Module, tuple[int, ...]]] = [
    (nn.BatchNorm1d(6), (ROWS, 6)), (nn.BatchNorm1d(6), (ROWS, 6, 5)), (nn.BatchNorm2d(6), (ROWS, 6, 5, 4)),
    (nn.BatchNorm3d(6), (ROWS, 6, 3, 4, 5)), (nn.LayerNorm(6), (ROWS, 6)), (nn.LayerNorm(6), (ROWS, 5, 6)),
    (nn.GroupNorm(2, 6), (ROWS, 6, 5)), (nn.GroupNorm(3, 6), (ROWS, 6, 4, 5)),
    (nn.GRU(6, 4, batch_first=True), (ROWS, 5, 6)), (nn.LSTM(6, 4, batch_first=True), (ROWS, 5, 6)),
    (nn.RNN(6, 4, batch_first=True), (ROWS, 5, 6)), (nn.LSTM(6, 4), (5, ROWS, 6)),
]
"""torch's layers of READS_INPUT_ONCE, on inputs of the shapes a network gives them."""


def test_every_torch_layer_that_reads_its_input_once_is_checked() -> None:
    """(PositionEmbedding, dse's own, hands its input its output's gradient: the transformer proxy's,
    from a residual of LayerNorm's, is contiguous; the grouped tests train it as alone.)"""
    assert {type(layer) for layer, _ in LAYERS} == READS_INPUT_ONCE - {PositionEmbedding}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("case", range(len(LAYERS)))
def test_a_torch_layer_that_reads_its_input_once_hands_a_contiguous_input_a_contiguous_gradient(
        case: int, training: bool) -> None:
    layer, shape = LAYERS[case]
    layer.train(training)
    generator = torch.Generator().manual_seed(case)
    x = torch.randn(*shape, generator=generator).requires_grad_()
    out = layer(x)
    y = out[0] if isinstance(out, tuple) else out
    for order in itertools.permutations(range(y.dim())):  # the output's gradient in every dense layout
        grad = torch.randn([y.shape[a] for a in order], generator=generator).permute(
            [order.index(a) for a in range(y.dim())])
        x.grad = None
        out = layer(x)
        (out[0] if isinstance(out, tuple) else out).backward(grad)
        assert x.grad is not None
        assert x.grad.is_contiguous(), (order, x.grad.stride())
