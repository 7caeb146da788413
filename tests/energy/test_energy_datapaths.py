"""Per-format MAC datapaths: fused MACs, dot-product units of length K, and what each knob changes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dse.energy import (
    DatapathParams,
    Rounding,
    build_model,
    conversion_energy,
    datapath_area_um2,
    datapath_for,
    mac_energy,
    register_family,
)
from dse.energy.datapaths import FAMILY_HARDWARE, FpHardware, csd_nonzero_digits, operand
from dse.errors import InputError
from dse.formats import get

MODEL = build_model("45nm")
C = MODEL.components


def mac(spec: str, length: float = 1024, **params: object) -> object:
    fmt = get(spec)
    return mac_energy(fmt, fmt, C, DatapathParams(**params), length)  # type: ignore[arg-type]


ALL_FAMILIES = ["int8", "fp8_e4m3", "bf16", "fp32", "posit8", "lns8", "mxfp8_e4m3", "mxint8", "fixed(16,8)",
                "fp6_e2m3", "mxfp4", "posit(16,1)", "lns(6,gamma=2)"]


@pytest.mark.parametrize("k", [1, 16])
@pytest.mark.parametrize("spec", ALL_FAMILIES)
def test_every_format_has_a_positive_split(spec: str, k: int) -> None:
    energy = mac(spec, vector_length=k)
    assert energy.multiply_pj > 0 and energy.accumulation_pj > 0 and energy.conversion_pj >= 0
    parts = energy.multiply_pj + energy.conversion_pj + energy.accumulation_pj
    assert energy.total_pj == pytest.approx(parts)


def test_dispatch_reads_attributes_not_specs() -> None:
    stand_in = SimpleNamespace(family="fp", bits=8, exp_bits=4, man_bits=3, spec="whatever")
    assert mac_energy(stand_in, stand_in, C) == mac_energy(get("fp8_e4m3"), get("fp8_e4m3"), C)


def test_scalar_int8_mac_is_the_horowitz_multiply_plus_a_32_bit_accumulator() -> None:
    energy = mac("int8", vector_length=1)
    assert energy.multiply_pj == pytest.approx(0.2, rel=0.01)  # Horowitz 8b mult
    assert energy.conversion_pj == 0
    assert energy.accumulation_pj == pytest.approx(C.adder(32) + C.register(32))


def test_fused_fp_mac_rounds_once_not_twice() -> None:
    """A scalar FP32 MAC is the exact product plus one (wide) FP add, below Horowitz mult + add."""
    fused = mac("fp32", vector_length=1).total_pj
    unfused = C.fp_mul(8, 23) + C.fp_add(8, 23) + C.register(32)
    core = C.multiplier(24, 24) + C.adder(9)
    assert core + C.fp_add(8, 23) < fused < unfused


@pytest.mark.parametrize("spec", ["fp8_e4m3", "bf16", "fp16", "int8", "posit8", "mxfp8_e4m3"])
def test_dot_product_unit_normalises_once_per_k(spec: str) -> None:
    scalar, vector = mac(spec, vector_length=1), mac(spec, vector_length=16)
    assert vector.total_pj < scalar.total_pj
    if not spec.startswith("mx"):  # (MX adds its block scales once per group)
        assert vector.multiply_pj == pytest.approx(scalar.multiply_pj)


def test_group_work_is_charged_once_per_ceil_l_over_k() -> None:
    datapath = datapath_for(get("fp8_e4m3"), get("fp8_e4m3"), C, DatapathParams(vector_length=16))
    per_mac = datapath.per_mac(17)  # two groups for 17 products
    expected = datapath.per_product.total_pj + 2 * datapath.per_group.total_pj / 17
    assert per_mac.total_pj == pytest.approx(expected)


@given(st.integers(8, 63))
def test_wider_integer_accumulators_cost_more(width: int) -> None:
    narrow, wide = mac("int8", accumulator=f"int{width}"), mac("int8", accumulator=f"int{width + 1}")
    assert narrow.accumulation_pj < wide.accumulation_pj
    assert narrow.multiply_pj == wide.multiply_pj


@pytest.mark.parametrize("k", [1, 16])
def test_fp_accumulator_format_matters(k: int) -> None:
    fp32, fp16 = mac("fp8_e4m3", vector_length=k), mac("fp8_e4m3", vector_length=k, accumulator="fp16")
    assert fp16.total_pj < fp32.total_pj
    assert mac("fp8_e4m3", accumulator="int48").conversion_pj > 0  # shifted into a Kulisch accumulator
    assert mac("fp8_e4m3", vector_length=k).total_pj > mac("int8", vector_length=k).total_pj


def test_lns_madam_amortises_over_k_and_charges_its_partial_sums() -> None:
    short, long_ = mac("lns8", vector_length=4), mac("lns8", vector_length=64)
    assert long_.total_pj < short.total_pj
    # the reduction length no longer amortises the conversion: K (or the conversion period) does
    assert mac("lns8", 64, vector_length=16) == pytest.approx(mac("lns8", 4096, vector_length=16))
    # keeping the 8 partial sums in registers across groups costs per product, saves conversions
    lns8 = get("lns8")
    per_k = datapath_for(lns8, lns8, C, DatapathParams(vector_length=16))
    kept = datapath_for(lns8, lns8, C, DatapathParams(vector_length=16, lns_conversion_length=256))
    buckets = 8  # gamma = 8: one partial sum per remainder
    extra = kept.per_product.accumulation_pj - per_k.per_product.accumulation_pj
    assert extra >= buckets * C.register(24) / 16
    assert kept.groups_per_output(1024) < per_k.groups_per_output(1024)
    assert mac("lns8", 1024, lns_conversion_length=256).total_pj < mac("lns8", 1024).total_pj
    assert mac("lns8", 16, lns_conversion_length=256).total_pj > mac("lns8", 16).total_pj
    # the unit keeps K lanes whatever its conversion period: area grows by the registers, not 16x
    area = MODEL.area
    assert area is not None
    unit, held = (datapath_area_um2(lns8, lns8, area, DatapathParams(lns_conversion_length=n))
                  for n in (None, 256))
    assert unit < held < unit + 2 * buckets * (area.register(24) + area.adder(24))


def test_lns_madam_writes_registers_like_the_int_unit() -> None:
    """A vector unit sums its K products in adder trees and writes a register once per group, for INT and
    for the LNS partial sums alike; a scalar unit writes its accumulator at every product, for both."""
    for spec in ("lns8", "int8"):
        vector = datapath_for(get(spec), get(spec), C, DatapathParams(vector_length=16))
        scalar = datapath_for(get(spec), get(spec), C, DatapathParams(vector_length=1))
        assert vector.per_product.accumulation_pj < C.register(20)  # a tree adder share, no flip-flops
        assert scalar.per_product.accumulation_pj > C.register(20)


@pytest.mark.parametrize("bad", [8, 24, 0])
def test_lns_conversion_length_must_be_a_multiple_of_k(bad: int) -> None:
    with pytest.raises(InputError, match="lns_conversion_length"):
        DatapathParams(vector_length=16, lns_conversion_length=bad)


@given(st.integers(min_value=1, max_value=2**40))
def test_csd_digits_are_the_non_adjacent_form_weight(value: int) -> None:
    # an independent characterisation: the NAF's non-zero digits are the set bits of (3n xor n) >> 1
    assert csd_nonzero_digits(value) == bin((3 * value ^ value) >> 1).count("1")
    assert csd_nonzero_digits(value) <= bin(value).count("1")


def test_mitchell_approximation_removes_the_lookup() -> None:
    lut = mac("lns8", lns_datapath="direct")
    mitchell = mac("lns8", lns_datapath="direct", lns_mitchell_bits=3)
    assert mitchell.conversion_pj < lut.conversion_pj
    assert mitchell.multiply_pj == lut.multiply_pj
    hybrid = datapath_for(get("lns8"), get("lns8"), C, DatapathParams(lns_mitchell_bits=1))
    exact = datapath_for(get("lns8"), get("lns8"), C)
    assert hybrid.per_group.conversion_pj < exact.per_group.conversion_pj  # 4 buckets instead of 8


def test_lns_multiply_is_an_integer_add() -> None:
    assert mac("lns8").multiply_pj < mac("int8").multiply_pj / 5


def test_posit_decode_and_quire() -> None:
    per_mac = mac("posit8")
    shared = mac("posit8", posit_decode_reuse=16)
    assert per_mac.conversion_pj - shared.conversion_pj > 0
    quire = datapath_for(get("posit8"), get("posit8"), C, DatapathParams(accumulator="quire"))
    assert quire.accumulator.bits == 128  # 16 n bits, Posit Standard 2022
    assert mac("posit8", accumulator="quire").total_pj != pytest.approx(mac("posit8").total_pj)
    assert mac("posit16").total_pj > mac("fp16").total_pj  # decode + a wider core than IEEE's


def test_mx_sums_its_blocks_exactly_by_default() -> None:
    element = get("fp8_e4m3")
    stand_in = SimpleNamespace(family="fp", exp_bits=4, man_bits=3, bits=8, spec="e4m3")
    assert operand(stand_in).exact_product_bits == 34
    assert mac("mxfp8_e4m3") == mac("mxfp8_e4m3", alignment_bits=34)
    narrow, wide = mac("mxfp8_e4m3", alignment_bits=16), mac("mxfp8_e4m3", alignment_bits=36)
    assert narrow.total_pj < wide.total_pj
    assert mac("mxint8").total_pj < mac("mxfp8_e4m3").total_pj  # Chen et al. 2025's direction
    assert element.bits == 8


def test_int_times_fp_converts_the_int_operand_per_element() -> None:
    datapath = datapath_for(get("int4"), get("fp8_e4m3"), C)
    assert datapath.a_convert_pj > 0 and datapath.b_convert_pj == 0
    assert datapath.name == "fp"
    with pytest.raises(InputError, match="no datapath for lns x int"):
        mac_energy(get("lns8"), get("int8"), C)


def test_bad_datapath_choices() -> None:
    with pytest.raises(InputError, match="integer accumulator"):
        mac("lns8", accumulator="fp32")
    with pytest.raises(InputError, match="quire"):
        mac("int8", accumulator="quire")
    with pytest.raises(InputError, match="vector_length"):
        DatapathParams(vector_length=0)


def test_conversions_and_rounding_modes() -> None:
    assert conversion_energy(get("fp8_e4m3"), get("fp8_e4m3"), C) == 0
    int32 = SimpleNamespace(family="int", bits=32, spec="int32")
    assert conversion_energy(int32, get("int8"), C) > 0
    to_fp8 = conversion_energy(get("fp32"), get("fp8_e4m3"), C)
    assert conversion_energy(get("fp32"), get("posit8"), C) > to_fp8
    costs = {mode: conversion_energy(get("fp32"), get("fp8_e4m3"), C, rounding=mode)
             for mode in ("toward_zero", "nearest", "pseudo_stochastic", "stochastic", "stochastic(4)")}
    assert costs["toward_zero"] < costs["nearest"] < costs["stochastic"]
    assert costs["stochastic(4)"] < costs["stochastic"]  # fewer random bits than the 20 discarded ones
    with pytest.raises(InputError, match="unknown rounding 'roundish'"):
        Rounding.parse("roundish")


def test_a_new_family_plugs_in() -> None:
    class Bfp(FpHardware):
        family = "test-bfp"
        default_accumulator = "fp16"

    register_family("test-bfp", Bfp(), replace=True)
    try:
        fmt = SimpleNamespace(family="test-bfp", bits=8, exp_bits=4, man_bits=3, spec="bfp8")
        assert datapath_for(fmt, fmt, C).accumulator.spec == "fp16"
    finally:
        del FAMILY_HARDWARE["test-bfp"]


def test_area_follows_the_same_circuit_and_scales_with_k() -> None:
    area = MODEL.area
    assert area is not None and area.unit == "um^2"
    # the scalar int8 MAC's multiplier is Horowitz's 8b mult area
    assert area.multiplier(8, 8) == pytest.approx(282, rel=0.05)
    one = datapath_area_um2(get("int8"), get("int8"), area, DatapathParams(vector_length=1))
    sixteen = datapath_area_um2(get("int8"), get("int8"), area, DatapathParams(vector_length=16))
    assert 8 * one < sixteen < 16 * one
    bf16 = datapath_area_um2(get("bf16"), get("bf16"), area)
    assert datapath_area_um2(get("fp32"), get("fp32"), area) > bf16
    seven = build_model("7nm").area
    assert seven is not None
    assert seven.multiplier(8, 8) == pytest.approx(0.059 * area.multiplier(8, 8))
    assert build_model("65nm", node_scaling="stillmaker").area is None  # no published 65 nm area factor


def test_block_formats_price_their_scale_format_and_tensor_scale() -> None:
    """E8M0 blocks add exponents; an FP scale grid (E4M3) multiplies once per block pair and the fp32
    tensor scale once per output; the element datapath is the same. Every E8M0 spelling is one price."""
    mx16, e4m3, nvfp4 = mac("mxfp4(block=16)"), mac("block(fp4_e2m1,size=16,scale=e4m3)"), mac("nvfp4")
    assert mac("block(fp4_e2m1,size=16)").total_pj == mx16.total_pj
    assert mx16.multiply_pj < e4m3.multiply_pj < nvfp4.multiply_pj
    assert e4m3.accumulation_pj == mx16.accumulation_pj
    per_output = datapath_for(get("nvfp4"), get("nvfp4"), C).per_output.multiply_pj
    assert per_output == pytest.approx(2 * C.fp_mul(8, 23)) and per_output > 0
    fp32 = get("fp32")
    assert conversion_energy(fp32, get("nvfp4"), C) > conversion_energy(fp32, get("mxfp4(block=16)"), C)
    assert get("nvfp4").scale_bits == 8 and get("block(fp4_e2m1,size=16,scale=ue4m3)").scale_bits == 7


def test_p3109_is_priced_as_its_fp_shape() -> None:
    assert mac("p3109(8,4)").total_pj == mac("fp8_e4m3").total_pj
    assert mac("p3109(8,3)").total_pj == mac("fp8_e5m2").total_pj


def test_stochastic_k_pays_for_its_k_random_bits() -> None:
    src, dst = get("fp32"), get("bf16")
    costs = [conversion_energy(src, dst, C, rounding=f"stochastic({k})") for k in (1, 4, 8, 16)]
    assert costs == sorted(costs) and costs[0] < costs[-1]
    with pytest.raises(InputError, match="must be in 1..23, got 24"):
        conversion_energy(src, dst, C, rounding="stochastic(24)")


def test_a_family_is_one_description_and_the_whole_model_prices_it() -> None:
    """A family the model has never seen (a 'tapered integer' with its own unit) needs only its
    description: its GEMMs, conversions to and from it and its storage width are priced."""
    from dse.energy import FamilyHardware
    from dse.energy.datapaths import Datapath, IntHardware, Operand, UnitEnergy

    class Tapered(FamilyHardware):
        family = "test-tapered"
        default_accumulator = "int32"
        in_place_optimizer = "madam"

        def operand(self, fmt: object, spec: str) -> Operand:
            return Operand(self.family, int(fmt.bits), spec=spec)  # type: ignore[attr-defined]

        def datapath(self, c, a, b, acc, params):  # type: ignore[no-untyped-def]
            return Datapath("tapered", acc, UnitEnergy(c.multiplier(a.bits, b.bits), 0.0, c.adder(acc.bits)))

        def unpack(self, c, src, params):  # type: ignore[no-untyped-def]
            return IntHardware().unpack(c, src, params)

        def pack(self, c, dst, sig_bits, params, rounding):  # type: ignore[no-untyped-def]
            return IntHardware().pack(c, dst, sig_bits, params, rounding)

        def storage_bits(self, op: Operand) -> float:
            return op.bits + 0.5

    register_family("test-tapered", Tapered())
    try:
        fmt = SimpleNamespace(family="test-tapered", bits=6, spec="tapered6")
        assert datapath_for(fmt, fmt, C).per_product.multiply_pj == C.multiplier(6, 6)
        assert conversion_energy(get("fp32"), fmt, C) > 0 and conversion_energy(fmt, get("bf16"), C) > 0
        assert operand(fmt).storage_bits == 6.5
        with pytest.raises(InputError, match="no datapath for test-tapered x fp"):
            datapath_for(fmt, get("bf16"), C)
    finally:
        del FAMILY_HARDWARE["test-tapered"]


def test_a_format_without_its_familys_fields_is_one_line_naming_them() -> None:
    with pytest.raises(InputError, match=r"format 'half' of family 'fp' has no exp_bits, man_bits"):
        mac_energy(SimpleNamespace(family="fp", bits=16, spec="half"), None, C)
    with pytest.raises(InputError, match="unknown family 'decimal'"):
        mac_energy(SimpleNamespace(family="decimal", bits=16, spec="d16"), None, C)
