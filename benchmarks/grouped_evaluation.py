"""A group's evaluation against its members' alone: the quickstart MLP (40-256-256-10) scoring MNIST-1D's
1000 test samples (one 1000-row batch), thread CPU µs per member, best of --rounds x --calls, one
thread, interleaved in one process.

    PYTHONPATH=$PWD /work/venv/bin/python benchmarks/grouped_evaluation.py
    PYTHONPATH=$PWD /work/venv/bin/python benchmarks/grouped_evaluation.py --formats fp32 --rounds 5

Three ways, each format: `evaluate_members` of a group of --members as it runs (each Linear one
batched GEMM where the probe finds it sums as the members'), the same with every GEMM member by member
(each member's own addmm, stacked: the ablation of bmm against mm), and `evaluate` of one member alone.
First with glibc's malloc as a Python process leaves it, then after `keep_freed_memory` (as `dse train`,
`dse sweep` and its workers run): a group's (G, 1000, 256) activations are blocks above malloc's
starting mmap threshold, freed and mapped again at every evaluation, each page faulted in afresh
(minor faults per evaluation printed). The GEMMs' own costs at these shapes: --gemms.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dse.train.stacked as stacked  # noqa: E402
from dse.data import load_dataset, with_validation  # noqa: E402
from dse.models.proxies import build_model  # noqa: E402
from dse.train.allocator import keep_freed_memory  # noqa: E402
from dse.train.config import TrainConfig  # noqa: E402
from dse.train.grouped import _quantized_setup, evaluate_members  # noqa: E402
from dse.train.loop import EXAMPLE_SAMPLES, _run_settings, evaluate, prepare  # noqa: E402


@contextlib.contextmanager
def _member_by_member() -> Iterator[None]:
    """Every stacked GEMM member by member (the CPU rule answers no: nothing probed)."""
    rule = stacked.bmm_sums_as_mm
    stacked.bmm_sums_as_mm = lambda *_: False
    try:
        yield
    finally:
        stacked.bmm_sums_as_mm = rule


def _best_us(call: Callable[[], object], rounds: int, calls: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.thread_time_ns()
        for _ in range(calls):
            call()
        best = min(best, (time.thread_time_ns() - start) / calls / 1e3)
    return best


def _faults(call: Callable[[], object], calls: int) -> float:
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(calls):
        call()
    return (resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) / calls


def _ways(fmt: str, members: int) -> dict[str, Callable[[], object]]:
    data = with_validation(load_dataset("mnist1d"))
    configs = [TrainConfig(model="mlp", dataset="mnist1d", format=fmt, seed=seed, epochs=1)
               for seed in range(members)]
    models, generators = [], []
    for config in configs:
        torch.manual_seed(config.seed)
        generators.append(torch.Generator().manual_seed(config.seed))
        models.append(build_model(config.model, data))
    group = _quantized_setup(models, configs, generators, data.x_train[:EXAMPLE_SAMPLES]).model
    torch.manual_seed(0)
    alone = prepare(build_model("mlp", data), configs[0], torch.Generator().manual_seed(0),
                    data.x_train[:EXAMPLE_SAMPLES], None).model
    x, y = data.x_test, data.y_test

    def by_member() -> object:
        with _member_by_member():
            return evaluate_members(group, members, x, y)

    return {"grouped": lambda: evaluate_members(group, members, x, y), "grouped, GEMMs by member": by_member,
            "alone": lambda: evaluate(alone, x, y)}


def _evaluations(formats: list[str], members: int, rounds: int, calls: int) -> None:
    ways = {fmt: _ways(fmt, members) for fmt in formats}
    for kept in (False, True):
        if kept:
            keep_freed_memory()
        print(f"\nmalloc {'kept (as dse processes run)' if kept else 'as Python leaves it'}:"
              " µs per member (thread CPU), minor faults per evaluation")
        for fmt, calls_of in ways.items():
            best = dict.fromkeys(calls_of, float("inf"))
            for _ in range(3):  # interleaved: the load hits each alike
                for name, call in calls_of.items():
                    per = members if name != "alone" else 1
                    best[name] = min(best[name], _best_us(call, rounds, calls) / per)
            faults = {name: _faults(call, calls) for name, call in calls_of.items()}
            print(f"  {fmt:6} " + "; ".join(f"{name} {best[name]:.0f} ({faults[name]:.0f} faults)"
                                             for name in calls_of)
                  + f"; grouped / alone {best['grouped'] / best['alone']:.2f}x")


def _gemm_ways(members: int, reduction: int, columns: int) -> dict[str, Callable[[], object]]:
    a = torch.randn(members, 1000, reduction)
    w = torch.randn(members, columns, reduction).transpose(1, 2)
    bias = torch.randn(members, columns)
    own = [(a[g].clone(), w[g].clone(), bias[g].clone()) for g in range(members)]
    return {"baddbmm": lambda: torch.baddbmm(bias.unsqueeze(1), a, w),
            "addmm each": lambda: [torch.addmm(b, x, v) for x, v, b in own],
            "addmm each, stacked": lambda: torch.stack([torch.addmm(b, x, v) for x, v, b in own])}


def _gemms(members: int, rounds: int, calls: int) -> None:
    print(f"\nA Linear's forward at 1000 rows, G = {members}: baddbmm against each member's addmm"
          " (fresh operands), thread CPU µs for all members")
    for reduction, columns in ((40, 256), (256, 256), (256, 10)):
        ways = _gemm_ways(members, reduction, columns)
        best = dict.fromkeys(ways, float("inf"))
        for _ in range(3):
            for name, call in ways.items():
                best[name] = min(best[name], _best_us(call, rounds, calls))
        print(f"  {reduction:3} -> {columns:3}: " + "; ".join(f"{n} {v:.0f}" for n, v in best.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="fp32,int8", help="comma-separated (default fp32,int8)")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--gemms", action="store_true", help="also time the Linears' GEMMs alone")
    args = parser.parse_args()
    with _run_settings(1):
        _evaluations(args.formats.split(","), args.members, args.rounds, args.calls)
        if args.gemms:
            _gemms(args.members, args.rounds, args.calls)


if __name__ == "__main__":
    main()
