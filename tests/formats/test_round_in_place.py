"""Rounding a quotient in place: `NumberFormat.round_unscaled_` may reuse the memory of the temporary it
is given (x / scale in the scaled quantizers), and must give `round_unscaled`'s bits, draws included."""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dse.formats import ROUNDINGS, ZOO, NumberFormat, get, round_to_integer
from dse.formats.fast import FAST_PATHS, device_path, reference_only

SPECIALS = [0.0, -0.0, 0.5, -0.5, 1.5, 2.5, -2.5, 1e-45, -1e-40, 3e38, -3e38, float("inf"), float("-inf"),
            float("nan")]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def inputs(seed: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    spread = torch.randn(602, generator=generator, dtype=torch.float64) * 2.0 ** torch.randint(
        -30, 30, (602,), generator=generator)
    return torch.cat([spread, torch.tensor(SPECIALS, dtype=torch.float64)]).to(dtype).reshape(-1, 2, 7)


@pytest.mark.parametrize("spec", [spec for spec in ZOO if spec != "fp32"])
@pytest.mark.parametrize("reference", [False, True])
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rounding=st.sampled_from([*ROUNDINGS, "stochastic(5)"]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_round_unscaled_in_place_gives_round_unscaled_bits_and_leaves_round_unscaled_input(
        spec: str, reference: bool, seed: int, rounding: str, dtype: torch.dtype) -> None:
    fmt = get(spec)
    x = inputs(seed, dtype)
    before = x.clone()
    with reference_only() if reference else torch.no_grad():
        expected = fmt.round_unscaled(x, rounding, torch.Generator().manual_seed(seed))
        assert torch.equal(bits(x), bits(before))  # round_unscaled never writes its input
        got = fmt.round_unscaled_(x.clone(), rounding, torch.Generator().manual_seed(seed))
    assert torch.equal(bits(got), bits(expected))


@pytest.mark.parametrize("spec", ["int8", "int4", "fixed(16,8)", "mxint8"])
def test_fixed_point_rounds_a_quotient_to_nearest_in_its_own_memory(spec: str) -> None:
    fmt = get(spec)
    quotient = torch.randn(64, 32) * 40
    rounded = fmt.round_unscaled(quotient, "nearest", None)
    in_place = fmt.round_unscaled_(quotient, "nearest", None)
    if spec in ("int8", "int4"):  # (fixed(16,8) and mxint8's fixed(8,6) round x * 2^frac, a temporary
        assert in_place.data_ptr() == quotient.data_ptr()  # of their own, in place)
    assert rounded.data_ptr() != quotient.data_ptr()
    assert torch.equal(bits(in_place), bits(rounded))


@pytest.mark.parametrize("rounding", ["nearest", "toward_zero"])
def test_round_to_integer_in_place_rewrites_the_tensor_it_is_given(rounding: str) -> None:
    t = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 2.7, -2.7, float("nan"), float("inf")])
    expected = torch.round(t) if rounding == "nearest" else torch.trunc(t)
    kept = t.clone()
    assert torch.equal(bits(round_to_integer(kept, rounding)), bits(expected))
    assert torch.equal(bits(kept), bits(t))  # not in place unless asked
    out = round_to_integer(t, rounding, in_place=True)
    assert out is t
    assert torch.equal(bits(t), bits(expected))


# Every quantizer entry point, on every format a fast path serves and the zoo's, must leave the
# caller's tensor as it was and return memory of its own: the in-place roundings may only take a
# temporary (x / scale), never x, which a skipped scale (a scale of 1) would otherwise hand over.
ENTRY_SPECS = sorted({*ZOO, *(spec for path in FAST_PATHS.values() for spec in path.formats),
                      "int8(scale=channel)", "fp8_e4m3(scale=channel)", "fixed(8,0)"})
PATHS = {"fast": contextlib.nullcontext, "reference": reference_only, "device": device_path}


def member_inputs(fmt: NumberFormat, seed: int, dtype: torch.dtype, case: str) -> torch.Tensor:
    """Three members (3, 4, 16) off the grid: spread, each member's max|x| exactly the format's max
    (a per-tensor scale of 1: x / scale skipped), or each member holding an inf (a scale of 1 too)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 16, generator=generator, dtype=torch.float64) * 0.37
    if case == "max":
        x = x / x.abs().amax(dim=(1, 2), keepdim=True) * fmt.max
    elif case == "inf":
        x[:, 0, 0] = torch.tensor([math.inf, -math.inf, math.inf])
    return x.to(dtype)


@pytest.mark.parametrize("spec", ENTRY_SPECS)
@pytest.mark.parametrize("case", ["spread", "max", "inf"])
@pytest.mark.parametrize("path", sorted(PATHS))
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rounding=st.sampled_from([*ROUNDINGS, "stochastic(5)"]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_quantizers_never_write_or_return_their_input(spec: str, seed: int, rounding: str, dtype: torch.dtype,
                                                      case: str, path: str) -> None:
    fmt = get(spec)
    x = member_inputs(fmt, seed, dtype, case)
    before = x.clone()
    axes = [-1, 0] if x.dim() > 1 else [0]
    with PATHS[path]():
        outputs = [fmt.quantize(x, rounding, torch.Generator().manual_seed(seed)),
                   fmt.quantize(x[0], rounding, torch.Generator().manual_seed(seed)),
                   fmt.quantize_members(x, rounding, torch.Generator().manual_seed(seed)),
                   fmt.round_unscaled(x, rounding, torch.Generator().manual_seed(seed)),
                   *fmt.quantize_along(x, axes, rounding, torch.Generator().manual_seed(seed)),
                   *fmt.quantize_members_along(x, [-1, 0], rounding, torch.Generator().manual_seed(seed))]
    assert torch.equal(bits(x), bits(before))
    for out in outputs:
        assert out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


def test_the_in_place_benchmark_runs_before_and_today_for_every_family(repo_root: Path) -> None:
    """benchmarks/quantize_in_place.py's "before" (round_unscaled_ patched back to round_unscaled) must
    leave every family a working round_unscaled_ (it checks before and today give the same bits)."""
    formats = ["int8", "lns8", "fp8_e4m3", "posit8", "mxfp4"]
    command = [sys.executable, "benchmarks/quantize_in_place.py", "--formats", ",".join(formats),
               "--sizes", "2", "--rounds", "1", "--calls", "1"]
    done = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|")[1].strip() for line in done.stdout.splitlines() if line.startswith("| ")]
    assert rows[1:] == formats  # (after the header)
