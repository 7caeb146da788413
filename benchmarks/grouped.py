"""Grouped training's speed per trial: the CPU time of one run alone against a member of a group
of G (dse.train.grouped.train_group), interleaved in one process, best of several rounds.

    .venv/bin/python benchmarks/grouped.py            # digits and MNIST-1D MLPs, G = 3, 8, 32
    .venv/bin/python benchmarks/grouped.py --datasets digits --sizes 4,8 --formats fp32,int8 --rounds 2
    .venv/bin/python benchmarks/grouped.py --formats niti,fp8_e4m3+fp16-acc --model cnn --sizes 3,8
    .venv/bin/python benchmarks/grouped.py --model tests/support/user_models.py:encoder --datasets digits

`--formats` takes format specs (SGD with an fp32 copy; lns* with LNS-Madam) and the names of METHODS.
`--before` also runs each format as the step ran before the step-speed changes
(benchmarks/before_step_speed.py) in the same rounds, and prints that row and today's speed-up over
it, alone and per member.

Prints, per dataset and format, the CPU seconds of one run alone (the whole `train` call: setup,
epochs, evaluation) and the speed-up of a group member (alone / (the `train_group` call / G)) per group
size. CPU time rather than wall time, so that other processes on the machine preempting this one do
not count (their load on the caches still does: compare rows of one run). The largest group sizes
show the floor of a trial's cost once dispatch is shared: the arithmetic of its GEMMs and quantizers.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BATCH = {"digits": 64, "mnist1d": 100}
METHODS: dict[str, dict[str, object]] = {
    "niti": {"format": "int8", "optimizer": "niti"},
    "fp8_e4m3+fp16-acc": {"format": "fp8_e4m3", "accumulation": "fp16"},  # chunks of 16 into fp16
}


def cpu_seconds(run: Callable[..., object], *args: object) -> float:
    started = time.process_time()
    run(*args)
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="digits,mnist1d")
    parser.add_argument("--model", default="mlp",
                        help="a proxy, or a user's network as file.py:factory (default mlp)")
    parser.add_argument("--formats", default="fp32,int8,fp8_e4m3,posit8,lns8")
    parser.add_argument("--sizes", default="3,8,32", help="group sizes (default 3,8,32)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the best of each is kept (default 3)")
    parser.add_argument("--before", action="store_true",
                        help="also each format as before the step-speed changes, in the same rounds")
    args = parser.parse_args()

    import torch

    from dse.data import load_dataset
    from dse.train.config import TrainConfig
    from dse.train.grouped import train_group
    from dse.train.loop import train

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from before_step_speed import per_axis_quantize_and_int64_update

    versions: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {"": contextlib.nullcontext}
    if args.before:
        versions[" (before)"] = per_axis_quantize_and_int64_update
    torch.set_num_threads(1)
    sizes = [int(size) for size in args.sizes.split(",")]
    print(f"CPU seconds of one run alone, and a group member's speed-up (best of {args.rounds} rounds, "
          f"{args.epochs} epochs, 1 thread)")
    print(f"| {args.model} | format | alone s | " + " | ".join(f"G = {size}" for size in sizes) + " |")
    print("|---|---|---|" + "---|" * len(sizes))
    for name in args.datasets.split(","):
        data = load_dataset(name)
        for spec in args.formats.split(","):
            fields = METHODS.get(spec) or {"format": None if spec == "fp32" else spec,
                                           "optimizer": "lns-madam" if spec.startswith("lns") else "sgd",
                                           "master_weights": not spec.startswith("lns")}
            config = TrainConfig(model=args.model, dataset=name, epochs=args.epochs,
                                 batch_size=BATCH.get(name, 64), **fields)
            train(config.replace(epochs=1), data)  # first-call costs
            alone: dict[str, list[float]] = {version: [] for version in versions}
            member: dict[tuple[str, int], list[float]] = {(v, size): [] for v in versions for size in sizes}
            for _ in range(args.rounds):
                for version, context in versions.items():
                    with context():
                        alone[version].append(cpu_seconds(train, config, data))
                        for size in sizes:
                            configs = [config.replace(seed=seed) for seed in range(size)]
                            member[(version, size)].append(cpu_seconds(train_group, configs, data) / size)
            for version in versions:
                best = min(alone[version])
                cells = " | ".join(f"{best / min(member[(version, size)]):.2f}x" for size in sizes)
                print(f"| {name} | {spec}{version} | {best:.3f} | {cells} |", flush=True)
            if args.before:
                gains = [f"alone {min(alone[' (before)']) / min(alone['']):.2f}x"] + [
                    f"G = {size} member {min(member[(' (before)', size)]) / min(member[('', size)]):.2f}x"
                    for size in sizes]
                print(f"  {name} {spec}: today's speed-up over before: {', '.join(gains)}", flush=True)


if __name__ == "__main__":
    main()
