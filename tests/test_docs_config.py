"""The key tables of docs/config.md and docs/training.md say what the code does: every key a sweep file
(or `dse train`) takes has a row, every row names a key the code takes, every default written as one
literal is the code's default, and every `dse train` option a row names exists. Tables are read from
the Markdown, so a field added to TrainConfig or a section of the sweep file without its row, or a
default changed on one side only, fails here."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"`([a-z][a-z_-]*)`")


def sections(path: Path) -> dict[str, str]:
    """The text under each `## ` heading of a Markdown file, by the heading's text."""
    parts = re.split(r"^## (.*)$", path.read_text(), flags=re.MULTILINE)
    return {heading.strip(): body for heading, body in zip(parts[1::2], parts[2::2], strict=True)}


def rows(text: str) -> list[list[str]]:
    """The body rows of the first Markdown table in `text`, as lists of cells."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])] for line in lines[2:]]


def table(section: str, path: Path = ROOT / "docs" / "config.md") -> dict[str, list[str]]:
    """A key table by its first cell's backticked name(s): key -> the row's other cells."""
    out: dict[str, list[str]] = {}
    for cells in rows(sections(path)[section]):
        for name in NAME.findall(cells[0]):
            out[name] = cells[1:]
    return out


def literal(cell: str, names: set[str]) -> tuple[bool, Any]:
    """(True, value) where a default cell is one literal: a backticked YAML value that names no other
    key, or the bare word none. Prose ("the optimizer's default", "see below") is (False, None)."""
    if cell == "none":
        return True, None
    match = re.fullmatch(r"`([^`<>]+)`", cell)
    if not match or match.group(1) in names:
        return False, None
    return True, yaml.safe_load(match.group(1))


def plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def check_defaults(documented: dict[str, list[str]], code_default: Any, column: int) -> list[str]:
    wrong = []
    for name, cells in documented.items():
        known, value = literal(cells[column], set(documented))
        if known and plain(code_default(name)) != value:
            wrong.append(f"{name}: docs {value!r}, code {code_default(name)!r}")
    return wrong


def test_every_trial_field_has_a_row_with_the_code_default() -> None:
    from dse.sweep.config import TRIAL_FIELDS, TUNE_KEY
    from dse.train.config import TrainConfig

    documented = table("`trials`: trial entries and grids")
    assert set(documented) == {*TRIAL_FIELDS, "seeds", TUNE_KEY}
    defaults = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
    assert check_defaults({k: v for k, v in documented.items() if k in defaults}, defaults.get, 1) == []


def test_every_task_key_has_a_row() -> None:
    from dse.sweep.config import IDENTITY_FIELDS
    from dse.train.config import TrainConfig

    documented = table("`task` / `tasks`")
    assert set(documented) == {"name", *IDENTITY_FIELDS}
    defaults = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
    assert check_defaults({k: v for k, v in documented.items() if k in defaults}, defaults.get, 1) == []


def _section_defaults(model: Any, resolved: Any = None) -> Any:
    """A sweep-file section's default for a key: the pydantic model's, or where that is None (filled in
    later) the resolved dataclass's."""
    def default(name: str) -> Any:
        field = model.model_fields[name]
        value = field.get_default(call_default_factory=True)
        later = {f.name: f.default for f in dataclasses.fields(resolved)} if resolved is not None else {}
        if value is None and later.get(name, dataclasses.MISSING) is not dataclasses.MISSING:
            value = later[name]
        return value.model_dump() if hasattr(value, "model_dump") else value
    return default


@pytest.mark.parametrize(("heading", "model_name", "resolved_name"), [
    ("Top-level keys", "_SweepFile", None),
    ("`energy`", "_EnergySection", "DatapathParams"),
    ("`executor`", "_ExecutorSection", "ExecutorConfig"),
    ("`report`", "_ReportSection", None),
])
def test_every_section_key_has_a_row_with_the_code_default(heading: str, model_name: str,
                                                           resolved_name: str | None) -> None:
    from dse.energy import DatapathParams
    from dse.sweep import config

    model = getattr(config, model_name)
    resolved = {"DatapathParams": DatapathParams,
                "ExecutorConfig": config.ExecutorConfig}.get(resolved_name or "")
    documented = table(heading)
    assert set(documented) == set(model.model_fields)
    assert check_defaults(documented, _section_defaults(model, resolved), 1) == []
    for name, cells in documented.items():
        assert (cells[1] == "required") == model.model_fields[name].is_required(), name


@pytest.mark.parametrize(("key", "params_name"), [("datapath", "DatapathParams"), ("memory", "MemoryParams")])
def test_the_energy_sub_sections_name_every_setting(key: str, params_name: str) -> None:
    import dse.energy

    meaning = table("`energy`")[key][2]
    fields = {field.name for field in dataclasses.fields(getattr(dse.energy, params_name))}
    assert set(NAME.findall(meaning)) >= fields


def test_the_train_table_has_every_field_its_cli_option_and_the_code_default() -> None:
    import typer

    from dse.cli import app
    from dse.train.config import TrainConfig

    documented = table("A run", ROOT / "docs" / "training.md")
    defaults = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
    assert set(documented) == set(defaults)
    command = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    options = {option for param in command.params for option in param.opts}
    named = {option for cells in documented.values() for option in re.findall(r"--[a-z-]+", cells[0])}
    assert named <= options
    wrong = []
    for cells in rows(sections(ROOT / "docs" / "training.md")["A run"]):  # "a, b" rows: "1, 2" defaults
        fields, values = NAME.findall(cells[0]), cells[2].split(", ")
        for name, value in zip(fields, values if len(values) == len(fields) else [cells[2]] * len(fields),
                               strict=True):
            known, expected = literal(value if value.startswith("`") else f"`{value}`", set(defaults))
            if known and re.fullmatch(r"[\d.e-]+|`[^`]+`", value) and plain(defaults[name]) != expected:
                wrong.append(f"{name}: docs {expected!r}, code {defaults[name]!r}")
    assert wrong == []


SHIPPED_SWEEPS = [*sorted((ROOT / "docs" / "evidence").glob("*.yaml")),
                  ROOT / "examples" / "own_model" / "own_model.yaml"]


@pytest.mark.parametrize("path", SHIPPED_SWEEPS, ids=lambda path: path.name)
def test_every_sweep_file_the_docs_quote_validates(path: Path) -> None:
    """docs/training.md's evidence files and docs/own-network.md's example (examples/*.yaml are planned in
    tests/sweep/test_sweep_config.py): each parses and expands into trials as `dse sweep` would."""
    from dse.sweep.config import parse_config
    from dse.sweep.trials import expand

    sweep = parse_config(path.read_text(), str(path))
    assert expand(sweep)


def sweep_blocks() -> list[tuple[str, str]]:
    """Every ```yaml block of README.md and docs/*.md that is a whole sweep file (it has `trials:`)."""
    blocks = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        found = re.findall(r"^```yaml\n(.*?)^```", path.read_text(), flags=re.DOTALL | re.MULTILINE)
        blocks += [(f"{path.name}-{index}", block) for index, block in enumerate(found)
                   if re.search(r"^trials:", block, flags=re.MULTILINE)]
    return blocks


@pytest.mark.parametrize(("name", "text"), sweep_blocks(), ids=[name for name, _ in sweep_blocks()])
def test_every_sweep_file_written_in_the_docs_validates(name: str, text: str) -> None:
    from dse.sweep.config import parse_config
    from dse.sweep.trials import expand

    assert expand(parse_config(text, f"{name}.yaml"))


def test_the_config_example_has_the_trial_count_the_page_gives() -> None:
    from dse.sweep.config import parse_config
    from dse.sweep.trials import expand

    page = (ROOT / "docs" / "config.md").read_text()
    text = dict(sweep_blocks())["config.md-0"]
    count = re.search(r"= (\d+) configurations, each trained with (\d+) seeds: (\d+) trials", page)
    assert count is not None
    trials = expand(parse_config(text, "config.yaml"))
    assert len({trial.label for trial in trials}) == int(count.group(1))
    assert len(trials) == int(count.group(3))


COMMAND = re.compile(r"\bdse (formats show|formats|sweep|report|export|train|energy|compare)\b"
                     r"([^`\n#]*(?:\\\n[^`\n#]*)*)")


def test_every_option_the_docs_give_a_dse_command_exists() -> None:
    """`dse energy --workload ... --scope pe` and the like, in code blocks and inline, in README.md and
    docs/*.md: every --option written after a command is one of that command's options."""
    import typer

    from dse.cli import app

    group = typer.main.get_command(app)
    unknown = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for match in COMMAND.finditer(path.read_text()):
            command = group
            for word in match.group(1).split():
                command = command.commands[word]  # type: ignore[attr-defined]
            options = {option for param in command.params
                       for option in [*param.opts, *getattr(param, "secondary_opts", [])]}
            unknown += [f"{path.name}: dse {match.group(1)} {option}"
                        for option in re.findall(r"(?<![\w-])--[a-z][a-z-]*", match.group(2))
                        if option not in options]
    assert unknown == []


def test_the_optimizer_table_gives_each_optimizers_default_lr() -> None:
    from fractions import Fraction

    from dse.train.optim import DEFAULT_LR

    documented = table("Optimizers", ROOT / "docs" / "training.md")
    assert set(documented) == set(DEFAULT_LR)
    assert {name: float(Fraction(cells[1])) for name, cells in documented.items()} == DEFAULT_LR


def test_the_group_size_row_names_the_fields_a_groups_members_may_differ_in() -> None:
    from dse.train.grouped import MEMBER_FIELDS

    meaning = table("`executor`")["group_size"][2]
    differing = re.search(r"differing only in ([^)]*)\)", meaning)
    assert differing is not None
    assert {"seed", *NAME.findall(differing.group(1))} == set(MEMBER_FIELDS)


def test_the_default_group_sizes_written_are_the_codes() -> None:
    """docs/config.md names the default group size and every built-in model and device type whose
    default is 1; a default changed on one side only fails here."""
    from dse.models.proxies import MODELS
    from dse.sweep.groups import GROUP_SIZE, UNPAID_GROUPING

    text = " ".join(sections(ROOT / "docs" / "config.md")["`executor`"].split())
    written = re.search(r"default on its `device`: `(\d+)`, except `1` \(one by one\) for: ([^.]*)\.", text)
    assert written is not None and int(written.group(1)) == GROUP_SIZE
    pairs = set(re.findall(r"`([a-z]+)` on `([a-z]+)`", written.group(2)))
    assert pairs == set(UNPAID_GROUPING) and {model for model, _ in pairs} <= set(MODELS)
