"""Quantized GEMM layers, quantize_model and the quantization policy (dse/train/layers.py, policy.py)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dse.errors import InputError
from dse.formats import Scaling, get
from dse.train.config import TrainConfig
from dse.train.layers import (
    ConvOp,
    LinearOp,
    Matmul,
    QuantLinear,
    quantize_model,
    quantized_layers,
    set_quantization,
)
from dse.train.policy import QuantPolicy, TensorQuant, lu_layer_scale

torch.set_num_threads(1)

INT4, INT5, INT6, INT3 = get("int4"), get("int(5)"), get("int(6)"), get("int(3)")


def quantized(model, policy, **options):
    """quantize_model, returning the model (it returns the GEMMs it converted)."""
    quantize_model(model, policy, **options)
    return model


def distinct_policy(**changes: object) -> QuantPolicy:
    """A different format per GEMM tensor class, so a swapped operand shows up."""
    policy = QuantPolicy(weights=TensorQuant(INT4), activations=TensorQuant(INT5),
                         gradients=TensorQuant(INT6), weight_grads=TensorQuant(INT3),
                         optimizer_state=TensorQuant(None),
                         master_weights=TensorQuant(None),
                         full_precision_layers=())
    return dataclasses.replace(policy, **changes)


def levels(t: torch.Tensor) -> int:
    return int(torch.unique(t).numel())


class RecordingOp:
    """Wraps a layer's GEMM op and keeps the operands each of the three GEMMs received."""

    def __init__(self, op: LinearOp | ConvOp) -> None:
        self.op = op
        self.seen: dict[str, torch.Tensor] = {}

    def forward(self, x, weight, bias):
        self.seen["forward_x"], self.seen["forward_w"] = x, weight
        return self.op.forward(x, weight, bias)

    @property
    def axes(self):
        return self.op.axes

    def backward(self, dy, x, weight, need_data, need_weight):
        self.seen["backward_dy"], self.seen["backward_x"], self.seen["backward_w"] = dy, x, weight
        if need_data:
            self.seen["data_dy"], self.seen["data_w"] = dy, weight
        if need_weight:
            self.seen["weight_x"], self.seen["weight_dy"] = x, dy
        return self.op.backward(dy, x, weight, need_data, need_weight)

    def bias_grad(self, dy):
        return self.op.bias_grad(dy)


# --- layers against manual computations -----------------------------------------------------------


def test_linear_forward_and_backward_match_the_quantized_gemms_exactly():
    torch.manual_seed(0)
    layer = nn.Linear(12, 7)
    quantize_model(layer, distinct_policy())
    x = torch.randn(5, 12, requires_grad=True)
    dy = torch.randn(5, 7)
    y = layer(x)
    y.backward(dy)
    qx, qw, qe = INT5.quantize(x.detach()), INT4.quantize(layer.weight.detach()), INT6.quantize(dy)
    assert torch.equal(y, F.linear(qx, qw, layer.bias))
    assert torch.equal(x.grad, qe @ qw)
    assert torch.equal(layer.weight.grad, INT3.quantize(qe.t() @ qx))
    assert torch.equal(layer.bias.grad, qe.sum(0))


def test_linear_on_3d_input_reduces_weight_grad_over_all_leading_dims():
    torch.manual_seed(1)
    layer = nn.Linear(6, 4, bias=False)
    quantize_model(layer, distinct_policy())
    x = torch.randn(2, 3, 6, requires_grad=True)
    dy = torch.randn(2, 3, 4)
    layer(x).backward(dy)
    qx, qw, qe = INT5.quantize(x.detach()), INT4.quantize(layer.weight.detach()), INT6.quantize(dy)
    torch.testing.assert_close(x.grad, qe @ qw)
    expected = INT3.quantize(qe.reshape(-1, 4).t() @ qx.reshape(-1, 6))
    assert torch.equal(layer.weight.grad, expected)


CONV_CASES = [
    (nn.Conv1d, dict(in_channels=4, out_channels=6, kernel_size=3), (2, 4, 11)),
    (nn.Conv1d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=2, dilation=2, groups=2),
     (2, 4, 13)),
    (nn.Conv2d, dict(in_channels=3, out_channels=4, kernel_size=3, padding=1), (2, 3, 7, 6)),
    (nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), groups=2),
     (2, 4, 9, 8)),
    (nn.Conv2d, dict(in_channels=3, out_channels=4, kernel_size=3, padding="same"), (2, 3, 6, 6)),
    (nn.Conv2d, dict(in_channels=3, out_channels=4, kernel_size=4, padding="same", bias=False), (2, 3, 6, 6)),
    (nn.Conv2d, dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
     (2, 3, 6, 5)),
    (nn.Conv1d, dict(in_channels=2, out_channels=3, kernel_size=3, padding=1, padding_mode="circular"),
     (2, 2, 9)),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize(("cls", "kwargs", "shape"), CONV_CASES)
def test_conv_matches_torch_conv_on_quantized_operands(cls, kwargs, shape):
    torch.manual_seed(2)
    layer = cls(**kwargs)
    reference = copy.deepcopy(layer)
    quantize_model(layer, distinct_policy())
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)

    qx = INT5.quantize(x.detach()).requires_grad_()
    qw = INT4.quantize(reference.weight.detach()).requires_grad_()
    y_ref = reference._conv_forward(qx, qw, reference.bias)  # torch's own padding handling
    y_ref.backward(INT6.quantize(dy))
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, qx.grad)
    torch.testing.assert_close(layer.weight.grad, INT3.quantize(qw.grad))
    if reference.bias is not None:
        torch.testing.assert_close(layer.bias.grad, reference.bias.grad)


@pytest.mark.parametrize("make", [lambda: nn.Linear(9, 5), lambda: nn.Conv2d(3, 5, 3)])
def test_all_three_gemms_see_operands_on_the_grid(make):
    torch.manual_seed(3)
    layer = make()
    policy = distinct_policy()
    quantize_model(layer, policy)
    recorder = RecordingOp(layer.gemm_quant.op)
    layer.gemm_quant.op = recorder
    x = torch.randn(4, 9) if isinstance(layer, nn.Linear) else torch.randn(2, 3, 6, 6)
    x.requires_grad_()
    y = layer(x)
    y.backward(torch.randn_like(y))
    seen = recorder.seen
    # per-tensor symmetric intN: at most 2^N - 1 levels, and each operand is its own quantization
    assert levels(seen["forward_x"]) <= 31 and torch.equal(seen["forward_x"], INT5.quantize(x.detach()))
    assert levels(seen["forward_w"]) <= 15 and torch.equal(seen["forward_w"], INT4.quantize(layer.weight))
    assert levels(seen["backward_dy"]) <= 63
    assert seen["backward_x"] is seen["forward_x"] and seen["backward_w"] is seen["forward_w"]  # not redone
    assert levels(layer.weight.grad) <= 7


def test_matmul_quantizes_both_operands_as_activations_and_the_error():
    torch.manual_seed(4)
    model = Matmul()
    quantize_model(model, distinct_policy())
    a = torch.randn(2, 3, 4, 5, requires_grad=True)
    b = torch.randn(5, 6, requires_grad=True)  # broadcast over a's batch dims
    y = model(a, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    qa = INT5.quantize(a.detach()).requires_grad_()
    qb = INT5.quantize(b.detach()).requires_grad_()
    y_ref = qa @ qb
    y_ref.backward(INT6.quantize(dy))
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(a.grad, qa.grad)
    torch.testing.assert_close(b.grad, qb.grad)
    assert levels(y_ref.detach()) > 31  # the product itself is not quantized


def test_matmul_with_vector_operands_keeps_torch_shapes():
    model = quantized(Matmul(), distinct_policy())
    a, b = torch.randn(3, 4), torch.randn(4)
    assert model(a, b).shape == (a @ b).shape
    assert model(b, a.t()).shape == (b @ a.t()).shape


def test_conv_mx_blocks_run_along_channels():
    torch.manual_seed(5)
    mx = get("mxfp4")
    quant = TensorQuant(mx)
    policy = QuantPolicy(quant, quant, quant, quant, TensorQuant(None), TensorQuant(None))
    layer = quantized(nn.Conv2d(32, 4, 3), policy)
    recorder = RecordingOp(layer.gemm_quant.op)
    layer.gemm_quant.op = recorder
    x = torch.randn(1, 32, 5, 5)
    layer(x)
    along_channels = dataclasses.replace(mx, scaling=dataclasses.replace(mx.scaling, axis=1))
    assert torch.equal(recorder.seen["forward_x"], along_channels.quantize(x))
    assert torch.equal(recorder.seen["forward_w"], along_channels.quantize(layer.weight.detach()))
    assert not torch.equal(recorder.seen["forward_x"], mx.quantize(x))


def mx_policy(spec: str = "mxfp4") -> QuantPolicy:
    quant = TensorQuant(get(spec))
    return QuantPolicy(quant, quant, quant, TensorQuant(None), TensorQuant(None), TensorQuant(None))


def mx_along(x: torch.Tensor, axis: int, spec: str = "mxfp4") -> torch.Tensor:
    """The reference rule: x (fp32, unquantized) quantized with its blocks along `axis`."""
    fmt = get(spec)
    return dataclasses.replace(fmt, scaling=dataclasses.replace(fmt.scaling, axis=axis)).quantize(x)


def recorded_gemms(layer: nn.Module, x: torch.Tensor, dy_shape: tuple[int, ...]):
    """The operands each of the layer's three GEMMs received, and x, dy (unquantized)."""
    recorder = RecordingOp(layer.gemm_quant.op)
    layer.gemm_quant.op = recorder
    x = x.clone().requires_grad_(True)
    dy = torch.randn(dy_shape)
    layer(x).backward(dy)
    return recorder.seen, x, dy


def test_block_scaled_linear_gemms_see_operands_blocked_along_each_gemms_reduction_axis():
    """microxcaling's mx/linear.py: forward x, w along in; backward-data dy along out, w along its
    axis 0 (out); backward-weight x and dy along the examples (-2); each from the fp32 tensor."""
    torch.manual_seed(11)
    layer = quantized(nn.Linear(64, 40), mx_policy())
    seen, x, dy = recorded_gemms(layer, torch.randn(48, 64), (48, 40))
    w = layer.weight.detach()
    assert torch.equal(seen["forward_x"], mx_along(x.detach(), -1))
    assert torch.equal(seen["forward_w"], mx_along(w, -1))
    assert torch.equal(seen["data_dy"], mx_along(dy, -1))
    assert torch.equal(seen["data_w"], mx_along(w, 0))
    assert torch.equal(seen["weight_x"], mx_along(x.detach(), -2))
    assert torch.equal(seen["weight_dy"], mx_along(dy, -2))
    assert torch.equal(x.grad, mx_along(dy, -1) @ mx_along(w, 0))
    assert torch.equal(layer.weight.grad, mx_along(dy, 0).t() @ mx_along(x.detach(), 0))
    assert torch.equal(layer.bias.grad, dy.sum(0))  # db sums the unquantized error, as microxcaling


def test_a_layer_whose_quantizers_are_replaced_by_block_scaled_ones_blocks_along_each_gemms_axis():
    """LayerQuant is a plain dataclass that other methods fill with their own quantizers: one set
    after construction is honoured as one given to it (no block-scaled check frozen at construction)."""
    torch.manual_seed(11)
    layer = quantized(nn.Linear(64, 40), distinct_policy())
    blocked = quantized(nn.Linear(64, 40), mx_policy()).gemm_quant
    quant = layer.gemm_quant
    for name in ("activations", "weights", "gradients", "weight_grads"):
        setattr(quant, name, getattr(blocked, name))
    seen, x, dy = recorded_gemms(layer, torch.randn(48, 64), (48, 40))
    w = layer.weight.detach()
    assert torch.equal(seen["forward_x"], mx_along(x.detach(), -1))
    assert torch.equal(seen["forward_w"], mx_along(w, -1))
    assert torch.equal(seen["data_w"], mx_along(w, 0))
    assert torch.equal(seen["weight_x"], mx_along(x.detach(), -2))
    assert torch.equal(seen["weight_dy"], mx_along(dy, -2))


def test_block_scaled_conv_gemms_see_operands_blocked_along_each_gemms_reduction_axis():
    """microxcaling's mx/convolution.py: forward x, w along the input channels (1); backward-data dy
    along the output channels (1), w along C_out (0); backward-weight x and dy along the batch (0)."""
    torch.manual_seed(12)
    layer = quantized(nn.Conv2d(32, 40, 3), mx_policy("mxfp8_e4m3"))
    seen, x, dy = recorded_gemms(layer, torch.randn(36, 32, 5, 5), (36, 40, 3, 3))
    w, fmt = layer.weight.detach(), "mxfp8_e4m3"
    assert torch.equal(seen["forward_x"], mx_along(x.detach(), 1, fmt))
    assert torch.equal(seen["forward_w"], mx_along(w, 1, fmt))
    assert torch.equal(seen["data_dy"], mx_along(dy, 1, fmt))
    assert torch.equal(seen["data_w"], mx_along(w, 0, fmt))
    assert torch.equal(seen["weight_x"], mx_along(x.detach(), 0, fmt))
    assert torch.equal(seen["weight_dy"], mx_along(dy, 0, fmt))


def test_block_scaled_matmul_gemms_see_operands_blocked_along_each_gemms_reduction_axis():
    """microxcaling's mx/matmul.py: forward a along -1, b along -2; da = dy b^T with dy and b along
    -1; db = a^T dy with a and dy along -2."""
    torch.manual_seed(13)
    model = quantized(Matmul(), mx_policy())
    a = torch.randn(2, 40, 64, requires_grad=True)
    b = torch.randn(2, 64, 48, requires_grad=True)
    dy = torch.randn(2, 40, 48)
    y = model(a, b)
    y.backward(dy)
    a0, b0 = a.detach(), b.detach()
    assert torch.equal(y, mx_along(a0, -1) @ mx_along(b0, -2))
    assert torch.equal(a.grad, mx_along(dy, -1) @ mx_along(b0, -1).transpose(-1, -2))
    assert torch.equal(b.grad, mx_along(a0, -2).transpose(-1, -2) @ mx_along(dy, -2))


def test_non_block_formats_are_quantized_once_and_reused_by_every_gemm():
    torch.manual_seed(14)
    layer = quantized(nn.Linear(64, 40), distinct_policy())
    seen, x, dy = recorded_gemms(layer, torch.randn(48, 64), (48, 40))
    assert seen["data_w"] is seen["forward_w"] and seen["weight_x"] is seen["forward_x"]
    assert seen["data_dy"] is seen["weight_dy"]


def test_per_channel_weight_scaling_is_per_output_channel():
    torch.manual_seed(6)
    fmt = get("int4(scale=channel)")
    policy = distinct_policy(weights=TensorQuant(fmt))
    layer = quantized(nn.Linear(8, 3), policy)
    with torch.no_grad():
        layer.weight[1] *= 100  # one loud output channel must not flatten the others
    recorder = RecordingOp(layer.gemm_quant.op)
    layer.gemm_quant.op = recorder
    layer(torch.randn(2, 8))
    qw = recorder.seen["forward_w"]
    for row in range(3):
        assert levels(qw[row]) > 3
        assert torch.equal(qw[row].abs().max(), layer.weight[row].detach().abs().max())


# --- quantize_model ------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3, padding=1)
        self.norm = nn.LayerNorm(4 * 8)
        self.hidden = nn.Linear(4 * 8, 16)
        self.mix = Matmul()
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.relu(self.conv(x)).flatten(1))
        h = torch.relu(self.hidden(h))
        h = self.mix(h, torch.eye(16) * 0.5 + 0.01)
        return self.head(h)


def test_first_and_last_layers_stay_fp32():
    config = TrainConfig(format="int4", full_precision_layers=("first", "last"))
    model = quantized(Net(), QuantPolicy.from_config(config))
    assert type(model.conv) is nn.Conv1d and type(model.head) is nn.Linear
    assert type(model.hidden) is QuantLinear and quantized_layers(model) == [model.hidden, model.mix]
    only_first = quantized(Net(), QuantPolicy.from_config(TrainConfig(format="int4",
                                                                           full_precision_layers=("first",))))
    assert type(only_first.conv) is nn.Conv1d and type(only_first.head) is not nn.Linear
    everything = quantized(Net(), QuantPolicy.from_config(TrainConfig(format="int4")))
    assert len(quantized_layers(everything)) == 4


def test_fp32_first_layer_computes_exactly_in_fp32():
    torch.manual_seed(7)
    policy = QuantPolicy.from_config(TrainConfig(format="int4", full_precision_layers=("first", "last")))
    model = quantized(Net(), policy)
    x = torch.randn(3, 1, 8)
    assert torch.equal(model.conv(x), F.conv1d(x, model.conv.weight, model.conv.bias, padding=1))


def test_quantize_model_keeps_parameters_and_an_earlier_optimizer_works():
    torch.manual_seed(8)
    model = Net()
    before = [id(p) for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    quantize_model(model, distinct_policy())
    assert [id(p) for p in model.parameters()] == before
    weight = model.hidden.weight.detach().clone()
    model(torch.randn(4, 1, 8)).square().mean().backward()
    optimizer.step()
    assert not torch.equal(model.hidden.weight, weight)


def test_quantization_off_is_exactly_fp32():
    torch.manual_seed(9)
    model = Net()
    plain = copy.deepcopy(model)
    quantize_model(model, distinct_policy())
    x = torch.randn(6, 1, 8)

    def run(net: nn.Module) -> list[torch.Tensor]:
        net.zero_grad()
        out = net(x)
        out.square().mean().backward()
        return [out.detach()] + [p.grad.clone() for p in net.parameters()]

    set_quantization(model, False)
    for mine, reference in zip(run(model), run(plain), strict=True):
        assert torch.equal(mine, reference)
    set_quantization(model, True)
    assert not torch.equal(run(model)[0], run(plain)[0])


def test_requantizing_with_an_fp32_policy_restores_plain_modules():
    model = quantized(Net(), distinct_policy())
    quantize_model(model, QuantPolicy.fp32())
    assert quantized_layers(model) == [] and type(model.hidden) is nn.Linear


def test_stochastic_operand_rounding_is_reproducible_with_a_seeded_generator():
    torch.manual_seed(10)
    base = nn.Linear(16, 8)
    policy = distinct_policy(activations=TensorQuant(INT4, "stochastic"))
    x = torch.randn(32, 16)

    def output(seed: int) -> torch.Tensor:
        layer = quantized(copy.deepcopy(base), policy, generator=torch.Generator().manual_seed(seed))
        return layer(x)

    assert torch.equal(output(1), output(1))
    assert not torch.equal(output(1), output(2))



def test_block_scaled_stochastic_rounding_draws_per_gemm_operand_in_the_documented_order():
    """A rounding that draws keeps the module docstring's order (forward x, w; backward dy along
    backward-data's axis, w, x, dy along backward-weight's), one quantization at a time, so a seeded
    run draws what it always drew; a nearest rounding quantizes x, w and dy along both axes at once."""
    torch.manual_seed(14)
    fmt = get("mxfp4")
    quant = TensorQuant(fmt, "stochastic")
    policy = QuantPolicy(quant, quant, quant, TensorQuant(None), TensorQuant(None), TensorQuant(None))
    layer = quantized(nn.Linear(64, 40), policy, generator=torch.Generator().manual_seed(3))
    x = torch.randn(48, 64, requires_grad=True)
    dy = torch.randn(48, 40)
    y = layer(x)
    y.backward(dy)
    draws = torch.Generator().manual_seed(3)
    w = layer.weight.detach()

    def along(t: torch.Tensor, axis: int) -> torch.Tensor:
        return dataclasses.replace(fmt, scaling=dataclasses.replace(fmt.scaling, axis=axis)).quantize(
            t, "stochastic", draws)

    forward_x, forward_w = along(x.detach(), -1), along(w, -1)
    data_dy, data_w, weight_x, weight_dy = along(dy, -1), along(w, 0), along(x.detach(), -2), along(dy, -2)
    assert torch.equal(y, F.linear(forward_x, forward_w, layer.bias))
    assert torch.equal(x.grad, data_dy @ data_w)
    assert torch.equal(layer.weight.grad, weight_dy.t() @ weight_x)


def test_block_scaled_layers_without_grad_mode_quantize_only_the_forwards_operands():
    """An evaluation (no grad mode) quantizes x and w along the forward's axis only: the backward's
    copies, which a training forward computes in the same call, are not made."""
    torch.manual_seed(15)
    model = quantized(nn.Sequential(nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 10)), mx_policy())
    axes_asked: list[tuple[int, ...]] = []
    for layer in quantized_layers(model):
        for name in ("activations", "weights"):
            quantizer = getattr(layer.gemm_quant, name)
            along_axes = quantizer.along_axes
            quantizer.along_axes = lambda t, axes, along_axes=along_axes: (
                axes_asked.append(tuple(axes)), along_axes(t, axes))[1]
    x = torch.randn(48, 64)
    with torch.no_grad():
        evaluated = model(x)
    assert axes_asked == [(-1,)] * 4
    axes_asked.clear()
    trained = model(x.requires_grad_(True))
    assert axes_asked == [(-1, -2), (-1, 0)] * 2
    assert torch.equal(evaluated, trained)


# --- policy ----------------------------------------------------------------------------------------


def test_policy_resolution_of_config_fields():
    policy = QuantPolicy.from_config(TrainConfig(format="int8", gradients="lns8", activations="int4"))
    assert policy.weights.format == get("int8") and policy.activations.format == get("int4")
    assert policy.gradients.format == get("lns8") and policy.weight_grads.format == get("lns8")
    assert policy.optimizer_state.format is None and policy.master_weights.format is None
    split = QuantPolicy.from_config(TrainConfig(format="int8", weight_grads="int(16)", optimizer_state="bf16",
                                                update_rounding="toward_zero"))
    assert split.gradients.format == get("int8") and split.weight_grads.format == get("int(16)")
    assert split.optimizer_state.format == get("bf16") and split.optimizer_state.rounding == "toward_zero"
    assert QuantPolicy.from_config(TrainConfig(format="fp32")).weights.format is None


def test_fp_gradients_get_power_of_two_tensor_scaling_unless_the_spec_says_scale():
    policy = QuantPolicy.from_config(TrainConfig(format="fp8_e4m3"))
    per_tensor = Scaling(kind="tensor", pow2=True)
    assert policy.gradients.format.scaling == per_tensor and policy.weight_grads.format.scaling == per_tensor
    assert policy.weights.format == get("fp8_e4m3") and policy.activations.format == get("fp8_e4m3")
    explicit = QuantPolicy.from_config(TrainConfig(format="fp8_e4m3", gradients="fp8_e5m2(scale=none)"))
    assert explicit.gradients.format == get("fp8_e5m2")
    spaced = QuantPolicy.from_config(TrainConfig(format="fp8_e4m3", gradients="FP8_E5M2( Scale = none )"))
    assert spaced.gradients.format == get("fp8_e5m2")
    assert QuantPolicy.from_config(TrainConfig(format="int8")).gradients.format == get("int8")


def test_storage_follows_the_weights_with_update_rounding():
    policy = QuantPolicy.from_config(TrainConfig(format="lns8", master_weights=False))
    assert policy.master_weights.format == get("lns8") and policy.master_weights.rounding == "stochastic"
    assert QuantPolicy.from_config(TrainConfig(format="lns8")).master_weights.format is None


def test_posit_layer_scaling_covers_every_posit_class():
    on = QuantPolicy.from_config(TrainConfig(format="posit16", gradients="fp16", layer_scaling=True))
    assert on.weights.layer_scale and on.activations.layer_scale
    assert not on.gradients.layer_scale and on.gradients.format.scaling.kind == "tensor"
    off = QuantPolicy.from_config(TrainConfig(format="posit16"))
    assert not off.gradients.layer_scale and off.gradients.format == get("posit16")


def test_lu_layer_scale_centres_the_log_magnitudes():
    x = torch.tensor([0.0, 2.0**-3, -(2.0**-5), 0.0, 2.0**-4])  # mean log2 over non-zeros: -4
    posit = get("posit(8,1)")
    assert lu_layer_scale(x, posit) == 2.0 ** (-4 + 2)
    quant = TensorQuant(posit, layer_scale=True)
    assert torch.equal(quant(x), posit.quantize(x / 0.25) * 0.25)


@pytest.mark.parametrize("field", ["rounding", "update_rounding"])
def test_unknown_rounding_is_an_input_error(field):
    with pytest.raises(InputError, match="banker"):
        QuantPolicy.from_config(TrainConfig(format="int8", **{field: "banker"}))


def test_bad_spec_and_layer_names_are_input_errors():
    with pytest.raises(InputError, match="weights"):
        QuantPolicy.from_config(TrainConfig(weights="posit(8,9)"))
    with pytest.raises(InputError, match="middle"):
        QuantPolicy.from_config(TrainConfig(format="int8", full_precision_layers=("middle",)))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["int8", "int4", "lns8", "lns(6,gamma=2)", "fp8_e4m3(scale=tensor,pow2=1)",
                        "int(8,pow2=1)", "posit8(scale=tensor)", "fixed(8,4,scale=tensor,pow2=1)"]),
       st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=40),
       st.integers(-40, 40), st.booleans())
def test_host_side_tensor_scale_equals_the_format_quantize(spec, values, exponent, double):
    x = torch.tensor(values, dtype=torch.float64 if double else torch.float32) * 2.0**exponent
    fmt = get(spec)
    assert torch.equal(TensorQuant(fmt)(x), fmt.quantize(x))


@pytest.mark.parametrize("spec", ["int(8,pow2=1)", "fp8_e4m3(scale=tensor,pow2=1)", "int8"])
def test_host_side_tensor_scale_when_amax_is_the_grid_max_times_a_power_of_two(spec):
    fmt = get(spec)
    x = torch.tensor([fmt.max * 2.0**-5, -0.3, 1e-4, 0.0])
    assert torch.equal(TensorQuant(fmt)(x), fmt.quantize(x))
    assert torch.equal(TensorQuant(fmt)(x)[0], x[0])  # max|x| maps onto the grid's max exactly
