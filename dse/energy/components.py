"""Primitive hardware units as functions of their width, calibrated to a table.

One structure serves two quantities: `calibrate(..., quantity="energy")` gives pJ per operation from
the table's `energy_pj`, `quantity="area"` gives um^2 per unit from its `area_um2`, so every datapath
built from these units has an energy and an area from the same circuit description (`Components.unit`).

The adder and the array multiplier are fitted directly to the calibration table's integer entries
(Horowitz 45 nm by default). Units the table does not list (register, 2:1 multiplexer, comparator,
logic gate) are priced in *adder bits*, the fitted energy of one adder bit, with weights derived from
Aladdin's same-timing-target ratios and ZigZag's gate capacitances (model_constants.yaml). The FP
adder and multiplier are compositions of those primitives; one overhead factor each (eta) is fitted to
the table's FP entries, so FP units of any (e, m) follow from the same structure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from dse.energy.tables import EnergyTable
from dse.errors import InputError


def clog2(n: float) -> int:
    """Number of stages of a log-depth structure over n inputs (0 for n <= 1)."""
    return 0 if n <= 1 else math.ceil(math.log2(n))


@dataclass(frozen=True)
class Weights:
    """Energies of the unlisted primitives in adder bits, and of divide/sqrt in multiplies.

    Field names are the `constant` names of model_constants.yaml; the defaults repeat its values.
    """

    register_bit_weight: float = 1.371
    mux_bit_weight: float = 0.397
    comparator_bit_weight: float = 0.140
    gate_weight: float = 0.25
    divide_multiplies: float = 4.0
    sqrt_multiplies: float = 4.0
    register_bit_area_weight: float = 0.688
    mux_bit_area_weight: float = 0.180
    comparator_bit_area_weight: float = 0.255
    gate_area_weight: float = 0.181

    def for_area(self) -> Weights:
        """The same weights with the area ones in the energy fields (what the area components use)."""
        return replace(self, register_bit_weight=self.register_bit_area_weight,
                       mux_bit_weight=self.mux_bit_area_weight,
                       comparator_bit_weight=self.comparator_bit_area_weight,
                       gate_weight=self.gate_area_weight)

    @classmethod
    def from_tables(cls, tables: list[EnergyTable]) -> Weights:
        known = {f.name for f in fields(cls)}
        values: dict[str, float] = {}
        for table in tables:
            for index, entry in table.of("constant"):
                if entry.name not in known:
                    raise InputError(f"{table.where(index)}: unknown model constant {entry.name!r} "
                                     f"(known: {', '.join(sorted(known))})")
                values[entry.name] = entry.value
        return cls(**values)


@dataclass(frozen=True)
class Components:
    """Calibrated primitive units at one technology node. Methods return `unit` (pJ per operation, or
    um^2 per unit for area components)."""

    adder_per_bit: float
    adder_offset: float
    mult_per_pp_bit: float
    mult_per_operand_bit: float
    fp_mul_eta: float
    fp_add_eta: float
    weights: Weights
    node_nm: float
    unit: str = "pJ"

    SCALED_FIELDS = ("adder_per_bit", "adder_offset", "mult_per_pp_bit", "mult_per_operand_bit")

    def scaled(self, factor: float, node_nm: float) -> Components:
        """The same units at another node: every absolute coefficient times the technology factor."""
        scaled = {name: getattr(self, name) * factor for name in self.SCALED_FIELDS}
        return replace(self, node_nm=node_nm, **scaled)

    def toward(self, other: Components, t: float, node_nm: float) -> Components:
        """Geometric interpolation of every coefficient: t = 0 is self, t = 1 is other."""
        def mix(x: float, y: float) -> float:
            if x > 0 and y > 0:
                return x * (y / x) ** t
            return x + (y - x) * t
        names = (*self.SCALED_FIELDS, "fp_mul_eta", "fp_add_eta")
        mixed: dict[str, Any] = {n: mix(getattr(self, n), getattr(other, n)) for n in names}
        return replace(self, node_nm=node_nm, **mixed)

    # --- integer primitives ---------------------------------------------------------------------
    def adder(self, bits: float) -> float:
        """Two-operand adder: a fixed part plus a per-bit slope (fitted)."""
        return 0.0 if bits <= 0 else self.adder_per_bit * bits + self.adder_offset

    def multiplier(self, a_bits: float, b_bits: float) -> float:
        """Array multiplier a x b: partial-product bits plus a term linear in the operand widths."""
        if a_bits <= 0 or b_bits <= 0:
            return 0.0
        return self.mult_per_pp_bit * a_bits * b_bits + self.mult_per_operand_bit * (a_bits + b_bits)

    def _bits(self, adder_bits: float) -> float:
        return self.adder_per_bit * adder_bits

    def gates(self, count: float) -> float:
        """XOR/AND-class two-input gates (sign logic, sticky bits, decoders)."""
        return self._bits(self.weights.gate_weight * count)

    def incrementer(self, bits: float) -> float:
        """Half-adder chain: two gates per bit (rounding, counters, one-hot accumulation)."""
        return self.gates(2 * bits)

    def register(self, bits: float) -> float:
        """Flip-flops written once (clock included, per Aladdin's register)."""
        return self._bits(self.weights.register_bit_weight * bits)

    def mux(self, count: float) -> float:
        """2:1 multiplexers."""
        return self._bits(self.weights.mux_bit_weight * count)

    def comparator(self, bits: float) -> float:
        return self._bits(self.weights.comparator_bit_weight * bits)

    def shifter(self, data_bits: float, out_bits: float, stages: float) -> float:
        """Logarithmic barrel shifter: `stages` levels of muxes, average width (data + out) / 2."""
        return self.mux(stages * (data_bits + out_bits) / 2)

    def lzc(self, bits: float) -> float:
        """Leading-zero/one counter: a detection gate per bit plus a log-depth tree of muxes."""
        return self.gates(bits) + self.mux(bits * clog2(bits) / 2)

    def lut(self, entries: float, bits: float) -> float:
        """Small ROM/LUT read: one entries-to-1 mux tree per output bit."""
        return self.mux(max(entries - 1, 0) * bits)

    # --- floating-point units (structure + fitted overhead) -----------------------------------
    def fp_mul_parts(self, exp_bits: int, a_sig_bits: int,
                     b_sig_bits: int | None = None) -> tuple[float, float]:
        """(significand array + exponent adder, normalisation/rounding logic before eta)."""
        b_sig = a_sig_bits if b_sig_bits is None else b_sig_bits
        p = max(a_sig_bits, b_sig)
        core = self.multiplier(a_sig_bits, b_sig) + self.adder(exp_bits + 1)
        width = a_sig_bits + b_sig
        overhead = self.lzc(p) + self.shifter(width, width, clog2(p)) + self.incrementer(p)
        return core, overhead

    def fp_mul(self, exp_bits: int, man_bits: int, b_man_bits: int | None = None) -> float:
        """FP multiplier with (exp_bits, man_bits) operands (b may have another mantissa width)."""
        b_sig = None if b_man_bits is None else b_man_bits + 1
        core, overhead = self.fp_mul_parts(exp_bits, man_bits + 1, b_sig)
        return core + self.fp_mul_eta * overhead

    def fp_add_structure(self, exp_bits: int, man_bits: int, addend_sig_bits: int | None = None) -> float:
        """Exponent difference, alignment shift, significand add, LZC, normalise shift, round.

        `addend_sig_bits` widens the datapath for an exact addend (a fused multiply-add adds the
        unrounded product of 2p bits to the accumulator); the result is still rounded to man_bits + 1.
        """
        p = man_bits + 1
        w = max(p, addend_sig_bits or 0) + 3  # guard, round and sticky bits
        return (self.adder(exp_bits + 1) + self.shifter(w, w, clog2(w)) + self.adder(w + 1)
                + self.lzc(w + 1) + self.shifter(w + 1, w + 1, clog2(w + 1)) + self.incrementer(p))

    def fp_add(self, exp_bits: int, man_bits: int, addend_sig_bits: int | None = None) -> float:
        return self.fp_add_eta * self.fp_add_structure(exp_bits, man_bits, addend_sig_bits)


# --- calibration ---------------------------------------------------------------------------------

CALIBRATION_OPS = ("int_add", "int_mul", "fp_add", "fp_mul")


def _relative_lstsq(columns: list[np.ndarray], target: np.ndarray) -> np.ndarray:
    """Least squares on relative error: minimise sum((X @ c) / t - 1)^2."""
    matrix = np.stack([col / target for col in columns], axis=1)
    solution, *_ = np.linalg.lstsq(matrix, np.ones_like(target), rcond=None)
    return solution


def calibrate(table: EnergyTable, weights: Weights, reference: Components | None = None,
              quantity: str = "energy") -> Components:
    """Fit the adder, multiplier and FP overhead factors to a table's entries at its node.

    With entries at two or more widths the adder (slope, offset) and multiplier (partial-product,
    operand) pairs are both fitted; with a single width only the scale of the reference shape is.
    `quantity="area"` fits the same structure to the entries' `area_um2` (every calibration entry must
    have one) with the area weights of the unlisted primitives.
    """
    if quantity == "area":
        weights = weights.for_area()
        for op in CALIBRATION_OPS:
            for index, entry in table.of(op):
                if entry.area_um2 is None or entry.area_um2 <= 0:
                    raise InputError(f"{table.where(index)}: {op} entry needs a positive area_um2 "
                                     "(area is calibrated on every calibration entry)")
    field_name = "area_um2" if quantity == "area" else "energy_pj"
    unit = "um^2" if quantity == "area" else "pJ"
    node = table.source.node_nm
    if node is None:
        raise InputError(f"{table.path}:1: a calibration table needs source.node_nm")
    present = {e.op for e in table.entries}
    for op in CALIBRATION_OPS:
        if op not in present:
            has = ", ".join(sorted(present & set(CALIBRATION_OPS))) or "none"
            raise InputError(f"{table.path}:1: missing entry: a calibration table needs at least one "
                             f"{op!r} entry (has: {has})")

    def points(op: str) -> list:
        found = table.of(op)
        if len({getattr(e, "latency_ns", None) for _, e in found}) > 1:
            raise InputError(f"{table.where(found[0][0])}: calibration {op} entries mix timing targets "
                             "(latency_ns); keep one")
        return [_Point(e, getattr(e, field_name)) for _, e in found]

    adds = points("int_add")
    widths = np.array([e.bits for e in adds], dtype=float)
    energy = np.array([e.value for e in adds])
    if len(set(widths)) >= 2:
        slope, offset = _relative_lstsq([widths, np.ones_like(widths)], energy)
        if offset < 0:  # superlinear data: keep the adder through the origin
            (slope,), offset = _relative_lstsq([widths], energy), 0.0
    else:
        ratio = reference.adder_offset / reference.adder_per_bit if reference else 0.0
        (slope,) = _relative_lstsq([widths + ratio], energy)
        offset = slope * ratio
    mults = points("int_mul")
    widths = np.array([e.bits for e in mults], dtype=float)
    energy = np.array([e.value for e in mults])
    if len(set(widths)) >= 2:
        pp, edge = _relative_lstsq([widths**2, 2 * widths], energy)
        if edge < 0:  # steeper than quadratic: a pure partial-product model
            (pp,), edge = _relative_lstsq([widths**2], energy), 0.0
    else:
        ratio = reference.mult_per_operand_bit / reference.mult_per_pp_bit if reference else 0.0
        (pp,) = _relative_lstsq([widths**2 + ratio * 2 * widths], energy)
        edge = pp * ratio
    if slope <= 0 or pp <= 0:
        raise InputError(f"{table.path}:1: integer add/mult entries do not fit an increasing width model "
                         f"(adder slope {slope:.3g}, multiplier {pp:.3g})")
    base = Components(float(slope), float(offset), float(pp), float(edge), 0.0, 1.0, weights, node, unit)

    fmuls = points("fp_mul")
    parts = [base.fp_mul_parts(e.exp_bits, e.man_bits + 1) for e in fmuls]
    target = np.array([e.value for e in fmuls])
    core = np.array([c for c, _ in parts])
    overhead = np.array([o for _, o in parts])
    eta_mul = float(np.sum(overhead * (target - core) / target**2) / np.sum((overhead / target) ** 2))
    fadds = points("fp_add")
    structure = np.array([base.fp_add_structure(e.exp_bits, e.man_bits) for e in fadds])
    (eta_add,) = _relative_lstsq([structure], np.array([e.value for e in fadds]))
    if eta_mul < 0 or eta_add <= 0:
        raise InputError(f"{table.path}:1: FP entries are below the integer parts of the model "
                         f"(fp_mul eta {eta_mul:.3g}, fp_add eta {eta_add:.3g})")
    return replace(base, fp_mul_eta=eta_mul, fp_add_eta=float(eta_add))


@dataclass(frozen=True)
class _Point:
    """A calibration entry and the value being fitted (its energy or its area)."""

    entry: object
    value: float

    def __getattr__(self, name: str) -> object:
        return getattr(self.entry, name)


def model_energy(components: Components, entry: Any) -> float | None:
    """The model's value for a table entry of a calibrated op (None for other ops)."""
    op = getattr(entry, "op", None)
    if op == "int_add":
        return components.adder(entry.bits)
    if op == "int_mul":
        return components.multiplier(entry.bits, entry.bits)
    if op == "fp_add":
        return components.fp_add(entry.exp_bits, entry.man_bits)
    if op == "fp_mul":
        return components.fp_mul(entry.exp_bits, entry.man_bits)
    return None
