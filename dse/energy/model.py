"""The energy model at one technology node: calibrated components, memory energies and parameters.

`build_model` loads the tables (energy_tables/ or $DSE_ENERGY_TABLES, plus an optional user table),
calibrates the primitive units at the calibration table's node, scales them to the requested node and
resolves the memory presets. Everything downstream is arithmetic on this object.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dse.energy.components import Components, Weights, calibrate, model_energy
from dse.energy.datapaths import DatapathParams
from dse.energy.memory import SRAM_SCALINGS, MemoryPreset, memory_presets, preset, sram_pj_per_bit
from dse.energy.tables import EnergyTable, load_table, load_tables
from dse.energy.technology import Technology, parse_node, technology_from
from dse.errors import InputError

CALIBRATION_SOURCE = "horowitz2014"


@dataclass(frozen=True)
class MemoryParams:
    """Memory choices; defaults are documented in docs/energy-model.md."""

    sram: str = "horowitz_32kb"
    """On-chip buffer preset that GEMM operands are read from."""
    dram: str = "hbm2e"
    """Off-chip memory preset; every tensor is read from / written to it once per use."""
    sram_scaling: str = "sqrt"
    """How SRAM energy follows the logic node: 'sqrt' of the logic factor, 'logic' or 'none'."""
    operand_reuse: float = 16.0
    """MACs served by one operand read from the buffer (PE-array broadcast / register reuse)."""
    operand_registers: bool = True
    """Charge one register write per operand bit per MAC (operands latched in every PE)."""

    def __post_init__(self) -> None:
        if self.sram_scaling not in SRAM_SCALINGS:
            raise InputError(f"sram_scaling must be one of {', '.join(SRAM_SCALINGS)}, "
                             f"got {self.sram_scaling!r}")
        if not self.operand_reuse >= 1:
            raise InputError(f"operand_reuse must be >= 1, got {self.operand_reuse}")


@dataclass(frozen=True)
class EnergyModel:
    node_nm: float
    logic_scale: float
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


_Loaded = tuple[tuple[EnergyTable, ...], EnergyTable, Weights, Components, Technology,
                dict[str, MemoryPreset]]


@functools.lru_cache(maxsize=16)
def _load(directory: str | None, user_table: str | None) -> _Loaded:
    tables = load_tables(directory)
    if CALIBRATION_SOURCE not in tables:
        raise InputError(f"energy tables: missing the calibration source {CALIBRATION_SOURCE!r}")
    ordered = list(tables.values())
    calibration = tables[CALIBRATION_SOURCE]
    weights = Weights.from_tables(ordered)
    reference = calibrate(calibration, weights)
    if user_table is not None:
        user = load_table(user_table)
        if user.source.key in tables and tables[user.source.key].path != user.path:
            ordered = [t for t in ordered if t.source.key != user.source.key]
        ordered.append(user)
        weights = Weights.from_tables(ordered)
        if any(e.op in ("int_add", "int_mul", "fp_add", "fp_mul") for e in user.entries):
            calibration = user
            reference = calibrate(user, weights, reference)
        else:
            reference = calibrate(calibration, weights)
    technology = technology_from(ordered)
    return tuple(ordered), calibration, weights, reference, technology, memory_presets(ordered)


def build_model(node: str | float = "45nm", datapath: DatapathParams | None = None,
                memory: MemoryParams | None = None, table: str | Path | None = None,
                tables_directory: str | Path | None = None) -> EnergyModel:
    """Calibrate at the table's node, scale the logic to `node`, resolve the memory presets."""
    datapath = datapath or DatapathParams()
    memory = memory or MemoryParams()
    _, calibration, _, reference, technology, presets = _load(
        None if tables_directory is None else str(tables_directory), None if table is None else str(table))
    node_nm = parse_node(node)
    assert calibration.source.node_nm is not None
    scale = technology.scale(node_nm, from_node=calibration.source.node_nm)
    sram = preset(presets, memory.sram, "sram")
    dram = preset(presets, memory.dram, "dram")
    return EnergyModel(
        node_nm=node_nm, logic_scale=scale, components=reference.scaled(scale, node_nm), reference=reference,
        sram=sram, dram=dram, sram_pj_per_bit=sram_pj_per_bit(sram, technology, node_nm, memory.sram_scaling),
        dram_pj_per_bit=dram.pj_per_bit, datapath=datapath, memory=memory, calibration=calibration,
        technology=technology)


def reproduction(model: EnergyModel | None = None, table: EnergyTable | None = None) -> pd.DataFrame:
    """Model value against every calibration-op and memory entry of a table, at the table's node.

    The components are rescaled to the table's node first, so this checks the fit, not the scaling.
    Memory entries are reproduced through the preset of the same op and capacity in that table.
    """
    model = model or build_model()
    table = table or model.calibration
    assert table is not None and model.technology is not None and model.calibration is not None
    home = model.calibration.source.node_nm
    node = table.source.node_nm or home
    assert node is not None and home is not None
    components = model.reference.scaled(model.technology.scale(node, home), node)
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
