"""Madam and LNS-Madam over a group of G members: one optimizer per member (as grouped training
stepped them before `Madam.members`, kept LNS codes included) against one optimizer over the
stacked weights, side by side in one process, CPU time per step, best of several rounds, one thread.

    .venv/bin/python benchmarks/stacked_madam.py                 # MNIST-1D and digits MLPs, G = 3, 8, 16
    .venv/bin/python benchmarks/stacked_madam.py --sizes 8 --rounds 5

Both step the same weights with the same gradients (lns8 weights, stochastic code steps, three
learning rates among the members); each member's result is the same bit for bit
(tests/train/test_train_optim.py), so only the dispatch differs: G times each operation against once.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MLPS = {"mnist1d": [40, 256, 256, 10], "digits": [64, 128, 10]}
"""The proxies' MLP widths (dse/models/proxies.py)."""


def group_steps(optimizer_name: str, widths: list[int], members: int) -> tuple[Callable[[], None],
                                                                                Callable[[], None]]:
    """(one step of G optimizers, one per member; one step of one optimizer over the stacked group)."""
    import torch
    from torch import nn

    from dse.formats import get
    from dse.formats.base import MemberGenerators
    from dse.train.layers import QuantSwitch
    from dse.train.optim import LNSMadam, madam_optimizer

    lns8 = get("lns8")
    shapes = [shape for a, b in zip(widths, widths[1:], strict=False) for shape in ((b, a), (b,))]
    source = torch.Generator().manual_seed(0)
    stacked = [nn.Parameter(lns8.quantize(torch.randn(members, *shape, generator=source) * 0.1))
               for shape in shapes]
    lrs = [1 / 128 * 2.0**-(g % 3) for g in range(members)]
    storage = lns8 if optimizer_name == "lns-madam" else None
    one = madam_optimizer(optimizer_name, stacked, lrs, [3.0] * members, [10.0] * members,
                          {p: storage for p in stacked if p.dim() == 3 and storage is not None}, "stochastic",
                          MemberGenerators([torch.Generator().manual_seed(g) for g in range(members)]),
                          QuantSwitch(), members=members)
    views = [[p.detach()[g:g + 1] for p in stacked] for g in range(members)]
    each = [madam_optimizer(optimizer_name, views[g], lrs[g], 3.0, 10.0,
                            {v: storage for v in views[g] if v.dim() == 3 and storage is not None},
                            "stochastic", torch.Generator().manual_seed(g), QuantSwitch())
            for g in range(members)]
    grads = [torch.randn(p.shape, generator=source) for p in stacked]

    def step_each() -> None:
        for g, optimizer in enumerate(each):
            for view, grad in zip(views[g], grads, strict=True):
                view.grad = grad[g:g + 1]
                kept = optimizer._stored.get(view) if isinstance(optimizer, LNSMadam) else None
                if kept is not None:  # the members' slices share a version counter: codes kept, as before
                    kept.version = view._version
            optimizer.step()

    def step_one() -> None:
        for p, grad in zip(stacked, grads, strict=True):
            p.grad = grad
        one.step()

    return step_each, step_one


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="3,8,16")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    print(f"ms per optimizer step of a group (best of {args.rounds} rounds x {args.steps} steps, 1 thread): "
          "one optimizer per member against one over the stacked group")
    print("\n| MLP | optimizer | G | per member ms | stacked ms | speed-up |\n|---|---|---|---|---|---|")
    for name, widths in MLPS.items():
        for optimizer_name in ("lns-madam", "madam"):
            for members in (int(size) for size in args.sizes.split(",")):
                runs = dict(zip(("each", "one"), group_steps(optimizer_name, widths, members), strict=True))
                best = dict.fromkeys(runs, float("inf"))
                for _ in range(args.rounds):
                    for label, run in runs.items():
                        started = time.process_time()
                        for _ in range(args.steps):
                            run()
                        best[label] = min(best[label], (time.process_time() - started) / args.steps * 1e3)
                print(f"| {name} | {optimizer_name} | {members} | {best['each']:.2f} | {best['one']:.2f} | "
                      f"{best['each'] / best['one']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
