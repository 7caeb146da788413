"""Optimizers and the re-quantization of stored weights and optimizer state (dse/train/optim.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dse.errors import InputError
from dse.formats import get
from dse.train.config import TrainConfig
from dse.train.layers import quantize_model, set_quantization
from dse.train.optim import DEFAULT_LR, LNSMadam, Madam, make_optimizer
from dse.train.policy import QuantPolicy

torch.set_num_threads(1)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- the reference update rules, written from seeds.md A.3 (jxbz/madam, jiaweizzhao/lns-madam-optimizer) ---


def reference_madam(p0: torch.Tensor, grads: list[torch.Tensor], lr: float,
                    base2_rounded: bool) -> torch.Tensor:
    """Madam (base e, real g*) or LNS-Madam (g* rounded to an integer, base 2); p_scale 3, g_bound 10."""
    p = p0.clone()
    bound = 3.0 * math.sqrt(float((p0 * p0).mean()))
    v = torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        v = 0.999 * v + 0.001 * g**2
        g_star = g / (v / (1 - 0.999**t)).sqrt()
        g_star = torch.nan_to_num(g_star, nan=0.0).clamp(-10.0, 10.0)
        if base2_rounded:
            p = p * 2.0 ** (-lr * torch.round(g_star) * torch.sign(p))
        else:
            p = p * torch.exp(-lr * g_star * torch.sign(p))
        p = p.clamp(-bound, bound)
    return p


def run_steps(optimizer: torch.optim.Optimizer, param: torch.Tensor, grads: list[torch.Tensor]) -> None:
    for g in grads:
        param.grad = g.clone()
        optimizer.step()


def gradient_sequence(shape: tuple[int, ...], steps: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    grads = [torch.randn(shape, generator=generator) * 10.0 ** torch.randint(-3, 2, (1,), generator=generator)
             for _ in range(steps)]
    grads[1][0] = 0.0  # a zero gradient at step 2: 0/sqrt(v) with v > 0, not NaN
    return grads


@pytest.mark.parametrize(("cls", "lr", "base2"), [(Madam, 0.01, False), (LNSMadam, 1 / 128, True)])
def test_madam_and_lns_madam_follow_the_reference_update(cls, lr, base2):
    torch.manual_seed(0)
    p0 = torch.randn(6, 5) * 0.3
    grads = gradient_sequence((6, 5), 6, seed=1)
    param = nn.Parameter(p0.clone())
    run_steps(cls([param], lr=lr), param, grads)
    expected = reference_madam(p0, grads, lr, base2)
    assert torch.equal(param.detach(), expected)  # the same arithmetic, step by step
    assert not torch.equal(param.detach(), p0)


def test_nan_normalized_gradient_becomes_zero():
    param = nn.Parameter(torch.tensor([0.5, -0.25, 1.0]))
    param.grad = torch.tensor([0.0, 0.0, 1.0])  # 0/0 for the first two
    Madam([param], lr=0.1).step()
    assert param[0].item() == 0.5 and param[1].item() == -0.25


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-4, 4, allow_nan=False, allow_subnormal=False).filter(lambda v: abs(v) > 1e-3),
                min_size=2, max_size=12),
       st.integers(0, 2**16), st.sampled_from([0.01, 0.1, 0.5]), st.booleans())
def test_madam_never_flips_a_sign_and_stays_within_its_bound(values, seed, lr, lns):
    p0 = torch.tensor(values)
    param = nn.Parameter(p0.clone())
    optimizer = LNSMadam([param], lr=lr) if lns else Madam([param], lr=lr)
    bound = 3.0 * math.sqrt(float((p0 * p0).mean()))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(5):
        param.grad = torch.randn(p0.shape, generator=generator)
        optimizer.step()
        assert torch.equal(torch.sign(param.detach()), torch.sign(p0))
        assert float(param.detach().abs().max()) <= bound * (1 + 1e-6)


# --- LNS-Madam on LNS-stored weights ------------------------------------------------------------------


def lns_codes(p: torch.Tensor, scale: float, gamma: int) -> torch.Tensor:
    """gamma * log2(|p| / scale): the log code, an integer for weights on the LNS grid."""
    return torch.log2(p.detach().abs().double() / scale) * gamma


def lns_setup(lr: float, rounding: str = "stochastic", generator_seed: int = 0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    config = TrainConfig(format="lns8", master_weights=False, optimizer="lns-madam", update_rounding=rounding,
                         full_precision_layers=())
    policy = QuantPolicy.from_config(config)
    quantize_model(model, policy)
    optimizer = make_optimizer("lns-madam", model, policy, lr, 0.0, 0.0,
                               generator=seeded(generator_seed))
    return model, optimizer


def test_lns_weights_move_by_the_rounded_normalized_gradient_in_whole_codes():
    gamma, lr = 8, 1 / 8  # gamma * lr = 1: one code per unit of round(g*)
    model, optimizer = lns_setup(lr)
    weight = model[0].weight
    initial_bound = 3.0 * math.sqrt(float((weight.detach() ** 2).mean()))
    scale = initial_bound / get("lns8").max
    x = torch.randn(32, 8)
    v = torch.zeros_like(weight)
    top = 2**6 - 1
    for step in range(1, 5):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        g = weight.grad.detach().clone()
        v = 0.999 * v + 0.001 * g**2
        g_star = torch.round(torch.nan_to_num(g / (v / (1 - 0.999**step)).sqrt(), nan=0.0).clamp(-10, 10))
        before = weight.detach().clone()
        optimizer.step()
        codes_after = lns_codes(weight, scale, gamma)
        assert torch.allclose(codes_after, codes_after.round(), atol=1e-6)  # on the fixed-scale grid
        if step > 1:  # from step 2 the weights started on the grid
            moved = lns_codes(before, scale, gamma).round() - g_star.double() * torch.sign(before)
            expected = moved.clamp(-top, top)
            assert torch.equal(codes_after.round(), expected)
        assert torch.equal(torch.sign(weight.detach()), torch.sign(before))
        assert float(weight.detach().abs().max()) <= initial_bound * (1 + 1e-6)


def test_lns_sub_code_steps_are_rounded_to_whole_codes_and_reproducible():
    gamma, lr = 8, 1 / 128  # gamma * lr * round(g*) = k / 16 codes: rounded stochastically

    def train(seed: int) -> torch.Tensor:
        model, optimizer = lns_setup(lr, generator_seed=seed)
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(5))
        signs = torch.sign(model[0].weight.detach())
        for _ in range(6):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
            assert torch.equal(torch.sign(model[0].weight.detach()), signs)
        scale = optimizer.state[model[0].weight]["lns_scale"]
        codes = lns_codes(model[0].weight, scale, gamma)
        assert torch.allclose(codes, codes.round(), atol=1e-6)
        return model[0].weight.detach().clone()

    assert torch.equal(train(1), train(1))
    assert not torch.equal(train(1), train(2))


def test_a_nan_lns_weight_stays_nan_without_crashing():
    model, optimizer = lns_setup(1 / 8)
    x = torch.randn(32, 8)
    for step in range(2):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        if step == 1:
            with torch.no_grad():
                model[0].weight[0, 0] = float("nan")
        optimizer.step()
    weight = model[0].weight.detach()
    assert torch.isnan(weight[0, 0]) and torch.isfinite(weight.flatten()[1:]).all()


def test_nearest_update_rounding_stalls_sub_code_steps():
    model, optimizer = lns_setup(1 / 128, rounding="nearest")
    x = torch.randn(32, 8)
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()  # first step puts the weights on the grid
    after_first = model[0].weight.detach().clone()
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()
    # |round(g*)| <= 10, so |k/16| <= 10/16: only |k| >= 9 rounds to a whole code (8/16 ties to even)
    moved = model[0].weight.detach() != after_first
    assert moved.float().mean() < 0.5


# --- stored weights and optimizer state ------------------------------------------------------------------


def small_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(4))
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("name", ["sgd", "adam", "madam"])
def test_stored_weights_stay_on_the_format_grid(name, rounding):
    model = small_model()
    config = TrainConfig(format="int4", master_weights=False, update_rounding=rounding,
                         full_precision_layers=("first", "last"))
    policy = QuantPolicy.from_config(config)
    quantize_model(model, policy)
    biases = [layer.bias.detach().clone() for layer in (model[0], model[2], model[4])]
    optimizer = make_optimizer(name, model, policy, None, 0.9, 0.0, generator=seeded(0))
    train_steps(model, optimizer)
    middle = model[2].weight.detach()
    assert torch.unique(middle).numel() <= 15
    assert torch.equal(get("int4").quantize(middle), middle)
    assert torch.unique(model[0].weight.detach()).numel() > 15  # the fp32 first layer is not stored in int4
    assert not torch.equal(model[2].bias.detach(), biases[1])  # biases update in fp32
    assert torch.unique(model[2].bias.detach()).numel() == 12


def test_master_weights_keep_fp32_updates():
    model = small_model()
    policy = QuantPolicy.from_config(TrainConfig(format="int4"))
    quantize_model(model, policy)
    train_steps(model, make_optimizer("sgd", model, policy, 0.1, 0.9, 0.0))
    assert torch.unique(model[2].weight.detach()).numel() > 15


def test_optimizer_state_is_requantized_after_each_step():
    model = small_model()
    config = TrainConfig(format="int8", optimizer_state="int8", update_rounding="nearest")
    policy = QuantPolicy.from_config(config)
    quantize_model(model, policy)
    optimizer = make_optimizer("sgd", model, policy, 0.1, 0.9, 0.0)
    train_steps(model, optimizer)
    for param in model.parameters():
        buffer = optimizer.state[param]["momentum_buffer"]
        assert torch.equal(get("int8").quantize(buffer), buffer)
        assert torch.unique(buffer).numel() <= 255


def test_adam_moments_are_requantized():
    model = small_model()
    config = TrainConfig(format="int8", optimizer_state="bf16", update_rounding="nearest")
    policy = QuantPolicy.from_config(config)
    quantize_model(model, policy)
    optimizer = make_optimizer("adam", model, policy, None, 0.9, 0.0)
    train_steps(model, optimizer)
    for state in optimizer.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key].bfloat16().float(), state[key])


def test_warm_up_skips_storage_until_quantization_is_switched_on():
    model = small_model()
    policy = QuantPolicy.from_config(TrainConfig(format="int4", master_weights=False))
    quantize_model(model, policy)
    set_quantization(model, False)
    optimizer = make_optimizer("sgd", model, policy, 0.1, 0.9, 0.0, generator=seeded(0))
    train_steps(model, optimizer, steps=2)
    assert torch.unique(model[2].weight.detach()).numel() > 15
    set_quantization(model, True)
    train_steps(model, optimizer, steps=1)
    assert torch.unique(model[2].weight.detach()).numel() <= 15


def test_stochastic_storage_is_reproducible_with_a_seeded_generator():
    def final_weights(seed: int) -> torch.Tensor:
        model = small_model()
        policy = QuantPolicy.from_config(TrainConfig(format="int4", master_weights=False))
        quantize_model(model, policy)
        optimizer = make_optimizer("sgd", model, policy, 0.05, 0.9, 0.0, generator=seeded(seed))
        train_steps(model, optimizer)
        return model[2].weight.detach().clone()

    assert torch.equal(final_weights(7), final_weights(7))
    assert not torch.equal(final_weights(7), final_weights(8))


def test_default_learning_rates_come_from_the_reference_optimizers():
    model = small_model()
    policy = QuantPolicy.fp32()
    assert make_optimizer("madam", model, policy, None, 0.9, 0.0).param_groups[0]["lr"] == 0.01
    assert make_optimizer("lns-madam", model, policy, None, 0.9, 0.0).param_groups[0]["lr"] == 1 / 128
    for name in DEFAULT_LR:
        assert make_optimizer(name, copy.deepcopy(model), policy, 0.3, 0.9, 0.0).param_groups[0]["lr"] == 0.3


@pytest.mark.parametrize(("name", "config", "weight_decay", "message"), [
    ("rmsprop", TrainConfig(), 0.0, "rmsprop"),
    ("niti", TrainConfig(), 0.0, "niti"),
    ("lns-madam", TrainConfig(format="int8", master_weights=False), 0.0, "int8"),
    ("madam", TrainConfig(), 1e-4, "weight_decay"),
])
def test_invalid_optimizer_combinations_are_input_errors(name, config, weight_decay, message):
    model = small_model()
    with pytest.raises(InputError, match=message):
        make_optimizer(name, model, QuantPolicy.from_config(config), None, 0.9, weight_decay)


def test_lns_madam_with_master_weights_accepts_any_gemm_format():
    model = small_model()
    policy = QuantPolicy.from_config(TrainConfig(format="int8"))
    quantize_model(model, policy)
    optimizer = make_optimizer("lns-madam", model, policy, None, 0.9, 0.0)
    train_steps(model, optimizer, steps=1)
    assert isinstance(optimizer, LNSMadam)
