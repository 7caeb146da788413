"""Per-format MAC datapaths: what each knob does to multiply, conversion and accumulation energy."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dse.energy import DatapathParams, build_model, conversion_energy, datapath_for, mac_energy
from dse.errors import InputError
from dse.formats import get

C = build_model("45nm").components


def mac(spec: str, k: float = 1024, **params: object) -> object:
    fmt = get(spec)
    return mac_energy(fmt, fmt, C, DatapathParams(**params), k)  # type: ignore[arg-type]


ALL_FAMILIES = ["int8", "fp8_e4m3", "bf16", "fp32", "posit8", "lns8", "mxfp8_e4m3", "mxint8", "fixed(16,8)",
                "fp6_e2m3", "mxfp4", "posit(16,1)", "lns(6,gamma=2)"]


@pytest.mark.parametrize("spec", ALL_FAMILIES)
def test_every_format_has_a_positive_split(spec: str) -> None:
    energy = mac(spec)
    assert energy.multiply_pj > 0 and energy.accumulation_pj > 0 and energy.conversion_pj >= 0
    parts = energy.multiply_pj + energy.conversion_pj + energy.accumulation_pj
    assert energy.total_pj == pytest.approx(parts)


def test_dispatch_reads_attributes_not_specs() -> None:
    """A stand-in with the contract's attributes costs the same as the zoo's object."""
    stand_in = SimpleNamespace(family="fp", bits=8, exp_bits=4, man_bits=3, spec="whatever")
    assert mac_energy(stand_in, stand_in, C) == mac_energy(get("fp8_e4m3"), get("fp8_e4m3"), C)


def test_int8_mac_is_the_horowitz_multiply_plus_a_32_bit_accumulator() -> None:
    energy = mac("int8")
    assert energy.multiply_pj == pytest.approx(0.2, rel=0.01)  # Horowitz 8b mult
    assert energy.conversion_pj == 0
    assert energy.accumulation_pj == pytest.approx(C.adder(32) + C.register(32))


@given(st.integers(8, 63))
def test_wider_integer_accumulators_cost_more(width: int) -> None:
    narrow, wide = mac("int8", accumulator=f"int{width}"), mac("int8", accumulator=f"int{width + 1}")
    assert narrow.accumulation_pj < wide.accumulation_pj
    assert narrow.multiply_pj == wide.multiply_pj


def test_fp_accumulator_format_matters() -> None:
    fp32, fp16 = mac("fp8_e4m3"), mac("fp8_e4m3", accumulator="fp16")
    wide_int = mac("fp8_e4m3", accumulator="int32")
    assert fp16.accumulation_pj < fp32.accumulation_pj
    assert wide_int.conversion_pj > 0  # the product is shifted into the integer accumulator
    assert mac("fp8_e4m3").total_pj > mac("int8").total_pj


@settings(max_examples=30)
@given(st.integers(1, 4096), st.integers(1, 4096))
def test_lns_madam_amortisation_decreases_with_k(k1: int, k2: int) -> None:
    lo, hi = sorted((k1, k2))
    short, long_ = mac("lns8", lo), mac("lns8", hi)
    assert long_.total_pj <= short.total_pj
    assert long_.multiply_pj == short.multiply_pj


def test_lns_madam_tends_to_its_per_product_cost_and_direct_ignores_k() -> None:
    datapath = datapath_for(get("lns8"), get("lns8"), C)
    assert datapath.per_output.total_pj > 0
    assert mac("lns8", 1e9).total_pj == pytest.approx(datapath.per_product.total_pj, rel=1e-6)
    assert mac("lns8", 16, lns_datapath="direct") == mac("lns8", 4096, lns_datapath="direct")
    # the bucketed design only pays off for long enough reductions
    for k, madam_wins in ((4, False), (4096, True)):
        madam, direct = mac("lns8", k, lns_datapath="madam"), mac("lns8", k, lns_datapath="direct")
        assert (madam.total_pj < direct.total_pj) == madam_wins


def test_mitchell_approximation_removes_the_lookup() -> None:
    lut = mac("lns8", lns_datapath="direct")
    mitchell = mac("lns8", lns_datapath="direct", lns_mitchell_bits=3)
    assert mitchell.conversion_pj < lut.conversion_pj
    assert mitchell.multiply_pj == lut.multiply_pj
    hybrid = datapath_for(get("lns8"), get("lns8"), C, DatapathParams(lns_mitchell_bits=1))
    exact = datapath_for(get("lns8"), get("lns8"), C)
    assert hybrid.per_output.conversion_pj < exact.per_output.conversion_pj  # 4 buckets instead of 8


def test_lns_multiply_is_an_integer_add() -> None:
    assert mac("lns8").multiply_pj < mac("int8").multiply_pj / 5


def test_posit_decode_and_quire() -> None:
    per_mac = mac("posit8")
    shared = mac("posit8", posit_decode_reuse=16)
    assert shared.conversion_pj == pytest.approx(per_mac.conversion_pj / 16)
    quire = datapath_for(get("posit8"), get("posit8"), C, DatapathParams(accumulator="quire"))
    assert quire.accumulator.bits == 128  # 16 n bits, Posit Standard 2022
    assert mac("posit16").total_pj > mac("fp16").total_pj  # decode + a wider core than IEEE's


def test_mx_alignment_width_and_block_amortisation() -> None:
    narrow, wide = mac("mxfp8_e4m3", alignment_bits=16), mac("mxfp8_e4m3", alignment_bits=36)
    assert narrow.total_pj < wide.total_pj
    assert mac("mxint8").conversion_pj < mac("mxfp8_e4m3").conversion_pj  # integer elements need no alignment
    assert mac("mxfp8_e4m3").total_pj < mac("fp8_e4m3").total_pj  # one FP32 accumulate per 32 products


def test_mixed_operands() -> None:
    e4m3_e5m2 = mac_energy(get("fp8_e4m3"), get("fp8_e5m2"), C)
    assert e4m3_e5m2.total_pj > 0
    with pytest.raises(InputError, match="different families"):
        mac_energy(get("lns8"), get("int8"), C)
    with pytest.raises(InputError, match="integer accumulator"):
        mac("lns8", accumulator="fp32")
    with pytest.raises(InputError, match="quire"):
        mac("int8", accumulator="quire")


def test_conversions() -> None:
    assert conversion_energy(get("fp8_e4m3"), get("fp8_e4m3"), C) == 0
    int32 = SimpleNamespace(family="int", bits=32, spec="int32")
    assert conversion_energy(int32, get("int8"), C) > 0
    to_posit = conversion_energy(get("fp32"), get("posit8"), C)
    assert to_posit > conversion_energy(get("fp32"), get("fp8_e4m3"), C)
