"""The energy model prices block-scaled GEMMs as training runs them: a traced training step shows each
quantization (of which tensor, and whether that tensor was quantized before) and, GEMM by GEMM, that
every operand is reduced along the axis its blocks run along; the model's passes must say the same."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from dse.energy import TrainingFormats, build_model, datapath_for
from dse.energy.iteration import Array, layer_passes
from dse.formats import get
from dse.models.layers import Matmul
from dse.models.workloads import get_workload
from dse.precision import ACTIVATIONS, GRADIENTS, WEIGHTS
from dse.train.config import TrainConfig
from dse.train.layers import CONV_AXES, BlockQuantizer, quantize_model
from dse.train.policy import QuantPolicy

FORMAT = "mxfp8_e4m3"
WIDTH = 64  # two blocks of 32 along every axis


class _Net(nn.Module):
    """A Linear layer and an activation x activation product (attention-like scores)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH, bias=False)
        self.scores = Matmul()

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        return self.scores(h, x.transpose(-1, -2))


class _Operand:
    """A quantizer's output: which layer and tensor class made it, from which tensor (its address), with
    its blocks along which axis, and whether that tensor was quantized before (a re-quantization)."""

    def __init__(self, layer: str, tensor: str, source: int, out: Tensor, axis: int | None,
                 again: bool) -> None:
        self.layer, self.tensor, self.source, self.again = layer, tensor, source, again
        self.block_stride = None if axis is None else out.stride(axis)


_aten = torch.ops.aten


class _GemmTrace(TorchDispatchMode):
    """Records every quantization and, for every GEMM (as aten runs it, backward included) whose
    operands are quantizer outputs, each operand and whether the GEMM reduces along the axis its blocks
    run along. Operands are told apart by address: views (transposes, reshapes) keep their tensor's
    address and show their reduced axis by its stride, which the quantizer output's block axis has."""

    OPERANDS: dict[Any, slice] = {_aten.mm.default: slice(0, 2), _aten.bmm.default: slice(0, 2),
                                  _aten.addmm.default: slice(1, 3), _aten.baddbmm.default: slice(1, 3)}

    def __init__(self) -> None:
        super().__init__()
        self.operands: dict[int, _Operand] = {}
        self.kept: list[Tensor] = []  # inputs and outputs stay alive, so their addresses stay theirs
        self.gemms: list[tuple[tuple[_Operand, bool], ...]] = []

    def record(self, layer: str, tensor: str, x: Tensor, out: Tensor, axis: int | None) -> Tensor:
        assert out.is_contiguous()
        again = any(o.source == x.data_ptr() and o.layer == layer for o in self.operands.values())
        self.operands[out.data_ptr()] = _Operand(layer, tensor, x.data_ptr(), out, axis, again)
        self.kept += [x, out]
        return out

    def trace(self, layer: str, tensor: str, quantizer: BlockQuantizer) -> None:
        along_axes = quantizer.along_axes  # (`along` is one axis of it) one quantization per axis

        def traced(x: Tensor, axes: Sequence[int]) -> list[Tensor]:
            return [self.record(layer, tensor, x, out, axis) for out, axis in zip(along_axes(x, axes), axes,
                                                                                   strict=True)]

        quantizer.along_axes = traced  # type: ignore[method-assign]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        where = self.OPERANDS.get(func)
        if where is not None:
            operands = [self.operands.get(t.data_ptr()) for t in args[where]]
            if all(o is not None for o in operands):
                self.gemms.append(tuple((o, t.stride(d) == o.block_stride)  # type: ignore[union-attr]
                                        for o, t, d in zip(operands, args[where], (-1, -2), strict=True)))
        return func(*args, **(kwargs or {}))


def _trace_step() -> _GemmTrace:
    torch.manual_seed(0)
    net = _Net()
    policy = QuantPolicy.from_config(TrainConfig(model="mlp", dataset="digits", format=FORMAT))
    quantize_model(net, policy)
    trace = _GemmTrace()
    for name, module in net.named_modules():
        layer = getattr(module, "gemm_quant", None)
        for tensor in (ACTIVATIONS, WEIGHTS, GRADIENTS):
            if layer is not None and getattr(layer, tensor) is not None:
                trace.trace(name, tensor, getattr(layer, tensor))
    x = torch.randn(2, WIDTH, WIDTH, requires_grad=True)  # every layer computes all three GEMMs
    with trace:
        net(x).square().sum().backward()
    return trace


@pytest.fixture(scope="module")
def trace() -> _GemmTrace:
    return _trace_step()


def test_training_quantizes_each_block_operand_once_per_gemm_along_its_reduction_axis(
        trace: _GemmTrace) -> None:
    calls = Counter((o.layer, o.tensor) for o in trace.operands.values())
    assert calls == {("fc", ACTIVATIONS): 2, ("fc", WEIGHTS): 2, ("fc", GRADIENTS): 2,
                     ("scores", ACTIVATIONS): 4, ("scores", GRADIENTS): 2}
    assert len(trace.gemms) == 6  # three per layer, every operand a quantizer output
    assert all(along for pair in trace.gemms for _, along in pair)  # every GEMM on the block datapath


def _arrays(trace: _GemmTrace) -> dict[tuple[str, int], Array]:
    """Which of the model's layer arrays each traced source tensor is: x / a (A), w / b (B), dy (OUT)
    (a @ b's first activation quantized is a, the second b)."""
    arrays: dict[tuple[str, int], Array] = {}
    for o in trace.operands.values():
        key = (o.layer, o.source)
        if key in arrays:
            continue
        if o.tensor == GRADIENTS:
            arrays[key] = Array.OUT
        elif o.tensor == WEIGHTS or any(k[0] == o.layer and v == Array.A for k, v in arrays.items()):
            arrays[key] = Array.B
        else:
            arrays[key] = Array.A
    return arrays


_PASS_OF = {frozenset({Array.A, Array.B}): "forward", frozenset({Array.OUT, Array.B}): "backward_data",
            frozenset({Array.A, Array.OUT}): "backward_weight"}


def test_the_model_prices_a_quantization_for_each_operand_a_gemm_quantizes_again(trace: _GemmTrace) -> None:
    formats = TrainingFormats.of(FORMAT).resolve(get_workload("resnet18"))
    model: dict[tuple[str, str, Array], bool] = {}
    for layer, b_is_weight in (("fc", True), ("scores", False)):
        for p in layer_passes(formats, b_is_weight):
            for use in (p.a, p.b):
                model[(layer, p.name, use.array)] = use.requantized
    arrays = _arrays(trace)
    trained: dict[tuple[str, str, Array], bool] = {}
    for pair in trace.gemms:
        layer = pair[0][0].layer
        used = [arrays[(layer, operand.source)] for operand, _ in pair]
        name = _PASS_OF[frozenset(used)]
        for array, (operand, _) in zip(used, pair, strict=True):
            trained[(layer, name, array)] = operand.again
    assert trained == model
    assert not all(model.values()) and any(model.values())  # both cases occur


def test_a_gemm_across_blocks_converts_the_operand_instead_of_sharing_its_scale() -> None:
    """Across its blocks an MX operand enters as FP element x scale (per element), and the unit is the
    FP dot-product unit; along them it keeps the block datapath and converts nothing."""
    c = build_model("45nm").components
    mx = get(FORMAT)
    along = datapath_for(mx, mx, c)
    across = datapath_for(mx, mx, c, across_blocks=(False, True))
    assert along.name == "block-fp" and along.a_convert_pj == along.b_convert_pj == 0
    assert across.name == "fp" and across.b_convert_pj > 0 and across.a_convert_pj > 0  # a joins b's unit
    fp = get("fp8_e4m3")
    assert datapath_for(fp, fp, c, across_blocks=(True, True)) == datapath_for(fp, fp, c)  # no blocks
    nvfp4 = get("nvfp4")  # the per-tensor scales stay one multiply per output each
    assert datapath_for(nvfp4, nvfp4, c, across_blocks=(True, True)).per_output.multiply_pj == \
        pytest.approx(2 * c.fp_mul(8, 23))


def test_convolutions_quantize_their_block_operands_per_gemm_as_linear_layers_do() -> None:
    """A convolution's GEMMs reduce over the input channels forward, the output channels in
    backward-data and the batch in backward-weight: its block-scaled operands are quantized per GEMM
    along those axes (tests/train check the axes bit for bit), as a Linear layer's are, so the model
    prices conv layers with the weight-layer passes checked above."""
    net = nn.Sequential(nn.Conv2d(WIDTH, WIDTH, 3))
    quantize_model(net, QuantPolicy.from_config(TrainConfig(model="mlp", dataset="digits", format=FORMAT)))
    layer = net[0].gemm_quant  # type: ignore[union-attr]
    for tensor in (ACTIVATIONS, WEIGHTS, GRADIENTS):
        assert isinstance(getattr(layer, tensor), BlockQuantizer), tensor
    assert layer.op.axes == CONV_AXES
