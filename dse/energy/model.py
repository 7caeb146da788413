"""The energy model at one technology node: calibrated components, memory energies and parameters.

`build_model` loads the tables (energy_tables/ or $DSE_ENERGY_TABLES, plus an optional user table),
calibrates the primitive units at the calibration table's node, scales them to the requested node and
resolves the memory presets. Everything downstream is arithmetic on this object.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from dse.energy.components import CALIBRATION_OPS, Components, Weights, calibrate, model_energy
from dse.energy.datapaths import DatapathParams
from dse.energy.memory import SRAM_SCALINGS, MemoryPreset, memory_presets, preset, sram_pj_per_bit
from dse.energy.tables import EnergyTable, load_table, load_tables
from dse.energy.technology import Technology, parse_node, technology_from
from dse.errors import InputError, SettingError, about

CALIBRATION_SOURCE = "horowitz2014"
"""The primary calibration table: the 45 nm fit, the area fit, and the only one the 'stillmaker' rule uses."""
NODE_SCALINGS: tuple[str, ...] = ("calibrated", "stillmaker")
SCOPES: tuple[str, ...] = ("datapath", "pe", "system")
"""datapath: the GEMMs' MAC units only; pe: plus the optimizer's arithmetic, operand registers and the
on-chip buffer; system: plus DRAM (the default)."""


@dataclass(frozen=True)
class MemoryParams:
    """Memory choices; defaults are documented in docs/energy-model.md."""

    sram: str = "horowitz_32kb"
    """On-chip buffer preset that GEMM operands are read from."""
    dram: str = "hbm2e"
    """Off-chip memory preset; every tensor is read from / written to it once per use."""
    sram_scaling: str = "calibrated"
    """How SRAM energy follows the node: 'calibrated' (between published SRAM reads of the same capacity
    at the calibration nodes), 'sqrt' of the logic factor, 'logic' or 'none'."""
    operand_reuse: float = 16.0
    """MACs served by one operand read from the buffer (PE-array broadcast / register reuse)."""
    operand_registers: bool = True
    """Charge one register write per operand bit per MAC (operands latched in every PE)."""

    def __post_init__(self) -> None:
        if self.sram_scaling not in SRAM_SCALINGS:
            known = ", ".join(SRAM_SCALINGS)
            raise SettingError("sram_scaling", f"unknown sram scaling {self.sram_scaling!r} (known: {known})")
        if not (self.operand_reuse >= 1 and math.isfinite(self.operand_reuse)):
            raise SettingError("operand_reuse",
                               f"operand_reuse must be a finite number >= 1, got {self.operand_reuse}")


@dataclass(frozen=True)
class EnergyModel:
    node_nm: float
    logic_scale: float
    """FP32 multiply at this node over FP32 multiply at 45 nm (for display: the rule may bend per unit)."""
    components: Components
    reference: Components
    sram: MemoryPreset
    dram: MemoryPreset
    sram_pj_per_bit: float
    dram_pj_per_bit: float
    datapath: DatapathParams = field(default_factory=DatapathParams)
    memory: MemoryParams = field(default_factory=MemoryParams)
    calibration: EnergyTable | None = None
    technology: Technology | None = None
    area: Components | None = None
    """The same primitive units in um^2 at this node (None where no area scaling is published)."""
    scope: str = "system"
    node_scaling: str = "calibrated"

    def with_datapath(self, **changes: Any) -> EnergyModel:
        """The same model with some datapath choices changed (a trial's accumulator, vector length)."""
        return replace(self, datapath=replace(self.datapath, **changes))


@dataclass(frozen=True)
class _Loaded:
    tables: tuple[EnergyTable, ...]
    calibration: EnergyTable
    """The primary calibration table (Horowitz 45 nm, or a user table that calibrates)."""
    calibrated: dict[float, Components]
    """Energy fits at every calibration node."""
    area: Components
    technology: Technology
    presets: dict[str, MemoryPreset]


def _is_calibration(table: EnergyTable) -> bool:
    ops = {e.op for e in table.entries}
    return all(op in ops for op in CALIBRATION_OPS)


@functools.lru_cache(maxsize=16)
def _load(directory: str | None, user_table: str | None) -> _Loaded:
    tables = load_tables(directory)
    if CALIBRATION_SOURCE not in tables:
        raise InputError(f"energy tables: missing the calibration source {CALIBRATION_SOURCE!r}")
    ordered = list(tables.values())
    primary = tables[CALIBRATION_SOURCE]
    user = None
    if user_table is not None:
        user = load_table(user_table)
        ordered = [t for t in ordered if t.source.key != user.source.key] + [user]
    weights = Weights.from_tables(ordered)
    reference = calibrate(primary, weights)
    area = calibrate(primary, weights, quantity="area")
    calibrated: dict[float, Components] = {}
    for table in ordered:
        if table.source.calibration and table is not user:
            calibrated[_node_of(table)] = calibrate(table, weights, reference)
    if user is not None and any(e.op in CALIBRATION_OPS for e in user.entries):
        calibrated[_node_of(user)] = calibrate(user, weights, reference)  # checks it has every op class
        area = calibrate(user, weights, quantity="area")
        primary = user
    technology = technology_from(ordered)
    return _Loaded(tuple(ordered), primary, calibrated, area, technology, memory_presets(ordered))


def _node_of(table: EnergyTable) -> float:
    if table.source.node_nm is None:
        raise InputError(f"{table.path}:1: a calibration table needs source.node_nm")
    return table.source.node_nm


def components_at(loaded: _Loaded, node: str | float, rule: str) -> Components:
    """The primitive units at `node` under the node-scaling rule.

    'calibrated': at a calibration node its own fit; between two calibration nodes the Stillmaker &
    Baas curve from each neighbour, blended geometrically (log node) so that it passes through both
    fits; outside the calibrated range an error. 'stillmaker': the primary fit times the Stillmaker &
    Baas factor, at any node of the technology table.
    """
    technology = loaded.technology
    nodes = sorted(loaded.calibrated)
    value = parse_node(node)
    if not any(math.isclose(value, n) for n in nodes):
        value = technology.known(node)  # an unknown node repeats what the user typed
    if rule == "stillmaker":
        home = _node_of(loaded.calibration)
        base = loaded.calibrated.get(home) or next(iter(loaded.calibrated.values()))
        return base.scaled(technology.scale(value, base.node_nm), value)
    if rule != "calibrated":
        raise InputError(f"unknown node scaling {rule!r} (known: {', '.join(NODE_SCALINGS)})")
    for known in nodes:
        if math.isclose(known, value):
            return replace(loaded.calibrated[known], node_nm=known)
    low, high = nodes[0], nodes[-1]
    if not low < value < high:
        span = f"{low:g}-{high:g} nm" if low != high else f"{low:g} nm"
        raise InputError(f"technology node {str(node)!r} is outside the calibrated range {span} "
                         "(node scaling "
                         "'calibrated'): give a table calibrated at that node (--table) or use node scaling "
                         "'stillmaker'")
    small = max(n for n in nodes if n < value)
    large = min(n for n in nodes if n > value)
    from_large = loaded.calibrated[large].scaled(technology.scale(value, large), value)
    from_small = loaded.calibrated[small].scaled(technology.scale(value, small), value)
    t = math.log(large / value) / math.log(large / small)
    return from_large.toward(from_small, t, value)


def build_model(node: str | float = "45nm", datapath: DatapathParams | None = None,
                memory: MemoryParams | None = None, table: str | Path | None = None,
                tables_directory: str | Path | None = None, scope: str = "system",
                node_scaling: str = "calibrated") -> EnergyModel:
    """Calibrate, move the logic to `node` under the node-scaling rule, resolve the memory presets.

    A bad argument raises a SettingError naming it (`node`, `scope`, `memory.sram`, ...)."""
    datapath = datapath or DatapathParams()
    memory = memory or MemoryParams()
    if scope not in SCOPES:
        raise SettingError("scope", f"unknown scope {scope!r} (known: {', '.join(SCOPES)})")
    if node_scaling not in NODE_SCALINGS:
        raise SettingError("node_scaling",
                           f"unknown node scaling {node_scaling!r} (known: {', '.join(NODE_SCALINGS)})")
    with about("table"):
        loaded = _load(None if tables_directory is None else str(tables_directory),
                       None if table is None else str(table))
    with about("node"):
        components = components_at(loaded, node, node_scaling)
    node_nm = components.node_nm
    technology = loaded.technology
    home = _node_of(loaded.calibration)
    reference = loaded.calibrated.get(home) or components
    area_scale = technology.area_scale(node_nm, loaded.area.node_nm) if _has_node(technology, node_nm) \
        else math.nan
    area = loaded.area.scaled(area_scale, node_nm) if area_scale == area_scale else None
    with about("memory.sram"):
        sram = preset(loaded.presets, memory.sram, "sram")
    with about("memory.dram"):
        dram = preset(loaded.presets, memory.dram, "dram")
    logic_scale = components.fp_mul(8, 23) / reference.fp_mul(8, 23)
    sram_bit = sram_pj_per_bit(sram, loaded.tables, technology, node_nm, memory.sram_scaling)
    return EnergyModel(
        node_nm=node_nm, logic_scale=logic_scale, components=components, reference=reference,
        sram=sram, dram=dram, sram_pj_per_bit=sram_bit, dram_pj_per_bit=dram.pj_per_bit, datapath=datapath,
        memory=memory, calibration=loaded.calibration, technology=technology, area=area, scope=scope,
        node_scaling=node_scaling)


def _has_node(technology: Technology, node_nm: float) -> bool:
    return any(math.isclose(node_nm, known) for known in technology.factors)


def reproduction(model: EnergyModel | None = None, table: EnergyTable | None = None) -> pd.DataFrame:
    """Model value against every calibration-op and memory entry of a table, at the table's node.

    The components are rescaled to the table's node first, so this checks the fit, not the scaling.
    Memory entries are reproduced through the preset of the same op and capacity in that table.
    """
    model = model or build_model()
    table = table or model.calibration
    assert table is not None and model.technology is not None and model.calibration is not None
    node = table.source.node_nm or model.calibration.source.node_nm
    assert node is not None
    components = build_model(node, table=None if model.calibration.source.key == CALIBRATION_SOURCE
                             else model.calibration.path).components
    rows: list[dict[str, object]] = []
    for index, entry in enumerate(table.entries):
        value = model_energy(components, entry)
        if value is None and entry.op in ("sram_read", "sram_write", "dram_access"):
            value = next((other.pj_per_bit * (entry.access_bits or 1) for _, other in table.of(entry.op)
                          if other.preset and other.capacity_bytes == entry.capacity_bytes), None)
        if value is None:
            continue
        reference = entry.energy_pj if entry.energy_pj is not None else entry.energy_pj_per_bit
        if hasattr(entry, "exp_bits"):
            size = f"e{entry.exp_bits}m{entry.man_bits}"
        else:
            size = str(getattr(entry, "bits", None) or getattr(entry, "capacity_bytes", None) or "")
        rows.append({"where": table.where(index), "op": entry.op, "size": size, "table_pj": reference,
                     "model_pj": value, "residual": value / reference - 1.0})
    return pd.DataFrame(rows)
