"""Optimizers and the re-quantization of stored weights and optimizer state (dse/train/optim.py)."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dse.errors import InputError
from dse.formats import get, round_to_integer
from dse.formats.base import MemberGenerators
from dse.train.config import TrainConfig
from dse.train.layers import QuantSwitch, quantize_model, set_quantization
from dse.train.optim import (
    DEFAULT_LR,
    LNSMadam,
    Madam,
    dyadic_code_step,
    madam_optimizer,
    make_optimizer,
    random_fields,
    round_shifted,
)
from dse.train.policy import QuantPolicy

torch.set_num_threads(1)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- the reference update rules, written from the authors' code: jxbz/madam, jiaweizzhao/lns-madam-optimizer


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


@pytest.mark.parametrize(("cls", "lr", "base2"), [(Madam, 0.01, False), (LNSMadam, 1 / 128, True)])
def test_every_parameter_follows_the_reference_when_stepped_together(cls, lr, base2):
    """Several parameters of different shapes in one optimizer (their g* computed together), one with
    no gradient at some steps: each ends where the reference update alone takes it."""
    torch.manual_seed(1)
    shapes = [(6, 5), (7,), (2, 3, 4)]
    starts = [torch.randn(shape) * 0.3 for shape in shapes]
    sequences = [gradient_sequence(shape, 5, seed=10 + i) for i, shape in enumerate(shapes)]
    params = [nn.Parameter(p0.clone()) for p0 in starts]
    optimizer = cls(params, lr=lr)
    for step in range(5):
        for i, param in enumerate(params):
            param.grad = None if (i == 1 and step == 2) else sequences[i][step].clone()
        optimizer.step()
    for i, (param, p0) in enumerate(zip(params, starts, strict=True)):
        grads = [g for step, g in enumerate(sequences[i]) if not (i == 1 and step == 2)]
        assert torch.equal(param.detach(), reference_madam(p0, grads, lr, base2)), shapes[i]


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


# --- LNS-Madam's kept codes and integer rounding, against the float64 algorithm they replace ------------


class ReferenceLNSMadam:
    """LNS-Madam on one LNS-stored weight tensor as first written: every step recomputes the log codes
    from the weights by log2 and rounds the code step -gamma * lr * round(g*) * sign(p) in float64
    with `round_to_integer`. `lns=False` steps take the fp32 base-2 update (warm-up)."""

    def __init__(self, p0: torch.Tensor, lr: float, spec: str, rounding: str, seed: int) -> None:
        self.p = p0.clone()
        self.lr, self.fmt, self.rounding = lr, get(spec), rounding
        self.generator = seeded(seed)
        self.bound = 3.0 * (p0 * p0).mean().sqrt().item()
        self.scale = self.bound / self.fmt.max if self.bound > 0 else 1.0
        self.v = torch.zeros_like(p0)
        self.t = 0

    def step(self, g: torch.Tensor, lns: bool = True) -> None:
        self.t += 1
        self.v = 0.999 * self.v + 0.001 * g**2
        g_star = g / (self.v / (1 - 0.999**self.t)).sqrt()
        g_star = torch.round(torch.nan_to_num(g_star, nan=0.0).clamp(-10.0, 10.0))
        sign = torch.sign(self.p)
        if not lns:
            self.p = (self.p * 2.0 ** (-self.lr * g_star * sign)).clamp(-self.bound, self.bound)
            return
        gamma = self.fmt.gamma
        values = self.fmt.values()
        table = values[values > 0]
        top = (table.numel() - 1) // 2
        codes = torch.round(torch.log2(self.p.abs().double() / self.scale) * gamma).nan_to_num(nan=0.0)
        steps = round_to_integer((-gamma * self.lr) * g_star.double() * sign, self.rounding, self.generator)
        index = (codes + steps).clamp(-top, top).add(top).long()
        stepped = (table[index] * self.scale * sign).to(self.p.dtype)
        self.p = torch.where(torch.isnan(self.p), self.p, stepped)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


LNS_WEIGHTS = ["lns(6,gamma=2)", "lns8", "lns(10,gamma=32)", "lns(12,gamma=128)", "lns(12,gamma=8)",
               "lns(16,gamma=128)"]  # the last two: grids out to 2^+-128, float32-subnormal codes
DYADIC_LRS = [1 / 128, 1 / 32, 3 / 64, 1 / 8, 2.0, 2.0**-30, (2**25 + 1) * 2.0**-32]
OTHER_LRS = [0.01, 0.3, 1 / 3]


def lns_trial(seed: int, shape: tuple[int, int] = (7, 6), steps: int = 6):
    generator = seeded(seed)
    p0 = torch.randn(shape, generator=generator) * 0.2
    p0[0, :2] = 0.0  # zero weights stay zero
    grads = [torch.randn(shape, generator=generator) * 10.0 ** torch.randint(-3, 2, (1,), generator=generator)
             for _ in range(steps)]
    grads[1][1, 0] = 0.0
    return p0, grads


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(LNS_WEIGHTS), st.sampled_from(DYADIC_LRS + OTHER_LRS),
       st.sampled_from(["nearest", "toward_zero", "pseudo_stochastic"]), st.integers(0, 2**16))
def test_lns_code_steps_match_the_float64_algorithm_bit_for_bit(spec, lr, rounding, seed):
    p0, grads = lns_trial(seed)
    param = nn.Parameter(p0.clone())
    optimizer = LNSMadam([param], lr=lr, lns_storage={param: get(spec)}, update_rounding=rounding,
                         generator=seeded(seed))
    reference = ReferenceLNSMadam(p0, lr, spec, rounding, seed)
    for g in grads:
        param.grad = g.clone()
        optimizer.step()
        reference.step(g)
        assert_same_bits(param.detach(), reference.p)


@pytest.mark.parametrize("rounding", ["nearest", "pseudo_stochastic"])
@pytest.mark.parametrize("spec", ["lns8", "lns(12,gamma=128)"])
def test_lns_code_steps_follow_the_lr_a_schedule_sets(spec, rounding):
    """A schedule sets group["lr"] between steps: each step's code step is that lr's (integer for
    1/32, 1/64 and back, float64 for 0.01), not the one worked out for an earlier lr."""
    p0, grads = lns_trial(3, steps=8)
    param = nn.Parameter(p0.clone())
    optimizer = LNSMadam([param], lr=1 / 32, lns_storage={param: get(spec)}, update_rounding=rounding)
    reference = ReferenceLNSMadam(p0, 1 / 32, spec, rounding, 0)
    for g, lr in zip(grads, [1 / 32, 1 / 32, 1 / 64, 1 / 64, 0.01, 1 / 32, 3 / 64, 1 / 64], strict=True):
        optimizer.param_groups[0]["lr"] = reference.lr = lr
        param.grad = g.clone()
        optimizer.step()
        reference.step(g)
        assert_same_bits(param.detach(), reference.p)


@pytest.mark.parametrize("lr", OTHER_LRS)
@pytest.mark.parametrize("spec", ["lns8", "lns(12,gamma=128)"])
def test_stochastic_steps_that_are_not_dyadic_keep_the_float64_draws(spec, lr):
    p0, grads = lns_trial(3)
    param = nn.Parameter(p0.clone())
    optimizer = LNSMadam([param], lr=lr, lns_storage={param: get(spec)}, generator=seeded(5))
    reference = ReferenceLNSMadam(p0, lr, spec, "stochastic", 5)
    for g in grads:
        param.grad = g.clone()
        optimizer.step()
        reference.step(g)
    assert_same_bits(param.detach(), reference.p)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-(2**30) + 1, 2**30 - 1), min_size=1, max_size=40), st.integers(0, 30))
def test_round_shifted_is_round_and_trunc_of_the_exact_quotient(values, k):
    s = torch.tensor(values, dtype=torch.int32)
    quotient = s.double() / 2.0**k  # exact
    assert torch.equal(round_shifted(s.clone(), k, "nearest"), torch.round(quotient).int())
    assert torch.equal(round_shifted(s.clone(), k, "toward_zero"), torch.trunc(quotient).int())


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 30), st.data())
def test_round_shifted_pseudo_stochastic_is_the_float64_rule_where_claimed(k, data):
    bound = min(2**30, 2 ** (53 - k)) - 1
    values = data.draw(st.lists(st.integers(-bound, bound), min_size=1, max_size=40))
    s = torch.tensor(values, dtype=torch.int32)
    expected = round_to_integer(s.double() / 2.0**k, "pseudo_stochastic").int()
    assert torch.equal(round_shifted(s.clone(), k, "pseudo_stochastic"), expected)


@pytest.mark.parametrize("k", [1, 4, 7, 8, 13, 16, 30])
def test_round_shifted_stochastic_is_unbiased(k):
    n = 40000
    generator = seeded(k)
    for value in (1, 3, -3, 2 ** (k - 1), -(2**k) - 1, 5 * 2**k + 3, 2**k - 1):
        if abs(value) >= 2**30:
            continue
        s = torch.full((n,), value, dtype=torch.int32)
        rounded = round_shifted(s, k, "stochastic", generator)
        exact = value / 2**k
        assert set(rounded.unique().tolist()) <= {math.floor(exact), math.floor(exact) + 1}
        fraction = exact - math.floor(exact)
        spread = math.sqrt(fraction * (1 - fraction) / n)
        assert abs(rounded.double().mean().item() - exact) <= 5 * spread + 1e-12, (k, value)


@pytest.mark.parametrize("k", [1, 4, 7, 8, 15, 16, 30])
def test_random_fields_have_k_uniform_bits(k):
    n = 40000
    fields = random_fields(n, k, torch.device("cpu"), seeded(k)).to(torch.int64)
    assert fields.shape == (n,) and int(fields.min()) >= 0 and int(fields.max()) < 2**k
    for bit in range(k):  # each bit, including the top one of each draw's last piece, is a fair coin
        mean = ((fields >> bit) & 1).double().mean().item()
        assert abs(mean - 0.5) <= 5 * 0.5 / math.sqrt(n), (k, bit)


def test_lns_madam_sub_code_steps_are_unbiased():
    """lns8 (gamma 8), lr 3/128: the first step's g* is sign(g), so every code moves by 3/16 of a code,
    down for weights whose gradient agrees with their sign, up for the others."""
    n = 2**16
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    gradient_sign = torch.where(torch.arange(n) % 3 == 0, 1.0, -1.0)
    param = nn.Parameter(sign * 0.05)
    optimizer = LNSMadam([param], lr=3 / 128, lns_storage={param: get("lns8")}, generator=seeded(0))
    before = param.detach().clone()
    param.grad = gradient_sign * 1e-3
    optimizer.step()
    scale = optimizer.state[param]["lns_scale"]
    codes_after = lns_codes(param, scale, 8)
    assert torch.allclose(codes_after, codes_after.round(), atol=1e-6)
    moved = codes_after.round() - lns_codes(before, scale, 8).round()  # the step rounds 0.05 to a code first
    expected = -3 / 16 * sign * gradient_sign  # -gamma * lr * round(g*) * sign(p)
    assert torch.equal(moved, torch.where(moved == expected.floor(), expected.floor(), expected.ceil()))
    for direction in (1.0, -1.0):
        where = expected.sign() == direction
        spread = math.sqrt(3 / 16 * 13 / 16 / int(where.sum()))
        assert abs(moved[where].mean().item() - direction * 3 / 16) <= 5 * spread


def test_dyadic_code_steps_are_recognised_exactly():
    assert dyadic_code_step(8 / 128, 10, "stochastic") == (1, 4)
    assert dyadic_code_step(8 * 3 / 64, 10, "nearest") == (3, 3)
    assert dyadic_code_step(128 / 32, 10, "nearest") == (4, 0)
    assert dyadic_code_step(8 * 0.01, 10, "nearest") is None  # 0.08 needs 56 bits below the point
    assert dyadic_code_step(2.0**-31, 10, "nearest") is None
    assert dyadic_code_step(2.0**27, 10, "nearest") is None  # the code step would not fit int32
    big = (2**25 + 1) * 2.0**-29
    assert dyadic_code_step(big, 10, "nearest") == (2**25 + 1, 29)
    assert dyadic_code_step(big, 10, "pseudo_stochastic") is None  # beyond round_shifted's claim


def test_weights_written_between_steps_are_read_again():
    p0, grads = lns_trial(11, steps=7)
    rewritten = torch.randn(p0.shape, generator=seeded(12)) * 0.1  # off the grid: rounded on the next step
    param = nn.Parameter(p0.clone())
    switch = QuantSwitch()
    optimizer = LNSMadam([param], lr=1 / 32, lns_storage={param: get("lns8")}, update_rounding="nearest",
                         switch=switch)
    reference = ReferenceLNSMadam(p0, 1 / 32, "lns8", "nearest", 0)
    for step, g in enumerate(grads):
        if step == 2:
            with torch.no_grad():
                param.copy_(rewritten)
            reference.p = rewritten.clone()
        switch.enabled = step not in (4, 5)  # an fp32 stretch, as in a warm-up
        param.grad = g.clone()
        optimizer.step()
        reference.step(g, lns=switch.enabled)
        assert_same_bits(param.detach(), reference.p)
    index = optimizer.state[param]["lns_index"]
    assert index.dtype == torch.int32 and index.numel() == param.numel()


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_non_contiguous_lns_weights_step_like_contiguous_ones(rounding):
    p0, grads = lns_trial(15)
    weights = [nn.Parameter(p0.clone()), nn.Parameter(p0.t().contiguous().t())]
    assert not weights[1].is_contiguous()
    for param in weights:
        optimizer = LNSMadam([param], lr=1 / 128, lns_storage={param: get("lns8")}, update_rounding=rounding,
                             generator=seeded(1))
        run_steps(optimizer, param, grads)
    assert_same_bits(weights[1].detach(), weights[0].detach())


def test_codes_are_kept_between_steps_and_recomputed_only_after_outside_writes(monkeypatch):
    log2_calls = []
    log2 = torch.log2
    monkeypatch.setattr(torch, "log2", lambda x: log2_calls.append(x.shape) or log2(x))
    p0, grads = lns_trial(14, steps=5)
    param = nn.Parameter(p0.clone())
    optimizer = LNSMadam([param], lr=1 / 128, lns_storage={param: get("lns8")}, generator=seeded(0))
    for step, g in enumerate(grads):
        if step == 3:
            with torch.no_grad():
                param.mul_(1.5)
        param.grad = g.clone()
        optimizer.step()
    assert log2_calls == [p0.shape, p0.shape]  # the first step and the one after mul_


def test_a_loaded_state_dict_does_not_bring_back_stale_codes():
    p0, grads = lns_trial(13, steps=5)
    param = nn.Parameter(p0.clone())
    optimizer = LNSMadam([param], lr=1 / 8, lns_storage={param: get("lns8")}, update_rounding="nearest")
    reference = ReferenceLNSMadam(p0, 1 / 8, "lns8", "nearest", 0)
    for g in grads[:2]:
        param.grad = g.clone()
        optimizer.step()
        reference.step(g)
    saved, saved_reference = copy.deepcopy(optimizer.state_dict()), copy.deepcopy(reference)
    for g in grads[2:4]:
        param.grad = g.clone()
        optimizer.step()
        reference.step(g)
    optimizer.load_state_dict(saved)  # the moments of step 2, the weights of step 4
    saved_reference.p = reference.p
    param.grad = grads[4].clone()
    optimizer.step()
    saved_reference.step(grads[4])
    assert_same_bits(param.detach(), saved_reference.p)


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


# --- a master copy in a format of its own ---------------------------------------------------------------


def _on_lns_grid(w: torch.Tensor, gamma: int) -> bool:
    """Every non-zero |w| is the largest one times 2^(k/gamma), k an integer (whatever the copy's scale)."""
    magnitudes = w.detach().abs().double()
    magnitudes = magnitudes[magnitudes > 0]
    codes = torch.log2(magnitudes / magnitudes.max()) * gamma
    return bool((codes - codes.round()).abs().max() < 1e-3)


COPIES = {  # the copy's spec: is a tensor on its grid?
    "lns(12,gamma=128)": lambda w: _on_lns_grid(w, 128),
    "lns(16,gamma=2048)": lambda w: _on_lns_grid(w, 2048),
    "lns(16,gamma=128)": lambda w: _on_lns_grid(w, 128),
    "bf16": lambda w: torch.equal(w.bfloat16().float(), w),
    "posit(16,2)": lambda w: torch.equal(get("posit(16,2)").quantize(w), w),
    "fixed(16,8)": lambda w: torch.equal((w * 256).round() / 256, w) and float(w.abs().max()) < 128,
}


@pytest.mark.parametrize("optimizer", ["sgd", "madam", "lns-madam"])
@pytest.mark.parametrize("spec", list(COPIES))
def test_a_master_copy_stays_on_its_own_grid_through_steps(spec, optimizer):
    if optimizer == "lns-madam" and not spec.startswith("lns"):
        pytest.skip("LNS-Madam keeps an LNS copy only (an input error, tested below)")
    model = small_model()
    config = TrainConfig(format="lns(8,gamma=8)", master_weights=spec, update_rounding="stochastic")
    policy = QuantPolicy.from_config(config)
    quantize_model(model, policy)
    lr = 1 / 128 if optimizer == "lns-madam" else 0.05
    optimizer_ = make_optimizer(optimizer, model, policy, lr, 0.9, 0.0, generator=seeded(0))
    before = [m.weight.detach().clone() for m in (model[0], model[2], model[4])]
    train_steps(model, optimizer_, steps=4)
    for layer, start in zip((model[0], model[2], model[4]), before, strict=True):
        weight = layer.weight.detach()
        assert COPIES[spec](weight), spec
        assert not torch.equal(weight, start)  # it trained
    # the copy is finer than the GEMM format: the GEMMs see it quantized to lns8, not the copy itself
    middle = model[2].weight.detach()
    gemm_view = get("lns(8,gamma=8)").quantize(middle)
    assert torch.unique(middle.abs()).numel() > torch.unique(gemm_view.abs()).numel()


def test_lns_madam_steps_an_lns_copy_by_whole_codes_of_the_copy():
    """lr = 1/128 on a gamma = 128 copy: each step moves a log code by the integer round(g*)."""
    model = small_model()
    policy = QuantPolicy.from_config(TrainConfig(format="lns(8,gamma=8)", master_weights="lns(12,gamma=128)"))
    quantize_model(model, policy)
    optimizer = make_optimizer("lns-madam", model, policy, 1 / 128, 0.9, 0.0, generator=seeded(0))
    assert isinstance(optimizer, LNSMadam) and optimizer.lns_storage
    train_steps(model, optimizer, steps=1)
    before = model[2].weight.detach().clone()
    train_steps(model, optimizer, steps=1)
    moved = torch.log2(model[2].weight.detach().abs().double() / before.abs().double()) * 128
    assert (moved - moved.round()).abs().max() < 1e-3  # whole codes
    assert moved.abs().max() <= 10.001  # |round(g*)| <= g_bound


@pytest.mark.parametrize("spec", ["lns(12,gamma=8)", "lns(16,gamma=128)"])
def test_lns_madam_on_a_2_pow_128_grid_saturates_at_the_smallest_nonzero_float32(spec):
    """Scaled to the weights, the lowest codes of a 2^+-128 grid underflow to 0 in float32: weights
    pushed down stop at the smallest non-zero scaled value, keep their sign, and climb back."""
    fmt = get(spec)
    param = nn.Parameter(torch.tensor([0.5, -0.25]))
    optimizer = LNSMadam([param], lr=16.0, lns_storage={param: fmt})
    for _ in range(200):  # 16 * gamma codes a step (round(g*) = 1): far past float32's range
        param.grad = torch.sign(param.detach())
        optimizer.step()
    scale = 0.5 * 3 / fmt.max  # Madam's bound (p_scale 3 x the largest initial |w|) on the top code
    values = (fmt.values().double() * scale).float()
    smallest = float(values[values > 0].min())
    assert smallest > 0 and param.detach().tolist() == [smallest, -smallest]
    param.grad = -torch.sign(param.detach())
    optimizer.step()
    assert param.detach()[0] > smallest and param.detach()[1] < -smallest


@pytest.mark.parametrize("spec", ["bf16", "posit(16,2)", "fixed(16,8)"])
def test_lns_madam_with_a_non_lns_copy_says_why(spec):
    from dse.train.loop import check_config

    canonical = get(spec).spec  # the config holds it in its canonical spelling
    with pytest.raises(InputError, match=f"LNS format.*master_weights '{re.escape(canonical)}'") as caught:
        check_config(TrainConfig(format="lns8", optimizer="lns-madam", master_weights=spec))
    assert "log code" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(("value", "expected"), [
    (True, True), (False, False), ("true", True), ("False", False), ("fp32", True), ("BF16", "bf16"),
    ("lns(12, gamma=128)", "lns(12,gamma=128)")])
def test_master_weights_reads_booleans_words_and_specs(value, expected):
    from dse.train.loop import check_field

    assert check_field("master_weights", value) == expected


@pytest.mark.parametrize("value", ["lns(8,gama=8)", "maybe", "lns(16,gamma=3)"])
def test_an_unparsable_master_copy_is_one_line(value):
    from dse.train.loop import check_config

    with pytest.raises(InputError, match="master_weights") as caught:
        check_config(TrainConfig(format="int8", master_weights=value))
    assert "\n" not in str(caught.value)


# --- Madam's p_scale and g_bound -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["madam", "lns-madam"])
def test_p_scale_bounds_the_weights_at_that_many_initial_rms(name):
    for p_scale in (0.5, 10.0):
        model = small_model()
        rms = [float(m.weight.detach().square().mean().sqrt()) for m in (model[0], model[2], model[4])]
        optimizer = make_optimizer(name, model, QuantPolicy.fp32(), 0.5, 0.9, 0.0, p_scale=p_scale)
        train_steps(model, optimizer, steps=20)
        peaks = [float(m.weight.detach().abs().max()) for m in (model[0], model[2], model[4])]
        for peak, start in zip(peaks, rms, strict=True):
            assert peak <= p_scale * start * (1 + 1e-6)
        if p_scale == 0.5:  # a large lr drives weights to the bound
            assert max(peak / start for peak, start in zip(peaks, rms, strict=True)) > 0.49


@pytest.mark.parametrize("name", ["madam", "lns-madam"])
def test_g_bound_caps_each_step(name):
    model = small_model()
    before = model[2].weight.detach().clone()
    lr = 1 / 128
    optimizer = make_optimizer(name, model, QuantPolicy.fp32(), lr, 0.9, 0.0, g_bound=2.0)
    train_steps(model, optimizer, steps=1)
    ratio = (model[2].weight.detach() / before).abs()
    largest = math.exp(2 * lr) if name == "madam" else 2 ** (2 * lr)
    assert float(ratio.max()) <= largest * (1 + 1e-6) and float(ratio.min()) >= (1 / largest) * (1 - 1e-6)


# --- Madam and LNS-Madam over a stacked group: every member as alone, bit for bit ---------------------

MEMBER_SHAPES = [(13, 7), (13,), (10, 13), (10,)]
"""Weights and biases of a small network; no size a multiple of torch's vector blocks, so each
member's elements sit at other offsets in the stacked tensor than in its own (kernel tails differ)."""

MEMBER_LRS = {
    "dyadic": [1 / 32, 1 / 32, 1 / 32],           # one integer code step for all
    "dyadic-each": [1 / 32, 1 / 128, 1 / 8],      # a shift per member (1/8 x gamma 8: k = 0)
    "dyadic-apart": [1 / 32, 1 / 128, 1 / 32],    # members 0 and 2 share a shift (their draws at once)
    "float64": [0.065, 0.003, 0.13],              # code steps rounded in float64
    "mixed": [1 / 64, 0.065, 1 / 16],             # integer and float64 members in one group
}
"""0.065 and 0.13: lrs whose 2^(-lr * k) for some |k| <= 10 differ in the last bit between torch's
vector pow and its scalar tail (`LNSMadam._power_of_two`)."""


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(torch.int32)


def _alone_and_stacked(name: str, spec: str | None, lrs: list[float], p_scales: list[float],
                       g_bounds: list[float], rounding: str, shapes: list[tuple[int, ...]] = MEMBER_SHAPES):
    """G optimizers alone and one over the stacked members, on the same initial weights (on the LNS
    grid where `spec` stores them) and generators seeded alike."""
    members = len(lrs)
    fmt = get(spec) if spec else None
    source = seeded(11)
    initial = [[torch.randn(shape, generator=source) * (0.1 + g) for shape in shapes]
               for g in range(members)]
    if fmt is not None:
        initial = [[fmt.quantize(t) if t.dim() == 2 else t for t in ts] for ts in initial]
    alone = []
    for g in range(members):
        params = [nn.Parameter(t.clone()) for t in initial[g]]
        lns = {p: fmt for p in params if p.dim() == 2} if fmt is not None else {}
        optimizer = madam_optimizer(name, params, lrs[g], p_scales[g], g_bounds[g], lns, rounding,
                                    seeded(100 + g), QuantSwitch())
        alone.append((params, optimizer))
    stacked = [nn.Parameter(torch.stack([initial[g][i] for g in range(members)]))
               for i in range(len(shapes))]
    lns = {p: fmt for p in stacked if p.dim() == 3} if fmt is not None else {}
    generators = MemberGenerators([seeded(100 + g) for g in range(members)])
    optimizer = madam_optimizer(name, stacked, lrs, p_scales, g_bounds, lns, rounding, generators,
                                QuantSwitch(), members=members)
    return alone, (stacked, optimizer)


def _step_alike(alone, stacked, steps: int, source: torch.Generator, diverge_at: int | None = None,
                warmup: int = 0) -> None:
    """Steps both with the same gradients (member 1's NaN/inf from `diverge_at` on, and its weights
    overwritten with NaN and inf there); quantization (the LNS code steps) switched on after `warmup`
    steps; every member's weights compared bit for bit after every step."""
    params, optimizer = stacked
    for step in range(steps):
        for switch in [o.switch for _, o in alone if isinstance(o, LNSMadam)] + \
                ([optimizer.switch] if isinstance(optimizer, LNSMadam) else []):
            switch.enabled = step >= warmup
        grads = [torch.randn((len(alone), *p.shape[1:]), generator=source) * 10.0 ** (step % 3 - 1)
                 for p in params]
        if diverge_at is not None and step >= diverge_at:
            for grad in grads:
                grad[1].view(-1)[::2] = math.nan
                grad[1].view(-1)[1::3] = math.inf
        if diverge_at is not None and step == diverge_at:  # its weights, written by someone else
            with torch.no_grad():
                for i, p in enumerate(params):
                    p[1].view(-1)[::3] = math.inf
                    p[1].view(-1)[1::4] = math.nan
                    alone[1][0][i].view(-1)[::3] = math.inf
                    alone[1][0][i].view(-1)[1::4] = math.nan
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad.clone()
        optimizer.step()
        for g, (own, own_optimizer) in enumerate(alone):
            for p, grad in zip(own, grads, strict=True):
                p.grad = grad[g].clone()
            own_optimizer.step()
            for i, p in enumerate(own):
                assert torch.equal(_bits(params[i][g]), _bits(p)), (step, g, i)


@pytest.mark.parametrize("lrs", list(MEMBER_LRS), ids=list(MEMBER_LRS))
@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "pseudo_stochastic", "toward_zero",
                                      "stochastic(4)"])
@pytest.mark.parametrize("spec", ["lns8", "lns(16,gamma=2048)"])
def test_stacked_lns_madam_steps_every_member_as_alone_bit_for_bit(spec: str, rounding: str,
                                                                   lrs: str) -> None:
    """Per-member lr, p_scale and g_bound in one group: each member's weight bound, LNS scale and
    table, integer or float64 code steps and draws are its own; the biases (not LNS-stored) take the
    reference update (torch.pow, whose kernel tails differ from its body). Member 1's g_bound 0.75
    clamps g* at most steps."""
    alone, stacked = _alone_and_stacked("lns-madam", spec, MEMBER_LRS[lrs], [3.0, 10.0, 1.5],
                                        [10.0, 0.75, 2.5], rounding)
    _step_alike(alone, stacked, steps=8, source=seeded(5))


@pytest.mark.parametrize("lrs", list(MEMBER_LRS), ids=list(MEMBER_LRS))
def test_stacked_madam_steps_every_member_as_alone_bit_for_bit(lrs: str) -> None:
    """Member 1's g_bound 0.5 clamps g* at every step (|g*| is about 1 at the first)."""
    alone, stacked = _alone_and_stacked("madam", None, MEMBER_LRS[lrs], [3.0, 10.0, 1.5], [10.0, 0.5, 10.0],
                                        "nearest")
    _step_alike(alone, stacked, steps=8, source=seeded(6))


@pytest.mark.parametrize("name, spec", [("madam", None), ("lns-madam", "lns8"),
                                        ("lns-madam", "lns(16,gamma=2048)")])
def test_a_diverging_member_leaves_the_stacked_others_as_alone(name: str, spec: str | None) -> None:
    """Member 1's gradients turn NaN and inf and its weights are overwritten (as a group's tally
    restores a diverged member's): the others' steps (their kept LNS codes recomputed from their
    weights) stay each its run alone, and so does member 1's."""
    alone, stacked = _alone_and_stacked(name, spec, [1 / 32, 0.01, 1 / 16], [3.0, 3.0, 10.0], [10.0] * 3,
                                        "stochastic")
    _step_alike(alone, stacked, steps=6, source=seeded(7), diverge_at=3)


@pytest.mark.parametrize("spec", ["lns8", "lns(16,gamma=2048)"])
def test_stacked_lns_madam_through_an_fp32_warm_up_as_alone(spec: str) -> None:
    """The posit recipe's warm-up: the reference update for every weight first, then whole codes of
    the grid from weights that left it."""
    alone, stacked = _alone_and_stacked("lns-madam", spec, [1 / 32, 0.01, 1 / 64], [3.0, 10.0, 2.0],
                                        [10.0] * 3, "stochastic")
    _step_alike(alone, stacked, steps=7, source=seeded(8), warmup=3)


@pytest.mark.parametrize("spec", ["lns(12,gamma=8)", "lns(16,gamma=128)"])
def test_stacked_lns_madam_members_losing_different_underflowed_codes_saturate_as_alone(spec: str) -> None:
    """Members whose weights lie 2^40 and 2^30 apart lose different numbers of a 2^+-128 grid's lowest
    codes to float32 underflow (their scales differ): pushed down, each stops at its own smallest
    non-zero weight, sign kept, and climbs back, as alone (a member bounded by another's count
    would reach 0 or stop short)."""
    fmt = get(spec)
    initial = [torch.tensor([0.5, -0.25]) * factor for factor in (1.0, 2.0**-40, 2.0**30)]
    alone = [nn.Parameter(t.clone()) for t in initial]
    optimizers = [LNSMadam([p], lr=16.0, lns_storage={p: fmt}) for p in alone]
    stacked = nn.Parameter(torch.stack(initial))
    optimizer = LNSMadam([stacked], lr=[16.0] * 3, lns_storage={stacked: fmt}, members=3)
    weights = []
    for step in range(201):
        direction = 1.0 if step < 200 else -1.0  # 16 gamma codes down a step, then one step up
        stacked.grad = direction * torch.sign(stacked.detach())
        optimizer.step()
        for g, (p, own) in enumerate(zip(alone, optimizers, strict=True)):
            p.grad = direction * torch.sign(p.detach())
            own.step()
            assert torch.equal(_bits(stacked[g]), _bits(p)), (step, g)
        weights.append(stacked.detach().clone())
    positive = fmt.values()[fmt.values() > 0].double()
    lost = {int(((positive * scale).float() == 0).sum()) for scale in optimizer.state[stacked]["lns_scale"]}
    assert len(lost) == 3  # each member loses its own number of codes
    assert torch.equal(weights[198], weights[199]) and (weights[199] != 0).all()  # saturated, signs kept
    assert (weights[200].abs() > weights[199].abs()).all()


def test_stacked_lns_madam_on_two_threads_as_alone() -> None:
    """On two threads torch splits an elementwise operation over 32768 elements or more among them
    (its kernels' tails then fall per chunk): the stacked reference update keeps each member's split,
    for members below 32768 elements (20000) and above (203 x 201, in the fp32 warm-up's 2 steps)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        alone, stacked = _alone_and_stacked("lns-madam", "lns8", [0.065, 0.13, 1 / 64], [3.0] * 3, [10.0] * 3,
                                            "nearest", shapes=[(203, 201), (20000,), (30, 203), (30,)])
        _step_alike(alone, stacked, steps=4, source=seeded(9), warmup=2)
    finally:
        torch.set_num_threads(threads)


def test_the_powers_of_a_group_off_the_cpu_are_one_operation() -> None:
    """The member-by-member powers (2 threads, 32768 elements or more) are for torch's CPU kernel
    tails; elsewhere (CUDA: one scalar function per element, wherever it sits) a group's update stays
    one pow, not G."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Pows(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Pows.calls += func.name().startswith("aten::pow")
            return func(*args, **(kwargs or {}))

    stacked = nn.Parameter(torch.ones(3, 203, 201))
    optimizer = LNSMadam([stacked], lr=[1 / 32, 0.065, 0.13], members=3)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with Pows():
            optimizer._power_of_two(torch.zeros(3, 203, 201, device="meta"))
    finally:
        torch.set_num_threads(previous)
    assert Pows.calls == 1


def _step_operations(name: str, members: int, rounding: str) -> int:
    """The torch operations of one stacked Madam / LNS-Madam step over `members` members (each with
    its own lr and p_scale)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    lrs = [1 / 32 * 2.0**-g for g in range(members)]
    _, (params, optimizer) = _alone_and_stacked(name, "lns8" if name == "lns-madam" else None, lrs,
                                                [3.0 + g for g in range(members)], [10.0] * members, rounding)
    for step in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        if step == 1:
            with Count():
                optimizer.step()
        else:
            optimizer.step()
    return Count.calls


@pytest.mark.parametrize("name", ["madam", "lns-madam"])
def test_madam_steps_a_group_in_as_many_operations_as_one_member(name: str) -> None:
    """One stacked step, not one per member: a group of 6 runs the operations a group of 2 runs
    (different lrs and p_scales; nearest rounding draws nothing)."""
    assert _step_operations(name, 6, "nearest") == _step_operations(name, 2, "nearest")
