"""A grouped step, step by step (dse/train/grouped.py): each member's loss value, its gradients and its
weights after every step are, to the last bit, what a run of its config alone gives on the same
batches, a member that diverges included; the group's loss (one log_softmax and one nll_loss over
all members' rows) gives each member F.cross_entropy's value and gradient; per-member scales taken
on the host equal each member's quantization alone at every magnitude."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dse.data import load_dataset
from dse.formats import get
from dse.formats.base import MemberGenerators
from dse.formats.fast import FAST_PATHS, recording, reference_only
from dse.models.proxies import build_model
from dse.train import TrainConfig
from dse.train.grouped import _cross_entropies, _quantized_setup
from dse.train.layers import ConvOp
from dse.train.loop import EXAMPLE_SAMPLES, _run_settings, prepare
from dse.train.policy import TensorQuant
from dse.train.stacked import StackedConvOp

pytestmark = pytest.mark.usefixtures("one_thread")


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's bit patterns (float32 as int32, float64 as int64): equal only when every bit is."""
    return t.detach().contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int64)


@settings(max_examples=60, deadline=None)
@given(members=st.integers(1, 6), rows=st.integers(1, 130), classes=st.integers(2, 20),
       magnitude=st.sampled_from([1e-3, 1.0, 30.0, 1e4]), broken=st.sampled_from([None, math.nan, math.inf]),
       seed=st.integers(0, 2**16))
def test_group_loss_gives_each_member_cross_entropys_value_and_gradient_bit_for_bit(
        members: int, rows: int, classes: int, magnitude: float, broken: float | None, seed: int) -> None:
    source = torch.Generator().manual_seed(seed)
    logits = torch.randn(members, rows, classes, generator=source) * magnitude
    if broken is not None:  # a diverging member: one of its logits NaN or inf
        logits[members - 1, rows // 2, 0] = broken
    targets = torch.randint(0, classes, (members, rows), generator=source)
    alone_values, alone_grads = [], []
    for g in range(members):
        own = logits[g].clone().requires_grad_()
        value = F.cross_entropy(own, targets[g])
        value.backward()
        alone_values.append(value.detach())
        assert own.grad is not None
        alone_grads.append(own.grad)
    stacked = logits.clone().requires_grad_()
    values, objective = _cross_entropies(stacked, targets)
    objective.backward()
    assert stacked.grad is not None
    assert torch.equal(bits(values), bits(torch.stack(alone_values)))
    assert torch.equal(bits(stacked.grad), bits(torch.stack(alone_grads)))


def test_nll_loss_backward_divides_so_a_groups_mean_times_g_gives_each_row_one_over_n() -> None:
    """The group's objective relies on torch's nll_loss backward computing grad_output / total_weight
    as one division: G / (G*N) then rounds to 1/N as alone's 1 / N does, for every G and N here
    (1..64, 1..1000). A product by the reciprocal, G * (1 / (G*N)), would differ at thousands of them."""
    row, target = torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)

    def target_grad(grad_output: float, total_weight: float) -> float:
        return float(torch.ops.aten.nll_loss_backward(torch.tensor(grad_output), row, target, None, 1, -100,
                                                      torch.tensor(total_weight))[0, 0])

    rows = torch.arange(1, 1001, dtype=torch.float32)
    alone = [target_grad(1.0, n) for n in rows.tolist()]
    for members in range(2, 65):
        assert [target_grad(float(members), members * n) for n in rows.tolist()] == alone, members
    by_reciprocal = torch.arange(2, 65, dtype=torch.float32)[:, None] * (1 / (torch.arange(
        2, 65, dtype=torch.float32)[:, None] * rows))
    assert not torch.equal(by_reciprocal, (1 / rows).expand_as(by_reciprocal))


BASE = TrainConfig(model="mlp", dataset="digits", epochs=1, batch_size=64)
STEP_CASES: list[dict[str, Any]] = [
    {},
    {"format": "int8"},
    {"format": "fp8_e4m3", "rounding": "stochastic"},
    {"format": "fp16"},  # the third member's lr 100 overflows fp16 within a few steps
]


@pytest.mark.parametrize("fields", STEP_CASES, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items())
                         or "fp32")
def test_each_grouped_step_gives_each_member_its_alone_loss_gradients_and_weights_bit_for_bit(
        fields: dict[str, Any]) -> None:
    data = load_dataset("digits")
    base = BASE.replace(**fields)
    diverging = base.format == "fp16"
    configs = [base.replace(seed=0), base.replace(seed=1, lr=0.1, momentum=0.5),
               base.replace(seed=2, lr=100.0 if diverging else 0.02)]
    steps, batch = 12, base.batch_size
    order = torch.Generator().manual_seed(5)
    batches = [torch.stack([torch.randperm(len(data.x_train), generator=order)[:batch] for _ in configs])
               for _ in range(steps)]  # each member its own samples
    example = data.x_train[:EXAMPLE_SAMPLES]
    with _run_settings(1):
        models, generators = [], []
        for config in configs:
            torch.manual_seed(config.seed)
            generators.append(torch.Generator().manual_seed(config.seed))
            models.append(build_model(config.model, data))
        group = _quantized_setup(models, configs, generators, example)
        group.on_epoch_start(0)
        group_record = []
        for index in batches:
            values, objective = group.member_losses(group.model(data.x_train[index]), data.y_train[index])
            objective.backward()
            grads = [bits(p.grad).clone() for p in group.model.parameters() if p.grad is not None]
            group.step()
            group.zero_grad()
            group_record.append((values.detach().clone(), grads,
                                 [bits(p).clone() for p in group.model.parameters()]))
        for g, config in enumerate(configs):
            torch.manual_seed(config.seed)
            generator = torch.Generator().manual_seed(config.seed)
            setup = prepare(build_model(config.model, data), config, generator, example)
            setup.on_epoch_start(0)
            params = list(setup.model.parameters())
            for step, index in enumerate(batches):
                loss = setup.loss_fn(setup.model(data.x_train[index[g]]), data.y_train[index[g]])
                values, grads, weights = group_record[step]
                assert bits(values[g]) == bits(loss), f"member {g} step {step}: loss"
                if not math.isfinite(loss.item()):  # alone, the run stops here as diverged
                    assert diverging and g == 2
                    break
                loss.backward()
                for stacked, p in zip(grads, params, strict=True):
                    assert p.grad is not None
                    assert torch.equal(stacked[g], bits(p.grad)), f"member {g} step {step}: a gradient"
                setup.optimizer.step()
                setup.optimizer.zero_grad(set_to_none=True)
                for stacked, p in zip(weights, params, strict=True):
                    assert torch.equal(stacked[g], bits(p)), f"member {g} step {step}: a weight"
            else:
                assert not (diverging and g == 2), "the lr 100 member should have diverged"


HOST_SCALED = FAST_PATHS["host-tensor-scale"].formats


@pytest.mark.parametrize("spec", HOST_SCALED)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_member_scales_taken_on_the_host_equal_each_member_quantized_alone(
        spec: str, rounding: str, dtype: torch.dtype) -> None:
    """Members whose max|x| spans every float32 exponent (scales that leave float32's normals
    included), an all-zero member, and members holding inf or NaN, in one stacked tensor; denormals
    flushed, as training runs."""
    fmt = get(spec)
    quant = TensorQuant(fmt, rounding)
    base = torch.randn(40, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    members = [base * 2.0**k for k in range(-150, 128, 9)] + [base * 0.0]
    members[3][0, 0], members[7][5, 5] = math.inf, math.nan
    x = torch.stack(members).to(dtype)
    with _run_settings(1):
        for chosen in (x, x[10:14]):  # every magnitude; members whose scales are all normal float32s
            with recording() as used:
                stacked = quant.members(chosen, member_generators(len(chosen)))
            assert "host-tensor-scale" in used
            alone = torch.stack([quant(member, torch.Generator().manual_seed(g))
                                 for g, member in enumerate(chosen)])
            with reference_only():
                reference = quant.members(chosen, member_generators(len(chosen)))
            assert same_bits_or_nan(stacked, alone)
            assert same_bits_or_nan(stacked, reference)


def member_generators(members: int) -> MemberGenerators:
    return MemberGenerators([torch.Generator().manual_seed(g) for g in range(members)])


def same_bits_or_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Every value bit for bit, NaN for NaN (whose payloads the host and device paths write apart)."""
    nan = torch.isnan(a)
    return bool(torch.equal(nan, torch.isnan(b)) and torch.equal(bits(a)[~nan], bits(b)[~nan]))


def test_a_stacked_convolution_keeps_each_members_layout_so_its_bias_gradient_sums_as_alone() -> None:
    """An MX-quantized input is a block-padded view with channels innermost; a convolution over it returns
    its output channels-last, the ReLU's backward keeps that layout, and the bias gradient's sum over
    batch and positions follows it. A group that stacked the members' outputs contiguous summed them in
    another order (the MNIST-1D CNN under MXFP8 with pseudo-stochastic rounding: up to 6e-9)."""
    torch.manual_seed(0)
    members, batch, channels, length = 2, 50, 25, 19
    op = ConvOp(stride=(2,), padding=(1,), dilation=(1,), groups=1)
    x = torch.randn(members, batch, length, 32)[..., :channels].transpose(2, 3)  # as MX quantizes them:
    weight = (torch.randn(members, channels, 3, 32)[..., :channels] * 0.2).transpose(2, 3)  # blocks padded
    bias = torch.randn(members, channels)
    upstream = torch.randn(members, batch, channels, 10) * torch.logspace(-4, 4, 10)
    y = StackedConvOp(op).forward(x, weight, bias)
    stacked = StackedConvOp(op).bias_grad(torch.ops.aten.threshold_backward(upstream, torch.relu(y), 0))
    for g in range(members):
        alone = op.forward(x[g], weight[g], bias[g])
        assert y[g].stride() == alone.stride() != alone.contiguous().stride()
        grad = op.bias_grad(torch.ops.aten.threshold_backward(upstream[g], torch.relu(alone), 0))
        assert torch.equal(bits(stacked[g]), bits(grad))
