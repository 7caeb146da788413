"""Memory presets: energy per bit moved for an SRAM buffer and for off-chip DRAM.

A preset is any sram_read / dram_access entry with a `preset` name, in any loaded table. DRAM-class
energy belongs to the memory technology and is never node-scaled. SRAM scales with the logic node by
a chosen rule (`sram_scaling`): "calibrated" (default: log-log between published reads of the same
capacity and access width at the calibration nodes, Horowitz 45 nm and Jouppi et al. 7 nm; a preset
with no such pair falls back to "sqrt"), "sqrt" of the logic factor (bitlines and wires scale slower
than gates, a judgement call), "logic" (like gates) or "none". Presets whose source states no node are
used as given.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from dse.energy.tables import EnergyTable
from dse.energy.technology import Technology
from dse.errors import InputError

SramScaling = Literal["calibrated", "none", "sqrt", "logic"]
SRAM_SCALINGS: tuple[str, ...] = ("calibrated", "sqrt", "logic", "none")


@dataclass(frozen=True)
class MemoryPreset:
    name: str
    kind: Literal["sram", "dram"]
    pj_per_bit: float
    node_nm: float | None
    provenance: str
    verified: str
    capacity_bytes: int | None = None
    access_bits: int | None = None


def memory_presets(tables: Iterable[EnergyTable]) -> dict[str, MemoryPreset]:
    out: dict[str, MemoryPreset] = {}
    for table in tables:
        for _, entry in table.of("sram_read", "dram_access"):
            if entry.preset is None:
                continue
            kind: Literal["sram", "dram"] = "dram" if entry.op == "dram_access" else "sram"
            node = None if kind == "dram" else (entry.node_nm or table.source.node_nm)
            out[entry.preset] = MemoryPreset(entry.preset, kind, entry.pj_per_bit, node,
                                             f"{table.source.key}: {entry.where}", entry.verified,
                                             entry.capacity_bytes, entry.access_bits)
    return out


def preset(presets: dict[str, MemoryPreset], name: str, kind: str) -> MemoryPreset:
    found = presets.get(name)
    if found is None or found.kind != kind:
        names = ", ".join(sorted(p.name for p in presets.values() if p.kind == kind))
        raise InputError(f"unknown {kind} preset {name!r} (known: {names})")
    return found


def sram_pj_per_bit(sram: MemoryPreset, tables: Iterable[EnergyTable], technology: Technology,
                    node_nm: float, scaling: str) -> float:
    """The SRAM preset's energy per bit at `node_nm` under the scaling rule."""
    if scaling not in SRAM_SCALINGS:
        raise InputError(f"unknown sram scaling {scaling!r} (known: {', '.join(SRAM_SCALINGS)})")
    if sram.node_nm is None or scaling == "none" or math.isclose(sram.node_nm, node_nm):
        return sram.pj_per_bit
    if scaling == "calibrated":
        points = _published_points(sram, tables)
        below = [n for n in points if n <= node_nm]
        above = [n for n in points if n >= node_nm]
        if below and above:
            small, large = max(below), min(above)
            if math.isclose(small, large):
                return points[small]
            t = math.log(large / node_nm) / math.log(large / small)
            return points[large] * (points[small] / points[large]) ** t
        scaling = "sqrt"
    factor = technology.scale(node_nm, from_node=sram.node_nm)
    return sram.pj_per_bit * (math.sqrt(factor) if scaling == "sqrt" else factor)


def _published_points(sram: MemoryPreset, tables: Iterable[EnergyTable]) -> dict[float, float]:
    """pJ/bit of reads with the preset's capacity and access width, by node, in calibration tables."""
    points: dict[float, float] = {}
    assert sram.node_nm is not None
    points[sram.node_nm] = sram.pj_per_bit
    for table in tables:
        if not table.source.calibration:
            continue
        for _, entry in table.of("sram_read"):
            node = entry.node_nm or table.source.node_nm
            if (node is not None and entry.capacity_bytes == sram.capacity_bytes
                    and entry.access_bits == sram.access_bits):
                points.setdefault(node, entry.pj_per_bit)
    return points
