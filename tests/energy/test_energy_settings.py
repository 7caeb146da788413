"""Energy settings are checked by the types that own them, and each error names its setting."""

from __future__ import annotations

import pytest

from dse.energy import DatapathParams, MemoryParams, build_model
from dse.errors import SettingError


@pytest.mark.parametrize(("changes", "setting"), [
    ({"vector_length": 0}, "vector_length"),
    ({"vector_length": True}, "vector_length"),
    ({"alignment_bits": 3}, "alignment_bits"),
    ({"alignment_bits": 257}, "alignment_bits"),
    ({"lns_lut_bits": 0}, "lns_lut_bits"),
    ({"lns_mitchell_bits": -1}, "lns_mitchell_bits"),
    ({"posit_decode_reuse": 0.5}, "posit_decode_reuse"),
    ({"lns_datapath": "lut"}, "lns_datapath"),
    ({"vector_length": 16, "lns_conversion_length": 24}, "lns_conversion_length"),
    ({"accumulator": "fp77"}, "accumulator"),
    ({"accumulator": "int(1)"}, "accumulator"),
])
def test_datapath_params_name_the_setting_they_refuse(changes: dict[str, object], setting: str) -> None:
    with pytest.raises(SettingError) as raised:
        DatapathParams(**changes)  # type: ignore[arg-type]
    assert raised.value.setting == setting
    assert len(str(raised.value).splitlines()) == 1


@pytest.mark.parametrize("accumulator", ["int32", "fp16", "quire", "bf16", "fp(e=6,m=9)", "posit(16,1)"])
def test_datapath_params_accept_every_accumulator_kind(accumulator: str) -> None:
    assert DatapathParams(accumulator=accumulator).accumulator == accumulator


@pytest.mark.parametrize(("changes", "setting"), [
    ({"operand_reuse": 0.5}, "operand_reuse"),
    ({"sram_scaling": "cubic"}, "sram_scaling"),
])
def test_memory_params_name_the_setting_they_refuse(changes: dict[str, object], setting: str) -> None:
    with pytest.raises(SettingError) as raised:
        MemoryParams(**changes)  # type: ignore[arg-type]
    assert raised.value.setting == setting


@pytest.mark.parametrize(("kwargs", "setting"), [
    ({"node": "3nm"}, "node"),
    ({"node": "big"}, "node"),
    ({"scope": "chip"}, "scope"),
    ({"node_scaling": "linear"}, "node_scaling"),
    ({"memory": MemoryParams(sram="tiny")}, "memory.sram"),
    ({"memory": MemoryParams(dram="ddr9")}, "memory.dram"),
    ({"table": "/no/such/table.yaml"}, "table"),
])
def test_build_model_names_the_argument_it_refuses(kwargs: dict[str, object], setting: str) -> None:
    with pytest.raises(SettingError) as raised:
        build_model(**kwargs)  # type: ignore[arg-type]
    assert raised.value.setting == setting
