"""A group's per-tensor quantize with the quotient x / scale rounded in place (today) against rounded
into a second tensor (before: `round_unscaled` instead of `round_unscaled_`), side by side in one
process, over the quickstart MLP's stacked tensors (40-256-256-10, batch 100: each GEMM's input or
error and each weight or weight gradient, per member).

    PYTHONPATH=$PWD python benchmarks/quantize_in_place.py
    PYTHONPATH=$PWD python benchmarks/quantize_in_place.py --formats int8 --sizes 3,12,32 --rounds 5

Prints CPU microseconds of one `quantize_members` over all six tensors of a step, before / today and
the ratio, best of the rounds, one thread; both give the same bits (checked on every call here).
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
def rounding_into_a_second_tensor() -> Iterator[None]:
    """Every format's round_unscaled_ as round_unscaled: the quotient rounded into a new tensor.

    The families that round in place get NumberFormat's round_unscaled_, which calls the format's own
    round_unscaled (each class's round_unscaled put in its place would give the others NumberFormat's
    abstract one, which returns None)."""
    from dse.formats.base import NumberFormat

    patched = [cls for cls in _subclasses(NumberFormat) if "round_unscaled_" in vars(cls)]
    saved = {cls: vars(cls)["round_unscaled_"] for cls in patched}
    for cls in patched:
        cls.round_unscaled_ = NumberFormat.round_unscaled_  # type: ignore[method-assign]
    try:
        yield
    finally:
        for cls, method in saved.items():
            cls.round_unscaled_ = method  # type: ignore[method-assign]


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="int8,int4")
    parser.add_argument("--sizes", default="3,12")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args(argv)

    import torch

    from dse.train.config import TrainConfig
    from dse.train.policy import QuantPolicy, TensorQuant

    torch.set_num_threads(1)
    print(f"CPU us of quantize_members over the MLP's six stacked tensors (best of {args.rounds} x "
          f"{args.calls}, 1 thread)\n")
    print("| format | G | before us | today us | before / today |")
    print("|---|---|---|---|---|")
    for spec in args.formats.split(","):
        quant = QuantPolicy.from_config(TrainConfig(model="mlp", dataset="mnist1d", format=spec)).activations
        for size in (int(s) for s in args.sizes.split(",")):
            generator = torch.Generator().manual_seed(size)
            tensors = [torch.randn(size, *shape, generator=generator) for shape in SHAPES]

            def step(quant: TensorQuant = quant, tensors: list[torch.Tensor] = tensors) -> list[torch.Tensor]:
                return [quant.members(t) for t in tensors]

            best = {"before": float("inf"), "today": float("inf")}
            for _ in range(args.rounds):
                for name in best:
                    with rounding_into_a_second_tensor() if name == "before" else contextlib.nullcontext():
                        outputs = step()  # (warm)
                        started = time.process_time()
                        for _ in range(args.calls):
                            step()
                        best[name] = min(best[name], (time.process_time() - started) / args.calls)
                    if name == "before":
                        reference = outputs
                    else:
                        assert all(torch.equal(a.view(torch.int32), b.view(torch.int32))
                                   for a, b in zip(reference, outputs, strict=True))
            print(f"| {spec} | {size} | {best['before'] * 1e6:.0f} | {best['today'] * 1e6:.0f} | "
                  f"{best['before'] / best['today']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
