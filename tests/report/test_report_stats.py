"""Statistics in the reports: the t-interval of each mean and Welch's comparison with the baseline and with
the best, checked against the textbook formulas evaluated here with scipy.stats' t distribution (not
with the code under test); and tuning that chooses by validation, never by test."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from typer.testing import CliRunner

from dse.cli import app
from dse.report import summarize_trials
from dse.report.plots import accuracy_energy_figure, tied_with_best
from dse.report.stats import mean_interval, welch
from dse.sweep import load_trials, parse_config, run_sweep
from dse.sweep.executors import InlineExecutor


def mean_of(x: np.ndarray | list[float]) -> float:
    """The seeds' mean correctly rounded: their exact sum over their count."""
    return float(sum(map(Fraction, list(x)), Fraction(0)) / len(x))


def t_interval(x: np.ndarray) -> tuple[float, float]:
    """mean ± t(0.975, n-1) s / sqrt(n)."""
    half = stats.t.ppf(0.975, len(x) - 1) * np.std(x, ddof=1) / math.sqrt(len(x))
    return mean_of(x) - half, mean_of(x) + half


def welch_by_hand(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Welch's interval of mean(x) - mean(y) and its two-sided p-value, Welch-Satterthwaite df."""
    vx, vy = np.var(x, ddof=1) / len(x), np.var(y, ddof=1) / len(y)
    se = math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))
    delta = mean_of(x) - mean_of(y)
    half = stats.t.ppf(0.975, df) * se
    return delta - half, delta + half, 2 * stats.t.sf(abs(delta / se), df)


accuracies = st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=2, max_size=8).filter(
    lambda v: np.std(v, ddof=1) > 1e-6)


@settings(max_examples=60, deadline=None)
@given(accuracies, accuracies)
def test_intervals_and_p_values_match_the_formulas(a: list[float], b: list[float]) -> None:
    x, y = np.array(a), np.array(b)
    interval = mean_interval(x)
    assert interval.n == len(x) and interval.mean == mean_of(x)
    assert (interval.low, interval.high) == pytest.approx(t_interval(x), rel=1e-9, abs=1e-12)
    low, high, p = welch_by_hand(x, y)
    difference = welch(x, y)
    assert difference.delta == mean_of(x) - mean_of(y)
    assert (difference.low, difference.high) == pytest.approx((low, high), rel=1e-7, abs=1e-9)
    assert difference.p_value == pytest.approx(p, rel=1e-6, abs=1e-12)


def test_too_few_or_constant_samples_have_no_interval() -> None:
    assert math.isnan(mean_interval([0.9]).low) and mean_interval([0.9]).mean == 0.9
    assert mean_interval([]).n == 0 and math.isnan(mean_interval([]).mean)
    assert (mean_interval([0.5, 0.5]).low, mean_interval([0.5, 0.5]).high) == (0.5, 0.5)
    one = welch([0.9], [0.8, 0.7])
    assert math.isnan(one.p_value) and one.delta == pytest.approx(0.15)
    constant = welch([0.9, 0.9], [0.8, 0.8])
    assert constant.delta == pytest.approx(0.1) and math.isnan(constant.p_value)


seeds = st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=10)


@settings(max_examples=100, deadline=None)
@given(seeds, seeds)
def test_every_seed_mean_is_the_exact_mean(a: list[float], b: list[float]) -> None:
    """Accuracy means over seeds follow the rule energies do (`exact_mean`, the correctly rounded mean):
    seeds of equal accuracy have it as their mean to the last bit (numpy's mean of three seeds of 0.1
    is 0.10000000000000002)."""
    exact_a, exact_b = mean_of(a), mean_of(b)
    assert mean_interval(a).mean == exact_a
    assert welch(a, b).delta == exact_a - exact_b
    assert mean_interval([a[0]] * len(a)).mean == a[0]


def test_a_summary_gives_equal_seeds_their_accuracy_as_their_mean(
        make_trial_row: Callable[..., dict[str, Any]],
        make_trials_frame: Callable[..., pd.DataFrame]) -> None:
    """0.1 three times is a mean accuracy of 0.1 (and a delta of 0.1 - 0.2 against 0.2 three times),
    validation and loss means alike."""
    rows = [make_trial_row("t", label, seed, accuracy, {"proxy": 1.0}, format=fmt, val_accuracy=accuracy)
            for label, fmt, accuracy in (("fp32 sgd", "fp32", 0.2), ("int8 sgd", "int8", 0.1))
            for seed in range(3)]
    summary = summarize_trials(make_trials_frame(rows, ["proxy"])).set_index("label")
    assert float(np.mean([0.1] * 3)) != 0.1  # (what numpy gives)
    row = summary.loc["int8 sgd"]
    assert (row["accuracy_mean"], row["val_accuracy_mean"], row["final_loss_mean"]) == (0.1, 0.1, 1.0 - 0.1)
    assert row["delta_mean"] == 0.1 - 0.2


@pytest.fixture
def samples_frame(
        make_trial_row: Callable[..., dict[str, Any]],
        make_trials_frame: Callable[..., pd.DataFrame]) -> Callable[[dict[str, str] | None], pd.DataFrame]:
    """SAMPLES as trials, with the sweep's `baselines` if given."""

    def samples(baselines: dict[str, str] | None = None) -> pd.DataFrame:
        configs = {"fp32 sgd": ("fp32", [0.95, 0.96, 0.94, 0.955]), "bf16 sgd": ("bf16", [0.94, 0.95, 0.955]),
                   "int8 sgd": ("int8", [0.90, 0.92, 0.91, 0.89, 0.93]), "int4 sgd": ("int4", [0.5, 0.7])}
        rows = [make_trial_row("t", label, seed, accuracy, {"proxy": 1.0 + index}, format=fmt)
                for index, (label, (fmt, values)) in enumerate(configs.items())
                for seed, accuracy in enumerate(values)]
        frame = make_trials_frame(rows, ["proxy"])
        if baselines is not None:
            frame.attrs["sweep"]["baselines"] = baselines
        return frame

    return samples


SAMPLES = {"fp32 sgd": [0.95, 0.96, 0.94, 0.955], "bf16 sgd": [0.94, 0.95, 0.955],
           "int8 sgd": [0.90, 0.92, 0.91, 0.89, 0.93], "int4 sgd": [0.5, 0.7]}


@pytest.mark.parametrize("baseline", [None, "int8 sgd"])
def test_summary_columns_match_the_formulas(
        samples_frame: Callable[[dict[str, str] | None], pd.DataFrame], baseline: str | None) -> None:
    summary = summarize_trials(samples_frame({"t": baseline} if baseline else None)).set_index("label")
    reference = np.array(SAMPLES[baseline or "fp32 sgd"])
    best = np.array(SAMPLES["fp32 sgd"])  # the highest mean
    for label, values in SAMPLES.items():
        x = np.array(values)
        row = summary.loc[label]
        assert row["n"] == len(x) and row["baseline"] == (baseline or "fp32 sgd")
        assert (row["accuracy_ci_low"], row["accuracy_ci_high"]) == pytest.approx(t_interval(x))
        low, high, p = welch_by_hand(x, reference)
        assert row["delta_mean"] == mean_of(x) - mean_of(reference)
        assert (row["delta_ci_low"], row["delta_ci_high"], row["p_value"]) == pytest.approx((low, high, p))
        expected_best = 1.0 if label == "fp32 sgd" else welch_by_hand(x, best)[2]
        assert row["p_vs_best"] == pytest.approx(expected_best)


def test_the_tables_show_interval_difference_and_p(
        samples_frame: Callable[[dict[str, str] | None], pd.DataFrame]) -> None:
    from dse.report.tables import summary_text_table

    summary = summarize_trials(samples_frame(None))
    table = summary_text_table(summary, ["proxy"])
    x, reference = np.array(SAMPLES["int8 sgd"]), np.array(SAMPLES["fp32 sgd"])
    low, high, p = welch_by_hand(x, reference)
    row = dict(zip(table.columns, table.rows[2], strict=True))
    assert row["Config"] == "int8 sgd" and row["n"] == "5"
    ci_low, ci_high = t_interval(x)
    assert row["95 % CI"] == f"[{100 * ci_low:.2f}, {100 * ci_high:.2f}]"
    assert row["Δ vs baseline (pts) [95 % CI]"] == (
        f"{100 * (mean_of(x) - mean_of(reference)):+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]")
    assert row["p (Welch)"] == ("<0.001" if p < 0.001 else f"{p:.3f}")
    assert "baseline t: fp32 sgd" in table.title


def test_a_task_without_fp32_is_compared_with_nothing(make_trial_row: Callable[..., dict[str, Any]],
                                                      make_trials_frame: Callable[..., pd.DataFrame]) -> None:
    rows = [make_trial_row("t", "int8 sgd", seed, 0.9 + seed / 100, {"proxy": 1.0}, format="int8")
            for seed in range(3)]
    summary = summarize_trials(make_trials_frame(rows, ["proxy"]))
    assert summary["baseline"].iloc[0] == "" and math.isnan(summary["p_value"].iloc[0])


def test_the_plot_stars_front_points_tied_with_the_best(
        samples_frame: Callable[[dict[str, str] | None], pd.DataFrame]) -> None:
    summary = summarize_trials(samples_frame(None))
    # energies 1, 2, 3, 4 for fp32, bf16, int8, int4 make fp32 the whole front; reversed, all are on it
    summary["energy_mj:proxy"] = [4.0, 3.0, 2.0, 1.0]
    from dse.report.pareto import pareto_front

    front = pareto_front(summary, "proxy")
    tied = dict(zip(front["label"], tied_with_best(front), strict=True))
    best = np.array(SAMPLES["fp32 sgd"])
    for label, values in SAMPLES.items():
        expected = label == "fp32 sgd" or welch_by_hand(np.array(values), best)[2] >= 0.05
        assert tied[label] == expected
    assert tied["fp32 sgd"] and tied["bf16 sgd"] and not tied["int8 sgd"]
    figure = accuracy_energy_figure(summary, "t", "proxy", title=True)
    labels = figure.axes[0].get_legend_handles_labels()[1]
    assert "front, not significantly below the best (Welch p ≥ 0.05)" in labels
    assert figure.axes[0].get_title().endswith("n = 2-5 seeds")  # int4 has two seeds, int8 five


# --- tuning chooses by validation -------------------------------------------------------------------

TUNED = """\
name: tuned
seeds: [0, 1, 2]
task: {{model: mlp, dataset: digits, epochs: 1}}
trials:
  - {{format: fp32, lr: 0.01}}
  - {{format: int8, tune: {{lr: [0.01, 0.03, 0.1]}}}}
output: {output}
"""


@pytest.fixture(scope="module")
def tuned_sweep(validated_train: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("tuned") / "out"
    run_sweep(parse_config(TUNED.format(output=output), "t.yaml"), train_fn=validated_train,
              executor=InlineExecutor())
    return output


def test_tuning_chooses_by_validation_when_test_disagrees(tuned_sweep: Path) -> None:
    trials = load_trials(tuned_sweep)
    int8 = trials[trials["label"] != "fp32 sgd lr=0.01"]
    by_point = int8.groupby("tuned:lr")[["val_accuracy", "test_accuracy"]].mean()
    assert by_point["val_accuracy"].idxmax() == 0.03 and by_point["test_accuracy"].idxmax() == 0.1
    summary = summarize_trials(trials).set_index("label")
    chosen = summary.loc["int8 sgd lr=tuned"]
    assert chosen["tuned:lr"] == 0.03 and chosen["n_points"] == 3
    assert chosen["accuracy_mean"] == pytest.approx(by_point.loc[0.03, "test_accuracy"])
    assert chosen["val_accuracy_mean"] == pytest.approx(by_point.loc[0.03, "val_accuracy"])
    assert math.isnan(summary.loc["fp32 sgd lr=0.01", "tuned:lr"])
    pareto = pd.read_csv(tuned_sweep / "pareto.csv")  # the files report the chosen point too
    assert set(pareto.loc[pareto["label"] == "int8 sgd lr=tuned", "tuned:lr"]) <= {0.03}
    written = pd.read_csv(tuned_sweep / "summary.csv").set_index("label")
    assert written.loc["int8 sgd lr=tuned", "tuned:lr"] == 0.03


def test_all_points_shows_every_tuning_point_and_marks_the_chosen_one(tuned_sweep: Path) -> None:
    points = summarize_trials(load_trials(tuned_sweep), all_points=True)
    int8 = points[points["label"].str.startswith("int8")]
    assert list(int8["label"]) == [f"int8 sgd lr=tuned lr={lr}" for lr in (0.01, 0.03, 0.1)]
    assert list(int8["chosen"]) == [False, True, False] and set(int8["n_points"]) == {3}
    assert int8.set_index("tuned:lr")["accuracy_mean"].idxmax() == 0.1  # the test set would have chosen 0.1
    result = CliRunner().invoke(app, ["report", str(tuned_sweep), "--all-points"])
    assert result.exit_code == 0, result.output
    assert "Every tuning point" in result.stdout and "lr=0.1" in result.stdout
    exported = CliRunner().invoke(app, ["export", str(tuned_sweep), "--to", "csv", "--all-points"])
    assert len(pd.read_csv(pd.io.common.StringIO(exported.stdout))) == 4
    assert len(pd.read_csv(tuned_sweep / "all_points.csv")) == 4


def test_several_points_without_validation_choose_nothing(
        make_trial_row: Callable[..., dict[str, Any]],
        make_trials_frame: Callable[..., pd.DataFrame]) -> None:
    rows = [make_trial_row("t", "int8 sgd", seed, accuracy, {"proxy": 1.0}, val_accuracy=math.nan,
                           tuning={"lr": lr}, format="int8")
            for lr, accuracy in ((0.01, 0.8), (0.1, 0.9)) for seed in range(2)]
    summary = summarize_trials(make_trials_frame(rows, ["proxy"]))
    assert len(summary) == 1 and math.isnan(summary["accuracy_mean"].iloc[0])
    assert math.isnan(summary["tuned:lr"].iloc[0]) and summary["n_points"].iloc[0] == 2
    assert json.loads(rows[0]["tuning"]) == {"lr": 0.01}


def test_the_sweep_headline_names_a_trial_of_a_chosen_point(tuned_sweep: Path) -> None:
    from dse.sweep.summary import best_of

    best = best_of(load_trials(tuned_sweep))
    trials = load_trials(tuned_sweep).set_index("trial_id")
    assert best is not None and trials.loc[best.trial_id, "tuned:lr"] != 0.1  # 0.1 wins on test only


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=6, max_size=6),
       st.permutations(range(6)))
def test_the_choice_follows_validation_whatever_the_test_accuracies(
        make_trial_row: Callable[..., dict[str, Any]], make_trials_frame: Callable[..., pd.DataFrame],
        pairs: list[tuple[float, float]], order: list[int]) -> None:
    """Three lr points x two seeds: the chosen point is the best validation mean (first on a tie),
    and shuffling the test accuracies among the trials never changes it."""
    lrs = (0.01, 0.03, 0.1)

    def frame(tests: list[float]) -> pd.DataFrame:
        rows = [make_trial_row("t", "int8 sgd", seed, tests[2 * i + seed], {"proxy": 1.0},
                               val_accuracy=pairs[2 * i + seed][0], tuning={"lr": lr}, format="int8")
                for i, lr in enumerate(lrs) for seed in range(2)]
        return make_trials_frame(rows, ["proxy"])

    tests = [test for _, test in pairs]
    means = [np.mean([pairs[2 * i][0], pairs[2 * i + 1][0]]) for i in range(3)]
    expected = lrs[int(np.argmax(means))]
    assert summarize_trials(frame(tests))["tuned:lr"].iloc[0] == expected
    assert summarize_trials(frame([tests[j] for j in order]))["tuned:lr"].iloc[0] == expected
