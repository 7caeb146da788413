"""Every registered fast path (dse.formats.fast.FAST_PATHS) equals the reference it is registered
against, bit for bit (values, signs of zero, NaN), on every format, rounding and dtype it serves,
over its code space; and the path did run (a fast path that never runs would pass vacuously).

The reference runs inside `fast.reference_only()`, which switches every fast path off (and slicing:
whole tensors); both runs draw from generators with the same seed.
"""

from __future__ import annotations

import gc
import math
import weakref
from collections.abc import Iterator

import pytest
import torch

from dse.formats import get
from dse.formats.base import MAX_ENUMERABLE_BITS, NumberFormat
from dse.formats.block import BlockFormat
from dse.formats.fast import FAST_PATHS, FastPath, recording, reference_only
from dse.formats.fast import slices as fast_slices

SLICE_ELEMENTS = 4096  # per thread, in these tests: several slices without large tensors


def cases() -> Iterator[object]:
    for path in FAST_PATHS.values():
        for spec in path.formats:
            for rounding in path.roundings:
                for dtype in path.dtypes:
                    yield pytest.param(path, spec, rounding, dtype,
                                       id=f"{path.name}-{spec}-{rounding}-{str(dtype)[6:]}")


def grid_space(fmt: NumberFormat, dtype: torch.dtype) -> torch.Tensor:
    """Every grid value, every midpoint between neighbours and the dtype's neighbours of each, at
    three scales, specials, and random bit patterns of every exponent."""
    generator = torch.Generator().manual_seed(3)
    parts = []
    if fmt.bits <= MAX_ENUMERABLE_BITS:
        values = fmt.values()
        values = torch.cat([values, -values])
        values = values.sort().values
        middles = (values[1:] + values[:-1]) / 2
        points = torch.cat([values, middles]).to(dtype)
        parts += [points, torch.nextafter(points, torch.full_like(points, math.inf)),
                  torch.nextafter(points, torch.full_like(points, -math.inf))]
        parts += [p * 2.0**k for p in parts[:1] for k in (-3, 5)]
    int_dtype = torch.int32 if dtype == torch.float32 else torch.int64
    width = 32 if dtype == torch.float32 else 64
    patterns = torch.randint(-(2 ** (width - 1)), 2 ** (width - 1) - 1, (20000,), generator=generator,
                             dtype=torch.int64).to(int_dtype).view(dtype)
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, fmt.max, -fmt.max, 2 * fmt.max,
                             fmt.min_positive, fmt.min_positive / 2, 1e-45, -3e38], dtype=torch.float64)
    return torch.cat([*parts, patterns, specials.to(dtype)])


def scaled_space(fmt: NumberFormat, dtype: torch.dtype) -> torch.Tensor:
    """The grid's values, midpoints and their neighbours times 2^-5, and random values within them."""
    finite = grid_space(fmt, dtype)
    finite = finite[torch.isfinite(finite) & (finite.abs() <= fmt.max)] * 2.0**-5
    generator = torch.Generator().manual_seed(9)
    uniform = (torch.rand(20000, generator=generator, dtype=torch.float64) * 2 - 1) * fmt.max * 2.0**-5
    return torch.cat([finite, uniform.to(dtype)])


def wide_space(dtype: torch.dtype) -> torch.Tensor:
    """Values of every exponent (several CPU slices), specials, and rows that are zero or tiny."""
    generator = torch.Generator().manual_seed(5)
    n = 5 * SLICE_ELEMENTS * torch.get_num_threads() + 123
    exponent = torch.randint(-150, 120, (n,), generator=generator).to(torch.float64)
    x = torch.randn(n, generator=generator, dtype=torch.float64) * torch.exp2(exponent)
    for start, value in enumerate([math.nan, math.inf, -math.inf, 0.0, -0.0]):
        x[start::997] = value
    return x.to(dtype)


def blocks_space(fmt: BlockFormat, dtype: torch.dtype) -> torch.Tensor:
    """Rows of 96 whose max has every float32 exponent field (elements over 30 binades below it),
    rows of element ties at scales across the range, zeros, -0, inf and NaN rows."""
    generator = torch.Generator().manual_seed(7)
    field = torch.arange(255).repeat_interleave(4)
    top = torch.where(field > 0, 2.0 ** (field - 127).double(), 2.0**-140)
    x = torch.randn(field.numel(), 96, generator=generator, dtype=torch.float64)
    x = x / x.abs().amax(dim=1, keepdim=True) * top[:, None]
    x = x * 2.0 ** -torch.randint(0, 30, x.shape, generator=generator).double()
    rows = [x]
    if fmt.element.bits <= MAX_ENUMERABLE_BITS:
        values = fmt.element.values()
        ties = (values[1:] + values[:-1]) / 2
        scales = 2.0 ** torch.arange(-120, 120, 7).double()
        picks = torch.randint(0, ties.numel(), (scales.numel(), 96), generator=generator)
        tie_rows = ties[picks] * scales[:, None]
        tie_rows[:, ::16] = values[-1] * scales[:, None]  # every block's max is the element max times a scale
        rows.append(tie_rows)
    x = torch.cat(rows)
    x[::13] = 0.0
    x[1::17] = -0.0
    x[2::19, 5] = math.inf
    x[3::23, 7] = math.nan
    x = x.to(dtype) if dtype == torch.float64 else x.float()
    return x[: x.shape[0] // 6 * 6].reshape(-1, 6, 96) if fmt.axis == 1 else x


def code_space(path: FastPath, fmt: NumberFormat, dtype: torch.dtype) -> torch.Tensor:
    if path.code_space == "blocks":
        assert isinstance(fmt, BlockFormat)
        return blocks_space(fmt, dtype)
    if path.code_space == "wide":
        return wide_space(dtype)
    if path.code_space == "scaled":
        return scaled_space(fmt, dtype)
    return grid_space(fmt, dtype)


def run(path: FastPath, fmt: NumberFormat, x: torch.Tensor, rounding: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(11)
    if path.operation == "round_unscaled":
        return fmt.round_unscaled(x, rounding, generator)
    return fmt.quantize(x, rounding, generator)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, x: torch.Tensor) -> None:
    same = ((actual == expected) & (torch.signbit(actual) == torch.signbit(expected))
            | torch.isnan(actual) & torch.isnan(expected))
    bad = ~same
    assert not bad.any(), (f"{int(bad.sum())} of {x.numel()} differ, e.g. x={x[bad][:4].tolist()} got "
                           f"{actual[bad][:4].tolist()} expected {expected[bad][:4].tolist()}")


@pytest.mark.parametrize(("path", "spec", "rounding", "dtype"), list(cases()))
def test_every_fast_path_equals_its_reference(path: FastPath, spec: str, rounding: str, dtype: torch.dtype,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_slices, "CPU_SLICE_ELEMENTS_PER_THREAD", SLICE_ELEMENTS)
    fmt = get(spec)
    x = code_space(path, fmt, dtype)
    with recording() as used:
        fast = run(path, fmt, x, rounding)
    assert path.name in used, f"{path.name} did not run for {spec} {rounding} {dtype}"
    with reference_only(), recording() as used_by_reference:
        reference = run(path, fmt, x, rounding)
    assert not used_by_reference
    assert fast.dtype == reference.dtype == x.dtype and fast.shape == x.shape
    assert_same_bits(fast, reference, x)


def test_every_registered_path_names_its_reference_and_cases() -> None:
    assert {"fp-magic-constant", "fp-exact-cast", "lns-lookup", "block-e8m0-nearest",
            "block-scale-grid-slices", "host-tensor-scale", "cpu-slices"} <= set(FAST_PATHS)
    for path in FAST_PATHS.values():
        assert path.reference and path.formats and path.roundings and path.dtypes


@pytest.mark.parametrize(("path", "spec"), [pytest.param(path, spec, id=f"{path.name}-{spec}")
                                            for path in FAST_PATHS.values() for spec in path.formats])
def test_a_format_whose_fast_paths_ran_is_freed_by_reference_counting_alone(
        path: FastPath, spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plans and kernels a fast path caches in the format's `fast_cache` do not refer back to the
    format: the format goes when its last reference does, with no reference cycle left for the cyclic
    garbage collector (a sweep builds formats for every trial; each cycle held 11 objects)."""
    monkeypatch.setattr(fast_slices, "CPU_SLICE_ELEMENTS_PER_THREAD", SLICE_ELEMENTS)
    fmt = get(spec)
    with recording() as used:
        for dtype in path.dtypes:
            x = code_space(path, fmt, dtype)
            for rounding in path.roundings:
                run(path, fmt, x, rounding)
    assert path.name in used, f"{path.name} did not run for {spec}"
    freed = weakref.ref(fmt)
    gc.disable()  # (so that only reference counting can free it)
    try:
        del fmt
        assert freed() is None, f"a reference cycle keeps {spec} alive after {path.name} ran"
    finally:
        gc.enable()
