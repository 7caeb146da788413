"""Each number format's dot-product datapath, built from the primitive units of `components.py`.

Products are exact and go straight into the accumulation (fused: normalisation and rounding are paid
once, where they happen). A dot-product unit of vector length K sums K products as integers after
aligning them to their largest exponent and normalises once per K; K = 1 is a scalar fused MAC. A
datapath costs `per_product` energy for every MAC, `per_group` once per K products and `per_output`
once per dot product, each split into multiply, conversion and accumulation.

Each family has one hardware description (a `FamilyHardware`: how to read its formats, its operands'
widths, its dot-product unit and accumulators, how it converts into other units, unpacks and packs its
values), registered by family name as formats are; nothing else in the model asks which family an
operand is. A format is read through `EnergyFormat` (family, bits, spec) and its family's own fields
(`FloatFields`, `PositFields`, `LogFields`, `BlockFields`), never through its spec string.
`conversion_energy` prices turning one representation into another (an accumulator into the storage
format of the output, a weight gradient into the optimizer's format, ...), by unpacking to
sign/exponent/significand and packing again.
"""

from __future__ import annotations

import functools
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, cast

from dse.energy.components import Components, clog2
from dse.errors import InputError, SettingError, about


@dataclass(frozen=True)
class UnitEnergy:
    """Energy split by unit, in pJ."""

    multiply_pj: float = 0.0
    conversion_pj: float = 0.0
    accumulation_pj: float = 0.0

    def __add__(self, other: UnitEnergy) -> UnitEnergy:
        return UnitEnergy(self.multiply_pj + other.multiply_pj, self.conversion_pj + other.conversion_pj,
                          self.accumulation_pj + other.accumulation_pj)

    def __mul__(self, factor: float) -> UnitEnergy:
        return UnitEnergy(self.multiply_pj * factor, self.conversion_pj * factor,
                          self.accumulation_pj * factor)

    __rmul__ = __mul__

    @property
    def total_pj(self) -> float:
        return self.multiply_pj + self.conversion_pj + self.accumulation_pj


# --- what the model reads of a format -------------------------------------------------------------

class EnergyFormat(Protocol):
    """What the energy model reads of every number format (dse.formats' formats have it): `family`
    picks the hardware description, which reads the fields of its own protocol below."""

    @property
    def family(self) -> str: ...

    @property
    def bits(self) -> int: ...

    @property
    def spec(self) -> str: ...


class FloatFields(EnergyFormat, Protocol):
    """An FP format (sign, exponent, mantissa), P3109's included."""

    @property
    def exp_bits(self) -> int: ...

    @property
    def man_bits(self) -> int: ...


class PositFields(EnergyFormat, Protocol):
    @property
    def es(self) -> int: ...


class LogFields(EnergyFormat, Protocol):
    """A logarithmic format: values are sign * 2^(code / gamma)."""

    @property
    def gamma(self) -> float: ...


class BlockFields(EnergyFormat, Protocol):
    """`block_size` elements of an element format share a scale of `scale_bits` bits (on an FP grid,
    `scale_grid`, or E8M0's powers of two when None), with an optional per-tensor fp32 scale."""

    @property
    def element(self) -> EnergyFormat: ...

    @property
    def block_size(self) -> int: ...

    @property
    def scale_bits(self) -> int: ...

    @property
    def scale_grid(self) -> FloatFields | None: ...

    @property
    def tensor_scale(self) -> bool: ...


@functools.cache
def _field_names(fields: type) -> tuple[str, ...]:
    return tuple(name for name in dir(fields) if not name.startswith("_"))


def check_fields(fmt: EnergyFormat, fields: type, spec: str) -> None:
    """A one-line InputError unless `fmt` has every field of the protocol `fields` its family's hardware
    reads (checked by name, as a runtime protocol would, at a fraction of isinstance's cost)."""
    missing = [name for name in _field_names(fields) if not hasattr(fmt, name)]
    if missing:
        raise InputError(f"format {spec!r} of family {fmt.family!r} has no {', '.join(missing)} "
                         "for the energy model")


@dataclass(frozen=True)
class Operand:
    """A format as the energy model sees it: its hardware family and the fields that hardware reads
    (those of other families stay 0). Its widths come from its family's description."""

    family: str
    bits: int
    exp_bits: int = 0
    man_bits: int = 0
    es: int = 0
    log_frac_bits: int = 0
    element: Operand | None = None
    block_size: int = 0
    scale_bits: int = 0
    scale_exp_bits: int = 0
    """Exponent and mantissa bits of an FP block-scale grid (E4M3: 4, 3); 0, 0 for E8M0's powers of two."""
    scale_man_bits: int = 0
    tensor_scale: bool = False
    """A second, per-tensor fp32 scale (NVFP4)."""
    spec: str = ""

    @functools.cached_property
    def hardware(self) -> FamilyHardware:
        return hardware(self.family)

    @property
    def sig_bits(self) -> int:
        """Significand bits including the hidden one (posit: at its most precise)."""
        return self.hardware.sig_bits(self)

    @property
    def exact_product_bits(self) -> int:
        """Bits that hold every product of two such values exactly."""
        return self.hardware.exact_product_bits(self)

    @property
    def key(self) -> tuple[Any, ...]:
        """Everything but the spec string: two operands with the same key are the same format."""
        element = self.element.key if self.element is not None else None
        return (self.family, self.bits, self.exp_bits, self.man_bits, self.es, self.log_frac_bits, element,
                self.block_size, self.scale_bits, self.scale_exp_bits, self.scale_man_bits, self.tensor_scale)

    @property
    def storage_bits(self) -> float:
        """Bits per element in memory, including a share of any block scale."""
        return self.hardware.storage_bits(self)


FP32 = Operand("fp", 32, exp_bits=8, man_bits=23, spec="fp32")


# --- rounding -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rounding:
    """How a value is rounded into a format: the mode, and for stochastic rounding its random bits.

    `random_bits` None means one random bit per discarded bit (dse's own stochastic rounding draws a
    full-precision uniform number); `stochastic(k)` fixes k.
    """

    mode: str = "nearest"
    random_bits: int | None = None

    @classmethod
    def parse(cls, spec: str | Rounding | None) -> Rounding:
        if spec is None:
            return cls()
        if isinstance(spec, Rounding):
            return spec
        from dse.formats.base import check_rounding, parse_rounding  # the zoo's own rounding vocabulary

        mode, bits = parse_rounding(check_rounding(spec))
        return cls(mode, bits)

    def energy(self, c: Components, kept_bits: int, dropped_bits: int) -> float:
        """Deciding the last kept bit and applying it; stochastic rounding pays for its random bits
        (a leap-forward LFSR: one flop and one feedback gate per bit) and their addition to the dropped
        bits."""
        dropped = max(dropped_bits, 0)
        if dropped == 0:
            return 0.0
        if self.mode == "toward_zero":
            return 0.0
        if self.mode == "nearest":  # round bit, sticky OR of the rest, increment
            return c.gates(dropped) + c.incrementer(kept_bits)
        if self.mode == "pseudo_stochastic":  # NITI: top half of the dropped bits vs the bottom half
            return c.comparator(max(dropped // 2, 1)) + c.incrementer(kept_bits)
        k = self.random_bits if self.random_bits is not None else dropped
        return c.register(k) + c.gates(k) + c.adder(min(k, dropped)) + c.incrementer(kept_bits)


# --- parameters ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatapathParams:
    """Datapath choices that can change a ranking; defaults are documented in docs/energy-model.md."""

    accumulator: str | None = None
    """Accumulator spec; None uses the family's default accumulator."""
    vector_length: int = 16
    """K of the dot-product unit: K products are summed exactly (aligned to their largest exponent, added
    as integers) and normalised/accumulated once per K. 1 is a scalar fused MAC."""
    lns_datapath: Literal["madam", "direct"] = "madam"
    """LNS: 'madam' sums per-remainder partial sums and applies 2^(r/gamma) once per K products;
    'direct' converts every product (LUT/Mitchell, then shift) into one integer accumulator."""
    lns_mitchell_bits: int = 0
    """LNS: low remainder bits approximated by Mitchell's 2^x ~ 1 + x instead of a LUT/bucket."""
    lns_lut_bits: int | None = None
    """LNS: width of the 2^(r/gamma) constants; None means log2(gamma) + 3."""
    alignment_bits: int | None = None
    """Width products are aligned to in a dot-product unit with FP products. None: MX blocks sum their
    products exactly (the exact dot-product design of Desrentes et al. 2023); other FP dot-product units
    keep the accumulator's significand plus 3 bits (capped at the exact width)."""
    posit_decode_reuse: float = 1.0
    """Posit: products that share one decoded operand (1 = decode both operands at every MAC)."""
    lns_conversion_length: int | None = None
    """LNS-Madam: products summed into the per-remainder partial sums before their constant multiplies (a
    multiple of K; None: K, one conversion per dot-product group and no partial-sum registers). The
    patent converts once per dot product: set it to the reduction a PE covers before its outputs leave."""

    def __post_init__(self) -> None:
        def bad(setting: str, problem: str) -> SettingError:
            return SettingError(setting, f"{setting} {problem}")

        if self.accumulator is not None and not is_named_accumulator(self.accumulator):
            with about("accumulator"):  # whether an accumulator fits the operands is checked per GEMM
                parse_accumulator(self.accumulator, FP32)
        if self.lns_datapath not in ("madam", "direct"):
            raise bad("lns_datapath", f"must be 'madam' or 'direct', got {self.lns_datapath!r}")
        if isinstance(self.vector_length, bool) or not isinstance(self.vector_length, int) \
                or self.vector_length < 1:
            raise bad("vector_length", f"must be an integer >= 1, got {self.vector_length!r}")
        if self.lns_mitchell_bits < 0:
            raise bad("lns_mitchell_bits", "must be >= 0")
        if self.alignment_bits is not None and not 4 <= self.alignment_bits <= 256:
            raise bad("alignment_bits", "must be in 4..256")
        if self.lns_lut_bits is not None and not 1 <= self.lns_lut_bits <= 32:
            raise bad("lns_lut_bits", "must be in 1..32")
        if not self.posit_decode_reuse >= 1:
            raise bad("posit_decode_reuse", "must be >= 1")
        if self.lns_conversion_length is not None and (
                self.lns_conversion_length < self.vector_length
                or self.lns_conversion_length % self.vector_length):
            raise bad("lns_conversion_length", f"must be a multiple of vector_length "
                      f"({self.vector_length}), got {self.lns_conversion_length!r}")


@dataclass(frozen=True)
class Datapath:
    """One format pair's dot-product unit.

    Energies: `per_product` for every multiply-accumulate, `per_group` once per `group_size` products
    of one dot product (normalisation, accumulation into the accumulator, LNS conversion), `per_output`
    once per dot product. `a_convert_pj` / `b_convert_pj`: per element of an operand converted before it
    enters the unit (the int operand of an int x fp GEMM). Called with area components the same
    description gives the unit's area: `lanes` (default `group_size`) product lanes plus one group and one
    output stage.
    """

    name: str
    accumulator: Accumulator
    per_product: UnitEnergy
    per_group: UnitEnergy = field(default_factory=UnitEnergy)
    group_size: int = 1
    per_output: UnitEnergy = field(default_factory=UnitEnergy)
    a_convert_pj: float = 0.0
    b_convert_pj: float = 0.0
    lanes: int = 0
    """Product lanes of the unit when a group spans several cycles of it (LNS-Madam converting its partial
    sums every few K products); 0: `group_size` lanes."""

    def groups_per_output(self, reduction_length: float) -> float:
        return math.ceil(reduction_length / self.group_size)

    def per_mac(self, reduction_length: float) -> UnitEnergy:
        """Energy per MAC for dot products of length L: group work once per ceil(L / K), output work once."""
        if not reduction_length >= 1:
            raise InputError(f"reduction length must be >= 1, got {reduction_length}")
        groups = self.groups_per_output(reduction_length)
        return (self.per_product + self.per_group * (groups / reduction_length)
                + self.per_output * (1.0 / reduction_length))

    @property
    def unit_total(self) -> float:
        """As an area: the whole unit (every lane, one group stage, one output stage)."""
        lanes = (self.lanes or self.group_size) * self.per_product.total_pj
        return lanes + self.per_group.total_pj + self.per_output.total_pj


# --- the shared building blocks --------------------------------------------------------------------

def posit_decode(c: Components, bits: int, es: int) -> float:
    """Two's complement, leading-zero/one count of the regime, regime shift, scale assembly."""
    return (c.gates(bits) + c.incrementer(bits) + c.lzc(bits - 1)
            + c.shifter(bits - 1, bits - 1, clog2(bits - 1)) + c.adder(clog2(bits) + es + 1))


def posit_encode(c: Components, bits: int, es: int) -> float:
    """Regime/exponent shift into place, round, two's complement."""
    return c.shifter(bits - 1, bits - 1, clog2(bits - 1)) + 2 * c.incrementer(bits) + c.gates(bits)


def _product_core(c: Components, a_sig: int, b_sig: int, exp_bits: int) -> float:
    """The exact product: significand array, exponent add, sign."""
    if exp_bits <= 0:
        return c.multiplier(a_sig, b_sig)
    return c.multiplier(a_sig, b_sig) + c.adder(exp_bits + 1) + c.gates(1)


def _accumulate_int(c: Components, acc: Accumulator, product_bits: int, exp_bits: int,
                    k: int) -> tuple[UnitEnergy, UnitEnergy]:
    """(per product, per group) of summing products into an integer accumulator (Kulisch/quire for FP).

    FP products are shifted into fixed point first. K = 1 adds every product into the register; K > 1
    adds K products in a tree and the tree's sum into the register once.
    """
    shift = 0.0
    width = product_bits
    if exp_bits > 0:
        stages = min(clog2(acc.bits), exp_bits + 1)
        shift = c.shifter(product_bits, acc.bits, stages) + c.gates(product_bits)
        width = acc.bits
    into = c.adder(acc.bits) + c.register(acc.bits)
    if k == 1:
        return UnitEnergy(0.0, shift, into), UnitEnergy()
    tree = c.adder(min(width + clog2(k), acc.bits))  # a K-input tree: K - 1 adders, about one per product
    return UnitEnergy(0.0, shift, tree), UnitEnergy(0.0, 0.0, into)


def _accumulate_fp(c: Components, acc: Accumulator, product_bits: int, exp_bits: int, k: int,
                   align_bits: int) -> tuple[UnitEnergy, UnitEnergy]:
    """(per product, per group) of summing exact products into an FP accumulator.

    K = 1 is a fused multiply-add: the unrounded product (product_bits) is aligned to the accumulator,
    added, normalised and rounded once. K > 1 is a dot-product unit: the K products' exponents meet in a
    max tree, each product is shifted to `align_bits` below the largest, an integer tree adds them, and
    the sum is normalised and added into the accumulator once.
    """
    acc_exp, acc_man = acc.exp_bits, acc.man_bits
    if k == 1:
        fused = c.fp_add(acc_exp, acc_man, product_bits) + c.register(acc.bits)
        convert = c.lzc(product_bits) if exp_bits <= 0 else 0.0  # an integer product is normalised first
        return UnitEnergy(0.0, convert, fused), UnitEnergy()
    tree_bits = align_bits + clog2(k)
    if exp_bits > 0:
        align = (c.comparator(exp_bits + 1) + c.adder(exp_bits + 1)
                 + c.shifter(product_bits, align_bits, clog2(align_bits)) + c.gates(product_bits))
    else:
        align = 0.0
    per_product = UnitEnergy(0.0, align, c.adder(tree_bits))
    normalise = c.lzc(tree_bits) + c.shifter(tree_bits, acc_man + 4, clog2(tree_bits))
    per_group = UnitEnergy(0.0, normalise, c.fp_add(acc_exp, acc_man) + c.register(acc.bits))
    return per_product, per_group


def _accumulate_posit(c: Components, acc: Accumulator, product_bits: int, k: int,
                      align_bits: int) -> tuple[UnitEnergy, UnitEnergy]:
    """A posit running sum: decoded and re-encoded around every FP-style addition into it."""
    acc_op = acc.as_operand()
    as_fp = Accumulator("fp", acc.bits, exp_bits=PositHardware.scale_range_bits(acc_op),
                        man_bits=acc_op.sig_bits - 1)
    per_product, per_group = _accumulate_fp(c, as_fp, product_bits, 1, k, align_bits)
    recode = UnitEnergy(0.0, posit_decode(c, acc.bits, acc.es) + posit_encode(c, acc.bits, acc.es))
    if k == 1:
        return per_product + recode, per_group
    return per_product, per_group + recode


def _significand_datapath(c: Components, name: str, a: Operand, b: Operand, acc: Accumulator,
                          params: DatapathParams, exp_bits: int, k: int, align_default: int,
                          extra_product: UnitEnergy | None = None,
                          extra_group: UnitEnergy | None = None) -> Datapath:
    """Any datapath whose products are (sign, exponent, integer significand): int, fp, posit, MX."""
    a_sig, b_sig = a.sig_bits, b.sig_bits
    product_bits = a_sig + b_sig
    multiply = UnitEnergy(multiply_pj=_product_core(c, a_sig, b_sig, exp_bits))
    align = params.alignment_bits if params.alignment_bits is not None else align_default
    per_product, per_group = acc.hardware.accumulate(c, acc, product_bits, exp_bits, k, align)
    per_product = multiply + per_product + (extra_product or UnitEnergy())
    per_group = per_group + (extra_group or UnitEnergy())
    return Datapath(name, acc, per_product, per_group, k)


def _fp_align_default(a: Operand, b: Operand, acc: Accumulator) -> int:
    """Tensor-core style: keep the accumulator's significand plus guard bits, never more than exact."""
    exact = max(a.exact_product_bits, b.exact_product_bits)
    keep = acc.hardware.aligned_bits(acc)
    return max(min(exact, keep), a.sig_bits + b.sig_bits)


# --- one hardware description per family ------------------------------------------------------------

class FamilyHardware(ABC):
    """The hardware of one number-format family: everything the energy model needs to know of it.

    Register a new family with `register_family`. `family` names the hardware (the Operand's family):
    several format families may share one (P3109 formats are FP(e, m) hardware), and `unit` names the
    dot-product unit operands of several families share (integers and fixed point). `operand` reads a
    format into an Operand; `datapath` builds the dot-product unit of two operands of this unit;
    `unpack` is the energy to reach sign / exponent / normalised significand (and that significand's
    width); `pack` the energy to round such a significand into the format. Energies are pJ (um^2 when
    given area components). The defaults fit a plain integer-like code; a description that sets
    `converts_into` gives `converted`.
    """

    family: str
    default_accumulator: str
    named_accumulators: Mapping[str, Callable[[Operand], Accumulator]] = {}
    """Accumulators named for this family's operands alone (posit: the quire)."""
    in_place_optimizer: str | None = None
    """The optimizer that updates weights of this family in their own format, keeping no master copy
    unless asked (LNS: Madam adds to the log code); it is also the default optimizer for them."""
    converts_into: str | None = None
    """The unit an operand converts into exactly as it enters an operand of that unit (int: fp)."""

    @property
    def unit(self) -> str:
        return self.family

    @abstractmethod
    def operand(self, fmt: EnergyFormat, spec: str) -> Operand: ...

    @abstractmethod
    def datapath(self, c: Components, a: Operand, b: Operand, acc: Accumulator,
                 params: DatapathParams) -> Datapath: ...

    @abstractmethod
    def unpack(self, c: Components, src: Operand, params: DatapathParams) -> tuple[float, int]: ...

    @abstractmethod
    def pack(self, c: Components, dst: Operand, sig_bits: int, params: DatapathParams,
             rounding: Rounding) -> float: ...

    def sig_bits(self, op: Operand) -> int:
        return op.bits

    def storage_bits(self, op: Operand) -> float:
        return float(op.bits)

    def exact_product_bits(self, op: Operand) -> int:
        raise InputError(f"{op.spec!r}: {self.family} products have no exact fixed-point width here")

    def block_products(self, a: Operand, b: Operand) -> tuple[int, int]:
        """As block elements: (exponent bits of a product, bits the block's exact sum is aligned to)."""
        raise InputError(f"block-scaled operands with {self.family} elements ({a.spec!r}, {b.spec!r}) "
                         "have no block datapath here")

    def as_accumulator(self, op: Operand, spec: str) -> Accumulator:
        raise InputError(f"accumulator {spec!r}: must be an integer width, an fp or posit format, or 'quire'")

    def converted(self, op: Operand) -> Operand:
        """The operand of unit `converts_into` this one converts into exactly."""
        raise NotImplementedError

    def left_per_output(self, c: Components, op: Operand) -> UnitEnergy:
        """What converting an operand into another unit leaves to apply once per output of its GEMM."""
        return UnitEnergy()

    def across_blocks(self, op: Operand) -> Operand:
        """The operand a GEMM that reduces across this format's scale blocks converts it into as it
        enters the unit (formats without blocks: itself)."""
        return op

    def requantize(self, c: Components, src: Operand, dst: Operand, rounding: Rounding) -> float | None:
        """Converting between two formats of this unit without unpacking; None: unpack and pack."""
        return None

    def update_units(self, c: Components, op: Operand) -> tuple[float, float]:
        """A multiply and an add in this format's arithmetic (the optimizer's)."""
        return c.multiplier(op.bits, op.bits), c.adder(op.bits)

    def accumulate(self, c: Components, acc: Accumulator, product_bits: int, exp_bits: int, k: int,
                   align_bits: int) -> tuple[UnitEnergy, UnitEnergy]:
        """(per product, per group of k) of summing products of `product_bits` significand bits and
        `exp_bits` exponent bits into an accumulator of this family, aligned to `align_bits` in a group."""
        raise InputError(f"accumulator {acc.spec!r}: {self.family} accumulators are not modelled")

    def aligned_bits(self, acc: Accumulator) -> int:
        """Bits an FP dot-product unit keeps of products aligned before this accumulator (its width)."""
        return acc.bits


class IntHardware(FamilyHardware):
    """Integers and fixed point (the same hardware: a fixed point's scale is a shift outside the unit)."""

    default_accumulator = "int32"
    converts_into = "fp"

    def __init__(self, family: str = "int") -> None:
        self.family = family

    @property
    def unit(self) -> str:
        return "int"

    def operand(self, fmt: EnergyFormat, spec: str) -> Operand:
        return Operand(self.family, int(fmt.bits), spec=spec)

    def datapath(self, c: Components, a: Operand, b: Operand, acc: Accumulator,
                 params: DatapathParams) -> Datapath:
        return _significand_datapath(c, "int", a, b, acc, params, 0, params.vector_length, a.bits + b.bits)

    def unpack(self, c: Components, src: Operand, params: DatapathParams) -> tuple[float, int]:
        return c.lzc(src.bits) + c.shifter(src.bits, src.bits, clog2(src.bits)), src.bits

    def pack(self, c: Components, dst: Operand, sig_bits: int, params: DatapathParams,
             rounding: Rounding) -> float:
        return (c.shifter(sig_bits, dst.bits, clog2(max(sig_bits, dst.bits))) + c.comparator(dst.bits)
                + rounding.energy(c, dst.bits, max(sig_bits - dst.bits, 1)))

    def exact_product_bits(self, op: Operand) -> int:
        return 2 * op.bits

    def block_products(self, a: Operand, b: Operand) -> tuple[int, int]:
        return 0, a.bits + b.bits

    def accumulate(self, c: Components, acc: Accumulator, product_bits: int, exp_bits: int, k: int,
                   align_bits: int) -> tuple[UnitEnergy, UnitEnergy]:
        return _accumulate_int(c, acc, product_bits, exp_bits, k)

    def as_accumulator(self, op: Operand, spec: str) -> Accumulator:
        return Accumulator("int", op.bits, spec=spec)

    def converted(self, op: Operand) -> Operand:
        """The FP operand an integer converts to exactly (sign-magnitude significand, exponent for its
        shift)."""
        return Operand("fp", op.bits + clog2(op.bits) + 1, exp_bits=clog2(op.bits) + 1, man_bits=op.bits - 2,
                       spec=f"{op.spec} as fp")

    def requantize(self, c: Components, src: Operand, dst: Operand, rounding: Rounding) -> float | None:
        """Shift by the (power-of-two) scale, round, saturate; no normalisation."""
        if src.bits == dst.bits:
            return 0.0
        return (c.shifter(src.bits, dst.bits, clog2(src.bits)) + c.comparator(dst.bits)
                + rounding.energy(c, dst.bits, max(src.bits - dst.bits, 1)))


class FpHardware(FamilyHardware):
    family = "fp"
    default_accumulator = "fp32"

    def operand(self, fmt: EnergyFormat, spec: str) -> Operand:
        check_fields(fmt, FloatFields, spec)
        fp = cast(FloatFields, fmt)
        return Operand(self.family, int(fp.bits), exp_bits=int(fp.exp_bits), man_bits=int(fp.man_bits),
                       spec=spec)

    def datapath(self, c: Components, a: Operand, b: Operand, acc: Accumulator,
                 params: DatapathParams) -> Datapath:
        exp_bits = max(a.exp_bits, b.exp_bits)
        return _significand_datapath(c, "fp", a, b, acc, params, exp_bits, params.vector_length,
                                     _fp_align_default(a, b, acc))

    def unpack(self, c: Components, src: Operand, params: DatapathParams) -> tuple[float, int]:
        return 0.0, src.sig_bits

    def pack(self, c: Components, dst: Operand, sig_bits: int, params: DatapathParams,
             rounding: Rounding) -> float:
        return (c.adder(dst.exp_bits + 1) + c.comparator(dst.exp_bits + 1)
                + rounding.energy(c, dst.sig_bits, sig_bits - dst.sig_bits))

    def sig_bits(self, op: Operand) -> int:
        return op.man_bits + 1

    def exact_product_bits(self, op: Operand) -> int:
        """From the smallest subnormal product to the largest normal one."""
        bias = (1 << (op.exp_bits - 1)) - 1
        e_max = (1 << op.exp_bits) - 2 - bias
        e_min = 1 - bias
        return 2 * (e_max - e_min + 1 + op.man_bits)

    def block_products(self, a: Operand, b: Operand) -> tuple[int, int]:
        return max(a.exp_bits, b.exp_bits), max(a.exact_product_bits, b.exact_product_bits)

    def accumulate(self, c: Components, acc: Accumulator, product_bits: int, exp_bits: int, k: int,
                   align_bits: int) -> tuple[UnitEnergy, UnitEnergy]:
        return _accumulate_fp(c, acc, product_bits, exp_bits, k, align_bits)

    def aligned_bits(self, acc: Accumulator) -> int:
        """The accumulator's significand plus guard, round and sticky bits."""
        return acc.man_bits + 1 + 3

    def as_accumulator(self, op: Operand, spec: str) -> Accumulator:
        return Accumulator("fp", op.bits, exp_bits=op.exp_bits, man_bits=op.man_bits, spec=spec)

    def update_units(self, c: Components, op: Operand) -> tuple[float, float]:
        return c.fp_mul(op.exp_bits, op.man_bits), c.fp_add(op.exp_bits, op.man_bits)


class PositHardware(FamilyHardware):
    family = "posit"
    default_accumulator = "fp32"
    named_accumulators = {"quire": lambda op: Accumulator("int", 16 * op.bits, spec="quire")}
    """The quire: a 16n-bit integer (Posit Standard 2022)."""

    def operand(self, fmt: EnergyFormat, spec: str) -> Operand:
        check_fields(fmt, PositFields, spec)
        posit = cast(PositFields, fmt)
        return Operand(self.family, int(posit.bits), es=int(posit.es), spec=spec)

    @staticmethod
    def scale_range_bits(op: Operand) -> int:
        """Bits of the scale a product of two such posits needs."""
        return op.es + clog2(2 * (op.bits - 1))

    def datapath(self, c: Components, a: Operand, b: Operand, acc: Accumulator,
                 params: DatapathParams) -> Datapath:
        decode = (posit_decode(c, a.bits, a.es) + posit_decode(c, b.bits, b.es)) / params.posit_decode_reuse
        exp_bits = max(self.scale_range_bits(a), self.scale_range_bits(b))
        return _significand_datapath(c, "posit", a, b, acc, params, exp_bits, params.vector_length,
                                     _fp_align_default(a, b, acc), extra_product=UnitEnergy(0.0, decode))

    def unpack(self, c: Components, src: Operand, params: DatapathParams) -> tuple[float, int]:
        return posit_decode(c, src.bits, src.es), src.sig_bits

    def pack(self, c: Components, dst: Operand, sig_bits: int, params: DatapathParams,
             rounding: Rounding) -> float:
        return posit_encode(c, dst.bits, dst.es) + rounding.energy(c, 0, sig_bits - dst.sig_bits)

    def sig_bits(self, op: Operand) -> int:
        return max(op.bits - 2 - op.es, 1)

    def exact_product_bits(self, op: Operand) -> int:
        return 4 * (op.bits - 2) * (1 << op.es) + 2

    def as_accumulator(self, op: Operand, spec: str) -> Accumulator:
        return Accumulator("posit", op.bits, es=op.es, spec=spec)

    def accumulate(self, c: Components, acc: Accumulator, product_bits: int, exp_bits: int, k: int,
                   align_bits: int) -> tuple[UnitEnergy, UnitEnergy]:
        return _accumulate_posit(c, acc, product_bits, k, align_bits)


def csd_nonzero_digits(value: int) -> int:
    """Non-zero digits of `value` in canonical signed-digit form (non-adjacent form)."""
    digits = 0
    while value:
        if value & 1:
            value -= 2 - (value & 3)  # digit +1 or -1, whichever leaves the next bit zero
            digits += 1
        value >>= 1
    return digits


def lns_constant_adders(buckets: int, lut_bits: int) -> int:
    """Adders that multiply `buckets` partial sums by their constants 2^(r/buckets), r = 0..buckets-1, each
    rounded to `lut_bits` bits (shift-and-add: one adder per non-zero CSD digit beyond the first; r = 0
    is a wire)."""
    scale = 1 << (lut_bits - 1)
    return sum(csd_nonzero_digits(round(scale * 2 ** (r / buckets))) - 1 for r in range(1, buckets))


class LnsHardware(FamilyHardware):
    family = "lns"
    default_accumulator = "int24"
    in_place_optimizer = "madam"

    def operand(self, fmt: EnergyFormat, spec: str) -> Operand:
        check_fields(fmt, LogFields, spec)
        gamma = float(cast(LogFields, fmt).gamma)
        frac = math.log2(gamma) if gamma >= 1 else -1.0
        if frac < 0 or frac != int(frac):
            raise InputError(f"format {spec!r}: gamma must be a power of two >= 1 for the energy model")
        return Operand(self.family, int(fmt.bits), log_frac_bits=int(frac), spec=spec)

    @staticmethod
    def lut_bits(fmt: Operand, params: DatapathParams) -> int:
        return params.lns_lut_bits if params.lns_lut_bits is not None else fmt.log_frac_bits + 3

    @staticmethod
    def mitchell_bits(fmt: Operand, params: DatapathParams) -> int:
        return min(params.lns_mitchell_bits, fmt.log_frac_bits)

    def datapath(self, c: Components, a: Operand, b: Operand, acc: Accumulator,
                 params: DatapathParams) -> Datapath:
        if not isinstance(acc.hardware, IntHardware):
            raise InputError(f"LNS products are summed in an integer accumulator, not {acc.spec!r}")
        k = params.vector_length
        frac = max(a.log_frac_bits, b.log_frac_bits)
        code_bits = max(a.bits, b.bits) - 1 + abs(a.log_frac_bits - b.log_frac_bits)
        fmt = a if a.log_frac_bits >= b.log_frac_bits else b
        width = acc.bits
        quotient_bits = code_bits + 1 - frac  # integer part of the product code: the shift amount
        lut_bits = self.lut_bits(fmt, params)
        mitchell = self.mitchell_bits(fmt, params)
        multiply = c.adder(code_bits) + c.gates(2)  # integer add of the log codes, sign XOR, zero flag
        if params.lns_datapath == "direct":
            if mitchell >= frac:  # 2^(r/gamma) ~ 1 + r/gamma: the remainder bits are the fraction
                value_bits, lookup = frac + 1, 0.0
            else:
                value_bits, lookup = lut_bits, c.lut(2 ** (frac - mitchell), lut_bits)
                if mitchell:
                    lookup += c.multiplier(lut_bits, mitchell + 1)
            convert = lookup + c.shifter(value_bits, width, quotient_bits) + c.gates(value_bits)
            per_product, per_group = _accumulate_int(c, acc, width, 0, k)
            return Datapath("lns-direct", acc, UnitEnergy(multiply, convert) + per_product, per_group, k)
        # LNS-Madam: route each product to one of 2^(frac - mitchell) partial sums by its remainder, adding
        # 1 << quotient there; every `conversion_length` products multiply each partial sum by its constant
        # 2^(r/gamma), add them up and add the result into the output accumulator.
        buckets = 2 ** (frac - mitchell)
        period = params.lns_conversion_length or k
        if mitchell:  # the Mitchell bits make the addend (1 + r_lsb/gamma) << q: a shifter, a full adder
            route = c.gates(buckets) + c.shifter(mitchell + 1, width, quotient_bits)
            add_one = c.adder(width)
        else:  # a decoder makes the one-hot 1 << q
            route = c.gates(buckets) + c.gates(width)
            add_one = c.incrementer(width) + c.gates(width)
        state = 0.0
        if k == 1:  # scalar: each product adds into its partial-sum register, as a scalar INT MAC into its
            accumulate = add_one + c.register(width)  # accumulator
            state = buckets * c.register(width)  # the partial sums are cleared after each conversion
        else:  # K lanes feed per-remainder adder trees: about one adder per product, as the INT unit's tree
            accumulate = c.adder(width)
            if period > k:  # the trees' sums are kept in partial-sum registers between conversions
                accumulate += buckets * (c.adder(width) + c.register(width)) / k
                state = buckets * c.register(width)
        per_product = UnitEnergy(multiply, route, accumulate)
        scaled_bits = width + lut_bits
        constants = lns_constant_adders(buckets, lut_bits) * c.adder(scaled_bits)
        per_conversion = UnitEnergy(0.0, constants, (buckets - 1) * c.adder(scaled_bits) + state
                                    + c.adder(scaled_bits) + c.register(scaled_bits))
        output_acc = Accumulator("int", scaled_bits, spec=acc.spec)
        return Datapath("lns-madam", output_acc, per_product, per_conversion, period, lanes=k)

    def unpack(self, c: Components, src: Operand, params: DatapathParams) -> tuple[float, int]:
        lut_bits = self.lut_bits(src, params)
        if self.mitchell_bits(src, params) >= src.log_frac_bits:
            return 0.0, src.log_frac_bits + 1
        return c.lut(2 ** src.log_frac_bits, lut_bits), lut_bits

    def pack(self, c: Components, dst: Operand, sig_bits: int, params: DatapathParams,
             rounding: Rounding) -> float:
        frac = dst.log_frac_bits
        exact = frac - self.mitchell_bits(dst, params)
        # the log of the significand: compare with the midpoints of the 2^(r/gamma) table
        log = (2 ** exact - 1) * c.comparator(self.lut_bits(dst, params))
        return (log + c.adder(dst.bits - 1) + c.comparator(dst.bits - 1)
                + rounding.energy(c, 0, max(sig_bits - frac, 0)))


class BlockHardware(FamilyHardware):
    """Block-scaled formats (OCP MX, NVFP4, block(...)): an element format, `block_size` elements sharing
    a scale (E8M0: a power of two, applied by an exponent add; an FP grid such as E4M3: a multiply), and
    optionally one fp32 scale per tensor (one multiply per output)."""

    family = "block"
    default_accumulator = "fp32"
    converts_into = "fp"

    def operand(self, fmt: EnergyFormat, spec: str) -> Operand:
        check_fields(fmt, BlockFields, spec)
        block = cast(BlockFields, fmt)
        element = operand(block.element)
        grid = block.scale_grid
        return Operand(self.family, int(block.bits), element=element, block_size=int(block.block_size),
                       scale_bits=int(block.scale_bits),
                       scale_exp_bits=int(grid.exp_bits) if grid is not None else 0,
                       scale_man_bits=int(grid.man_bits) if grid is not None else 0,
                       tensor_scale=bool(block.tensor_scale), spec=spec)

    def datapath(self, c: Components, a: Operand, b: Operand, acc: Accumulator,
                 params: DatapathParams) -> Datapath:
        ea, eb = a.element, b.element
        assert ea is not None and eb is not None
        # one normalisation per K products, and never across a block: the scale changes there
        k = max(1, min(params.vector_length, a.block_size, b.block_size))
        if ea.hardware.unit != eb.hardware.unit:
            raise InputError(f"block-scaled operands {a.spec!r} and {b.spec!r} mix {ea.hardware.unit} and "
                             f"{eb.hardware.unit} elements, which share no block datapath")
        exp_bits, align = ea.hardware.block_products(ea, eb)
        group = UnitEnergy(multiply_pj=self._scale_product(c, a, b, align))
        name = f"block-{ea.family}"
        datapath = _significand_datapath(c, name, ea, eb, acc, params, exp_bits, k, align, extra_group=group)
        if a.tensor_scale or b.tensor_scale:  # the product of the two tensor scales times each output
            tensor = UnitEnergy(multiply_pj=c.fp_mul(8, 23) * (1 + (a.tensor_scale and b.tensor_scale)))
            datapath = replace(datapath, per_output=datapath.per_output + tensor)
        return datapath

    @staticmethod
    def _scale_product(c: Components, a: Operand, b: Operand, sum_bits: int) -> float:
        """Once per block pair: E8M0 scales add their exponents; FP scale grids multiply (a small FP
        multiply of the two scales) and the block's exact sum is multiplied by that product."""
        if not (a.scale_man_bits or a.scale_exp_bits or b.scale_man_bits or b.scale_exp_bits):
            return c.adder(max(a.scale_bits, b.scale_bits) + 1)
        exp_bits = max(a.scale_exp_bits, b.scale_exp_bits, 1)
        product_sig = a.scale_man_bits + b.scale_man_bits + 2
        return c.fp_mul(exp_bits, a.scale_man_bits, b.scale_man_bits) + c.multiplier(sum_bits, product_sig)

    def unpack(self, c: Components, src: Operand, params: DatapathParams) -> tuple[float, int]:
        assert src.element is not None
        energy, sig = src.element.hardware.unpack(c, src.element, params)
        if src.scale_man_bits or src.scale_exp_bits:  # element times its FP block scale
            return energy + c.fp_mul(src.scale_exp_bits, src.scale_man_bits, sig - 1), sig
        return energy + c.adder(src.scale_bits + 1), sig

    def pack(self, c: Components, dst: Operand, sig_bits: int, params: DatapathParams,
             rounding: Rounding) -> float:
        assert dst.element is not None
        element = dst.element.hardware.pack(c, dst.element, sig_bits, params, rounding)
        if dst.scale_man_bits or dst.scale_exp_bits:
            # per block: amax tree, amax / element max (a multiply by a constant, rounded onto the scale
            # grid), its reciprocal; per element: a multiply by that reciprocal instead of a shift
            scale_sig = dst.scale_man_bits + 1
            block = (c.fp_mul(8, 23) + c.fp_mul(8, 23)) / dst.block_size
            if dst.tensor_scale:  # (1 / s_t) / s_b: one more multiply per block
                block += c.fp_mul(8, 23) / dst.block_size
            return c.comparator(8) + block + c.multiplier(sig_bits, scale_sig) + element
        # a share of the block's amax tree and shared-exponent subtract, then the element itself
        block = c.comparator(8) + c.adder(dst.scale_bits + 1) / dst.block_size
        element_shift = c.shifter(sig_bits, dst.element.sig_bits, clog2(sig_bits))
        return block + element_shift + element

    def storage_bits(self, op: Operand) -> float:
        return op.bits + op.scale_bits / op.block_size

    def converted(self, op: Operand) -> Operand:
        """The FP operand an element times its block scale is exactly: an E8M0 scale joins the exponent,
        an FP scale grid multiplies the significand (the per-tensor scale is left per output)."""
        assert op.element is not None
        element = op.element
        if element.hardware.converts_into is not None:  # integer elements: as FP first
            element = element.hardware.converted(element)
        if op.scale_exp_bits or op.scale_man_bits:
            exp_bits = max(element.exp_bits, op.scale_exp_bits) + 1
            man_bits = element.man_bits + op.scale_man_bits + 1
        else:
            exp_bits, man_bits = max(element.exp_bits, op.scale_bits) + 1, element.man_bits
        return Operand("fp", 1 + exp_bits + man_bits, exp_bits=exp_bits, man_bits=man_bits,
                       spec=f"{op.spec} as fp")

    def left_per_output(self, c: Components, op: Operand) -> UnitEnergy:
        return UnitEnergy(multiply_pj=c.fp_mul(8, 23)) if op.tensor_scale else UnitEnergy()

    def across_blocks(self, op: Operand) -> Operand:
        return self.converted(op)


FAMILY_HARDWARE: dict[str, FamilyHardware] = {}


def register_family(family: str, description: FamilyHardware, replace: bool = False) -> None:
    """Make the energy model price a format family (`fmt.family == family`)."""
    if family in FAMILY_HARDWARE and not replace:
        raise ValueError(f"family {family!r} already has a hardware description")
    FAMILY_HARDWARE[family] = description


# A P3109 format is FP(e, m) arithmetic (its codes differ, not its datapath): FpHardware gives fp operands.
for _family, _description in (("int", IntHardware()), ("fixed", IntHardware("fixed")), ("fp", FpHardware()),
                              ("p3109", FpHardware()), ("posit", PositHardware()), ("lns", LnsHardware()),
                              ("block", BlockHardware())):
    register_family(_family, _description)


def hardware(family: str) -> FamilyHardware:
    found = FAMILY_HARDWARE.get(family)
    if found is None:
        raise InputError(f"unknown family {family!r} for the energy model "
                         f"(known: {', '.join(sorted(FAMILY_HARDWARE))})")
    return found


def operand(fmt: EnergyFormat) -> Operand:
    """Read a NumberFormat (or anything with the same attributes) into an Operand."""
    if isinstance(fmt, Operand):
        return fmt
    family = getattr(fmt, "family", None)
    spec = str(getattr(fmt, "spec", fmt))
    if not isinstance(family, str) or family not in FAMILY_HARDWARE:
        raise InputError(f"format {spec!r}: unknown family {family!r} for the energy model")
    return FAMILY_HARDWARE[family].operand(fmt, spec)




# --- accumulators --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Accumulator:
    """Where products are summed: a wide integer, an FP format, or a posit."""

    kind: Literal["int", "fp", "posit"]
    bits: int
    exp_bits: int = 0
    man_bits: int = 0
    es: int = 0
    spec: str = ""

    @property
    def hardware(self) -> FamilyHardware:
        return hardware(self.kind)

    def as_operand(self) -> Operand:
        return Operand(self.kind, self.bits, exp_bits=self.exp_bits, man_bits=self.man_bits, es=self.es,
                       spec=self.spec)


# The usual FP accumulators, read without importing the zoo (which pulls in torch).
_FP_ACCUMULATORS: dict[str, tuple[int, int]] = {"fp32": (8, 23), "fp16": (5, 10), "bf16": (8, 7),
                                                "tf32": (8, 10), "fp64": (11, 52)}
_INT_ACC = re.compile(r"^\s*int\s*\(?\s*(\d+)\s*\)?\s*$", re.IGNORECASE)


def parse_accumulator(spec: str | EnergyFormat, for_operand: Operand) -> Accumulator:
    """'int24', 'int(48)', a name a family gives its own accumulator ('quire': posit, a 16n-bit
    integer), or an fp/posit format spec."""
    if not isinstance(spec, str):
        fmt = operand(spec)
        return fmt.hardware.as_accumulator(fmt, str(getattr(spec, "spec", spec)))
    text = spec.strip().lower()
    owners = [h.family for h in FAMILY_HARDWARE.values() if text in h.named_accumulators]
    if owners:
        make = for_operand.hardware.named_accumulators.get(text)
        if make is None:
            raise InputError(f"accumulator {text!r} is for {' or '.join(sorted(set(owners)))} operands, "
                             f"not {for_operand.spec!r}")
        return make(for_operand)
    match = _INT_ACC.match(text)
    if match:
        width = int(match.group(1))
        if not 2 <= width <= 4096:
            raise InputError(f"accumulator {spec!r}: integer width must be in 2..4096")
        return Accumulator("int", width, spec=f"int{width}")
    if text in _FP_ACCUMULATORS:
        exp_bits, man_bits = _FP_ACCUMULATORS[text]
        return Accumulator("fp", 1 + exp_bits + man_bits, exp_bits=exp_bits, man_bits=man_bits, spec=text)
    from dse.formats import get  # the zoo parses every other spec, so errors read the same

    fmt = operand(get(spec))
    return fmt.hardware.as_accumulator(fmt, spec)


def is_named_accumulator(spec: str) -> bool:
    """Whether `spec` is an accumulator a family names for its own operands (checked per GEMM)."""
    text = spec.strip().lower()
    return any(text in h.named_accumulators for h in FAMILY_HARDWARE.values())


# --- a GEMM's datapath ---------------------------------------------------------------------------

def datapath_for(a_fmt: EnergyFormat, b_fmt: EnergyFormat, components: Components,
                 params: DatapathParams | None = None,
                 across_blocks: tuple[bool, bool] = (False, False)) -> Datapath:
    """The dot-product datapath for operands a (e.g. activations) and b (e.g. weights).

    Operands of one unit share it. An operand that converts exactly into the other's unit (an integer
    meeting an FP operand) is converted as it enters (priced per element in `a_convert_pj` /
    `b_convert_pj`, not per MAC), and so is a block-scaled operand that the GEMM reduces across its
    blocks (`across_blocks`: a new scale at every product, so no shared block scale to apply once).
    """
    params = params or DatapathParams()
    c = components
    operands = [operand(a_fmt), operand(b_fmt)]
    convert_pj = [0.0, 0.0]
    per_output = UnitEnergy()

    def enter(index: int, target: Operand) -> None:
        nonlocal per_output
        op = operands[index]
        convert_pj[index] += conversion_energy(op, target, c, params)
        per_output = per_output + op.hardware.left_per_output(c, op)
        operands[index] = target

    for index, across in enumerate(across_blocks):
        seen = operands[index].hardware.across_blocks(operands[index])
        if across and seen.key != operands[index].key:
            enter(index, seen)
    a, b = operands
    if a.hardware.unit != b.hardware.unit:
        if a.hardware.converts_into == b.hardware.unit:
            enter(0, a.hardware.converted(a))
        elif b.hardware.converts_into == a.hardware.unit:
            enter(1, b.hardware.converted(b))
        else:
            raise InputError(f"cannot price a GEMM of {a.spec!r} x {b.spec!r}: no datapath for {a.family} x "
                             f"{b.family} operands (an int x fp GEMM converts the int operand)")
    a, b = operands
    wider = a if a.bits >= b.bits else b
    acc = parse_accumulator(params.accumulator or a.hardware.default_accumulator, wider)
    dp = a.hardware.datapath(c, a, b, acc, params)
    if per_output.total_pj:
        dp = replace(dp, per_output=dp.per_output + per_output)
    return replace(dp, a_convert_pj=convert_pj[0], b_convert_pj=convert_pj[1])


def mac_energy(a_fmt: EnergyFormat, b_fmt: EnergyFormat | None, components: Components,
               params: DatapathParams | None = None, reduction_length: float = 1024) -> UnitEnergy:
    """Energy per MAC (multiply, conversion, accumulation) for dot products of length L."""
    datapath = datapath_for(a_fmt, a_fmt if b_fmt is None else b_fmt, components, params)
    return datapath.per_mac(reduction_length)


def datapath_area_um2(a_fmt: EnergyFormat, b_fmt: EnergyFormat, area: Components,
                      params: DatapathParams | None = None) -> float:
    """Area of the dot-product unit: K product lanes, one group stage, one output stage (um^2)."""
    return datapath_for(a_fmt, b_fmt, area, params).unit_total


# --- conversions between representations ---------------------------------------------------------

def conversion_energy(src: EnergyFormat | Accumulator, dst: EnergyFormat, components: Components,
                      params: DatapathParams | None = None, rounding: Rounding | str | None = None) -> float:
    """Energy to convert one value from `src` (format or Accumulator) into format `dst`, rounding by
    `rounding` (nearest by default): within one unit as its description says, else by unpacking to
    sign/exponent/significand and packing again."""
    params = params or DatapathParams()
    s = src.as_operand() if isinstance(src, Accumulator) else operand(src)
    d = operand(dst)
    if s.key == d.key:
        return 0.0
    c = components
    mode = Rounding.parse(rounding)
    if s.hardware.unit == d.hardware.unit:
        direct = s.hardware.requantize(c, s, d, mode)
        if direct is not None:
            return direct
    unpack, sig_bits = s.hardware.unpack(c, s, params)
    return unpack + d.hardware.pack(c, d, sig_bits, params, mode)
