"""Random but valid sweep files for the end-to-end audit of grouped sweeps (benchmarks/sweep_audit.py,
tests/sweep/test_grouped_audit.py), and what a store holds, for comparing two of them bit for bit.

A drawn sweep trains one task (a built-in proxy or a user's network on a slice of a built-in dataset,
tests/support/tiny_datasets.py) under one training method with its format, rounding, schedule and
accumulation, 2-3 seeds and 1-2 tuned values of the fields a group's members may differ in, so each of
its configurations trains as groups of 2-5 members; a quarter of the draws tune an lr so large that its
members diverge. Every draw is seeded: the same seed writes the same file."""

from __future__ import annotations

import json
import random
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORT = Path(__file__).resolve().parent  # (user_models.py, tiny_datasets.py)
USER_MODELS = SUPPORT / "user_models.py"
TINY = SUPPORT / "tiny_datasets.py"

MODELS: list[tuple[str, str]] = [
    ("mlp", "digits"), ("mlp", "mnist1d"), ("cnn", "digits"), ("cnn", "mnist1d"), ("resnet", "mnist1d"),
    ("transformer", "sort"), *((f"{USER_MODELS}:{name}", "digits") for name in (
        "functional", "conv", "tiny", "gated", "recurrent", "sdpa", "tokens", "attention",
        "encoder", "sequence_first_silu"))]
FORMATS = ["fp32", "int8", "int4", "int8(scale=channel)", "fixed(8,4)", "fixed(12,6)", "fp8_e4m3", "fp8_e5m2",
           "bf16", "fp16", "posit8", "posit(8,1)", "posit(16,1)", "lns8", "lns(6,gamma=4)", "mxfp4",
           "mxfp8_e4m3", "mxint8", "nvfp4", "p3109(8,4)", "p3109(8,3)"]
ROUNDINGS = ["nearest", "stochastic", "pseudo_stochastic", "stochastic(4)"]
METHODS = ["sgd", "sgd-copy-in-format", "sgd-no-copy", "adam", "adamw", "madam", "lns-madam",
           "lns-madam-copy", "niti", "posit-recipe"]


@dataclass(frozen=True)
class DrawnSweep:
    text: str
    """The sweep file."""
    description: str
    group_size: int
    workers: int
    threads: int


def _yaml(value: Any) -> str:
    return json.dumps(value)  # JSON is YAML: every value written unambiguously


def draw_sweep(rng: random.Random, output: Path, workloads: list[str] | None = None,
               models: list[tuple[str, str]] | None = None, methods: list[str] | None = None) -> DrawnSweep:
    """One random sweep file writing to `output`."""
    model, data = rng.choice(models or MODELS)
    method = rng.choice(methods or METHODS)
    heavy = model in ("transformer", "resnet") or model.endswith(
        ("encoder", "recurrent", "sequence_first_silu"))
    task: dict[str, Any] = {"model": model, "dataset": f"{TINY}:{data}", "epochs": rng.choice([1, 2]),
                            "batch_size": rng.choice([32, 50, 64])}
    trial: dict[str, Any] = {"rounding": rng.choice(ROUNDINGS)}
    tune: dict[str, list[Any]] = {}
    fmt = rng.choice(FORMATS)

    def maybe_tune(name: str, values: list[Any], chance: float = 0.5) -> None:
        if rng.random() < chance:
            tune[name] = sorted(rng.sample(values, rng.choice([1, 2])))

    if method.startswith("sgd") or method in ("adam", "adamw"):
        trial["optimizer"] = method.split("-")[0]
        trial["format"] = fmt
        if method == "sgd-copy-in-format":
            trial["master_weights"] = rng.choice(["bf16", "fp16", "int16", "fixed(16,8)", "posit(16,1)"])
        elif method == "sgd-no-copy":
            trial["master_weights"] = False
            trial["update_rounding"] = rng.choice(ROUNDINGS)
        if rng.random() < 0.3:
            trial["optimizer_state"] = rng.choice(["bf16", "fp16"])
        sgd = method.startswith("sgd")
        maybe_tune("lr", [0.01, 0.03, 0.1] if sgd else [1e-3, 3e-3], 0.8)
        maybe_tune("weight_decay", [0.0, 1e-4, 5e-4])
        if sgd:
            maybe_tune("momentum", [0.0, 0.5, 0.9])
    elif method in ("madam", "lns-madam", "lns-madam-copy"):
        trial["optimizer"] = "madam" if method == "madam" else "lns-madam"
        trial["format"] = rng.choice(["lns8", "lns(6,gamma=4)"]) if method != "madam" else fmt
        if method == "lns-madam-copy":
            trial["master_weights"] = "lns(16,gamma=2048)"
        elif method == "lns-madam":
            trial["master_weights"] = False
        trial["update_rounding"] = rng.choice(["nearest", "stochastic", "pseudo_stochastic"])
        maybe_tune("lr", [1 / 128, 1 / 64, 0.01, 0.065], 0.8)
        maybe_tune("p_scale", [3.0, 10.0])
        maybe_tune("g_bound", [5.0, 10.0], 0.3)
    elif method == "niti":
        trial.update(optimizer="niti", format=rng.choice(["int8", "int6"]), master_weights=False)
        trial.pop("rounding")
        if rng.random() < 0.4:
            trial["master_weights"] = "int16"
        maybe_tune("niti_mu", [3, 5, 8], 0.8)
    else:  # Lu et al.'s posit recipe: fp32 warm-up epochs, then posits with layer scaling
        trial.update(optimizer="sgd", format=rng.choice(["posit8", "posit(8,1)", "posit(16,1)"]),
                     warmup_epochs=1, layer_scaling=True)
        task["epochs"] = 2
        maybe_tune("lr", [0.02, 0.05], 0.8)
    if method != "niti":
        schedule = rng.choice(["constant", "constant", "cosine", "step"])
        if schedule != "constant":
            trial["lr_schedule"] = schedule
            if schedule == "step":
                trial["lr_step_epochs"] = 1
            if rng.random() < 0.5:
                trial["lr_warmup_epochs"] = 1
        if not heavy and rng.random() < 0.25:
            trial["accumulation"] = rng.choice(["fp16", "bf16", "fp8_e5m2"])
            trial["accumulation_chunk"] = rng.choice([1, 4, 16])
        per_layer = rng.random()
        if per_layer < 0.15:
            trial["full_precision_layers"] = [rng.choice(["first", "last"])]
        elif per_layer < 0.3:
            trial["layers"] = [{"match": "type:Linear", "weights": rng.choice(["fp8_e4m3", "int8", "bf16"])}]
    diverging = method in ("sgd", "sgd-no-copy", "adam", "adamw") and rng.random() < 0.25
    if diverging:  # one tuned lr so large that its members' losses overflow
        tune["lr"] = sorted({*tune.get("lr", [0.01]), 100.0})
    seeds = sorted(rng.sample(range(10), rng.choice([2, 3])))
    if tune:
        trial["tune"] = tune
    group_size = rng.choice([2, 3, 4, 5])
    workers = rng.choice([1, 2])
    threads = rng.choice([1, 2])
    text = (f"name: audit\nseeds: {_yaml(seeds)}\ntask: {_yaml(task)}\n"
            f"energy: {_yaml({'workloads': workloads or ['proxy']})}\ntrials:\n  - {_yaml(trial)}\n"
            f"executor: {_yaml({'group_size': group_size, 'workers': workers, 'threads': threads})}\n"
            f"output: {_yaml(str(output))}\n")
    description = (f"{method}{' diverging' if diverging else ''}: {Path(model).name} on {data}, "
                   f"group {group_size}, {workers} worker(s), {threads} thread(s): {_yaml(trial)} "
                   f"seeds {seeds}")
    return DrawnSweep(text, description, group_size, workers, threads)


IGNORED_TRIAL_COLUMNS = ("wall_time_s", "finished_at")
"""Columns of a stored trial that are not its result (the time it took and when it was stored)."""


def store_snapshot(directory: Path) -> dict[str, Any]:
    """Everything a sweep's store says about its trials, except times: each trial's row (its result JSON
    without wall_time_s), the plan and the energy rows (compared as exact text: floats by repr)."""
    with sqlite3.connect(Path(directory) / "sweep.sqlite") as connection:
        connection.row_factory = sqlite3.Row
        trials: dict[str, str] = {}
        for row in connection.execute("SELECT * FROM trials"):
            values = {key: row[key] for key in row.keys() if key not in IGNORED_TRIAL_COLUMNS}
            assert values["trial_id"] not in trials, f"trial {values['trial_id']} stored twice"
            result = json.loads(values.pop("result"))
            result.pop("wall_time_s", None)
            values["result"] = result
            trials[values["trial_id"]] = values
        plan = [repr(tuple(row)) for row in connection.execute("SELECT * FROM plan ORDER BY position")]
        energy = sorted(repr(tuple(row)) for row in connection.execute("SELECT * FROM energy"))
    return {"trials": trials, "plan": plan, "energy": energy}


def stored_results(directory: Path) -> dict[str, tuple[dict[str, Any], dict[str, Any], str]]:
    """Each stored trial's (config, result, status) as the store holds them."""
    with sqlite3.connect(Path(directory) / "sweep.sqlite") as connection:
        rows = connection.execute("SELECT trial_id, config, result, status FROM trials").fetchall()
    return {trial: (json.loads(config), json.loads(result), status) for trial, config, result, status in rows}


def snapshot_differences(one: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """What differs between two store snapshots, one line each (empty: bit for bit the same)."""
    lines = []
    for trial in sorted(set(one["trials"]) | set(other["trials"])):
        a, b = one["trials"].get(trial), other["trials"].get(trial)
        if a is None or b is None:
            lines.append(f"trial {trial} stored in one store only")
            continue
        a, b = {**a, **a["result"]}, {**b, **b["result"]}
        fields = [key for key in a if key != "result" and repr(a[key]) != repr(b.get(key))]
        if fields:
            lines.append(f"trial {trial} ({a['label']}, seed {a['seed']}): " + "; ".join(
                f"{key} {a[key]!r} != {b.get(key)!r}" for key in fields))
    for table in ("plan", "energy"):
        if one[table] != other[table]:
            lines.append(f"{table}: {one[table]} != {other[table]}")
    return lines


def train_arguments(config: dict[str, Any]) -> list[str]:
    """`dse train` options that train `config` (a stored trial's config) alone."""
    arguments: list[str] = []
    for name, value in config.items():
        if value is None or name in ("format",) and value is None:
            continue
        option = "--" + name.replace("_", "-")
        if name in ("layers",):
            if value:
                arguments += [option, json.dumps(value)]
        elif name == "full_precision_layers":
            if value:
                arguments += [option, ",".join(value)]
        elif name == "layer_scaling":
            if value:
                arguments.append(option)
        else:
            arguments += [option, str(value).lower() if isinstance(value, bool) else str(value)]
    return arguments


def json_safe(value: Any) -> Any:
    """As `dse train --json` prints a result: NaN and inf become null."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value
