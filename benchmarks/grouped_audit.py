"""Randomized audit of grouped training: draw configurations (model, dataset, format family and
rounding, training method, accumulation, per-member tuned fields, threads), train each group with
`train_group` and each member alone with `train`, and require every stored result (accuracies, loss
curve, final loss, divergence: every float's last bit) to agree. Prints one line per draw and every
mismatch with its configuration; exits 1 if any.

    python benchmarks/grouped_audit.py --draws 40 --seed 0
    python benchmarks/grouped_audit.py --draws 200 --seed 1 --minutes 30   # stop after 30 minutes
    python benchmarks/grouped_audit.py --draws 400 --models gated,recurrent   # only draws of these models

Each draw trains on a few hundred samples for one or two epochs; the members differ in seed and in
some of lr, momentum, weight_decay, p_scale, g_bound, niti_mu (dse.train.grouped.MEMBER_FIELDS).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

USER_MODELS = Path(__file__).resolve().parent.parent / "tests" / "support" / "user_models.py"

FORMATS = ["fp32", "int8", "int4", "fp8_e4m3", "fp8_e5m2", "bf16", "fp16", "posit8", "posit(16,1)", "lns8",
           "mxfp4", "mxfp8_e4m3", "fixed(8,4)", "nvfp4", "mxint8", "p3109(8,4)"]
ROUNDINGS = ["nearest", "stochastic", "pseudo_stochastic"]


def draw(rng: random.Random) -> tuple[list[Any], str]:
    """One group's configurations (2-3 members) and a short description. Users' networks include
    SiLU and sigmoid (`gated`), an nn.GRU (`recurrent`) and SiLU after a sequence-first attention
    (`sequence_first_silu`), which run under MemberKernelMode, activation checkpointing
    (`checkpointed`, `checkpointed_reentrant`, `checkpointed_sequential`), a network calling itself
    (`self_calling`) and one that trains one by one (`swish_function`: its autograd.Function's
    backward calls sigmoid)."""
    from dse.train import TrainConfig

    model, dataset = rng.choice([("mlp", "digits"), ("mlp", "mnist1d"), ("cnn", "digits"), ("cnn", "mnist1d"),
                                 ("transformer", "sort"), (f"{USER_MODELS}:functional", "digits"),
                                 (f"{USER_MODELS}:conv", "digits"), (f"{USER_MODELS}:encoder", "digits"),
                                 (f"{USER_MODELS}:tiny", "digits"), (f"{USER_MODELS}:attention", "digits"),
                                 (f"{USER_MODELS}:sdpa", "digits"), (f"{USER_MODELS}:gated", "digits"),
                                 (f"{USER_MODELS}:recurrent", "digits"),
                                 (f"{USER_MODELS}:sequence_first_silu", "digits"),
                                 (f"{USER_MODELS}:checkpointed", "digits"),
                                 (f"{USER_MODELS}:checkpointed_reentrant", "digits"),
                                 (f"{USER_MODELS}:checkpointed_sequential", "digits"),
                                 (f"{USER_MODELS}:self_calling", "digits"),
                                 (f"{USER_MODELS}:swish_function", "digits")])
    method = rng.choice(["sgd", "sgd-copy-in-format", "sgd-no-copy", "adam", "adamw", "madam", "lns-madam",
                         "lns-madam-copy", "niti", "posit-recipe"])
    fields: dict[str, Any] = {"model": model, "dataset": dataset, "epochs": rng.choice([1, 2]),
                              "batch_size": rng.choice([32, 50, 64]), "threads": rng.choice([1, 2]),
                              "rounding": rng.choice(ROUNDINGS)}
    fmt = rng.choice(FORMATS)
    members: list[dict[str, Any]] = [{"seed": s} for s in rng.sample(range(100), rng.choice([2, 3]))]
    if method.startswith("sgd") or method in ("adam", "adamw"):
        fields["optimizer"] = method.split("-")[0]
        fields["format"] = fmt
        if method == "sgd-copy-in-format":
            fields["master_weights"] = rng.choice(["bf16", "fp16", "int16"])
        if method == "sgd-no-copy":
            fields["master_weights"] = False
        if rng.random() < 0.3:
            fields["optimizer_state"] = rng.choice(["bf16", "fp16"])
        for m in members:
            m["lr"] = rng.choice([0.01, 0.05, 0.1]) if method.startswith("sgd") else rng.choice([1e-3, 3e-3])
            if rng.random() < 0.5:
                m["weight_decay"] = rng.choice([0.0, 1e-4, 5e-4])
            if method.startswith("sgd") and rng.random() < 0.5:
                m["momentum"] = rng.choice([0.0, 0.5, 0.9])
    elif method in ("madam", "lns-madam", "lns-madam-copy"):
        fields["optimizer"] = "madam" if method == "madam" else "lns-madam"
        fields["format"] = rng.choice(["lns8", "lns(6,gamma=4)"]) if method != "madam" else fmt
        if method == "lns-madam-copy":
            fields["master_weights"] = "lns(16,gamma=2048)"
        elif method == "lns-madam":
            fields["master_weights"] = False
        fields["update_rounding"] = rng.choice(["nearest", "stochastic"])
        for m in members:
            m["lr"] = rng.choice([1 / 128, 1 / 64, 1 / 32, 0.01, 0.065])
            m["p_scale"] = rng.choice([3.0, 10.0])
            if rng.random() < 0.3:
                m["g_bound"] = rng.choice([5.0, 10.0])
    elif method == "niti":
        fields.update(optimizer="niti", format=rng.choice(["int8", "int6"]), master_weights=False)
        if rng.random() < 0.4:
            fields["master_weights"] = "int16"
        fields.pop("rounding")
        for m in members:
            m["niti_mu"] = rng.choice([3, 5, 8])
    else:  # Lu et al.'s posit recipe
        fields.update(optimizer="sgd", format=rng.choice(["posit8", "posit(8,1)", "posit(16,1)"]),
                      warmup_epochs=1, layer_scaling=True, epochs=2)
        for m in members:
            m["lr"] = rng.choice([0.02, 0.05])
    if method != "niti" and model != "transformer" and rng.random() < 0.25:  # (emulated sums: slow there)
        fields["accumulation"] = rng.choice(["fp16", "bf16", "fp8_e5m2"])
        fields["accumulation_chunk"] = rng.choice([1, 4, 16])
    base = TrainConfig(**fields)
    configs = [base.replace(**m) for m in members]
    return configs, f"{method}: {fields} members {members}"


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
    parser.add_argument("--models", default="", help="only draws of these models")
    args = parser.parse_args()
    from dse.errors import InputError
    from dse.train import train
    from dse.train.grouped import group_reason, train_group

    rng = random.Random(args.seed)
    start = time.monotonic()
    mismatches, checked, stacked, refused = [], 0, 0, 0
    for i in range(args.draws):
        if time.monotonic() - start > args.minutes * 60:
            break
        configs, what = draw(rng)
        if args.models and not configs[0].model.endswith(tuple(args.models.split(","))):
            continue
        try:
            data = subset(configs[0].dataset, args.samples, 100)
            configs = [c.replace(batch_size=min(c.batch_size, args.samples)) for c in configs]
            reason = group_reason(configs[0])
            grouped = [r.to_dict() for r in train_group(configs, data)]
            alone = [train(c, data).to_dict() for c in configs]
        except (InputError, ValueError) as error:  # a drawn combination the product refuses
            refused += 1
            print(f"{i:4d} refused ({str(error)[:120]}): {what}")
            continue
        checked += 1
        stacked += reason is None
        bad = []
        for g, (together, by_itself) in enumerate(zip(grouped, alone, strict=True)):
            together.pop("wall_time_s")
            by_itself.pop("wall_time_s")
            if repr(together) != repr(by_itself):
                bad.append((g, {k: (together[k], by_itself[k]) for k in together if
                                repr(together[k]) != repr(by_itself[k]) and k != "config"}))
        status = "MISMATCH" if bad else "same"
        print(f"{i:4d} {status} ({'stacked' if reason is None else 'one by one'}) {what}", flush=True)
        if bad:
            mismatches.append((what, bad))
            for g, diff in bad:
                print(f"       member {g}: {str(diff)[:600]}")
    print(f"\n{checked} groups checked ({stacked} stacked, {checked - stacked} one by one), "
          f"{refused} refused, {len(mismatches)} mismatched, {time.monotonic() - start:.0f} s")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
