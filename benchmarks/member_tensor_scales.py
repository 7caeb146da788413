"""A group's quantize with a two-level-scaled block format (NVFP4: a tensor scale per member over its
block scales) in one pass over the stack (today) against member by member (before: each member
sliced, quantized with its own scale and generator, and the results concatenated), side by side in
one process, over the quickstart MLP's stacked tensors (40-256-256-10, batch 100: each GEMM's input
or error and each weight or weight gradient, per member).

    PYTHONPATH=$PWD python benchmarks/member_tensor_scales.py
    PYTHONPATH=$PWD python benchmarks/member_tensor_scales.py --formats nvfp4 --sizes 3,8,16 --rounds 5

Prints CPU microseconds of quantizing all six tensors of a step as training does (each along its two
GEMMs' axes: `quantize_members_along`, one call with nearest rounding, one per axis with stochastic
rounding), before / today and the ratio, best of the rounds, one thread. Both give the same bits
and leave the members' generators in the same state (checked on every round here).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = [(100, 40), (256, 40), (100, 256), (256, 256), (100, 256), (10, 256)]
"""One member's tensors: forward inputs x of each layer and its weights (gradients have these shapes)."""
AXES = (-1, -2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="nvfp4,block(fp6_e2m3,size=32,scale=e4m3,tensor_scale=fp32)")
    parser.add_argument("--roundings", default="nearest,stochastic")
    parser.add_argument("--sizes", default="3,8,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)

    import torch

    from dse.formats import get
    from dse.formats.base import MemberGenerators, NumberFormat

    def member_by_member(fmt: NumberFormat, x: torch.Tensor, rounding: str, generators: MemberGenerators
                         ) -> list[torch.Tensor]:
        """Before: each member alone (a group of one), its results concatenated."""
        alone = NumberFormat.quantize_members_along
        if rounding == "nearest":
            parts = [alone(fmt, x[g:g + 1], AXES, rounding, MemberGenerators([generators.generators[g]]))
                     for g in range(x.shape[0])]
            return [torch.cat(axis) for axis in zip(*parts, strict=True)]
        return [torch.cat([alone(fmt, x[g:g + 1], (axis,), rounding,
                                 MemberGenerators([generators.generators[g]]))[0]
                           for g in range(x.shape[0])]) for axis in AXES]

    def stacked(fmt: NumberFormat, x: torch.Tensor, rounding: str, generators: MemberGenerators
                ) -> list[torch.Tensor]:
        """Today: the whole stack at once (as training calls it: both axes in one call where rounding
        draws nothing, else one call per axis, in turn)."""
        if rounding == "nearest":
            return fmt.quantize_members_along(x, AXES, rounding, generators)
        return [fmt.quantize_members_along(x, (axis,), rounding, generators)[0] for axis in AXES]

    torch.set_num_threads(1)
    print(f"CPU us of quantize_members_along over the MLP's six stacked tensors, both GEMM axes "
          f"(best of {args.rounds} x {args.calls}, 1 thread)\n")
    print("| format | rounding | G | before us | today us | before / today |")
    print("|---|---|---|---|---|---|")
    ways: dict[str, Callable[..., list[torch.Tensor]]] = {"before": member_by_member, "today": stacked}
    for spec in _split_specs(args.formats):
        fmt = get(spec)
        for rounding in args.roundings.split(","):
            for size in (int(s) for s in args.sizes.split(",")):
                source = torch.Generator().manual_seed(size)
                tensors = [torch.randn(size, *shape, generator=source) for shape in SHAPES]
                best = {name: float("inf") for name in ways}
                for _ in range(args.rounds):
                    results = {}
                    for name, way in ways.items():
                        generators = MemberGenerators([torch.Generator().manual_seed(g) for g in range(size)])
                        way(fmt, tensors[0], rounding, generators)  # (warm)
                        started = time.process_time()
                        for _ in range(args.calls):
                            outputs = [way(fmt, t, rounding, generators) for t in tensors]
                        best[name] = min(best[name], (time.process_time() - started) / args.calls)
                        states = [g.get_state() for g in generators.generators if g is not None]
                        results[name] = (outputs, states)
                    (before, before_states), (today, today_states) = results["before"], results["today"]
                    assert all(torch.equal(a.view(torch.int32), b.view(torch.int32))
                               for outs_a, outs_b in zip(before, today, strict=True)
                               for a, b in zip(outs_a, outs_b, strict=True))
                    assert all(torch.equal(a, b) for a, b in zip(before_states, today_states, strict=True))
                before_us, today_us = best["before"] * 1e6, best["today"] * 1e6
                print(f"| {spec} | {rounding} | {size} | {before_us:.0f} | {today_us:.0f} | "
                      f"{before_us / today_us:.2f}x |", flush=True)


def _split_specs(text: str) -> list[str]:
    """Comma-separated specs, commas inside a spec's parentheses kept."""
    specs, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            specs.append(text[start:i])
            start = i + 1
    specs.append(text[start:])
    return [spec for spec in specs if spec]


if __name__ == "__main__":
    main()
