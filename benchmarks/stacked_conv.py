"""A stacked group's convolutions member by member, as one grouped convolution, and as the group runs
them (each product grouped where a probe finds each member's bits, `StackedConvOp`), side by side.

Grouped training (dse/train/stacked.py) runs each of a convolution's three products - forward,
backward-data, backward-weight - as one grouped convolution (groups = G over channel-stacked
members) where a probe of that layout finds it gives every member the bits of its own call, else
member by member. This script times the three ways on the convolutions of the built-in CNN and ResNet
proxies (fp32 operands; the layer's bias where it has one), in CPU time, interleaved in one process,
and says per product (F, D, W) whether the grouped call is each member's own (y / n) and which way
the group runs it (g: grouped, where alike; l: member by member).

    python benchmarks/stacked_conv.py [--members 8] [--batch 64] [--repeat 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable

import torch
from torch import Tensor

from dse.train import batched_sums
from dse.train.allocator import keep_freed_memory
from dse.train.layers import ConvOp
from dse.train.stacked import StackedConvOp

SHAPES: list[tuple[str, int, int, tuple[int, ...], int, int, int, bool]] = [
    # name, c_in, c_out, input size, kernel, stride, padding, bias
    ("cnn mnist1d conv1", 1, 25, (40,), 5, 2, 1, True),
    ("cnn mnist1d conv2", 25, 25, (19,), 3, 2, 1, True),
    ("cnn mnist1d conv3", 25, 25, (10,), 3, 2, 1, True),
    ("cnn digits conv1", 1, 16, (8, 8), 3, 1, 1, True),
    ("cnn digits conv2", 16, 32, (8, 8), 3, 1, 1, True),
    ("resnet mnist1d stem", 1, 16, (40,), 3, 1, 1, False),
    ("resnet mnist1d block1", 16, 16, (40,), 3, 1, 1, False),
    ("resnet mnist1d block2a", 16, 32, (40,), 3, 2, 1, False),
    ("resnet mnist1d block2b", 32, 32, (20,), 3, 1, 1, False),
    ("resnet mnist1d short2", 16, 32, (40,), 1, 2, 0, False),
    ("resnet mnist1d block3a", 32, 64, (20,), 3, 2, 1, False),
    ("resnet mnist1d block3b", 64, 64, (10,), 3, 1, 1, False),
    ("resnet digits stem", 1, 16, (8, 8), 3, 1, 1, False),
    ("resnet digits block1", 16, 16, (8, 8), 3, 1, 1, False),
    ("resnet digits block2a", 16, 32, (8, 8), 3, 2, 1, False),
    ("resnet digits block2b", 32, 32, (4, 4), 3, 1, 1, False),
    ("resnet digits short2", 16, 32, (8, 8), 1, 2, 0, False),
    ("resnet digits block3a", 32, 64, (4, 4), 3, 2, 1, False),
    ("resnet digits block3b", 64, 64, (2, 2), 3, 1, 1, False),
]

Operands = tuple[Tensor, Tensor, Tensor | None, Tensor]


def loop(op: StackedConvOp, x: Tensor, w: Tensor, b: Tensor | None, dy: Tensor) -> None:
    """Member by member: each member's convolution and its one backward call, as alone (fp32)."""
    for g in range(len(x)):
        op.op.forward(x[g], w[g], None if b is None else b[g])
        op._conv_grads(dy[g], x[g], w[g], (True, True, b is not None), 1)


def grouped(op: StackedConvOp, x: Tensor, w: Tensor, b: Tensor | None, dy: Tensor) -> None:
    """Every product as one grouped convolution, operands joined and outputs split as the group does."""
    for product in (op._grouped_forward(x, w, b), op._grouped_data(dy, x, w),
                    *op._grouped_weight((False, True, b is not None), dy, x, w)):
        product.contiguous()  # (the split into the members' layouts: one copy, as the group makes)


def probed(op: StackedConvOp, x: Tensor, w: Tensor, b: Tensor | None, dy: Tensor) -> None:
    """As the group runs them: each product grouped where its probe found each member's bits and it
    timed faster than the members' own calls."""
    op.forward(x, w, b)
    op.plain_grads(dy, x, w, (True, True, b is not None))


def _cpu_seconds(fn: Callable[[], None], calls: int) -> float:
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls


SITES = ("convolution", "convolution backward-data", "convolution backward-weight")


def _decide(op: StackedConvOp, operands: Operands) -> tuple[str, str]:
    """Per product (F, D, W): whether its probe found the grouped call each member's own (y / n), and
    which way the group runs it (g: grouped, alike; l: member by member)."""
    x, w, b, dy = operands
    batched_sums._DECIDED.clear()
    batched_sums._MEMBER_LAYOUTS.clear()
    probed(op, x, w, b, dy)
    alike = {key[0][0]: answer for key, answer in batched_sums.decided().items()}
    runs = {key[0][0]: layouts is not None for key, layouts in batched_sums._MEMBER_LAYOUTS.items()}
    return (" ".join("y" if alike[site] else "n" for site in SITES),
            " ".join("g" if runs[site] else "l" for site in SITES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    keep_freed_memory()  # as dse's own processes run (the grouped call's operands would be mmapped afresh)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"G = {args.members}, batch {args.batch}, {args.threads} thread(s), CPU ms per forward + "
          f"backward-data + backward-weight, best of {args.repeat} x {args.calls}, interleaved; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'convolution':24} {'loop':>7} {'grouped':>8} {'probed':>7} {'loop/grouped':>12} "
          f"{'loop/probed':>11}  alike (F D W)  runs (F D W)")
    for name, c_in, c_out, size, kernel, stride, padding, bias in SHAPES:
        dims = len(size)
        op = StackedConvOp(ConvOp((stride,) * dims, (padding,) * dims, (1,) * dims, 1))
        x = torch.randn(args.members, args.batch, c_in, *size)
        w = torch.randn(args.members, c_out, c_in, *[kernel] * dims)
        b = torch.randn(args.members, c_out) if bias else None
        dy = torch.randn(args.members, *op.op.forward(x[0], w[0], None).shape)
        operands: Operands = (x, w, b, dy)
        alike, chosen = _decide(op, operands)
        ways = {"loop": loop, "grouped": grouped, "probed": probed}
        best = dict.fromkeys(ways, float("inf"))
        for round_number in range(args.repeat):  # interleaved, the order turned each round
            for way, run in list(ways.items())[::1 if round_number % 2 else -1]:
                best[way] = min(best[way], _cpu_seconds(functools.partial(run, op, *operands), args.calls))
        print(f"{name:24} {best['loop'] * 1e3:7.2f} {best['grouped'] * 1e3:8.2f} {best['probed'] * 1e3:7.2f} "
              f"{best['loop'] / best['grouped']:12.2f} {best['loop'] / best['probed']:11.2f}  "
              f"{alike:13}  {chosen}")


if __name__ == "__main__":
    main()
