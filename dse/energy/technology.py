"""Technology scaling: the factor that moves a logic energy from one CMOS node to another.

Fitted nodes use Stillmaker & Baas (2017): E_y = E_x * F_y(V_y) / F_x(V_x). Nodes without a fit are
derived in the table itself (log-log interpolation between two nodes, or a power-law extrapolation).
Memory is not scaled here; see `memory.py`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from dse.energy.tables import DerivedNodeEntry, EnergyTable, TechNodeEntry
from dse.errors import InputError

_NODE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:nm)?\s*$", re.IGNORECASE)


def parse_node(node: str | float | int) -> float:
    """'7nm', '7 nm', '7' or 7 -> 7.0."""
    if isinstance(node, int | float) and not isinstance(node, bool):
        value = float(node)
    else:
        match = _NODE.match(str(node))
        if not match:
            raise InputError(f"unknown technology node {str(node)!r}: expected a size such as 45nm or 7nm")
        value = float(match.group(1))
    if not value > 0:
        raise InputError(f"unknown technology node {str(node)!r}")
    return value


@dataclass(frozen=True)
class Technology:
    """Energy factors F(node) for every node the tables know, relative to nothing in particular."""

    factors: dict[float, float]
    provenance: dict[float, str]
    area_factors: dict[float, float]
    """Area relative to 45 nm, where published (or derived from published nodes)."""

    def nodes(self) -> list[float]:
        return sorted(self.factors, reverse=True)

    def scale(self, to_node: str | float, from_node: str | float = 45) -> float:
        """Multiply an energy at `from_node` by this to get it at `to_node`."""
        return self._factor(to_node) / self._factor(from_node)

    def area_scale(self, to_node: str | float, from_node: str | float = 45) -> float:
        """Multiply an area at `from_node` by this to get it at `to_node` (NaN where not published)."""
        to, frm = self.known(to_node), self.known(from_node)
        if to not in self.area_factors or frm not in self.area_factors:
            return math.nan
        return self.area_factors[to] / self.area_factors[frm]

    def known(self, node: str | float) -> float:
        """The node as the tables list it; an unknown node repeats what the user typed."""
        value = parse_node(node)
        for known in self.factors:
            if math.isclose(known, value):
                return known
        names = ", ".join(f"{n:g}nm" for n in self.nodes())
        raise InputError(f"unknown technology node {str(node)!r} (known: {names})")

    def _factor(self, node: str | float) -> float:
        return self.factors[self.known(node)]


def technology_from(tables: Iterable[EnergyTable]) -> Technology:
    """Collect tech_node entries, then resolve derived nodes (which may refer to each other)."""
    factors: dict[float, float] = {}
    provenance: dict[float, str] = {}
    areas: dict[float, float] = {}
    derived: list[tuple[EnergyTable, int, DerivedNodeEntry]] = []
    for table in tables:
        for index, entry in table.of("tech_node", "tech_node_derived"):
            if entry.node_nm in factors or any(d[2].node_nm == entry.node_nm for d in derived):
                raise InputError(f"{table.where(index)}: technology node {entry.node_nm:g} nm defined twice")
            if isinstance(entry, TechNodeEntry):
                factors[entry.node_nm] = entry.factor
                provenance[entry.node_nm] = f"{table.source.key}: {entry.where}"
                if entry.area_vs_45nm is not None:
                    areas[entry.node_nm] = entry.area_vs_45nm
            else:
                derived.append((table, index, entry))
    while derived:
        progress = False
        for item in list(derived):
            table, index, entry = item
            if not all(n in factors for n in entry.from_nodes_nm):
                continue
            factors[entry.node_nm] = _derive(entry, factors)
            if all(n in areas for n in entry.from_nodes_nm):
                areas[entry.node_nm] = _derive(entry, areas)
            provenance[entry.node_nm] = f"{table.source.key}: {entry.where}"
            derived.remove(item)
            progress = True
        if not progress:
            table, index, entry = derived[0]
            missing = [f"{n:g}" for n in entry.from_nodes_nm if n not in factors]
            raise InputError(f"{table.where(index)}: node {entry.node_nm:g} nm derives from unknown "
                             f"node(s) {', '.join(missing)} nm")
    return Technology(factors, provenance, areas)


def _derive(entry: DerivedNodeEntry, factors: dict[float, float]) -> float:
    if entry.rule == "extrapolate":
        (base,) = entry.from_nodes_nm
        return factors[base] * (entry.node_nm / base) ** entry.exponent
    a, b = entry.from_nodes_nm
    t = math.log(a / entry.node_nm) / math.log(a / b)
    return math.exp(math.log(factors[a]) + t * (math.log(factors[b]) - math.log(factors[a])))
