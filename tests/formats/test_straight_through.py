"""The gradient of every quantize-style entry point on an input autograd records: straight-through.

Rounding is a step function, whose derivative is zero almost everywhere (torch.autograd.gradcheck's
numerical Jacobian of it is zero, or a spike at a step), so quantization-aware training takes the
straight-through estimator instead: d quantize(x) / dx = identity, as dse's own quantized GEMMs do
(dse/train/layers.py). These tests check that gradient exactly (x.grad equals the incoming gradient
bit for bit, NaN and saturated elements included) over the whole zoo, every rounding and every float
dtype, and that recording leaves the forward values bit for bit as they are.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dse.formats import ROUNDINGS, ZOO, get, round_to_integer
from dse.formats.base import MemberGenerators
from dse.formats.fixed import FixedPoint

ALL_ROUNDINGS = (*ROUNDINGS, "stochastic(5)")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's bit patterns: equal bits means equal values, signs of zero and NaNs alike."""
    return t.detach().contiguous().view(_BITS[t.dtype])


def inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Values over many binades, with zeros of both signs, a huge value (past every grid's max, so
    saturating or overflowing), a tiny one, +-inf and a NaN in the first row."""
    source = torch.Generator().manual_seed(seed)
    magnitude = torch.exp2(torch.randint(-20, 20, shape, generator=source).double())
    values = torch.randn(shape, generator=source, dtype=torch.float64) * magnitude
    specials = torch.tensor([0.0, -0.0, 1e300, -1e-300, math.inf, -math.inf, math.nan], dtype=torch.float64)
    values.view(-1)[: specials.numel()] = specials
    return values.to(dtype)


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(11)


def members_seeded(count: int) -> MemberGenerators:
    return MemberGenerators([torch.Generator().manual_seed(seed) for seed in range(count)])


def same_draws_left(first: torch.Generator | MemberGenerators,
                    second: torch.Generator | MemberGenerators) -> bool:
    """Whether two generators (or each member's pair) are in the same state: the recorded call took
    as many draws as the unrecorded one, so the draws after it are the same too."""
    firsts = first.generators if isinstance(first, MemberGenerators) else [first]
    seconds = second.generators if isinstance(second, MemberGenerators) else [second]
    return all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(firsts, seconds, strict=True))


def recorded(values: torch.Tensor) -> torch.Tensor:
    """A tensor autograd records: computed from a leaf, not a leaf itself (the usual case in a model)."""
    leaf = values.clone().requires_grad_()
    return leaf * 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rounding", ALL_ROUNDINGS)
@pytest.mark.parametrize("spec", ZOO)
def test_quantize_passes_the_gradient_straight_through(spec: str, rounding: str, dtype: torch.dtype) -> None:
    fmt = get(spec)
    values = inputs((4, 64), dtype)
    x = values.clone().requires_grad_()
    recorded_draws, plain_draws = seeded(), seeded()
    out = fmt.quantize(x, rounding, recorded_draws)
    assert out.requires_grad
    assert torch.equal(bits(out), bits(fmt.quantize(values, rounding, plain_draws)))
    assert same_draws_left(recorded_draws, plain_draws)
    grad = torch.randn(values.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grad.view(-1)[:4] = torch.tensor([math.nan, math.inf, -math.inf, -0.0])  # passed on as they are too
    out.backward(grad)
    assert x.grad is not None and torch.equal(bits(x.grad), bits(grad))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rounding", ALL_ROUNDINGS)
@pytest.mark.parametrize("spec", ZOO)
def test_group_entry_points_pass_the_gradient_straight_through(spec: str, rounding: str,
                                                               dtype: torch.dtype) -> None:
    """quantize_along, quantize_members and quantize_members_along: each output's gradient goes to x
    unchanged, so x's gradient is their sum; the values are the unrecorded calls' bit for bit."""
    fmt = get(spec)
    values = inputs((4, 64), dtype, seed=2)
    x = values.clone().requires_grad_()
    recorded_draws, plain_draws = seeded(), seeded()
    along = fmt.quantize_along(x, [0, 1], rounding, recorded_draws)
    for got, expected in zip(along, fmt.quantize_along(values, [0, 1], rounding, plain_draws), strict=True):
        assert torch.equal(bits(got), bits(expected))
    assert same_draws_left(recorded_draws, plain_draws)
    first, second = torch.ones_like(values), torch.full_like(values, 2.0)
    torch.autograd.backward(along, [first, second])
    assert x.grad is not None and torch.equal(x.grad, first + second)

    stacked = inputs((3, 4, 64), dtype, seed=3)
    x = stacked.clone().requires_grad_()
    recorded_members, plain_members = members_seeded(3), members_seeded(3)
    out = fmt.quantize_members(x, rounding, recorded_members)
    assert torch.equal(bits(out), bits(fmt.quantize_members(stacked, rounding, plain_members)))
    assert same_draws_left(recorded_members, plain_members)
    grad = torch.randn(stacked.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    out.backward(grad)
    assert x.grad is not None and torch.equal(bits(x.grad), bits(grad))

    x = stacked.clone().requires_grad_()
    recorded_members, plain_members = members_seeded(3), members_seeded(3)
    outs = fmt.quantize_members_along(x, [0, 1], rounding, recorded_members)
    plain = fmt.quantize_members_along(stacked, [0, 1], rounding, plain_members)
    for got, expected in zip(outs, plain, strict=True):
        assert torch.equal(bits(got), bits(expected))
    assert same_draws_left(recorded_members, plain_members)
    torch.autograd.backward(outs, [grad, grad])
    assert x.grad is not None and torch.equal(x.grad, grad + grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rounding", ALL_ROUNDINGS)
@pytest.mark.parametrize("spec", ZOO)
def test_round_unscaled_passes_the_gradient_straight_through(spec: str, rounding: str,
                                                             dtype: torch.dtype) -> None:
    """round_unscaled, and round_unscaled_ (which may round in place): on a recorded x the latter
    rounds a copy, leaving x as it was."""
    fmt = get(spec)
    values = inputs((4, 64), dtype, seed=5)
    grad = torch.randn(values.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    for method in (fmt.round_unscaled, fmt.round_unscaled_):
        x = values.clone().requires_grad_()
        recorded_draws, plain_draws = seeded(), seeded()
        out = method(x, rounding, recorded_draws)
        assert torch.equal(bits(out), bits(fmt.round_unscaled(values, rounding, plain_draws)))
        assert same_draws_left(recorded_draws, plain_draws)
        out.backward(grad)
        assert torch.equal(bits(x.detach()), bits(values))
        assert x.grad is not None and torch.equal(bits(x.grad), bits(grad))


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("rounding", ALL_ROUNDINGS)
def test_round_to_integer_passes_the_gradient_straight_through(rounding: str, dtype: torch.dtype,
                                                               in_place: bool) -> None:
    """The rounding primitive dse.formats exports keeps the same contract: the unrecorded values and
    draws, the incoming gradient, and a recorded t is not rounded in place. (Before, its gradient
    was round's zero, or for float64 stochastic rounding the identity through the fraction it
    overwrote, and in-place rounding of a leaf raised.)"""
    values = inputs((4, 64), dtype, seed=9)
    x = values.clone().requires_grad_()
    recorded_draws, plain_draws = seeded(), seeded()
    out = round_to_integer(x, rounding, recorded_draws, in_place=in_place)
    plain = round_to_integer(values.clone(), rounding, plain_draws, in_place=in_place)
    assert torch.equal(bits(out), bits(plain))
    assert same_draws_left(recorded_draws, plain_draws)
    assert torch.equal(bits(x.detach()), bits(values))
    grad = torch.randn(values.shape, generator=torch.Generator().manual_seed(10), dtype=dtype)
    out.backward(grad)
    assert x.grad is not None and torch.equal(bits(x.grad), bits(grad))


@pytest.mark.parametrize("spec", ["int8", "fp8_e4m3", "posit8", "lns8", "mxfp4", "nvfp4", "fixed(16,8)"])
def test_the_jacobian_through_quantize_is_the_identity(spec: str) -> None:
    """The whole Jacobian, through a computation before and after quantize: d(2 q(3w)) / dw = 6 I."""
    fmt = get(spec)
    w = torch.randn(2, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(
        lambda t: 2 * fmt.quantize(3 * t, "stochastic", seeded()), w)
    assert torch.equal(jacobian.reshape(w.numel(), w.numel()), 6 * torch.eye(w.numel(), dtype=torch.float64))


@pytest.mark.parametrize("spec", ["int8", "mxfp4", "nvfp4", "lns8", "posit8"])
def test_torch_func_grad_differentiates_through_quantize(spec: str) -> None:
    fmt = get(spec)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(8))
    grad = torch.func.grad(lambda t: (fmt.quantize(t, "stochastic", seeded()) * 3).sum())(x)
    assert torch.equal(grad, torch.full_like(x, 3.0))


@pytest.mark.parametrize("spec", ["int8", "fp8_e4m3", "posit8", "lns8", "mxfp4", "nvfp4", "fixed(16,8)"])
def test_forward_mode_passes_the_tangent_straight_through(spec: str) -> None:
    """torch.func.jvp, jacfwd and torch.autograd.forward_ad: the tangent of each output is x's, as
    reverse mode's gradient (before, forward mode saw rounding's zero derivative for some formats
    and an out= error for others); the values are the unrecorded call's."""
    fmt = get(spec)
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(12))
    tangent = torch.randn(2, 32, generator=torch.Generator().manual_seed(13))
    value, out_tangent = torch.func.jvp(lambda t: fmt.quantize(t, "stochastic", seeded()), (x,), (tangent,))
    assert torch.equal(value, fmt.quantize(x, "stochastic", seeded())) and torch.equal(out_tangent, tangent)
    jacobian = torch.func.jacfwd(lambda t: fmt.quantize(t))(x[0])
    assert torch.equal(jacobian, torch.eye(32))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, tangent)
        outputs = [fmt.round_unscaled(dual, "pseudo_stochastic", None), round_to_integer(dual * 8, "nearest"),
                   *fmt.quantize_along(dual, [0, 1], "nearest")]
        tangents = [torch.autograd.forward_ad.unpack_dual(out).tangent for out in outputs]
    assert all(torch.equal(got, expected) for got, expected in zip(
        tangents, [tangent, tangent * 8, tangent, tangent], strict=True))


@pytest.mark.parametrize("spec", ["fixed(16,8)", "int8(scale=none)", "bf16", "fp16"])
def test_vmap_gives_each_sample_the_straight_through_gradient(spec: str) -> None:
    """torch.func.vmap, where the format's forward batches (formats without a scale whose rounding is
    elementwise arithmetic or a cast; others read a scale back to the host or round with out=
    passes, which vmap refuses): per-sample gradients, vmap(grad) and grad(vmap), are the identity
    (before, grad(vmap) was rounding's zero for fixed point and vmap(grad) raised)."""
    fmt = get(spec)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(14))
    assert torch.equal(torch.func.vmap(lambda t: fmt.quantize(t))(x), fmt.quantize(x))
    per_sample = torch.func.vmap(torch.func.grad(lambda t: (fmt.quantize(t) * 3).sum()))(x)
    whole = torch.func.grad(lambda t: (torch.func.vmap(lambda u: fmt.quantize(u))(t) * 3).sum())(x)
    assert torch.equal(per_sample, torch.full_like(x, 3.0)) and torch.equal(whole, torch.full_like(x, 3.0))


@pytest.mark.parametrize("spec", ["int8", "mxfp8_e4m3", "nvfp4", "posit16"])
def test_the_straight_through_gradient_is_differentiable_again(spec: str) -> None:
    """create_graph=True: the gradient is the incoming gradient itself, so a second derivative through
    it is exact (here d/dg of sum(g * x.grad) with x.grad = g)."""
    fmt = get(spec)
    x = torch.randn(32, requires_grad=True)
    g = torch.randn(32, requires_grad=True)
    (grad_x,) = torch.autograd.grad(fmt.quantize(x, "nearest"), x, g, create_graph=True)
    (second,) = torch.autograd.grad((grad_x * grad_x).sum(), g)
    assert torch.equal(second, 2 * g.detach())


@pytest.mark.parametrize("spec", ["int8", "mxfp4", "nvfp4", "lns8"])
def test_nothing_is_recorded_where_no_gradient_is(spec: str) -> None:
    """Training's path: input that does not require grad, no_grad mode, and inside an autograd
    function's forward (where QuantGemm quantizes) give plain tensors with no autograd node."""
    fmt = get(spec)
    x = torch.randn(4, 64)
    assert fmt.quantize(x).grad_fn is None
    with torch.no_grad():
        assert fmt.quantize(x.clone().requires_grad_()).grad_fn is None
        assert all(t.grad_fn is None for t in fmt.quantize_along(x.clone().requires_grad_(), [0, 1]))

    class Inside(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
            out = fmt.quantize(t)
            assert out.grad_fn is None and not out.requires_grad
            return out

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            return grad

    Inside.apply(x.clone().requires_grad_()).sum().backward()


def test_a_new_family_gets_the_straight_through_gradient_by_subclassing() -> None:
    """A family that overrides an entry point (here round_unscaled) keeps the contract: the base
    class wraps whatever each subclass defines."""

    @dataclasses.dataclass(frozen=True)
    class Offset(FixedPoint):
        def round_unscaled(self, x: torch.Tensor, rounding: str, generator: torch.Generator | None
                           ) -> torch.Tensor:
            return super().round_unscaled(x + 0.25, rounding, generator)

    int8 = get("int8")
    fmt = Offset(**{field.name: getattr(int8, field.name) for field in dataclasses.fields(int8)})
    x = torch.randn(16, requires_grad=True)
    fmt.quantize(x).backward(torch.full((16,), 3.0))
    assert x.grad is not None and torch.equal(x.grad, torch.full((16,), 3.0))


@pytest.mark.parametrize("spec", [spec for spec in ZOO if get(spec).scaling.kind == "none"])
def test_a_clipped_gradient_is_a_clamp_before_quantize(spec: str) -> None:
    """The gradient is not masked where a value saturates (see docs/formats.md); torch.ao's clipped
    gradient is one clamp to the format's range away: zero beyond +-max, the identity within."""
    fmt = get(spec)
    values = torch.tensor([-2 * fmt.max, -fmt.max, -1.0, 0.0, 0.5, fmt.max, 3 * fmt.max], dtype=torch.float64)
    x = values.clone().requires_grad_()
    fmt.quantize(x.clamp(-fmt.max, fmt.max)).sum().backward()
    assert x.grad is not None
    assert torch.equal(x.grad, (values.abs() <= fmt.max).double())


def _floats_with_specials() -> st.SearchStrategy[float]:
    return st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                     st.floats(min_value=-1e4, max_value=1e4, width=32))


@settings(max_examples=60, deadline=None)
@given(spec=st.sampled_from(ZOO), rounding=st.sampled_from(ALL_ROUNDINGS),
       dtype=st.sampled_from(DTYPES), data=st.lists(_floats_with_specials(), min_size=1, max_size=48),
       grad_seed=st.integers(0, 2**31 - 1))
def test_any_input_gets_the_incoming_gradient_and_its_unrecorded_values(
        spec: str, rounding: str, dtype: torch.dtype, data: list[float], grad_seed: int) -> None:
    fmt = get(spec)
    values = torch.tensor(data, dtype=torch.float32).to(dtype)
    x = values.clone().requires_grad_()
    out = fmt.quantize(x, rounding, seeded())
    assert torch.equal(bits(out), bits(fmt.quantize(values, rounding, seeded())))
    grad = torch.randn(values.shape, generator=torch.Generator().manual_seed(grad_seed)).to(dtype)
    out.backward(grad)
    assert x.grad is not None and torch.equal(bits(x.grad), bits(grad))
