"""A workload written down as a list of GEMM shapes, in YAML or CSV (no torch).

Each layer is one forward GEMM per sample, `groups` products of [m, k] x [k, n], with the fields of
models.workloads.GemmLayer:

    name: my-net            # YAML only, optional (default: the file's name)
    batch_size: 32          # optional (default 32)
    optimizer: adam         # optional: sgd (default), adam, madam
    extra_params: {embedding: 3932160}   # optional: parameters no GEMM owns, by name
    layers:
      - {name: conv1, m: 12544, k: 147, n: 64, kind: conv, input_elems: 150528}
      - {name: attn.scores, m: 128, k: 64, n: 128, groups: 12, weight: false}
      - {name: fc, m: 1, k: 512, n: 1000}

A YAML file may also be the bare list of layers. A CSV file has a header row naming the layer fields
(`name,m,k,n` required; `groups,kind,input_elems,weight,needs_input_grad,needs_weight_grad` optional,
an empty cell takes the default). `weight: false` marks an activation x activation product (attention); `kind`
defaults to linear for weight GEMMs and attention otherwise; `needs_input_grad` defaults to false for
the first layer (nothing upstream needs its input gradient) and true for the others;
`needs_weight_grad: false` drops the backward-weight GEMM (a product of two activations of which the
second needs no gradient, or a frozen weight, which is then not updated either).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dse.errors import InputError
from dse.models.workloads import GemmLayer, Workload
from dse.yaml_lines import SourceMap, data_path, load_yaml

LAYER_FILE_SUFFIXES = (".yaml", ".yml", ".csv")
OPTIMIZERS = ("sgd", "adam", "madam")


class _Layer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    m: int = Field(ge=1)
    k: int = Field(ge=1)
    n: int = Field(ge=1)
    groups: int = Field(1, ge=1)
    kind: Literal["linear", "conv", "attention"] | None = None
    input_elems: int | None = Field(None, ge=1)
    weight: bool = True
    needs_input_grad: bool | None = None
    needs_weight_grad: bool = True


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["sgd", "adam", "madam"] = "sgd"
    extra_params: dict[str, int] = Field(default_factory=dict)
    layers: list[_Layer] = Field(min_length=1)


def _workload(spec: _File, default_name: str, where: str) -> Workload:
    layers = []
    seen: set[str] = set()
    for index, layer in enumerate(spec.layers):
        if layer.name in seen:
            raise InputError(f"{where}: layer name {layer.name!r} is used twice")
        seen.add(layer.name)
        kind = layer.kind or ("linear" if layer.weight else "attention")
        grad = layer.needs_input_grad if layer.needs_input_grad is not None else index > 0
        layers.append(GemmLayer(layer.name, layer.m, layer.k, layer.n, layer.groups, layer.input_elems,
                                layer.weight, grad, kind, layer.needs_weight_grad))
    return Workload(spec.name or default_name, tuple(layers), batch_size=spec.batch_size,
                    optimizer=spec.optimizer, extra_params=dict(spec.extra_params),
                    description=f"layer shapes from {where}")


def _pydantic_message(error: ValidationError) -> tuple[tuple[Any, ...], str]:
    first = error.errors()[0]
    if first["type"] == "extra_forbidden":
        return tuple(first["loc"]), f"unknown key {first['loc'][-1]!r}"
    if first["type"] == "missing":
        return tuple(first["loc"][:-1]), f"missing key {first['loc'][-1]!r}"
    return tuple(first["loc"]), f"{first['msg']} (got {first.get('input')!r})"


def _from_yaml(text: str, path: Path) -> Workload:
    data, source = load_yaml(text, str(path))
    if isinstance(data, list):
        data = {"layers": data}
        source = SourceMap(source.file, {("layers", *key): line for key, line in source.lines.items()})
    if not isinstance(data, dict):
        raise InputError(f"{path}: a workload file is a mapping with 'layers' (or a list of layers)")
    try:
        spec = _File.model_validate(data)
    except ValidationError as error:
        loc, message = _pydantic_message(error)
        raise source.error(data_path(data, loc), message) from None
    return _workload(spec, path.stem, str(path))


def _cell(value: str) -> Any:
    text = value.strip()
    if text == "":
        return None
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(text)
    except ValueError:
        return text


def _from_csv(text: str, path: Path) -> Workload:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames:
        raise InputError(f"{path}: empty CSV; the first row names the columns (name,m,k,n,...)")
    layers = []
    for row in reader:
        line = reader.line_num
        if None in row:
            raise InputError(f"{path}:{line}: more cells than columns")
        values = {key.strip(): _cell(value or "") for key, value in row.items()}
        values = {key: value for key, value in values.items() if value is not None}
        try:
            layers.append(_Layer.model_validate(values))
        except ValidationError as error:
            loc, message = _pydantic_message(error)
            raise InputError(f"{path}:{line}: {'.'.join(map(str, loc)) or 'row'}: {message}") from None
    if not layers:
        raise InputError(f"{path}: no layers (one row per GEMM after the header)")
    return _workload(_File(layers=layers), path.stem, str(path))


def load_layer_file(path: str | Path) -> Workload:
    """The workload a YAML or CSV list of GEMM shapes describes; errors name `file:line`."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"workload file {str(path)!r} not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"workload file {str(path)!r} cannot be read ({type(error).__name__})") from None
    return _from_csv(text, path) if path.suffix.lower() == ".csv" else _from_yaml(text, path)
