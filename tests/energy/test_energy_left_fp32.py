"""A sweep prices what one real training step of a trial's network does: the GEMMs training leaves in
fp32 (modules and functions quantize_model cannot convert) in fp32, with torch's fp32 sums whatever
accumulation the trial names, and the others in the trial's formats."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from support import fp32_calls
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from dse.sweep import parse_config
from dse.sweep.energy import EnergyEstimator
from dse.train.config import TrainConfig
from dse.train.layers import UnconvertedGemmWarning, quantize_model
from dse.train.policy import QuantPolicy

aten = torch.ops.aten
BATCH = 8


def _on_e4m3_grid(t: Tensor) -> bool:
    """Every value has at most 4 significant bits (fp8_e4m3's 3 stored and the hidden one), at any
    power-of-two scale: what training's quantizer left it (an fp32 value has 24)."""
    mantissa, _ = torch.frexp(t.detach())
    return bool(((mantissa * 16) == (mantissa * 16).round()).all())


class _ForwardMacs(TorchDispatchMode):
    """The multiply-adds of each GEMM kernel a forward runs, split by whether both its operands are
    quantized (fp8_e4m3) or not."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = {"quantized": 0, "fp32": 0}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        operands = None
        if packet in (aten.mm, aten.bmm, aten.mv):
            operands = args[0], args[1]
        elif packet in (aten.addmm, aten.baddbmm, aten.addmv, aten.addbmm):
            operands = args[1], args[2]
        if operands is not None:
            a, b = operands
            macs = a.numel() * (b.shape[-1] if b.dim() > 1 else 1)
        elif packet is aten.convolution:
            a, b = args[0], args[1]
            per = b.shape[1] * math.prod(b.shape[2:])
            macs = (a.numel() if args[6] else out.numel()) * per
        else:
            return out
        self.macs["quantized" if _on_e4m3_grid(a) and _on_e4m3_grid(b) else "fp32"] += macs
        return out


def _trained_macs(factory: str, config: TrainConfig) -> dict[str, int]:
    """Forward multiply-adds of one real training step of the quantized network, by operand format."""
    torch.manual_seed(0)
    network = getattr(fp32_calls, factory)((64,), 10)
    x = torch.randn(BATCH, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnconvertedGemmWarning)
        quantize_model(network, QuantPolicy.from_config(config), example_input=x[:2])
    recorder = _ForwardMacs()
    with recorder:
        loss = network(x).logsumexp(1).mean()
    loss.backward()
    return recorder.macs


SWEEP = """\
name: priced
task: {{model: support.fp32_calls:{factory}, dataset: digits, batch_size: {batch}}}
energy: {{node: 7nm, workloads: [proxy]}}
trials:
  - {{format: fp8_e4m3}}
"""


def _priced_macs(factory: str, config: TrainConfig) -> dict[str, int]:
    """Forward multiply-adds the sweep prices per iteration, by the format it prices them in."""
    estimator = EnergyEstimator(parse_config(SWEEP.format(factory=factory, batch=BATCH), "s.yaml").energy)
    workload = estimator.proxy(config)
    point = estimator.settings.points[0]
    macs = {"quantized": 0, "fp32": 0}
    for part, _, _ in estimator.iteration_frames(workload, config, point, BATCH):
        macs["quantized" if part.tensors.quantizes_gemms else "fp32"] += part.workload.forward_macs(BATCH)
    return macs


@pytest.mark.parametrize("factory", fp32_calls.CALLS)
def test_a_gemm_function_training_leaves_fp32_is_priced_in_fp32(factory: str) -> None:
    """torch.einsum, torch.inner, torch.addmv, torch.addbmm and F.conv_transpose1d/2d/3d over a weight
    run in fp32 in an fp8 trial (before: priced in fp8, the tracer and training naming the GEMM apart;
    addmv and addbmm were not priced at all)."""
    config = TrainConfig(model=f"support.fp32_calls:{factory}", dataset="digits", format="fp8_e4m3",
                         batch_size=BATCH)
    trained = _trained_macs(factory, config)
    assert trained["fp32"] > 0 and trained["quantized"] > 0
    assert _priced_macs(factory, config) == trained


GRU = """\
name: priced
task: {model: support.own_networks:last_step_gru, dataset: digits}
energy: {node: 7nm, workloads: [proxy]}
trials:
  - {format: int8}
"""


def test_a_layer_training_leaves_fp32_sums_in_fp32_whatever_the_trial_accumulates_in() -> None:
    """An nn.GRU is never converted: its GEMMs sum in torch's fp32 whatever `accumulation` says, so its
    output in a real step is the same bits with an fp16 accumulator as without, while the quantized
    head's is not; the price of its GEMMs is likewise the same (before: its accumulation priced in
    fp16), the head's not."""
    from support import own_networks

    def outputs(accumulation: str | None) -> tuple[Tensor, Tensor]:
        torch.manual_seed(0)
        network = own_networks.last_step_gru((64,), 10)
        x = torch.randn(BATCH, 64)
        config = TrainConfig(format="int8", accumulation=accumulation, accumulation_chunk=4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnconvertedGemmWarning)
            quantize_model(network, QuantPolicy.from_config(config), example_input=x[:2])
        steps, _ = network.rnn(x.reshape(BATCH, 8, 8))
        return steps, network.head(steps[:, -1])

    (gru, head), (gru_fp16, head_fp16) = outputs(None), outputs("fp16")
    assert torch.equal(gru, gru_fp16) and not torch.equal(head, head_fp16)

    estimator = EnergyEstimator(parse_config(GRU, "s.yaml").energy)
    point = estimator.settings.points[0]

    def priced(accumulation: str | None) -> dict[str, float]:
        config = TrainConfig(model="support.own_networks:last_step_gru", dataset="digits", format="int8",
                             accumulation=accumulation, accumulation_chunk=4)
        workload = estimator.proxy(config)
        by_layer: dict[str, float] = {}
        for _, _, frame in estimator.iteration_frames(workload, config, point, BATCH):
            gemms = frame[frame["pass"] != "update"]
            for layer, pj in gemms.groupby("layer")["energy_pj"].sum().items():
                by_layer[str(layer)] = by_layer.get(str(layer), 0.0) + float(pj)
        return by_layer

    plain, accumulated = priced(None), priced("fp16")
    rnn = sorted(name for name in plain if name.startswith("rnn."))
    assert rnn and [plain[name] for name in rnn] == [accumulated[name] for name in rnn]
    assert plain["head"] != accumulated["head"]


class _OneOperand(torch.nn.Module):
    """A linear layer, then a one-operand einsum in one of torch's three call forms."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.fc = torch.nn.Linear(64, 16)
        self.w = torch.nn.Parameter(torch.randn(16, 16))

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        if self.form == "equation":
            return h + torch.einsum("ii->i", self.w) + torch.einsum("bi->b", h).unsqueeze(1)
        if self.form == "list":
            return h + torch.einsum("ii->i", [self.w])
        return h + torch.einsum(self.w, [0, 0], [0])


@pytest.mark.parametrize("form", ["equation", "list", "sublists"])
def test_a_one_operand_einsum_is_no_gemm_to_warn_of_or_price(form: str) -> None:
    """A trace ("ii->i") or a sum ("bi->b") of one operand multiplies no matrices: training names no
    GEMM left fp32 (before: UnconvertedGemmWarning for each) and the tracer finds none."""
    from dse.models.trace import trace_model
    from dse.sweep.energy import left_fp32

    network = _OneOperand(form)
    x = torch.randn(BATCH, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_model(network, QuantPolicy.from_config(TrainConfig(format="int8")), example_input=x[:2])
        network(x).sum().backward()
    assert not [w for w in caught if issubclass(w.category, UnconvertedGemmWarning)]
    workload = trace_model(_OneOperand(form), x[:2], form, BATCH, left_fp32=left_fp32())
    assert [layer.name for layer in workload.layers] == ["fc"] and workload.fp32_layers == ()
