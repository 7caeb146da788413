"""Random but valid trainings and sweep files for the audits of grouped training: `draw_training` draws a
method with its fields (benchmarks/grouped_audit.py trains it in process, as a group and member by member),
`draw_sweep` writes it as a sweep file (benchmarks/sweep_audit.py, tests/sweep/test_grouped_audit.py);
and what a store holds, for comparing two of them bit for bit.

A drawn sweep trains one task (a built-in proxy or a user's network on a slice of a built-in dataset,
tests/support/tiny_datasets.py, or a proxy on small MNIST / CIFAR-10 files in a user's data_dir) under
one training method with its format (every family of dse/formats), rounding, schedule, accumulation
and per-layer rules, 2-3 seeds and 1-2 tuned values of the fields a group's members may differ in, so
each of its configurations trains as groups of 2-5 members; a quarter of the SGD/Adam draws tune an lr
so large that its members diverge. Every draw is seeded: the same seed writes the same file."""

from __future__ import annotations

import functools
import json
import random
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORT = Path(__file__).resolve().parent  # (user_models.py, tiny_datasets.py)
USER_MODELS = SUPPORT / "user_models.py"
AUDIT_MODELS = SUPPORT / "audit_networks.py"
LEAF_MODELS = SUPPORT / "leaf_models.py"
TINY = SUPPORT / "tiny_datasets.py"

PROXIES: list[tuple[str, str]] = [("mlp", "digits"), ("mlp", "mnist1d"), ("cnn", "digits"),
                                  ("cnn", "mnist1d"), ("resnet", "mnist1d"), ("transformer", "sort")]
USER_NETWORKS: tuple[str, ...] = (
    "functional", "conv", "tiny", "gated", "recurrent", "sdpa", "tokens", "attention", "encoder",
    "sequence_first_silu", "residual_gate", "bottleneck", "small_tokens", "one_token", "frozen",
    "straight_through", "transposed", "scaled_scores", "attention_bias_kv", "attention_dropout",
    "checkpointed", "checkpointed_reentrant", "checkpointed_sequential", "checkpointed_plain",
    "checkpointed_layer", "checkpointed_layer_reentrant", "checkpointed_layer_plain",
    "composable_checkpoint", "self_calling", "swish_function", "normed", "scaled_pool", "batch_inner",
    "wide_head")
"""Users' networks in tests/support/user_models.py (each takes digits' 64 features) that do not branch
on their batch's size."""
BRANCHING_NETWORKS: tuple[str, ...] = ("swish_on_large_batches",)
"""Users' networks of user_models.py whose forward branches on its batch's size (a group trains them one
by one)."""
AUDIT_NETWORKS: tuple[tuple[str, str], ...] = (
    ("odd_conv", "digits"), ("conv1d", "digits"), ("upsampled", "digits"), ("lstm_rows", "digits"),
    ("odd_normed", "digits"), ("embedded", "sort"))
"""(network, dataset) of tests/support/audit_networks.py: odd widths, odd convolutions, more leaf layers."""
LEAF_NETWORKS: tuple[str, ...] = ("own_affine", "own_affine9", "own_einsum", "own_affine_in_wide", "norm37",
                                  "batch_inner_reduced")
"""Networks of tests/support/leaf_models.py: users' leaf layers calling GEMMs dse does not convert
(torch.addmm, torch.einsum), a BatchNorm1d of 37 features, which a group runs member by member, and a
batch-innermost output centred by its mean over the channels (a reduction and a broadcast outside the
batch in memory)."""
MODULE_MODELS: tuple[tuple[str, str], ...] = (
    ("support.audit_networks:odd_conv", "digits"), ("support.user_models:gated", "digits"),
    (f"{SUPPORT.parent.parent}/examples/own_model/model.py:small_resnet", "digits"))
"""Networks named as a user names a module (`package.module:function`; tests/ on the path) and the
worked example's ResNet (BatchNorm2d, strided and 1x1 convolutions)."""
MODELS: list[tuple[str, str]] = [*PROXIES, *((f"{USER_MODELS}:{name}", "digits")
                                             for name in (*USER_NETWORKS, *BRANCHING_NETWORKS)),
                                 *((f"{AUDIT_MODELS}:{name}", data) for name, data in AUDIT_NETWORKS),
                                 *((f"{LEAF_MODELS}:{name}", "digits") for name in LEAF_NETWORKS),
                                 *MODULE_MODELS]
"""(model, dataset): a dataset names a slice in tiny_datasets.py (the built-in of that name)."""
FILE_MODELS: list[tuple[str, str]] = [("mlp", "mnist"), ("cnn", "mnist"), ("cnn", "cifar10"),
                                      ("resnet", "cifar10")]
"""(model, file dataset) read from small generated files (write_file_datasets) in a user's data_dir."""
HEAVY: tuple[str, ...] = ("transformer", "resnet", "encoder", "recurrent", "sequence_first_silu", "wide_head",
                          "small_resnet")
"""Models whose emulated accumulation costs minutes a draw: drawn without an accumulator."""
FORMATS = ["fp32", "tf32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "fp8_e4m3fnuz", "fp8_e5m2fnuz",
           "fp(e=3,m=4)", "fp4_e2m1(scale=tensor)", "fp8_e4m3(scale=channel)", "fp8_e4m3(overflow=nan)",
           "int8", "int6", "int4", "int8(scale=channel)", "int8(pow2=1)", "int4(scale=block,block=32)",
           "fixed(8,4)", "fixed(12,6)", "fixed(8,4,scale=tensor)", "posit8", "posit16", "posit(8,0)",
           "posit(8,1)", "posit(16,1)", "lns8", "lns(6,gamma=4)", "lns(8,gamma=4)", "mxfp4", "mxfp6_e2m3",
           "mxfp6_e3m2", "mxfp8_e4m3", "mxfp8_e5m2", "mxint8", "nvfp4",
           "block(fp6_e2m3,size=16,scale=e4m3,tensor_scale=fp32)",
           "block(int4,size=16,scale=e4m3,tensor_scale=fp32)", "p3109(8,4)", "p3109(8,3)", "p3109(6,3)"]
"""Every family of dse/formats (fp, int, fixed, posit, lns, mx, block, p3109) with its scalings."""
ROUNDINGS = ["nearest", "stochastic", "pseudo_stochastic", "toward_zero", "stochastic(1)", "stochastic(4)",
             "stochastic(12)"]
ACCUMULATORS = ["fp16", "bf16", "fp8_e5m2", "fixed(16,8)", "fixed(20,10)", "fixed(24,0)"]
METHODS = ["sgd", "sgd-copy-in-format", "sgd-no-copy", "adam", "adamw", "madam", "lns-madam",
           "lns-madam-copy", "niti", "posit-recipe"]
TASK_FIELDS: tuple[str, ...] = ("model", "dataset", "data_dir", "epochs", "batch_size")
"""A drawn training's fields that a sweep file states once, in its task."""


def _unit(spec: str) -> tuple[str, str | None]:
    """The energy model's datapath of a format: its unit and, block-scaled, its elements' unit (a GEMM
    of two units the model neither shares nor converts between is refused before training)."""
    from dse.energy.datapaths import operand
    from dse.formats import get

    priced = operand(get(spec))
    return priced.hardware.unit, None if priced.element is None else priced.element.hardware.unit


def _kin(rng: random.Random, spec: str, formats: list[str]) -> str:
    """A format of `formats` on the same datapath as `spec` (`_unit`): one the energy model prices beside
    it (a GEMM of posit x fp, or of int- x fp-element MX blocks, has no datapath)."""
    return rng.choice([other for other in formats if _unit(other) == _unit(spec)])


def _accumulator(rng: random.Random, specs: list[str]) -> str | None:
    """An accumulator of ACCUMULATORS the energy model has a datapath for with every pair of the formats
    `specs` (LNS products sum in an integer accumulator only); None where there is none."""
    from dse.energy.datapaths import DatapathParams, datapath_for
    from dse.energy.model import build_model
    from dse.errors import InputError
    from dse.formats import get

    components = build_model().components

    def prices(accumulator: str) -> bool:
        try:
            for a in specs:
                for b in specs:
                    datapath_for(get(a), get(b), components, DatapathParams(accumulator=accumulator))
        except InputError:
            return False
        return True

    fitting = [accumulator for accumulator in ACCUMULATORS if prices(accumulator)]
    return rng.choice(fitting) if fitting else None


@functools.cache
def _layers(model: str, dataset: str, data_dir: Path | None) -> tuple[Any, ...]:
    """The model's GEMM layers as per-layer rules see them (a file dataset read from `data_dir`)."""
    from dse.data import FILE_DATASETS, load_dataset
    from dse.models.proxies import build_model
    from dse.train.functional import model_layers

    data = load_dataset(dataset, str(data_dir / dataset) if data_dir and dataset in FILE_DATASETS else None)
    return tuple(model_layers(build_model(model, data), data.x_train[:2]))


def _matches_some_layer(rule: dict[str, str], model: str, dataset: str, data_dir: Path | None) -> bool:
    """Whether the per-layer rule matches a GEMM of the model (a sweep refuses one that matches none)."""
    from dse.precision import LayerRule

    matcher = LayerRule.from_mapping(rule)
    return any(matcher.matches(layer) for layer in _layers(model, dataset, data_dir))


@dataclass(frozen=True)
class DrawnTraining:
    """One training method's draw, shared by a sweep file (its trial and `tune`) and an in-process group
    (benchmarks/grouped_audit.py, its members)."""

    method: str
    fields: dict[str, Any]
    """TrainConfig fields every trial shares (model, dataset, epochs, batch size included)."""
    member_values: dict[str, list[Any]]
    """Fields the trials may differ in (dse.train.grouped.MEMBER_FIELDS but seed): values to draw from."""
    diverging: bool
    """Whether one of the trials is to take an lr of 100, so large that its loss overflows."""


def draw_training(rng: random.Random, model: str, dataset: str, formats: list[str] | None = None,
                  methods: list[str] | None = None, data_dir: Path | None = None) -> DrawnTraining:
    """A method with its format, rounding, schedule, accumulation and per-layer rules for `model`
    (`data_dir`: where a file dataset lies, write_file_datasets); only combinations a sweep accepts."""
    method = rng.choice(methods or METHODS)
    heavy = model in HEAVY or model.endswith(tuple(f":{name}" for name in HEAVY))
    fields: dict[str, Any] = {"model": model, "dataset": dataset, "epochs": rng.choice([1, 2]),
                              "batch_size": rng.choice([32, 37, 50, 64]), "rounding": rng.choice(ROUNDINGS)}
    varied: dict[str, list[Any]] = {}
    fmt = rng.choice(formats or FORMATS)

    def vary(name: str, values: list[Any], chance: float = 0.5) -> None:
        if rng.random() < chance:
            varied[name] = values

    if method.startswith("sgd") or method in ("adam", "adamw"):
        fields["optimizer"] = method.split("-")[0]
        if rng.random() < 0.2:  # each tensor class its own format (of one kind: the energy prices it)
            fields.update(weights=fmt, activations=_kin(rng, fmt, formats or FORMATS),
                          gradients=_kin(rng, fmt, formats or FORMATS))
        else:
            fields["format"] = fmt
        if rng.random() < 0.15:  # the weight gradients' own format (the backward-weight GEMM's result)
            fields["weight_grads"] = _kin(rng, fmt, formats or FORMATS)
        master = {"sgd": "fp32", "sgd-copy-in-format": "copy-in-format", "sgd-no-copy": "no-copy"}.get(
            method) or rng.choice(["fp32", "fp32", "copy-in-format", "no-copy"])  # Adam, AdamW: each copy too
        if master == "copy-in-format":
            fields["master_weights"] = rng.choice(["bf16", "fp16", "int16", "fixed(16,8)", "posit(16,1)"])
        elif master == "no-copy":
            fields["master_weights"] = False
            fields["update_rounding"] = rng.choice(ROUNDINGS)
        if rng.random() < 0.15:  # Lu et al.'s layer scaling and fp32 warm-up beside any format
            fields.update(layer_scaling=True, **({"warmup_epochs": 1} if fields["epochs"] == 2 else {}))
        if rng.random() < 0.3:
            fields["optimizer_state"] = rng.choice(["bf16", "fp16"])
        sgd = method.startswith("sgd")
        vary("lr", [0.01, 0.03, 0.05, 0.1] if sgd else [1e-3, 3e-3], 0.8)
        vary("weight_decay", [0.0, 1e-4, 5e-4])
        if sgd:
            vary("momentum", [0.0, 0.5, 0.9])
    elif method in ("madam", "lns-madam", "lns-madam-copy"):
        fields["optimizer"] = "madam" if method == "madam" else "lns-madam"
        fields["format"] = rng.choice(["lns8", "lns(6,gamma=4)"]) if method != "madam" else fmt
        if method == "lns-madam-copy":
            fields["master_weights"] = "lns(16,gamma=2048)"
        elif method == "lns-madam":
            fields["master_weights"] = False
        fields["update_rounding"] = rng.choice(["nearest", "stochastic", "pseudo_stochastic"])
        vary("lr", [1 / 128, 1 / 64, 1 / 32, 0.01, 0.065], 0.8)
        vary("p_scale", [3.0, 10.0])
        vary("g_bound", [5.0, 10.0], 0.3)
    elif method == "niti":
        fields.update(optimizer="niti", format=rng.choice(["int8", "int6"]), master_weights=False)
        fields.pop("rounding")
        if rng.random() < 0.4:
            fields["master_weights"] = "int16"
        vary("niti_mu", [3, 5, 8], 0.8)
    else:  # Lu et al.'s posit recipe: fp32 warm-up epochs, then posits with layer scaling
        fields.update(optimizer="sgd", format=rng.choice(["posit8", "posit(8,1)", "posit(16,1)"]),
                      warmup_epochs=1, layer_scaling=True, epochs=2)
        vary("lr", [0.02, 0.05], 0.8)
    if method != "niti":
        schedule = rng.choice(["constant", "constant", "cosine", "step"])
        if schedule != "constant":
            fields["lr_schedule"] = schedule
            if schedule == "step":
                fields.update(lr_step_epochs=1, lr_gamma=rng.choice([0.1, 0.5]))
            if rng.random() < 0.5:
                fields["lr_warmup_epochs"] = 1
        if not heavy and rng.random() < 0.25:
            accumulator = _accumulator(rng, [fields[name] for name in ("format", "weights", "activations",
                                                                       "gradients") if name in fields])
            if accumulator is not None:
                fields.update(accumulation=accumulator, accumulation_chunk=rng.choice([1, 4, 16]))
        per_layer = rng.random()
        if per_layer < 0.15:
            fields["full_precision_layers"] = rng.choice([["first"], ["last"], ["first", "last"]])
        elif per_layer < 0.3:
            trial_format = fields.get("format", fields.get("weights", "fp32"))
            rules = [rule for rule in [
                {"match": "type:Linear", "weights": _kin(rng, trial_format, FORMATS)},
                {"match": "type:Linear", "activations": _kin(rng, trial_format, FORMATS),
                 "gradients": _kin(rng, trial_format, FORMATS)},
                {"match": "*", "weight_grads": _kin(rng, trial_format, FORMATS)},
                {"match": "type:Linear", "format": "fp32"}]
                if _matches_some_layer(rule, model, dataset, data_dir)]
            fields["layers"] = [rng.choice(rules)]
    diverging = method in ("sgd", "sgd-no-copy", "adam", "adamw") and rng.random() < 0.25
    return DrawnTraining(method, fields, varied, diverging)


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


def write_file_datasets(folder: Path) -> Path:
    """Small MNIST and CIFAR-10 files under folder/mnist and folder/cifar10 (a user's local copies, random
    pixels: 192 training images, 96 test), for FILE_MODELS; returns `folder`."""
    from support.file_datasets import write_cifar, write_mnist

    write_mnist(folder / "mnist", n_train=192, n_test=96, seed=5)
    write_cifar(folder / "cifar10", per_batch=192 // 5 + 1)
    return folder


def draw_sweep(rng: random.Random, output: Path, workloads: list[str] | None = None,
               models: list[tuple[str, str]] | None = None, methods: list[str] | None = None,
               data_dir: Path | None = None, extra_workloads: list[str] | None = None,
               threads: tuple[int, ...] = (1,)) -> DrawnSweep:
    """One random sweep file writing to `output`. `data_dir` (write_file_datasets) adds FILE_MODELS to
    the draw; `extra_workloads` (an ONNX file, a built-in workload) are priced beside the proxy in some
    draws; `threads`: the executor's thread counts to draw from."""
    pool = models or [*MODELS, *(FILE_MODELS if data_dir else [])]
    model, data = rng.choice(pool)
    drawn = draw_training(rng, model, data, methods=methods, data_dir=data_dir)
    trial = dict(drawn.fields)
    task = {name: trial.pop(name) for name in TASK_FIELDS if name in trial}
    if data in ("mnist", "cifar10"):
        assert data_dir is not None
        task["data_dir"] = str(data_dir / data)
    else:
        task["dataset"] = f"{TINY}:{data}"
    tune = {name: sorted(rng.sample(values, rng.choice([1, 2])))
            for name, values in drawn.member_values.items()}
    if drawn.diverging:  # one tuned lr so large that its members' losses overflow
        tune["lr"] = sorted({*tune.get("lr", [0.01]), 100.0})
    seeds = sorted(rng.sample(range(10), rng.choice([2, 3])))
    if tune:
        trial["tune"] = tune
    group_size = rng.choice([2, 3, 4, 5])
    workers = rng.choice([1, 2])
    thread_count = rng.choice(threads)
    if workloads is None:
        workloads = ["proxy"]
        if extra_workloads and rng.random() < 0.3:
            workloads.append(rng.choice(extra_workloads))
    text = (f"name: audit\nseeds: {_yaml(seeds)}\ntask: {_yaml(task)}\n"
            f"energy: {_yaml({'workloads': workloads})}\ntrials:\n  - {_yaml(trial)}\n"
            f"executor: {_yaml({'group_size': group_size, 'workers': workers, 'threads': thread_count})}\n"
            f"output: {_yaml(str(output))}\n")
    name = model.split(":")[-1]
    description = (f"{drawn.method}{' diverging' if drawn.diverging else ''}: {name} on {data}, "
                   f"group {group_size}, {workers} worker(s), {thread_count} thread(s): {_yaml(trial)} "
                   f"seeds {seeds}{'' if workloads == ['proxy'] else f' workloads {workloads}'}")
    return DrawnSweep(text, description, group_size, workers, thread_count)


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
