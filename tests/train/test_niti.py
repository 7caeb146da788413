"""NITI integer-only training: the integer primitives against models written from the reference code
(wangmaolin/niti: ti_torch.py, ti_loss.py), the layers against hand computations in int64, and short
real training runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dse.errors import InputError
from dse.train.config import TrainConfig
from dse.train.niti import (
    NitiConv,
    NitiCrossEntropy,
    NitiEmbedding,
    NitiLinear,
    NitiMatmul,
    NitiTensor,
    act_calc,
    convert_model,
    float_to_int,
    grad_calc,
    integer_ce_error,
    niti_mu_for_epoch,
    niti_setup,
    psto_shift,
    round_shift,
    sto_shift,
    weight_mantissa,
    weight_quant,
)

torch.set_num_threads(1)

INT16 = np.arange(-(2**15), 2**15, dtype=np.int64)


# --- reference models, written from the pseudo-code (PyTorch 1.7 semantics: `//` truncates) -------

def trunc_div(x: np.ndarray, d: int) -> np.ndarray:
    return np.trunc(x / d).astype(np.int64)


def ref_round_shift(x: np.ndarray, shift: int) -> np.ndarray:
    """ti_torch.RoundShift: round_temp = x // 2^s; decision = (x - round_temp 2^s) // 2^(s-1)."""
    if shift == 0:
        return np.clip(x, -127, 127)
    round_temp = trunc_div(x, 2**shift)
    prob = x - round_temp * 2**shift
    return np.clip(round_temp + trunc_div(prob, 2 ** (shift - 1)), -127, 127)


def ref_psto_shift(x: np.ndarray, shift: int) -> np.ndarray:
    """ti_torch.PstoShift: the top half of the discarded bits against the bottom half."""
    round_temp = trunc_div(x, 2**shift)
    prob = np.abs(x - round_temp * 2**shift)
    quantized_prob = trunc_div(prob, 2 ** (shift // 2))
    pseudo_rand = prob - quantized_prob * 2 ** (shift // 2)
    if shift % 2 == 1:
        pseudo_rand = pseudo_rand * 2
    decision = np.where(quantized_prob <= pseudo_rand, 0, 1) * np.sign(x)
    return np.clip(round_temp + decision, -127, 127)


def ref_float_to_int8(x: np.ndarray) -> tuple[np.ndarray, int]:
    """ti_torch.TiFloatToInt8 in float64 with math.log2."""
    b = math.ceil(math.log2(float(np.abs(x).max())))
    return np.clip(np.round(x.astype(np.float64) * 2.0 ** (7 - b)), -128, 127).astype(np.int64), b - 7


def ref_ceil_log2(peak: int) -> int:
    return 0 if peak == 0 else math.ceil(math.log2(peak)) if peak < 2**50 else (peak - 1).bit_length()


def ref_act_calc(acc: np.ndarray) -> tuple[np.ndarray, int]:
    shift = ref_ceil_log2(int(np.abs(acc).max())) - 7
    if shift > 0:
        return ref_round_shift(acc, shift), shift
    return np.clip(acc, -127, 127), 0


def ref_sto_shift_4(v: int, draw: int) -> int:
    """The reference's StoShift of an error by 4 bits: the magnitude's low 4 bits against a 4-bit
    draw (up when they exceed it), the sign back on, clipped to int8's +-127."""
    q, r = divmod(abs(v), 16)
    q += 1 if r > draw else 0
    return max(-127, min(127, q if v >= 0 else -q))


def ref_integer_ce(z: list[list[int]], e: int, targets: list[int], draws: list[list[int]]) -> list[list[int]]:
    """ti_loss.TiLoss on Python ints, integer division truncating toward zero."""
    def tdiv(a: int, d: int) -> int:
        return abs(a) // d if a >= 0 else -(abs(a) // d)

    out = []
    for row, target, draw in zip(z, targets, draws, strict=True):
        if e > -7:
            s = [tdiv(v * 47274, 2**15) for v in row]
            s = [v * 2**e for v in s] if e >= 0 else [tdiv(v, 2**-e) for v in s]
            offset = max(s) - 10
            n = [2 ** max(v - offset, 0) - 1 for v in s]
        else:
            n = [2 ** (1 - 2 * e) + v * 2 ** (1 - e) + v * v for v in row]
        total = sum(n)
        p = [v * 2**11 // total for v in n]
        p[target] -= sum(p)
        out.append([ref_sto_shift_4(v, d) for v, d in zip(p, draw, strict=True)])
    return out


def ref_integer_ce_as_run(z: torch.Tensor, out_exp: int, target: torch.Tensor,
                          draws: torch.Tensor) -> list[list[int]]:
    """ti_loss.TiLoss.forward expression by expression, as PyTorch >= 1.5 runs it (`/` is true
    division); out_exp is a tensor in the reference (a 0-d float). StoShift with the given draws."""
    out_exp_t = torch.tensor(float(out_exp))
    s = z.type(torch.int64)
    if out_exp_t > -7:
        s = s * 47274 / (2**15)
        if out_exp_t >= 0:
            s = s * 2**out_exp_t
        else:
            s = s / (2**-out_exp_t)
        out_max, _ = torch.max(s, dim=1)
        offset = out_max - 10
        s = s - offset.view(-1, 1)
        s = torch.max(s, torch.tensor(0, dtype=torch.int8).type(torch.int64))
        out_grad = 2**s - 1
    else:
        e = out_exp_t.type(torch.int64)
        out_grad = 2 ** (1 - 2 * e) + s * 2 ** (1 - e) + s * s
    out_sum = out_grad.sum(1, dtype=torch.int64)
    out_grad = out_grad * (2**11) / out_sum.view(-1, 1)
    out_grad[torch.arange(z.size(0)), target] -= out_grad.sum(1, dtype=torch.int64)
    grad = out_grad.type(torch.int32).tolist()
    return [[ref_sto_shift_4(v, d) for v, d in zip(row, draw, strict=True)]
            for row, draw in zip(grad, draws.tolist(), strict=True)]


def mantissa(t: torch.Tensor, exp: int) -> torch.Tensor:
    m = t.detach().double() * 2.0**-exp
    assert torch.equal(m, m.round()), "not on the integer grid of its exponent"
    return m.to(torch.int64)


# --- shifts -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", range(17))
def test_round_shift_matches_reference_on_every_int16(shift: int) -> None:
    expected = ref_round_shift(INT16, shift)
    x = torch.from_numpy(INT16)
    assert np.array_equal(round_shift(x, shift).numpy(), expected)
    for dtype in (torch.float32, torch.float64):  # the float path used on GEMM accumulators
        assert np.array_equal(round_shift(x.to(dtype), shift).numpy().astype(np.int64), expected)


@pytest.mark.parametrize("shift", range(17))
def test_psto_shift_matches_reference_on_every_int16(shift: int) -> None:
    assert np.array_equal(psto_shift(torch.from_numpy(INT16), shift).numpy(), ref_psto_shift(INT16, shift))


@settings(max_examples=200, deadline=None)
@given(st.integers(-(2**40), 2**40), st.integers(0, 30))
def test_shifts_round_to_a_neighbour_and_agree_across_dtypes(value: int, shift: int) -> None:
    x = torch.tensor([value])
    low = abs(value) >> shift
    for result in (round_shift(x, shift, bitwidth=42), psto_shift(x, shift, bitwidth=42)):
        got = int(result)
        assert abs(got) in (low, low + 1) and (got == 0 or (got > 0) == (value > 0))
    nearest = int(round_shift(x, shift, bitwidth=42))
    assert int(round_shift(x.double(), shift, bitwidth=42)) == nearest
    assert abs(abs(value) / 2**shift - abs(nearest)) <= 0.5


def test_sto_shift_draws_from_the_generator() -> None:
    x = torch.randint(-2000, 2000, (50, 40))
    got = sto_shift(x, 4, torch.Generator().manual_seed(7))
    draws = torch.randint(0, 16, x.shape, dtype=torch.int64, generator=torch.Generator().manual_seed(7))
    magnitude = x.abs()
    expected = ((magnitude >> 4) + ((magnitude & 15) > draws).long()) * x.sign()
    assert torch.equal(got, expected.clamp(-127, 127))
    # Unbiased: 3/16 rounds up with probability 3/16.
    mean = sto_shift(torch.full((20000,), 3), 4, torch.Generator().manual_seed(1)).double().mean()
    assert abs(float(mean) - 3 / 16) < 0.015


def test_float_to_int_matches_tifloattoint8() -> None:
    rng = np.random.default_rng(0)
    cases = [rng.normal(size=(7, 9)) * 10.0**k for k in (-6, -2, 0, 3)]
    cases += [np.array([-4.0, 1.0, 2.0]), np.array([3.0, -0.25]), np.array([0.5 + 2**-20, -0.1])]
    for case in cases:
        x = case.astype(np.float32)
        m, e = float_to_int(torch.from_numpy(x))
        expected_m, expected_e = ref_float_to_int8(x)
        assert e == expected_e and np.array_equal(m.numpy(), expected_m)
    m, e = float_to_int(torch.tensor([-4.0, 1.0]))  # max|x| a power of two: -128 is kept, as in the reference
    assert m.tolist() == [-128, 32] and e == -5
    m, e = float_to_int(torch.zeros(3))
    assert m.tolist() == [0, 0, 0] and e == 0


def test_weight_quant_follows_niti_init() -> None:
    w = torch.tensor([[0.3, -0.7], [0.05, 0.2]])
    m, e = weight_quant(w)
    assert e == math.ceil(math.log2(0.7)) - 7
    assert m.tolist() == [[round(0.3 / 0.7 * 127), -127], [round(0.05 / 0.7 * 127), round(0.2 / 0.7 * 127)]]


def test_grad_calc_branches() -> None:
    assert torch.equal(grad_calc(torch.zeros(4, dtype=torch.int64), 5), torch.zeros(4, dtype=torch.int64))
    small = torch.tensor([-17, 3, 32])  # b = 5 <= mu: used as it is
    assert torch.equal(grad_calc(small, 5), small)
    big = torch.from_numpy(INT16[::97].copy())  # b = 15: PstoShift by 10, result within 2^5
    got = grad_calc(big, 5)
    assert np.array_equal(got.numpy(), ref_psto_shift(big.numpy(), 10))
    assert int(got.abs().max()) == 2**5


def test_act_calc_shifts_to_seven_bits_or_keeps_small_accumulators() -> None:
    acc = torch.tensor([1000, -3, 250, -517])
    m, shift = act_calc(acc)
    expected, expected_shift = ref_act_calc(acc.numpy())
    assert shift == expected_shift == 3 and np.array_equal(m.numpy(), expected)
    m, shift = act_calc(torch.tensor([100, -128, 5]))  # b = 7: no shift; +-128 clipped, not wrapped
    assert shift == 0 and m.tolist() == [100, -127, 5]


# --- integer cross-entropy ----------------------------------------------------------------------

@pytest.mark.parametrize("division", ["reference", "integer"])
@pytest.mark.parametrize("exp", [9, 2, 0, -3, -6, -7, -8, -12, -20])
def test_integer_ce_matches_reference(exp: int, division: str) -> None:
    """"reference": ti_loss.py's own expressions as its PyTorch runs them; "integer": every division
    truncating, on Python ints."""
    gen = torch.Generator().manual_seed(exp + 100)
    z = torch.randint(-127, 128, (12, 10), generator=gen)
    z[3] = 37  # all-equal logits
    z[4] = -127
    targets = torch.randint(0, 10, (12,), generator=gen)
    got = integer_ce_error(z, exp, targets, torch.Generator().manual_seed(5), division=division)
    draws = torch.randint(0, 16, (12, 10), dtype=torch.int64, generator=torch.Generator().manual_seed(5))
    if division == "reference":
        expected = ref_integer_ce_as_run(z, exp, targets, draws)
    else:
        expected = ref_integer_ce(z.tolist(), exp, targets.tolist(), draws.tolist())
    assert got.tolist() == expected
    assert int(got.abs().max()) <= 127


def test_the_two_divisions_differ() -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randint(-127, 128, (64, 10), generator=gen)
    targets = torch.randint(0, 10, (64,), generator=gen)
    as_run = integer_ce_error(z, -3, targets, torch.Generator().manual_seed(1))
    truncating = integer_ce_error(z, -3, targets, torch.Generator().manual_seed(1), division="integer")
    assert not torch.equal(as_run, truncating)


def test_integer_ce_points_from_the_prediction_to_the_target() -> None:
    z = torch.tensor([[100, -50, 0, 20], [5, 5, 5, 5]])
    targets = torch.tensor([1, 2])
    error = integer_ce_error(z, -4, targets, torch.Generator().manual_seed(0), division="integer").double()
    assert error[0, 1] < -100 and error[0, 0] > 100  # wrong and confident: nearly -128 and +128
    # All-equal logits: p = floor(2048/4) = 512 everywhere, so 32 - 128 = -96 at the target.
    assert error[1].tolist() == [32, 32, -96, 32]
    ignored = integer_ce_error(z, -4, torch.tensor([-100, 2]), torch.Generator().manual_seed(0),
                               division="integer")
    assert ignored[0].tolist() == [0, 0, 0, 0] and ignored[1].tolist() == [32, 32, -96, 32]


# --- layers against hand computations -----------------------------------------------------------

def test_linear_forward_and_backward_by_hand() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4, bias=False))
    convert_model(model, 7, torch.Generator().manual_seed(0))
    layer = model[0]
    assert isinstance(layer, NitiLinear)
    m_w = mantissa(layer.weight, layer.weight_exp)
    assert int(m_w.abs().max()) == 127

    x = torch.randn(3, 6, requires_grad=True)
    m_x, e_x = ref_float_to_int8(x.detach().numpy())
    a32 = torch.from_numpy(m_x) @ m_w.t()
    m_out, shift = ref_act_calc(a32.numpy())
    out = model(x)
    assert isinstance(out, NitiTensor) and out.niti_exp == e_x + layer.weight_exp + shift
    assert np.array_equal(mantissa(out, out.niti_exp).numpy(), m_out)

    m_err = torch.tensor([[100, -7, 3, 0], [-2, 50, 1, 9], [0, 0, -88, 1]])
    e_err = -3
    out.backward(m_err.double().float() * 2.0**e_err)  # max 100: TiFloatToInt8 keeps (m_err, -3)
    e32 = (m_err @ m_w).numpy()
    err_out, err_shift = ref_act_calc(e32)
    assert x.grad is not None
    assert np.array_equal(mantissa(x.grad, e_err + layer.weight_exp + err_shift).numpy(), err_out)
    g32, g_exp = layer.niti_weight.grad
    assert g_exp == e_err + e_x and torch.equal(g32, m_err.t() @ torch.from_numpy(m_x))


def test_error_exponent_travels_from_consumer_to_producer() -> None:
    """layer1 -> ReLU -> layer2: layer2 leaves its error exponent for layer1, even for a small error."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False))
    convert_model(model, 7, torch.Generator().manual_seed(0))
    first, last = model[0], model[2]
    x = torch.randn(4, 5)
    hidden = model[1](first(x))
    out = last(hidden)
    m_h = mantissa(hidden, hidden.niti_exp)
    # Tiny errors: a fresh exponent (TiFloatToInt8) would rescale them to 64..127.
    m_err = torch.tensor([[1, 0, -2], [0, 3, 0], [0, 0, 0], [-1, 1, 0]])
    out.niti_slot.write(-2)  # as the loss does
    out.backward(m_err.float() * 2.0**-2)
    g32, g_exp = last.niti_weight.grad
    assert g_exp == -2 + hidden.niti_exp and torch.equal(g32, m_err.t() @ m_h)
    e32 = (m_err @ mantissa(last.weight, last.weight_exp)).numpy()
    err_h, shift = ref_act_calc(e32)
    err_exp = -2 + last.weight_exp + shift
    assert hidden.niti_slot.read() == err_exp
    masked = torch.from_numpy(err_h) * (m_h > 0)
    m_x, e_x = ref_float_to_int8(x.numpy())
    g32, g_exp = first.niti_weight.grad
    assert g_exp == err_exp + e_x and torch.equal(g32, masked.t() @ torch.from_numpy(m_x))


@pytest.mark.parametrize("dims", [1, 2])
def test_convolution_forward_and_backward_by_hand(dims: int) -> None:
    torch.manual_seed(2)
    conv = nn.Conv1d(2, 3, 3, stride=2, padding=1) if dims == 1 else nn.Conv2d(2, 3, 3, padding=1)
    model = nn.Sequential(conv)
    convert_model(model, 7, torch.Generator().manual_seed(0))
    layer = model[0]
    assert isinstance(layer, NitiConv) and float(layer.bias.abs().max()) == 0.0
    shape = (2, 2, 9) if dims == 1 else (2, 2, 5, 5)
    x = torch.randn(shape, requires_grad=True)
    m_x, e_x = ref_float_to_int8(x.detach().numpy())
    m_w = mantissa(layer.weight, layer.weight_exp)
    # Hand convolution: gather the windows, multiply in int64.
    padded = F.pad(torch.from_numpy(m_x).double(), (1, 1) * dims)
    if dims == 1:
        windows = padded.unfold(2, 3, 2).to(torch.int64)  # (B, C, L, k)
        a32 = torch.einsum("bclk,ock->bol", windows, m_w)
    else:
        columns = F.unfold(padded, 3).to(torch.int64)  # (B, C*9, positions)
        a32 = (m_w.reshape(3, -1) @ columns).reshape(2, 3, 5, 5)
    m_out, shift = ref_act_calc(a32.numpy())
    out = model(x)
    assert out.niti_exp == e_x + layer.weight_exp + shift
    assert np.array_equal(mantissa(out, out.niti_exp).numpy(), m_out)

    m_err = torch.randint(-127, 128, out.shape, generator=torch.Generator().manual_seed(3))
    m_err.view(-1)[0] = 127
    out.backward(m_err.float() * 2.0**-5)
    # Exact float64 reference gradients of the integer convolution (torch's own autograd).
    xd = torch.from_numpy(m_x).double().requires_grad_()
    wd = m_w.double().requires_grad_()
    conv_fn = F.conv1d if dims == 1 else F.conv2d
    conv_fn(xd, wd, None, conv.stride, 1).backward(m_err.double())
    err_out, err_shift = ref_act_calc(xd.grad.to(torch.int64).numpy())
    assert np.array_equal(mantissa(x.grad, -5 + layer.weight_exp + err_shift).numpy(), err_out)
    g32, g_exp = layer.niti_weight.grad
    assert g_exp == -5 + e_x and torch.equal(g32, wd.grad.to(torch.int64))


def test_attention_matmul_and_embedding_by_hand() -> None:
    torch.manual_seed(5)
    a = torch.randn(2, 3, 4, requires_grad=True)
    b = torch.randn(2, 4, 5, requires_grad=True)
    out = NitiMatmul(7)(a, b)
    m_a, e_a = ref_float_to_int8(a.detach().numpy())
    m_b, e_b = ref_float_to_int8(b.detach().numpy())
    m_out, shift = ref_act_calc((torch.from_numpy(m_a) @ torch.from_numpy(m_b)).numpy())
    assert out.niti_exp == e_a + e_b + shift
    assert np.array_equal(mantissa(out, out.niti_exp).numpy(), m_out)
    m_err = torch.randint(-127, 128, (2, 3, 5), generator=torch.Generator().manual_seed(0))
    m_err.view(-1)[0] = -120
    out.backward(m_err.float() * 2.0**3)
    err_a, shift_a = ref_act_calc((m_err @ torch.from_numpy(m_b).transpose(1, 2)).numpy())
    err_b, shift_b = ref_act_calc((torch.from_numpy(m_a).transpose(1, 2) @ m_err).numpy())
    assert np.array_equal(mantissa(a.grad, 3 + e_b + shift_a).numpy(), err_a)
    assert np.array_equal(mantissa(b.grad, 3 + e_a + shift_b).numpy(), err_b)

    torch.manual_seed(6)
    model = nn.Sequential(nn.Embedding(7, 3))
    convert_model(model, 7, torch.Generator().manual_seed(0))
    table = model[0]
    tokens = torch.tensor([[1, 4, 1], [6, 1, 0]])
    rows = model(tokens)
    assert rows.niti_exp == table.weight_exp
    m_err = torch.randint(-127, 128, (2, 3, 3), generator=torch.Generator().manual_seed(1))
    m_err.view(-1)[0] = 127
    rows.backward(m_err.float())
    expected = torch.zeros(7, 3, dtype=torch.int64)
    for token, error in zip(tokens.flatten().tolist(), m_err.reshape(-1, 3), strict=True):
        expected[token] += error
    g32, g_exp = table.niti_weight.grad
    assert g_exp == 0 and torch.equal(g32, expected)


def test_bias_is_zeroed_frozen_and_stays_zero() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    setup = niti_setup(model, TrainConfig(format="int8"), torch.Generator().manual_seed(0))
    biases = [model[0].bias, model[2].bias]
    assert all(not b.requires_grad and float(b.abs().max()) == 0.0 for b in biases)
    trained = {id(p) for group in setup.optimizer.param_groups for p in group["params"]}
    assert all(id(b) not in trained for b in biases)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for _ in range(3):
        setup.loss_fn(setup.model(x), y).backward()
        setup.optimizer.step()
        setup.optimizer.zero_grad()
    assert all(float(b.abs().max()) == 0.0 for b in biases)


def test_a_layer_applied_at_two_places_is_a_niti_layer_at_both_with_one_weight() -> None:
    """Both places run the integer GEMM (not the second in float), and the weight's one update sees
    the sum of both places' integer gradients, aligned to the lower exponent."""
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), shared, nn.ReLU(), shared, nn.Linear(6, 3))
    setup = niti_setup(model, TrainConfig(format="int8"), torch.Generator().manual_seed(0))
    first, second = model[2], model[4]
    assert isinstance(first, NitiLinear) and isinstance(second, NitiLinear)
    assert first.niti_weight is second.niti_weight and first.weight is shared.weight
    grads: list[tuple[torch.Tensor, int]] = []
    first.niti_weight.accumulate = lambda g32, exp: grads.append((g32, exp))  # type: ignore[method-assign]
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    def backward() -> None:  # the same StoShift draws each time
        NitiCrossEntropy(generator=torch.Generator().manual_seed(5))(setup.model(x), y).backward()

    backward()
    assert len(grads) == 2  # one integer weight gradient from each place
    del first.niti_weight.accumulate
    setup.optimizer.zero_grad()
    backward()
    low = min(exp for _, exp in grads)
    g32, exp = first.niti_weight.grad or (torch.empty(0), 0)
    assert exp == low and torch.equal(g32, sum(g << (e - low) for g, e in grads))


# --- training -----------------------------------------------------------------------------------

def _small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv1d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8, 5))


def _train_steps(seed: int, steps: int = 6) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, int]]:
    torch.manual_seed(seed)
    model = _small_cnn()
    setup = niti_setup(model, TrainConfig(format="int8"), torch.Generator().manual_seed(seed))
    exps = {name: m.weight_exp for name, m in model.named_modules() if hasattr(m, "weight_exp")}
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = torch.Generator().manual_seed(99)
    for _ in range(steps):
        x, y = torch.randn(16, 1, 16, generator=data), torch.randint(0, 5, (16,), generator=data)
        setup.loss_fn(setup.model(x), y).backward()
        setup.optimizer.step()
        setup.optimizer.zero_grad()
    return model, initial, exps


def test_initial_weights_are_xavier_uniform_then_weight_quant_whatever_the_model_drew() -> None:
    """ti_torch.py UniformWeights (Nov 2021): xavier_uniform_ on each weight in layer order, drawn here
    from the run's generator, then weight_quant; the model's own initialisation plays no part."""
    expected = {}
    draws = torch.Generator().manual_seed(3)
    for name, shape in (("0", (4, 1, 3)), ("3", (5, 32))):
        w = torch.empty(shape)
        nn.init.xavier_uniform_(w, generator=draws)
        m, e = weight_quant(w)
        expected[name] = (m.double() * 2.0**e, e)
    for model_seed in (0, 1):
        torch.manual_seed(model_seed)
        model = _small_cnn()
        niti_setup(model, TrainConfig(format="int8"), torch.Generator().manual_seed(3))
        layers = dict(model.named_modules())
        for name, (value, exp) in expected.items():
            assert layers[name].weight_exp == exp
            assert torch.equal(layers[name].weight.detach().double(), value)
            assert int(layers[name].niti_weight.mantissa().abs().max()) == 127
    # Xavier's scale sqrt(6 / (32 + 5)) = 0.40, not PyTorch's U(+-1/sqrt(32)) = 0.18: weight_quant then
    # puts the peak at 127 * 2^(ceil(log2 peak) - 7), 0.50 here where PyTorch's init would give 0.25
    assert float(layers["3"].weight.detach().abs().max()) == 127 * 2.0**-8


def test_a_wider_integer_accumulator_keeps_fraction_bits_of_the_weights() -> None:
    """master_weights 'int16' (the 2020 code's --weight-frac): acc = clip(acc - g8, +-(2^15 - 1)), starting
    at m << 8; the int8 weight is PstoShift(acc, 8)."""
    torch.manual_seed(0)
    model = _small_cnn()
    setup = niti_setup(model, TrainConfig(format="int8", master_weights="int16", niti_mu=6),
                       torch.Generator().manual_seed(0))
    layer = model[3]
    start = layer.niti_weight.mantissa().clone()
    state = setup.optimizer.state[layer.weight]
    assert torch.equal(state["accumulator"], start << 8)
    data = torch.Generator().manual_seed(99)
    for _ in range(3):
        before = state["accumulator"].clone()
        x, y = torch.randn(16, 1, 16, generator=data), torch.randint(0, 5, (16,), generator=data)
        setup.loss_fn(setup.model(x), y).backward()
        update = grad_calc(layer.niti_weight.grad[0], 6)
        setup.optimizer.step()
        setup.optimizer.zero_grad()
        assert torch.equal(state["accumulator"], (before - update).clamp(-(2**15 - 1), 2**15 - 1))
        expected = torch.from_numpy(ref_psto_shift(state["accumulator"].numpy(), 8))
        assert torch.equal(layer.niti_weight.mantissa(), expected)
    moved = (state["accumulator"] - (start << 8)).abs()
    assert int(moved.max()) > 0 and int(moved.max()) < 3 * 2**6 + 1  # steps of at most 2^mu on the fine grid
    with pytest.raises(InputError, match="wider integer"):
        niti_setup(_small_cnn(), TrainConfig(format="int8", master_weights="bf16"), torch.Generator())
    with pytest.raises(InputError, match="wider integer"):
        niti_setup(_small_cnn(), TrainConfig(format="int8", master_weights="int8"), torch.Generator())


def test_weights_stay_integers_with_fixed_exponents_and_runs_repeat() -> None:
    model, initial, exps = _train_steps(seed=4)
    changed = 0
    for name, module in model.named_modules():
        if name in exps:
            assert module.weight_exp == exps[name]
            m = weight_mantissa(module.weight, module.weight_exp)
            assert torch.equal(m.double(), module.weight.detach().double() * 2.0**-module.weight_exp)
            assert int(m.abs().max()) <= 127
            changed += int((module.weight.detach() != initial[f"{name}.weight"]).sum())
    assert changed > 0
    again, _, _ = _train_steps(seed=4)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))
    other, _, _ = _train_steps(seed=5)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters(), strict=True))


def test_mu_schedule_follows_the_paper_regime() -> None:
    assert [niti_mu_for_epoch(5, e, 200) for e in (0, 99, 100, 149, 150, 199)] == [5, 5, 4, 4, 3, 3]
    assert [niti_mu_for_epoch(5, e, 4) for e in range(4)] == [5, 5, 4, 3]
    torch.manual_seed(0)
    setup = niti_setup(_small_cnn(), TrainConfig(format="int8", epochs=8, niti_mu=4),
                       torch.Generator().manual_seed(0))
    seen = []
    for epoch in range(8):
        setup.on_epoch_start(epoch)
        seen.append(setup.optimizer.param_groups[0]["mu"])
    assert seen == [4, 4, 4, 4, 3, 3, 2, 2]


def test_digits_mlp_learns() -> None:
    from dse.data import load_dataset
    from dse.models.proxies import build_model

    data = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("mlp", data)
    config = TrainConfig(model="mlp", dataset="digits", format="int8", optimizer="niti", epochs=3)
    setup = niti_setup(model, config, torch.Generator().manual_seed(0))
    order = torch.Generator().manual_seed(1)
    for epoch in range(3):
        setup.on_epoch_start(epoch)
        for index in torch.randperm(len(data.x_train), generator=order).split(64):
            setup.loss_fn(setup.model(data.x_train[index]), data.y_train[index]).backward()
            setup.optimizer.step()
            setup.optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        logits = model(data.x_test)
        accuracy = float((logits.argmax(-1) == data.y_test).double().mean())
        assert torch.equal(model(data.x_test), logits)  # the integer forward is deterministic
    assert accuracy > 0.7, accuracy  # chance is 0.1


def test_transformer_runs_with_integer_layers() -> None:
    from dse.models.proxies import Transformer

    torch.manual_seed(0)
    model = Transformer(vocab=12, seq=6, d_model=16, heads=2, d_ff=32, n_layers=1)
    config = TrainConfig(model="transformer", format="int8")
    setup = niti_setup(model, config, torch.Generator().manual_seed(0))
    assert isinstance(model.embedding, NitiEmbedding) and isinstance(model.head, NitiLinear)
    assert sum(isinstance(m, NitiMatmul) for m in model.modules()) == 2
    assert not model.ln_f.weight.requires_grad and not model.position.weight.requires_grad
    before = model.embedding.weight.detach().clone()
    tokens = torch.randint(0, 12, (8, 6), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        logits = setup.model(tokens)
        loss = setup.loss_fn(logits, tokens.sort(dim=1).values)
        assert logits.shape == (8, 6, 12) and math.isfinite(float(loss.detach()))
        loss.backward()
        setup.optimizer.step()
        setup.optimizer.zero_grad()
    for module in (model.embedding, model.head):
        m = weight_mantissa(module.weight, module.weight_exp)
        assert torch.equal(m.float() * 2.0**module.weight_exp, module.weight.detach())
    assert not torch.equal(before, model.embedding.weight.detach())


def test_loss_flattens_sequences() -> None:
    logits = torch.randn(2, 3, 5, requires_grad=True)
    targets = torch.randint(0, 5, (2, 3))
    loss = NitiCrossEntropy(generator=torch.Generator().manual_seed(0))(logits, targets)
    assert math.isclose(float(loss.detach()), float(F.cross_entropy(
        _quantized(logits.detach().reshape(-1, 5)), targets.reshape(-1))), rel_tol=1e-6)
    loss.backward()
    assert logits.grad is not None and logits.grad.shape == (2, 3, 5)
    assert torch.equal(logits.grad, logits.grad.round()) and float(logits.grad.abs().max()) <= 127


def _quantized(x: torch.Tensor) -> torch.Tensor:
    m, e = ref_float_to_int8(x.numpy())
    return torch.from_numpy(m).double() * 2.0**e


# --- input errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, words", [
    ({}, "none"),
    ({"format": "fp8_e4m3"}, "fp8_e4m3"),
    ({"format": "posit8"}, "posit8"),
    ({"weights": "int8", "activations": "lns8"}, "lns8"),
    ({"format": "int8", "gradients": "int4"}, "one integer width"),
    ({"format": "int8", "niti_mu": 0}, "niti_mu"),
])
def test_setup_rejects_what_niti_cannot_run(changes: dict, words: str) -> None:
    with pytest.raises(InputError) as raised:
        niti_setup(_small_cnn(), TrainConfig(**changes), torch.Generator())
    message = str(raised.value)
    assert words in message and "\n" not in message


def test_other_integer_widths_generalise_bitwidth() -> None:
    torch.manual_seed(0)
    model = _small_cnn()
    setup = niti_setup(model, TrainConfig(format="int(6)", niti_mu=3), torch.Generator().manual_seed(0))
    x, y = torch.randn(16, 1, 16), torch.randint(0, 5, (16,))
    out = setup.model(x)
    assert int(mantissa(out, out.niti_exp).abs().max()) <= 31
    setup.loss_fn(out, y).backward()
    setup.optimizer.step()
    linear = model[3]
    assert int(weight_mantissa(linear.weight, linear.weight_exp).abs().max()) <= 31


def test_string_padding_becomes_numbers_and_asymmetric_same_is_refused() -> None:
    generator = torch.Generator().manual_seed(0)
    assert NitiConv(nn.Conv2d(3, 4, 5, padding="same", dilation=2), 7, generator).padding == (4, 4)
    assert NitiConv(nn.Conv1d(3, 4, 3, padding="valid"), 7, generator).padding == (0,)
    with pytest.raises(InputError, match="NITI needs symmetric padding"):
        NitiConv(nn.Conv1d(3, 4, 4, padding="same"), 7, generator)
