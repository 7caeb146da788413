"""Where grouping's gain goes: a quickstart training step of a group of G, per member, against the
same step alone, aten call by aten call, and the step of the same network grouped by hand in plain
torch (no dse).

    PYTHONPATH=$PWD /work/venv/bin/python benchmarks/grouped_gap.py                  # 7 formats, G = 3, 12
    PYTHONPATH=$PWD /work/venv/bin/python benchmarks/grouped_gap.py --formats fp32 --sizes 3

For each of the quickstart's configurations (`grouped_bound.quickstart_configs`; G = 12 as the tuned
sweep's groups: each member its own lr, 4 runs of equal ones) one training step (forward, loss,
backward, optimizer step, zero_grad: benchmarks/grouped.py's `phase_steps`) alone and in a group,
interleaved in one process, one thread:
- *step*: CPU µs per member (process time, median and fastest of --rounds x --steps);
- every aten call timed in thread CPU time under a dispatch mode (`grouped_bound._OpTimer`), summed
  per operation name (each name's fastest step of --rounds x --timed-steps): *aten* is their sum,
  *outside* = step (fastest) - aten: Python, autograd's engine and what the dispatcher does above the
  mode (the timer's own cost per call is inside aten: `timer_cost_us` says how much);
- the operations whose time per member grows most over alone (a name that runs only in the group,
  bmm for mm say, counts whole, with what it replaces among those that shrink).

*By hand* (fp32 only): the quickstart MLP grouped in plain torch, as any stacking would (weights
(G, out, in), one baddbmm per layer, each member's weight gradient as dy^T x, torch's SGD over the
stacked parameters, one log_softmax and nll_loss over all rows), and its network alone as torch.nn
runs it; bits are not compared (no alignment, no probes). What dse's group adds over it is an upper
bound of what any cut inside dse can give; what the hand-made group still lacks of its ceiling is
torch's and the CPU's. The group steps run as dse's processes run them, with freed memory kept
(dse/train/allocator.py).

*--faults*: the allocator's part, as an ablation: each format's step alone and in groups in child
processes, alternately with glibc's own thresholds and with `keep_freed_memory`, --rounds times:
minor page faults and system CPU µs per step, and CPU µs per member (fastest round); with --whole,
per 15-epoch `train` / `train_group` call instead (setup and evaluation included).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS.parent))
sys.path.insert(0, str(BENCHMARKS))

from grouped import phase_steps  # noqa: E402
from grouped_bound import WARMUP_STEPS, _OpTimer, _run, format_name, load, quickstart_configs  # noqa: E402

from dse.data import Dataset, load_dataset  # noqa: E402
from dse.train.allocator import keep_freed_memory  # noqa: E402
from dse.train.config import TrainConfig  # noqa: E402
from dse.train.loop import _run_settings  # noqa: E402

Steps = list[Callable[[Any], Any]]


def tuned_lrs(name: str, members: int) -> list[float] | None:
    """The learning rates of a tuned-sweep group of `members` of format `name`, in plan order (None
    for a group of seeds alone: fewer members than the tuned bucket has lrs x seeds does not apply)."""
    from sweep import quickstart_text

    from dse.sweep import expand, parse_config

    bucket = [t.config for t in expand(parse_config(quickstart_text(None, True), "tuned.yaml"))
              if format_name(t.config) == name]
    if members != len(bucket):
        return None
    return [float(config.lr) for config in bucket]  # type: ignore[arg-type]


def grouped_steps(config: TrainConfig, members: int, data: Dataset) -> Steps:
    """A step of `config` alone (members 0) or in a group of `members` (12: the tuned sweep's lrs)."""
    lrs = tuned_lrs(format_name(config), members) if members else None
    if lrs is not None:
        return phase_steps(config.replace(lr=lrs[0]), members, data, lrs)
    return phase_steps(config, members, data)


def by_hand(members: int, data: Dataset, momentum: float, lr: float = 0.1) -> Steps:
    """The quickstart MLP's fp32 SGD step in plain torch: torch.nn alone (members 0), or grouped."""
    x, y = data.x_train[:100], data.y_train[:100]
    torch.manual_seed(0)
    if members == 0:
        model = torch.nn.Sequential(torch.nn.Linear(40, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                    torch.nn.ReLU(), torch.nn.Linear(256, 10))
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)

        def alone(_: object) -> None:
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return [alone]
    shapes = ((40, 256), (256, 256), (256, 10))
    weights = [(torch.randn(members, o, i) / i ** 0.5).requires_grad_() for i, o in shapes]
    biases = [torch.zeros(members, o).requires_grad_() for _, o in shapes]
    optimizer = torch.optim.SGD([*weights, *biases], lr=lr, momentum=momentum)
    xs, ys = x.expand(members, -1, -1).contiguous(), y.repeat(members)

    class Linear(torch.autograd.Function):  # the weight gradient as dy^T x: no transposed copy
        @staticmethod
        def forward(ctx: Any, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(h, w)
            return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))

        @staticmethod
        def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            h, w = ctx.saved_tensors
            return torch.bmm(dy, w), torch.bmm(dy.transpose(1, 2), h), dy.sum(1)

    def group(_: object) -> None:
        h = xs
        for layer, (w, b) in enumerate(zip(weights, biases, strict=True)):
            h = Linear.apply(h, w, b)
            h = torch.relu(h) if layer < 2 else h
        (F.nll_loss(F.log_softmax(h.reshape(-1, 10), -1), ys) * members).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [group]


def timer_cost_us(calls: int = 2000) -> float:
    """CPU µs the op timer adds to a one-element add beyond the bare call (median of 5 runs)."""
    one = torch.ones(1)
    runs = []
    for _ in range(5):
        started = time.thread_time_ns()
        for _ in range(calls):
            torch.add(one, one)
        bare = time.thread_time_ns() - started
        with _OpTimer() as timer:
            for _ in range(calls):
                torch.add(one, one)
        runs.append((sum(ns for _, ns in timer.calls) - bare) / calls / 1e3)
    return statistics.median(runs)


class Measured:
    """One step's CPU µs (process time) and its aten calls' thread CPU µs by name, per member."""

    def __init__(self, steps: Steps, members: int) -> None:
        self.steps, self.members = steps, max(members, 1)
        self.step_ns: list[int] = []
        self.op_ns: dict[str, list[int]] = defaultdict(list)
        self.calls: dict[str, int] = {}

    def time(self, steps: int, timed_steps: int) -> None:
        for _ in range(steps):
            started = time.process_time_ns()
            _run(self.steps, 1)
            self.step_ns.append(time.process_time_ns() - started)
        for _ in range(timed_steps):
            with _OpTimer() as timer:
                _run(self.steps, 1)
            summed: dict[str, int] = defaultdict(int)
            counts: dict[str, int] = defaultdict(int)
            for name, ns in timer.calls:
                summed[name] += ns
                counts[name] += 1
            for name, ns in summed.items():
                self.op_ns[name].append(ns)
            self.calls = dict(counts)

    def step_us(self, fastest: bool = False) -> float:
        return (min(self.step_ns) if fastest else statistics.median(self.step_ns)) / 1e3 / self.members

    def ops_us(self) -> dict[str, float]:
        return {name: min(ns) / 1e3 / self.members for name, ns in self.op_ns.items()}

    def aten_us(self) -> float:
        return sum(self.ops_us().values())

    def call_count(self) -> float:
        return sum(self.calls.values()) / self.members


def measure(runs: dict[str, tuple[Steps, int]], rounds: int, steps: int, timed_steps: int
            ) -> dict[str, Measured]:
    measured = {key: Measured(run, members) for key, (run, members) in runs.items()}
    for m in measured.values():
        _run(m.steps, WARMUP_STEPS)
    for _ in range(rounds):  # interleaved, so that load hits each alike
        for m in measured.values():
            m.time(steps, timed_steps)
    return measured


def added(alone: Measured, group: Measured, top: int) -> str:
    """The operations whose µs per member grow most in the group, largest first."""
    a, g = alone.ops_us(), group.ops_us()
    grown = sorted(((g.get(n, 0.0) - a.get(n, 0.0), n) for n in set(a) | set(g)), reverse=True)
    return ", ".join(f"{n} {d:+.0f}" for d, n in grown[:top] if d > 0.5)


def row(name: str, members: int, alone: Measured, group: Measured, top: int) -> str:
    return (f"| {name} | {members} | {alone.step_us():.0f} / {group.step_us():.0f} "
            f"| {alone.step_us(True):.0f} / {group.step_us(True):.0f} "
            f"| {alone.step_us() / group.step_us():.2f}x "
            f"| {alone.call_count():.0f} / {group.call_count():.0f} "
            f"| {alone.aten_us():.0f} / {group.aten_us():.0f} "
            f"| {alone.step_us(True) - alone.aten_us():.0f} / {group.step_us(True) - group.aten_us():.0f} "
            f"| {added(alone, group, top)} |")


def faults_child(name: str, sizes: list[int], steps: int, kept: bool, whole: bool) -> None:
    """One child of --faults: per size (0: alone) a line `size faults sys_us member_us` per step, or
    (`whole`) per `train` / `train_group` call of the quickstart's 15 epochs."""
    import dse.train.grouped as grouped

    if kept:  # else glibc's own thresholds
        keep_freed_memory()
    data = load_dataset("mnist1d")
    config = quickstart_configs()[name]
    if whole:
        from dse.data import with_validation
        from dse.train.loop import train

        data = with_validation(data)
        grouped.train_group([config.replace(seed=seed, epochs=1) for seed in range(2)], data)  # warm
        for members in [0, *sizes]:
            before, started = resource.getrusage(resource.RUSAGE_SELF), time.process_time_ns()
            if members:
                grouped.train_group([config.replace(seed=seed) for seed in range(members)], data)
            else:
                train(config, data)
            elapsed, after = time.process_time_ns() - started, resource.getrusage(resource.RUSAGE_SELF)
            print(members, (after.ru_minflt - before.ru_minflt), (after.ru_stime - before.ru_stime) * 1e6,
                  elapsed / 1e3 / max(members, 1))
        return
    with _run_settings(1):
        for members in [0, *sizes]:
            run = grouped_steps(config, members, data)
            _run(run, WARMUP_STEPS)
            before, started = resource.getrusage(resource.RUSAGE_SELF), time.process_time_ns()
            _run(run, steps)
            elapsed, after = time.process_time_ns() - started, resource.getrusage(resource.RUSAGE_SELF)
            print(members, (after.ru_minflt - before.ru_minflt) / steps,
                  (after.ru_stime - before.ru_stime) / steps * 1e6, elapsed / 1e3 / steps / max(members, 1))


def faults(names: list[str], sizes: list[int], steps: int, rounds: int, whole: bool) -> None:
    per = "whole 15-epoch train / train_group call" if whole else "step"
    print(f"\nThe allocator's part (--faults): per {per}, minor page faults / system CPU µs, and CPU µs per "
          f"member, with glibc's own thresholds -> with freed memory kept (fastest of {rounds} child "
          f"processes each, alternating" + ("" if whole else f", {steps} steps") + ")")
    print(f"| format | G | faults per {per} | system µs | µs per member | member speed-up |")
    print("|---|---|---|---|---|---|")
    for name in names:
        best: dict[bool, dict[int, list[float]]] = {False: {}, True: {}}
        for _ in range(rounds):
            for kept in (False, True):
                command = [sys.executable, __file__, "--faults-child", name, "--sizes",
                           ",".join(map(str, sizes)), "--steps", str(steps)] + (["--kept"] if kept else []) \
                    + (["--whole"] if whole else [])
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                for line in output.splitlines():
                    members, *values = line.split()
                    previous = best[kept].get(int(members))
                    now = [float(v) for v in values]
                    if previous is None or now[2] < previous[2]:
                        best[kept][int(members)] = now
        for members in sizes:
            glibc, kept_ = best[False][members], best[True][members]
            print(f"| {name} | {members} | {glibc[0]:.0f} -> {kept_[0]:.0f} "
                  f"| {glibc[1]:.0f} -> {kept_[1]:.0f} "
                  f"| {glibc[2]:.0f} -> {kept_[2]:.0f} | {best[False][0][2] / glibc[2]:.2f}x -> "
                  f"{best[True][0][2] / kept_[2]:.2f}x |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default=None, help="quickstart formats (default: all seven)")
    parser.add_argument("--sizes", default="3,12", help="group sizes (default 3,12)")
    parser.add_argument("--steps", type=int, default=100, help="steps timed per round (default 100)")
    parser.add_argument("--timed-steps", type=int, default=10, help="steps under the op timer per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--top", type=int, default=6, help="operations listed per row (default 6)")
    parser.add_argument("--faults", action="store_true", help="only the allocator's part (see above)")
    parser.add_argument("--whole", action="store_true",
                        help="--faults: whole 15-epoch runs (setup and evaluation too), not steps")
    parser.add_argument("--faults-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--kept", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    if args.faults_child:
        faults_child(args.faults_child, sizes, args.steps, args.kept, args.whole)
        return
    configs = quickstart_configs()
    names = args.formats.split(",") if args.formats else list(configs)
    if args.faults:
        print(f"torch {torch.__version__}, 1 thread; load average at start {load()}")
        faults(names, sizes, args.steps, args.rounds, args.whole)
        print(f"(load average after: {load()})")
        return
    keep_freed_memory()  # as dse's processes run
    data = load_dataset("mnist1d")
    print(f"torch {torch.__version__}, 1 thread; load average at start {load()}")
    with _run_settings(1):
        print(f"the op timer's own cost per aten call (counted in aten below): {timer_cost_us():.2f} µs")
        print("\nCPU µs per member of a step, alone / grouped: step (median, fastest), aten calls, "
              "aten µs (sum of each operation's fastest), outside aten (fastest step - aten); "
              "the operations that grow most per member (µs)")
        print("| format | G | step median | step fastest | speed-up | calls | aten | outside | grown |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name in names:
            for members in sizes:
                measured = measure({"alone": (grouped_steps(configs[name], 0, data), 0),
                                    "group": (grouped_steps(configs[name], members, data), members)},
                                   args.rounds, args.steps, args.timed_steps)
                print(row(name, members, measured["alone"], measured["group"], args.top), flush=True)
            if name == "fp32":
                for members in sizes:
                    momentum = float(configs[name].momentum or 0.0)
                    measured = measure({"alone": (by_hand(0, data, momentum), 0),
                                        "group": (by_hand(members, data, momentum), members)},
                                       args.rounds, args.steps, args.timed_steps)
                    print(row("fp32 by hand", members, measured["alone"], measured["group"], args.top),
                          flush=True)
        print(f"(load average after: {load()})")


if __name__ == "__main__":
    main()
