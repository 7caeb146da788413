"""Which number format each tensor class uses, per layer: the one vocabulary of training, sweeps and energy.

A GEMM layer of a training step touches four tensor classes (`GEMM_TENSOR_CLASSES`): its weights and
activations (the forward operands), its gradients (the errors flowing back, the backward-data operand)
and its weight gradients (the backward-weight result); the optimizer adds the stored copy of the
weights it updates (master_weights) and its state (optimizer_state). These names (`TENSOR_CLASSES`)
are the one vocabulary: config fields, QuantPolicy's quantizers, a quantized layer's quantizers and
the energy model's `tensor` column all use them. `TensorFormats`
names a format spec for each, and `TensorFormats.resolve` is the one place the `format` shorthand is
applied: `format` fills weights, activations and gradients; `gradients` fills weight_grads unless it
is given; what is left stays as the base (fp32 by default).

Per-layer precision is an ordered list of `LayerRule`s. A rule's `match` is a glob over a layer's
qualified name (as `model.named_modules()` spells it) or `type:Class` for a module class; it carries
any of the fields `format`, `weights`, `activations`, `gradients`, `weight_grads`. The first rule that
matches a layer gives that layer's formats (its fields resolved over the trial's formats); layers no
rule matches take the trial's formats. `resolve_layers` turns rules and a list of layers into plain
data, layer name -> TensorFormats, which the training code and the energy model both consume.

Plain data over spec strings: nothing here imports torch, so `dse.energy` can use it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dse.errors import InputError

FP32 = "fp32"
WEIGHTS = "weights"
ACTIVATIONS = "activations"
GRADIENTS = "gradients"
"""The errors flowing back (activation gradients): the backward-data GEMM's operand."""
WEIGHT_GRADS = "weight_grads"
"""The backward-weight GEMM's result."""
MASTER_WEIGHTS = "master_weights"
"""The stored copy of the weights the optimizer updates (an fp32 or own-format master copy, or the
weights themselves in their GEMM format when no copy is kept)."""
OPTIMIZER_STATE = "optimizer_state"
"""Momentum buffers, Adam's moments, Madam's second moment."""
GEMM_TENSOR_CLASSES: tuple[str, ...] = (WEIGHTS, ACTIVATIONS, GRADIENTS, WEIGHT_GRADS)
"""The tensor classes of a GEMM layer's three GEMMs (forward, backward-data, backward-weight)."""
TENSOR_CLASSES: tuple[str, ...] = (*GEMM_TENSOR_CLASSES, MASTER_WEIGHTS, OPTIMIZER_STATE)
"""Every tensor class of a training step: the names training, sweeps and energy (its `tensor`
column) all use."""
FORMAT_CLASSES: tuple[str, ...] = (*GEMM_TENSOR_CLASSES, OPTIMIZER_STATE)
"""The tensor classes `TensorFormats` names a format for (the master copy is the `master_weights`
setting: an fp32 copy, none, or a format)."""
SHORTHAND = "format"
"""Fills weights, activations and gradients (and so weight_grads) at once."""
FORMAT_FIELDS: tuple[str, ...] = (SHORTHAND, *FORMAT_CLASSES)
"""Every field that gives a tensor class its format, shorthand included."""
RULE_FIELDS: tuple[str, ...] = (SHORTHAND, *GEMM_TENSOR_CLASSES)
"""The format fields a per-layer rule may carry."""
TYPE_PREFIX = "type:"
FULL_PRECISION_LAYER_NAMES: tuple[str, ...] = ("first", "last")
"""`full_precision_layers` shorthand: the first / last weight layer stays fp32."""
_CALL_SUFFIX = re.compile(r"#\d+$")


def _spec(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{field}: a format is a spec string such as 'fp8_e4m3', got {value!r}")
    return value.strip()


def states_scale(spec: str) -> bool:
    """Whether a spec states its scaling (`scale=`): training then uses the format exactly as written,
    without its scaling defaults (dse/train/policy.py), so the statement is part of what it means."""
    from dse.formats.spec import parse_call

    return "scale" in parse_call(spec).kwargs


def canonical_spec(spec: str) -> str:
    """A format spec in its canonical spelling (`lns(8,gamma=8)` -> `lns8`); ValueError if invalid.

    A stated `scale=` is kept where the format's own spelling leaves it out (`fp8_e4m3(scale=none)`):
    `fp8_e4m3` trains with the scaling defaults, the stated form without, so they are two formats here.
    """
    from dse.formats import get

    if spec.strip().lower() == FP32:
        return FP32
    fmt = get(spec)
    canonical = fmt.spec
    if canonical == FP32 or fmt.scaling.kind != "none" or not states_scale(spec) or states_scale(canonical):
        return canonical  # (a scaled format trains as written whether its scale is stated or not)
    return f"{canonical[:-1]},scale=none)" if canonical.endswith(")") else f"{canonical}(scale=none)"


@dataclass(frozen=True)
class TensorFormats:
    """The format spec of each tensor class ('fp32': left in full precision)."""

    weights: str = FP32
    activations: str = FP32
    gradients: str = FP32
    weight_grads: str = FP32
    optimizer_state: str = FP32

    @classmethod
    def resolve(cls, fields: Mapping[str, Any], base: TensorFormats | None = None) -> TensorFormats:
        """The formats `fields` (any of FORMAT_FIELDS; None or absent = not given) give over `base`.

        The one place the shorthand is resolved: weights/activations/gradients take their own field,
        else `format`, else the base; weight_grads takes its own field, else `gradients`, else
        `format`, else the base; optimizer_state its own field, else the base.
        """
        base = base or cls()
        given = {name: _spec(fields.get(name), name) for name in FORMAT_FIELDS}
        short = given[SHORTHAND]

        def pick(*names: str) -> str | None:
            return next((given[n] for n in names if given[n] is not None), None)

        return cls(
            weights=pick("weights", SHORTHAND) or base.weights,
            activations=pick("activations", SHORTHAND) or base.activations,
            gradients=pick("gradients", SHORTHAND) or base.gradients,
            weight_grads=pick("weight_grads", "gradients") or short or base.weight_grads,
            optimizer_state=given["optimizer_state"] or base.optimizer_state,
        )

    def canonical(self) -> TensorFormats:
        """Each spec in its canonical spelling (`lns(8,gamma=8)` -> `lns8`)."""
        return TensorFormats(**{name: canonical_spec(spec) for name, spec in self.as_dict().items()})

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @property
    def quantizes_gemms(self) -> bool:
        return any(getattr(self, name).lower() != FP32 for name in GEMM_TENSOR_CLASSES)


# --- per-layer rules ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layer:
    """A GEMM layer as rules see it: its name, the names it answers to, its module classes."""

    name: str
    """Qualified name (`blocks.0.attn.out_proj`; a functional GEMM: `owner.matmul0`)."""
    aliases: tuple[str, ...] = ()
    """Other names a glob may match: the owning module of a functional GEMM."""
    types: tuple[str, ...] = ()
    """Class names of the layer's module and its bases (`type:Linear` matches a Linear subclass)."""
    has_weight: bool = True
    """Its second operand is a parameter (full_precision_layers counts these)."""

    def names(self) -> tuple[str, ...]:
        base = _CALL_SUFFIX.sub("", self.name)
        return tuple(dict.fromkeys((self.name, base, *self.aliases)))


@dataclass(frozen=True)
class LayerRule:
    """One entry of `layers:`: which layers (`match`) take which formats (`formats`, field -> spec)."""

    match: str
    formats: tuple[tuple[str, str], ...]
    where: str = ""
    """Where the rule was written (`sweep.yaml:12`), for error messages; not part of its identity."""

    def __post_init__(self) -> None:
        if not isinstance(self.match, str) or not self.match.strip():
            raise InputError(f"{self.label()}: 'match' is a glob over layer names or type:Class, "
                             f"got {self.match!r}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayerRule) and (self.match, self.formats) == (other.match, other.formats)

    def __hash__(self) -> int:
        return hash((self.match, self.formats))

    @classmethod
    def from_mapping(cls, data: Any, where: str = "") -> LayerRule:
        """A rule from `{match: ..., format/weights/...: spec}`; specs are checked for syntax only."""
        if isinstance(data, LayerRule):
            return data
        label = f"layer rule{' at ' + where if where else ''}"
        if not isinstance(data, Mapping):
            raise InputError(f"{label}: expected a mapping such as {{match: 'head', format: fp32}}, "
                             f"got {data!r}")
        unknown = [key for key in data if key != "match" and key not in RULE_FIELDS]
        if unknown:
            raise InputError(f"{label}: unknown key {unknown[0]!r} (expected match and any of "
                             f"{', '.join(RULE_FIELDS)})")
        if "match" not in data:
            raise InputError(f"{label}: missing key 'match'")
        formats = tuple((name, _spec(data[name], f"{label} {name}")) for name in RULE_FIELDS
                        if data.get(name) is not None)
        if not formats:
            raise InputError(f"{label}: gives no format (any of {', '.join(RULE_FIELDS)})")
        return cls(str(data["match"]).strip() if isinstance(data["match"], str) else data["match"],
                   formats, where)  # type: ignore[arg-type]  # a match that is no string: __post_init__ says so

    def to_dict(self) -> dict[str, str]:
        return {"match": self.match, **dict(self.formats)}

    def label(self) -> str:
        return f"layer rule {{match: {self.match!r}}}"

    def matches(self, layer: Layer) -> bool:
        if self.match.lower().startswith(TYPE_PREFIX):
            wanted = self.match[len(TYPE_PREFIX):].strip().lower()
            return any(name.lower() == wanted for name in layer.types)
        return any(fnmatch.fnmatchcase(name, self.match) for name in layer.names())

    def over(self, base: TensorFormats) -> TensorFormats:
        """This rule's formats resolved over the trial's."""
        return TensorFormats.resolve(dict(self.formats), base)


def layer_rules(value: Any, where: str = "") -> tuple[LayerRule, ...]:
    """Rules from a list of mappings (or LayerRules); `where` prefixes each rule's location."""
    if value is None:
        return ()
    if isinstance(value, Mapping) or isinstance(value, str) or not isinstance(value, Iterable):
        raise InputError(f"layers{' at ' + where if where else ''}: expected a list of rules such as "
                         f"[{{match: 'head', format: fp32}}], got {value!r}")
    return tuple(LayerRule.from_mapping(item, f"{where}[{index}]" if where else "")
                 for index, item in enumerate(value))


def read_layer_rules(text: str) -> tuple[LayerRule, ...]:
    """`dse train --layers`: rules as YAML/JSON text, or the path of a YAML/JSON file holding them."""
    from dse.yaml_lines import load_yaml

    path = Path(text)
    source = "--layers"
    if not text.lstrip().startswith(("[", "{", "-")) and path.suffix.lower() in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise InputError(f"--layers: no such file {text!r}")
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(f"--layers: cannot read {text!r}: {getattr(error, 'strerror', None) or error}"
                             ) from None
    data, _ = load_yaml(text, source)
    if isinstance(data, Mapping) and "layers" in data:
        data = data["layers"]
    return layer_rules(data, source)


def full_precision_rules(layers: Sequence[Layer], which: Iterable[str]) -> tuple[LayerRule, ...]:
    """`full_precision_layers: [first, last]` as rules: the first / last weight layer in fp32."""
    weighted = [layer for layer in layers if layer.has_weight]
    rules = []
    for name in which:
        if name not in FULL_PRECISION_LAYER_NAMES:
            raise InputError(f"unknown full_precision_layers entry {name!r}: expected any of "
                             f"{', '.join(FULL_PRECISION_LAYER_NAMES)}")
        if weighted:
            target = weighted[0] if name == "first" else weighted[-1]
            rules.append(LayerRule(_escape(target.name), ((SHORTHAND, FP32),),
                                   f"full_precision_layers {name}"))
    return tuple(rules)


def _escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def resolve_layers(layers: Sequence[Layer], rules: Sequence[LayerRule], base: TensorFormats,
                   full_precision: Iterable[str] = (), require_match: bool = True
                   ) -> dict[str, TensorFormats]:
    """Each layer's formats: the first matching rule over `base`, else `base`.

    `full_precision` (first/last) comes before the rules. With `require_match` a rule that matches
    no layer is an error naming it (a typo would otherwise train every layer in the trial's formats).
    """
    ordered = (*full_precision_rules(layers, full_precision), *rules)
    used: set[int] = set()
    out: dict[str, TensorFormats] = {}
    for layer in layers:
        rule_index = next((i for i, rule in enumerate(ordered) if rule.matches(layer)), None)
        if rule_index is None:
            out[layer.name] = base
            continue
        used.add(rule_index)
        out[layer.name] = ordered[rule_index].over(base)
    if require_match:
        for index, rule in enumerate(ordered):
            if index not in used and not any(rule.matches(layer) for layer in layers):
                names = ", ".join(layer.name for layer in layers[:8]) + (", ..." if len(layers) > 8 else "")
                where = f"{rule.where}: " if rule.where else ""
                raise InputError(f"{where}{rule.label()} matches no GEMM layer (layers: {names or 'none'})")
    return out


