"""Summary over seeds against numpy; LaTeX (booktabs, escaping) and Markdown renderings; export choices."""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from dse.errors import InputError
from dse.report import render_table, summarize_trials
from dse.report.tables import latex_escape, latex_table, markdown_table, summary_text_table

trial = st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["x", "y", "z"]),
                  st.floats(0.0, 1.0), st.sampled_from(["ok", "ok", "diverged", "error"]))


@settings(max_examples=80, deadline=None)
@given(trials=st.lists(trial, min_size=1, max_size=30))
def test_summary_mean_and_std_over_seeds_match_numpy(make_trial_row: Callable[..., dict[str, Any]],
                                                     make_trials_frame: Callable[..., pd.DataFrame],
                                                     trials: list[tuple[str, str, float, str]]) -> None:
    rows = [make_trial_row(task, label, seed, accuracy, {"w": 2.0 + len(label)}, status=status)
            for seed, (task, label, accuracy, status) in enumerate(trials)]
    summary = summarize_trials(make_trials_frame(rows, ["w"]))
    keys = list(dict.fromkeys((t[0], t[1]) for t in trials))
    assert list(zip(summary["task"], summary["label"], strict=True)) == keys
    for (task, label), (_, row) in zip(keys, summary.iterrows(), strict=True):
        group = [t for t in trials if (t[0], t[1]) == (task, label)]
        counted = np.array([t[2] for t in group if t[3] != "error"])  # diverged runs count
        assert row["n_seeds"] == len(group)
        assert row["n_error"] == sum(t[3] == "error" for t in group)
        assert row["n_diverged"] == sum(t[3] == "diverged" for t in group)
        assert row["n_ok"] == sum(t[3] == "ok" for t in group)
        if len(counted) == 0:
            assert math.isnan(row["accuracy_mean"])
        else:
            assert row["accuracy_mean"] == pytest.approx(np.mean(counted))
        if len(counted) < 2:
            assert math.isnan(row["accuracy_std"])
        else:
            assert row["accuracy_std"] == pytest.approx(np.std(counted, ddof=1))
        assert row["energy_mj:w"] == 2.0 + len(label)
        assert row["energy_mj:w:multiply"] == pytest.approx(0.4 * (2.0 + len(label)))


def test_summary_carries_the_configuration_and_needs_the_trial_columns(example_trials: pd.DataFrame) -> None:
    summary = summarize_trials(example_trials)
    row = summary[(summary["task"] == "mlp-digits") & (summary["label"] == "lns8 madam")].iloc[0]
    assert (row["weights"], row["optimizer"], row["dataset"]) == ("lns(8,gamma=8)", "lns-madam", "digits")
    assert row["energy_mj:proxy"] == 1.0 and row["memory_mib:resnet50"] == 2500.0
    assert summary.attrs["sweep"]["workloads"] == ["proxy", "resnet50"]
    with pytest.raises(InputError, match="'test_accuracy'"):
        summarize_trials(example_trials.drop(columns=["test_accuracy"]))


def test_latex_escape_of_every_special() -> None:
    assert latex_escape("fp8_e4m3 & 50% $5 #1 {a} ~b ^c \\d") == (
        r"fp8\_e4m3 \& 50\% \$5 \#1 \{a\} \textasciitilde{}b \textasciicircum{}c \textbackslash{}d")
    assert latex_escape("lns(8,gamma=8)") == "lns(8,gamma=8)"
    assert latex_escape("95.00 ± 1.00") == r"95.00 $\pm$ 1.00"


def unescaped_specials(line: str) -> list[str]:
    """Specials left bare in a tabular row, once the column separators and $\\pm$ are taken out."""
    body = line.removesuffix(r" \\").replace(" & ", " ").replace(r"$\pm$", "").replace(r"$\Delta$", "")
    return re.findall(r"(?<!\\)[_%&#$^~{}]", re.sub(r"\\text\w+\{\}", "", body))


def test_summary_latex_is_a_booktabs_tabular_with_escaped_cells(example_trials: pd.DataFrame) -> None:
    summary = summarize_trials(example_trials)
    table = summary_text_table(summary, ["proxy", "resnet50"])
    text = latex_table(table)
    lines = text.splitlines()
    assert lines[0].startswith("%")
    spec = re.fullmatch(r"\\begin\{tabular\}\{([lr]+)\}", lines[1])
    assert spec and len(spec.group(1)) == len(table.columns)
    assert lines[2] == r"\toprule" and lines[4] == r"\midrule"
    assert lines[-2:] == [r"\bottomrule", r"\end{tabular}"]
    rows = [line for line in lines[3:-2] if line != r"\midrule"]
    assert len(rows) == 1 + len(summary)
    for line in rows:
        assert line.endswith(r" \\")
        assert line.count(" & ") == len(table.columns) - 1
        assert unescaped_specials(line) == [], line
    assert r"posit8 \& 50\%" in text and r"fp8\_e4m3 adam" in text and "lns(8,gamma=8)" in text
    # fp32 sgd on mlp-digits: 0.95, 0.96, 0.94 -> 95.00 and its t-interval, computed here from the formula
    half = stats.t.ppf(0.975, 2) * np.std([95.0, 96.0, 94.0], ddof=1) / math.sqrt(3)
    assert f"95.00 & [{95 - half:.2f}, {95 + half:.2f}]" in text
    # two tasks: one extra \midrule between them
    assert text.count(r"\midrule") == 2
    assert text.count(r"\toprule") == 1 and text.count(r"\bottomrule") == 1


def test_markdown_table_shape(make_trial_row: Callable[..., dict[str, Any]],
                              make_trials_frame: Callable[..., pd.DataFrame]) -> None:
    rows = [make_trial_row("t", "pipe|label", 0, 0.9, {"w": 1.0}, format="fp8_e4m3"),
            make_trial_row("t", "other", 0, 0.8, {"w": 0.5})]
    summary = summarize_trials(make_trials_frame(rows, ["w"]))
    table = summary_text_table(summary, ["w"])
    lines = markdown_table(table).splitlines()
    assert len(lines) == 2 + len(summary)
    cells_per_line = [len(re.split(r"(?<!\\)\|", line)) - 2 for line in lines]
    assert cells_per_line == [len(table.columns)] * len(lines)
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines)
    separator = [c.strip() for c in lines[1].strip("|").split("|")]
    assert separator == ["---:" if n else "---" for n in table.numeric]
    assert r"pipe\|label" in lines[2] and "90.00" in lines[2]


def test_weight_gradient_column_only_when_some_differ_from_the_gradients(
        make_trial_row: Callable[..., dict[str, Any]],
        make_trials_frame: Callable[..., pd.DataFrame]) -> None:
    same = [make_trial_row("t", "a", 0, 0.9, {"w": 1.0}, format="int8", weight_grads="int8")]
    differ = same + [make_trial_row("t", "b", 0, 0.9, {"w": 1.0}, format="int8", weight_grads="fp32")]
    hidden = summary_text_table(summarize_trials(make_trials_frame(same, ["w"])), ["w"])
    assert "Weight grads" not in hidden.columns
    table = summary_text_table(summarize_trials(make_trials_frame(differ, ["w"])), ["w"])
    assert table.columns[2:6] == ("Weights", "Activations", "Gradients", "Weight grads")
    assert [row[5] for row in table.rows] == ["int8", "fp32"]


def test_render_table_csv_round_trips_and_rejects_unknown_choices(example_trials: pd.DataFrame) -> None:
    trials = example_trials
    summary = pd.read_csv(io.StringIO(render_table(trials, "summary", "csv")))
    expected = summarize_trials(trials)
    assert list(summary.columns) == list(expected.columns)
    np.testing.assert_allclose(summary["accuracy_mean"], expected["accuracy_mean"])
    pareto = pd.read_csv(io.StringIO(render_table(trials, "pareto", "csv")))
    assert {"task", "workload", "label", "energy_mj", "energy_mj:multiply"} <= set(pareto.columns)
    assert "broken" not in set(pareto["label"])
    assert render_table(trials, "pareto", "latex").count(r"\toprule") == 1
    assert render_table(trials, "summary", "markdown").startswith("| Task | Config |")
    with pytest.raises(InputError, match="unknown table 'front'"):
        render_table(trials, "front", "csv")
    with pytest.raises(InputError, match="unknown export format 'html'"):
        render_table(trials, "summary", "html")


def test_a_configurations_run_energy_is_over_all_its_counted_trials_or_unknown(
        make_trial_row: Callable[..., dict[str, Any]],
        make_trials_frame: Callable[..., pd.DataFrame]) -> None:
    """A mixed store: a seed recorded before iterations were counted has no run total (and, diverged, no
    run mean). The configuration's run figure is not the mean of the other seeds alone; a seed that
    raised trained nothing that counts and is left out, as from the accuracy."""
    runs = [(1.0, 10.0, "ok"), (math.nan, 2.0, "diverged"), (math.nan, math.nan, "error"),
            (0.2, math.nan, "diverged")]  # (the last diverged at its first batch: no mean, its forward)
    rows = []
    for seed, (total, mean, status) in enumerate(runs):
        row = make_trial_row("t", "c", seed, 0.5, {"w": 1.0}, status=status)
        row["run_energy_mj:w"], row["run_mean_energy_mj:w"] = total, mean
        rows.append(row)
    full = make_trials_frame(rows[:1] + rows[2:], ["w"])  # (total: mean of 1.0, 0.2; mean: 10.0 alone)
    mixed = make_trials_frame(rows, ["w"])
    summary_full = summarize_trials(full).iloc[0]
    assert summary_full[["run_energy_mj:w", "run_mean_energy_mj:w"]].tolist() == pytest.approx([0.6, 10.0])
    summary = summarize_trials(mixed).iloc[0]
    assert math.isnan(summary["run_energy_mj:w"]) and summary["run_mean_energy_mj:w"] == 6.0
    rows[1]["run_mean_energy_mj:w"] = math.nan
    assert math.isnan(summarize_trials(make_trials_frame(rows, ["w"])).iloc[0]["run_mean_energy_mj:w"])


@settings(max_examples=200, deadline=None)
@given(energy=st.floats(1e-9, 1e6), accuracy=st.floats(0.0, 1.0), seeds=st.integers(2, 10))
def test_seeds_of_equal_value_have_that_value_as_their_mean_to_the_last_bit(
        make_trial_row: Callable[..., dict[str, Any]], make_trials_frame: Callable[..., pd.DataFrame],
        energy: float, accuracy: float, seeds: int) -> None:
    """A configuration's energy is the same for every seed, and a run of full epochs has it as its run
    mean: the summary (and so pareto.csv and the tables) gives it as the store holds it, not a sum over
    the seeds divided again (three seeds of 0.1 gave 0.10000000000000002)."""
    rows = []
    for seed in range(seeds):
        row = make_trial_row("t", "a", seed, accuracy, {"w": energy})
        row["run_mean_energy_mj:w"], row["run_energy_mj:w"] = energy, energy * 7
        rows.append(row)
    summary = summarize_trials(make_trials_frame(rows, ["w"])).iloc[0]
    assert summary["energy_mj:w"] == energy
    assert summary["run_mean_energy_mj:w"] == energy
    assert summary["run_energy_mj:w"] == energy * 7
    assert summary["memory_mib:w"] == energy * 10.0


def test_the_summary_mean_of_unequal_seeds_is_their_exact_mean_rounded_once(
        make_trial_row: Callable[..., dict[str, Any]],
        make_trials_frame: Callable[..., pd.DataFrame]) -> None:
    from fractions import Fraction

    energies = [0.238, 0.544, 0.37, 0.604]  # numpy and pandas: 0.43900000000000006
    rows = [make_trial_row("t", "a", seed, 0.5, {"w": energy}) for seed, energy in enumerate(energies)]
    summary = summarize_trials(make_trials_frame(rows, ["w"])).iloc[0]
    assert summary["energy_mj:w"] == float(sum(map(Fraction, energies)) / len(energies))
