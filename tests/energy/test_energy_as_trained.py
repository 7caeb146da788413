"""The energy model prices block-scaled GEMMs as training runs them: a traced training step shows which
tensors are quantized (once each) and, GEMM by GEMM, whether each operand is reduced along the axis
its blocks run along; the model's passes must say the same."""

from __future__ import annotations

from collections import Counter
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
from dse.precision import ACTIVATIONS, GRADIENTS, WEIGHT_GRADS, WEIGHTS
from dse.train.config import TrainConfig
from dse.train.layers import quantize_model
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
    """A quantizer's output: which layer and tensor class made it, and the how-manieth of them."""

    def __init__(self, layer: str, tensor: str, index: int) -> None:
        self.layer, self.tensor, self.index = layer, tensor, index


_aten = torch.ops.aten


class _GemmTrace(TorchDispatchMode):
    """Records, for every GEMM (as aten runs it, backward included) whose operands are quantizer
    outputs, each operand and whether the GEMM reduces along that tensor's last (stride-1) axis, the
    axis its blocks run along. Operands are told apart by address: views (transposes, reshapes) keep
    their tensor's address and show their reduced axis by its stride."""

    OPERANDS: dict[Any, slice] = {_aten.mm.default: slice(0, 2), _aten.bmm.default: slice(0, 2),
                                  _aten.addmm.default: slice(1, 3), _aten.baddbmm.default: slice(1, 3)}

    def __init__(self) -> None:
        super().__init__()
        self.operands: dict[int, _Operand] = {}
        self.kept: list[Tensor] = []  # quantizer outputs stay alive, so their addresses stay theirs
        self.gemms: list[tuple[tuple[_Operand, bool], ...]] = []

    def quantizer(self, layer: str, tensor: str, quantize: Any) -> Any:
        def traced(x: Tensor) -> Tensor:
            out = quantize(x)
            assert out.is_contiguous()  # so its blocks run along its stride-1 last axis
            index = sum(1 for o in self.operands.values() if (o.layer, o.tensor) == (layer, tensor))
            self.operands[out.data_ptr()] = _Operand(layer, tensor, index)
            self.kept.append(out)
            return out
        return traced

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        where = self.OPERANDS.get(func)
        if where is not None:
            pair = tuple((self.operands.get(t.data_ptr()), t.stride(d) == 1)
                         for t, d in zip(args[where], (-1, -2), strict=True))
            if all(operand is not None for operand, _ in pair):
                self.gemms.append(pair)  # type: ignore[arg-type]
        return func(*args, **(kwargs or {}))


def _trace_step() -> _GemmTrace:
    torch.manual_seed(0)
    net = _Net()
    policy = QuantPolicy.from_config(TrainConfig(model="mlp", dataset="digits", format=FORMAT))
    quantize_model(net, policy)
    trace = _GemmTrace()
    for name, module in net.named_modules():
        layer = getattr(module, "gemm_quant", None)
        for tensor in (ACTIVATIONS, WEIGHTS, GRADIENTS, WEIGHT_GRADS):
            if layer is not None and getattr(layer, tensor) is not None:
                setattr(layer, tensor, trace.quantizer(name, tensor, getattr(layer, tensor)))
    x = torch.randn(2, WIDTH, WIDTH, requires_grad=True)  # every layer computes all three GEMMs
    with trace:
        net(x).square().sum().backward()
    return trace


@pytest.fixture(scope="module")
def trace() -> _GemmTrace:
    return _trace_step()


def test_training_quantizes_each_tensor_once_and_reuses_it(trace: _GemmTrace) -> None:
    calls = Counter((o.layer, o.tensor) for o in trace.operands.values())
    assert calls == {("fc", ACTIVATIONS): 1, ("fc", WEIGHTS): 1, ("fc", GRADIENTS): 1,
                     ("fc", WEIGHT_GRADS): 1, ("scores", ACTIVATIONS): 2, ("scores", GRADIENTS): 1}
    assert len(trace.gemms) == 6  # three per layer, every operand a quantizer output


def _array(layer: str, operand: _Operand) -> Array:
    """Which of the model's layer arrays a traced operand is: a / x (A), b / w (B), dy (OUT)."""
    if operand.tensor == GRADIENTS:
        return Array.OUT
    if operand.tensor == WEIGHTS or (layer == "scores" and operand.index == 1):
        return Array.B
    return Array.A


_PASS_OF = {frozenset({Array.A, Array.B}): "forward", frozenset({Array.OUT, Array.B}): "backward_data",
            frozenset({Array.A, Array.OUT}): "backward_weight"}


def test_the_model_reduces_along_or_across_blocks_as_training_does(trace: _GemmTrace) -> None:
    formats = TrainingFormats.of(FORMAT).resolve(get_workload("resnet18"))
    model: dict[tuple[str, str, Array], bool] = {}
    for layer, b_is_weight in (("fc", True), ("scores", False)):
        for p in layer_passes(formats, b_is_weight):
            for use in (p.a, p.b):
                model[(layer, p.name, use.array)] = use.along_blocks
    trained: dict[tuple[str, str, Array], bool] = {}
    for pair in trace.gemms:
        layer = pair[0][0].layer
        arrays = [_array(layer, operand) for operand, _ in pair]
        name = _PASS_OF[frozenset(arrays)]
        for array, (_, along) in zip(arrays, pair, strict=True):
            trained[(layer, name, array)] = along
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


def test_convolutions_block_along_the_channels_their_forward_reduces() -> None:
    """A convolution's GEMMs reduce over channels (and the kernel window) forward, over output channels
    in backward-data and over batch and positions in backward-weight: blocked along axis 1, its
    operands meet their blocks as a Linear layer's do, so the model prices conv layers with the
    weight-layer passes checked above."""
    net = nn.Sequential(nn.Conv2d(WIDTH, WIDTH, 3))
    quantize_model(net, QuantPolicy.from_config(TrainConfig(model="mlp", dataset="digits", format=FORMAT)))
    layer = net[0].gemm_quant  # type: ignore[union-attr]
    for tensor in (ACTIVATIONS, WEIGHTS, GRADIENTS, WEIGHT_GRADS):
        assert getattr(layer, tensor).format.scaling.axis == 1, tensor
