"""Quantizing where the CPU flushes denormals (`torch.set_flush_denormal(True)`, as training runs):
the results are the reference's, the same quantize with gradual underflow, with the denormals of
its input and output flushed to zero of the same sign. No NaN appears, a block of zeros gives zeros.

The block scale 2^-127 of E8M0 (a block whose max|v| is 0 or tiny), a per-tensor or per-channel
scale max|x| / max of a tiny tensor or channel, and the fp32 tensor scale of NVFP4 of a tiny tensor
are float32 subnormals, which such a CPU reads as 0: 0 / 0 gave NaN and training diverged at its first
batch. The reference runs with denormals kept; these tests fail where a scaled path reads a flushed
scale.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from dse.formats import get

FLOAT32_MIN_NORMAL = 2.0**-126
ROUNDINGS = ("nearest", "stochastic", "stochastic(4)", "pseudo_stochastic", "toward_zero")
BLOCK_FORMATS = (
    "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "mxint8", "mxfp4(block=16)",
    "nvfp4", "nvfp4(tensor_scale=none)", "block(fp4_e2m1,size=16,scale=ue4m3,tensor_scale=fp32)",
    "block(fp4_e2m1,size=16,scale=ue5m3)", "block(fp8_e4m3,size=32,scale=ue5m3,tensor_scale=fp32)",
    "block(fp4_e2m1,size=16,scale=fp32)", "block(posit(8,0),size=32)",
    "block(lns(8,gamma=8,scale=none),size=32)", "block(int8,size=32)", "block(p3109(8,3),size=32)",
    "block(fixed(8,4),size=8)",
)
SCALED_FORMATS = (
    "int8", "int4", "int(8,pow2=1)", "int8(scale=channel)", "int8(scale=block)", "fp8_e4m3(scale=tensor)",
    "fp8_e4m3(scale=tensor,pow2=1)", "fp8_e4m3(scale=channel)", "fp8_e5m2(scale=channel,pow2=1)",
    "fp8_e4m3(scale=block,block=16)", "p3109(8,3,scale=tensor)", "posit(8,0,scale=tensor)", "lns8",
    "lns(8,scale=channel)",
)


@contextlib.contextmanager
def denormals_flushed() -> Iterator[None]:
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def flushed(t: torch.Tensor) -> torch.Tensor:
    """t with its float32 subnormals replaced by zeros of their sign."""
    return torch.where(t.abs() < FLOAT32_MIN_NORMAL, torch.zeros_like(t).copysign(t), t)


def inputs() -> dict[str, torch.Tensor]:
    """Rows of 128 (blocks of 8..32 lie within a row; channels are rows) at the edges of float32."""
    generator = torch.Generator().manual_seed(1)
    mixed = torch.randn(6, 128, generator=generator)
    mixed[0, :64] = 0  # blocks of zeros
    mixed[1, :64] *= 2.0**-122  # tiny blocks: E8M0 scale 2^-127
    mixed[1, 64:96] = 2.0**-126 * (1 + mixed[1, 64:96].abs()) * mixed[1, 64:96].sign()
    mixed[2, :32] *= 2.0**120  # huge blocks
    mixed[3, :16] = 0
    mixed[3, 3] = 2.0**-130  # a subnormal input
    mixed[5, 5], mixed[5, 40] = float("inf"), float("nan")
    tiny = torch.randn(4, 64, generator=generator) * 2.0**-122  # tiny tensors and channels
    tiny[0, :32] = 0
    tiny[1] *= 2.0**-3
    tiny[2] = 2.0**-126 * torch.rand(64, generator=generator).add(1)
    huge = torch.randn(4, 64, generator=generator) * 2.0**125
    huge[0, :32] = 0
    huge[1, :32] = torch.finfo(torch.float32).max
    return {"mixed": mixed, "tiny": tiny, "huge": huge}


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    same = ((actual == expected) & (torch.signbit(actual) == torch.signbit(expected))
            | torch.isnan(actual) & torch.isnan(expected))
    assert same.all(), (f"{int((~same).sum())} differ: got {actual[~same][:4].tolist()}, expected "
                        f"{expected[~same][:4].tolist()}")


def check_flushed_equals_reference(spec: str, rounding: str, members: bool) -> None:
    fmt = get(spec)

    def run(x: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(7)
        if members:
            return fmt.quantize_members(x, rounding, generator)
        return fmt.quantize(x, rounding, generator)

    for name, x in inputs().items():
        reference = flushed(run(flushed(x)))
        with denormals_flushed():
            actual = run(x)
        assert not torch.isnan(actual[~torch.isnan(reference)]).any(), name
        assert_same_bits(actual, reference)


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("spec", BLOCK_FORMATS)
def test_block_formats_with_denormals_flushed_give_the_reference_flushed(spec: str, rounding: str) -> None:
    check_flushed_equals_reference(spec, rounding, members=False)


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("spec", SCALED_FORMATS)
def test_tensor_and_channel_scales_with_denormals_flushed_give_the_reference_flushed(spec: str, rounding: str
                                                                                     ) -> None:
    check_flushed_equals_reference(spec, rounding, members=False)


@pytest.mark.parametrize("spec", ("mxfp8_e4m3", "mxint8", "nvfp4", "int8", "fp8_e4m3(scale=channel)", "lns8"))
def test_member_scales_with_denormals_flushed_give_the_reference_flushed(spec: str) -> None:
    check_flushed_equals_reference(spec, "stochastic", members=True)


def test_a_zero_row_in_a_block_format_stays_zero_with_denormals_flushed() -> None:
    """The lead's reproduction: a weight-gradient-like row of zeros, stochastic rounding."""
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 1e-2
    x[1, :32] = 0
    with denormals_flushed():
        q = get("mxfp8_e4m3").quantize(x, "stochastic")
    assert not torch.isnan(q).any()
    assert (q[1, :32] == 0).all()
