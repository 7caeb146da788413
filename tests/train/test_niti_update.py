"""NITI's weight update (`step_weight_`, int32 and float arithmetic in place) equals the reference's
int64 arithmetic bit for bit: an exact integer model here (Python integers, the 2021 code's
grad_calc, PstoShift and int8_clip), alone and per member of a stacked weight, over edge cases:
zero and +-1 gradients (RangeEstimate 0), updates of mu bits or fewer (no shift), odd and even
shifts, gradients up to 2^31 - 1, mantissas at the clip, and members that differ in exponent and mu."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dse.train.niti.optim import reference_step_weight_, step_weight_

BITWIDTH = 7
LIMIT = 2**BITWIDTH - 1


def pseudo_stochastic_shift(magnitude: int, shift: int) -> int:
    """PstoShift of a non-negative integer: the top half of the discarded bits against the bottom
    half (shifted up one where the shift is odd); up by one where the top half is larger."""
    kept, field = magnitude >> shift, magnitude & ((1 << shift) - 1)
    low_bits = shift >> 1
    return kept + ((field >> low_bits) > ((field & ((1 << low_bits) - 1)) << (shift & 1)))


def model_update(mantissas: list[int], grads: list[int], mu: int) -> list[int]:
    """m - grad_calc(g32, mu), clipped: b = RangeEstimate(g32) = ceil(log2 max|g|); b == 0 gives no
    update, else each |g| shifted by max(b - mu, 0) (PstoShift), signed and clipped to +-127."""
    peak = max(abs(g) for g in grads)
    b = (peak - 1).bit_length() if peak > 0 else 0
    out = []
    for m, g in zip(mantissas, grads, strict=True):
        update = 0
        if b:
            update = min(pseudo_stochastic_shift(abs(g), max(b - mu, 0)), LIMIT) * (1 if g >= 0 else -1)
        out.append(max(-LIMIT, min(LIMIT, m - update)))
    return out


@st.composite
def members(draw: st.DrawFn) -> tuple[list[list[int]], list[list[int]], list[int], list[int]]:
    """Mantissas, gradients, exponents and mus of 1-3 members of one weight shape."""
    count, size = draw(st.integers(1, 3)), draw(st.integers(1, 40))
    mantissas, grads, exps, mus = [], [], [], []
    for _ in range(count):
        mantissas.append(draw(st.lists(st.sampled_from([-LIMIT, -LIMIT + 1, -1, 0, 1, 63, LIMIT - 1, LIMIT])
                                       | st.integers(-LIMIT, LIMIT), min_size=size, max_size=size)))
        top = draw(st.sampled_from([0, 1, 2, 5, 9, 16, 24, 25, 31]))  # bits of the largest |g|
        bound = max(2**top - 1, 0) if top < 31 else 2**31 - 1
        grads.append(draw(st.lists(st.integers(-bound, bound), min_size=size, max_size=size)))
        exps.append(draw(st.integers(-100, 100)))
        mus.append(draw(st.integers(1, 12)))
    return mantissas, grads, exps, mus


def stepped(mantissas: list[list[int]], grads: list[list[int]], exps: list[int], mus: list[int],
            stacked: bool, step: object, dtype: torch.dtype = torch.float32) -> list[list[float]]:
    """The weights (values m * 2^e) after one step by `step`, as float lists."""
    values = torch.tensor([[m * 2.0**e for m in member] for member, e in zip(mantissas, exps, strict=True)],
                          dtype=dtype)
    g32 = torch.tensor(grads, dtype=torch.int64)
    if stacked:
        step(values, g32, tuple(exps), mus, BITWIDTH)  # type: ignore[operator]
    else:
        for index in range(len(exps)):
            step(values[index], g32[index], exps[index], mus[index], BITWIDTH)  # type: ignore[operator]
    return values.tolist()


@settings(max_examples=200, deadline=None)
@given(case=members(), stacked=st.booleans())
def test_niti_update_equals_the_integer_model(case: tuple[list[list[int]], ...], stacked: bool) -> None:
    mantissas, grads, exps, mus = case
    expected = [[m * 2.0**e for m in model_update(member, g, mu)]
                for member, g, e, mu in zip(mantissas, grads, exps, mus, strict=True)]
    fast = stepped(mantissas, grads, exps, mus, stacked, step_weight_)
    reference = stepped(mantissas, grads, exps, mus, stacked, reference_step_weight_)
    assert fast == expected
    assert reference == expected
    # no -0: every value the update writes is an integer times 2^e, zero as +0
    assert all(str(v) != "-0.0" for member in fast for v in member)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_niti_update_outside_its_exact_range_takes_the_reference(dtype: torch.dtype) -> None:
    """Gradients of 2^31 or more, or exponents beyond 2^+-100, take the int64 arithmetic: same values."""
    mantissas, exps, mus = [[5, -7, 127, 0]], [-20], [8]
    for grads in ([[2**33 + 5, -(2**31), 3, 0]], [[2**31 - 1, -1, 0, 77]]):
        expected = [[m * 2.0**-20 for m in model_update(mantissas[0], grads[0], 8)]]
        assert stepped(mantissas, grads, exps, mus, False, step_weight_, dtype) == expected
    far = [[m * 2.0**-120 for m in model_update(mantissas[0], [9, -300, 2, 1], 8)]]
    assert stepped(mantissas, [[9, -300, 2, 1]], [-120], mus, False, step_weight_, torch.float64) == far
