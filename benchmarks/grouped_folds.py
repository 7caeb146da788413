"""One accumulator fold of a stacked GEMM against its members' folds alone (dse/train/stacked.py,
`MemberAccumulators.fold_gemm`), interleaved in one process, best of several rounds.

    .venv/bin/python benchmarks/grouped_folds.py --threads 1,2 --members 2,3

The fold is the transformer proxy's FFN weight gradient (640 rows = batch 64 x 10 positions, 256 x 64,
chunks of 4 rows, an fp8_e5m2 accumulator). It prints the CPU seconds of the members' folds alone, and
the group's fold over them (lower is cheaper) with the chunks of the whole group at once (before) and
in runs of members under torch's parallel grain (now).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def measure(members: int, rounds: int) -> dict[str, float]:
    """Best CPU seconds of the members' folds alone, and of the group's fold whole and in runs."""
    import torch

    import dse.train.stacked as stacked
    from dse.formats import get
    from dse.formats.base import MemberGenerators
    from dse.train import accumulation
    from dse.train.policy import TensorQuant

    quant = TensorQuant(get("fp8_e5m2"))
    grain = stacked.PARALLEL_GRAIN
    source = torch.Generator().manual_seed(0)
    a = torch.randn(members, 640, 256, generator=source)
    dy = torch.randn(members, 640, 64, generator=source)
    group = stacked._accumulator(quant, 4, MemberGenerators([None] * members))
    assert group is not None
    alone = accumulation.Accumulator(quant, 4)
    best = {"alone": float("inf"), "whole": float("inf"), "runs": float("inf")}
    for _ in range(rounds):
        started = time.process_time()
        for g in range(members):
            accumulation.matmul_backward_b(a[g], dy[g], alone)
        best["alone"] = min(best["alone"], time.process_time() - started)
        for name, limit in (("whole", 2**62), ("runs", grain)):
            stacked.PARALLEL_GRAIN = limit
            try:
                started = time.process_time()
                accumulation.matmul_backward_b(a, dy, group)
                best[name] = min(best[name], time.process_time() - started)
            finally:
                stacked.PARALLEL_GRAIN = grain
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--members", default="2,3")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)

    import torch

    print("| threads | members | members alone, CPU ms | whole-group chunks / alone | runs under the grain "
          "/ alone |")
    print("|---|---|---|---|---|")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for members in (int(g) for g in args.members.split(",")):
            best = measure(members, args.rounds)
            whole, runs = best["whole"] / best["alone"], best["runs"] / best["alone"]
            print(f"| {threads} | {members} | {best['alone'] * 1e3:.1f} | {whole:.2f} | {runs:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
