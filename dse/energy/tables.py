"""Energy tables: YAML files of published numbers, each entry with its provenance, validated on load.

One file per source (Accelergy-style: primitive components plus tables that say where every number
came from). A file is a `source` block and a list of `entries`; the entry's `op` says what it is:

* `int_add`, `int_mul`, `register`, `comparator`, `shifter`, `bitwise` (`bits`), `fp_add`, `fp_mul`
  (`exp_bits`, `man_bits`): energy of one operation, `energy_pj`;
* `sram_read`, `sram_write`, `dram_access`: memory, `energy_pj` per `access_bits` or
  `energy_pj_per_bit`; a `preset` name makes it selectable;
* `tech_node` (Stillmaker polynomial) and `tech_node_derived` (interpolated or extrapolated node);
* `constant`: a named model constant.

Every entry carries `where` (table, figure, file) and `verified` (file, page, memory, derived, user).
A bad file raises `InputError` naming the file and line of the offending entry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dse.errors import InputError
from dse.yaml_lines import data_path, load_yaml

TABLES_ENV = "DSE_ENERGY_TABLES"

Verified = Literal["file", "page", "memory", "derived", "user"]
PositiveFloat = Annotated[float, Field(gt=0, strict=True, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, strict=True, allow_inf_nan=False)]
AnyFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Bits = Annotated[int, Field(ge=1, le=65536, strict=True)]
Bytes = Annotated[int, Field(ge=1, strict=True)]
ExpBits = Annotated[int, Field(ge=1, le=32, strict=True)]
ManBits = Annotated[int, Field(ge=0, le=256, strict=True)]
Text = Annotated[str, Field(min_length=1, strict=True)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Strict):
    key: Text
    cite: Text
    doi: str | None = None
    node_nm: PositiveFloat | None = None
    vdd_v: PositiveFloat | None = None
    calibration: bool = False
    """The table's primitive-unit entries calibrate the model at node_nm (a user table with all four
    calibration op classes is one too)."""
    note: str | None = None


class _Entry(_Strict):
    where: Text
    verified: Verified


class IntOpEntry(_Entry):
    """An integer-width primitive: adder, multiplier (bits x bits), register, comparator, shifter."""

    op: Literal["int_add", "int_mul", "register", "comparator", "shifter", "bitwise"]
    bits: Bits
    energy_pj: PositiveFloat
    area_um2: NonNegativeFloat | None = None
    latency_ns: PositiveFloat | None = None


class FpOpEntry(_Entry):
    """A floating-point adder or multiplier with exp_bits exponent and man_bits stored mantissa bits."""

    op: Literal["fp_add", "fp_mul"]
    exp_bits: ExpBits
    man_bits: ManBits
    energy_pj: PositiveFloat
    area_um2: NonNegativeFloat | None = None
    latency_ns: PositiveFloat | None = None


class MemoryEntry(_Entry):
    """An access to SRAM or DRAM: energy per access of access_bits, or directly per bit."""

    op: Literal["sram_read", "sram_write", "dram_access"]
    preset: Text | None = None
    capacity_bytes: Bytes | None = None
    access_bits: Bits | None = None
    energy_pj: PositiveFloat | None = None
    energy_pj_max: PositiveFloat | None = None
    energy_pj_per_bit: PositiveFloat | None = None
    node_nm: PositiveFloat | None = None

    @model_validator(mode="after")
    def _one_energy(self) -> MemoryEntry:
        per_access = self.energy_pj is not None and self.access_bits is not None
        if per_access == (self.energy_pj_per_bit is not None):
            raise ValueError("give either energy_pj with access_bits, or energy_pj_per_bit")
        if self.energy_pj is not None and self.access_bits is None:
            raise ValueError("energy_pj needs access_bits")
        low, high = self.energy_pj, self.energy_pj_max
        if low is not None and high is not None and high < low:
            raise ValueError("energy_pj_max is below energy_pj")
        return self

    @property
    def pj_per_bit(self) -> float:
        if self.energy_pj_per_bit is not None:
            return self.energy_pj_per_bit
        assert self.energy_pj is not None and self.access_bits is not None
        return self.energy_pj / self.access_bits


class TechNodeEntry(_Entry):
    """Stillmaker & Baas energy fit F(V) = a2 V^2 + a1 V + a0 at a chosen supply voltage."""

    op: Literal["tech_node"]
    node_nm: PositiveFloat
    variant: Text
    vdd_v: PositiveFloat
    a2: AnyFloat
    a1: AnyFloat
    a0: AnyFloat
    area_vs_45nm: PositiveFloat | None = None
    """Stillmaker & Baas area factor from 45 nm to this node (None: not published for this node)."""

    @model_validator(mode="after")
    def _positive_factor(self) -> TechNodeEntry:
        if self.factor <= 0:
            raise ValueError(f"F(vdd_v={self.vdd_v}) = {self.factor:.4g} is not positive")
        return self

    @property
    def factor(self) -> float:
        return self.a2 * self.vdd_v**2 + self.a1 * self.vdd_v + self.a0


class DerivedNodeEntry(_Entry):
    """A node without its own fit: log-log interpolation between two nodes, or power-law extrapolation."""

    op: Literal["tech_node_derived"]
    node_nm: PositiveFloat
    rule: Literal["interpolate", "extrapolate"]
    from_nodes_nm: list[PositiveFloat] = Field(min_length=1, max_length=2)
    exponent: AnyFloat = 0.5

    @model_validator(mode="after")
    def _arity(self) -> DerivedNodeEntry:
        need = 2 if self.rule == "interpolate" else 1
        if len(self.from_nodes_nm) != need:
            raise ValueError(f"rule {self.rule!r} needs {need} from_nodes_nm")
        return self


class ConstantEntry(_Entry):
    op: Literal["constant"]
    name: Text
    value: NonNegativeFloat
    unit: Text


Entry = Annotated[
    IntOpEntry | FpOpEntry | MemoryEntry | TechNodeEntry | DerivedNodeEntry | ConstantEntry,
    Field(discriminator="op"),
]


class TableFile(_Strict):
    source: Source
    entries: list[Entry] = Field(min_length=1)


@dataclass(frozen=True)
class EnergyTable:
    """A validated table file; `lines[i]` is the 1-based line of entry i, for later error messages."""

    path: Path
    source: Source
    entries: tuple[Any, ...]
    lines: tuple[int, ...]

    def where(self, index: int) -> str:
        return f"{self.path}:{self.lines[index]}"

    def of(self, *ops: str) -> list[tuple[int, Any]]:
        return [(i, e) for i, e in enumerate(self.entries) if e.op in ops]


def _without_union_tags(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """A pydantic error location without the union tag (the entry's op) it inserts after a list index."""
    return tuple(part for index, part in enumerate(loc)
                 if not (index and isinstance(loc[index - 1], int) and part in _OPS))


_OPS = {"int_add", "int_mul", "register", "comparator", "shifter", "bitwise", "fp_add", "fp_mul", "sram_read",
        "sram_write", "dram_access", "tech_node", "tech_node_derived", "constant"}


def load_table(path: str | Path) -> EnergyTable:
    """Read and validate one table file; any problem becomes one InputError line naming file:line."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{file}: energy table not found") from None
    except (OSError, UnicodeDecodeError) as error:  # a folder, no permission, a symlink loop, ...
        raise InputError(f"{file}: cannot read energy table ({type(error).__name__})") from None
    data, source = load_yaml(text, str(file))
    if data is None:
        raise InputError(f"{file}:1: empty energy table (expected 'source' and 'entries')")
    if not isinstance(data, dict):
        raise InputError(f"{file}:1: an energy table is a mapping with 'source' and 'entries'")
    try:
        parsed = TableFile.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = data_path(data, _without_union_tags(tuple(first["loc"])))
        raise source.error(where, first["msg"].removeprefix("Value error, ")) from None
    entry_lines = tuple(source.line(("entries", i)) for i in range(len(parsed.entries)))
    table = EnergyTable(file, parsed.source, tuple(parsed.entries), entry_lines)
    _check_duplicates(table)
    return table


def _identity(entry: Any) -> tuple[Any, ...]:
    fields = entry.model_dump(exclude={"where", "verified", "energy_pj", "energy_pj_max", "energy_pj_per_bit",
                                       "area_um2", "value", "unit", "a2", "a1", "a0", "vdd_v", "variant",
                                       "area_vs_45nm",
                                       "rule", "from_nodes_nm", "exponent"})
    return tuple(sorted(fields.items(), key=lambda kv: kv[0]))


def _check_duplicates(table: EnergyTable) -> None:
    seen: dict[tuple[Any, ...], int] = {}
    for index, entry in enumerate(table.entries):
        key = _identity(entry)
        if key in seen:
            raise InputError(f"{table.where(index)}: duplicate {entry.op} entry "
                             f"(same as line {table.lines[seen[key]]})")
        seen[key] = index


# --- the table directory ---------------------------------------------------------------------------

def tables_dir() -> Path:
    """$DSE_ENERGY_TABLES, else energy_tables/ at the repository top (a source checkout or an editable
    install), else the copy shipped inside the installed package (`dse/energy_tables`, a wheel)."""
    override = os.environ.get(TABLES_ENV)
    if override:
        return Path(override)
    checkout = Path(__file__).resolve().parents[2] / "energy_tables"
    if checkout.is_dir():
        return checkout
    return Path(__file__).resolve().parents[1] / "energy_tables"


def load_tables(directory: str | Path | None = None) -> dict[str, EnergyTable]:
    """Every *.yaml in the directory, keyed by source key (which must be unique)."""
    folder = Path(directory) if directory is not None else tables_dir()
    if not folder.is_dir():
        raise InputError(f"{folder}: energy table directory not found (set {TABLES_ENV})")
    out: dict[str, EnergyTable] = {}
    for file in sorted(folder.glob("*.yaml")):
        table = load_table(file)
        if table.source.key in out:
            other = out[table.source.key].path
            raise InputError(f"{file}:1: source key {table.source.key!r} also used by {other}")
        out[table.source.key] = table
    if not out:
        raise InputError(f"{folder}: no energy tables (*.yaml) found")
    return out
