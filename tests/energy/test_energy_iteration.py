"""The training-iteration tally: GEMM counts, tensor widths, optimizer state and the DataFrame."""

from __future__ import annotations

import pytest

from dse.energy import (
    TrainingFormats,
    build_model,
    datapath_for,
    iteration_energy,
    pass_unit_table,
    per_mac,
    summarize,
    unit_totals,
)
from dse.energy.iteration import COLUMNS, PASSES, UNITS
from dse.formats import get
from dse.models.workloads import GemmLayer, Workload, get_workload, linear

MODEL = build_model("45nm")


def _single_linear() -> Workload:
    return Workload("one-linear", (linear("fc", 256, 64, first=True),), batch_size=8)




def test_frame_shape_and_attrs() -> None:
    frame = iteration_energy("resnet18", get("int8"), MODEL)
    assert tuple(frame.columns) == COLUMNS
    assert set(frame["pass"]) == set(PASSES) - {"recompute"}  # (resnet18 checkpoints no layer)
    assert set(frame["unit"]) <= set(UNITS)
    assert (frame["energy_pj"] > 0).all()
    workload = get_workload("resnet18")
    forward = workload.forward_macs(32)
    first = workload.layers[0].macs_per_sample * 32
    assert frame.attrs["macs"] == 3 * forward - first  # no input gradient for the first layer
    table = pass_unit_table(frame)
    assert table.loc["total", "total"] == pytest.approx(frame["energy_pj"].sum())


def test_single_layer_compute_matches_the_datapath() -> None:
    """Forward pass of one linear layer: MACs x per-MAC energy at K = 256, plus the output conversion."""
    frame = iteration_energy(_single_linear(), get("lns8"), MODEL)
    forward = frame[(frame["pass"] == "forward")]
    datapath = datapath_for(get("lns8"), get("lns8"), MODEL.components, MODEL.datapath)
    macs = 8 * 256 * 64
    expected = datapath.per_mac(256)  # 16 groups of K = 16
    got = summarize(forward, "unit").set_index("unit")["energy_pj"]
    assert got["multiply"] == pytest.approx(macs * expected.multiply_pj)
    assert got["accumulation"] == pytest.approx(macs * expected.accumulation_pj)
    assert got["conversion"] > macs * expected.conversion_pj  # plus the int -> LNS output conversion
    assert "backward_data" not in set(frame["pass"])


def test_gemm_memory_is_linear_in_bit_width() -> None:
    def gemm_memory(spec: str) -> float:
        frame = iteration_energy("bert-base", get(spec), MODEL, batch_size=2)
        return frame[(frame["unit"] == "memory") & (frame["pass"] != "update")]["energy_pj"].sum()

    assert gemm_memory("int16") == pytest.approx(2 * gemm_memory("int8"))
    assert gemm_memory("mxint8") == pytest.approx(gemm_memory("int8") * 8.25 / 8)  # shared scale, 8 bits / 32


def test_tensor_classes_can_differ() -> None:
    mixed = TrainingFormats.of(get("fp8_e4m3"), gradients=get("fp8_e5m2"))
    frame = iteration_energy("resnet18", mixed, MODEL)
    assert "G=fp8_e5m2" in frame.attrs["formats"]
    uniform = iteration_energy("resnet18", get("fp8_e4m3"), MODEL)
    assert frame["energy_pj"].sum() != pytest.approx(uniform["energy_pj"].sum(), rel=1e-9)


def test_optimizer_state_and_master_copy() -> None:
    def update_memory(formats: TrainingFormats) -> dict[str, float]:
        frame = iteration_energy("resnet18", formats, MODEL)
        sums = summarize(frame[frame["pass"] == "update"], "tensor")
        return dict(zip(sums["tensor"], sums["energy_pj"], strict=True))

    lns = update_memory(TrainingFormats.of(get("lns8")))
    assert "master_weights" not in lns  # Madam updates the LNS weights in place
    sgd = update_memory(TrainingFormats.of(get("int8"), optimizer="sgd"))
    adam = update_memory(TrainingFormats.of(get("int8"), optimizer="adam"))
    assert adam["optimizer_state"] == pytest.approx(2 * sgd["optimizer_state"])
    assert sgd["master_weights"] > 0
    frame = iteration_energy("resnet18", TrainingFormats.of(get("lns8"), optimizer="sgd"), MODEL)
    assert "opt=sgd master=fp32" in frame.attrs["formats"]


def test_forward_compute_is_linear_in_batch() -> None:
    def forward_multiply(batch: int) -> float:
        frame = iteration_energy("resnet18", get("fp8_e4m3"), MODEL, batch_size=batch)
        return frame[(frame["pass"] == "forward") & (frame["unit"] == "multiply")]["energy_pj"].sum()

    assert forward_multiply(4) == pytest.approx(4 * forward_multiply(1))


def test_smaller_node_smaller_logic_energy_same_dram() -> None:
    small = build_model("7nm")
    big_frame = iteration_energy("bert-base", get("bf16"), MODEL)
    small_frame = iteration_energy("bert-base", get("bf16"), small)
    big, little = unit_totals(big_frame), unit_totals(small_frame)
    assert little["multiply"] < big["multiply"] / 2
    dram = [f[(f["level"] == "dram")]["energy_pj"].sum() for f in (big_frame, small_frame)]
    assert dram[0] == pytest.approx(dram[1])


def test_per_mac_average_includes_output_conversion() -> None:
    frame = iteration_energy("resnet50", get("int8"), MODEL)
    average = per_mac(frame)
    assert average.multiply_pj == pytest.approx(0.2, rel=0.01)
    assert 0 < average.conversion_pj < 0.01


def test_attention_has_no_weight_gradient() -> None:
    layer = GemmLayer("attn.scores", m=4, k=2, n=4, groups=2, b_is_weight=False, kind="attention")
    frame = iteration_energy(Workload("attn-only", (layer,), batch_size=2), get("bf16"), MODEL)
    assert "update" not in set(frame["pass"])
    assert "weight_grads" not in set(frame["tensor"])
