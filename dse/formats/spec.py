"""Spec strings -> format objects.

Grammar (whitespace is ignored, names are case-insensitive):

    spec    := name | name "(" args ")"
    args    := arg ("," arg)*
    arg     := value | key "=" value          (positional arguments come first)
    value   := integer | number | word | spec  (a nested spec: block(fp(e=2,m=1),size=16))

`name` is a family (`fp`, `int`, `fixed`, `posit`, `lns`, `p3109`, `block`, `mx`) or an alias that
expands to one (`fp8_e4m3`, `bf16`, `int8`, `posit16`, `lns8`, `mxfp4`, `nvfp4`, ...). An alias
accepts the same keyword options as its family, which override the alias's own: `fp8_e4m3(overflow=nan)`,
`int8(scale=channel,axis=0)`. Each family documents its arguments in `docs/formats.md` and in its
factory's docstring.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from dse.errors import InputError
from dse.formats.base import SCALE_KINDS, NumberFormat, Scaling

Value = int | float | str
Factory = Callable[..., NumberFormat]

_FAMILIES: dict[str, Factory] = {}
_ALIASES: dict[str, str] = {}
_PATTERN_ALIASES: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = []

_CALL = re.compile(r"^([a-z][a-z0-9_]*)(?:\((.*)\))?$")


def register_family(name: str, factory: Factory) -> None:
    _FAMILIES[name] = factory


def register_alias(name: str, expansion: str) -> None:
    _ALIASES[name] = expansion


def register_pattern_alias(pattern: str, expand: Callable[[re.Match[str]], str]) -> None:
    """An alias family such as int<N> -> int(N); `expand` turns the match into a call-form spec."""
    _PATTERN_ALIASES.append((re.compile(f"^{pattern}$"), expand))


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple[Value, ...]
    kwargs: dict[str, Value]


def _parse_value(text: str) -> Value:
    for cast in (int, float):
        try:
            value = cast(text)
        except ValueError:
            continue
        if value == value and abs(value) != float("inf"):  # "nan" and "inf" are words (overflow=nan)
            return value
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", text):
        if "(" in text and _CALL.match(text):  # a nested spec, read by the factory that takes it
            return text
        raise ValueError(f"cannot read argument value {text!r}")
    return text


def _split_arguments(body: str) -> list[str]:
    """body split at the commas outside parentheses."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(body):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise ValueError("unbalanced parentheses")
        elif char == "," and depth == 0:
            parts.append(body[start:index])
            start = index + 1
    if depth:
        raise ValueError("unbalanced parentheses")
    parts.append(body[start:])
    return parts


def parse_call(text: str) -> Call:
    compact = re.sub(r"\s+", "", text).lower()
    match = _CALL.match(compact)
    if not match:
        raise ValueError("expected NAME or NAME(ARGS)")
    name, body = match.group(1), match.group(2)
    args: list[Value] = []
    kwargs: dict[str, Value] = {}
    if body:
        for part in _split_arguments(body):
            key, sep, raw = part.partition("=")
            if "(" in key:  # a nested spec's own options, not a key=value of this call
                key, sep, raw = part, "", ""
            if sep:
                if not re.fullmatch(r"[a-z_][a-z0-9_]*", key):
                    raise ValueError(f"bad option name {key!r}")
                if key in kwargs:
                    raise ValueError(f"option {key!r} given twice")
                kwargs[key] = _parse_value(raw)
            elif kwargs:
                raise ValueError("positional arguments must come before key=value options")
            elif part == "":
                raise ValueError("empty argument")
            else:
                args.append(_parse_value(part))
    return Call(name, tuple(args), kwargs)


def _expand(call: Call) -> Call:
    """Resolve aliases (possibly nested) until the name is a family."""
    for _ in range(8):
        if call.name in _FAMILIES:
            return call
        expansion = _ALIASES.get(call.name)
        if expansion is None:
            for pattern, expand in _PATTERN_ALIASES:
                match = pattern.match(call.name)
                if match:
                    expansion = expand(match)
                    break
        if expansion is None:
            known = ", ".join(sorted(_FAMILIES))
            raise ValueError(f"unknown format {call.name!r} (families: {known}; see `dse formats`)")
        if call.args:
            raise ValueError(f"alias {call.name!r} takes only key=value options")
        inner = parse_call(expansion)
        call = Call(inner.name, inner.args, {**inner.kwargs, **call.kwargs})
    raise ValueError("alias expansion does not terminate")


def get(spec: str | NumberFormat) -> NumberFormat:
    """Parse a spec string into a format object. Raises InputError naming the spec and the problem."""
    if isinstance(spec, NumberFormat):
        return spec
    if not isinstance(spec, str):
        raise InputError(f"format spec must be a string, got {type(spec).__name__}")
    try:
        _ensure_families_loaded()
        call = _expand(parse_call(spec))
        return _FAMILIES[call.name](*call.args, **call.kwargs)
    except InputError:
        raise
    except (ValueError, TypeError) as error:
        raise InputError(f"invalid format spec {spec!r}: {_describe(error)}") from None


def _describe(error: Exception) -> str:
    text = str(error)
    # A factory called with a wrong keyword says so in TypeError's own words; make them user words.
    match = re.search(r"unexpected keyword argument '(\w+)'", text)
    if match:
        return f"unknown option {match.group(1)!r}"
    match = re.search(r"got multiple values for argument '(\w+)'", text)
    if match:
        return f"option {match.group(1)!r} given twice (as a positional argument and as {match.group(1)}=)"
    match = re.search(r"takes from (\d+) to (\d+) positional arguments but (\d+) were given", text)
    if match:
        return f"too many positional arguments ({match.group(3)}, at most {int(match.group(2))})"
    return text


# --- helpers the family factories share -------------------------------------------------------------

def int_arg(name: str, value: Value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value}")
    return value


def bool_arg(name: str, value: Value) -> bool:
    table = {1: True, 0: False, "true": True, "false": False, "on": True, "off": False,
             "yes": True, "no": False}
    if value not in table:
        raise ValueError(f"{name} must be 0/1, true/false or on/off, got {value!r}")
    return table[value]


def choice_arg(name: str, value: Value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def scaling_arg(default: Scaling, scale: Value | None, pow2: Value | None, axis: Value | None,
                block: Value | None = None, kinds: tuple[str, ...] = SCALE_KINDS) -> Scaling:
    """Build a Scaling from the shared options scale=, pow2=, axis=, block=.

    axis= and block= are kept only where the kind uses them, so equal formats compare equal.
    """
    kind = default.kind if scale is None else choice_arg("scale", scale, kinds)
    return Scaling(
        kind=kind,  # type: ignore[arg-type]  # checked against SCALE_KINDS above
        pow2=default.pow2 if pow2 is None else bool_arg("pow2", pow2),
        axis=default.axis if axis is None or kind not in ("channel", "block")
        else int_arg("axis", axis, -8, 7),
        block_size=default.block_size if block is None or kind != "block"
        else int_arg("block", block, 1, 4096),
    )


def call_spec(name: str, positional: list[str], options: list[str]) -> str:
    return f"{name}({','.join(positional + options)})"


_loaded = False


def _ensure_families_loaded() -> None:
    """Families register themselves on import; import them once, lazily, to avoid import cycles."""
    global _loaded
    if not _loaded:
        import dse.formats  # noqa: F401  (the package imports every family module)

        _loaded = True
