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

--order: where the rest goes, as ablations in plain torch (freed memory kept). The MLP's forward of
--members, each member's three addmm and two ReLUs one member after another (alone's order) against
one baddbmm and one ReLU a layer over all members (the group's order, the same operations on the same
shapes), at 1000, 333, 125 and 8 rows, --sizes members (a member's 1000 x 256 activation is 1 MB,
this CPU's L2 1 MiB a core: whether the order costs as the group's activations outgrow a cache; which
cache level is not isolated here). Between them, layer after layer with each member's own addmm and
ReLU (the calls of member after member, only their order changed): the order without the batched
call's fewer dispatches, which at 8 rows are all that differs and at 125 rows still a few per cent.
Then, at 1000 and 8 rows, dse's group evaluation (`evaluate_members`), each member's own run
evaluated alone (`evaluate`) and the plain member-after-member order, its
stacked model's forward alone and the network inside it (`StackedModel.net`, no member axis
folding) against the plain group order on the same weights, scored as `evaluate_members` scores it:
the difference is dse's Python an evaluation, and at 8 rows almost nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
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


def _group(fmt: str, members: int) -> torch.nn.Module:
    """The quickstart MLP's stacked model of `members` seeds, as `train_group` sets it up."""
    data = with_validation(load_dataset("mnist1d"))
    configs = [TrainConfig(model="mlp", dataset="mnist1d", format=fmt, seed=seed, epochs=1)
               for seed in range(members)]
    models, generators = [], []
    for config in configs:
        torch.manual_seed(config.seed)
        generators.append(torch.Generator().manual_seed(config.seed))
        models.append(build_model(config.model, data))
    return _quantized_setup(models, configs, generators, data.x_train[:EXAMPLE_SAMPLES]).model


def _ways(fmt: str, members: int) -> dict[str, Callable[[], object]]:
    data = with_validation(load_dataset("mnist1d"))
    group = _group(fmt, members)
    configs = [TrainConfig(model="mlp", dataset="mnist1d", format=fmt, seed=0, epochs=1)]
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


def _mlp_orders(members: int, rows: int) -> dict[str, Callable[[], object]]:
    generator = torch.Generator().manual_seed(members)
    x = torch.randn(rows, 40, generator=generator)
    shapes = ((40, 256), (256, 256), (256, 10))
    weights = [torch.randn(members, out, features, generator=generator) / features ** 0.5
               for features, out in shapes]
    biases = [torch.randn(members, out, generator=generator) for _, out in shapes]
    own = [[(w[g].clone(), b[g].clone()) for w, b in zip(weights, biases, strict=True)]
           for g in range(members)]

    def member_order() -> object:
        for layers in own:
            h = x
            for layer, (w, b) in enumerate(layers):
                h = torch.addmm(b, h, w.t())
                h = torch.relu(h) if layer < 2 else h
            h.argmax(-1)
        return None

    def layer_order_own_calls() -> object:
        h = [x] * members
        for layer in range(len(shapes)):
            for g, layers in enumerate(own):
                w, b = layers[layer]
                h[g] = torch.addmm(b, h[g], w.t())
                h[g] = torch.relu(h[g]) if layer < 2 else h[g]
        for logits in h:
            logits.argmax(-1)
        return None

    def group_order() -> object:
        return _group_order(x, weights, biases).argmax(-1)

    return {"member after member": member_order, "layer after layer, own calls": layer_order_own_calls,
            "layer after layer": group_order}


def _group_order(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> torch.Tensor:
    h = x.unsqueeze(0).expand(len(weights[0]), *x.shape).contiguous()
    for layer, (w, b) in enumerate(zip(weights, biases, strict=True)):
        h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        h = torch.relu(h) if layer < 2 else h
    return h


def _dse_against_plain(members: int, rows: int) -> dict[str, Callable[[], object]]:
    model = _group("fp32", members)
    net = model.net
    assert isinstance(net, torch.nn.Module)
    data = with_validation(load_dataset("mnist1d"))
    x, y = data.x_test[:rows].clone(), data.y_test[:rows].clone()
    linears = [m for m in model.modules() if isinstance(m, stacked.StackedGemmLayer)]
    weights = [m.weight.detach() for m in linears]
    biases = [m.bias.detach() for m in linears if m.bias is not None]

    def in_eval_mode(call: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            model.eval()
            try:
                with torch.no_grad():
                    return call()
            finally:
                model.train()
        return run

    alone = []
    for seed in range(members):  # each member's own run, as `train` prepares it (seeds as `_group`'s)
        torch.manual_seed(seed)
        config = TrainConfig(model="mlp", dataset="mnist1d", format="fp32", seed=seed, epochs=1)
        alone.append(prepare(build_model("mlp", data), config, torch.Generator().manual_seed(seed),
                             data.x_train[:EXAMPLE_SAMPLES], None).model)
    orders = _mlp_orders(members, rows)
    return {"evaluate_members": lambda: evaluate_members(model, members, x, y),
            "each member alone (`evaluate`)": lambda: [evaluate(own, x, y) for own in alone],
            "plain, member after member": orders["member after member"],
            "its forward": in_eval_mode(lambda: model(x.unsqueeze(0).expand(members, *x.shape))),
            "the net inside": in_eval_mode(lambda: net(x.unsqueeze(0).expand(members, *x.shape)
                                                        .reshape(-1, x.shape[-1]))),
            "plain, layer after layer, scored": lambda: _scored(_group_order(x, weights, biases), y)}


def _scored(logits: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Each member's accuracy as `evaluate_members` scores it, in plain torch."""
    correct = torch.zeros(len(logits), dtype=torch.int64)
    correct += (logits.argmax(-1) == y).sum(1)
    return [count / y.numel() for count in correct.tolist()]


def _orders(sizes: list[int], rounds: int, calls: int) -> None:
    keep_freed_memory()
    print("\nPlain torch, the MLP's forward: µs per member (thread CPU), fastest (median) of 5 x"
          f" {rounds} x {calls}")
    for rows in (1000, 333, 125, 8):
        for members in sizes:
            _interleaved(f"{rows:4} rows, G = {members:2}", _mlp_orders(members, rows), members, rounds,
                         calls)
    print("\ndse's group evaluation against the plain group order on its weights: µs per member")
    for rows in (1000, 8):
        for members in sizes:
            _interleaved(f"{rows:4} rows, G = {members:2}", _dse_against_plain(members, rows), members,
                         rounds, calls)


def _interleaved(label: str, ways: dict[str, Callable[[], object]], members: int, rounds: int,
                 calls: int) -> None:
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(5):  # interleaved: the load hits each alike
        for name, call in ways.items():
            times[name].append(_best_us(call, rounds, calls) / members)
    first = min(next(iter(times.values())))
    cells = [f"{name} {min(t):.0f} ({statistics.median(t):.0f}, {min(t) / first:.2f}x)"
             for name, t in times.items()]
    print(f"  {label}: " + "; ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="fp32,int8", help="comma-separated (default fp32,int8)")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--gemms", action="store_true", help="also time the Linears' GEMMs alone")
    parser.add_argument("--order", action="store_true",
                        help="only the ablations of the group's order and dse's Python (--sizes)")
    parser.add_argument("--sizes", default="3,8,12", help="group sizes of --order (default 3,8,12)")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}")
    with _run_settings(1):
        if args.order:
            _orders([int(size) for size in args.sizes.split(",")], args.rounds, args.calls)
        else:
            _evaluations(args.formats.split(","), args.members, args.rounds, args.calls)
            if args.gemms:
                _gemms(args.members, args.rounds, args.calls)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
