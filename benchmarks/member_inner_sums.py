"""How many member blocks of a group's call get other bits than the member's own call alone, for the
functions that sum a sample's terms inside torch (dse.train.member_kernels.INNER_SUM_FUNCTIONS: var,
std, F.normalize, repeat, ...) and a few that do not? For each function, G members of B samples of C
features are joined as a group's layer hands them on (the input batch-innermost, `(C, G*B)` seen as
`(G*B, C)`, or batch-outermost; the output's gradient likewise), run under MemberKernelMode, and each
member's values and input gradient compared with its own call on fresh tensors alone. Counts are of
member blocks, over G 2-3, B 7/14/50, C 37/40 (30 blocks), or the larger shapes of `--large`.

    python benchmarks/member_inner_sums.py                       # every function, one thread
    python benchmarks/member_inner_sums.py --threads 2 --large   # 2 threads, 400-sample members
    python benchmarks/member_inner_sums.py --ablate              # the mode without INNER_SUM_FUNCTIONS
    python benchmarks/member_inner_sums.py --bare                # no mode at all
    python benchmarks/member_inner_sums.py --cost                # a step's CPU time, with and without

`--cost`: a grouped training step (forward, backward, SGD; G = 3, batch 50, fp32, one thread) of two
users' networks that call F.normalize, var, std and repeat over their hidden (B, 40) output, batch-innermost
(tests/support/leaf_models.py:batch_inner_statistics) and batch-outermost (the same calls on the
Linear's contiguous output), with the mode's INNER_SUM_FUNCTIONS and without (the group's calls as
they are), interleaved in one process; thread CPU time, median of repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dse.train import member_kernels  # noqa: E402
from dse.train.member_kernels import MemberKernelMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.leaf_models import BatchInnerStatistics  # noqa: E402  (the tests' user's network)

FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "var(1)": lambda t: t.var(1),
    "var(1, unbiased=False)": lambda t: t.var(1, unbiased=False),
    "torch.var(input=, dim=, correction=0)": lambda t: torch.var(input=t, dim=1, correction=0),
    "std(1, keepdim=True)": lambda t: t.std(1, keepdim=True),
    "torch.std_mean(t, 1)": lambda t: torch.mul(*torch.std_mean(t, 1)),
    "torch.var_mean(dim=1, keepdim=True)": lambda t: torch.var_mean(t, dim=1, keepdim=True)[0],
    "F.normalize(dim=1)": lambda t: F.normalize(t, dim=1),
    "F.normalize(p=1.0, dim=1)": lambda t: F.normalize(t, p=1.0, dim=1),
    "F.rms_norm": lambda t: F.rms_norm(t, t.shape[1:]),
    "F.cosine_similarity": lambda t: F.cosine_similarity(t, t * 0.5 + 1.0, dim=1),
    "torch.einsum('bc->b')": lambda t: torch.einsum("bc->b", t),
    "F.instance_norm(t[None])": lambda t: F.instance_norm(t.unsqueeze(0)).squeeze(0),
    "column.repeat(1, 36)": lambda t: t[:, :1].repeat(1, 36) * t[:, :36],
    "mean.repeat(1, C)": lambda t: t.mean(1, keepdim=True).repeat(1, t.shape[1]) * t,
    "column.tile((1, 36))": lambda t: t[:, :1].tile((1, 36)) * t[:, :36],
    "column.repeat_interleave(36, dim=1)": lambda t: t[:, :1].repeat_interleave(36, dim=1) * t[:, :36],
    "t.repeat(1, 3)": lambda t: t.repeat(1, 3),
    "t.unsqueeze(1).repeat(1, 3, 1)": lambda t: t.unsqueeze(1).repeat(1, 3, 1),
    "t.repeat_interleave(2, dim=1)": lambda t: t.repeat_interleave(2, dim=1),
    "column.expand(-1, 36)": lambda t: t[:, :1].expand(-1, 36) * t[:, :36],
    "t * rsqrt(t.pow(2).mean(1))": lambda t: t * t.pow(2).mean(1, keepdim=True).add(1e-6).rsqrt(),
    "norm(dim=1)": lambda t: t.norm(dim=1),
    "torch.norm(p=3, dim=1)": lambda t: torch.norm(t, p=3, dim=1),
    "linalg.vector_norm(dim=1)": lambda t: torch.linalg.vector_norm(t, dim=1),
    "softmax(1)": lambda t: t.softmax(1),
    "F.layer_norm": lambda t: F.layer_norm(t, t.shape[1:]),
    "cumsum(1)": lambda t: t.cumsum(1),
    "amax(1)": lambda t: t.amax(1),
    "prod(1)": lambda t: t.prod(1),
}


def counts(op: Callable[[Tensor], Tensor], mode: bool, x_inner: bool, dy_inner: bool,
           shapes: list[tuple[int, int, int]]) -> tuple[int, int, int]:
    """(member blocks whose values differ, whose input gradient differs, blocks)."""
    values = gradients = total = 0
    for members, rows, channels in shapes:
        generator = torch.Generator().manual_seed(members * 1000 + rows * 10 + channels)
        if x_inner:
            parts = [torch.randn(channels, rows, generator=generator) for _ in range(members)]
            folded = torch.cat(parts, 1).t().requires_grad_()
        else:
            parts = [torch.randn(rows, channels, generator=generator) for _ in range(members)]
            folded = torch.cat(parts, 0).requires_grad_()
        if mode:
            with MemberKernelMode(members, rows):
                y = op(folded)
        else:
            y = op(folded)
        own_shape = [rows, *y.shape[1:]]
        if dy_inner and y.dim() > 1:
            dys = [torch.randn(*own_shape[1:], rows, generator=generator).movedim(-1, 0) for _ in parts]
            joined = torch.cat([dy.movedim(0, -1) for dy in dys], -1).movedim(-1, 0)
        else:
            dys = [torch.randn(own_shape, generator=generator) for _ in parts]
            joined = torch.cat(dys, 0)
        y.backward(joined)
        assert folded.grad is not None
        for g, (part, dy) in enumerate(zip(parts, dys, strict=True)):
            alone = (part.clone().t() if x_inner else part.clone()).requires_grad_()  # fresh, as alone
            own = op(alone)
            own.backward(dy.clone(memory_format=torch.preserve_format))
            total += 1
            values += not torch.equal(y[g * rows:(g + 1) * rows], own)
            gradients += not torch.equal(folded.grad[g * rows:(g + 1) * rows], alone.grad)
    return values, gradients, total


class OuterStatistics(nn.Module):
    """`BatchInnerStatistics`'s calls on a Linear's contiguous (B, 40) output (the samples outermost)."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(width, 40), nn.Linear(40, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        spread = h.var(1, keepdim=True).repeat(1, h.shape[1])
        return self.head((F.normalize(h, dim=1) + 0.5 * spread) / h.std(1, keepdim=True).add(0.5))


def step_cost(repeats: int, steps: int) -> None:
    """Thread CPU time of a grouped step with INNER_SUM_FUNCTIONS and without, interleaved."""
    from dse.data import load_dataset
    from dse.formats.base import MemberGenerators
    from dse.train.config import TrainConfig
    from dse.train.grouped import _cross_entropies
    from dse.train.layers import QuantSwitch
    from dse.train.policy import QuantPolicy
    from dse.train.stacked import stack_models

    members, batch = 3, 50
    data = load_dataset("digits")
    functions = member_kernels.INNER_SUM_FUNCTIONS
    x = data.x_train[:members * batch].reshape(members, batch, -1)
    y = data.y_train[:members * batch].reshape(members, batch)
    print(f"G={members}, batch {batch}, fp32, 1 thread, median of {repeats} x {steps} steps; "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for network in (BatchInnerStatistics, OuterStatistics):
        torch.manual_seed(0)
        nets = [network(x.shape[-1], 10) for _ in range(members)]
        policy = QuantPolicy.from_config(TrainConfig(model="mlp", dataset="digits", format="fp32"))
        generators = MemberGenerators([torch.Generator().manual_seed(g) for g in range(members)])
        stacked = stack_models(nets, policy, QuantSwitch(), generators, data.x_train[:4])
        optimizer = torch.optim.SGD(stacked.parameters(), lr=0.01)

        def timed(with_functions: bool, stacked: nn.Module = stacked,
                  optimizer: torch.optim.Optimizer = optimizer) -> float:
            member_kernels.INNER_SUM_FUNCTIONS = functions if with_functions else frozenset()
            start = time.thread_time()
            for _ in range(steps):
                _, objective = _cross_entropies(stacked(x), y)
                objective.backward()
                optimizer.step()
                optimizer.zero_grad()
            return (time.thread_time() - start) / steps

        timed(True), timed(False)
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(repeats):
            for variant in (True, False):  # interleaved, so load changes hit both
                times[variant].append(timed(variant))
        with_ms, without_ms = (statistics.median(times[v]) * 1e3 for v in (True, False))
        print(f"{network.__name__:22s} with {with_ms:7.3f} ms  without {without_ms:7.3f} ms  "
              f"ratio {with_ms / without_ms:.3f}", flush=True)
    member_kernels.INNER_SUM_FUNCTIONS = functions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--large", action="store_true", help="G 2-3, B 400, C 100 (over torch's grain)")
    parser.add_argument("--ablate", action="store_true", help="the mode without INNER_SUM_FUNCTIONS")
    parser.add_argument("--bare", action="store_true", help="no mode")
    parser.add_argument("--functions", help="comma-separated names (default: all)")
    parser.add_argument("--cost", action="store_true", help="a grouped step's CPU time, with and without")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    if options.cost:
        step_cost(options.repeats, options.steps)
        return
    if options.ablate:
        member_kernels.INNER_SUM_FUNCTIONS = frozenset()
    shapes = [(g, b, c) for g in (2, 3) for b in ((400,) if options.large else (7, 14, 50))
              for c in ((100, 37) if options.large else (37, 40))]
    names = options.functions.split(",") if options.functions else list(FUNCTIONS)
    setting = "no mode" if options.bare else "mode without INNER_SUM_FUNCTIONS" if options.ablate else "mode"
    print(f"threads {options.threads}, {setting}: member blocks differing from alone, values / gradient")
    print(f"{'function':40s} {'x inner, dy inner':>18s} {'x inner, dy outer':>18s} "
          f"{'x outer, dy inner':>18s} {'x outer, dy outer':>18s}")
    for name in names:
        cells = []
        for x_inner in (True, False):
            for dy_inner in (True, False):
                v, g, total = counts(FUNCTIONS[name], not options.bare, x_inner, dy_inner, shapes)
                cells.append(f"{v:>2d} / {g:>2d} of {total}")
        print(f"{name:40s} " + " ".join(f"{c:>18s}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
