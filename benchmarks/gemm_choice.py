"""A group's Linear GEMMs as one batched call against each member's own call, at the built-in proxies'
shapes, 1 and 2 threads: which is cheaper, and which gives each member the bits it has alone.

    PYTHONPATH=$PWD /work/venv/bin/python benchmarks/gemm_choice.py
    PYTHONPATH=$PWD /work/venv/bin/python benchmarks/gemm_choice.py --sizes 3,8,12 --threads 1,2 --rounds 9

Each Linear of the MNIST-1D MLP (batch 100: 40 -> 256 -> 256 -> 10), the digits MLP (batch 64: 64 ->
128 -> 10) and the MNIST-1D CNN's head (batch 100: 125 -> 10) has three GEMMs a step, in the layouts a
stacked Linear gives them (`StackedLinearOp`: the weight (G, out, in) transposed in the forward, the
errors transposed in the weight gradient): forward (rows x in @ in x out, with the bias), data
gradient (rows x out @ out x in; not for a first layer) and weight gradient (out x rows @ rows x in).
Each GEMM of a group of G, three ways, interleaved in one process, --rounds times:
- *batched*: one `bmm` / `baddbmm` (`stacked._batched_gemm`, what `member_gemm` runs where it sums as
  the members');
- *each, stacked*: each member's own `mm` / `addmm` (`_own_gemm`), the outputs stacked (what
  `member_gemm` runs where it does not);
- *each, in place*: each member's own call writing into its block of one output at alone's alignment
  (`out=`), no stack.
Process CPU µs for the whole group (every thread's time, so that two threads' work counts whole and a
preempted thread does not; --clock wall: wall µs), fastest and median round; and whether each way
gives every member the bits of its own call on fresh copies of its operands (as alone: `same`). The
sums of a step's GEMMs are printed per network; a cheaper way that is not `same` is no choice.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dse.train.batched_sums import at_alone_alignment, empty_at_alone_alignment  # noqa: E402
from dse.train.stacked import _batched_gemm, _own_gemm  # noqa: E402

NETWORKS: dict[str, tuple[int, tuple[int, ...]]] = {
    "mnist1d MLP": (100, (40, 256, 256, 10)),
    "digits MLP": (64, (64, 128, 10)),
    "mnist1d CNN head": (100, (125, 10)),
}
"""Batch rows and Linear widths of each built-in proxy's stacked Linears."""


def _gemms(rows: int, widths: tuple[int, ...], members: int, generator: torch.Generator
           ) -> list[tuple[str, tuple[Tensor, ...]]]:
    """Each Linear's GEMMs as a stacked Linear calls them: (name, operands with a leading member axis)."""
    gemms: list[tuple[str, tuple[Tensor, ...]]] = []
    for layer, (features_in, features_out) in enumerate(zip(widths, widths[1:], strict=False)):
        x = torch.randn(members, rows, features_in, generator=generator)
        weight = torch.randn(members, features_out, features_in, generator=generator)
        bias = torch.randn(members, features_out, generator=generator)
        errors = at_alone_alignment(torch.randn(members, rows, features_out, generator=generator))
        shape = f"{features_in}->{features_out}"
        gemms.append((f"{shape} forward", (x, weight.transpose(1, 2), bias)))
        if layer:
            gemms.append((f"{shape} data gradient", (errors, weight)))
        gemms.append((f"{shape} weight gradient", (errors.transpose(1, 2), x)))
    return gemms


def _each_stacked(*operands: Tensor) -> Tensor:
    return torch.stack([_own_gemm(*(o[g] for o in operands)) for g in range(operands[0].shape[0])])


def _each_in_place(*operands: Tensor) -> Tensor:
    a, b = operands[:2]
    out = empty_at_alone_alignment((a.shape[1], b.shape[2]), a.shape[0], a)
    for g in range(a.shape[0]):
        if len(operands) == 2:
            torch.mm(a[g], b[g], out=out[g])
        else:
            torch.addmm(operands[2][g], a[g], b[g], out=out[g])
    return out


WAYS: dict[str, Callable[..., Tensor]] = {"batched": _batched_gemm, "each, stacked": _each_stacked,
                                          "each, in place": _each_in_place}


def _same_as_alone(way: Callable[..., Tensor], operands: tuple[Tensor, ...]) -> bool:
    together = way(*operands)
    for g in range(operands[0].shape[0]):
        alone = _own_gemm(*(o[g].clone() for o in operands))  # fresh: at a fresh tensor's alignment
        if not torch.equal(together[g].contiguous().view(torch.int32), alone.view(torch.int32)):
            return False
    return True


CLOCKS: dict[str, Callable[[], int]] = {"cpu": time.process_time_ns, "wall": time.perf_counter_ns}
"""Process CPU time (every thread's: an OpenMP worker spinning while it waits counts too) or wall time
(what a preempted call waits counts too)."""


def _us(call: Callable[[], object], calls: int, clock: Callable[[], int]) -> float:
    started = clock()
    for _ in range(calls):
        call()
    return (clock() - started) / calls / 1e3


def run(sizes: list[int], threads: list[int], rounds: int, calls: int, networks: list[str],
        clock: str) -> None:
    print(f"load average {os.getloadavg()[0]:.2f}; {clock} µs a group GEMM, fastest (median) of "
          f"{rounds} rounds x {calls} calls; [bits] = every member equals its own call alone")
    for count in threads:
        torch.set_num_threads(count)
        for network in networks:
            rows, widths = NETWORKS[network]
            for members in sizes:
                generator = torch.Generator().manual_seed(members)
                gemms = _gemms(rows, widths, members, generator)
                times: dict[tuple[str, str], list[float]] = {(n, w): [] for n, _ in gemms for w in WAYS}
                same = {(n, w): _same_as_alone(WAYS[w], ops) for n, ops in gemms for w in WAYS}
                for _ in range(rounds):  # interleaved: the load hits each way alike
                    for name, operands in gemms:
                        for way, call in WAYS.items():
                            times[name, way].append(_us(functools.partial(call, *operands), calls,
                                                        CLOCKS[clock]))
                print(f"\n{network}, G = {members}, {count} thread(s):")
                for name, _ in gemms:
                    print(f"  {name:28}" + "; ".join(
                        f"{way} {min(times[name, way]):7.1f} ({statistics.median(times[name, way]):7.1f})"
                        f"{'' if same[name, way] else ' [bits differ]'}" for way in WAYS))
                totals = {way: sum(min(times[name, way]) for name, _ in gemms) for way in WAYS}
                ratios = {way: total / totals["batched"] for way, total in totals.items()}
                print(f"  {'step, fastest':28}" + "; ".join(
                    f"{way} {totals[way]:7.1f} ({ratios[way]:.2f}x)" for way in WAYS))
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="3,8,12", help="group sizes (default 3,8,12)")
    parser.add_argument("--threads", default="1,2", help="thread counts (default 1,2)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--networks", default=",".join(NETWORKS), help=f"of {', '.join(NETWORKS)}")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="cpu")
    args = parser.parse_args()
    run([int(s) for s in args.sizes.split(",")], [int(t) for t in args.threads.split(",")], args.rounds,
        args.calls, args.networks.split(","), args.clock)


if __name__ == "__main__":
    main()
