"""Inputs narrower than float32 (float16, bfloat16): every family rounds them in float32 and casts the
result back, as `quantize` computes them, so `round_unscaled` and `round_unscaled_` of such x give
`quantize`'s bits for a format without scaling, a stochastic rounding's draws included."""

from __future__ import annotations

import math

import pytest
import torch

from dse.formats import ROUNDINGS, ZOO, get

NARROW_DTYPES = (torch.float16, torch.bfloat16)
ALL_ROUNDINGS = (*ROUNDINGS, "stochastic(5)")


def narrow_inputs(dtype: torch.dtype) -> torch.Tensor:
    """Values over many binades with zeros of both signs, +-inf, NaN and the dtype's extremes."""
    source = torch.Generator().manual_seed(0)
    values = torch.randn(4, 48, generator=source, dtype=torch.float64) * torch.exp2(
        torch.randint(-12, 12, (4, 48), generator=source).double())
    info = torch.finfo(dtype)
    specials = [0.0, -0.0, math.inf, -math.inf, math.nan, info.max, -info.max, info.tiny,
                info.smallest_normal / 4]
    values.view(-1)[: len(specials)] = torch.tensor(specials, dtype=torch.float64)
    return values.to(dtype)


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(5)


@pytest.mark.parametrize("dtype", NARROW_DTYPES, ids=str)
@pytest.mark.parametrize("rounding", ALL_ROUNDINGS)
@pytest.mark.parametrize("spec", ZOO)
def test_round_unscaled_of_a_narrow_float_rounds_it_in_float32(spec: str, rounding: str,
                                                                dtype: torch.dtype) -> None:
    fmt = get(spec)
    x = narrow_inputs(dtype)
    expected = fmt.round_unscaled(x.float(), rounding, seeded()).to(dtype)
    for method in (fmt.round_unscaled, fmt.round_unscaled_):
        kept = x.clone()
        got = method(kept, rounding, seeded())
        assert got.dtype == dtype
        assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
        assert torch.equal(kept.view(torch.int16), x.view(torch.int16))  # a float32 copy is rounded
    if fmt.scaling.kind == "none":
        assert torch.equal(fmt.quantize(x, rounding, seeded()).view(torch.int16), expected.view(torch.int16))
