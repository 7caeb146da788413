"""On the device path (what a GPU runs), quantizing never makes the host wait: no value read back, no
output sized by the data, no tensor made from host data, for every family, scaling and rounding, alone
and per member; and the device path gives the CPU path's results bit for bit.

`dse.formats.fast.device_path()` makes CPU tensors take the device path (`host_shortcuts` is False),
and the `host_syncs` fixture counts what would synchronise a GPU (tests/support/host_syncs.py), so this
runs on a machine without one. Each call runs once first: caches built on a first call (constants,
lookup tables, plans) are built once per format and device, not per step.
"""

from __future__ import annotations

import math

import pytest
import torch

from dse.formats import ZOO, get
from dse.formats.base import MemberGenerators, NumberFormat, to_blocks
from dse.formats.fast import FAST_PATHS, device_path, host_shortcuts
from dse.train.denormals import flushes_denormals

EXTRA = ["int8(scale=channel,axis=0)", "int8(pow2=1)", "fp8_e4m3(scale=tensor)", "posit8(scale=tensor)",
         "lns(12,gamma=16,pow2=1)", "lns(8,gamma=8)", "fp(e=4,m=3,subnormals=0)", "block(fp6_e2m3,16,ue5m3)",
         "mxfp8_e4m3(axis=1)", "fp8_e5m2(scale=tensor,pow2=1)", "p3109(8,3,scale=tensor)"]
SPECS = list(dict.fromkeys(get(spec).spec for spec in [*ZOO, *EXTRA]))
ROUNDINGS = ("nearest", "stochastic", "stochastic(5)", "pseudo_stochastic", "toward_zero")
MEMBERS = 3


def quantize(fmt: NumberFormat, x: torch.Tensor, rounding: str, members: bool) -> torch.Tensor:
    if members:
        generators = MemberGenerators([torch.Generator().manual_seed(seed) for seed in range(MEMBERS)])
        return fmt.quantize_members(x.reshape(MEMBERS, -1, x.shape[-1]), rounding, generators)
    return fmt.quantize(x, rounding, torch.Generator().manual_seed(0))


def test_the_device_path_is_one_switch() -> None:
    cpu = torch.device("cpu")
    assert host_shortcuts(cpu)
    with device_path():
        assert not host_shortcuts(cpu)
    assert host_shortcuts(cpu)


def test_host_syncs_catches_every_kind_of_wait(host_syncs: type) -> None:
    """The counter sees each way code makes the host wait (else 'no syncs' would prove nothing)."""
    x = torch.tensor([1.0, -2.0, 3.0])
    waits = [lambda: x.sum().item(), lambda: bool(x.any()), lambda: float(x.max()), lambda: x.tolist(),
             lambda: torch.nonzero(x), lambda: x[x > 0], lambda: torch.tensor([1.0, 2.0]), lambda: x.cpu(),
             lambda: x.to("cpu"), lambda: x.unique(), lambda: torch.equal(x, x)]
    for wait in waits:
        with host_syncs() as seen:
            wait()
        assert len(seen.syncs) >= 1
    with host_syncs() as seen:
        torch.where(x > 0, x * 2, x.abs()).amax().sqrt()
    assert seen.syncs == []


@pytest.mark.parametrize("spec", SPECS)
def test_quantize_on_the_device_path_never_waits_for_the_device(spec: str, host_syncs: type) -> None:
    x = torch.randn(6, 96, generator=torch.Generator().manual_seed(1))
    x[0, :40] *= 2.0**-140  # blocks and members whose scale leaves float32's normals
    x[1] *= 2.0**100
    fmt = get(spec)  # (one object, as training keeps it: what it caches on itself is built once)
    for rounding in ROUNDINGS:
        for dtype in (torch.float32, torch.float64):
            for members in (False, True):
                with device_path():
                    quantize(fmt, x.to(dtype), rounding, members)
                    with host_syncs() as seen:
                        quantize(fmt, x.to(dtype), rounding, members)
                assert not seen.syncs, f"{spec} {rounding} {dtype} members={members}:\n{seen.report()}"


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a == b) & (torch.signbit(a) == torch.signbit(b)) | torch.isnan(a) & torch.isnan(b)).all())


def _probe(dtype: torch.dtype) -> torch.Tensor:
    """Rows of every exponent (so scales of every size, below and above float32's normals), ties at
    powers of two, zeros, inf and NaN."""
    generator = torch.Generator().manual_seed(4)
    exponent = torch.randint(-150, 127, (63, 1), generator=generator).double()
    extremes = [-150, -149, -140, -135, -130, -128, -127, -126, -125, -120, 100, 120, 124, 125, 126, 127]
    exponent[:16, 0] = torch.tensor(extremes)  # the extremes of E8M0 and of float32
    x = torch.randn(63, 96, generator=generator, dtype=torch.float64) * torch.exp2(exponent)
    x *= torch.exp2(-torch.randint(0, 20, x.shape, generator=generator).double())
    x[3] = 0.0
    x[5, 7], x[6, 9], x[7, 3] = math.inf, math.nan, -math.inf
    x[8] = 1.5 * 2.0 ** torch.arange(-48, 48).double()
    return x.to(dtype)


QUANTIZE_SPECS = sorted({spec for path in FAST_PATHS.values() if path.operation == "quantize"
                         for spec in path.formats} | set(SPECS))


@pytest.mark.parametrize("flush", [False, True], ids=["subnormals", "flushed"])
@pytest.mark.parametrize("spec", QUANTIZE_SPECS)
def test_the_device_path_gives_the_cpu_paths_bits(spec: str, flush: bool) -> None:
    """Every family, scaling and rounding, float32 and float64, alone and per member, with denormals
    kept and flushed (as training runs; float32 there, the dtype training runs in: the CPU's cast of
    float64 into fp32 flushes a float32 subnormal that float64 holds): the device path equals the
    CPU path (whose fast paths equal the references: test_fast_paths.py)."""
    previous = flushes_denormals()
    torch.set_flush_denormal(flush)
    fmt = get(spec)
    try:
        for dtype in (torch.float32,) if flush else (torch.float32, torch.float64):
            x = _probe(dtype)
            for rounding in ROUNDINGS:
                for members in (False, True):
                    cpu = quantize(fmt, x, rounding, members)
                    with device_path():
                        device = quantize(fmt, x, rounding, members)
                    assert _same_bits(device, cpu), f"{spec} {rounding} {dtype} members={members}"
    finally:
        torch.set_flush_denormal(bool(previous))


@pytest.mark.parametrize("spec", ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp4", "mxint8",
                                  "mxfp4(block=16)"])
def test_e8m0_scales_need_no_exact_fallback_where_subnormals_are_kept(spec: str) -> None:
    """Why the device path divides MX blocks in float32 (`float32_holds_scales_on`): with float32
    subnormals kept, as CUDA keeps them, one float32 division and product by the E8M0 scale equal
    the exact float64 path for blocks whose max|v| has every float32 exponent (scales 2^-127 to
    2^127), in every rounding."""
    fmt = get(spec)
    assert fmt.float32_holds_scales_on(torch.device("cuda")) and not fmt.float32_holds_scales_on(
        torch.device("cpu"))
    x = _probe(torch.float32)
    blocks, _, _ = to_blocks(x, fmt.scaling.axis, fmt.scaling.block_size)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    previous = flushes_denormals()
    torch.set_flush_denormal(False)
    try:
        for rounding in ROUNDINGS:
            scale = fmt.divisor_from_amax(amax)
            in_float32 = fmt.round_unscaled(blocks / scale, rounding, torch.Generator().manual_seed(1))
            in_float32.mul_(scale)
            exact = fmt.round_by_float32_scale_values(blocks, fmt.float32_scale_values(amax), rounding,
                                                      torch.Generator().manual_seed(1))
            assert _same_bits(in_float32, exact), f"{spec} {rounding}"
    finally:
        torch.set_flush_denormal(bool(previous))
