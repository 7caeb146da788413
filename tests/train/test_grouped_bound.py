"""benchmarks/grouped_bound.py, the ceiling of grouped training, runs its core on a tiny setting (so it
cannot rot) and its arithmetic keeps the ceiling's meaning: a group of one gains nothing, a larger
group never less, nothing passes step / arithmetic, and the GEMM forms it times compute the same
products."""

from __future__ import annotations

import math
from types import ModuleType

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from support.benchmark_scripts import load_benchmark

from dse.data import load_dataset
from dse.train.config import TrainConfig


@pytest.fixture(scope="module")
def bound() -> ModuleType:
    return load_benchmark("grouped_bound")


def test_a_step_splits_alone_and_in_a_group_into_gemms_other_arithmetic_and_dispatch(
        bound: ModuleType) -> None:
    # (Madam, which steps with foreach calls alone as in a group: a group's SGD steps foreach where
    # alone loops over the tensors, fewer calls in all, so its count would not show the members' losses)
    config = TrainConfig(model="mlp", dataset="digits", epochs=1, batch_size=16, format="int8",
                         optimizer="madam")
    # (only what no load changes: the times' signs and the calls counted; a time's size is the
    # benchmark's to report, never a test's to assert)
    floors = bound.call_floors_us(calls=50)
    assert all(math.isfinite(floor) and floor >= 0 for floor in floors)
    splits = bound.step_splits(config, load_dataset("digits"), [2], steps=3, timed_steps=2, rounds=1,
                               floors=floors, warmup=2)
    assert set(splits) == {0, 2}
    for split in splits.values():
        assert split.step_us > 0 and split.gemm_us >= 0 and split.other_us >= 0
        assert split.calls > 20  # the aten calls of a quantized step, all seen by the timer
    assert splits[2].calls > splits[0].calls  # a group also pays for its members' losses


def test_the_timed_gemm_forms_compute_the_members_products(bound: ModuleType) -> None:
    for kind, inputs, outputs, rows in bound.mlp_gemms(batch=4, layers=((3, 5), (5, 2))):
        forms = bound.gemm_forms(rows, inputs, outputs, kind, 3, shared_input=inputs == 3)
        alone = torch.stack(forms["mm"]())
        torch.testing.assert_close(forms["bmm"](), alone)
        if "wide mm" in forms:
            assert forms["wide mm"]().numel() == alone.numel()
    forms = bound.gemm_batching([2], rounds=1, calls=2, batch=4, layers=((3, 5), (5, 2)))
    assert 0 < bound.batched_gemm_scale(forms[2]) < math.inf


splits = st.builds(lambda gemm, other, dispatch: (gemm, other, dispatch),
                   st.floats(1, 1e4), st.floats(0, 1e4), st.floats(0, 1e4))


@given(splits, st.integers(1, 64))
def test_a_group_of_one_gains_nothing_and_a_larger_one_never_less_up_to_step_over_arithmetic(
        bound: ModuleType, parts: tuple[float, float, float], members: int) -> None:
    gemm, other, dispatch = parts
    split = bound.Split(gemm + other + dispatch, gemm, other, 10.0)
    assert bound.member_ceiling(split, 1) == pytest.approx(1.0)
    assert 1 - 1e-9 <= bound.member_ceiling(split, members) <= bound.member_ceiling(split, members + 1) + 1e-9
    assert bound.member_ceiling(split, members + 1) <= bound.member_ceiling(split, math.inf) + 1e-9
    assert bound.member_ceiling(split, math.inf, gemm_scale=0.5) >= bound.member_ceiling(split, math.inf)


def test_a_sweep_gains_nothing_without_a_training_speed_up_and_at_most_end_to_end_over_the_rest(
        bound: ModuleType) -> None:
    times = bound.SweepTimes(12.0, {"fp32": 6.0, "int8": 10.0}, workers=2)
    assert times.rest_s == pytest.approx(4.0)
    assert bound.sweep_ceiling(times, {"fp32": 1.0, "int8": 1.0}) == pytest.approx(1.0)
    assert bound.sweep_ceiling(times, {"fp32": math.inf, "int8": math.inf}) == pytest.approx(3.0)
    assert 1.0 < bound.sweep_ceiling(times, {"fp32": 2.0, "int8": 1.5}) < 3.0
    assert bound.training_ceiling(times, {"fp32": 2.0, "int8": 2.0}) == pytest.approx(2.0)
    assert bound.sweep_ceiling(times, {"fp32": 2.0, "int8": 2.0}) < 2.0  # the fixed costs stay


def test_an_operation_counts_its_fastest_run_above_its_kinds_floor(bound: ModuleType) -> None:
    steps = [[("mm", 10_000), ("add", 5_000), ("view", 500)],
             [("mm", 12_000), ("add", 4_000), ("view", 900)]]
    split = bound._split(30.0, steps, 2, (1.0, 2.0))
    assert split.gemm_us == pytest.approx((10.0 - 1.0) / 2)
    assert split.other_us == pytest.approx((4.0 - 2.0) / 2)  # the view is below the floor: dispatch
    assert split.step_us == 15.0 and split.calls == 3
    with pytest.raises(ValueError, match="different operations"):
        bound._split(30.0, [steps[0], steps[1][:2]], 1, (1.0, 2.0))


@given(st.floats(1, 1e3), st.floats(1, 1e3), st.floats(0, 1e4), st.floats(0, 1e4))
def test_a_members_arithmetic_is_the_groups_growth_per_member_where_alone_counts_fixed_costs_as_more(
        bound: ModuleType, gemm: float, other: float, fixed_gemm: float, fixed_other: float) -> None:
    alone = bound.Split(5e4, gemm + fixed_gemm, other + fixed_other, 100.0)
    group = {size: bound.Split(4e4, gemm + fixed_gemm / size, other + fixed_other / size, 100.0 + size)
             for size in (3, 8)}
    least = bound.least_arithmetic({0: alone, **group})
    assert least.gemm_us == pytest.approx(gemm, rel=1e-6, abs=1e-6)
    assert least.other_us == pytest.approx(other, rel=1e-6, abs=1e-6)
    assert least.step_us == alone.step_us
    cheaper_alone = bound.Split(5e4, gemm / 2, other / 2, 100.0)
    least = bound.least_arithmetic({0: cheaper_alone, **group})
    assert (least.gemm_us, least.other_us) == (cheaper_alone.gemm_us, cheaper_alone.other_us)
