"""Memory presets: energy per bit moved for an SRAM buffer and for off-chip DRAM.

A preset is any sram_read / dram_access entry with a `preset` name, in any loaded table. DRAM-class
energy belongs to the memory technology and is never node-scaled. SRAM scales with the logic node by
a chosen rule (`sram_scaling`): "sqrt" (default: bitlines and wires scale slower than logic, a
judgement call recorded in docs/energy-model.md), "logic" (like gates) or "none"; presets whose
source states no node are used as given.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from dse.energy.tables import EnergyTable
from dse.energy.technology import Technology
from dse.errors import InputError

SramScaling = Literal["none", "sqrt", "logic"]
SRAM_SCALINGS: tuple[str, ...] = ("none", "sqrt", "logic")


@dataclass(frozen=True)
class MemoryPreset:
    name: str
    kind: Literal["sram", "dram"]
    pj_per_bit: float
    node_nm: float | None
    provenance: str
    verified: str


def memory_presets(tables: Iterable[EnergyTable]) -> dict[str, MemoryPreset]:
    out: dict[str, MemoryPreset] = {}
    for table in tables:
        for _, entry in table.of("sram_read", "dram_access"):
            if entry.preset is None:
                continue
            kind = "dram" if entry.op == "dram_access" else "sram"
            node = None if kind == "dram" else (entry.node_nm or table.source.node_nm)
            out[entry.preset] = MemoryPreset(entry.preset, kind, entry.pj_per_bit, node,
                                             f"{table.source.key}: {entry.where}", entry.verified)
    return out


def preset(presets: dict[str, MemoryPreset], name: str, kind: str) -> MemoryPreset:
    found = presets.get(name)
    if found is None or found.kind != kind:
        names = ", ".join(sorted(p.name for p in presets.values() if p.kind == kind))
        raise InputError(f"unknown {kind} preset {name!r} (known: {names})")
    return found


def sram_pj_per_bit(sram: MemoryPreset, technology: Technology, node_nm: float, scaling: str) -> float:
    """The SRAM preset's energy per bit at `node_nm` under the scaling rule."""
    if scaling not in SRAM_SCALINGS:
        raise InputError(f"unknown sram scaling {scaling!r} (expected one of {', '.join(SRAM_SCALINGS)})")
    if sram.node_nm is None or scaling == "none":
        return sram.pj_per_bit
    factor = technology.scale(node_nm, from_node=sram.node_nm)
    return sram.pj_per_bit * (math.sqrt(factor) if scaling == "sqrt" else factor)
