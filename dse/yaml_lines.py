"""YAML with line numbers: the loaded data plus the line of every key and list item, so that an error
in a sweep file or an energy table can name `file:line` and the path (`trials[1].format`) of the
offending value."""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from dse.errors import InputError, number_problem

Path_ = tuple[str | int, ...]


ALIAS_EXPANSION_LIMIT = 100_000
"""How many values aliases may repeat in one document (or ALIAS_REPEATS_PER_VALUE times its own values,
where that is more). An alias repeats its anchor's values, so aliases of aliases multiply (ten lists of
ten aliases each: 10^10 values from a few lines, the "billion laughs"), and a walk of the document (its
line map, its validation) would never end."""

ALIAS_REPEATS_PER_VALUE = 100
"""How many values aliases may repeat per value written in the document, past ALIAS_EXPANSION_LIMIT:
one alias per trial to a block of defaults (`<<: *defaults`) repeats in proportion to the file, so a
long sweep file stays readable (17000 trials merging 5 defaults each were refused under a flat bound),
while aliases of aliases still stop after a few thousand values' worth of file."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`, which trips people up), and
    keeps the line of every alias (the composer puts the anchored node itself in its place)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.alias_lines: dict[tuple[int, int], int] = {}
        """(id of the parent node, index of the item or id of the key node) -> line of the alias there."""
        self.values_written = 0
        """How many nodes (keys, scalars, lists, mappings; not aliases) the document writes out."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            where = index if isinstance(index, int) else id(index)
            self.alias_lines[(id(parent), where)] = self.peek_event().start_mark.line + 1
        else:
            self.values_written += 1
        return super().compose_node(parent, index)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def file_text(data: bytes) -> str:
    """A file's bytes as the text Path.read_text(encoding="utf-8") reads: UTF-8 (UnicodeDecodeError
    where it is not), universal newlines (a CRLF file is its LF text)."""
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8").read()


def dotted(path: Sequence[str | int]) -> str:
    """('trials', 1, 'format') -> 'trials[1].format'."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def data_path(data: Any, loc: tuple[Any, ...]) -> tuple[str | int, ...]:
    """Keep the parts of a pydantic error location that exist in the data (drops union-member tags)."""
    path: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            path.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path.append(part)
            node = node[part]
        elif not isinstance(node, (dict, list)):
            break
        elif isinstance(node, dict) and isinstance(part, str) and not part.startswith(("list[", "dict[")):
            path.append(part)  # an unknown or missing key: point at it (or its parent's line)
            break
    return tuple(path)


@dataclass(frozen=True)
class SourceMap:
    """Where each key and item of a loaded YAML document sits in its file (1-based lines)."""

    file: str
    lines: dict[Path_, int] = field(default_factory=dict)

    def line(self, path: Sequence[str | int]) -> int:
        """The line of `path`, or of its nearest ancestor that has one."""
        key = tuple(path)
        while key and key not in self.lines:
            key = key[:-1]
        return self.lines.get(key, 1)

    def error(self, path: Sequence[str | int], message: str) -> InputError:
        """One line: `file:line: path: message`."""
        return InputError(f"{self.file}:{self.line(path)}: {dotted(path)}: {message}")


@dataclass
class _Walk:
    """One walk of a document: its source, its aliases' lines, how many repeats its aliases may make, the
    nodes walked and the repeats made."""

    source: str
    alias_lines: dict[tuple[int, int], int]
    repeats_allowed: int
    walked: set[int] = field(default_factory=set)
    repeats: int = 0


def _walk(node: yaml.Node, path: Path_, lines: dict[Path_, int], walk: _Walk,
          within: frozenset[int] = frozenset(), alias: Path_ | None = None) -> None:
    """Record the line of every key and item below `node`; `within`: the ids of the nodes it is inside,
    so an alias to one of them (a document that contains itself) is an error, not endless recursion;
    `alias`: the path of the outermost alias `node` is inside, where a walk that repeats more than
    `walk.repeats_allowed` values stops with an error."""
    if id(node) in within:
        raise InputError(f"{walk.source}:{lines.get(path, node.start_mark.line + 1)}: {dotted(path)}: an "
                         "alias inside its own anchor would repeat it forever")
    if id(node) in walk.walked:
        walk.repeats += 1
        if walk.repeats > walk.repeats_allowed:
            where = alias if alias is not None else path
            raise InputError(f"{walk.source}:{lines.get(where, node.start_mark.line + 1)}: {dotted(where)}: "
                             f"aliases repeat more than {walk.repeats_allowed} values (aliases of aliases "
                             "multiply); write the values out or use fewer levels of aliases")
    walk.walked.add(id(node))
    within = within | {id(node)}
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                raise InputError(f"{walk.source}:{line}: {dotted((*path, key))}: duplicate key (first on "
                                 f"line {seen[key]})")
            seen[key] = line
            child = path + (key,)  # (not (*path, key): mypy reads it as 3.11 syntax)
            lines[child] = line
            is_alias = (id(node), id(key_node)) in walk.alias_lines
            aliased = child if alias is None and is_alias else alias
            _walk(value_node, child, lines, walk, within, aliased)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = path + (index,)
            lines[child] = walk.alias_lines.get((id(node), index), item.start_mark.line + 1)
            aliased = child if alias is None and (id(node), index) in walk.alias_lines else alias
            _walk(item, child, lines, walk, within, aliased)


def load_yaml(text: str, source: str) -> tuple[Any, SourceMap]:
    """Parse one YAML document; a syntax error becomes one InputError line with its position."""
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None, SourceMap(source)
            lines: dict[Path_, int] = {(): node.start_mark.line + 1}
            allowed = max(ALIAS_EXPANSION_LIMIT, ALIAS_REPEATS_PER_VALUE * loader.values_written)
            _walk(node, (), lines, _Walk(source, loader.alias_lines, allowed))
            data = loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = error.problem or error.context or "invalid YAML"
        context = error.context_mark
        if error.context and context is not None and context.line + 1 != line:
            problem += f" ({error.context} that starts on line {context.line + 1})"
        raise InputError(f"{source}:{line}: invalid YAML: {problem}") from None
    except yaml.YAMLError as error:
        raise InputError(f"{source}: invalid YAML: {str(error).splitlines()[0]}") from None
    source_map = SourceMap(source, lines)
    _check_numbers(data, (), source_map)
    return data, source_map


def _check_numbers(node: Any, path: Path_, source: SourceMap) -> None:
    """Every number in the document is one a setting may hold (`number_problem`), else an error at it."""
    if isinstance(node, dict):
        for key, value in node.items():
            _check_numbers(value, (*path, key), source)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _check_numbers(value, (*path, index), source)
    else:
        problem = number_problem(node)
        if problem is not None:
            raise source.error(path, problem)
