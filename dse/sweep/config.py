"""The sweep file: schema, validation with `file:line` errors, and the validated SweepConfig.

Every problem is found here, before anything touches the disk: an unknown key (with a did-you-mean),
a wrong type, an invalid format spec, an unknown optimizer, model, dataset or workload, and an empty
grid each raise one InputError line `file:line: path: problem`. docs/config.md documents every key.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model

from dse.digests import file_sha256
from dse.energy import DatapathParams, MemoryParams, get_workload, workload_names
from dse.errors import InputError, InputErrors, Problems, SettingError, about, closest
from dse.models.workloads import is_workload_file
from dse.precision import FULL_PRECISION_LAYER_NAMES, LayerRule
from dse.sweep.store import output_directory
from dse.train.config import TrainConfig
from dse.train.loop import check_field
from dse.usercode import absolute, is_ref, load_function, parse_ref
from dse.usercode import identity as code_identity
from dse.yaml_lines import SourceMap, data_path, dotted, file_text, load_yaml

IDENTITY_FIELDS: tuple[str, ...] = ("model", "dataset", "data_dir", "device")
"""What makes a task a task: set once per task, never gridded."""
RUN_FIELDS: tuple[str, ...] = ("seed", "threads")
"""Set by the sweep itself: seeds from `seeds:`, threads from the executor."""
TRIAL_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainConfig)
                                      if f.name not in IDENTITY_FIELDS + RUN_FIELDS)
"""Fields a trial entry may set (one value or a list of values to grid over); a task may default them."""
TUNE_KEY = "tune"
"""Key of a trial entry (or task) that tunes numeric fields per configuration (see TUNABLE_FIELDS)."""
TASK_FIELDS: tuple[str, ...] = ("name", *IDENTITY_FIELDS, *TRIAL_FIELDS, TUNE_KEY)
LAYER_NAMES: tuple[str, ...] = FULL_PRECISION_LAYER_NAMES
PROXY_WORKLOAD = "proxy"

_FIELD_TYPES = typing.get_type_hints(TrainConfig)
_ADAPTERS = {name: TypeAdapter(kind) for name, kind in _FIELD_TYPES.items()}


def _is_numeric(kind: Any) -> bool:
    """int or float, optionally with None (`float | None`); never bool."""
    members = [k for k in typing.get_args(kind) if k is not type(None)] or [kind]
    return bool(members) and all(k in (int, float) for k in members)


TUNABLE_FIELDS: tuple[str, ...] = tuple(name for name in TRIAL_FIELDS if _is_numeric(_FIELD_TYPES[name]))
"""The numeric TrainConfig fields a `tune:` mapping may name."""


# --- the validated configuration ------------------------------------------------------------------

Tuning = dict[str, list[Any]]
"""A `tune:` mapping as validated: field -> its values, in the order written."""


@dataclass(frozen=True)
class TaskConfig:
    """One task: its own Pareto front. `defaults` are TrainConfig fields shared by its trials; `tune` the
    tuning every entry without its own `tune` gets."""

    name: str
    defaults: dict[str, Any]
    path: tuple[str | int, ...]
    tune: Tuning = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class TrialEntry:
    """One entry of `trials:`: each field with its list of values (the grid is their product).

    `tune`: None inherits the task's tuning; a mapping (possibly empty) replaces it.
    """

    choices: dict[str, list[Any]]
    seeds: tuple[int, ...] | None
    path: tuple[str | int, ...]
    tune: Tuning | None = None

    def tuning(self, task: TaskConfig) -> Tuning:
        """The fields tuned for this entry on `task`: its own, else the task's less what the entry sets."""
        if self.tune is not None:
            return self.tune
        return {name: values for name, values in task.tune.items() if name not in self.choices}


@dataclass(frozen=True)
class BaselineConfig:
    """`report.baseline`: the configuration of each task the others are compared with.

    Either a label as the reports show it, or TrainConfig fields the configuration has (`format`
    meaning all four tensor classes); the first configuration of a task in plan order that matches.
    """

    label: str | None = None
    fields: dict[str, Any] = dataclasses.field(default_factory=lambda: {"format": "fp32"})
    given: bool = False
    """False: the default (fp32); a task without an fp32 configuration is then compared with nothing."""


@dataclass(frozen=True)
class EnergyPoint:
    """One point of the energy axes: a node, a scope and a datapath; `name` tags its result columns."""

    name: str
    node: str
    scope: str
    node_scaling: str
    datapath: DatapathParams

    def describe(self) -> dict[str, Any]:
        return {"node": self.node, "scope": self.scope, "node_scaling": self.node_scaling,
                "datapath": dataclasses.asdict(self.datapath)}

    def column(self, workload: str) -> str:
        """The name a workload's results carry here: `resnet50` alone, `resnet50@7nm,pe` on a grid."""
        return f"{workload}@{self.name}" if self.name else workload


ENERGY_AXES: tuple[str, ...] = ("node", "scope", "accumulator", "vector_length")


@dataclass(frozen=True)
class EnergyConfig:
    workloads: tuple[str, ...]
    table: str | None
    memory: MemoryParams
    points: tuple[EnergyPoint, ...]
    """Every combination of the energy axes (node, scope, accumulator, vector_length); one if no list."""
    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    """Workload name -> what it is read from, for a user's network: an absolute file path (.onnx,
    .yaml, .yml, .csv) or `/abs/file.py:function` (traced on each task's dataset)."""

    @property
    def node(self) -> str:
        return self.points[0].node

    @property
    def datapath(self) -> DatapathParams:
        return self.points[0].datapath

    @property
    def columns(self) -> tuple[str, ...]:
        """The workload columns of the results: one per (energy point, workload), points outermost."""
        return tuple(point.column(w) for point in self.points for w in self.workloads)

    def describe(self) -> dict[str, Any]:
        """Everything that changes an energy number, as plain data (for hashing)."""
        return {"table": self.table, "memory": dataclasses.asdict(self.memory),
                "points": [point.describe() for point in self.points],
                **({"sources": {name: _source_identity(spec) for name, spec in self.sources.items()}}
                   if self.sources else {})}


def _source_identity(spec: str) -> Any:
    """A user workload's identity: its function and source hash, or its file's content hash."""
    if is_ref(spec):
        return code_identity(spec, "workload")
    try:
        return {"sha256": file_sha256(spec)}
    except OSError:
        return spec


@dataclass(frozen=True)
class ExecutorConfig:
    backend: Literal["local", "ray"]
    workers: int
    threads: int
    address: str | None
    group_size: int | None = None
    """Trials of one configuration trained at once as a stacked network (dse/train/grouped.py);
    1 trains each alone. None (not in the file): each configuration's default for its model and
    device, as measured (`default_group_size` in dse/sweep/groups.py, docs/training.md)."""
    retries: int = 2
    """Ray: times a task whose worker died (a lost node, a killed process) is run again."""


@dataclass(frozen=True)
class SweepConfig:
    name: str
    seeds: tuple[int, ...]
    tasks: tuple[TaskConfig, ...]
    trials: tuple[TrialEntry, ...]
    energy: EnergyConfig
    executor: ExecutorConfig
    output: Path
    memory_objective: bool
    baseline: BaselineConfig
    source: SourceMap
    text: str
    """The YAML as written, kept in the store for reference."""

    def replace(self, **changes: Any) -> SweepConfig:
        return dataclasses.replace(self, **changes)


# --- pydantic schema of the sections that are plain settings -------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _section_of(params: type) -> type[BaseModel]:
    """The sweep file's section for a parameters dataclass: its fields' names, types and defaults, and
    no bounds of its own (the dataclass checks its values, in one place; `_params` places its error
    at the key it names)."""
    hints = typing.get_type_hints(params)
    fields: dict[str, Any] = {field.name: (hints[field.name], field.default)
                              for field in dataclasses.fields(params)}
    return create_model(f"{params.__name__}Section", __base__=_Strict, **fields)


if typing.TYPE_CHECKING:  # made at run time from the dataclasses; to mypy, sections of any field
    class _ParamsSection(_Strict):
        def __getattr__(self, name: str) -> Any: ...

    _DatapathSection = _ParamsSection
    _MemorySection = _ParamsSection
else:
    _DatapathSection = _section_of(DatapathParams)
    _MemorySection = _section_of(MemoryParams)


def _params(params: type, section: BaseModel, path: tuple[str | int, ...], source: SourceMap) -> Any:
    """`params(**section)`, its error placed at the key of the setting it names."""
    try:
        return params(**section.model_dump())
    except SettingError as error:
        raise source.error((*path, *error.setting.split(".")), str(error).splitlines()[0]) from None


_Node = str | int | float


class _EnergySection(_Strict):
    node: _Node | list[_Node] = "45nm"
    scope: str | list[str] = "system"
    accumulator: str | None | list[str | None] = None
    vector_length: int | list[int] | None = None
    node_scaling: str = "calibrated"
    workloads: list[str] = Field(default_factory=lambda: [PROXY_WORKLOAD])
    table: str | None = None
    datapath: _DatapathSection = Field(default_factory=_DatapathSection)
    memory: _MemorySection = Field(default_factory=_MemorySection)


class _ExecutorSection(_Strict):
    backend: Literal["local", "ray"] = "local"
    workers: int | None = Field(None, ge=1)
    threads: int = Field(1, ge=1)
    address: str | None = None
    group_size: int | None = Field(None, ge=1)
    retries: int = Field(2, ge=0)


class _ReportSection(_Strict):
    memory_objective: bool = False
    baseline: str | dict[str, Any] | None = None


class _SweepFile(_Strict):
    name: str | None = None
    seeds: list[int] = Field(default_factory=lambda: [0])
    task: dict[str, Any] | None = None
    tasks: list[dict[str, Any]] | None = None
    trials: list[dict[str, Any]]
    energy: _EnergySection = Field(default_factory=_EnergySection)
    executor: _ExecutorSection = Field(default_factory=_ExecutorSection)
    output: str | None = None
    report: _ReportSection = Field(default_factory=_ReportSection)


_SECTION_MODELS: dict[str, type[BaseModel]] = {
    "": _SweepFile, "energy": _EnergySection, "datapath": _DatapathSection, "memory": _MemorySection,
    "executor": _ExecutorSection, "report": _ReportSection,
}


# --- helpers --------------------------------------------------------------------------------------

def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, else ' (expected one of ...)'."""
    options = sorted(choices)
    close = closest(word, options)
    if close:
        return f" (did you mean {close!r}?)"
    return f" (expected one of {', '.join(options)})"


def _model_for(path: tuple[str | int, ...]) -> type[BaseModel]:
    names = [p for p in path if isinstance(p, str)]
    return _SECTION_MODELS.get(names[-1] if names else "", _SweepFile)


def _pydantic_errors(error: ValidationError, data: Any, source: SourceMap) -> InputError:
    """Every problem pydantic found, each placed at its line (a misspelt key also shows up as a missing
    one: only the misspelling is reported)."""
    errors = error.errors()
    misspelt_in = {tuple(e["loc"][:-1]) for e in errors if e["type"] == "extra_forbidden"}
    problems = Problems()
    for each in errors:
        loc = tuple(each["loc"])
        path = data_path(data, loc)
        kind = each["type"]
        if kind == "extra_forbidden":
            key = str(path[-1])
            fields = _model_for(path[:-1]).model_fields
            problems.add(str(source.error(path, f"unknown key {key!r}{did_you_mean(key, fields)}")))
        elif kind == "missing":
            if loc[:-1] in misspelt_in:
                continue
            key = str(loc[-1])
            problems.add(str(source.error(path[:-1] if path and path[-1] == key else path,
                                          f"missing key {key!r}")))
        else:
            problems.add(str(source.error(path, f"{each['msg']} (got {each.get('input')!r})")))
    return InputErrors(problems.lines) if len(problems.lines) > 1 else InputError(problems.lines[0])


def _check(value: Any, name: str, path: tuple[str | int, ...], source: SourceMap) -> Any:
    """One TrainConfig field value: its type, then what it names (format spec, optimizer, ...)."""
    if name == "full_precision_layers":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise source.error(path, f"expected a list of layer names ({', '.join(LAYER_NAMES)}), got "
                               f"{value!r}")
        # Item by item, so that an unknown name is reported at its own place in the list.
        return tuple(_meaning(name, [layer], (*path, index), source)[0] for index, layer in enumerate(value))
    if name == "layers":
        if not isinstance(value, list):
            raise source.error(path, f"expected a list of rules such as [{{match: 'head', format: fp32}}], "
                               f"got {value!r}")
        rules = []
        for index, raw in enumerate(value):
            where = (*path, index)
            rule = _meaning(name, [raw], where, source)[0]
            rules.append(LayerRule(rule.match, rule.formats, f"{source.file}:{source.line(where)}"))
        return tuple(rules)
    try:
        value = _ADAPTERS[name].validate_python(value, strict=True)
    except ValidationError as error:
        first = error.errors()[0]
        expected = _FIELD_TYPES[name]
        raise source.error(path, f"{first['msg']} (got {value!r}; expected {_type_name(expected)})") from None
    return _meaning(name, value, path, source)


def _meaning(name: str, value: Any, path: tuple[str | int, ...], source: SourceMap) -> Any:
    """`check_field` of a value whose type is right, its one-line error placed at `path`."""
    try:
        return check_field(name, value)
    except ValueError as error:
        problem = str(error).splitlines()[0]
        if isinstance(value, str) and value.count("(") > value.count(")"):  # YAML split it at a comma
            problem += f" (a spec with a comma is quoted inside {{...}} and [...]: {name}: \"posit(8,1)\")"
        raise source.error(path, problem) from None


def _type_name(kind: Any) -> str:
    text = getattr(kind, "__name__", None) or str(kind)
    return text.replace("typing.", "").replace("NoneType", "null")


def _is_grid(name: str, value: Any) -> bool:
    """A list is a grid, except full_precision_layers and layers whose value is itself a list: there a
    list of lists."""
    if name in ("full_precision_layers", "layers"):
        return isinstance(value, list) and any(isinstance(v, list) for v in value)
    return isinstance(value, list)


def _unknown_key(key: Any, allowed: typing.Iterable[str], path: tuple[str | int, ...],
                 source: SourceMap) -> InputError:
    return source.error(path, f"unknown key {key!r}{did_you_mean(str(key), allowed)}")


# --- tasks and trials -----------------------------------------------------------------------------

def _check_task(raw: Any, path: tuple[str | int, ...], source: SourceMap, base_dir: Path) -> TaskConfig:
    if not isinstance(raw, dict):
        raise source.error(path, f"a task is a mapping with model and dataset, got {raw!r}")
    defaults: dict[str, Any] = {}
    problems = Problems()  # each key on its own: every bad key of the task is reported
    for key, value in raw.items():
        problems.attempt(_check_task_key, key, value, (*path, key), source, base_dir, defaults)
    for key in ("model", "dataset"):
        if key not in raw:
            problems.add(str(source.error(path, f"missing key {key!r}")))
    problems.raise_any()
    name = raw.get("name") or f"{_short(raw['model'])}/{_short(raw['dataset'])}"
    tune = _check_tune(raw[TUNE_KEY], (*path, TUNE_KEY), source) if TUNE_KEY in raw else {}
    return TaskConfig(name=name.strip(), defaults=defaults, path=path, tune=tune)


def _check_task_key(key: Any, value: Any, where: tuple[str | int, ...], source: SourceMap, base_dir: Path,
                    defaults: dict[str, Any]) -> None:
    """One key of a task, its checked value put into `defaults`."""
    if key in RUN_FIELDS:
        raise source.error(where, f"unknown key {key!r}: seeds come from the top-level 'seeds' list and "
                           "threads from 'executor'")
    if key not in TASK_FIELDS:
        raise _unknown_key(key, TASK_FIELDS, where, source)
    if key == "name":
        if not isinstance(value, str) or not value.strip():
            raise source.error(where, f"a task name is a non-empty string, got {value!r}")
        return
    if key == TUNE_KEY:
        return
    if _is_grid(key, value):
        raise source.error(where, "a task field takes one value; grid over values in a trial entry")
    if key in ("model", "dataset") and isinstance(value, str):
        value = absolute(value, base_dir)  # a file.py:function resolves against the sweep file's folder
    defaults[key] = _check(value, key, where, source)


def _short(value: Any) -> str:
    """A task name's part: a built-in's name, a user's model or dataset by its function's name."""
    ref = parse_ref(value)
    return str(value).strip().lower() if ref is None else ref.function


def _check_entry(raw: Any, path: tuple[str | int, ...], source: SourceMap) -> TrialEntry:
    if not isinstance(raw, dict):
        raise source.error(path, f"a trial entry is a mapping of fields to values or lists, got {raw!r}")
    choices: dict[str, list[Any]] = {}
    seeds: tuple[int, ...] | None = None
    problems = Problems()  # each key on its own: every bad key of the entry is reported

    def field_values(key: str, value: Any, where: tuple[str | int, ...]) -> list[Any]:
        if key in IDENTITY_FIELDS:
            raise source.error(where, f"{key!r} belongs to the task (task: or tasks:), not to a trial entry")
        if key not in TRIAL_FIELDS:
            raise _unknown_key(key, (*TRIAL_FIELDS, "seeds", TUNE_KEY), where, source)
        values = value if _is_grid(key, value) else [value]
        if not values:
            raise source.error(where, "empty list: a grid needs at least one value")
        checked = [problems.attempt(_check, v, key, (*where, i) if _is_grid(key, value) else where, source)
                   for i, v in enumerate(values)]
        return checked

    for key, value in raw.items():
        where = (*path, key)
        if key == "seeds":
            seeds = problems.attempt(_check_seeds, value, where, source)
        elif key != TUNE_KEY:
            checked = problems.attempt(field_values, key, value, where)
            if checked is not None:
                choices[key] = checked
    tune = (problems.attempt(_check_tune, raw[TUNE_KEY], (*path, TUNE_KEY), source) if TUNE_KEY in raw
            else None)
    problems.raise_any()
    for name in tune or {}:
        if name in choices:
            raise source.error((*path, TUNE_KEY, name), f"{name!r} is both set and tuned in this entry; "
                               "give it either a value (or grid) or a tune list")
    return TrialEntry(choices=choices, seeds=seeds, path=path, tune=tune)


def _check_tune(raw: Any, path: tuple[str | int, ...], source: SourceMap) -> Tuning:
    """`tune: {field: [values]}`: numeric TrainConfig fields, each a non-empty list of distinct values."""
    if not isinstance(raw, dict):
        raise source.error(path, f"tune is a mapping of numeric fields to lists of values, e.g. "
                           f"{{lr: [0.01, 0.1]}}, got {raw!r}")
    tune: Tuning = {}
    for name, values in raw.items():
        where = (*path, name)
        if name not in TUNABLE_FIELDS:
            if name in TRIAL_FIELDS:
                raise source.error(where, f"{name!r} is not numeric: tune takes numeric fields "
                                   f"({', '.join(TUNABLE_FIELDS)}); grid over {name!r} in the entry instead")
            raise _unknown_key(name, TUNABLE_FIELDS, where, source)
        if not isinstance(values, list):
            raise source.error(where, f"a tuned field takes a list of values, got {values!r}")
        if not values:
            raise source.error(where, "empty list: tuning needs at least one value")
        checked = [_check(value, name, (*where, index), source) for index, value in enumerate(values)]
        for index, value in enumerate(checked):
            if checked.index(value) != index:
                raise source.error((*where, index), f"{name} value {values[index]!r} is listed twice")
        tune[name] = checked
    return tune


def _check_baseline(raw: str | dict[str, Any] | None, source: SourceMap) -> BaselineConfig:
    """`report.baseline`: a label, a format spec (all four tensor classes), or a mapping of trial fields."""
    path: tuple[str | int, ...] = ("report", "baseline")
    if raw is None:
        return BaselineConfig()
    if isinstance(raw, str):
        if not raw.strip():
            raise source.error(path, "the baseline is empty: give a configuration label, a format spec or "
                               "a mapping of trial fields")
        try:
            return BaselineConfig(fields={"format": check_field("format", raw.strip())}, given=True)
        except ValueError:  # not a spec: a label (checked against the configurations when they are known)
            return BaselineConfig(label=raw.strip(), fields={}, given=True)
    if not raw:
        raise source.error(path, "empty mapping: name at least one trial field of the baseline")
    fields: dict[str, Any] = {}
    for key, value in raw.items():
        where = (*path, key)
        if key not in TRIAL_FIELDS:
            raise _unknown_key(key, TRIAL_FIELDS, where, source)
        if _is_grid(key, value):
            raise source.error(where, "a baseline field takes one value")
        fields[key] = _check(value, key, where, source)
    return BaselineConfig(fields=fields, given=True)


def _check_seeds(value: Any, path: tuple[str | int, ...], source: SourceMap) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise source.error(path, f"seeds is a list of integers, got {value!r}")
    if not value:
        raise source.error(path, "empty list: a grid needs at least one seed")
    for index, seed in enumerate(value):
        if seed < 0:
            raise source.error((*path, index), f"a seed is >= 0, got {seed}")
        if value.index(seed) != index:
            raise source.error((*path, index), f"seed {seed} is listed twice")
    return tuple(value)


def _workload_name(spec: str) -> str:
    """How a user's workload is named in reports: a file by its stem, a model by its function."""
    ref = parse_ref(spec)
    return ref.function if ref is not None else Path(spec).stem


def _axis(value: Any) -> tuple[list[Any], bool]:
    """(values, whether the file gave a list)."""
    return (list(value), True) if isinstance(value, list) else ([value], False)


def _check_energy(section: _EnergySection, source: SourceMap, base_dir: Path) -> EnergyConfig:
    """The energy section, every point of its axes checked by the types that own the values
    (DatapathParams, MemoryParams, build_model): each point's model is built once, and the setting a
    SettingError names is placed at its key here."""
    import itertools

    from dse.energy import build_model

    axes: dict[str, list[Any]] = {}
    listed: dict[str, bool] = {}
    for name in ENERGY_AXES:
        values, listed[name] = _axis(getattr(section, name))
        if listed[name] and not values:
            raise source.error(("energy", name), f"empty list: give at least one {name}")
        axes[name] = values
    axes["node"] = [node if isinstance(node, str) else f"{node:g}nm" for node in axes["node"]]
    if not section.workloads:
        raise source.error(("energy", "workloads"), "empty list: name at least one workload (e.g. proxy)")
    known = (PROXY_WORKLOAD, *workload_names())
    seen: set[str] = set()
    workloads: list[str] = []
    sources: dict[str, str] = {}
    for index, name in enumerate(section.workloads):
        where = ("energy", "workloads", index)
        key = name.strip().lower()
        if key not in known:
            spec = name.strip()
            if is_ref(spec) or is_workload_file(spec):
                spec = absolute(spec, base_dir) if is_ref(spec) else str((base_dir / spec).resolve())
                key = _workload_name(spec)
                sources[key] = spec
            elif not spec.lower().startswith("llama("):
                raise source.error(where, f"unknown workload {name!r}{did_you_mean(key, known)}; a user's "
                                   "network is an .onnx, .yaml or .csv file or file.py:function")
            try:  # read now: a bad file stops the sweep before anything is written
                load_function(spec, "workload") if is_ref(spec) else get_workload(spec)
            except ValueError as error:
                raise source.error(where, str(error).splitlines()[0]) from None
        if key in seen:
            raise source.error(where, f"workload {name!r} is listed twice (or shares its name {key!r})")
        seen.add(key)
        workloads.append(key)
    table = section.table
    if table is not None and not Path(table).is_file():
        raise source.error(("energy", "table"), f"energy table {table!r} not found")
    problems = Problems()
    base = problems.attempt(_params, DatapathParams, section.datapath, ("energy", "datapath"), source)
    memory = problems.attempt(_params, MemoryParams, section.memory, ("energy", "memory"), source)
    problems.raise_any()
    assert base is not None and memory is not None

    points: list[EnergyPoint] = []
    for indices in itertools.product(*(range(len(axes[name])) for name in ENERGY_AXES)):
        at = dict(zip(ENERGY_AXES, indices, strict=True))
        node, scope, accumulator, length = (axes[name][at[name]] for name in ENERGY_AXES)
        changes = {name: value for name, value in (("accumulator", accumulator), ("vector_length", length))
                   if value is not None}
        try:
            with about("datapath"):
                datapath = dataclasses.replace(base, **changes)
            build_model(node, datapath, memory, table, scope=scope, node_scaling=section.node_scaling)
        except SettingError as error:  # at the axis item that gave the value, else at the setting's key
            name = error.setting.removeprefix("datapath.")
            given = name in ("node", "scope") or name in changes
            path: tuple[str | int, ...] = ("energy", name, at[name]) if given and listed[name] else \
                ("energy", name) if given else ("energy", *error.setting.split("."))
            problems.add(str(source.error(path, str(error).splitlines()[0])))
            continue
        tags = [tag for tag, name in ((node, "node"), (scope, "scope"),
                                      (f"acc={accumulator or 'default'}", "accumulator"),
                                      (f"K={length}", "vector_length"))
                if listed[name] and len(axes[name]) > 1]
        points.append(EnergyPoint(",".join(tags), node, scope, section.node_scaling, datapath))
    problems.raise_any()
    return EnergyConfig(workloads=tuple(workloads), table=table, memory=memory, points=tuple(points),
                        sources=sources)


def _check_executor(section: _ExecutorSection, source: SourceMap) -> ExecutorConfig:
    if section.backend == "local" and section.address is not None:
        raise source.error(("executor", "address"), "address is for the ray backend (backend: ray)")
    if section.backend == "ray" and importlib.util.find_spec("ray") is None:
        raise source.error(("executor", "backend"), "Ray is not installed: pip install 'dse[ray]'")
    # by default as many trials as there are cores for their threads: no oversubscription
    workers = section.workers if section.workers is not None else max(1, available_cores() // section.threads)
    return ExecutorConfig(backend=section.backend, workers=workers, threads=section.threads,
                          address=section.address, group_size=section.group_size, retries=section.retries)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells, else the core count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


# --- entry points ---------------------------------------------------------------------------------

def parse_config(text: str, source_name: str = "<config>", base_dir: str | Path | None = None) -> SweepConfig:
    """Validate a sweep file's text; raises InputError (one line, `file:line: path: problem`).

    Relative paths of a user's model, dataset or workload resolve against `base_dir` (default: the
    folder of `source_name`)."""
    folder = Path(base_dir) if base_dir is not None else Path(source_name).parent
    folder = folder.resolve()
    data, source = load_yaml(text, source_name)
    if not isinstance(data, dict):
        raise source.error((), "a sweep file is a mapping with at least 'task' (or 'tasks') and 'trials'")
    for key in data:
        if not isinstance(key, str):
            raise source.error((key,), f"keys are strings, got {key!r}")
    for key, what in (("trials", "trial entry"), ("tasks", "task"), ("seeds", "seed")):
        if key in data and data[key] is None:
            raise source.error((key,), f"empty: give at least one {what}")
    try:
        sweep = _SweepFile.model_validate(data)
    except ValidationError as error:
        raise _pydantic_errors(error, data, source) from None
    if (sweep.task is None) == (sweep.tasks is None):
        raise source.error((), "give either 'task' (one) or 'tasks' (a list), not both or neither")
    problems = Problems()  # independent parts are all checked: every error is reported at once
    if sweep.tasks is not None:
        if not sweep.tasks:
            raise source.error(("tasks",), "empty list: give at least one task")
        checked = [problems.attempt(_check_task, raw, ("tasks", i), source, folder)
                   for i, raw in enumerate(sweep.tasks)]
    else:
        checked = [problems.attempt(_check_task, sweep.task, ("task",), source, folder)]
    tasks = [task for task in checked if task is not None]
    names: dict[str, tuple[str | int, ...]] = {}
    for task in tasks:
        if task.name in names:
            problems.add(str(source.error(task.path, f"task name {task.name!r} is also used by "
                                          f"{dotted(names[task.name])}; give each task its own 'name'")))
        names[task.name] = task.path
    if not sweep.trials:
        problems.add(str(source.error(("trials",), "empty list: give at least one trial entry")))
    entries = [problems.attempt(_check_entry, raw, ("trials", i), source)
               for i, raw in enumerate(sweep.trials)]
    seeds = problems.attempt(_check_seeds, sweep.seeds, ("seeds",), source)
    name = sweep.name if sweep.name is not None else Path(source_name).stem
    if not name.strip():
        problems.add(str(source.error(("name",), "the sweep name is empty")))
    elif sweep.output is None and (name.strip() in (".", "..") or any(sep in name for sep in "/\\")):
        problems.add(str(source.error(("name",), f"the sweep name {name!r} is a path, and its results would "
                                      f"go to results/{name}: name the sweep plainly and set output: to "
                                      "where its results go")))
    if sweep.output is not None and not sweep.output.strip():
        problems.add(str(source.error(("output",), "empty path: leave output: out for results/<name>, or "
                                      "write . for this folder")))
    energy = problems.attempt(_check_energy, sweep.energy, source, folder)
    executor = problems.attempt(_check_executor, sweep.executor, source)
    baseline = problems.attempt(_check_baseline, sweep.report.baseline, source)
    problems.raise_any()
    assert seeds is not None and energy is not None and executor is not None and baseline is not None
    output = output_directory(sweep.output, name)
    return SweepConfig(
        name=name.strip(), seeds=seeds, tasks=tuple(tasks), trials=tuple(e for e in entries if e is not None),
        energy=energy, executor=executor, output=output, memory_objective=sweep.report.memory_objective,
        baseline=baseline, source=source, text=text)


def load_config(path: str | Path, text: str | None = None) -> SweepConfig:
    """Read and validate a sweep file; `text`: its text (dse.yaml_lines.file_text of its bytes) where
    the caller has read it already."""
    path = Path(path)
    try:
        text = file_text(path.read_bytes()) if text is None else text
    except FileNotFoundError:
        raise InputError(f"sweep file {str(path)!r} not found") from None
    except IsADirectoryError:
        raise InputError(f"sweep file {str(path)!r} is a directory") from None
    except UnicodeDecodeError:
        raise InputError(f"sweep file {str(path)!r} is not UTF-8 text") from None
    except OSError as error:  # no permission, a symlink loop, ...
        reason = error.strerror or type(error).__name__
        raise InputError(f"sweep file {str(path)!r} cannot be read ({reason})") from None
    return parse_config(text, str(path))
