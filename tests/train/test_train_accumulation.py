"""Emulated accumulation precision (TrainConfig.accumulation, dse/train/accumulation.py).

The references below build every GEMM from its per-reduction-index contributions (outer products,
masked convolutions) and fold them in an explicit Python loop. Operands are small integers times a
power of two, so every contribution and every chunk sum is exact in fp32: only the accumulator's
roundings, and where they happen, decide the result.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from typer.testing import CliRunner

from dse.cli import app
from dse.errors import InputError
from dse.formats import NumberFormat, get
from dse.train import TrainConfig, train
from dse.train.layers import Matmul, quantize_model, quantized_layers
from dse.train.policy import QuantPolicy, TensorQuant

torch.set_num_threads(1)
runner = CliRunner()

E5M2 = get("fp(e=5,m=2)")
QUICK = TrainConfig(model="mlp", dataset="digits", epochs=2, batch_size=64)


def quantized(model, policy, **options):
    """quantize_model, returning the model (it returns the GEMMs it converted)."""
    quantize_model(model, policy, **options)
    return model


def on_grid(*shape: int, generator: torch.Generator, denominator: float = 8.0) -> Tensor:
    """Integers in [-7, 7] / denominator: products and their sums are exact in fp32."""
    return torch.randint(-7, 8, shape, generator=generator).float() / denominator


def accumulating(spec: str, chunk: int, **operands: TensorQuant) -> QuantPolicy:
    """fp32 operands (unless given) and an accumulator of format `spec`."""
    return dataclasses.replace(QuantPolicy.fp32(), accumulation=TensorQuant(get(spec)),
                               accumulation_chunk=chunk, **operands)


def reference_fold(contributions: list[Tensor], fmt: NumberFormat, chunk: int) -> Tensor:
    """acc = Q(acc + sum of the next `chunk` contributions), written out."""
    acc: Tensor | None = None
    for start in range(0, len(contributions), chunk):
        partial = torch.stack(contributions[start:start + chunk]).sum(0)
        acc = fmt.quantize(partial if acc is None else acc + partial, "nearest")
    assert acc is not None
    return acc


# --- accumulation None: today's layers, bit for bit --------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.matmul = Matmul()
        self.fc = nn.Linear(5, 6)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)  # (N, 4, 5)
        return self.fc(self.matmul(h.transpose(1, 2), h))  # (N, 5, 5) -> (N, 5, 6)


@pytest.mark.parametrize("accumulation", [None, "fp32"])
def test_no_accumulator_is_exactly_the_gemms_on_quantized_operands(accumulation: str | None) -> None:
    torch.manual_seed(0)
    net = Net()
    config = TrainConfig(format="int(6,pow2=1)", accumulation=accumulation, accumulation_chunk=1)
    quantize_model(net, QuantPolicy.from_config(config))
    assert all(m.gemm_quant.accumulator is None for m in quantized_layers(net))
    x = torch.randn(2, 3, 5, requires_grad=True)
    y = net(x)
    dy = torch.randn_like(y)
    y.backward(dy)

    q = get("int(6,pow2=1)").quantize
    qx, qw1 = q(x.detach()), q(net.conv.weight.detach())
    h = F.conv1d(qx, qw1, net.conv.bias, padding=1)
    qa, qb = q(h.transpose(1, 2)), q(h)
    m = qa @ qb
    qm, qw2 = q(m), q(net.fc.weight.detach())
    assert torch.equal(y, F.linear(qm, qw2, net.fc.bias))
    qe = q(dy)
    assert torch.equal(net.fc.weight.grad, q(qe.reshape(-1, 6).t() @ qm.reshape(-1, 5)))
    dm = qe @ qw2
    qdm = q(dm)
    dh = (qdm @ qb.transpose(-1, -2)).transpose(1, 2) + qa.transpose(-1, -2) @ qdm
    qdh = q(dh)
    dx, dw1, _ = torch.ops.aten.convolution_backward(qdh, qx, qw1, None, [1], [1], [1], False, [0], 1,
                                                     [True, True, False])
    assert torch.equal(net.conv.weight.grad, q(dw1))
    assert torch.equal(x.grad, dx)


# --- each GEMM against the written-out fold ----------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 20), m=st.integers(1, 6), rows=st.integers(1, 4), chunk=st.integers(1, 24),
       seed=st.integers(0, 2**16))
def test_linear_gemms_fold_chunk_by_chunk(k: int, m: int, rows: int, chunk: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(k, m)
    with torch.no_grad():
        layer.weight.copy_(on_grid(m, k, generator=g))
        layer.bias.copy_(on_grid(m, generator=g))
    quantize_model(layer, accumulating("fp(e=5,m=2)", chunk))
    x = on_grid(2, rows, k, generator=g, denominator=4.0).requires_grad_()
    dy = on_grid(2, rows, m, generator=g)
    y = layer(x)
    y.backward(dy)

    xd, w = x.detach(), layer.weight.detach()
    forward = [xd[..., i, None] * w[:, i] for i in range(k)]
    assert torch.equal(y, reference_fold(forward, E5M2, chunk) + layer.bias)
    backward_data = [dy[..., o, None] * w[o] for o in range(m)]
    assert torch.equal(x.grad, reference_fold(backward_data, E5M2, chunk))
    dy_rows, x_rows = dy.reshape(-1, m), xd.reshape(-1, k)
    backward_weight = [dy_rows[r, :, None] * x_rows[r] for r in range(len(x_rows))]
    assert torch.equal(layer.weight.grad, reference_fold(backward_weight, E5M2, chunk))
    assert torch.equal(layer.bias.grad, dy_rows.sum(0))


def test_operands_are_quantized_before_the_fold_and_the_weight_gradient_after() -> None:
    g = torch.Generator().manual_seed(3)
    activation, weight, error, weight_grad = (get(s) for s in (
        "int(4,pow2=1)", "int(5,pow2=1)", "int(6,pow2=1)", "int(3,pow2=1)"))
    layer = nn.Linear(9, 4, bias=False)
    quantize_model(layer, accumulating("bf16", 2, activations=TensorQuant(activation),
                                       weights=TensorQuant(weight), gradients=TensorQuant(error),
                                       weight_grads=TensorQuant(weight_grad)))
    x = torch.randn(5, 9, generator=g).requires_grad_()
    dy = torch.randn(5, 4, generator=g)
    y = layer(x)
    y.backward(dy)
    bf16 = get("bf16")
    qx, qw, qe = activation.quantize(x.detach()), weight.quantize(layer.weight.detach()), error.quantize(dy)
    assert torch.equal(y, reference_fold([qx[:, i, None] * qw[:, i] for i in range(9)], bf16, 2))
    assert torch.equal(x.grad, reference_fold([qe[:, o, None] * qw[o] for o in range(4)], bf16, 2))
    dw = reference_fold([qe[r, :, None] * qx[r] for r in range(5)], bf16, 2)
    assert torch.equal(layer.weight.grad, weight_grad.quantize(dw))


def _masked_channels(t: Tensor, groups: int, index: int) -> Tensor:
    """t with every channel zeroed except channel `index` of each group."""
    per_group = t.shape[1] // groups
    keep = torch.zeros(t.shape[1], dtype=torch.bool)
    keep[index::per_group] = True
    return t * keep.reshape(1, -1, *[1] * (t.dim() - 2))


@pytest.mark.parametrize("cls, kwargs, shape", [
    (nn.Conv1d, dict(in_channels=5, out_channels=4, kernel_size=3, stride=2, padding=1), (3, 5, 11)),
    (nn.Conv2d, dict(in_channels=5, out_channels=3, kernel_size=3, padding=1, dilation=1), (3, 5, 6, 5)),
    (nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=2, stride=2, groups=2), (5, 4, 6, 6)),
])
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_conv_gemms_fold_chunk_by_chunk(cls: type[nn.Module], kwargs: dict, shape: tuple[int, ...],
                                        chunk: int) -> None:
    g = torch.Generator().manual_seed(chunk)
    layer = cls(**kwargs)
    with torch.no_grad():
        layer.weight.copy_(on_grid(*layer.weight.shape, generator=g))
        layer.bias.copy_(on_grid(*layer.bias.shape, generator=g))
    quantize_model(layer, accumulating("fp(e=5,m=2)", chunk))
    x = on_grid(*shape, generator=g, denominator=4.0).requires_grad_()
    y = layer(x)
    dy = on_grid(*y.shape, generator=g)
    y.backward(dy)

    conv = F.conv1d if cls is nn.Conv1d else F.conv2d
    w, xd = layer.weight.detach(), x.detach()
    groups = layer.groups
    geometry = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=groups)
    forward = [conv(_masked_channels(xd, groups, c), w, **geometry) for c in range(w.shape[1])]
    bias = layer.bias.reshape(-1, *[1] * (y.dim() - 2))
    assert torch.equal(y, reference_fold(forward, E5M2, chunk) + bias)

    def grad_x(dy_part: Tensor) -> Tensor:
        leaf = xd.clone().requires_grad_()
        return torch.autograd.grad(conv(leaf, w, **geometry), leaf, dy_part)[0]

    backward_data = [grad_x(_masked_channels(dy, groups, o)) for o in range(w.shape[0] // groups)]
    assert torch.equal(x.grad, reference_fold(backward_data, E5M2, chunk))

    def grad_w(n: int) -> Tensor:
        leaf = w.clone().requires_grad_()
        return torch.autograd.grad(conv(xd[n:n + 1], leaf, **geometry), leaf, dy[n:n + 1])[0]

    assert torch.equal(layer.weight.grad, reference_fold([grad_w(n) for n in range(len(xd))], E5M2, chunk))


@pytest.mark.parametrize("b_shape", [(2, 5, 4), (5, 4)])
@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_matmul_gemms_fold_chunk_by_chunk(b_shape: tuple[int, ...], chunk: int) -> None:
    g = torch.Generator().manual_seed(chunk)
    module = quantized(Matmul(), accumulating("fp(e=5,m=2)", chunk))
    a = on_grid(2, 3, 5, generator=g, denominator=4.0).requires_grad_()
    b = on_grid(*b_shape, generator=g).requires_grad_()
    y = module(a, b)
    dy = on_grid(2, 3, 4, generator=g)
    y.backward(dy)
    ad, bd = a.detach(), b.detach().expand(2, 5, 4)
    assert torch.equal(y, reference_fold([ad[..., :, k, None] * bd[..., None, k, :] for k in range(5)],
                                         E5M2, chunk))
    assert torch.equal(a.grad, reference_fold([dy[..., :, j, None] * bd[..., None, :, j] for j in range(4)],
                                              E5M2, chunk))
    db = reference_fold([ad[..., i, :, None] * dy[..., i, None, :] for i in range(3)], E5M2, chunk)
    assert torch.equal(b.grad, db.sum_to_size(b_shape))


@pytest.mark.parametrize("spec", ["bf16", "fp(e=5,m=2)"])
def test_one_chunk_rounds_the_fp32_result_once(spec: str) -> None:
    fmt = get(spec)
    torch.manual_seed(1)
    for chunk in (12, 1000):
        linear, conv = nn.Linear(12, 7), nn.Conv2d(12, 3, 3, padding=1)  # conv: 12 input, 3 output channels
        for layer in (linear, conv):
            quantize_model(layer, accumulating(spec, chunk))
        x = torch.randn(12, 12, requires_grad=True)  # 12 rows: the Linear backward-weight reduction
        y = linear(x)
        dy = torch.randn_like(y)
        y.backward(dy)
        w = linear.weight.detach()
        assert torch.equal(y, fmt.quantize(F.linear(x.detach(), w)) + linear.bias)
        assert torch.equal(x.grad, fmt.quantize(dy @ w))
        assert torch.equal(linear.weight.grad, fmt.quantize(dy.t() @ x.detach()))

        images = torch.randn(2, 12, 5, 5)
        out = conv(images)
        assert torch.equal(out, fmt.quantize(F.conv2d(images, conv.weight.detach(), padding=1))
                           + conv.bias.reshape(-1, 1, 1))


def test_chunk_one_and_a_whole_chunk_differ_on_a_coarse_accumulator() -> None:
    """Rounding after every product loses what one rounding of the exact sum keeps."""
    layer_each, layer_once = nn.Linear(3, 1, bias=False), nn.Linear(3, 1, bias=False)
    quantize_model(layer_each, accumulating("fp(e=5,m=2)", 1))
    quantize_model(layer_once, accumulating("fp(e=5,m=2)", 3))
    x = torch.tensor([[8.0, 1.0, 1.0]])  # e5m2 near 8: step 2, so 8 + 1 ties back to 8 (even)
    with torch.no_grad():
        for layer in (layer_each, layer_once):
            layer.weight.fill_(1.0)
        assert float(layer_each(x)) == 8.0 and float(layer_once(x)) == 10.0


# --- training ----------------------------------------------------------------------------------------


def test_accumulation_precision_decides_training_results() -> None:
    fp32 = train(QUICK)
    bf16 = train(QUICK.replace(accumulation="bf16", accumulation_chunk=16))
    coarse = train(QUICK.replace(accumulation="fp(e=5,m=2)", accumulation_chunk=1))
    assert not (fp32.diverged or bf16.diverged or coarse.diverged)
    assert bf16.loss_curve == pytest.approx(fp32.loss_curve, abs=0.01)
    assert abs(bf16.test_accuracy - fp32.test_accuracy) <= 0.02
    assert coarse.loss_curve[-1] > fp32.loss_curve[-1] + 0.1
    assert coarse.test_accuracy < fp32.test_accuracy - 0.05
    assert coarse.config["accumulation"] == "fp8_e5m2" and coarse.config["accumulation_chunk"] == 1


def test_accumulator_overflow_diverges_and_a_saturating_one_does_not() -> None:
    hot = QUICK.replace(lr=0.5)
    assert not train(hot).diverged
    overflowing = train(hot.replace(accumulation="fp(e=3,m=6)"))  # max 15.875, overflow to inf
    assert overflowing.diverged and math.isnan(overflowing.final_loss)
    saturating = train(hot.replace(accumulation="fp(e=3,m=6,overflow=saturate)"))
    assert not saturating.diverged and math.isfinite(saturating.final_loss)


# --- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, needles", [
    ({"accumulation": "fp(e=5,m=99)"}, ["accumulation", "m=99"]),
    ({"accumulation": "nope"}, ["accumulation", "nope"]),
    ({"accumulation": "int8"}, ["accumulation", "int8", "scale=tensor"]),
    ({"accumulation": "mxfp8_e4m3"}, ["accumulation", "mxfp8_e4m3"]),
    ({"accumulation": "bf16", "accumulation_chunk": 0}, ["accumulation_chunk", "0"]),
    ({"accumulation_chunk": -3}, ["accumulation_chunk", "-3"]),
])
def test_bad_accumulation_is_one_line_naming_the_field(overrides: dict, needles: list[str]) -> None:
    with pytest.raises(InputError) as caught:
        train(QUICK.replace(**overrides))
    message = str(caught.value)
    assert "\n" not in message and all(needle in message for needle in needles), message


def test_an_unscaled_spec_of_a_scaled_family_is_accepted() -> None:
    policy = QuantPolicy.from_config(TrainConfig(accumulation="int(24,scale=none)", accumulation_chunk=4))
    assert policy.accumulation.format is not None and policy.accumulation.format.scaling.kind == "none"
    assert policy.accumulation.rounding == "nearest" and policy.quantizes_gemms


def test_cli_passes_the_accumulator_and_rejects_a_bad_one() -> None:
    outcome = runner.invoke(app, ["train", "--epochs", "1", "--accumulation", "bf16", "--accumulation-chunk",
                                  "8", "--json"])
    assert outcome.exit_code == 0, outcome.output
    record = json.loads(outcome.stdout)
    assert record["config"]["accumulation"] == "bf16" and record["config"]["accumulation_chunk"] == 8
    assert record["loss_curve"] == train(QUICK.replace(epochs=1, accumulation="bf16",
                                                       accumulation_chunk=8)).loss_curve
    bad = runner.invoke(app, ["train", "--accumulation", "int8"])
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and "accumulation" in bad.stderr
