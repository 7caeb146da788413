"""Trials: the grid of a sweep file expanded into TrainConfigs, each with a stable id and a readable label.

The id hashes the full resolved configuration (sorted JSON, sha256), so it does not depend on key order,
on how a format is spelled (`lns(8,gamma=8)` and `lns8` are one format), or on `format` being written
as shorthand for the per-tensor fields. Threads are left out: they change speed, not the experiment.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Any

from dse.formats import get
from dse.sweep.config import TRIAL_FIELDS, SweepConfig
from dse.train.config import TENSOR_FORMAT_FIELDS, TrainConfig
from dse.usercode import identity as code_identity

FP32 = "fp32"
TENSOR_FIELDS: tuple[str, ...] = ("weights", "activations", "gradients", "weight_grads")
_DEFAULTS = TrainConfig().to_dict()


@dataclass(frozen=True)
class Trial:
    trial_id: str
    task: str
    label: str
    """Readable key, unique within the task for a configuration without its seed."""
    config: TrainConfig
    source: tuple[str | int, ...]
    """Path of the trial entry in the sweep file, for error messages."""


def _canonical(spec: str | None) -> str | None:
    return None if spec is None else get(spec).spec


def resolved_formats(config: TrainConfig) -> dict[str, str]:
    """The format of each tensor class as a canonical spec, `format` shorthand applied, fp32 if none."""
    base = _canonical(config.format)
    weights = _canonical(config.weights) or base or FP32
    activations = _canonical(config.activations) or base or FP32
    gradients = _canonical(config.gradients) or base or FP32
    weight_grads = _canonical(config.weight_grads) or gradients
    return {"weights": weights, "activations": activations, "gradients": gradients,
            "weight_grads": weight_grads, "optimizer_state": _canonical(config.optimizer_state) or FP32}


def identity(task: str, config: TrainConfig) -> dict[str, Any]:
    """What defines a trial: its task and every setting that can change its result. A user's model or
    dataset (`file.py:function`) counts by its function and its file's content hash, not its path."""
    data = config.to_dict()
    data.pop("threads")
    for name in ("model", "dataset"):
        data[name] = code_identity(data[name], name)
    for name in TENSOR_FORMAT_FIELDS:
        data.pop(name)
    data.update(resolved_formats(config))
    return {"task": task, "config": data}


def stable_hash(data: Any, length: int = 16) -> str:
    """sha256 of sorted, compact JSON: the same data gives the same hash in any process or key order."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def trial_hash(task: str, config: TrainConfig) -> str:
    return stable_hash(identity(task, config))


# --- labels ---------------------------------------------------------------------------------------

def _format_token(formats: dict[str, str]) -> str:
    w, a, g, dw = (formats[name] for name in TENSOR_FIELDS)
    if w == a == g == dw:
        return w
    token = f"W={w},A={a},G={g}"
    return token if dw == g else f"{token},dW={dw}"


def _token(name: str, value: Any) -> str:
    if name == "master_weights":
        return "master" if value else "no-master"
    if name == "layer_scaling":
        return "layer-scaling" if value else "no-layer-scaling"
    if name == "warmup_epochs":
        return f"warmup={value}"
    if name == "full_precision_layers":
        return f"fp-layers={'+'.join(value) if value else 'none'}"
    if name == "optimizer_state":
        return f"state={value}"
    return f"{name.replace('_', '-')}={value}"


def make_labels(configs: list[dict[str, Any]]) -> list[str]:
    """Labels for a task's seedless configurations (identity()['config'] dicts).

    Each label is the formats, the optimizer, and every other field that varies within the task and is
    not at TrainConfig's default: two configurations differ in some varying field, and at least one of
    them shows it, so labels are unique.
    """
    candidates = ["optimizer_state", *(name for name in TRIAL_FIELDS
                                       if name not in TENSOR_FORMAT_FIELDS and name != "optimizer")]
    varying = [name for name in candidates if len({json.dumps(c.get(name)) for c in configs}) > 1]
    labels = []
    for config in configs:
        tokens = [_format_token(config), config["optimizer"]]
        for name in varying:
            default = FP32 if name == "optimizer_state" else _DEFAULTS.get(name)
            value = config.get(name)
            if json.dumps(value) != json.dumps(default):
                tokens.append(_token(name, value))
        labels.append(" ".join(tokens))
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    if any(count > 1 for count in counts.values()):  # cannot happen by the argument above; stay unique anyway
        labels = [f"{label} #{stable_hash(config, 6)}" if counts[label] > 1 else label
                  for label, config in zip(labels, configs, strict=True)]
    return labels


# --- expansion ------------------------------------------------------------------------------------

def expand(sweep: SweepConfig) -> list[Trial]:
    """Every trial of the sweep: per task, each entry's grid (product of its lists) times its seeds.

    Order: task, entry, grid point (fields in the order written, last one fastest), seed. A trial that
    resolves to the same configuration as an earlier one runs once.
    """
    trials: list[Trial] = []
    for task in sweep.tasks:
        points: list[tuple[TrainConfig, tuple[str | int, ...]]] = []
        for entry in sweep.trials:
            keys = list(entry.choices)
            for combo in itertools.product(*(entry.choices[key] for key in keys)):
                values = {**task.defaults, **dict(zip(keys, combo, strict=True))}
                for seed in entry.seeds or sweep.seeds:
                    points.append((TrainConfig(**values, seed=seed, threads=sweep.executor.threads),
                                   entry.path))
        unique: dict[str, tuple[TrainConfig, tuple[str | int, ...], str]] = {}  # -> (.., seedless hash)
        seedless: dict[str, dict[str, Any]] = {}
        for config, path in points:
            ident = identity(task.name, config)
            trial_id = stable_hash(ident)  # = trial_hash(task.name, config)
            if trial_id in unique:
                continue
            data = ident["config"]
            data.pop("seed")
            key = stable_hash(data)
            seedless.setdefault(key, data)
            unique[trial_id] = (config, path, key)
        labels = dict(zip(seedless, make_labels(list(seedless.values())), strict=True))
        for trial_id, (config, path, key) in unique.items():
            trials.append(Trial(trial_id=trial_id, task=task.name, label=labels[key], config=config,
                                source=path))
    return trials


# Rough cost of a training step under each format family relative to fp32 (benchmarks/train_step.py
# on the proxies); only the order in which trials start depends on it, never a result.
_FAMILY_STEP_COST = {"fp32": 1.0, "int": 1.6, "fixed": 1.6, "fp": 1.9, "lns": 2.3, "posit": 2.8, "mx": 2.8}


def estimated_cost(config: TrainConfig) -> float:
    """A relative estimate of a trial's training time, to start the longest trials first.

    With trials handed out in list order, a slow trial near the end keeps one worker busy while the
    others idle; longest-first leaves only short trials for the tail.
    """
    from dse.formats import get

    formats = resolved_formats(config)
    step = 1.0
    for name in ("weights", "activations", "gradients", "weight_grads"):
        spec = formats[name]
        family = "fp32" if spec == FP32 else get(spec).family
        step = max(step, _FAMILY_STEP_COST.get(family, 2.0))
    if config.optimizer == "niti":
        step = max(step, 3.0)
    if config.accumulation is not None:
        step *= 2.0
    return step * config.epochs

