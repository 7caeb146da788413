"""Each number format's dot-product datapath, built from the primitive units of `components.py`.

A datapath costs `per_product` energy for every multiply-accumulate and `per_output` energy once per
dot product (amortised over the reduction length K), each split into multiply, conversion and
accumulation. Dispatch is on the format's attributes (`family`, `bits`, `exp_bits`, `man_bits`, `es`,
`gamma`, `element`, `block_size`, `scale_bits`), never on spec strings. `conversion_energy` prices
turning one representation into another (an accumulator into the storage format of the output, a
weight gradient into the optimizer's format, ...), by unpacking to sign/exponent/significand and
packing again.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from dse.energy.components import Components, clog2
from dse.errors import InputError

FAMILIES = ("fp", "int", "fixed", "posit", "lns", "mx")

# Accumulator used when none is given, by operand family (docs/energy-model.md, "defaults").
DEFAULT_ACCUMULATORS: dict[str, str] = {
    "int": "int32", "fixed": "int32", "fp": "fp32", "posit": "fp32", "lns": "int24", "mx": "fp32",
}


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


@dataclass(frozen=True)
class Operand:
    """The attributes of a number format that its hardware depends on."""

    family: str
    bits: int
    exp_bits: int = 0
    man_bits: int = 0
    es: int = 0
    log_frac_bits: int = 0
    element: Operand | None = None
    block_size: int = 0
    scale_bits: int = 0
    spec: str = ""

    @property
    def sig_bits(self) -> int:
        """Significand bits including the hidden one (posit: at its most precise)."""
        if self.family == "fp":
            return self.man_bits + 1
        if self.family == "posit":
            return max(self.bits - 2 - self.es, 1)
        return self.bits

    @property
    def scale_range_bits(self) -> int:
        """Bits of the exponent/scale a product of two such numbers needs (fp, posit)."""
        if self.family == "posit":
            return self.es + clog2(2 * (self.bits - 1))
        return self.exp_bits

    @property
    def key(self) -> tuple[Any, ...]:
        """Everything but the spec string: two operands with the same key are the same format."""
        element = self.element.key if self.element is not None else None
        return (self.family, self.bits, self.exp_bits, self.man_bits, self.es, self.log_frac_bits, element,
                self.block_size, self.scale_bits)

    @property
    def storage_bits(self) -> float:
        """Bits per element in memory, including a share of any block scale."""
        if self.family == "mx":
            return self.bits + self.scale_bits / self.block_size
        return float(self.bits)


def operand(fmt: Any) -> Operand:
    """Read a NumberFormat (or anything with the same attributes) into an Operand."""
    if isinstance(fmt, Operand):
        return fmt
    family = getattr(fmt, "family", None)
    family = {"p3109": "fp", "block": "mx"}.get(family, family)  # P3109 is an FP(e, m) datapath
    spec = str(getattr(fmt, "spec", fmt))
    if family not in FAMILIES:
        raise InputError(f"format {spec!r}: unknown family {family!r} for the energy model")
    bits = int(fmt.bits)
    if family == "fp":
        return Operand("fp", bits, exp_bits=int(fmt.exp_bits), man_bits=int(fmt.man_bits), spec=spec)
    if family == "posit":
        return Operand("posit", bits, es=int(fmt.es), spec=spec)
    if family == "lns":
        gamma = float(fmt.gamma)
        frac = math.log2(gamma) if gamma >= 1 else -1.0
        if frac < 0 or frac != int(frac):
            raise InputError(f"format {spec!r}: gamma must be a power of two >= 1 for the energy model")
        return Operand("lns", bits, log_frac_bits=int(frac), spec=spec)
    if family == "mx":
        element = operand(fmt.element)
        return Operand("mx", bits, element=element, block_size=int(fmt.block_size),
                       scale_bits=int(fmt.scale_bits), spec=spec)
    return Operand(family, bits, spec=spec)


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

    def as_operand(self) -> Operand:
        family = "int" if self.kind == "int" else self.kind
        return Operand(family, self.bits, exp_bits=self.exp_bits, man_bits=self.man_bits, es=self.es,
                       spec=self.spec)


# The usual FP accumulators, read without importing the zoo (which pulls in torch).
_FP_ACCUMULATORS: dict[str, tuple[int, int]] = {"fp32": (8, 23), "fp16": (5, 10), "bf16": (8, 7),
                                                "tf32": (8, 10), "fp64": (11, 52)}
_INT_ACC = re.compile(r"^\s*int\s*\(?\s*(\d+)\s*\)?\s*$", re.IGNORECASE)


def parse_accumulator(spec: str | Any, for_operand: Operand) -> Accumulator:
    """'int24', 'int(48)', 'quire' (posit: 16n-bit integer), or an fp/posit format spec."""
    if not isinstance(spec, str):
        return _accumulator_from_format(operand(spec), str(getattr(spec, "spec", spec)))
    text = spec.strip().lower()
    if text == "quire":
        if for_operand.family != "posit":
            raise InputError(f"accumulator 'quire' is for posit operands, not {for_operand.spec!r}")
        return Accumulator("int", 16 * for_operand.bits, spec="quire")
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

    return _accumulator_from_format(operand(get(spec)), spec)


def _accumulator_from_format(fmt: Operand, spec: str) -> Accumulator:
    if fmt.family == "fp":
        return Accumulator("fp", fmt.bits, exp_bits=fmt.exp_bits, man_bits=fmt.man_bits, spec=spec)
    if fmt.family in ("int", "fixed"):
        return Accumulator("int", fmt.bits, spec=spec)
    if fmt.family == "posit":
        return Accumulator("posit", fmt.bits, es=fmt.es, spec=spec)
    raise InputError(f"accumulator {spec!r}: must be an integer width, an fp or posit format, or 'quire'")


# --- parameters ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatapathParams:
    """Datapath choices that can change a ranking; defaults are documented in docs/energy-model.md."""

    accumulator: str | None = None
    """Accumulator spec; None uses DEFAULT_ACCUMULATORS for the operand family."""
    lns_datapath: Literal["madam", "direct"] = "madam"
    """LNS: 'madam' sums per-remainder partial sums and applies 2^(r/gamma) once per output;
    'direct' converts every product (LUT/Mitchell, then shift) into one integer accumulator."""
    lns_mitchell_bits: int = 0
    """LNS: low remainder bits approximated by Mitchell's 2^x ~ 1 + x instead of a LUT/bucket."""
    lns_lut_bits: int | None = None
    """LNS: width of the 2^(r/gamma) constants; None means log2(gamma) + 3."""
    alignment_bits: int | None = None
    """MX with FP elements: width products are aligned to before the block adder tree; None: 2p + 8."""
    posit_decode_reuse: float = 1.0
    """Posit: products that share one decoded operand (1 = decode both operands at every MAC)."""

    def __post_init__(self) -> None:
        if self.lns_datapath not in ("madam", "direct"):
            raise InputError(f"lns_datapath must be 'madam' or 'direct', got {self.lns_datapath!r}")
        if self.lns_mitchell_bits < 0:
            raise InputError("lns_mitchell_bits must be >= 0")
        if self.alignment_bits is not None and not 4 <= self.alignment_bits <= 256:
            raise InputError("alignment_bits must be in 4..256")
        if self.lns_lut_bits is not None and not 1 <= self.lns_lut_bits <= 32:
            raise InputError("lns_lut_bits must be in 1..32")
        if not self.posit_decode_reuse >= 1:
            raise InputError("posit_decode_reuse must be >= 1")


@dataclass(frozen=True)
class Datapath:
    """One format pair's dot-product unit: energy per product, and per output (once per dot product)."""

    name: str
    accumulator: Accumulator
    per_product: UnitEnergy
    per_output: UnitEnergy = field(default_factory=UnitEnergy)

    def per_mac(self, reduction_length: float) -> UnitEnergy:
        """Energy per MAC for dot products of length K: the per-output part amortised over K."""
        if not reduction_length >= 1:
            raise InputError(f"reduction length must be >= 1, got {reduction_length}")
        return self.per_product + self.per_output * (1.0 / reduction_length)


# --- posit decode / encode, LNS constants --------------------------------------------------------

def posit_decode(c: Components, bits: int, es: int) -> float:
    """Two's complement, leading-zero/one count of the regime, regime shift, scale assembly."""
    return (c.gates(bits) + c.incrementer(bits) + c.lzc(bits - 1)
            + c.shifter(bits - 1, bits - 1, clog2(bits - 1)) + c.adder(clog2(bits) + es + 1))


def posit_encode(c: Components, bits: int, es: int) -> float:
    """Regime/exponent shift into place, round, two's complement."""
    return c.shifter(bits - 1, bits - 1, clog2(bits - 1)) + 2 * c.incrementer(bits) + c.gates(bits)


def _lut_bits(fmt: Operand, params: DatapathParams) -> int:
    return params.lns_lut_bits if params.lns_lut_bits is not None else fmt.log_frac_bits + 3


def _mitchell_bits(fmt: Operand, params: DatapathParams) -> int:
    return min(params.lns_mitchell_bits, fmt.log_frac_bits)


# --- products into accumulators ------------------------------------------------------------------

def _into_accumulator(c: Components, product_kind: str, sig_bits: int, exp_bits: int,
                      acc: Accumulator) -> UnitEnergy:
    """Conversion and accumulation of one product (integer of sig_bits, or FP) into `acc`."""
    if acc.kind == "int":
        if product_kind == "int":
            conversion = 0.0
        else:
            stages = min(clog2(acc.bits), max(exp_bits, 1))
            conversion = c.shifter(sig_bits, acc.bits, stages) + c.gates(sig_bits)
        return UnitEnergy(0.0, conversion, c.adder(acc.bits) + c.register(acc.bits))
    if acc.kind == "fp":
        conversion = 0.0
        if product_kind == "int":
            conversion = c.lzc(sig_bits) + c.shifter(sig_bits, acc.man_bits + 1, clog2(sig_bits))
        accumulate = c.fp_add(acc.exp_bits, acc.man_bits) + c.register(acc.bits)
        return UnitEnergy(0.0, conversion, accumulate)
    # posit accumulator: decode the running sum, FP add, encode it again
    acc_op = acc.as_operand()
    conversion = posit_decode(c, acc.bits, acc.es) + posit_encode(c, acc.bits, acc.es)
    accumulate = c.fp_add(acc_op.scale_range_bits, acc_op.sig_bits - 1) + c.register(acc.bits)
    return UnitEnergy(0.0, conversion, accumulate)


# --- one datapath per family ---------------------------------------------------------------------

def _int_datapath(c: Components, a: Operand, b: Operand, acc: Accumulator) -> Datapath:
    product = UnitEnergy(multiply_pj=c.multiplier(a.bits, b.bits))
    return Datapath("int", acc, product + _into_accumulator(c, "int", a.bits + b.bits, 0, acc))


def _fp_datapath(c: Components, a: Operand, b: Operand, acc: Accumulator) -> Datapath:
    exp_bits = max(a.exp_bits, b.exp_bits)
    if acc.kind == "int":  # Kulisch-style: raw product, no rounding, shifted into a wide integer
        multiply = c.multiplier(a.sig_bits, b.sig_bits) + c.adder(exp_bits + 1)
    else:
        multiply = c.fp_mul(exp_bits, a.man_bits, b.man_bits)
    into = _into_accumulator(c, "fp", a.sig_bits + b.sig_bits, exp_bits + 1, acc)
    return Datapath("fp", acc, UnitEnergy(multiply_pj=multiply) + into)


def _posit_datapath(c: Components, a: Operand, b: Operand, acc: Accumulator,
                    params: DatapathParams) -> Datapath:
    decode = (posit_decode(c, a.bits, a.es) + posit_decode(c, b.bits, b.es)) / params.posit_decode_reuse
    exp_bits = max(a.scale_range_bits, b.scale_range_bits)
    if acc.kind == "int":  # quire: exact product shifted into a 16n-bit integer
        multiply = c.multiplier(a.sig_bits, b.sig_bits) + c.adder(exp_bits + 1)
    else:
        multiply = c.fp_mul(exp_bits, a.sig_bits - 1, b.sig_bits - 1)
    into = _into_accumulator(c, "fp", a.sig_bits + b.sig_bits, exp_bits + 1, acc)
    return Datapath("posit", acc, UnitEnergy(multiply, decode) + into)


def _lns_datapath(c: Components, a: Operand, b: Operand, acc: Accumulator,
                  params: DatapathParams) -> Datapath:
    if acc.kind != "int":
        raise InputError(f"LNS products are summed in an integer accumulator, not {acc.spec!r}")
    frac = max(a.log_frac_bits, b.log_frac_bits)
    code_bits = max(a.bits, b.bits) - 1 + abs(a.log_frac_bits - b.log_frac_bits)
    fmt = a if a.log_frac_bits >= b.log_frac_bits else b
    width = acc.bits
    quotient_bits = code_bits + 1 - frac  # integer part of the product code: the shift amount
    lut_bits = _lut_bits(fmt, params)
    mitchell = _mitchell_bits(fmt, params)
    # Multiply: integer add of the two log codes, XOR of the signs, zero flag.
    multiply = c.adder(code_bits) + c.gates(2)
    if params.lns_datapath == "direct":
        if mitchell >= frac:  # 2^(r/gamma) ~ 1 + r/gamma: the remainder bits are the fraction
            value_bits = frac + 1
            lookup = 0.0
        else:
            value_bits = lut_bits
            lookup = c.lut(2 ** (frac - mitchell), lut_bits)
            if mitchell:
                lookup += c.multiplier(lut_bits, mitchell + 1)
        conversion = lookup + c.shifter(value_bits, width, quotient_bits) + c.gates(value_bits)
        per_product = UnitEnergy(multiply, conversion, c.adder(width) + c.register(width))
        return Datapath("lns-direct", acc, per_product)
    # LNS-Madam: route each product to one of 2^(frac - mitchell) partial sums by its remainder.
    buckets = 2 ** (frac - mitchell)
    if mitchell:
        conversion = c.gates(buckets) + c.shifter(mitchell + 1, width, quotient_bits)
        accumulate = c.adder(width) + c.register(width)
    else:  # add a one-hot 1 << q: a decoder and an up/down incrementer
        conversion = c.gates(buckets) + c.gates(width)
        accumulate = c.incrementer(width) + c.gates(width) + c.register(width)
    per_product = UnitEnergy(multiply, conversion, accumulate)
    # Once per output: scale each partial sum by its constant 2^(r/gamma), then add them up.
    scaled_bits = width + lut_bits
    constants = (buckets * c.multiplier(width, lut_bits)) if buckets > 1 else 0.0
    per_output = UnitEnergy(0.0, constants,
                            (buckets - 1) * c.adder(scaled_bits) + c.register(scaled_bits))
    return Datapath("lns-madam", Accumulator("int", scaled_bits if buckets > 1 else width, spec=acc.spec),
                    per_product, per_output)


def _mx_datapath(c: Components, a: Operand, b: Operand, acc: Accumulator, params: DatapathParams) -> Datapath:
    ea, eb = a.element, b.element
    assert ea is not None and eb is not None
    k = min(a.block_size, b.block_size)
    if ea.family == "fp" and eb.family == "fp":
        p = max(ea.sig_bits, eb.sig_bits)
        align = params.alignment_bits if params.alignment_bits is not None else 2 * p + 8
        exp_bits = max(ea.exp_bits, eb.exp_bits) + 1
        multiply = c.multiplier(ea.sig_bits, eb.sig_bits) + c.adder(exp_bits)
        # block maximum of the product exponents (a comparator tree), shift amount, alignment
        product_bits = ea.sig_bits + eb.sig_bits
        conversion = (c.comparator(exp_bits) + c.adder(exp_bits)
                      + c.shifter(product_bits, align, clog2(align)) + c.gates(product_bits))
        tree_bits = align + clog2(k)
    elif ea.family in ("int", "fixed") and eb.family in ("int", "fixed"):
        multiply = c.multiplier(ea.bits, eb.bits)
        conversion = 0.0
        tree_bits = ea.bits + eb.bits + clog2(k)
    else:
        raise InputError(f"MX operands {a.spec!r} and {b.spec!r} mix FP and integer elements")
    accumulate = c.adder(tree_bits)  # a k-input adder tree has k - 1 adders: about one per product
    # Once per block: add the two E8M0 scales, normalise the block sum, accumulate it in `acc`.
    scale_bits = max(a.scale_bits, b.scale_bits) + 1
    block = UnitEnergy(multiply_pj=c.adder(scale_bits))
    block = block + _into_accumulator(c, "int", tree_bits, scale_bits, acc)
    per_product = UnitEnergy(multiply, conversion, accumulate) + block * (1.0 / k)
    return Datapath(f"mx-{ea.family}", acc, per_product)


def datapath_for(a_fmt: Any, b_fmt: Any, components: Components,
                 params: DatapathParams | None = None) -> Datapath:
    """The dot-product datapath for operands a (e.g. activations) and b (e.g. weights)."""
    params = params or DatapathParams()
    a, b = operand(a_fmt), operand(b_fmt)
    group = {"int": "int", "fixed": "int"}
    if group.get(a.family, a.family) != group.get(b.family, b.family):
        raise InputError(f"cannot model a GEMM of {a.spec!r} x {b.spec!r}: operands of different families")
    wider = a if a.bits >= b.bits else b
    acc_spec = params.accumulator or DEFAULT_ACCUMULATORS[a.family]
    acc = parse_accumulator(acc_spec, wider)
    c = components
    if a.family in ("int", "fixed"):
        return _int_datapath(c, a, b, acc)
    if a.family == "fp":
        return _fp_datapath(c, a, b, acc)
    if a.family == "posit":
        return _posit_datapath(c, a, b, acc, params)
    if a.family == "lns":
        return _lns_datapath(c, a, b, acc, params)
    return _mx_datapath(c, a, b, acc, params)


def mac_energy(a_fmt: Any, b_fmt: Any | None, components: Components, params: DatapathParams | None = None,
               reduction_length: float = 1024) -> UnitEnergy:
    """Energy per MAC (multiply, conversion, accumulation) for dot products of length K."""
    datapath = datapath_for(a_fmt, a_fmt if b_fmt is None else b_fmt, components, params)
    return datapath.per_mac(reduction_length)


# --- conversions between representations ---------------------------------------------------------

def _unpack(c: Components, src: Operand, params: DatapathParams) -> tuple[float, int]:
    """Energy to reach sign / exponent / normalised significand, and the significand width."""
    if src.family in ("int", "fixed"):
        return c.lzc(src.bits) + c.shifter(src.bits, src.bits, clog2(src.bits)), src.bits
    if src.family == "fp":
        return 0.0, src.sig_bits
    if src.family == "posit":
        return posit_decode(c, src.bits, src.es), src.sig_bits
    if src.family == "lns":
        lut_bits = _lut_bits(src, params)
        if _mitchell_bits(src, params) >= src.log_frac_bits:
            return 0.0, src.log_frac_bits + 1
        return c.lut(2 ** src.log_frac_bits, lut_bits), lut_bits
    assert src.element is not None
    energy, sig = _unpack(c, src.element, params)
    return energy + c.adder(src.scale_bits + 1), sig


def _pack(c: Components, dst: Operand, sig_bits: int, params: DatapathParams) -> float:
    """Energy to round a normalised significand of sig_bits into `dst`."""
    if dst.family in ("int", "fixed"):
        return c.shifter(sig_bits, dst.bits, clog2(max(sig_bits, dst.bits))) + c.incrementer(dst.bits) \
            + c.comparator(dst.bits)
    if dst.family == "fp":
        return (c.incrementer(dst.sig_bits) + c.gates(max(sig_bits - dst.sig_bits, 0))
                + c.adder(dst.exp_bits + 1) + c.comparator(dst.exp_bits + 1))
    if dst.family == "posit":
        return posit_encode(c, dst.bits, dst.es) + c.gates(max(sig_bits - dst.sig_bits, 0))
    if dst.family == "lns":
        frac = dst.log_frac_bits
        exact = frac - _mitchell_bits(dst, params)
        # the log of the significand: compare with the midpoints of the 2^(r/gamma) table
        log = (2 ** exact - 1) * c.comparator(_lut_bits(dst, params)) + c.gates(max(sig_bits - frac, 0))
        return log + c.adder(dst.bits - 1) + c.comparator(dst.bits - 1)
    assert dst.element is not None
    # MX: a share of the block's amax tree and shared-exponent subtract, then the element itself
    block = c.comparator(8) + c.adder(dst.scale_bits + 1) / dst.block_size
    element_shift = c.shifter(sig_bits, dst.element.sig_bits, clog2(sig_bits))
    return block + element_shift + _pack(c, dst.element, sig_bits, params)


def conversion_energy(src: Any, dst: Any, components: Components,
                      params: DatapathParams | None = None) -> float:
    """Energy to convert one value from `src` (format or Accumulator) into format `dst`."""
    params = params or DatapathParams()
    s = src.as_operand() if isinstance(src, Accumulator) else operand(src)
    d = operand(dst)
    if s.key == d.key or (s.family in ("int", "fixed") and d.family in ("int", "fixed") and s.bits == d.bits):
        return 0.0
    c = components
    if s.family in ("int", "fixed") and d.family in ("int", "fixed"):
        # requantise: shift by the (power-of-two) scale, round, saturate; no normalisation
        return c.shifter(s.bits, d.bits, clog2(s.bits)) + c.incrementer(d.bits) + c.comparator(d.bits)
    unpack, sig_bits = _unpack(c, s, params)
    return unpack + _pack(c, d, sig_bits, params)
