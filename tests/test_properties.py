"""Properties every format in the zoo must have, checked with hypothesis over random inputs.

Bit-exactness against reference libraries lives in the per-family test files; these tests check the
contract downstream code relies on: idempotence, monotonicity, outputs on the grid, rounding to a
neighbour within half a step, and stochastic rounding that is unbiased and reproducible.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dse.formats import ZOO, NumberFormat, Scaling, get

ENUMERABLE = [spec for spec in ZOO if get(spec).bits <= 16]
LINEAR_FAMILIES = {"fp", "int", "fixed", "mx"}  # rounding in the value domain (posit/LNS are geometric)


def unscaled(fmt: NumberFormat) -> NumberFormat:
    """The same element grid with no scaling, so properties can be stated on the grid itself."""
    return dataclasses.replace(fmt, scaling=Scaling())  # type: ignore[type-var]


@functools.cache
def grid_values(spec: str) -> torch.Tensor:
    return unscaled(get(spec)).values()


def finite_floats(fmt: NumberFormat) -> st.SearchStrategy[float]:
    """Magnitudes spread over the grid's whole range, a bit beyond it on both sides."""
    low, high = math.log2(fmt.min_positive) - 2, math.log2(fmt.max) + 1
    magnitude = st.floats(min_value=low, max_value=high).map(lambda e: 2.0**e)
    return st.tuples(st.sampled_from([-1.0, 1.0]), magnitude).map(lambda sm: sm[0] * sm[1])


def batch(fmt: NumberFormat) -> st.SearchStrategy[torch.Tensor]:
    return st.lists(finite_floats(fmt), min_size=1, max_size=64).map(
        lambda xs: torch.tensor(xs, dtype=torch.float32))


@pytest.mark.parametrize("spec", ZOO)
def test_every_zoo_spec_round_trips_through_its_canonical_spec(spec: str) -> None:
    fmt = get(spec)
    assert get(fmt.spec) == fmt
    assert fmt.max > fmt.min_positive > 0


@pytest.mark.parametrize("spec", ZOO)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_quantize_is_idempotent(spec: str, data: st.DataObject) -> None:
    fmt = get(spec)
    grid = unscaled(fmt) if fmt.scaling.kind in ("tensor", "channel") and not fmt.scaling.pow2 else fmt
    x = data.draw(batch(fmt))
    once = grid.quantize(x)
    assert torch.equal(grid.quantize(once), once)


@pytest.mark.parametrize("spec", ZOO)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_quantize_is_monotone(spec: str, data: st.DataObject) -> None:
    fmt = get(spec)
    x = torch.sort(data.draw(batch(fmt))).values
    for grid in (unscaled(fmt), fmt):
        q = grid.quantize(x.double() if fmt.bits > 24 else x)
        q = q[~torch.isnan(q)]
        assert torch.all(q[1:] >= q[:-1])


@pytest.mark.parametrize("spec", ENUMERABLE)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_rounds_to_a_neighbour_on_the_grid(spec: str, data: st.DataObject) -> None:
    fmt = unscaled(get(spec))
    values = grid_values(spec)
    x = data.draw(batch(fmt)).double()
    inside = x.abs() <= fmt.max
    x = x[inside]
    q = fmt.quantize(x)
    assert torch.all(torch.isin(q, values)), "quantize produced a value outside values()"
    below = values[(torch.searchsorted(values, x, right=True) - 1).clamp(min=0)]
    above = values[torch.searchsorted(values, x).clamp(max=values.numel() - 1)]
    assert torch.all((q == below) | (q == above))
    if fmt.family in LINEAR_FAMILIES:
        assert torch.all((q - x).abs() <= (above - below) / 2)
    else:  # geometric rounding: nearest in the log domain or on the bit pattern, so within one step
        assert torch.all((q - x).abs() <= (above - below))


@pytest.mark.parametrize("spec", ZOO)
def test_stochastic_rounding_is_reproducible_for_a_seed(spec: str) -> None:
    fmt = get(spec)
    # float64, so that even 32-bit grids have discarded bits to round
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x * min(fmt.max / 8, 4.0)

    def draw(seed: int) -> torch.Tensor:
        return fmt.quantize(x, "stochastic", torch.Generator().manual_seed(seed))

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


@pytest.mark.parametrize("spec", [s for s in ENUMERABLE if get(s).family != "mx"])
@pytest.mark.parametrize("position", [0.1, 0.5, 0.77])
def test_stochastic_rounding_is_unbiased(spec: str, position: float) -> None:
    """Between two neighbours a < b the mean of many draws is x (or log x for LNS), within 5 sigma."""
    fmt = unscaled(get(spec))
    values = fmt.values()
    positive = values[values > 0]
    a, b = positive[positive.numel() // 2 - 1], positive[positive.numel() // 2]
    if fmt.family == "lns":
        x_log = torch.log2(a) + position * (torch.log2(b) - torch.log2(a))
        x, target = 2.0**x_log, x_log
    else:
        x = a + position * (b - a)
        target = x
    n = 20000
    q = fmt.quantize(torch.full((n,), float(x), dtype=torch.float64), "stochastic",
                     torch.Generator().manual_seed(3))
    assert torch.all((q == a) | (q == b))
    observed = torch.log2(q).mean() if fmt.family == "lns" else q.mean()
    step = (torch.log2(b) - torch.log2(a)) if fmt.family == "lns" else (b - a)
    sigma = step * math.sqrt(position * (1 - position) / n)
    assert abs(float(observed - target)) <= 5 * float(sigma) + 1e-12 * float(step)


@pytest.mark.parametrize("spec", ENUMERABLE)
def test_toward_zero_never_increases_magnitude(spec: str) -> None:
    fmt = unscaled(get(spec))
    x = torch.linspace(-fmt.max, fmt.max, 5001, dtype=torch.float64)
    if fmt.family == "posit":  # posits never round a non-zero value to zero
        x = x[(x.abs() >= fmt.min_positive) | (x == 0)]
    q = fmt.quantize(x, "toward_zero")
    assert torch.all(q.abs() <= x.abs())
    assert torch.all(torch.isin(q, fmt.values()))


@pytest.mark.parametrize("spec", ENUMERABLE)
def test_encode_decode_are_inverse_on_values(spec: str) -> None:
    fmt = get(spec)
    values = fmt.values()
    assert torch.equal(fmt.decode(fmt.encode(values)), values)
    codes = fmt.encode(values)
    assert codes.dtype == torch.int64
    assert torch.all((codes >= 0) & (codes < 2**fmt.bits))


@pytest.mark.parametrize("spec", ZOO)
@pytest.mark.parametrize("shape", [(0,), (3, 0), (), (2, 3, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_quantize_keeps_shape_and_dtype(spec: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    q = get(spec).quantize(x)
    assert q.shape == x.shape and q.dtype == x.dtype
    assert not torch.isnan(q).any()
