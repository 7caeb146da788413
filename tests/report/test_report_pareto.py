"""Pareto fronts against a brute-force dominance check, per task, with NaNs, ties and the memory objective."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dse.errors import InputError
from dse.report import all_fronts, pareto_front

W = "resnet50"


def summary_frame(points: list[tuple[str, float, float, float]]) -> pd.DataFrame:
    """(task, accuracy, energy, memory) per configuration; labels c0, c1, ... in row order."""
    return pd.DataFrame({
        "task": [p[0] for p in points], "label": [f"c{i}" for i in range(len(points))],
        "accuracy_mean": [p[1] for p in points], "accuracy_std": [0.01] * len(points),
        f"energy_mj:{W}": [p[2] for p in points], f"memory_mib:{W}": [p[3] for p in points],
    })


def dominates(a: pd.Series, b: pd.Series, memory: bool) -> bool:
    """Brute force: a is no worse than b everywhere and strictly better somewhere."""
    objectives = [(a["accuracy_mean"], b["accuracy_mean"], 1), (a[f"energy_mj:{W}"], b[f"energy_mj:{W}"], -1)]
    if memory:
        objectives.append((a[f"memory_mib:{W}"], b[f"memory_mib:{W}"], -1))
    no_worse = all(sign * (x - y) >= 0 for x, y, sign in objectives)
    better = any(sign * (x - y) > 0 for x, y, sign in objectives)
    return no_worse and better


def finite(row: pd.Series, memory: bool) -> bool:
    names = ["accuracy_mean", f"energy_mj:{W}"] + ([f"memory_mib:{W}"] if memory else [])
    return all(math.isfinite(row[n]) for n in names)


# Few distinct values so that ties and exact duplicates are common; NaN stands for an all-error config.
accuracies = st.sampled_from([0.1, 0.5, 0.8, 0.9, 0.95, math.nan])
energies = st.sampled_from([0.5, 1.0, 2.0, 4.0, 8.0])
memories = st.sampled_from([1.0, 2.0, 3.0])
points = st.lists(st.tuples(st.sampled_from(["mlp-digits", "cnn-m1d", "t3"]), accuracies, energies, memories),
                  min_size=0, max_size=25)


@settings(max_examples=150, deadline=None)
@given(points=points, memory=st.booleans())
def test_front_matches_brute_force_dominance(points: list[tuple[str, float, float, float]],
                                             memory: bool) -> None:
    summary = summary_frame(points)
    front = pareto_front(summary, W, memory_objective=memory)
    on_front = set(zip(front["task"], front["label"], strict=True))
    for task, rows in summary.groupby("task"):
        candidates = [row for _, row in rows.iterrows() if finite(row, memory)]
        for row in candidates:
            beaten_by = [other for other in candidates if dominates(other, row, memory)]
            if (task, row["label"]) in on_front:
                assert not beaten_by, f"{row['label']} is on the front but dominated"
            else:
                assert any((task, o["label"]) in on_front for o in beaten_by), f"{row['label']} left out"
    finite_labels = {(r["task"], r["label"]) for _, r in summary.iterrows() if finite(r, memory)}
    assert on_front <= finite_labels  # NaN accuracy (all seeds raised) is never on the front
    assert len(on_front) == len(front)
    assert (front["workload"] == W).all()


@settings(max_examples=60, deadline=None)
@given(points=points, memory=st.booleans(), seed=st.integers(0, 2**16))
def test_front_does_not_depend_on_row_order(points: list[tuple[str, float, float, float]], memory: bool,
                                            seed: int) -> None:
    summary = summary_frame(points)
    shuffled = summary.sample(frac=1.0, random_state=seed)
    first = pareto_front(summary, W, memory)
    second = pareto_front(shuffled, W, memory)
    key = ["task", "label"]
    pd.testing.assert_frame_equal(first.sort_values(key).reset_index(drop=True),
                                  second.sort_values(key).reset_index(drop=True))
    for _, rows in second.groupby("task"):  # within a task: energy up, then accuracy down, then label
        energy = rows["energy_mj"].to_numpy()
        assert (np.diff(energy) >= 0).all()


def test_hand_worked_front_with_duplicates_and_an_error_config() -> None:
    summary = summary_frame([
        ("t", 0.90, 1.0, 1.0),      # c0 A: on the front
        ("t", 0.95, 2.0, 1.0),      # c1 B: on the front
        ("t", 0.90, 3.0, 1.0),      # c2: dominated by A
        ("t", 0.80, 0.5, 1.0),      # c3: cheapest, on the front
        ("t", 0.95, 2.0, 1.0),      # c4: exact duplicate of B, kept too
        ("t", math.nan, 0.1, 1.0),  # c5: every seed raised
        ("t", 0.95, 2.5, 1.0),      # c6: dominated by B (same accuracy, more energy)
    ])
    front = pareto_front(summary, W)
    assert list(front["label"]) == ["c3", "c0", "c1", "c4"]
    assert list(front["energy_mj"]) == [0.5, 1.0, 2.0, 2.0]
    assert list(front.columns[:3]) == ["task", "workload", "label"]


def test_tasks_are_separate_and_memory_adds_a_dimension() -> None:
    summary = summary_frame([
        ("a", 0.90, 1.0, 5.0),   # c0
        ("a", 0.90, 2.0, 1.0),   # c1: worse energy than c0, but less memory
        ("b", 0.50, 3.0, 9.0),   # c2: dominated by c0 and c1 if tasks were mixed
    ])
    assert list(pareto_front(summary, W)["label"]) == ["c0", "c2"]
    assert list(pareto_front(summary, W, memory_objective=True)["label"]) == ["c0", "c1", "c2"]


def test_all_fronts_stacks_every_task_and_workload() -> None:
    summary = summary_frame([("a", 0.9, 1.0, 1.0), ("b", 0.8, 1.0, 1.0)])
    summary["energy_mj:proxy"] = [2.0, 3.0]
    fronts = all_fronts(summary, [W, "proxy"])
    assert list(zip(fronts["task"], fronts["workload"], strict=True)) == [
        ("a", W), ("a", "proxy"), ("b", W), ("b", "proxy")]
    assert list(fronts["energy_mj"]) == [1.0, 2.0, 1.0, 3.0]


def test_unknown_workload_or_missing_memory_is_one_line_input_error() -> None:
    summary = summary_frame([("a", 0.9, 1.0, 1.0)])
    with pytest.raises(InputError, match="'energy_mj:bert-base'.*workload 'bert-base'") as caught:
        pareto_front(summary, "bert-base")
    assert "\n" not in str(caught.value)
    with pytest.raises(InputError, match="memory_mib:resnet50"):
        pareto_front(summary.drop(columns=[f"memory_mib:{W}"]), W, memory_objective=True)


def test_the_front_ranks_by_the_runs_mean_energy_where_the_results_have_it() -> None:
    """c1 is cheaper per steady-state iteration than c0 and as accurate, but its run (an fp32 warm-up)
    costs more per iteration: ranked by the run, c0 dominates it; without run columns, c1 wins."""
    summary = summary_frame([("t", 0.9, 2.0, 1.0), ("t", 0.9, 1.0, 1.0)])
    assert list(pareto_front(summary, W)["label"]) == ["c1"]
    summary[f"run_mean_energy_mj:{W}"] = [2.0, 3.0]
    summary[f"run_energy_mj:{W}"] = [200.0, 300.0]
    front = pareto_front(summary, W)
    assert list(front["label"]) == ["c0"]
    assert front.iloc[0][["energy_mj", "iteration_energy_mj", "run_energy_mj"]].tolist() == [2.0, 2.0, 200.0]


def test_a_configuration_without_a_run_mean_is_not_dropped_the_front_ranks_all_by_one_iteration() -> None:
    """An old store's warm-up trial has no run mean (its warm-up energy was never priced). Ranked by the
    run's mean it would silently leave the front, so every front of the summary ranks by one iteration
    instead, one measure for all configurations and workloads."""
    summary = summary_frame([("t", 0.9, 2.0, 1.0), ("t", 0.9, 1.0, 1.0), ("u", 0.5, 1.0, 1.0)])
    summary[f"run_mean_energy_mj:{W}"] = [2.0, math.nan, 1.0]
    summary[f"run_energy_mj:{W}"] = [200.0, math.nan, 100.0]
    fronts = all_fronts(summary, [W])
    assert list(fronts["label"]) == ["c1", "c2"]
    assert "iteration_energy_mj" not in fronts.columns  # (the tables label it one iteration's energy)
    assert fronts["energy_mj"].tolist() == [1.0, 1.0]


def test_a_configuration_that_trained_nothing_does_not_keep_the_others_from_their_run_mean() -> None:
    """A configuration whose every seed diverged at its first batch trained no iteration: its run's total
    is that batch's forward and it has no mean, which is no reason to rank the others by one iteration."""
    summary = summary_frame([("t", 0.9, 2.0, 1.0), ("t", 0.9, 1.0, 1.0), ("t", 0.1, 0.5, 1.0)])
    summary[f"run_mean_energy_mj:{W}"] = [2.0, 3.0, math.nan]
    summary[f"run_energy_mj:{W}"] = [200.0, 300.0, 0.2]
    front = pareto_front(summary, W)
    assert list(front["label"]) == ["c0"]
    assert "iteration_energy_mj" in front.columns
