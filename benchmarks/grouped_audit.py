"""Randomized audit of grouped training: draw configurations (model, dataset, format family and
rounding, training method, schedule, accumulation, per-layer rules, per-member tuned fields, threads;
drawn as the end-to-end audit draws a sweep file's, tests/support/random_sweeps.py), train each group with
`train_group` and each member alone with `train`, and require every stored result (accuracies, loss
curve, final loss, divergence: every float's last bit) to agree. Prints one line per draw and every
mismatch with its configuration; exits 1 if any.

    python benchmarks/grouped_audit.py --draws 40 --seed 0
    python benchmarks/grouped_audit.py --draws 200 --seed 1 --minutes 30   # stop after 30 minutes
    python benchmarks/grouped_audit.py --draws 400 --models gated,recurrent   # only draws of these models
    python benchmarks/grouped_audit.py --draws 40 --threads 1   # groups at 1 thread only (default 1,2)
    python benchmarks/grouped_audit.py --draws 400 --formats fp32 tf32   # only these formats drawn

Each draw trains on a few hundred samples (a third of the draws 13 fewer: a short last batch) for one
or two epochs; the members differ in seed and in some of lr, momentum, weight_decay, p_scale, g_bound,
niti_mu (dse.train.grouped.MEMBER_FIELDS).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from support.random_sweeps import MODELS, draw_training  # noqa: E402


def draw(rng: random.Random, threads: tuple[int, ...] = (1,), formats: list[str] | None = None
         ) -> tuple[list[Any], str]:
    """One group's configurations (2-3 members) and a short description: a model of
    tests/support/random_sweeps.py's MODELS (the proxies and users' networks: activations that run under
    MemberKernelMode, activation checkpointing, a network calling itself, one that trains one by one,
    ...), a method with its fields drawn as a sweep file's (`draw_training`), each member its own seed and
    its own value of each varied field; a diverging draw gives its last member an lr of 100. `formats`:
    drawn from these only (None: every family's, random_sweeps.FORMATS)."""
    from dse.train import TrainConfig

    model, dataset = rng.choice(MODELS)
    drawn = draw_training(rng, model, dataset, formats)
    fields = {**drawn.fields, "threads": rng.choice(threads)}
    members: list[dict[str, Any]] = [{"seed": s} for s in rng.sample(range(100), rng.choice([2, 3]))]
    for m in members:
        m.update({name: rng.choice(values) for name, values in drawn.member_values.items()})
    if drawn.diverging:
        members[-1]["lr"] = 100.0
    base = TrainConfig(**fields)
    configs = [base.replace(**m) for m in members]
    return configs, f"{drawn.method}{' diverging' if drawn.diverging else ''}: {fields} members {members}"


def families(config: Any) -> set[str]:
    """The format families (dse/formats) a configuration trains in: its tensors' and its layer rules'."""
    from dse.formats import get

    specs = [config.format, config.weights, config.activations, config.gradients,
             *(spec for rule in config.layers or () for _, spec in rule.formats)]
    return {get(spec).family for spec in specs if isinstance(spec, str)}


def subset(name: str, train: int, held_out: int) -> Any:
    from dse.data import load_dataset

    data = load_dataset(name)
    return dataclasses.replace(data, x_train=data.x_train[:train], y_train=data.y_train[:train],
                               x_val=data.x_val[:held_out], y_val=data.y_val[:held_out],
                               x_test=data.x_test[:held_out], y_test=data.y_test[:held_out])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=float("inf"))
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--models", default="", help="only draws of these models (comma-separated names)")
    parser.add_argument("--threads", default="1,2", help="thread counts to draw from (comma-separated)")
    parser.add_argument("--formats", nargs="+", help="only these formats drawn (e.g. fp32 tf32)")
    args = parser.parse_args()
    from dse.errors import InputError
    from dse.train import train
    from dse.train.grouped import group_reason, train_group

    rng = random.Random(args.seed)
    start = time.monotonic()
    mismatches, checked, stacked, refused = [], 0, 0, 0
    covered: dict[str, collections.Counter[str]] = {
        "threads": collections.Counter(), "models": collections.Counter(), "families": collections.Counter()}
    for i in range(args.draws):
        if time.monotonic() - start > args.minutes * 60:
            break
        configs, what = draw(rng, tuple(int(t) for t in args.threads.split(",")), args.formats)
        if args.models and configs[0].model.split(":")[-1] not in args.models.split(","):
            continue
        samples = args.samples - rng.choice([0, 0, 13])  # 13 fewer: a last batch shorter than the others
        try:
            data = subset(configs[0].dataset, samples, 100)
            configs = [c.replace(batch_size=min(c.batch_size, samples)) for c in configs]
            reason = group_reason(configs[0])
            grouped = [r.to_dict() for r in train_group(configs, data)]
            alone = [train(c, data).to_dict() for c in configs]
        except (InputError, ValueError) as error:  # a drawn combination the product refuses
            refused += 1
            print(f"{i:4d} refused ({str(error)[:120]}): {what}")
            continue
        checked += 1
        stacked += reason is None
        covered["threads"][str(configs[0].threads)] += 1
        covered["models"][configs[0].model.split(":")[-1]] += 1
        covered["families"].update(families(configs[0]))
        bad = []
        for g, (together, by_itself) in enumerate(zip(grouped, alone, strict=True)):
            together.pop("wall_time_s")
            by_itself.pop("wall_time_s")
            if repr(together) != repr(by_itself):
                bad.append((g, {k: (together[k], by_itself[k]) for k in together if
                                repr(together[k]) != repr(by_itself[k]) and k != "config"}))
        status = "MISMATCH" if bad else "same"
        print(f"{i:4d} {status} ({'stacked' if reason is None else 'one by one'}) {samples} samples {what}",
              flush=True)
        if bad:
            mismatches.append((what, bad))
            for g, diff in bad:
                print(f"       member {g}: {str(diff)[:600]}")
    print(f"\n{checked} groups checked ({stacked} stacked, {checked - stacked} one by one), "
          f"{refused} refused, {len(mismatches)} mismatched, {time.monotonic() - start:.0f} s")
    for what, counts in covered.items():
        print(f"groups by {what}: {dict(sorted(counts.items()))}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
