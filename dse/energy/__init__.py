"""Analytical energy model: cited per-op tables -> primitive units -> format datapaths -> iteration tally.

Pure arithmetic over operation counts and tables (no torch.nn). Typical use:

    from dse.energy import build_model, iteration_energy, summarize
    model = build_model(node="7nm")
    frame = iteration_energy("resnet50", dse.formats.get("lns8"), model)
    summarize(frame, ["pass", "unit"])
"""

from dse.energy.compare import compare_formats
from dse.energy.components import Components, calibrate
from dse.energy.datapaths import (
    FAMILY_HARDWARE,
    Accumulator,
    Datapath,
    DatapathParams,
    FamilyHardware,
    Rounding,
    UnitEnergy,
    conversion_energy,
    datapath_area_um2,
    datapath_for,
    mac_energy,
    operand,
    register_family,
)
from dse.energy.iteration import (
    TrainingFormats,
    iteration_energy,
    pass_unit_table,
    per_mac,
    summarize,
    top_layers,
    unit_totals,
)
from dse.energy.model import NODE_SCALINGS, SCOPES, EnergyModel, MemoryParams, build_model, reproduction
from dse.energy.tables import EnergyTable, load_table, load_tables, tables_dir
from dse.energy.technology import parse_node
from dse.models.workloads import GemmLayer, Workload, get_workload, register_workload, workload_names

__all__ = [
    "FAMILY_HARDWARE", "NODE_SCALINGS", "SCOPES", "Accumulator", "Components", "Datapath", "DatapathParams",
    "EnergyModel", "EnergyTable", "FamilyHardware", "GemmLayer", "MemoryParams", "Rounding",
    "TrainingFormats",
    "UnitEnergy", "Workload", "build_model", "calibrate", "compare_formats", "conversion_energy",
    "datapath_area_um2", "datapath_for", "get_workload", "iteration_energy", "register_family",
    "load_table", "load_tables", "mac_energy", "operand", "parse_node", "per_mac", "register_workload",
    "pass_unit_table", "reproduction", "summarize", "tables_dir", "top_layers", "unit_totals",
    "workload_names",
]
