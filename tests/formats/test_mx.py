"""OCP MX block formats bit for bit against gfloat's quantize_block / encode_block.

Blocks are random with a wide dynamic range (whole blocks from 2^-150 to 2^125, elements spread
over 20 binades inside a block), plus blocks of zeros, blocks that need the scale clamped at
2^-127 (and at 2^127 for float64 input), blocks of exact ties between element values, blocks at
the element max plus half a step, and the MXINT8 ties next to -2. MXINT8 elements are symmetric
(microxcaling's choice; gfloat also uses -2, code 0x80), so gfloat's -2 results are compared as
-127/64 and code 0x81.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gfloat import RoundMode, compute_scale_amax, encode_block, quantize_block, round_ndarray
from gfloat.formats import (
    format_info_mxfp4_e2m1,
    format_info_mxfp6_e2m3,
    format_info_mxfp6_e3m2,
    format_info_mxfp8_e4m3,
    format_info_mxfp8_e5m2,
    format_info_mxint8,
)
from support.group_gemms import torch_threads

from dse.errors import InputError
from dse.formats import NumberFormat, get
from dse.formats.base import from_blocks, random_bits, to_blocks
from dse.formats.block import BlockFormat

GFLOAT = {
    "mxfp8_e4m3": format_info_mxfp8_e4m3,
    "mxfp8_e5m2": format_info_mxfp8_e5m2,
    "mxfp6_e3m2": format_info_mxfp6_e3m2,
    "mxfp6_e2m3": format_info_mxfp6_e2m3,
    "mxfp4": format_info_mxfp4_e2m1,
    "mxint8": format_info_mxint8,
}
NAN, INF = math.nan, math.inf


def special_blocks(fmt: BlockFormat, dtype: torch.dtype) -> torch.Tensor:
    """Edge-case blocks: zeros, clamped scales, ties, max + half a step, -2 for INT8."""
    values = fmt.values()
    ties = (values[1:] + values[:-1]) / 2
    generator = torch.Generator().manual_seed(11)
    rows = [torch.zeros(32, dtype=torch.float64)]
    for scale in (2.0**-140, 2.0**-130, 1.0, 2.0**60):
        picks = ties[torch.randint(0, ties.numel(), (32,), generator=generator)]
        picks[0] = values[-1] + (values[-1] - values[-2]) / 2  # max + half a step sets the scale
        rows.append(picks * scale)
        picks = values[torch.randint(0, values.numel(), (32,), generator=generator)]
        picks[0] = values[-1]
        rows.append(picks * scale)
    rows.append(torch.full((32,), 2.0**-149))
    rows.append(torch.tensor([-1.995, 1.0] + [0.5] * 30, dtype=torch.float64))  # INT8: -2 in gfloat
    if dtype == torch.float64:  # scale clamped at 2^127
        rows.append(torch.randn(32, generator=generator, dtype=torch.float64) * 2.0**150)
    return torch.stack(rows).to(dtype)


def random_blocks(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    block_exponent = torch.randint(-150, 100, (n, 1), generator=generator)
    element_exponent = torch.randint(-20, 1, (n, 32), generator=generator)
    x = torch.randn(n, 32, generator=generator, dtype=torch.float64)
    return (x * 2.0 ** (block_exponent + element_exponent).double()).to(dtype)


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    a, e = actual.double(), expected.double()
    same = ((a == e) | (torch.isnan(a) & torch.isnan(e))) & (
        (torch.signbit(a) == torch.signbit(e)) | torch.isnan(e))
    assert same.all(), (f"{int((~same).sum())} differ: got {a[~same][:4].tolist()}, "
                        f"expected {e[~same][:4].tolist()}")


def gfloat_blocks(spec: str, x: torch.Tensor, mode: RoundMode) -> tuple[torch.Tensor, torch.Tensor]:
    """gfloat's values and codes (scale code, element codes) for each row of 32."""
    info = GFLOAT[spec]
    values, codes = [], []
    for row in x.double().numpy():
        scale = compute_scale_amax(info.etype.emax, row)
        values.append(quantize_block(info, row, compute_scale_amax, mode).clip(-info.etype.max * scale))
        codes.append(list(encode_block(info, scale, row / scale, mode)))
    codes = torch.tensor(codes)
    if spec == "mxint8":  # symmetric INT8: -2 (0x80) saturates to -127/64 (0x81)
        codes[:, 1:] = torch.where(codes[:, 1:] == 0x80, 0x81, codes[:, 1:])
    return torch.from_numpy(np.stack(values)), codes


@pytest.mark.parametrize("spec", list(GFLOAT))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("rounding", "mode"), [("nearest", RoundMode.TiesToEven),
                                                ("toward_zero", RoundMode.TowardZero)])
def test_blocks_match_gfloat(spec: str, dtype: torch.dtype, rounding: str, mode: RoundMode) -> None:
    fmt = get(spec)
    x = torch.cat([special_blocks(fmt, dtype), random_blocks(60, dtype, seed=len(spec))])
    expected_values, expected_codes = gfloat_blocks(spec, x, mode)
    assert_same(fmt.quantize(x, rounding), expected_values)
    if rounding == "nearest":
        scale_codes, element_codes = fmt.encode_blocks(x)
        assert torch.equal(scale_codes[:, 0], expected_codes[:, 0])
        assert torch.equal(element_codes[:, 0], expected_codes[:, 1:])


def reference_scales(info: object, x: np.ndarray) -> np.ndarray:
    """gfloat's compute_scale_amax, vectorized over rows (same formula, float64 numpy)."""
    amax = np.abs(x).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        exponent = np.clip(np.floor(np.log2(amax)) - info.etype.emax, -127, 127)
    return 2.0 ** np.where(amax == 0, -127, exponent)


@pytest.mark.parametrize("spec", list(GFLOAT))
def test_many_blocks_match_gfloat_element_rounding(spec: str) -> None:
    """3000 blocks per format: the vectorized form of quantize_block (scale rule + round_ndarray)."""
    fmt, info = get(spec), GFLOAT[spec]
    x = random_blocks(3000, torch.float32, seed=1).double().numpy()
    scale = reference_scales(info, x)
    expected = round_ndarray(info.etype, x / scale, RoundMode.TiesToEven, sat=True).clip(-info.etype.max)
    expected = expected * scale
    assert_same(fmt.quantize(torch.from_numpy(x).float()), torch.from_numpy(expected))


@pytest.mark.parametrize("spec", list(GFLOAT))
def test_stochastic_matches_gfloat_with_the_same_random_bits(spec: str) -> None:
    """float32 elements round with 31-bit integer draws k, gfloat's srbits = 2^31 - 1 - k, wherever
    the discarded fraction fits 31 bits (|v / X| >= min_positive * 2^-8); elsewhere the result is
    one of the two neighbours."""
    fmt, info = get(spec), GFLOAT[spec]
    x = random_blocks(500, torch.float32, seed=2)
    draws = random_bits(x.shape, x.device, torch.Generator().manual_seed(9)).long()
    srbits = (2**31 - 1 - draws).numpy()
    scale = reference_scales(info, x.double().numpy())
    scaled = x.double().numpy() / scale
    keep = (np.abs(scaled) >= fmt.min_positive * 2.0**-8) | (scaled == 0)  # fraction fits 31 bits
    assert keep.mean() > 0.5
    expected = round_ndarray(info.etype, scaled, RoundMode.Stochastic, sat=True, srbits=srbits,
                             srnumbits=31).clip(-info.etype.max) * scale
    actual = fmt.quantize(x, "stochastic", torch.Generator().manual_seed(9))
    assert_same(actual[torch.from_numpy(keep)], torch.from_numpy(expected[keep]))
    down = round_ndarray(info.etype, scaled, RoundMode.TowardZero, sat=True) * scale
    away = np.where(scaled < 0, round_ndarray(info.etype, scaled, RoundMode.TowardNegative, sat=True),
                    round_ndarray(info.etype, scaled, RoundMode.TowardPositive, sat=True)) * scale
    rest = actual[torch.from_numpy(~keep)].double().numpy()
    assert np.all((rest == down[~keep]) | (rest == away[~keep]))


@pytest.mark.parametrize("spec", list(GFLOAT))
def test_encode_blocks_and_decode_blocks_give_quantize(spec: str) -> None:
    fmt = get(spec)
    x = torch.cat([special_blocks(fmt, torch.float32), random_blocks(200, torch.float32, seed=3)])
    x = torch.cat([x, torch.tensor([[1.0, INF] + [0.0] * 30, [NAN] * 32])]).reshape(-1, 48)
    scale_codes, element_codes = fmt.encode_blocks(x)
    assert scale_codes.shape == (x.shape[0], 2) and element_codes.shape == (x.shape[0], 2, 32)
    assert scale_codes.dtype == element_codes.dtype == torch.int64
    assert torch.all((scale_codes >= 0) & (scale_codes <= 255))
    assert torch.all((element_codes >= 0) & (element_codes < 2**fmt.bits))
    decoded = from_blocks(fmt.decode_blocks(scale_codes, element_codes), tuple(x.shape), -1, 16)
    assert_same(decoded.float(), fmt.quantize(x))


@pytest.mark.parametrize("spec", list(GFLOAT))
def test_zero_and_non_finite_blocks(spec: str) -> None:
    fmt = get(spec)
    x = torch.tensor([[0.0] * 32, [1.0, INF] + [0.5] * 30, [-INF] + [0.0] * 31, [NAN] + [1.0] * 31])
    q = fmt.quantize(x)
    assert torch.equal(q[0], torch.zeros(32))
    assert torch.isnan(q[1:]).all()  # a block holding inf or NaN gets the NaN scale
    scale_codes, element_codes = fmt.encode_blocks(x)
    assert scale_codes[:, 0].tolist() == [0, 255, 255, 255]
    assert torch.equal(element_codes[1:], torch.zeros_like(element_codes[1:]))


@pytest.mark.parametrize("spec", list(GFLOAT))
def test_quantize_is_idempotent_on_edge_blocks(spec: str) -> None:
    fmt = get(spec)
    x = torch.cat([special_blocks(fmt, torch.float32), random_blocks(200, torch.float32, seed=5)])
    once = fmt.quantize(x)
    assert torch.equal(fmt.quantize(once), once)


def test_mxint8_is_symmetric() -> None:
    fmt = get("mxint8")
    q = fmt.quantize(torch.tensor([[-1.995, -1.9921875, 1.995] + [0.5] * 29]))
    assert q[0, :3].tolist() == [-127 / 64, -127 / 64, 127 / 64]
    assert fmt.values().min().item() == -127 / 64


@pytest.mark.parametrize("spec", list(GFLOAT))
def test_float32_block_scale_from_the_exponent_field_equals_the_spec_rule(spec: str) -> None:
    """float32 max|v| takes a bit-level route to its scale: every exponent field, with zero, the
    smallest and largest mantissas, subnormals, inf and NaN, against the frexp rule in float64."""
    fmt = get(spec)
    fields = torch.arange(256, dtype=torch.int32)[:, None] << 23
    mantissas = torch.tensor([0, 1, 0x400000, 0x7FFFFF, 0x2D3C11], dtype=torch.int32)[None, :]
    amax = (fields | mantissas).reshape(-1).view(torch.float32)
    exponent = (torch.frexp(amax.double())[1].long() - 1 - fmt.element_emax).clamp(-127, 127)
    exponent = torch.where(amax == 0, -127, exponent)
    expected = torch.where(torch.isfinite(amax), torch.tensor(2.0).pow(exponent.double()), math.nan).float()
    actual = fmt.scale_from_amax(amax)
    assert actual.dtype == torch.float32
    assert torch.equal(torch.isnan(actual), torch.isnan(expected))
    assert torch.equal(actual[~torch.isnan(actual)], expected[~torch.isnan(expected)])


def test_scale_follows_the_spec_rule() -> None:
    fmt = get("mxfp8_e4m3")  # emax_elem = 8
    amax = torch.tensor([448.0, 512.0, 511.9, 2.0**-140, 0.0, 2.0**130, INF], dtype=torch.float64)
    scale = fmt.scale_from_amax(amax)
    assert scale[:6].tolist() == [1.0, 2.0, 1.0, 2.0**-127, 2.0**-127, 2.0**122]
    assert math.isnan(scale[6])
    assert get("mxint8").scale_from_amax(torch.tensor([1.99, 2.0**200], dtype=torch.float64)).tolist() == [
        1.0, 2.0**127]


def test_blocks_run_along_the_chosen_axis_with_padding() -> None:
    x = torch.randn(70, 5, generator=torch.Generator().manual_seed(4)) * 100
    along_rows = get("mxfp4(axis=0)").quantize(x)
    assert torch.equal(along_rows, get("mxfp4").quantize(x.T.contiguous()).T)
    padded = torch.cat([x.T, torch.zeros(5, 26)], dim=1)
    assert torch.equal(get("mxfp4").quantize(x.T.contiguous()), get("mxfp4").quantize(padded)[:, :70])
    mx16 = get("mx(fp4_e2m1,block=16)")
    blocks, _, _ = to_blocks(x.T.contiguous(), -1, 16)  # (5, 5, 16), the last block zero-padded
    one_by_one = torch.stack([mx16.quantize(block) for block in blocks.reshape(-1, 16)])
    expected = from_blocks(one_by_one.reshape(blocks.shape), (5, 70), -1, 10)
    assert torch.equal(mx16.quantize(x.T.contiguous()), expected)


@pytest.mark.parametrize(("spec", "element", "bits", "element_max"), [
    ("mxfp8_e4m3", "fp8_e4m3", 8, 448.0), ("mxfp8_e5m2", "fp(e=5,m=2,overflow=saturate)", 8, 57344.0),
    ("mxfp6_e3m2", "fp6_e3m2", 6, 28.0), ("mxfp6_e2m3", "fp6_e2m3", 6, 7.5),
    ("mxfp4", "fp4_e2m1", 4, 6.0), ("mxint8", "fixed(8,6,symmetric=1)", 8, 127 / 64),
])
def test_mx_formats(spec: str, element: str, bits: int, element_max: float) -> None:
    fmt = get(spec)
    assert fmt.family == "block" and fmt.element == get(element) and fmt.element.spec == element
    assert (fmt.bits, fmt.block_size, fmt.scale_bits, fmt.axis) == (bits, 32, 8, -1)
    assert fmt.max == element_max and get(fmt.spec) == fmt
    assert torch.equal(fmt.values(), get(element).values())


def test_mx_specs() -> None:
    assert get("mx(fp4_e2m1,block=16)").spec == "mxfp4(block=16)"
    assert get("mx(int8, axis=0)").spec == "mxint8(axis=0)"
    assert get("mx(fp8_e4m3)") == get("mxfp8_e4m3")
    bare = get("mxfp4(scale=none)")
    assert bare.spec == "mxfp4(scale=none)" and get(bare.spec) == bare
    assert torch.equal(bare.quantize(torch.tensor([100.0, 0.7])), torch.tensor([6.0, 0.5]))
    for bad, message in [("mx(bf16)", "mx element must be one of fp8_e4m3, fp8_e5m2"),
                         ("mxfp4(block=0)", "block must be in 1..4096"),
                         ("mxfp4(scale=tensor)", "scale must be one of block, none"),
                         ("mxfp4(pow2=1)", "unknown option 'pow2'")]:
        with pytest.raises(InputError, match=message):
            get(bad)


# --- the fused nearest path (BlockFormat._quantize_blocks_nearest) --------------------------------------

def blocks_at_every_exponent(fmt: BlockFormat, per_exponent: int, seed: int) -> torch.Tensor:
    """Blocks whose max|v| has each float32 exponent field 0..254 (the fused path's limits inside),
    elements over 30 binades below it, ties of the element grid, zeros, -0, inf and NaN blocks."""
    generator = torch.Generator().manual_seed(seed)
    field = torch.arange(255).repeat_interleave(per_exponent)
    top = torch.where(field > 0, 2.0 ** (field - 127).double(), 2.0**-140)
    x = torch.randn(field.numel(), 32, generator=generator, dtype=torch.float64)
    x = x / x.abs().amax(dim=1, keepdim=True) * top[:, None]
    x = x * 2.0 ** -torch.randint(0, 30, x.shape, generator=generator).double()
    x[:, 0] = top * (1 + torch.rand(field.numel(), generator=generator, dtype=torch.float64))
    values = fmt.values()
    ties = (values[1:] + values[:-1]) / 2
    scale = 2.0 ** (field[::8] - 127 - fmt.element_emax).clamp(-127, 127).double()
    tie_rows = ties[torch.randint(0, ties.numel(), (scale.numel(), 32), generator=generator)] * scale[:, None]
    tie_rows[:, 0] = values[-1] * scale  # max|v| keeps the scale
    x = torch.cat([x, tie_rows]).float()
    x[::13] = 0.0
    x[1::17] = -0.0
    x[2::19, 5] = INF
    x[3::23, 7] = NAN
    return x[torch.randperm(x.shape[0], generator=generator)]


@pytest.mark.parametrize("spec", list(GFLOAT))
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_path_matches_gfloat_at_every_block_exponent(spec: str, threads: int) -> None:
    """Every E8M0 scale, across several CPU chunks, against the vectorized gfloat formula."""
    fmt, info = get(spec), GFLOAT[spec]
    x = blocks_at_every_exponent(fmt, per_exponent=70, seed=threads)
    assert x.numel() > 2 * 2**17 * threads  # more than one chunk, and a partial last one
    reference = x.double().numpy()
    finite = np.isfinite(reference).all(axis=1)
    scale = reference_scales(info, np.where(np.isfinite(reference), reference, 0.0))
    with np.errstate(invalid="ignore", over="ignore"):
        expected = round_ndarray(info.etype, reference / scale, RoundMode.TiesToEven, sat=True)
        expected = expected.clip(-info.etype.max) * scale
    if spec == "mxint8":  # no -0 code: zero results are +0
        expected = expected + 0.0
    expected[~finite] = NAN
    with torch_threads(threads):
        assert_same(fmt.quantize(x), torch.from_numpy(expected))


@pytest.mark.parametrize("spec", ["mxfp8_e4m3", "mxfp6_e2m3", "mxint8", "mx(fp4_e2m1,block=16)",
                                  "mxfp8_e5m2(axis=0)", "mx(int8,block=7)"])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_path_equals_the_block_formula_for_every_layout(spec: str, threads: int) -> None:
    """Blocked axis last or not, padded or not, non-contiguous, float16/bfloat16 input, a scalar."""
    fmt = get(spec)
    x = blocks_at_every_exponent(fmt, per_exponent=12, seed=7)
    x = x[: x.shape[0] // 3 * 3].reshape(-1, 96)
    inputs = [x, x.T, x[:, :90], x[:, 5:], x.reshape(-1)[: x.numel() - 3], x[:40].to(torch.bfloat16),
              x[:40].clamp(-60000, 60000).to(torch.float16), x[0, 0], torch.randn(3, 5, 64)]
    with torch_threads(threads):
        for value in inputs:
            fused = fmt.quantize(value)
            assert fused.shape == value.shape and fused.dtype == value.dtype
            assert_same(fused, NumberFormat.quantize(fmt, value))


@pytest.mark.parametrize("spec", ["mxfp8_e4m3(axis=1)", "mxint8(axis=1)", "mx(fp4_e2m1,block=16,axis=1)"])
@pytest.mark.parametrize("channels", [25, 32, 64, 70])
def test_fused_path_blocks_convolution_channels_in_place(spec: str, channels: int) -> None:
    """Blocks along the channel axis of conv activations (N, C, L) and weights (O, C, kh, kw): whole
    blocks and a shorter last one, at every block exponent, as the block formula gives them."""
    fmt = get(spec)
    rows = blocks_at_every_exponent(get(spec.replace("axis=1", "axis=-1")), per_exponent=2, seed=channels)
    values = rows.reshape(-1)[: rows.numel() // (channels * 6) * channels * 6]
    generator = torch.Generator().manual_seed(channels)
    typical = torch.randn(8, channels, 6, generator=generator) * 1e3
    sliced = torch.randn(3 * 2**17 // (channels * 4), channels, 4, generator=generator)  # several slices
    sliced[5, :, 1] = torch.randn(channels, generator=generator) * 1e-39  # subnormal: the reference redoes it
    for value in (values.reshape(-1, channels, 6), values.reshape(-1, channels, 3, 2), typical, sliced):
        assert_same(fmt.quantize(value), NumberFormat.quantize(fmt, value))


@pytest.mark.parametrize("spec", ["mxfp8_e4m3", "mxint8"])
def test_input_that_autograd_records_gets_the_same_values(spec: str) -> None:
    fmt = get(spec)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 100
    expected = fmt.quantize(x)
    recorded = fmt.quantize(x.clone().requires_grad_())
    assert recorded.requires_grad and torch.equal(recorded.detach(), expected)
    with torch.no_grad():
        assert torch.equal(fmt.quantize(x.clone().requires_grad_()), expected)
