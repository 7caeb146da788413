"""Trials: the grid of a sweep file expanded into TrainConfigs, each with a stable id and a readable label.

The id hashes the full resolved configuration (sorted JSON, sha256), so it does not depend on key order,
on how a format is spelled (`lns(8,gamma=8)` and `lns8` are one format), or on `format` being written
as shorthand for the per-tensor fields. Threads are left out: they change speed, not the experiment.

A configuration is what the reports compare: a trial without its seed and without the values of its
tuned fields (`tune:`), which are replaced by their lists. Each configuration is trained at every
tuning point and seed; its label and its `configuration` hash name it whatever point a trial is at.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from dse.digests import sha256_hex
from dse.formats import get
from dse.precision import FP32, GEMM_TENSOR_CLASSES, canonical_spec
from dse.report.labels import TUNED, field_token
from dse.sweep.config import TRIAL_FIELDS, SweepConfig
from dse.train.config import TENSOR_FORMAT_FIELDS, TrainConfig
from dse.usercode import identity as code_identity

TENSOR_FIELDS: tuple[str, ...] = GEMM_TENSOR_CLASSES
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
    configuration: str = ""
    """Hash of the configuration (the trial without its seed and tuned values): one per label."""
    tuning: dict[str, Any] = field(default_factory=dict)
    """The tuning point: each tuned field's value in this trial (empty when nothing is tuned)."""


def resolved_formats(config: TrainConfig) -> dict[str, str]:
    """The format of each tensor class as a canonical spec, `format` shorthand applied, fp32 if none."""
    return config.tensor_formats().canonical().as_dict()


def canonical_rules(config: TrainConfig) -> list[dict[str, str]]:
    """The per-layer rules with canonical specs (the shorthand stays as written: it means something
    different from the fields it fills when the trial sets them)."""
    return [{"match": rule.match, **{name: canonical_spec(spec) for name, spec in rule.formats}}
            for rule in config.layers]


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
    data["layers"] = canonical_rules(config)
    if not data["layers"]:
        data.pop("layers")  # trials without rules keep the ids they had before rules existed
    return {"task": task, "config": data}


def stable_hash(data: Any, length: int = 16) -> str:
    """sha256 of sorted, compact JSON: the same data gives the same hash in any process or key order."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return sha256_hex(text)[:length]


def trial_hash(task: str, config: TrainConfig) -> str:
    return stable_hash(identity(task, config))


# --- labels ---------------------------------------------------------------------------------------

def _format_token(formats: dict[str, str]) -> str:
    w, a, g, dw = (formats[name] for name in TENSOR_FIELDS)
    if w == a == g == dw:
        return w
    token = f"W={w},A={a},G={g}"
    return token if dw == g else f"{token},dW={dw}"


def configuration_identity(task: str, config: TrainConfig, tuned: dict[str, list[Any]]) -> dict[str, Any]:
    """identity()'s config without the seed, each tuned field replaced by {"tuned": its values}."""
    data = identity(task, config)["config"]
    data.pop("seed")
    for name, values in tuned.items():
        data[name] = {TUNED: list(values)}
    return data


def make_labels(configs: list[dict[str, Any]]) -> list[str]:
    """Labels for a task's configurations (configuration_identity dicts).

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
            value = config.get(name, default)  # an identity leaves out `layers` when there are none
            if json.dumps(value) != json.dumps(default):
                tokens.append(field_token(name, value))
        labels.append(" ".join(tokens))
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    if any(count > 1 for count in counts.values()):  # cannot happen by the argument above; stay unique anyway
        labels = [f"{label} #{stable_hash(config, 6)}" if counts[label] > 1 else label
                  for label, config in zip(labels, configs, strict=True)]
    return labels


# --- expansion ------------------------------------------------------------------------------------

def _product(choices: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the lists (keys in order, the last one varying fastest)."""
    keys = list(choices)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*choices.values())]


def expand(sweep: SweepConfig) -> list[Trial]:
    """Every trial of the sweep: per task, each entry's grid (product of its lists) times its tuning
    points times its seeds.

    Order: task, entry, grid point (fields in the order written, last one fastest), tuning point (same
    rule), seed. A trial that resolves to the same training run as an earlier one of the same
    configuration is listed once; one that two configurations share (a tuning point of one that is
    the fixed value of another) is listed under each, and trained once (trial ids are unique per run).
    """
    trials: list[Trial] = []
    for task in sweep.tasks:
        points: list[tuple[TrainConfig, tuple[str | int, ...], dict[str, Any], dict[str, Any]]] = []
        for entry in sweep.trials:
            tuned = entry.tuning(task)
            for combo in _product(entry.choices):
                values = {**task.defaults, **combo}
                base = TrainConfig(**{**values, "seed": 0, "threads": sweep.executor.threads})
                configuration = configuration_identity(task.name, base, tuned)
                for point in _product(tuned):
                    for seed in entry.seeds or sweep.seeds:
                        config = TrainConfig(**{**values, **point, "seed": seed,
                                                "threads": sweep.executor.threads})
                        points.append((config, entry.path, configuration, point))
        unique: dict[tuple[str, str], tuple[TrainConfig, tuple[str | int, ...], dict[str, Any]]] = {}
        configurations: dict[str, dict[str, Any]] = {}
        for config, path, configuration, point in points:
            key = stable_hash(configuration)
            trial_id = trial_hash(task.name, config)
            if (trial_id, key) in unique:
                continue
            configurations.setdefault(key, configuration)
            unique[(trial_id, key)] = (config, path, point)
        labels = dict(zip(configurations, make_labels(list(configurations.values())), strict=True))
        for (trial_id, key), (config, path, point) in unique.items():
            trials.append(Trial(trial_id=trial_id, task=task.name, label=labels[key], config=config,
                                source=path, configuration=key, tuning=point))
    return trials


# Rough cost of a training step under each format family relative to fp32 (benchmarks/train_step.py
# on the proxies); only the order in which trials start depends on it, never a result.
_FAMILY_STEP_COST = {"fp32": 1.0, "int": 1.6, "fixed": 1.6, "fp": 1.9, "p3109": 1.9, "lns": 2.3, "posit": 2.8,
                     "block": 2.8}


def estimated_cost(config: TrainConfig) -> float:
    """A relative estimate of a trial's training time, to start the longest trials first.

    With trials handed out in list order, a slow trial near the end keeps one worker busy while the
    others idle; longest-first leaves only short trials for the tail.
    """

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



# --- the baseline of each task --------------------------------------------------------------------

def _matches(trial: Trial, fields: dict[str, Any]) -> bool:
    """Whether a trial's configuration has every field of `fields` (`format`: all four tensor classes)."""
    config = trial.config
    formats = resolved_formats(config)
    for name, value in fields.items():
        if name in trial.tuning:
            return False  # a tuned field has no one value
        if name == "format":
            if any(formats[tensor] != canonical_spec(value) for tensor in TENSOR_FIELDS):
                return False
        elif name in formats:
            if formats[name] != canonical_spec(value):
                return False
        elif json.dumps(getattr(config, name), default=list) != json.dumps(value, default=list):
            return False
    return True


def baseline_labels(sweep: SweepConfig, trials: list[Trial]) -> dict[str, str]:
    """Task -> label of its baseline configuration: the first in plan order that `report.baseline` names.

    A baseline the sweep file gives must name a configuration of every task (else an InputError at
    `report.baseline`); the default (fp32) is left out for a task that has no fp32 configuration.
    """
    baseline = sweep.baseline
    chosen: dict[str, str] = {}
    for task in sweep.tasks:
        own = [trial for trial in trials if trial.task == task.name]
        if baseline.label is not None:
            match = next((t for t in own if t.label == baseline.label), None)
        else:
            match = next((t for t in own if _matches(t, baseline.fields)), None)
        if match is not None:
            chosen[task.name] = match.label
        elif baseline.given:
            wanted = repr(baseline.label) if baseline.label is not None else json.dumps(baseline.fields)
            labels = ", ".join(repr(label) for label in dict.fromkeys(t.label for t in own))
            raise sweep.source.error(("report", "baseline"), f"unknown baseline {wanted}: no configuration "
                                     f"of task {task.name!r} matches (its configurations: {labels})")
    return chosen
