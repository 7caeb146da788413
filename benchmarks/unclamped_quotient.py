"""The fixed-point family's per-tensor quantize with the clamp to the code range left out where it
cannot act (today: nearest rounding, a scale from a finite max|x|) against clamped always (before),
side by side in one process, over the quickstart MLP's tensors (40-256-256-10, batch 100: each
GEMM's input or error and each weight or weight gradient), alone (`quantize`) and stacked for a
group (`quantize_members`).

    PYTHONPATH=$PWD python benchmarks/unclamped_quotient.py
    PYTHONPATH=$PWD python benchmarks/unclamped_quotient.py --formats int8,int4 --sizes 1,3,12,32 --rounds 5
    PYTHONPATH=$PWD python benchmarks/unclamped_quotient.py --steps 40 --rounds 7   # a training step

Prints CPU microseconds of quantizing all six tensors of a step (G = 1: `quantize` of one run's
tensors; G > 1: `quantize_members` of the stacked ones), before / today and the ratio, best of the
rounds, one thread; both give the same bits (checked on every round here). With `--steps N`, CPU ms
of a whole training step of the quickstart's MLP alone instead (benchmarks/train_step.py's step: SGD,
batch 100, denormals flushed), before and today interleaved, median of the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = [(100, 40), (256, 40), (100, 256), (256, 256), (100, 256), (10, 256)]
"""One member's tensors: forward inputs x of each layer and its weights (gradients have these shapes)."""


@contextlib.contextmanager
def clamped_always() -> Iterator[None]:
    """Before: the clamp runs on every quotient."""
    from dse.formats.fixed import FixedPoint

    saved = FixedPoint.clamp_cannot_act_within_max
    FixedPoint.clamp_cannot_act_within_max = lambda self, rounding, dtype: False  # type: ignore[method-assign]
    try:
        yield
    finally:
        FixedPoint.clamp_cannot_act_within_max = saved  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="int8,int4")
    parser.add_argument("--sizes", default="1,3,12")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--steps", type=int, default=0, help="time a training step instead (steps per round)")
    args = parser.parse_args(argv)
    if args.steps:
        time_steps(args.formats.split(","), args.steps, args.rounds)
        return

    import torch

    from dse.formats import get

    torch.set_num_threads(1)
    print(f"CPU us of quantizing the MLP's six tensors (G = 1: quantize; G > 1: quantize_members of the "
          f"stack), nearest (best of {args.rounds} x {args.calls}, 1 thread)\n")
    print("| format | G | before us | today us | before / today |")
    print("|---|---|---|---|---|")
    for spec in args.formats.split(","):
        fmt = get(spec)
        for size in (int(s) for s in args.sizes.split(",")):
            generator = torch.Generator().manual_seed(size)
            if size == 1:
                tensors = [torch.randn(*shape, generator=generator) for shape in SHAPES]
                quantize = fmt.quantize
            else:
                tensors = [torch.randn(size, *shape, generator=generator) for shape in SHAPES]
                quantize = fmt.quantize_members

            best = {"before": float("inf"), "today": float("inf")}
            for _ in range(args.rounds):
                results = {}
                for name in best:
                    with clamped_always() if name == "before" else contextlib.nullcontext():
                        results[name] = [quantize(t) for t in tensors]  # (warm)
                        started = time.process_time()
                        for _ in range(args.calls):
                            for t in tensors:
                                quantize(t)
                        best[name] = min(best[name], (time.process_time() - started) / args.calls)
                assert all(torch.equal(a.view(torch.int32), b.view(torch.int32))
                           for a, b in zip(results["before"], results["today"], strict=True))
            before_us, today_us = best["before"] * 1e6, best["today"] * 1e6
            print(f"| {spec} | {size} | {before_us:.0f} | {today_us:.0f} | {before_us / today_us:.2f}x |",
                  flush=True)


def time_steps(specs: list[str], steps: int, rounds: int) -> None:
    """CPU ms of one training step of the MNIST-1D MLP alone per format, before / today, interleaved."""
    import statistics

    import torch

    from dse.data import load_dataset

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_step import make_step

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    data = load_dataset("mnist1d")
    print(f"CPU ms per training step, MNIST-1D MLP, batch 100, SGD (median of {rounds} x {steps}, "
          f"1 thread; the ratio's range over the rounds in brackets)\n")
    print("| format | before ms | today ms | before / today |")
    print("|---|---|---|---|")
    for spec in specs:
        made = {name: make_step(spec, "mlp", data, "mnist1d", 100, {"format": spec}, torch.device("cpu"))
                for name in ("before", "today")}
        times: dict[str, list[float]] = {name: [] for name in made}
        for _ in range(rounds + 1):  # the first round warms up
            for name, step in made.items():
                with clamped_always() if name == "before" else contextlib.nullcontext():
                    started = time.process_time()
                    for _ in range(steps):
                        step()
                    times[name].append((time.process_time() - started) / steps * 1e3)
        before, today = (statistics.median(times[name][1:]) for name in ("before", "today"))
        ratios = [b / t for b, t in zip(times["before"][1:], times["today"][1:], strict=True)]
        print(f"| {spec} | {before:.3f} | {today:.3f} | {before / today:.2f}x ({min(ratios):.2f}-"
              f"{max(ratios):.2f}x) |", flush=True)


if __name__ == "__main__":
    main()
