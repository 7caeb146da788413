"""Whether a group's batched GEMM sums each member's product as the member's own (dse/train/batched_sums.py):
the probe against the one-thread rule `bmm_sums_as_mm`, what the probe finds at more threads, and what
a probe costs.

    PYTHONPATH=. python benchmarks/batched_sums.py            # the full scan (a few minutes on 2 cores)
    PYTHONPATH=. python benchmarks/batched_sums.py --quick    # a smaller one
    PYTHONPATH=. python benchmarks/batched_sums.py --device cuda

Each shape (rows, reduction, columns) runs with each operand contiguous or transposed, with and
without a bias, for a group of 3, as `member_gemm` runs it (bmm / baddbmm against each member's mm /
addmm):
1. at one thread the probe's answer against `bmm_sums_as_mm` (on the CPU: they must agree everywhere);
2. at each thread count, how many shapes the batched call sums otherwise, how many of those
   `bmm_sums_as_mm` would have let through, and whether the probe's "sums alike" holds again on fresh
   random operands (a miss would be a shape whose difference the probe's data did not show);
3. a probe's cost (the first call of a layout) against a decided call and the product itself;
4. with `--train MODEL`: a group of 4 trained at `--train-threads` (2), each product decided as above
   against every product member by member (the probe answering "differs") and against the rule alone
   (the probe answering "alike": what a one-thread run did before a probe backed the rule there), side
   by side in this process, every round deciding its layouts anew as a new process does, CPU seconds,
   best of `--rounds`; and how many layouts the decided run probed;
5. with `--key-cost`: what the decision costs a decided call, at one thread - CPU microseconds of one
   `member_gemm` against the bare bmm / baddbmm it runs, interleaved in one process, best of
   `--rounds` x `--calls`, on the quickstart's MNIST-1D and the digits MLPs' GEMMs (G = 3) - and the
   parts of the decision's key one by one (`--key-parts`; on this tree's own functions, not portable
   to an older one):

    PYTHONPATH=. python benchmarks/batched_sums.py --key-cost --key-parts --rounds 5 --calls 3000
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.group_gemms import gemm_operands  # noqa: E402  (the tests' operands)

from dse.train import batched_sums  # noqa: E402
from dse.train.batched_sums import at_alone_alignment, bmm_sums_as_mm, sums_as_members  # noqa: E402
from dse.train.stacked import _batched_gemm, _own_gemm, member_gemm  # noqa: E402

MEMBERS = 3
FULL_SIZES = (1, 2, 3, 4, 7, 8, 16, 20, 31, 64, 100, 128, 200)
QUICK_SIZES = (1, 2, 3, 7, 16, 31, 64, 128)
LONG_REDUCTIONS = (256, 320, 513, 1024)
FRESH_DRAWS = 3


def operands(rows: int, reduction: int, columns: int, layout: tuple[bool, bool, bool], device: str,
             generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """The group's operands, each transposed in memory where `layout` says, a bias where its third
    entry says."""
    return gemm_operands(MEMBERS, rows, reduction, columns, *layout, generator, device)


def sums_alike(ops: tuple[torch.Tensor, ...]) -> bool:
    """The batched call against each member's own, on these operands at their alignment alone."""
    together = _batched_gemm(*ops)
    alone = [at_alone_alignment(o) for o in ops]
    return all(torch.equal(together[g].view(torch.int32), _own_gemm(*(o[g] for o in alone)).view(torch.int32))
               for g in range(MEMBERS))


def probe(ops: tuple[torch.Tensor, ...], scan: int) -> bool:
    return sums_as_members(("scan", scan, len(ops)), _batched_gemm, _own_gemm, ops)


def scan(sizes: tuple[int, ...], threads: int, device: str, pass_number: int) -> None:
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(1)
    layouts = list(itertools.product([False, True], repeat=3))
    shapes = [s for s in itertools.product(sizes, repeat=3)] + [
        (rows, reduction, columns) for reduction in LONG_REDUCTIONS for rows in (2, 4, 16, 64)
        for columns in (10, 64, 513)]
    counts = dict(shapes=0, differ=0, differ_where_rule=0, rule_disagrees=0, missed=0)
    started = time.perf_counter()
    for rows, reduction, columns in shapes:
        for layout in layouts:
            ops = operands(rows, reduction, columns, layout, device, generator)
            answer = probe(ops, pass_number)
            rule = bmm_sums_as_mm(rows, reduction, columns)
            counts["shapes"] += 1
            counts["differ"] += not answer
            counts["differ_where_rule"] += rule and not answer
            counts["rule_disagrees"] += rule != answer
            if answer:  # fresh operands of the same layout (the scan's generator moved on)
                fresh = (operands(rows, reduction, columns, layout, device, generator)
                         for _ in range(FRESH_DRAWS))
                counts["missed"] += not all(sums_alike(ops) for ops in fresh)
    seconds = time.perf_counter() - started
    print(f"{device}, {threads} thread(s): {counts['shapes']} shape-layouts ({seconds:.0f} s); the batched "
          f"call sums otherwise in {counts['differ']}, of which bmm_sums_as_mm holds in "
          f"{counts['differ_where_rule']}; probe != rule in {counts['rule_disagrees']}; probe's 'alike' "
          f"contradicted by {FRESH_DRAWS} fresh draws in {counts['missed']}")


def cost(device: str, threads: int) -> None:
    """A probe (the first call of a layout) against a decided call and the product itself, in us (CPU
    time on the CPU, so that other processes do not count; wall time on a GPU)."""
    torch.set_num_threads(threads)
    clock = time.process_time if device == "cpu" else time.perf_counter
    generator = torch.Generator().manual_seed(2)
    for number, (rows, reduction, columns) in enumerate([(64, 64, 128), (64, 128, 10), (128, 64, 1024),
                                                         (1024, 128, 64)]):
        ops = operands(rows, reduction, columns, (False, True, True), device, generator)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        started = clock()
        probe(ops, 1000 + number)
        sync()
        first_us = (clock() - started) * 1e6
        repeats = 200
        started = clock()
        for _ in range(repeats):
            probe(ops, 1000 + number)
        decided_us = (clock() - started) / repeats * 1e6
        started = clock()
        for _ in range(repeats):
            _batched_gemm(*ops)
        sync()
        product_us = (clock() - started) / repeats * 1e6
        print(f"  {rows} x {reduction} x {columns} (G = {MEMBERS}, bias), {threads} thread(s): probe "
              f"{first_us:.0f} us once, then {decided_us:.1f} us a call; the batched product "
              f"{product_us:.0f} us")


def training(model: str, threads: int, rounds: int) -> None:
    import dataclasses

    from dse.data import load_dataset
    from dse.train import TrainConfig
    from dse.train.grouped import train_group

    name = "mnist1d" if model == "cnn" else "sort-easy" if model == "transformer" else "digits"
    data = load_dataset(name)
    data = dataclasses.replace(data, x_train=data.x_train[:512], y_train=data.y_train[:512],
                               x_val=data.x_val[:128], y_val=data.y_val[:128], x_test=data.x_test[:128],
                               y_test=data.y_test[:128])
    base = TrainConfig(model=model, dataset=name, epochs=1, batch_size=64, threads=threads, format="int8")
    configs = [base.replace(seed=seed) for seed in range(4)]
    probe_before = batched_sums._probe
    modes = {"decided": probe_before, "member by member": lambda batched, each, operands: False,
             "rule alone": lambda batched, each, operands: True}  # rule alone: no probe (as before at 1)
    seconds: dict[str, float] = {}
    results: dict[str, list[float]] = {}
    probed = 0
    train_group(configs, data)  # warm-up: imports, first allocations, the thread pool
    for round_number in range(rounds):
        for mode, answer in list(modes.items())[::1 if round_number % 2 else -1]:
            batched_sums._DECIDED.clear()  # every round decides its layouts again, as a new process
            batched_sums._probe = answer  # type: ignore[assignment]
            started = time.process_time()
            try:
                trained = train_group(configs, data)
            finally:
                batched_sums._probe = probe_before  # type: ignore[assignment]
            seconds[mode] = min(seconds.get(mode, float("inf")), time.process_time() - started)
            results[mode] = [r.final_loss for r in trained]
            if mode == "decided":
                probed = len(batched_sums._DECIDED)
    same = results["decided"] == results["member by member"]
    print(f"{model} int8, G = 4, {threads} thread(s): decided {seconds['decided']:.2f} s ({probed} layouts "
          f"decided), member by member {seconds['member by member']:.2f} s "
          f"({seconds['member by member'] / seconds['decided']:.2f}x), the rule alone without a probe "
          f"{seconds['rule alone']:.2f} s ({seconds['rule alone'] / seconds['decided']:.3f}x); same results: "
          f"{same} (the rule alone: {results['rule alone'] == results['decided']})")


KEY_COST_GEMMS = {"mnist1d fwd 100 x 40 -> 256": (100, 40, 256, False, True, True),
                  "mnist1d bwd-data 100 x 256 -> 40": (100, 256, 40, False, False, False),
                  "mnist1d bwd-weight 256 x 100 -> 40": (256, 100, 40, True, False, False),
                  "mnist1d fwd 100 x 256 -> 10": (100, 256, 10, False, True, True),
                  "digits fwd 64 x 64 -> 128": (64, 64, 128, False, True, True),
                  "tiny fwd 8 x 24 -> 24": (8, 24, 24, False, True, True)}
"""(rows, reduction, columns, a transposed, b transposed, bias) of the GEMMs `--key-cost` times: a
Linear's forward takes x @ W^T + b, its backward-weight dy^T @ x (dy transposed)."""


def _cpu_us(step: Callable[[], object], calls: int) -> float:
    started = time.process_time()
    for _ in range(calls):
        step()
    return (time.process_time() - started) / calls * 1e6


def key_cost(rounds: int, calls: int, parts: bool) -> None:
    """What a decided `member_gemm` call costs beyond its bare batched call (module docstring, 5)."""
    torch.set_num_threads(1)
    print(f"CPU us a call, one thread, G = {MEMBERS}, best of {rounds} x {calls}; load "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| GEMM | bare | member_gemm | overhead | ratio |")
    print("|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for name, (rows, reduction, columns, *layout) in KEY_COST_GEMMS.items():
        ops = gemm_operands(MEMBERS, rows, reduction, columns, *layout, generator, "cpu")
        steps = _key_cost_steps(*ops)
        for step in steps.values():
            step()  # the probe, first allocations
        best = {key: float("inf") for key in steps}
        for _ in range(rounds):  # interleaved, so that load hits each alike
            for key, step in steps.items():
                best[key] = min(best[key], _cpu_us(step, calls))
        print(f"| {name} | {best['bare']:.2f} | {best['member_gemm']:.2f} | "
              f"{best['member_gemm'] - best['bare']:.2f} | {best['member_gemm'] / best['bare']:.3f}x |",
              flush=True)
    if parts:
        key_parts(rounds, calls * 10)


def _key_cost_steps(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None
                    ) -> dict[str, Callable[[], object]]:
    bare = (lambda: torch.bmm(a, b)) if bias is None else (lambda: torch.baddbmm(bias.unsqueeze(1), a, b))
    return {"bare": bare, "member_gemm": lambda: member_gemm(a, b, bias)}


def key_parts(rounds: int, calls: int) -> None:
    """The parts of a decided call's work one by one, on the mnist1d forward's operands."""
    from dse.train.stacked import _pads_output

    generator = torch.Generator().manual_seed(0)
    a, b, bias = gemm_operands(MEMBERS, 100, 40, 256, False, True, True, generator, "cpu")
    ops = (a, b, bias)
    key = ("baddbmm", batched_sums._library_state(a), tuple(map(batched_sums._layout, ops)), 2)
    steps: dict[str, Callable[[], object]] = {
        "_library_state": lambda: batched_sums._library_state(a),
        "_layout x 3": lambda: tuple(map(batched_sums._layout, ops)),
        "the whole key": lambda: ("baddbmm", batched_sums._library_state(a),
                                  tuple(map(batched_sums._layout, ops)), 2),
        "its lookup": lambda: batched_sums._DECIDED.get(key),
        "at_alone_alignment x 2": lambda: (at_alone_alignment(a), at_alone_alignment(b)),
        "_pads_output": lambda: _pads_output(a, b),
        "bmm_sums_as_mm": lambda: bmm_sums_as_mm(100, 40, 256),
        "aligned_sums_as_members (decided)": lambda: batched_sums.aligned_sums_as_members(
            "baddbmm", _batched_gemm, _own_gemm, ops, True, aligning=2),
        "empty_at_alone_alignment (a padded output)": lambda: batched_sums.empty_at_alone_alignment(
            (100, 10), MEMBERS, a)}
    for step in steps.values():
        step()
    best = {key: min(_cpu_us(step, calls) for _ in range(rounds)) for key, step in steps.items()}
    print(f"parts, CPU us a call (best of {rounds} x {calls}): "
          + ", ".join(f"{key} {us:.2f}" for key, us in best.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--train", default="", help="proxies to train: mlp,cnn,transformer")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--train-threads", type=int, default=2, help="threads of --train (default 2)")
    parser.add_argument("--key-cost", action="store_true", help="a decided member_gemm against its bare call")
    parser.add_argument("--key-parts", action="store_true", help="with --key-cost: the key's parts")
    parser.add_argument("--calls", type=int, default=3000, help="calls a timing of --key-cost")
    args = parser.parse_args()
    if args.key_cost:
        key_cost(args.rounds, args.calls, args.key_parts)
        return
    if args.train:
        for model in args.train.split(","):
            training(model, args.train_threads, args.rounds)
        return
    print(f"torch {torch.__version__}, {torch.backends.mkl.is_available() and 'MKL' or 'no MKL'}; "
          f"probe seed {batched_sums.PROBE_SEED}")
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    for number, threads in enumerate(int(t) for t in args.threads.split(",")):
        scan(sizes, threads, args.device, number)
    print("probe cost:")
    for threads in (int(t) for t in args.threads.split(",")):
        cost(args.device, threads)


if __name__ == "__main__":
    main()
