"""Side-by-side comparison of formats on one workload: per-MAC energy and energy per iteration."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from dse.energy.datapaths import EnergyFormat
from dse.energy.iteration import (
    FormatArg,
    TrainingFormats,
    iteration_energy,
    per_mac,
    training_area_um2,
    unit_totals,
)
from dse.energy.model import EnergyModel
from dse.models.workloads import Workload

BASELINES = ("fp32", "int8")
COMPARE_COLUMNS = (
    "format", "multiply_pj_per_mac", "conversion_pj_per_mac", "accumulation_pj_per_mac", "mac_pj",
    "compute_mj", "update_mj", "memory_mj", "iteration_mj", "vs_fp32", "vs_int8", "datapath_um2", "pe_um2",
)


def _parse(spec: FormatArg) -> EnergyFormat:
    if not isinstance(spec, str):
        return spec
    from dse.formats import get

    return get(spec)


def compare_row(label: str, formats: TrainingFormats, workload: str | Workload, model: EnergyModel,
                batch_size: int | None = None) -> dict[str, Any]:
    frame = iteration_energy(workload, formats, model, batch_size)
    mac = per_mac(frame)
    units = unit_totals(frame)
    compute = units["multiply"] + units["conversion"] + units["accumulation"]
    area = training_area_um2(formats, model, workload)
    return {
        "datapath_um2": area["datapath"], "pe_um2": area["pe"],
        "format": label, "multiply_pj_per_mac": mac.multiply_pj, "conversion_pj_per_mac": mac.conversion_pj,
        "accumulation_pj_per_mac": mac.accumulation_pj, "mac_pj": mac.total_pj, "compute_mj": compute * 1e-9,
        "update_mj": units["update"] * 1e-9, "memory_mj": units["memory"] * 1e-9,
        "iteration_mj": sum(units.values()) * 1e-9,
    }


def compare_formats(specs: Sequence[FormatArg], workload: str | Workload, model: EnergyModel,
                    batch_size: int | None = None,
                    **format_options: Any) -> pd.DataFrame:
    """One row per format (used for weights, activations and gradients), with ratios to fp32 and int8.

    Per-MAC columns average the workload's GEMMs: per-output work amortised over each GEMM's own
    reduction length, output conversions included. The baselines are computed even when not listed.
    """
    rows = []
    for spec in specs:
        fmt = _parse(spec)
        formats = TrainingFormats.of(fmt, **format_options)
        rows.append(compare_row(fmt.spec, formats, workload, model, batch_size))
    baseline_energy: dict[str, float] = {}
    for name in BASELINES:
        found = next((r for r in rows if r["format"] == name), None)
        if found is None:
            formats = TrainingFormats.of(_parse(name), **format_options)
            found = compare_row(name, formats, workload, model, batch_size)
        baseline_energy[name] = found["iteration_mj"]
    for row in rows:
        for name in BASELINES:
            row[f"vs_{name}"] = row["iteration_mj"] / baseline_energy[name]
    frame = pd.DataFrame(rows, columns=list(COMPARE_COLUMNS))
    frame.attrs.update(node_nm=model.node_nm, scope=model.scope)
    return frame
