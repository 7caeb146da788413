"""Where one stacked fp32 Linear's time goes (dse/train/stacked.py): its forward and backward as a group
trains it, against a member's nn.Linear alone, with two ablations, interleaved in one process, CPU
microseconds, best of rounds, one thread.

    PYTHONPATH=$PWD python benchmarks/stacked_linear.py         # the quickstart and digits MLPs' layers
    PYTHONPATH=$PWD python benchmarks/stacked_linear.py --sizes 3,8 --rounds 7 --calls 1000

Columns: `alone` a member's nn.Linear (addmm and its native backward); `group` the StackedGemmLayer as
a group trains it (folded input, `QuantGemm` over `StackedLinearOp`, each of its three GEMMs asking
`sums_as_members` whether the batched call sums as each member's own); `no decision` the same with
that question skipped (the batched call taken at once: what the decision costs); `GEMMs only` the
three batched calls and the bias sum alone, in a bare autograd.Function on unfolded operands (what
the layer's bookkeeping - module call, fold views, QuantGemm's quantizer checks - costs beyond its
arithmetic). The ablations are for timing only: the group's path is the one that stays bit for bit.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dse.train.stacked as stacked  # noqa: E402

LAYERS = {"tiny 8 x 24 -> 24": (8, 24, 24), "mnist1d 100 x 40 -> 256": (100, 40, 256),
          "mnist1d 100 x 256 -> 256": (100, 256, 256), "mnist1d 100 x 256 -> 10": (100, 256, 10),
          "digits 64 x 64 -> 128": (64, 64, 128), "digits 64 x 128 -> 10": (64, 128, 10)}
"""(rows, in, out) of the layers timed: the quickstart's MNIST-1D MLP (batch 100) and the digits MLP (64)."""


class _BareGemms(torch.autograd.Function):
    """The stacked Linear's three batched GEMMs and bias sum, nothing around them."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, weight = ctx.saved_tensors
        return torch.bmm(dy, weight), torch.bmm(dy.transpose(1, 2), x), dy.sum(1)


@contextlib.contextmanager
def no_decision() -> Iterator[None]:
    """member_gemm takes the batched call without asking `sums_as_members` (timing only)."""
    member_gemm = stacked.member_gemm
    stacked.member_gemm = stacked._batched_gemm  # type: ignore[assignment]
    try:
        yield
    finally:
        stacked.member_gemm = member_gemm  # type: ignore[assignment]


def microseconds(step: Callable[[], object], calls: int) -> float:
    started = time.process_time()
    for _ in range(calls):
        step()
    return (time.process_time() - started) / calls * 1e6


Step = tuple[Callable[[], object], Callable[[], contextlib.AbstractContextManager[None]]]


def layer_steps(rows: int, features: int, out: int, members: int) -> dict[str, Step]:
    """Each column's forward + backward of one layer (and the context it runs in)."""
    alone = nn.Linear(features, out)
    x_alone, dy_alone = torch.randn(rows, features, requires_grad=True), torch.randn(rows, out)
    layer = stacked.StackedGemmLayer([nn.Linear(features, out) for _ in range(members)], members, None,
                                     stacked._STACKED_LINEAR)
    x, dy = torch.randn(members * rows, features, requires_grad=True), torch.randn(members * rows, out)
    x3, dy3 = x.detach().view(members, rows, features).requires_grad_(), dy.view(members, rows, out)
    return {"alone": (lambda: alone(x_alone).backward(dy_alone), contextlib.nullcontext),
            "group": (lambda: layer(x).backward(dy), contextlib.nullcontext),
            "no decision": (lambda: layer(x).backward(dy), no_decision),
            "GEMMs only": (lambda: _BareGemms.apply(x3, layer.weight, layer.bias).backward(dy3),
                           contextlib.nullcontext)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="3,8")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"CPU us of one forward + backward (input, weight and bias gradients), best of {args.rounds} x "
          f"{args.calls}, one thread; in brackets per member")
    print("| layer | G | alone | group | no decision | GEMMs only |")
    print("|---|---|---|---|---|---|")
    for name, (rows, features, out) in LAYERS.items():
        for members in [int(size) for size in args.sizes.split(",")]:
            steps = layer_steps(rows, features, out, members)
            times: dict[str, list[float]] = {key: [] for key in steps}
            for step, context in steps.values():
                with context():
                    step()  # first-call costs
            for _ in range(args.rounds):  # interleaved, so that load hits each alike
                for key, (step, context) in steps.items():
                    with context():
                        times[key].append(microseconds(step, args.calls))
            best = {key: min(values) for key, values in times.items()}
            cells = [f"{best['alone']:.1f}"] + [f"{best[key]:.1f} ({best[key] / members:.1f})"
                                                 for key in steps if key != "alone"]
            print(f"| {name} | {members} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
