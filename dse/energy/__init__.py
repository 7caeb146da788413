"""Analytical energy model: cited per-op tables -> primitive units -> format datapaths -> iteration tally.

Pure arithmetic over operation counts and tables (no torch.nn). Typical use:

    from dse.energy import build_model, iteration_energy, summarize
    model = build_model(node="7nm")
    frame = iteration_energy("resnet50", dse.formats.get("lns8"), model)
    summarize(frame, ["pass", "unit"])

Names are imported on first use: the store and the reports need the unit names (dse.energy.units), not
the tables and datapaths behind them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dse.lazy_exports import lazy_exports

if TYPE_CHECKING:
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

_EXPORTS = {
    "compare_formats": "dse.energy.compare", "Components": "dse.energy.components",
    "calibrate": "dse.energy.components", "Accumulator": "dse.energy.datapaths",
    "Datapath": "dse.energy.datapaths", "DatapathParams": "dse.energy.datapaths",
    "FAMILY_HARDWARE": "dse.energy.datapaths", "FamilyHardware": "dse.energy.datapaths",
    "Rounding": "dse.energy.datapaths", "UnitEnergy": "dse.energy.datapaths",
    "conversion_energy": "dse.energy.datapaths", "datapath_area_um2": "dse.energy.datapaths",
    "datapath_for": "dse.energy.datapaths", "mac_energy": "dse.energy.datapaths",
    "operand": "dse.energy.datapaths", "register_family": "dse.energy.datapaths",
    "TrainingFormats": "dse.energy.iteration", "iteration_energy": "dse.energy.iteration",
    "pass_unit_table": "dse.energy.iteration", "per_mac": "dse.energy.iteration",
    "summarize": "dse.energy.iteration", "top_layers": "dse.energy.iteration",
    "unit_totals": "dse.energy.iteration", "EnergyModel": "dse.energy.model",
    "MemoryParams": "dse.energy.model", "NODE_SCALINGS": "dse.energy.model", "SCOPES": "dse.energy.model",
    "build_model": "dse.energy.model", "reproduction": "dse.energy.model", "EnergyTable": "dse.energy.tables",
    "load_table": "dse.energy.tables", "load_tables": "dse.energy.tables", "tables_dir": "dse.energy.tables",
    "parse_node": "dse.energy.technology", "GemmLayer": "dse.models.workloads",
    "Workload": "dse.models.workloads", "get_workload": "dse.models.workloads",
    "register_workload": "dse.models.workloads", "workload_names": "dse.models.workloads",
}

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

__getattr__ = lazy_exports(__name__, _EXPORTS)
