"""General block-scaled formats: NVFP4 bit for bit against torchao's NVFP4Tensor, the MX names as
aliases of block(...), the scale formats, elements from every family, and the spec errors.

torchao (`torchao.prototype.mx_formats.nvfp4_tensor`) quantizes 2-d float32 tensors along the last
axis in blocks of 16; its per-tensor scale is `per_tensor_amax_to_scale(max|x|)`. Where torchao is
not installed those comparisons skip; the rest of the file checks the rule against a float32 model
written here.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dse.errors import InputError
from dse.formats import get
from dse.formats.base import from_blocks, to_blocks
from dse.formats.block import BlockFormat

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def torchao_nvfp4() -> tuple[object, object]:
    logging.disable(logging.WARNING)  # torchao warns that its CUDA kernels do not load on a CPU
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    logging.disable(logging.NOTSET)
    return module.NVFP4Tensor, module.per_tensor_amax_to_scale


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal values with equal signs of zero (NaN equal to NaN)."""
    same = (actual == expected) & (torch.signbit(actual) == torch.signbit(expected)) | torch.isnan(
        actual
    ) & torch.isnan(expected)
    assert same.all(), (
        f"{int((~same).sum())} differ: got {actual[~same][:4].tolist()}, "
        f"expected {expected[~same][:4].tolist()}"
    )


def wide_blocks(rows: int, cols: int, low: int, high: int, seed: int) -> torch.Tensor:
    """Blocks of 16 whose maxima span 2^low..2^high, elements over 7 binades below their max."""
    generator = torch.Generator().manual_seed(seed)
    block_exponent = torch.randint(low, high, (rows, cols // 16, 1), generator=generator).float()
    element_exponent = torch.randint(-6, 1, (rows, cols // 16, 16), generator=generator).float()
    x = torch.randn(rows, cols // 16, 16, generator=generator) * 2.0 ** (block_exponent + element_exponent)
    return x.reshape(rows, cols)


def tie_blocks(seed: int) -> torch.Tensor:
    """Blocks whose max is 6 * s for an E4M3 value s, so that the block scale is s exactly, and whose
    other elements are e2m1 values, ties between them and ties +- one float32 ulp, times s."""
    generator = torch.Generator().manual_seed(seed)
    ties = (E2M1[1:] + E2M1[:-1]) / 2
    picks = torch.cat(
        [
            E2M1,
            ties,
            torch.nextafter(ties, torch.tensor(9.0)),
            torch.nextafter(ties, torch.tensor(0.0)),
            -ties,
        ]
    )
    scales = get("fp8_e4m3").values()
    scales = scales[(scales > 2.0**-6) & (scales < 448)]
    rows = []
    for scale in scales[torch.randint(0, scales.numel(), (24,), generator=generator)]:
        row = picks[torch.randint(0, picks.numel(), (16,), generator=generator)]
        row[0] = 6.0
        rows.append(row * scale)
    return torch.stack(rows).reshape(3, -1)


@pytest.mark.parametrize(("low", "high"), [(-3, 3), (-20, 20), (-60, 60), (-130, 120)])
def test_nvfp4_matches_torchao_bit_for_bit(low: int, high: int) -> None:
    nvfp4_tensor, amax_to_scale = torchao_nvfp4()
    x = torch.cat(
        [wide_blocks(48, 256, low, high, seed=low + 200), tie_blocks(seed=high).repeat(1, 32)[:, :256]]
    )
    two_level = nvfp4_tensor.to_nvfp4(x, per_tensor_scale=amax_to_scale(x.abs().amax())).dequantize(
        torch.float32
    )
    assert_same_bits(get("nvfp4").quantize(x), two_level)
    one_level = nvfp4_tensor.to_nvfp4(x).dequantize(torch.float32)
    assert_same_bits(get("nvfp4(tensor_scale=none)").quantize(x), one_level)
    assert get("nvfp4(tensor_scale=none)") == get("block(fp4_e2m1,size=16,scale=e4m3)")


def test_nvfp4_ties_round_to_even_elements() -> None:
    x = tie_blocks(seed=1)
    fmt = get("nvfp4(tensor_scale=none)")
    blocks, _, _ = to_blocks(x, -1, 16)
    scale = blocks.abs().amax(-1, keepdim=True) / 6  # exact: the block maxima are 6 s
    model = get("fp4_e2m1").quantize(blocks * torch.reciprocal(scale)) * scale
    assert_same_bits(fmt.quantize(x), from_blocks(model, tuple(x.shape), -1, 0))


def float32_model(fmt: BlockFormat, x: torch.Tensor) -> torch.Tensor:
    """The scale-grid rule written out in float32 for one row of blocks along the last axis."""
    grid = fmt.scale_grid
    blocks = x.reshape(-1, fmt.block_size)
    amax = blocks.abs().amax(-1, keepdim=True)
    element_max = torch.tensor(fmt.element.max, dtype=torch.float32)
    tensor_scale = torch.tensor(1.0)
    if fmt.tensor_scale:
        tensor_scale = amax.amax() / torch.tensor(grid.max * fmt.element.max, dtype=torch.float32)
    ratio = (amax / element_max / tensor_scale).clamp(2.0**grid.min_normal_exponent, grid.max)
    block_scale = grid.quantize(ratio)
    scaled = blocks * (torch.reciprocal(tensor_scale) / block_scale)
    elements = fmt.element.quantize(scaled.clamp(-fmt.element.max, fmt.element.max))
    if not fmt.element_has_negative_zero:  # an integer grid's zero is +0
        elements = elements + 0.0
    return (elements * (tensor_scale * block_scale)).reshape(x.shape)


@pytest.mark.parametrize(
    "spec",
    [
        "block(fp4_e2m1,size=16,scale=ue5m3)",
        "block(fp6_e2m3,size=32,scale=e4m3,tensor_scale=fp32)",
        "block(fp8_e4m3,size=8,scale=bf16)",
        "block(int4,size=16,scale=e4m3)",
        "block(posit8,size=16,scale=e4m3)",
        "block(p3109(8,4),size=16,scale=fp16)",
        "block(fp4_e2m1,size=16,scale=fp32)",
    ],
)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_scale_grid_blocks_follow_the_rule(spec: str, data: st.DataObject) -> None:
    fmt = get(spec)
    assert isinstance(fmt, BlockFormat) and get(fmt.spec) == fmt
    exponents = data.draw(
        st.lists(st.integers(-40, 40), min_size=fmt.block_size * 2, max_size=fmt.block_size * 2)
    )
    signs = data.draw(
        st.lists(st.sampled_from([-1.0, 1.0]), min_size=len(exponents), max_size=len(exponents))
    )
    fraction = data.draw(st.floats(1.0, 2.0, exclude_max=True))
    x = torch.tensor(
        [s * fraction * 2.0**e for s, e in zip(signs, exponents, strict=True)], dtype=torch.float32
    )
    assert_same_bits(fmt.quantize(x), float32_model(fmt, x))


@pytest.mark.parametrize(
    "spec", ["nvfp4", "block(fp6_e2m3,size=16,scale=ue5m3)", "block(int8,size=32,scale=e4m3)"]
)
def test_scale_grid_rule_holds_across_cpu_slices(spec: str) -> None:
    """Tensors of several cache-sized slices (the block maxima and the rounding run slice by slice
    into preallocated space, with the element's fused kernel for nearest) follow the same rule."""
    fmt = get(spec)
    x = wide_blocks(8 * 1024 + 3, 32, -40, 40, seed=11)  # 262240 elements: three slices of one thread
    x[5, :16] = 0.0
    x[7, 3] = -0.0
    assert_same_bits(fmt.quantize(x), float32_model(fmt, x))


def test_scale_grid_bit_stream_decodes_to_quantize() -> None:
    x = wide_blocks(8, 64, -30, 30, seed=3)
    for spec in ("nvfp4", "block(fp6_e3m2,size=16,scale=ue5m3)", "block(int8,size=32,scale=e4m3)"):
        fmt = get(spec)
        scale_codes, element_codes = fmt.encode_blocks(x)
        assert scale_codes.shape == (8, 64 // fmt.block_size) and (scale_codes >= 0).all()
        values = fmt.decode_blocks(scale_codes, element_codes, fmt.tensor_scale_of(x))
        expected = fmt.quantize(x)
        assert torch.equal(from_blocks(values, (8, 64), -1, 0).float(), expected)


def test_blocks_with_inf_or_nan_are_nan_and_zero_blocks_are_zero() -> None:
    x = torch.randn(4, 32)
    x[0, 3], x[1, 5] = math.inf, math.nan
    x[2] = 0.0
    for spec in ("nvfp4", "mxfp4(block=16)", "block(fp8_e4m3,size=16,scale=ue5m3)"):
        q = get(spec).quantize(x)
        assert torch.isnan(q[0, :16]).all() and torch.isnan(q[1, :16]).all()
        assert torch.isfinite(q[0, 16:]).all() and torch.equal(q[2], torch.zeros(32))


@pytest.mark.parametrize(
    ("alias", "general"),
    [
        ("mxfp8_e4m3", "block(fp8_e4m3,size=32,scale=e8m0)"),
        ("mxfp8_e5m2", "block(fp8_e5m2)"),
        ("mxfp6_e3m2", "block(fp6_e3m2)"),
        ("mxfp6_e2m3", "block(fp6_e2m3,scale=ue8m0)"),
        ("mxfp4", "block(fp4_e2m1)"),
        ("mxint8", "block(fixed(8,6,symmetric=1))"),
        ("mxfp4(block=16)", "block(fp4_e2m1,size=16)"),
        ("mxfp6_e2m3(axis=0,block=64)", "block(fp6_e2m3,size=64,axis=0)"),
        ("nvfp4", "block(fp(e=2,m=1,special=none),size=16,scale=fp8_e4m3,tensor_scale=fp32)"),
    ],
)
def test_named_block_formats_are_aliases_of_the_general_spec(alias: str, general: str) -> None:
    fmt = get(general)
    assert fmt == get(alias) and fmt.spec == alias and fmt.family == "block"
    x = wide_blocks(4, 128, -10, 10, seed=7)
    assert torch.equal(fmt.quantize(x), get(alias).quantize(x))


def test_other_block_sizes_are_blocks_by_hand() -> None:
    x = wide_blocks(6, 96, -8, 8, seed=4)
    for spec, size in (
        ("mxfp4(block=16)", 16),
        ("mxfp6_e2m3(block=8)", 8),
        ("nvfp4(tensor_scale=none,size=32)", 32),
    ):
        fmt = get(spec)
        by_hand = torch.cat([fmt.quantize(part) for part in x.split(size, dim=1)], dim=1)
        assert fmt.block_size == size and torch.equal(fmt.quantize(x), by_hand)


def test_elements_of_every_family_saturate_and_keep_their_grid() -> None:
    x = wide_blocks(4, 64, -5, 5, seed=9)
    for element in ("fp8_e5m2", "p3109(8,3)", "posit(8,0)", "lns8", "int(6)"):
        fmt = get(f"block({element},size=16,scale=e4m3)")
        q = fmt.quantize(x)
        blocks, _, _ = to_blocks(x, -1, 16)
        scaled = blocks * torch.reciprocal(fmt.block_scales(blocks.abs().amax(-1, keepdim=True)))
        grid = fmt.element.values().float()
        on_grid = torch.isin(fmt.round_unscaled(scaled, "nearest", None), grid)
        assert on_grid.all() and torch.isfinite(q).all()
    assert get("block(fp8_e5m2,scale=e4m3)").element.overflow == "saturate"
    assert get("block(p3109(8,3),scale=e4m3)").element.saturation == "satfinite"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("block(fp4_e2m1,size=0)", "size must be in 1..4096, got 0"),
        ("nvfp4(size=-3)", "size must be in 1..4096"),
        ("block(fp4_e2m1,scale=int8)", "scale int8 cannot hold the block maxima"),
        (
            "block(fp4_e2m1,scale=fp(e=2,m=0,special=none))",
            "cannot hold the block maxima: a block scale must reach below 1",
        ),
        ("block(fp4_e2m1,tensor_scale=fp32)", "tensor_scale=fp32 goes with a narrow block scale"),
        ("block(mxfp4)", "a block element is an unscaled grid"),
        ("block(fp4_e2m1,scale=e9m9)", "scale must be one of e8m0, e4m3"),
        ("block(size=16)", "block needs an element format"),
        ("block(fp4_e2m1,size=16", "expected NAME or NAME(ARGS)"),
    ],
)
def test_bad_block_specs_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(InputError, match="invalid format spec") as error:
        get(spec)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_conv_and_linear_training_block_along_the_reduction_axis() -> None:
    """The GEMM layers move the block axis to the channel axis for convolutions, for any block format."""
    from dse.train.layers import _on_axis
    from dse.train.policy import TensorQuant

    for spec in ("nvfp4", "block(fp6_e2m3,size=16,scale=ue5m3)"):
        quant = _on_axis(TensorQuant(get(spec)), 1)
        assert quant.format.scaling.axis == 1 and quant.format.scale == get(spec).scale


def ue5m3_value(code: int) -> float:
    """UE5M3 as an exact integer model: 8 bits, no sign; exponent field e (5 bits, bias 15) and
    mantissa m (3 bits); e = 0 is subnormal, m * 2^-17; code 0xFF is the only NaN, no inf."""
    if code == 0xFF:
        return math.nan
    e, m = code >> 3, code & 7
    return math.ldexp(m, -17) if e == 0 else math.ldexp(8 + m, e - 18)


def test_ue5m3_scale_grid_is_the_integer_model_over_every_code_and_tie() -> None:
    """Every UE5M3 code decodes to the model's value and encodes back; every midpoint between
    neighbouring values (and its float64 neighbours) rounds to the model's nearest, ties to the
    even code; block scales are those values."""
    fmt = get("block(fp4_e2m1,size=16,scale=ue5m3)")
    grid = fmt.scale_grid
    assert grid is not None and fmt.scale_bits == 8
    codes = torch.arange(256)
    expected = torch.tensor([ue5m3_value(c) for c in range(256)], dtype=torch.float64)
    decoded = grid.decode(codes)
    assert torch.equal(torch.isnan(decoded), torch.isnan(expected))
    assert torch.equal(decoded[:255], expected[:255])
    assert torch.equal(grid.encode(expected[:255]), codes[:255])
    assert grid.max == 114688.0 and grid.min_positive == 2.0**-17
    values = expected[:255]
    middles = (values[1:] + values[:-1]) / 2
    tie_codes = torch.arange(254)  # the midpoint between codes c and c + 1 goes to the even one
    nearest_even = torch.where(tie_codes % 2 == 0, values[:-1], values[1:])
    assert torch.equal(grid.round_unscaled(middles, "nearest", None), nearest_even)
    up = torch.nextafter(middles, torch.tensor(math.inf, dtype=torch.float64))
    down = torch.nextafter(middles, torch.tensor(0.0, dtype=torch.float64))
    assert torch.equal(grid.round_unscaled(up, "nearest", None), values[1:])
    assert torch.equal(grid.round_unscaled(down, "nearest", None), values[:-1])
    # Block scales: max|v| / 6 rounded onto UE5M3 (clamped to its smallest normal 2^-14 and max).
    normal = values[(values >= 2.0**-14)]
    amax = torch.cat([normal, middles[middles > 2.0**-14]]).double() * 6
    scales = fmt.block_scales(amax.reshape(-1, 1)).reshape(-1)
    model = grid.round_unscaled((amax / 6).clamp(2.0**-14, 114688.0), "nearest", None)
    assert torch.equal(scales, model) and bool(torch.isin(scales, values).all())



@pytest.mark.parametrize(("spec", "bound", "clamp_skipped"), [
    ("nvfp4(tensor_scale=none)", 7.0, True),  # E4M3 scales: |v * r| <= about 6.375 < 6 + 1
    ("block(fp6_e2m3,size=16,scale=ue5m3)", 7.75, False),  # ue5m3 rounds down: |v * r| passes 7.5 + 0.25
])
def test_scale_grid_skips_the_saturation_clamp_only_where_no_element_can_round_past_max(
        spec: str, bound: float, clamp_skipped: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The block sweep drops the element's overflow pass only where max|v| * r of every block lies
    below max + half the top step; either way it equals the reference formula bit for bit."""
    from dse.formats.fast import block as fast_block
    from dse.formats.fast import floating as fast_floating
    from dse.formats.fast import reference_only

    fmt = get(spec)
    assert fast_floating.overflow_bound(fmt.element) == bound
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(4096, 16, generator=generator) * torch.rand(4096, 1, generator=generator)
    choices: list[bool] = []
    choose = fast_block._skip_overflow_if_in_range

    def recorded(*args: Any) -> Any:
        kernel = choose(*args)
        choices.append(kernel is not args[1])
        return kernel

    monkeypatch.setattr(fast_block, "_skip_overflow_if_in_range", recorded)
    out = fmt.quantize(x)
    with reference_only():
        expected = fmt.quantize(x)
    assert choices == [clamp_skipped]
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))
