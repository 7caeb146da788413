"""What running a stacked group's convolutions member by member costs against one grouped convolution.

Grouped training (dse/train/stacked.py) runs each member's convolution as its own call, because
oneDNN picks other algorithms for a grouped convolution (groups = G over channel-stacked members),
whose sums then run in another order (the members would differ from their runs alone in the last
bits). This script times both ways, forward and both backward GEMMs, side by side in one process, on
the convolutions of the built-in CNN and ResNet proxies, and says whether the grouped one is bit for
bit the loop's.

    python benchmarks/stacked_conv.py [--members 8] [--batch 64] [--repeat 5]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

SHAPES: list[tuple[str, int, int, tuple[int, ...], int, int, int]] = [
    # name, c_in, c_out, input size, kernel, stride, padding
    ("cnn mnist1d conv1", 1, 25, (40,), 5, 2, 1),
    ("cnn mnist1d conv2", 25, 25, (19,), 3, 2, 1),
    ("cnn digits conv1", 1, 16, (8, 8), 3, 1, 1),
    ("cnn digits conv2", 16, 32, (8, 8), 3, 1, 1),
    ("resnet mnist1d block", 16, 16, (40,), 3, 1, 1),
    ("resnet digits block3", 32, 64, (4, 4), 3, 2, 1),
]


def _grads(dy: Tensor, x: Tensor, w: Tensor, stride: int, padding: int, groups: int) -> tuple[Tensor, Tensor]:
    dims = w.dim() - 2
    dx, dw, _ = torch.ops.aten.convolution_backward(dy, x, w, None, [stride] * dims, [padding] * dims,
                                                    [1] * dims, False, [0] * dims, groups,
                                                    [True, True, False])
    return dx, dw


def loop(x: Tensor, w: Tensor, dy: Tensor, stride: int, padding: int) -> list[Tensor]:
    """x (G, B, C, ...), w (G, O, C, k...): each member's convolution and its two backward GEMMs."""
    conv = F.conv1d if w.dim() == 4 else F.conv2d
    y = torch.stack([conv(x[g], w[g], None, stride, padding) for g in range(len(x))])
    grads = [_grads(dy[g], x[g], w[g], stride, padding, 1) for g in range(len(x))]
    return [y, torch.stack([d for d, _ in grads]), torch.stack([d for _, d in grads])]


def grouped(x: Tensor, w: Tensor, dy: Tensor, stride: int, padding: int) -> list[Tensor]:
    """The same as one grouped convolution over the members' channels stacked (B, G*C, ...)."""
    members, batch = x.shape[:2]
    conv = F.conv1d if w.dim() == 4 else F.conv2d
    xs = x.transpose(0, 1).reshape(batch, -1, *x.shape[3:])
    ws = w.reshape(-1, *w.shape[2:])
    y = conv(xs, ws, None, stride, padding, 1, members)
    dys = dy.transpose(0, 1).reshape(batch, -1, *dy.shape[3:])
    dx, dw = _grads(dys, xs, ws, stride, padding, members)
    unstack = lambda t: t.reshape(batch, members, -1, *t.shape[2:]).transpose(0, 1)  # noqa: E731
    return [unstack(y), unstack(dx), dw.reshape(w.shape)]


def _best(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(20):
            fn()
        best = min(best, (time.perf_counter() - start) / 20)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"G = {args.members}, batch {args.batch}, 1 thread; forward + backward-data + backward-weight")
    print(f"{'convolution':24} {'loop ms':>8} {'grouped ms':>10} {'loop/grouped':>12}  bit for bit")
    for name, c_in, c_out, size, kernel, stride, padding in SHAPES:
        x = torch.randn(args.members, args.batch, c_in, *size)
        w = torch.randn(args.members, c_out, c_in, *[kernel] * len(size))
        y = torch.stack([(F.conv1d if len(size) == 1 else F.conv2d)(x[g], w[g], None, stride, padding)
                         for g in range(args.members)])
        dy = torch.randn_like(y)
        out = loop(x, w, dy, stride, padding)
        same = all(torch.equal(a, b) for a, b in zip(out, grouped(x, w, dy, stride, padding), strict=True))
        looped = _best(lambda: loop(x, w, dy, stride, padding), args.repeat)  # noqa: B023
        together = _best(lambda: grouped(x, w, dy, stride, padding), args.repeat)  # noqa: B023
        print(f"{name:24} {looped * 1e3:8.3f} {together * 1e3:10.3f} {looped / together:12.2f}  {same}")


if __name__ == "__main__":
    main()
