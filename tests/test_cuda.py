"""The CUDA path agrees bit for bit with the CPU path, which the per-family tests check against references.

Skipped where no GPU is present (CI). Every format family takes the same torch code on CUDA except the
CPU-only shortcuts (torch's own casts, cache-sized slicing), so agreement here means the device path
is as exact as the CPU one: every grid value, every tie between neighbours and one float ulp either
side, random inputs over the whole range, specials, and each scaling kind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import pytest
import torch

from dse.formats import ZOO, Scaling, get

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

EXTRA = ["fp(e=5,m=2)", "int(4)", "posit(16,1)", "posit(12,3)", "posit(24,2)", "lns(8,gamma=8)",
         "lns(6,gamma=2)", "lns(12,gamma=16,underflow=saturate)", "fp8_e4m3(overflow=saturate)",
         "fp(e=4,m=3,subnormals=0)", "fixed(8,4)", "int8(scale=channel,axis=0)", "int8(pow2=1)",
         "fp8_e4m3(scale=tensor)", "posit8(scale=tensor)"]
SPECS = list(dict.fromkeys(get(spec).spec for spec in [*ZOO, *EXTRA]))
EXACT_MODES = ("nearest", "toward_zero", "pseudo_stochastic")


def unscaled(spec: str):  # type: ignore[no-untyped-def]
    fmt = get(spec)
    return dataclasses.replace(fmt, scaling=Scaling())


def probe_inputs(spec: str, dtype: torch.dtype) -> torch.Tensor:
    """Grid values, midpoints and one ulp either side (formats up to 16 bits), random values, specials."""
    fmt = unscaled(spec)
    parts = []
    if fmt.bits <= 16:
        grid = fmt.values().to(torch.float64)
        mids = (grid[1:] + grid[:-1]) / 2
        for points in (grid, mids):
            p = points.to(dtype)
            parts += [p, torch.nextafter(p, torch.full_like(p, math.inf)),
                      torch.nextafter(p, torch.full_like(p, -math.inf))]
    gen = torch.Generator().manual_seed(0)
    low, high = math.log2(fmt.min_positive) - 3, math.log2(fmt.max) + 2
    exps = torch.rand(200_000, generator=gen, dtype=torch.float64) * (high - low) + low
    signs = torch.where(torch.rand(200_000, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    parts.append((signs * torch.exp2(exps)).to(dtype))
    parts.append(torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, fmt.max, -fmt.max,
                               fmt.min_positive, fmt.min_positive / 2, fmt.max * 1.5], dtype=dtype))
    return torch.cat([p.to(dtype) for p in parts])


def mismatches(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Flat indices where a and b differ in value, sign or NaN-ness."""
    return torch.nonzero(~same_elementwise(a.cpu().reshape(-1), b.cpu().reshape(-1))).reshape(-1)


def same_elementwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (torch.isnan(a) & torch.isnan(b)) | ((a == b) & (torch.signbit(a) == torch.signbit(b)))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return mismatches(a, b).numel() == 0


def describe(x: torch.Tensor, cpu: torch.Tensor, cuda: torch.Tensor) -> str:
    bad = mismatches(cpu, cuda)[:4]
    flat = [t.cpu().reshape(-1) for t in (x, cpu, cuda)]
    rows = [f"x={flat[0][i].item()!r} cpu={flat[1][i].item()!r} cuda={flat[2][i].item()!r}" for i in bad]
    return f"{mismatches(cpu, cuda).numel()} mismatches: " + "; ".join(rows)


def check_neighbours(grid, x: torch.Tensor, cpu: torch.Tensor, got: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    bad = mismatches(cpu, got)
    assert bad.numel() <= x.numel() // 100, describe(x, cpu, got)
    low = grid.quantize(x, rounding="toward_zero").reshape(-1)[bad].abs()
    step_up = grid.quantize(low * 2.0 ** (1 / grid.gamma), rounding="nearest")
    high = torch.where(low == 0, grid.min_positive, step_up).clamp(max=grid.max)
    picked = got.reshape(-1)[bad].abs()
    assert bool(torch.all((picked == low) | (picked == high))), describe(x, cpu, got)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_quantize_on_cuda_matches_cpu_bit_for_bit(spec: str, dtype: torch.dtype) -> None:
    fmt = get(spec)
    if fmt.bits > 24 and dtype == torch.float32 and fmt.family == "fp":
        pytest.skip("fp32 into fp32 is the identity")
    x = probe_inputs(spec, dtype)
    if fmt.scaling.kind == "channel":
        x = x[: (x.numel() // 64) * 64].reshape(64, -1)
    for mode in EXACT_MODES:
        for grid in (fmt, unscaled(spec)):
            cpu = grid.quantize(x, rounding=mode)
            cuda = grid.quantize(x.cuda(), rounding=mode)
            assert cuda.device.type == "cuda" and cuda.dtype == dtype
            if grid.family == "lns" and mode == "pseudo_stochastic":
                # The decision reads the low bits of a float64 log2, which CPU and CUDA libm may
                # compute an ulp apart: rarely, they pick different neighbours (checked unscaled).
                if grid.scaling.kind == "none":
                    check_neighbours(grid, x, cpu, cuda.cpu())
                continue
            assert same_bits(cpu, cuda), f"{grid.spec} {mode} {dtype}: {describe(x, cpu, cuda)}"


@pytest.mark.parametrize("spec", [s for s in SPECS if get(s).bits <= 16])
def test_encode_decode_on_cuda_match_cpu(spec: str) -> None:
    fmt = unscaled(spec)
    codes = torch.arange(2**fmt.bits, dtype=torch.int64)
    assert same_bits(fmt.decode(codes), fmt.decode(codes.cuda()))
    x = probe_inputs(spec, torch.float32)
    finite = x[torch.isfinite(fmt.quantize(x))]
    q = fmt.quantize(finite)
    assert torch.equal(fmt.encode(q), fmt.encode(q.cuda()).cpu())


@pytest.mark.parametrize("spec", ["fp8_e4m3", "int8", "posit16", "lns8", "mxfp4", "mxint8"])
def test_stochastic_rounding_on_cuda_is_seeded_and_unbiased(spec: str) -> None:
    fmt = get(spec)
    x = torch.full((400_000,), 0.3, device="cuda")
    x[0] = 1.0  # fixes the per-tensor scale; blocks after the first hold 0.3 alone
    draws = [fmt.quantize(x, "stochastic", torch.Generator("cuda").manual_seed(7)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    values = draws[0][32:].double()
    low, high = values.min().item(), values.max().item()
    assert low <= 0.3 <= high and len(torch.unique(values)) <= 2
    spread = (high - low) / math.sqrt(values.numel())
    assert abs(values.mean().item() - 0.3) < 6 * spread + 1e-12


def test_mx_blocks_on_cuda_match_cpu() -> None:
    fmt = get("mxfp8_e4m3")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 96, generator=gen) * torch.exp2(torch.randint(-20, 20, (64, 1), generator=gen))
    scales, elements = fmt.encode_blocks(x)
    scales_gpu, elements_gpu = fmt.encode_blocks(x.cuda())
    assert torch.equal(scales, scales_gpu.cpu()) and torch.equal(elements, elements_gpu.cpu())
    assert same_bits(fmt.decode_blocks(scales, elements), fmt.decode_blocks(scales_gpu, elements_gpu))


@pytest.mark.parametrize("spec", ["mxfp8_e4m3", "mxfp4", "mxint8", "mxfp6_e3m2", "mxfp8_e5m2"])
def test_mx_blocks_of_every_exponent_on_cuda_match_cpu(spec: str) -> None:
    """Blocks whose max|v| has every float32 exponent field, so E8M0 scales from 2^-127 (a float32
    subnormal, which the device path divides by in float32: CUDA keeps subnormals) to 2^127, with
    elements 30 binades below the max, zeros, inf and NaN."""
    fmt = get(spec)
    gen = torch.Generator().manual_seed(3)
    field = torch.arange(255).repeat_interleave(4)
    top = torch.where(field > 0, 2.0 ** (field - 127).double(), 2.0**-140)
    x = torch.randn(field.numel(), 96, generator=gen, dtype=torch.float64)
    x = x / x.abs().amax(dim=1, keepdim=True) * top[:, None]
    x = (x * 2.0 ** -torch.randint(0, 30, x.shape, generator=gen).double()).float()
    x[::13] = 0.0
    x[2::19, 5] = math.inf
    x[3::23, 7] = math.nan
    for mode in ("nearest", "toward_zero"):
        cpu, cuda = fmt.quantize(x, mode), fmt.quantize(x.cuda(), mode)
        assert same_bits(cpu, cuda), f"{spec} {mode}: {describe(x, cpu, cuda)}"


@pytest.mark.parametrize("spec", ["mxfp8_e4m3", "mxfp4", "mxint8"])
@pytest.mark.parametrize("shape", [(8, 70, 5, 3), (4, 64, 9), (6, 25, 4, 4)])
def test_mx_convolution_channel_blocks_on_cuda_match_cpu(spec: str, shape: tuple[int, ...]) -> None:
    """Blocks along a conv's channel axis (1), a short last block included, as the training layers use."""
    fmt = get(spec)
    fmt = dataclasses.replace(fmt, scaling=dataclasses.replace(fmt.scaling, axis=1))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=gen) * torch.exp2(torch.randint(-30, 30, (shape[0], 1, *shape[2:]),
                                                                     generator=gen).float())
    cpu, cuda = fmt.quantize(x), fmt.quantize(x.cuda())
    assert same_bits(cpu, cuda), f"{spec} {shape}: {describe(x, cpu, cuda)}"


TRAINING = [
    {"format": "int8"}, {"format": "fp8_e4m3"}, {"format": "posit(16,1)", "layer_scaling": True},
    {"format": "mxfp8_e4m3"}, {"format": "lns8", "optimizer": "lns-madam", "master_weights": False},
    {"format": "int8", "optimizer": "niti"}, {"weights": "fp8_e4m3", "activations": "fp8_e4m3",
                                              "gradients": "fp8_e5m2", "optimizer": "adam"},
]


@contextlib.contextmanager
def _callers_tf32() -> Iterator[None]:
    """A caller who let cuBLAS matmuls and cuDNN convolutions run in TF32 (a run's own settings make
    them IEEE fp32: dse/train/fp32.py); torch's defaults leave convolutions in TF32 already."""
    levels = [torch.backends.cuda.matmul, torch.backends.cudnn.conv]
    before = [level.fp32_precision for level in levels]
    for level in levels:
        level.fp32_precision = "tf32"
    try:
        yield
    finally:
        for level, precision in zip(levels, before, strict=True):
            level.fp32_precision = precision


@pytest.mark.parametrize("overrides", TRAINING, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_training_on_cuda_is_reproducible_and_learns_like_the_cpu(overrides: dict) -> None:
    from dse.train import TrainConfig, train

    config = TrainConfig(model="mlp", dataset="digits", epochs=3, **overrides)
    gpu = train(config.replace(device="cuda"))
    with _callers_tf32():
        again = train(config.replace(device="cuda"))
    cpu = train(config)
    assert not gpu.diverged and gpu.test_accuracy > 0.5
    assert gpu.loss_curve == again.loss_curve
    assert abs(gpu.test_accuracy - cpu.test_accuracy) < 0.1


PROXY_TRAINING = [
    ("cnn", "mnist1d", 3, {"format": "mxfp8_e4m3"}),
    ("cnn", "mnist1d", 3, {"format": "int8", "optimizer": "niti"}),
    ("resnet", "digits", 1, {"format": "lns8", "optimizer": "lns-madam", "master_weights": False}),
    ("resnet", "digits", 1, {"format": "posit(16,1)", "layer_scaling": True}),
    ("transformer", "sort-easy", 1, {"format": "fp8_e4m3", "gradients": "fp8_e5m2", "batch_size": 128}),
    ("transformer", "sort-easy", 1, {"format": "mxfp8_e4m3", "batch_size": 128}),
]


def _case_id(value: object) -> str:
    return "-".join(map(str, value.values())) if isinstance(value, dict) else str(value)


@pytest.mark.parametrize(("model", "dataset", "epochs", "overrides"), PROXY_TRAINING, ids=_case_id)
def test_every_proxy_trains_on_cuda_reproducibly(model: str, dataset: str, epochs: int,
                                                 overrides: dict) -> None:
    """Convolutions (MX blocks along channels, NITI's integer convs), residual blocks and attention on
    the device: two runs give the same loss curve (the second under a caller's TF32 settings, which a
    run turns off), and the last epoch's loss is the CPU's within 10 %
    (the GEMMs sum in another order and the draws come from another generator)."""
    from dse.train import TrainConfig, train

    config = TrainConfig(model=model, dataset=dataset, epochs=epochs, **overrides)
    gpu = train(config.replace(device="cuda"))
    with _callers_tf32():
        again = train(config.replace(device="cuda"))
    cpu = train(config)
    assert not gpu.diverged and gpu.loss_curve == again.loss_curve
    assert abs(gpu.loss_curve[-1] - cpu.loss_curve[-1]) <= 0.1 * cpu.loss_curve[-1], (gpu.loss_curve,
                                                                                         cpu.loss_curve)
