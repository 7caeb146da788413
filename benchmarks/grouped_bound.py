"""The ceiling of grouped training on the CPU: how fast ANY grouping that keeps each member's
arithmetic could make a quickstart trial and a quickstart sweep, from an exact split of a step's CPU
time.

    PYTHONPATH=$PWD /work/venv/bin/python benchmarks/grouped_bound.py              # all, ~5 min idle
    PYTHONPATH=$PWD /work/venv/bin/python benchmarks/grouped_bound.py --no-sweeps  # steps and GEMMs only

*The split.* For each of the quickstart's configurations (examples/quickstart.yaml, expanded as a
sweep expands it: fp32, int8, fp8_e4m3, posit8, int4, mxfp4 with SGD and an fp32 copy; lns8 with
LNS-Madam on an lns(16,gamma=2048) copy), one training step (forward, loss, backward, optimizer
step, zero_grad: benchmarks/grouped.py's `phase_steps`) alone and as a member of a group of 3 and 8,
interleaved in one process, one thread:
- *step*: CPU µs per member, the fastest step (process time, nothing attached) of --rounds x --steps:
  on a loaded machine the others' cache and memory traffic slows a typical step, mostly its
  elementwise passes, which would count as dispatch below and inflate the ceiling;
- every aten operation the step dispatches is timed in thread CPU time under a TorchDispatchMode
  (torch.profiler's clock is wall time, which counts preemption on a loaded machine). An operation's
  *arithmetic* is its time above the fixed cost of the same kind of operation on a one-element
  tensor (`call_floors_us`: an `mm` of 1x1 for the GEMMs, an `add` of one element for the rest),
  so the fixed per-call cost of allocation, TensorIterator and the kernel's entry counts as dispatch;
- *GEMM*: the arithmetic of mm/addmm/bmm/baddbmm (forward and backward; matmul and linear decompose
  into these before the mode sees them); *other*: the arithmetic of every other operation;
- *dispatch*: step - GEMM - other, the rest: Python, autograd, the dispatcher and each call's fixed
  cost.

*The ceiling.* A grouping that keeps each member's arithmetic and shares all its dispatch would
step a group of G in (dispatch alone) + G x (arithmetic): a member's best speed-up is
step / (arithmetic + dispatch / G), and step / arithmetic however large the group. The arithmetic
is the smaller of two estimates (`least_arithmetic`: alone's, and the group's growth per member
between the two largest sizes, in which every call's fixed cost cancels), each call's fastest run
counts, and every call's floor is dispatch: a generous ceiling, except that a call whose own fixed
cost lies above `add`'s (a view, an allocation, `item()`, a call taking Scalars or lists) counts the
excess as arithmetic alone; the group's growth cancelled most of it here (docs/training.md).

*Beyond exact grouping*: what the GEMMs of a member would cost if a group ran them
as one larger call, whatever its order of summation: each of the MLP's eight GEMM shapes as `mm`
alone (G calls), as one `bmm` of G, and, where members share an operand (the first layer reads
the same batch: a tuned-lr group's members of one seed), as one wider `mm`. The cheapest batched
form per member over mm alone, summed over the shapes, scales a member's GEMM arithmetic in a
second ceiling; a third takes the step's GEMM flops at the library's own rate on a large square mm
(1024^3), the practical peak no grouping of these GEMMs passes.

*The sweeps.* `dse sweep` of the quickstart (21 trials) and of its 4-tuned-lr version (84) one trial
at a time, end to end (benchmarks/sweep.py's `timed_cli`): its wall time E and its trials' training
seconds per format T_f (from the store). What is not training, R = E - sum(T_f) / workers (imports,
planning, energy, worker start, reports: benchmarks/sweep.py --child-stages splits a full plan), is
paid by a grouped sweep too. The best grouped sweep takes R + sum(T_f / (workers x ceiling_f)),
where ceiling_f is the format's step ceiling applied to its stored training seconds (evaluation
included: not split, an assumption; evaluation's batches of 1024 hold ten times a step's rows; the
model's setup is outside them, in R); the ratio of the
training alone, fixed costs aside, is sum(T_f) / sum(T_f / ceiling_f); E / R is what no training
speed-up passes.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS.parent))
sys.path.insert(0, str(BENCHMARKS))

from grouped import phase_steps  # noqa: E402
from sweep import SWEEPS, quickstart_text, timed_cli  # noqa: E402

from dse.data import Dataset, load_dataset  # noqa: E402
from dse.train.config import TrainConfig  # noqa: E402
from dse.train.loop import _run_settings  # noqa: E402

GEMMS = frozenset({"mm", "addmm", "bmm", "baddbmm", "addbmm", "_addmm_activation"})
"""aten GEMM operations as a dispatch mode sees them (matmul and linear decompose into these first)."""
WARMUP_STEPS = 20


class _OpTimer(TorchDispatchMode):
    """Thread CPU ns of every aten call, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        started = time.thread_time_ns()
        out = func(*args, **(kwargs or {}))
        self.calls.append((func.overloadpacket.__name__, time.thread_time_ns() - started))
        return out


def call_floors_us(calls: int = 400) -> tuple[float, float]:
    """(GEMM, other): median thread CPU µs of a call on one-element operands under the timer, the
    fixed cost of an aten call (allocation, dispatch below the mode, the kernel's entry)."""
    one = torch.ones(1, 1)
    with _OpTimer() as timer:
        for _ in range(calls):
            torch.mm(one, one)
            torch.add(one, one)
    by_name = {name: [ns for n, ns in timer.calls if n == name] for name in ("mm", "add")}
    return statistics.median(by_name["mm"]) / 1e3, statistics.median(by_name["add"]) / 1e3


@dataclass(frozen=True)
class Split:
    """A training step's CPU µs per member: the whole step, the arithmetic of its GEMMs and of its other
    operations, and the aten calls it dispatches."""

    step_us: float
    gemm_us: float
    other_us: float
    calls: float

    @property
    def dispatch_us(self) -> float:
        return self.step_us - self.gemm_us - self.other_us

    @property
    def arithmetic_us(self) -> float:
        return self.gemm_us + self.other_us


def least_arithmetic(splits: dict[int, Split]) -> Split:
    """The step alone with each of its GEMM and other arithmetic the smaller of two estimates: alone's
    calls above their floors, and what the group's calls add per member between its two largest sizes
    a < b, (b x A_b - a x A_a) / (b - a), where each call's fixed cost cancels however far above the
    floor it lies (a format whose quantizer makes many small calls alone counts their excess there as
    arithmetic). The smaller is the generous estimate of what a member's arithmetic must cost."""
    alone = splits[0]
    sizes = sorted(members for members in splits if members)
    if len(sizes) < 2:
        return alone
    a, b = sizes[-2], sizes[-1]

    def grown(part: str) -> float:
        return max(0.0, (b * getattr(splits[b], part) - a * getattr(splits[a], part)) / (b - a))

    return Split(alone.step_us, min(alone.gemm_us, grown("gemm_us")), min(alone.other_us, grown("other_us")),
                 alone.calls)


def member_ceiling(alone: Split, members: float, gemm_scale: float = 1.0) -> float:
    """A member's best speed-up in a group of `members` that keeps each member's arithmetic (its GEMMs'
    times gemm_scale) and shares all of a step's dispatch."""
    shared = 0.0 if math.isinf(members) else alone.dispatch_us / members
    return alone.step_us / (alone.other_us + alone.gemm_us * gemm_scale + shared)


def _run(steps: list[Callable[[Any], Any]], count: int) -> None:
    for _ in range(count):
        value: object = None
        for phase in steps:
            value = phase(value)


def step_splits(config: TrainConfig, data: Dataset, sizes: list[int], steps: int, timed_steps: int,
                rounds: int, floors: tuple[float, float], warmup: int = WARMUP_STEPS) -> dict[int, Split]:
    """Split per member of one step of `config` alone (key 0) and in groups of `sizes`, interleaved over
    `rounds`: the step's least CPU time over rounds x steps (as its calls' fastest runs: what it costs
    when no other process on the machine slows its caches down), its calls timed over rounds x
    timed_steps."""
    runs = {members: phase_steps(config, members, data) for members in [0, *sizes]}
    for run in runs.values():
        _run(run, warmup)
    step_ns: dict[int, list[int]] = {members: [] for members in runs}
    calls: dict[int, list[list[tuple[str, int]]]] = {members: [] for members in runs}
    for _ in range(rounds):
        for members, run in runs.items():
            for _ in range(steps):
                started = time.process_time_ns()
                _run(run, 1)
                step_ns[members].append(time.process_time_ns() - started)
            for _ in range(timed_steps):
                with _OpTimer() as timer:
                    _run(run, 1)
                calls[members].append(timer.calls)
    return {members: _split(min(step_ns[members]) / 1e3, calls[members], max(members, 1), floors)
            for members in runs}


def _split(step_us: float, steps: list[list[tuple[str, int]]], members: int,
           floors: tuple[float, float]) -> Split:
    """The split per member of a step of `step_us` whose calls were timed over `steps`: each call's
    arithmetic is its least time over the steps above its kind's floor (a call slowed by preemption's
    cache misses or the timer's own Python counts as little as its fastest run: a generous ceiling)."""
    if len({tuple(name for name, _ in step) for step in steps}) != 1:
        raise ValueError("the timed steps dispatched different operations")
    gemm = other = 0.0
    for position, (name, _) in enumerate(steps[0]):
        fastest_us = min(step[position][1] for step in steps) / 1e3
        if name in GEMMS:
            gemm += max(0.0, fastest_us - floors[0])
        else:
            other += max(0.0, fastest_us - floors[1])
    return Split(step_us / members, gemm / members, other / members, float(len(steps[0])))


def quickstart_configs(tuned: bool = False) -> dict[str, TrainConfig]:
    """The quickstart's configurations by format name, as `dse sweep` expands them (seed 0)."""
    from dse.sweep import expand, parse_config

    configs: dict[str, TrainConfig] = {}
    for trial in expand(parse_config(quickstart_text(None, tuned), "quickstart.yaml")):
        configs.setdefault(format_name(trial.config), trial.config.replace(seed=0))
    return configs


def format_name(config: TrainConfig) -> str:
    return str(config.format or "fp32")


# --- beyond exact grouping: a group's GEMMs as one larger call ------------------------------------

LAYERS = ((40, 256), (256, 256), (256, 10))
"""The quickstart MLP's layers (inputs, outputs); batch 100."""


def gemm_forms(batch: int, inputs: int, outputs: int, kind: str, members: int, shared_input: bool,
               ) -> dict[str, Callable[[], object]]:
    """One GEMM of a member's linear layer (kind forward / data grad / weight grad, with nn.Linear's
    layouts) for `members` members: as G `mm` calls, as one `bmm`, and for the forward and the weight
    gradient of a layer that reads the batch itself (`shared_input`) as one wider `mm` over it."""
    x = torch.randn(members, batch, inputs)
    w = torch.randn(members, outputs, inputs)
    g = torch.randn(members, batch, outputs)
    alone_x = [x[m].clone() for m in range(members)]
    alone_w = [w[m].clone() for m in range(members)]
    alone_g = [g[m].clone() for m in range(members)]
    shared_x = x[0].clone()
    if kind == "forward":
        wide_w = w.reshape(members * outputs, inputs).clone()
        forward = {"mm": lambda: [torch.mm(a, b.t()) for a, b in zip(alone_x, alone_w, strict=True)],
                   "bmm": lambda: torch.bmm(x, w.transpose(1, 2))}
        return forward | ({"wide mm": lambda: torch.mm(shared_x, wide_w.t())} if shared_input else {})
    if kind == "data grad":
        return {"mm": lambda: [torch.mm(a, b) for a, b in zip(alone_g, alone_w, strict=True)],
                "bmm": lambda: torch.bmm(g, w)}
    wide_g = g.transpose(0, 1).reshape(batch, members * outputs).clone()
    weight = {"mm": lambda: [torch.mm(a.t(), b) for a, b in zip(alone_g, alone_x, strict=True)],
              "bmm": lambda: torch.bmm(g.transpose(1, 2), x)}
    return weight | ({"wide mm": lambda: torch.mm(wide_g.t(), shared_x)} if shared_input else {})


Layers = tuple[tuple[int, int], ...]
GemmTimes = dict[int, dict[tuple[str, int, int], dict[str, float]]]
"""CPU µs per member by group size, GEMM (kind, inputs, outputs) and form."""


def mlp_gemms(batch: int = 100, layers: Layers = LAYERS) -> list[tuple[str, int, int, int]]:
    """(kind, inputs, outputs, rows) of every GEMM of a step: three forwards, the data gradients of all
    but the first layer, three weight gradients."""
    shapes = [("forward", i, o, batch) for i, o in layers]
    shapes += [("data grad", i, o, batch) for i, o in layers[1:]]
    return shapes + [("weight grad", i, o, batch) for i, o in layers]


def gemm_batching(sizes: list[int], rounds: int, calls: int, batch: int = 100,
                  layers: Layers = LAYERS) -> GemmTimes:
    """CPU µs per member of each GEMM form, per group size and shape, best of rounds, interleaved."""
    results: GemmTimes = {}
    for members in sizes:
        results[members] = {}
        for kind, inputs, outputs, rows in mlp_gemms(batch, layers):
            shared = (inputs, outputs) == layers[0]
            forms = gemm_forms(rows, inputs, outputs, kind, members, shared_input=shared)
            best = {form: math.inf for form in forms}
            for form in forms.values():
                form()
            for _ in range(rounds):
                for name, form in forms.items():
                    started = time.process_time()
                    for _ in range(calls):
                        form()
                    best[name] = min(best[name], (time.process_time() - started) / calls / members * 1e6)
            results[members][(kind, inputs, outputs)] = best
    return results


def batched_gemm_scale(forms: dict[tuple[str, int, int], dict[str, float]]) -> float:
    """A step's GEMM time per member in its cheapest batched forms over its time as mm alone."""
    return (sum(min(v for k, v in by_form.items() if k != "mm") for by_form in forms.values())
            / sum(by_form["mm"] for by_form in forms.values()))


def gemm_peak_gflops(size: int = 1024, rounds: int = 3) -> float:
    """The GEMM library's own best rate on one thread: GFLOP/s of a large square mm, the practical
    peak that no batching or widening of a member's GEMMs passes."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    fastest = math.inf
    for _ in range(rounds):
        started = time.process_time()
        torch.mm(a, b)
        fastest = min(fastest, time.process_time() - started)
    return 2 * size**3 / fastest / 1e9


def step_gemm_flops(batch: int = 100, layers: Layers = LAYERS) -> int:
    """Floating-point operations (2 per multiply-add) of a step's GEMMs."""
    return sum(2 * rows * inputs * outputs for _, inputs, outputs, rows in mlp_gemms(batch, layers))


# --- the sweeps ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepTimes:
    """A sweep one trial at a time: end-to-end wall seconds, its trials' training seconds by format."""

    end_to_end_s: float
    training_s: dict[str, float]
    workers: int = 2

    @property
    def rest_s(self) -> float:
        """What is not training: paid by a grouped sweep too."""
        return self.end_to_end_s - sum(self.training_s.values()) / self.workers


def sweep_ceiling(times: SweepTimes, ceilings: dict[str, float]) -> float:
    """The best end-to-end ratio (alone over grouped) when each format's training speeds up by its ceiling."""
    training = sum(seconds / ceilings[name] for name, seconds in times.training_s.items())
    return times.end_to_end_s / (times.rest_s + training / times.workers)


def training_ceiling(times: SweepTimes, ceilings: dict[str, float]) -> float:
    """The best ratio of the sweep's training alone (its fixed costs aside), each format at its ceiling."""
    return (sum(times.training_s.values())
            / sum(seconds / ceilings[name] for name, seconds in times.training_s.items()))


def measure_sweep(name: str, root: Path) -> tuple[SweepTimes, Path]:
    """`dse sweep` of `name` (quickstart, tuned) one trial at a time, and its store."""
    from dse.sweep import load_trials

    config = root / f"{name}.yaml"
    config.write_text(quickstart_text(None, SWEEPS[name][0]))
    output = root / f"{name}-alone"
    wall, _ = timed_cli(config, output, 1)
    frame = load_trials(output)
    by_format = frame.groupby("weights")["wall_time_s"].sum()
    return SweepTimes(wall, {str(k): float(v) for k, v in by_format.items()}), output


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default=None, help="quickstart formats to split (default: all seven)")
    parser.add_argument("--sizes", default="3,8", help="group sizes (default 3,8)")
    parser.add_argument("--steps", type=int, default=200, help="steps timed per round (default 200)")
    parser.add_argument("--timed-steps", type=int, default=30, help="steps under the op timer per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, best kept (default 3)")
    parser.add_argument("--no-sweeps", action="store_true", help="skip the end-to-end sweeps")
    parser.add_argument("--sweeps", default="quickstart,tuned")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    data = load_dataset("mnist1d")
    configs = quickstart_configs()
    names = args.formats.split(",") if args.formats else list(configs)
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, 1 thread; "
          f"load average at start {load()}")
    with _run_settings(1):
        floors = call_floors_us()
        print(f"fixed cost of an aten call under the timer (median): mm 1x1 {floors[0]:.2f} µs, "
              f"add of one element {floors[1]:.2f} µs")
        print(f"\nA step's CPU µs per member (fastest of {args.rounds} x {args.steps} steps; each call's "
              f"fastest of {args.rounds} x {args.timed_steps}): step = GEMM arithmetic + other arithmetic "
              "+ dispatch (Python, autograd, each call's fixed cost); aten calls per step")
        print("| format | members | step µs | GEMM | other | dispatch | calls | member speed-up measured "
              "| ceiling at G | ceiling, any G |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        ceilings: dict[str, Split] = {}
        for name in names:
            splits = step_splits(configs[name], data, sizes, args.steps, args.timed_steps, args.rounds,
                                 floors)
            alone = splits[0]
            ceilings[name] = basis = least_arithmetic(splits)
            for members, split in [*splits.items(), (-1, basis)]:
                share = (f"{split.gemm_us:.0f} ({split.gemm_us / split.step_us:.0%}) | "
                         f"{split.other_us:.0f} ({split.other_us / split.step_us:.0%}) | "
                         f"{split.dispatch_us:.0f} ({split.dispatch_us / split.step_us:.0%})")
                if members == 0:
                    tail = "| | | |"
                elif members == -1:
                    tail = f"| | | {member_ceiling(basis, math.inf):.2f}x |"
                else:
                    tail = (f"| {alone.step_us / split.step_us:.2f}x | {member_ceiling(basis, members):.2f}x "
                            "| |")
                label = {0: "alone", -1: "alone, least arithmetic"}.get(members, str(members))
                print(f"| {name} | {label} | {split.step_us:.0f} | {share} | {split.calls:.0f} {tail}",
                      flush=True)
        print(f"(load average after: {load()})")

        gemm_sizes = sorted({*sizes, 16})
        forms = gemm_batching(gemm_sizes, args.rounds, 200)
        print(f"\nBeyond exact grouping: CPU µs per member of each GEMM of a step (batch 100, best of "
              f"{args.rounds} x 200): mm alone / one bmm of G / one wider mm over the shared batch")
        print("| GEMM (rows x reduction x columns) | " + " | ".join(f"G = {g}" for g in gemm_sizes) + " |")
        print("|---|" + "---|" * len(gemm_sizes))
        for kind, inputs, outputs, rows in mlp_gemms():
            m, k, n = {"forward": (rows, inputs, outputs), "data grad": (rows, outputs, inputs),
                       "weight grad": (outputs, rows, inputs)}[kind]
            cells = []
            for members in gemm_sizes:
                by_form = forms[members][(kind, inputs, outputs)]
                cells.append(" / ".join(f"{by_form[f]:.1f}" if f in by_form else "-"
                                        for f in ("mm", "bmm", "wide mm")))
            print(f"| {kind} {m}x{k}x{n} | " + " | ".join(cells) + " |")
        scales = {members: batched_gemm_scale(forms[members]) for members in gemm_sizes}
        print("a member's GEMMs in their cheapest batched form over mm alone: "
              + ", ".join(f"G = {g} {scales[g]:.2f}" for g in gemm_sizes))
        peak = gemm_peak_gflops()
        alone_us = min(sum(by_form["mm"] for by_form in forms[g].values()) for g in gemm_sizes)
        at_peak_us = step_gemm_flops() / peak / 1e3
        print(f"a step's GEMMs ({step_gemm_flops() / 1e6:.1f} MFLOP) as mm alone: {alone_us:.0f} µs "
              f"({step_gemm_flops() / alone_us / 1e3:.0f} GFLOP/s); at the library's large-GEMM rate "
              f"(1024x1024x1024 mm, {peak:.0f} GFLOP/s): {at_peak_us:.0f} µs, {at_peak_us / alone_us:.2f} "
              "of mm alone")
        scales[0] = at_peak_us / alone_us
        print("\nmember ceiling with a step's dispatch shared and its GEMMs batched as above, and, "
              "any G, its GEMMs at the large-GEMM rate: "
              + "; ".join(f"{name} " + ", ".join(
                  f"G = {g} {member_ceiling(split, g, scales[g]):.2f}x" for g in gemm_sizes)
                  + f", at peak {member_ceiling(split, math.inf, scales[0]):.2f}x"
                  for name, split in ceilings.items()))
        print(f"(load average after: {load()})")

    if args.no_sweeps:
        return
    best_scale = min(scales.values())
    with tempfile.TemporaryDirectory(prefix="dse-bound-") as tmp:
        for sweep in args.sweeps.split(","):
            before = load()
            times, output = measure_sweep(sweep, Path(tmp))
            ceiling = {name: member_ceiling(ceilings[name], math.inf) for name in times.training_s}
            batched = {name: member_ceiling(ceilings[name], math.inf, best_scale)
                       for name in times.training_s}
            command = [sys.executable, str(BENCHMARKS / "sweep.py"), "--child-stages",
                       str(Path(tmp) / f"{sweep}.yaml"), str(output)]
            stages = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()
            print(f"\n{sweep} ({SWEEPS[sweep][1]} trials) one trial at a time, 2 workers (load average "
                  f"before {before}): {times.end_to_end_s:.1f} s end to end, training "
                  f"{sum(times.training_s.values()):.1f} s summed over trials ("
                  + ", ".join(f"{k} {v:.1f}" for k, v in times.training_s.items())
                  + f"), the rest {times.rest_s:.1f} s; a full plan's stages (CPU s): "
                  + "; ".join(stages.splitlines()))
            print(f"  best end-to-end ratio of any grouping that keeps each member's arithmetic: "
                  f"{sweep_ceiling(times, ceiling):.2f}x; with the GEMMs batched as above or at the "
                  f"large-GEMM rate, whichever is cheaper: {sweep_ceiling(times, batched):.2f}x; "
                  f"its training alone, fixed costs aside: {training_ceiling(times, ceiling):.2f}x; "
                  "with training free: "
                  f"{times.end_to_end_s / times.rest_s:.2f}x")


if __name__ == "__main__":
    main()
