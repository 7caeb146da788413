"""IEEE P3109 formats bit for bit against gfloat's `format_info_p3109` over every code and every tie.

For every K in 3..8, every precision, signed and unsigned, extended and finite domain and the three
saturation modes: decode of every code, encode of every value and tie, and quantize (nearest and
toward zero, float32 and float64 input) of every value, every tie between neighbours, each tie one
ulp either side, values beyond max, +-inf and NaN. stochastic(k) against gfloat's srnumbits rule
with the same random bits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gfloat import RoundMode, decode_ndarray, encode_ndarray, round_ndarray
from gfloat.formats import format_info_p3109
from gfloat.types import Domain, Signedness

from dse.errors import InputError
from dse.formats import get
from dse.formats.base import random_bits

SATURATIONS = ("ovfinf", "satfinite", "satpropagate")


def configurations(width: int) -> list[tuple[int, bool, str]]:
    return [
        (p, signed, domain)
        for signed in (True, False)
        for p in range(1, width if signed else width + 1)
        for domain in ("extended", "finite")
    ]


def reference(width: int, precision: int, signed: bool, domain: str) -> object:
    return format_info_p3109(
        width,
        precision,
        Signedness.Signed if signed else Signedness.Unsigned,
        Domain.Extended if domain == "extended" else Domain.Finite,
    )


def spec(width: int, precision: int, signed: bool, domain: str, saturation: str) -> str:
    return f"p3109({width},{precision},signed={int(signed)},domain={domain},saturation={saturation})"


def probes(values: np.ndarray, info: object, signed: bool) -> np.ndarray:
    """Every value, every tie and one float64 and float32 ulp either side, overflow and specials."""
    ties = (values[1:] + values[:-1]) / 2
    ties32 = ties.astype(np.float32)
    beyond = np.array([info.max * 1.01, info.max * 4, 1e300, math.inf, math.nan])
    x = np.concatenate(
        [
            values,
            ties,
            np.nextafter(ties, math.inf),
            np.nextafter(ties, -math.inf),
            np.nextafter(ties32, np.float32(math.inf)).astype(np.float64),
            np.nextafter(ties32, np.float32(-math.inf)).astype(np.float64),
            beyond,
            -beyond,
        ]
    )
    return x if signed else x[~(x < 0)]


def expected(info: object, x: np.ndarray, mode: RoundMode, saturation: str) -> np.ndarray:
    """gfloat's rounding; SatPropagate is sat=True for finite inputs with infinities kept (or NaN)."""
    result = round_ndarray(info, x, mode, sat=saturation != "ovfinf")
    if saturation == "satpropagate":
        infinity = math.inf if info.domain == Domain.Extended else math.nan
        result = np.where(np.isinf(x), np.copysign(infinity, x), result)
    return result


def assert_same(actual: np.ndarray, wanted: np.ndarray, x: np.ndarray, label: str) -> None:
    same = ((actual == wanted) & (np.signbit(actual) == np.signbit(wanted))) | (
        np.isnan(actual) & np.isnan(wanted)
    )
    assert same.all(), (
        f"{label}: {int((~same).sum())} differ at {x[~same][:4]}: {actual[~same][:4]} vs {wanted[~same][:4]}"
    )


@pytest.mark.parametrize("width", range(3, 9))
def test_every_code_and_tie_matches_gfloat(width: int) -> None:
    for precision, signed, domain in configurations(width):
        info = reference(width, precision, signed, domain)
        codes = np.arange(2**width)
        decoded = decode_ndarray(info, codes)
        finite = np.unique(decoded[np.isfinite(decoded)])
        x = probes(finite, info, signed)
        for saturation in SATURATIONS:
            fmt = get(spec(width, precision, signed, domain, saturation))
            assert fmt.bits == width and fmt.max == info.max and fmt.min_positive == info.smallest
            assert_same(fmt.decode(torch.from_numpy(codes)).numpy(), decoded, codes, fmt.spec)
            for rounding, mode in (("nearest", RoundMode.TiesToEven), ("toward_zero", RoundMode.TowardZero)):
                assert_same(
                    fmt.quantize(torch.from_numpy(x), rounding).numpy(),
                    expected(info, x, mode, saturation),
                    x,
                    f"{fmt.spec} {rounding} float64",
                )
                x32 = x.astype(np.float32)
                assert_same(
                    fmt.quantize(torch.from_numpy(x32), rounding).double().numpy(),
                    expected(info, x32.astype(np.float64), mode, saturation),
                    x32,
                    f"{fmt.spec} {rounding} float32",
                )
            rounded = expected(info, x, RoundMode.TiesToEven, saturation)
            in_range = ~np.isnan(rounded)
            assert np.array_equal(
                fmt.encode(torch.from_numpy(x[in_range])).numpy(), encode_ndarray(info, rounded[in_range])
            ), fmt.spec


@pytest.mark.parametrize("k", [1, 3, 8, 13, 23])
@pytest.mark.parametrize(
    ("width", "precision", "signed"), [(8, 3, True), (8, 4, True), (6, 3, False), (8, 1, True)]
)
def test_stochastic_k_matches_gfloat_srnumbits(k: int, width: int, precision: int, signed: bool) -> None:
    info = reference(width, precision, signed, "extended")
    fmt = get(spec(width, precision, signed, "extended", "satfinite"))
    generator = torch.Generator().manual_seed(k)
    magnitudes = torch.rand(20000, generator=generator, dtype=torch.float64) * 2 * info.max
    x = (
        magnitudes
        if not signed
        else magnitudes * torch.where(torch.rand(20000, generator=generator) < 0.5, -1, 1)
    )
    draws = random_bits(x.shape, x.device, torch.Generator().manual_seed(5)).long() >> (31 - k)
    wanted = round_ndarray(info, x.numpy(), RoundMode.Stochastic, sat=True, srbits=draws.numpy(), srnumbits=k)
    actual = fmt.quantize(x, f"stochastic({k})", torch.Generator().manual_seed(5)).numpy()
    assert_same(actual, wanted, x.numpy(), f"{fmt.spec} stochastic({k})")


def test_unsigned_formats_send_negatives_to_nan_or_zero() -> None:
    x = torch.tensor([-1.0, -1e-30, -0.0, -math.inf, 2.0])
    assert torch.equal(
        get("p3109(8,3,signed=0,saturation=satfinite)").quantize(x), torch.tensor([0.0, 0, 0, 0, 2])
    )
    nan = get("p3109(8,3,signed=0)").quantize(x)
    assert torch.isnan(nan[[0, 1, 3]]).all() and nan[2] == 0 and not torch.signbit(nan[2]) and nan[4] == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("p3109(8,8)", "P (precision) must be in 1..7, got 8"),
        ("p3109(8,0)", "P (precision) must be in 1..7, got 0"),
        ("p3109(8,9,signed=0)", "P (precision) must be in 1..8, got 9"),
        ("p3109(16,2)", "P must be at least 6 for K=16"),
        ("p3109(2,1)", "K (width) must be in 3..16, got 2"),
        ("p3109(8)", "p3109 needs a width and a precision"),
        ("p3109(8,3,saturation=clamp)", "saturation must be one of ovfinf, satfinite, satpropagate"),
        ("p3109(8,3,domain=big)", "domain must be one of extended, finite"),
    ],
)
def test_bad_p3109_specs_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(InputError) as error:
        get(text)
    assert message in str(error.value) and text in str(error.value)


def test_canonical_specs() -> None:
    assert get("p3109(8,3)").spec == "p3109(8,3)"
    assert get("p3109(8, 4, signed=0, domain=finite, saturation=satfinite)").spec == (
        "p3109(8,4,signed=0,domain=finite,saturation=satfinite)"
    )
    assert get("p3109(8,4,scale=tensor)").spec == "p3109(8,4,scale=tensor)"
