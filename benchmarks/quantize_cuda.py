"""Quantize throughput on a CUDA device, side by side with a copy into a preallocated tensor.

    python benchmarks/quantize_cuda.py [--sizes 1e7,1e8] [--repeat 20]

The copy is the memory bound (one read, one write); a quantizer that reads x once and writes the
result once cannot beat it. Timing uses CUDA events around `repeat` calls after warm-up.
"""

from __future__ import annotations

import argparse

import torch

from dse.formats import get

SPECS = ("bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "int8", "posit8", "posit16", "lns8",
         "lns(16,gamma=256)", "mxfp8_e4m3", "mxfp4", "mxint8")


def time_s(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1e7,1e8")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'format':<20} {'size':>6} {'Gelem/s':>9} {'x copy':>8}")
    for size in (int(float(s)) for s in args.sizes.split(",")):
        x = torch.randn(size, device="cuda")
        out = torch.empty_like(x)
        copy_s = time_s(lambda out=out, x=x: out.copy_(x), args.repeat)
        print(f"{'copy_':<20} {size:>6.0e} {size / copy_s / 1e9:>9.2f} {1.0:>8.2f}")
        for spec in SPECS:
            fmt = get(spec)
            spent = time_s(lambda fmt=fmt, x=x: fmt.quantize(x), args.repeat)
            print(f"{spec:<20} {size:>6.0e} {size / spent / 1e9:>9.2f} {spent / copy_s:>8.2f}")


if __name__ == "__main__":
    main()
