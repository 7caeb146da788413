"""Grouped training's speed per trial: one run alone against a member of a group of G
(dse.train.grouped.train_group), interleaved in one process, best of several rounds.

    .venv/bin/python benchmarks/grouped.py            # digits and MNIST-1D MLPs, G = 3, 8, 32, CPU
    .venv/bin/python benchmarks/grouped.py --datasets digits --sizes 4,8 --formats fp32,int8 --rounds 2
    .venv/bin/python benchmarks/grouped.py --formats niti,fp8_e4m3+fp16-acc --models cnn --sizes 3,8
    .venv/bin/python benchmarks/grouped.py --models tests/support/user_models.py:encoder --datasets digits
    .venv/bin/python benchmarks/grouped.py --device cuda --datasets mnist1d --models mlp,cnn \\
        --sizes 1,2,4,8,16,32 --out results/grouped_cuda.md     # trials per second on a GPU

`--formats` takes format specs (SGD with an fp32 copy; lns* with LNS-Madam) and the names of METHODS.
`--whole-group-folds` also runs each format with an accumulator's chunks folded for the whole group
at once, as before they ran over runs of members under torch's grain (dse/train/stacked.py), and
`--threads N` runs everything at N torch threads. `--sum-order-before` also runs each format as
before a group kept every sum in the order of the member alone (a per-member layer's reads summed
first, batched GEMMs wherever torch's bmm takes its BLAS path); `--convolutions-member-by-member`
runs every stacked convolution's products member by member, as before they ran grouped where probed
(`--keep-freed-memory` pins glibc's thresholds first, as `dse train` and `dse sweep` do):

    .venv/bin/python benchmarks/grouped.py --models transformer --datasets sort-easy --formats \\
        lns8+e5m2-acc4 --sizes 2 --train-samples 256 --epochs 1 --threads 2 --whole-group-folds

`--phases` prints instead, per format and group size, a training step's CPU microseconds per member by
phase (forward, loss, backward, optimizer step, zero_grad), alone and in a group, interleaved in one
process (best of --rounds x 200 steps on one batch, after 20 warm-up steps): where a member's step
spends what grouping does not share.

    .venv/bin/python benchmarks/grouped.py --phases --datasets mnist1d --formats fp32,int8 --sizes 3,8

`--before` also runs each format as the step ran before the step-speed changes
(benchmarks/before_step_speed.py) in the same rounds, and prints that row and today's speed-up over
it, alone and per member.

On the CPU it prints, per dataset and format, the CPU seconds of one run alone (the whole `train`
call: setup, epochs, evaluation) and the speed-up of a group member (alone / (the `train_group` call
/ G)) per group size. CPU time rather than wall time, so that other processes on the machine
preempting this one do not count (their load on the caches still does: compare rows of one run). The
largest group sizes show the floor of a trial's cost once dispatch is shared: the arithmetic of its
GEMMs and quantizers.

On a GPU (`--device cuda`) the clock is wall time, the device synchronised before and after each
call (CPU time would miss the device's work and count the host's waiting), and it prints trials per
second: one trial at a time (`train`), and G trials as one group (G / the `train_group` call's
seconds), with the ratio of the two, the speed-up of grouping.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if TYPE_CHECKING:
    from dse.data import Dataset
    from dse.train.config import TrainConfig

BATCH = {"digits": 64, "mnist1d": 100}
METHODS: dict[str, dict[str, object]] = {
    "niti": {"format": "int8", "optimizer": "niti"},
    "fp8_e4m3+fp16-acc": {"format": "fp8_e4m3", "accumulation": "fp16"},  # chunks of 16 into fp16
    "madam": {"format": "int8", "optimizer": "madam"},  # Madam with an fp32 copy, int8 GEMMs
    "lns8+e5m2-acc4": {"format": "lns8", "optimizer": "lns-madam", "master_weights": False,
                       "accumulation": "fp8_e5m2", "accumulation_chunk": 4},  # LNS-Madam, fp8 sums every 4
}


def method_fields(spec: str) -> dict[str, object]:
    """TrainConfig fields of a `--formats` entry: a METHODS name or a format spec."""
    return METHODS.get(spec) or {"format": None if spec == "fp32" else spec,
                                 "optimizer": "lns-madam" if spec.startswith("lns") else "sgd",
                                 "master_weights": not spec.startswith("lns")}


@contextlib.contextmanager
def whole_group_folds() -> Iterator[None]:
    """An accumulator's chunks folded for the whole group at once, as before `fold_gemm` ran them over
    runs of members under torch's grain (dse/train/stacked.py)."""
    import dse.train.stacked as stacked

    grain = stacked.PARALLEL_GRAIN
    stacked.PARALLEL_GRAIN = 2**62
    try:
        yield
    finally:
        stacked.PARALLEL_GRAIN = grain


@contextlib.contextmanager
def sum_order_before() -> Iterator[None]:
    """As before a group kept every sum in the order of the member's run alone
    (dse/train/stacked.py): a layer run member by member reads its input through one slice a member
    (its reads' gradient terms summed before the terms from outside it), and every batched product -
    member_gemm, an accumulation fold's chunks, a functional or attention matmul - runs batched wherever
    torch's CPU bmm takes its BLAS path (400 multiply-adds a member and more), at any thread count,
    nothing probed (dse/train/batched_sums.py)."""
    from torch import Tensor

    import dse.train.layers as layers
    import dse.train.stacked as stacked
    from dse.train.batched_sums import SMALL_GEMM_MACS, at_alone_alignment

    def blas_path(rows: int, reduction: int, columns: int) -> bool:
        return rows * reduction * columns >= SMALL_GEMM_MACS

    def rule_alone(site: object, batched: object, each: object, operands: Sequence[Tensor],
                   cpu_rule: bool | Callable[[], bool] | None = None) -> bool:
        rule = cpu_rule() if callable(cpu_rule) else cpu_rule
        return True if rule is None else rule

    def aligned_rule_alone(site: object, batched: object, each: object, operands: Sequence[Tensor],
                           cpu_rule: bool | Callable[[], bool] | None = None, aligning: int = 0
                           ) -> tuple[bool, tuple[Tensor, ...]]:
        aligned = tuple(at_alone_alignment(o) if i < aligning else o for i, o in enumerate(operands))
        return rule_alone(site, batched, each, operands, cpu_rule), aligned

    saved = (stacked._MemberReads, stacked.bmm_sums_as_mm, layers.bmm_sums_as_mm, stacked.sums_as_members,
             stacked.aligned_sums_as_members, layers.aligned_sums_as_members)
    stacked._MemberReads = lambda inputs, members: None  # type: ignore[assignment,misc,return-value]
    stacked.bmm_sums_as_mm = layers.bmm_sums_as_mm = blas_path  # type: ignore[misc]
    stacked.sums_as_members = rule_alone  # type: ignore[assignment]
    stacked.aligned_sums_as_members = layers.aligned_sums_as_members = aligned_rule_alone  # type: ignore[assignment]
    try:
        yield
    finally:
        (stacked._MemberReads, stacked.bmm_sums_as_mm, layers.bmm_sums_as_mm, stacked.sums_as_members,
         stacked.aligned_sums_as_members, layers.aligned_sums_as_members) = saved  # type: ignore[misc]


@contextlib.contextmanager
def convolutions_member_by_member() -> Iterator[None]:
    """Every product of a stacked convolution member by member, as before a group ran one grouped
    convolution where a probe finds it alike and faster (`StackedConvOp`, dse/train/stacked.py)."""
    import dse.train.stacked as stacked

    saved = stacked.member_layouts
    stacked.member_layouts = lambda *args, **kwargs: None  # type: ignore[assignment]
    try:
        yield
    finally:
        stacked.member_layouts = saved


def make_clock(device: str) -> Callable[[Callable[..., object], tuple[object, ...]], float]:
    """seconds(run, args): CPU time on the CPU, wall time with the device synchronised on a GPU."""
    import torch

    if device == "cpu":
        def cpu_seconds(run: Callable[..., object], args: tuple[object, ...]) -> float:
            started = time.process_time()
            run(*args)
            return time.process_time() - started
        return cpu_seconds

    def wall_seconds(run: Callable[..., object], args: tuple[object, ...]) -> float:
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        run(*args)
        torch.cuda.synchronize(device)
        return time.perf_counter() - started
    return wall_seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="digits,mnist1d")
    parser.add_argument("--models", "--model", default="mlp",
                        help="proxies, or users' networks as file.py:factory, comma-separated (default mlp)")
    parser.add_argument("--formats", default="fp32,int8,fp8_e4m3,posit8,lns8")
    parser.add_argument("--sizes", default="3,8,32", help="group sizes (default 3,8,32)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the best of each is kept (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--train-samples", type=int, default=None,
                        help="train on the first N training samples only (quick checks)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    parser.add_argument("--before", action="store_true",
                        help="also each format as before the step-speed changes, in the same rounds")
    parser.add_argument("--whole-group-folds", action="store_true",
                        help="also each format with an accumulator's chunks folded for the whole group "
                             "at once (before: runs of members under torch's grain), in the same rounds")
    parser.add_argument("--sum-order-before", action="store_true",
                        help="also each format as before a group kept every sum in the order alone: a "
                             "per-member layer's reads summed first, batched GEMMs from 400 multiply-adds")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="pin glibc's mmap and trim thresholds first, as dse's own processes do")
    parser.add_argument("--convolutions-member-by-member", action="store_true",
                        help="also run each format with every convolution member by member (as before)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every run (default 1)")
    parser.add_argument("--phases", action="store_true",
                        help="a step's CPU us per member by phase, alone and grouped (see above)")
    args = parser.parse_args(argv)
    if args.phases:
        phases(args)
        return

    import dataclasses

    import torch

    from dse.data import load_dataset, with_validation
    from dse.train.config import TrainConfig
    from dse.train.grouped import train_group
    from dse.train.loop import train

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from before_step_speed import per_axis_quantize_and_int64_update

    versions: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {"": contextlib.nullcontext}
    if args.before:
        versions[" (before)"] = per_axis_quantize_and_int64_update
    if args.whole_group_folds:
        versions[" (whole-group folds)"] = whole_group_folds
    if args.sum_order_before:
        versions[" (sum order before)"] = sum_order_before
    if args.convolutions_member_by_member:
        versions[" (convolutions member by member)"] = convolutions_member_by_member
    if args.keep_freed_memory:
        from dse.train.allocator import keep_freed_memory
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    on_cpu = args.device == "cpu"
    seconds = make_clock(args.device)
    sizes = [int(size) for size in args.sizes.split(",")]

    def emit(line: str) -> None:
        """Print a line of the table, and append it to --out (a run cut short keeps its rows: a kill in
        the middle of rewriting the whole table would leave it empty)."""
        print(line, flush=True)
        if args.out is not None:
            with args.out.open("a") as out:
                out.write(line + "\n")

    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("")

    if on_cpu:
        emit(f"CPU seconds of one run alone, and a group member's speed-up (best of {args.rounds} rounds, "
             f"{args.epochs} epochs, {args.threads} thread(s))")
    else:
        emit(f"Trials per second on {torch.cuda.get_device_name(args.device)} (torch {torch.__version__}): "
             f"one at a time, and G at once as one group, with the speed-up (best of {args.rounds} rounds, "
             f"{args.epochs} epochs, wall time)")
    for model in args.models.split(","):
        emit("")
        if on_cpu:
            emit(f"| {model} | format | alone s | " + " | ".join(f"G = {size}" for size in sizes) + " |")
            emit("|---|---|---|" + "---|" * len(sizes))
        else:
            emit(f"| {model} | format | alone trials/s | "
                 + " | ".join(f"G = {size} trials/s (speed-up)" for size in sizes) + " |")
            emit("|---|---|---|" + "---|" * len(sizes))
        for name in args.datasets.split(","):
            data = with_validation(load_dataset(name))
            if args.train_samples:
                data = dataclasses.replace(data, x_train=data.x_train[:args.train_samples],
                                           y_train=data.y_train[:args.train_samples])
            for spec in args.formats.split(","):
                config = TrainConfig(model=model, dataset=name, epochs=args.epochs, device=args.device,
                                     threads=args.threads,
                                     batch_size=min(BATCH.get(name, 64), len(data.x_train)),
                                     **method_fields(spec))
                train(config.replace(epochs=1), data)  # first-call costs
                alone: dict[str, list[float]] = {version: [] for version in versions}
                member: dict[tuple[str, int], list[float]] = {(v, size): [] for v in versions
                                                              for size in sizes}
                for _ in range(args.rounds):
                    for version, context in versions.items():
                        with context():
                            alone[version].append(seconds(train, (config, data)))
                            for size in sizes:
                                configs = [config.replace(seed=seed) for seed in range(size)]
                                member[(version, size)].append(seconds(train_group, (configs, data)) / size)
                for version in versions:
                    best = min(alone[version])
                    fastest = {size: min(member[(version, size)]) for size in sizes}
                    if on_cpu:
                        cells = " | ".join(f"{best / fastest[size]:.2f}x" for size in sizes)
                        emit(f"| {name} | {spec}{version} | {best:.3f} | {cells} |")
                    else:
                        cells = " | ".join(f"{1 / fastest[size]:.2f} ({best / fastest[size]:.1f}x)"
                                           for size in sizes)
                        emit(f"| {name} | {spec}{version} | {1 / best:.2f} | {cells} |")
                if args.before:
                    gains = [f"alone {min(alone[' (before)']) / min(alone['']):.2f}x"] + [
                        f"G = {size} member {min(member[(' (before)', size)]) / min(member[('', size)]):.2f}x"
                        for size in sizes]
                    print(f"  {name} {spec}: today's speed-up over before: {', '.join(gains)}", flush=True)

PHASES = ("forward", "loss", "backward", "step", "zero_grad")
STEPS = 200


def phase_steps(cfg: TrainConfig, members: int, d: Dataset, lrs: Sequence[float] | None = None
                ) -> list[Callable[[Any], Any]]:
    """One training step of `config` as its phases (each takes the previous phase's result): a run
    alone (members 0) as `train` runs it, or a group of `members` seeds as `train_group` runs it, on
    `cfg.device` (model, generators and batch there, as `train` puts them); `lrs`: each member's own
    learning rate (a group whose members differ in it steps one optimizer per run of equal ones)."""
    import torch

    from dse.models.proxies import build_model
    from dse.train.grouped import _niti_setup, _quantized_setup
    from dse.train.loop import EXAMPLE_SAMPLES, prepare

    device = torch.device(cfg.device)
    example = d.x_train[:EXAMPLE_SAMPLES].to(device)
    batch = torch.arange(cfg.batch_size, device=device)
    x_train, y_train = d.x_train.to(device), d.y_train.to(device)
    if members == 0:
        torch.manual_seed(cfg.seed)
        setup = prepare(build_model(cfg.model, d).to(device), cfg,
                        torch.Generator(device=device).manual_seed(cfg.seed), example)
        setup.on_epoch_start(0)
        x, y = x_train[batch], y_train[batch]
        return [lambda _: setup.model(x), lambda logits: setup.loss_fn(logits, y),
                lambda loss: loss.backward(), lambda _: setup.optimizer.step(),
                lambda _: setup.optimizer.zero_grad(set_to_none=True)]
    configs = [cfg.replace(seed=seed, lr=cfg.lr if lrs is None else lrs[seed]) for seed in range(members)]
    models = []
    for member in configs:
        torch.manual_seed(member.seed)
        models.append(build_model(member.model, d).to(device))
    generators = [torch.Generator(device=device).manual_seed(c.seed) for c in configs]
    method = _niti_setup if cfg.optimizer == "niti" else _quantized_setup  # as train_group picks
    group = method(models, configs, generators, example)
    group.on_epoch_start(0)
    index = batch.expand(members, -1)
    x, y = x_train[index], y_train[index]
    return [lambda _: group.model(x), lambda logits: group.member_losses(logits, y)[1],
            lambda objective: objective.backward(), lambda _: group.step(), lambda _: group.zero_grad()]


def phases(args: argparse.Namespace) -> None:
    """`--phases`: per member CPU us of each phase of a step, alone and in groups, interleaved."""
    from dse.data import load_dataset
    from dse.train.config import TrainConfig
    from dse.train.loop import _run_settings

    sizes = [int(size) for size in args.sizes.split(",")]
    print(f"CPU us per member of a training step by phase (best of {args.rounds} x {STEPS} steps, one batch, "
          f"{args.threads} thread(s)): {', '.join(PHASES)}, total")
    print("| MLP | format | " + " | ".join(["alone", *(f"G = {size}" for size in sizes)]) + " |")
    print("|---|---|" + "---|" * (1 + len(sizes)))
    with _run_settings(args.threads):
        for name in args.datasets.split(","):
            data = load_dataset(name)
            for spec in args.formats.split(","):
                config = TrainConfig(model=args.models.split(",")[0], dataset=name, epochs=1,
                                     threads=args.threads, batch_size=BATCH.get(name, 64),
                                     **method_fields(spec))
                runs = {members: phase_steps(config, members, data) for members in [0, *sizes]}
                best: dict[int, list[float]] = {}
                for _ in range(args.rounds):  # interleaved, so that load hits each alike
                    for members, steps in runs.items():
                        spent = [0.0] * len(PHASES)
                        for step in range(20 + STEPS):
                            value: object = None
                            for phase, run in enumerate(steps):
                                started = time.process_time()
                                value = run(value)
                                if step >= 20:
                                    spent[phase] += time.process_time() - started
                        if members not in best or sum(spent) < sum(best[members]):
                            best[members] = spent
                cells = []
                for members, spent in best.items():
                    each = [seconds / STEPS / max(members, 1) * 1e6 for seconds in spent]
                    cells.append(" / ".join(f"{us:.0f}" for us in each) + f", {sum(each):.0f}")
                print(f"| {name} | {spec} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
