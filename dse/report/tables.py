"""Tables of a sweep: the per-configuration summary over seeds, and text renderings (CSV, LaTeX, Markdown).

`summarize_trials` turns one row per trial into one row per (task, label); the `*_text_table`
functions pick and format the columns a paper shows; `latex_table` and `markdown_table` render them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from dse.errors import InputError
from dse.report.labels import point_label
from dse.report.pareto import (
    COUNT_COLUMNS,
    IDENTITY_COLUMNS,
    STATISTIC_COLUMNS,
    TUNED_PREFIX,
    all_fronts,
    energy_column,
    memory_column,
    run_energy_column,
    workloads_of,
)
from dse.report.stats import exact_mean, mean_interval, welch

REQUIRED_TRIAL_COLUMNS: tuple[str, ...] = ("task", "label", "status", "diverged", "test_accuracy")
TABLES: tuple[str, ...] = ("summary", "pareto")
TEXT_FORMATS: tuple[str, ...] = ("csv", "latex", "markdown")
_MEAN_COLUMNS = {"final_loss": "final_loss_mean", "wall_time_s": "wall_time_s_mean"}
"""Per-trial measurements averaged over a configuration's trials that did not raise."""
MISSING = "–"
"""What a table shows for a missing value (no accuracy, no std from a single seed, no format)."""
BASELINE_FORMAT = "fp32"
"""A task's baseline, unless the sweep names one: its first configuration with every tensor in fp32."""
_NO_TUNING = "{}"

Samples = dict[tuple[Any, Any, Any], np.ndarray]
"""(task, label, tuning point) -> the counted test accuracies of that point, one per seed."""


RUN_PREFIXES: tuple[str, ...] = (run_energy_column(""), run_energy_column("", mean=True))
"""The run's energy per workload column: each trial's own (a diverged seed trained fewer iterations)."""
MEASURED_PREFIXES: tuple[str, ...] = ("energy_mj:", "memory_mib:", "area_um2:", *RUN_PREFIXES)
"""Energy, memory and area per workload column, carried into a summary as their mean over the trials
(`exact_mean`, so that the energy every seed shares stays the store's to the last bit):
the configuration's own (the same for every seed), and the run's energy, over the trials that did not
raise, unknown (NaN) where one of them has none (a seed recorded before dse counted iterations), so
that a configuration's figure never stands for some of its seeds only."""

def _counted(group: pd.DataFrame, column: str) -> np.ndarray:
    """The group's values of `column` from trials that did not raise and have a value."""
    if column not in group.columns:
        return np.zeros(0)
    values = pd.to_numeric(group[column], errors="coerce").to_numpy(dtype=float)
    return values[(group["status"] != "error").to_numpy() & np.isfinite(values)]


def _trained(group: pd.DataFrame, column: str) -> np.ndarray:
    """Per trial, whether it has a mean per iteration to give `column`: a run mean counts the trials
    whose run trained an iteration (a seed that diverged at its first batch has a total, the forward
    of that batch, and no mean; an unknown run has neither and keeps the configuration's mean unknown)."""
    mean_prefix = run_energy_column("", mean=True)
    if not column.startswith(mean_prefix):
        return np.ones(len(group), dtype=bool)
    total = run_energy_column(column[len(mean_prefix):])
    if total not in group.columns:
        return np.ones(len(group), dtype=bool)
    untrained = pd.to_numeric(group[total], errors="coerce").notna() & pd.to_numeric(
        group[column], errors="coerce").isna()
    return (~untrained).to_numpy()


def _validation_mean(group: pd.DataFrame) -> float:
    """The mean validation accuracy of a tuning point's counted trials: what chooses among points."""
    validation = _counted(group, "val_accuracy")
    return exact_mean(validation)


def _points(frame: pd.DataFrame) -> Any:
    """(task, label, tuning point) and its trials, in the frame's order."""
    if "tuning" not in frame.columns:
        frame = frame.assign(tuning=_NO_TUNING)
    return frame.groupby(["task", "label", "tuning"], sort=False, dropna=False)


def _point_rows(frame: pd.DataFrame) -> tuple[list[dict[str, Any]], Samples]:
    """One row per (task, label, tuning point) with counts, accuracy statistics and energy columns."""
    identity = [c for c in IDENTITY_COLUMNS if c in frame.columns]
    tuned = [c for c in frame.columns if str(c).startswith(TUNED_PREFIX)]
    measured = [c for c in frame.columns if str(c).startswith(MEASURED_PREFIXES)]
    rows: list[dict[str, Any]] = []
    samples: Samples = {}
    for key, group in _points(frame):
        error = (group["status"] == "error").to_numpy()
        accuracy = _counted(group, "test_accuracy")
        interval = mean_interval(accuracy)
        diverged = group["diverged"].fillna(False).astype(bool).to_numpy()
        row: dict[str, Any] = {"task": key[0], "label": key[1], "tuning": key[2], "_key": key}
        row.update({c: group[c].iloc[0] for c in (*tuned, *identity)})
        row.update(n_seeds=len(group), n_ok=int((group["status"] == "ok").sum()),
                   n_diverged=int((diverged & ~error).sum()), n_error=int(error.sum()), n=interval.n,
                   accuracy_mean=interval.mean,
                   accuracy_std=float(accuracy.std(ddof=1)) if len(accuracy) >= 2 else math.nan,
                   accuracy_ci_low=interval.low, accuracy_ci_high=interval.high,
                   val_accuracy_mean=_validation_mean(group))
        for column, name in _MEAN_COLUMNS.items():
            if column in group.columns:
                values = pd.to_numeric(group[column][~error], errors="coerce")
                row[name] = exact_mean(values.dropna().to_numpy())
        for column in measured:
            values = pd.to_numeric(group[column], errors="coerce")
            if str(column).startswith(RUN_PREFIXES):
                values = values[~error & _trained(group, column)]
                row[column] = exact_mean(values.to_numpy()) if values.notna().all() else math.nan
            else:
                row[column] = exact_mean(values.dropna().to_numpy())
        rows.append(row)
        samples[key] = accuracy
    return rows, samples


def _choose(rows: list[dict[str, Any]]) -> dict[tuple[Any, Any], dict[str, Any] | None]:
    """Per (task, label), its row with the best mean validation accuracy (the first such on a tie).

    A configuration with one point needs no choice. One with several points, none of them with a
    validation accuracy, gets None: the test set never chooses.
    """
    points: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
    for row in rows:
        points.setdefault((row["task"], row["label"]), []).append(row)
    chosen: dict[tuple[Any, Any], dict[str, Any] | None] = {}
    for key, candidates in points.items():
        if len(candidates) == 1:
            chosen[key] = candidates[0]
            continue
        scored = [row for row in candidates if math.isfinite(row["val_accuracy_mean"])]
        chosen[key] = max(scored, key=lambda row: row["val_accuracy_mean"]) if scored else None
    return chosen


def chosen_trials(frame: pd.DataFrame) -> pd.DataFrame:
    """The trials at each configuration's chosen tuning point (all of them where nothing is tuned)."""
    if "tuning" not in frame.columns:
        return frame
    rows = [{"task": key[0], "label": key[1], "_key": key, "val_accuracy_mean": _validation_mean(group)}
            for key, group in _points(frame)]  # no intervals: choosing needs no scipy
    keys = {row["_key"] for row in _choose(rows).values() if row is not None}
    mask = [key in keys for key in zip(frame["task"], frame["label"], frame["tuning"], strict=True)]
    return frame[mask]


def _is_baseline_format(row: dict[str, Any]) -> bool:
    formats = [row.get(name) for name in ("weights", "activations", "gradients")]
    weight_grads = row.get("weight_grads")
    formats.append(row.get("gradients") if weight_grads is None or weight_grads != weight_grads
                   else weight_grads)
    return all(value == BASELINE_FORMAT for value in formats)


def _compare(rows: list[dict[str, Any]], samples: Samples,
             chosen: dict[tuple[Any, Any], dict[str, Any] | None], baselines: dict[str, str]) -> None:
    """Add the baseline comparison and the comparison with the task's most accurate row, in place.

    The baseline of a task is its chosen point (by validation), in the all-points view as well.
    """
    def sample(row: dict[str, Any] | None) -> np.ndarray:
        return np.zeros(0) if row is None else samples[row["_key"]]

    for task in dict.fromkeys(row["task"] for row in rows):
        own = [row for row in rows if row["task"] == task]
        label = baselines.get(task)
        if label is None:
            label = next((row["_key"][1] for row in own if _is_baseline_format(row)), None)
        reference = chosen.get((task, label)) if label is not None else None
        accurate = [row for row in own if math.isfinite(row["accuracy_mean"])]
        best = max(accurate, key=lambda row: row["accuracy_mean"]) if accurate else None
        for row in own:
            difference = welch(sample(row), sample(reference))
            row.update(baseline=label if label is not None else "", delta_mean=difference.delta,
                       delta_ci_low=difference.low, delta_ci_high=difference.high,
                       p_value=difference.p_value)
            row["p_vs_best"] = 1.0 if row is best else welch(sample(row), sample(best)).p_value


def summarize_trials(frame: pd.DataFrame, all_points: bool = False) -> pd.DataFrame:
    """One row per configuration (task, label): its chosen tuning point's statistics over seeds.

    Accuracy statistics are over the trials that did not raise: a diverged trial counts with the
    accuracy it recorded (a diverged format is a bad result, not a missing one), a trial with
    status "error" or no accuracy (NaN) is left out. `n` is how many count; `accuracy_std` is the
    sample standard deviation (ddof=1) and `accuracy_ci_low/high` the 95 % Student-t interval of
    the mean (NaN below two). A tuned configuration reports the point with the best mean validation
    accuracy (`tuned:<field>` holds its values, `n_points` how many were tried); `all_points=True`
    gives one row per tuning point instead, its label extended by the point, `chosen` marking the
    chosen one. `delta_mean`, `delta_ci_low/high` and `p_value` compare each row with its task's
    baseline (`frame.attrs["sweep"]["baselines"]`, else the first all-fp32 configuration; Welch),
    `p_vs_best` with the task's most accurate row. Energy and memory columns (`energy_mj:*`,
    `memory_mib:*`, `area_um2:*`) depend on the configuration, not the seed: their mean over the trials is
    carried over. Rows keep the order in which they first appear.
    """
    missing = [c for c in REQUIRED_TRIAL_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(f"sweep results lack the column {missing[0]!r} "
                         f"(columns: {', '.join(map(str, frame.columns)) or 'none'})")
    rows, samples = _point_rows(frame)
    chosen = _choose(rows)
    counts: dict[tuple[Any, Any], int] = {}
    for row in rows:
        counts[(row["task"], row["label"])] = counts.get((row["task"], row["label"]), 0) + 1
    tuned = [c for c in frame.columns if str(c).startswith(TUNED_PREFIX)]
    if all_points:
        shown = rows
        for row in rows:
            row["n_points"] = counts[(row["task"], row["label"])]
            row["chosen"] = chosen[(row["task"], row["label"])] is row
            point = json.loads(row["tuning"]) if isinstance(row["tuning"], str) else {}
            row["label"] = point_label(row["label"], point)
    else:
        shown = []
        for key, picked in chosen.items():
            if picked is None:  # several points and no validation accuracy: nothing to report
                first = next(r for r in rows if (r["task"], r["label"]) == key)
                row = {**first, **dict.fromkeys(tuned, math.nan), "tuning": None, "_key": (*key, None)}
                row.update({c: math.nan for c in _ACCURACY_STATISTICS}, n=0)
                samples[row["_key"]] = np.zeros(0)
            else:
                row = picked
            shown.append({**row, "n_points": counts[key]})
        chosen = {(row["task"], row["label"]): row for row in shown}
    _compare(shown, samples, chosen, dict((frame.attrs.get("sweep") or {}).get("baselines") or {}))
    identity = [c for c in IDENTITY_COLUMNS if c in frame.columns]
    columns = (["task", "label", *tuned, *identity, *COUNT_COLUMNS, "n_points"]
               + (["chosen"] if all_points else []) + list(STATISTIC_COLUMNS)
               + [name for column, name in _MEAN_COLUMNS.items() if column in frame.columns]
               + [c for c in frame.columns if str(c).startswith(MEASURED_PREFIXES)])
    summary = pd.DataFrame(shown, columns=columns)
    summary.attrs = dict(frame.attrs)
    return summary


_ACCURACY_STATISTICS = ("accuracy_mean", "accuracy_std", "accuracy_ci_low", "accuracy_ci_high",
                        "val_accuracy_mean", "final_loss_mean", "wall_time_s_mean")


# --- text tables -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextTable:
    """A table as display strings: headers, which columns are numbers (right-aligned), and row groups."""

    title: str
    columns: tuple[str, ...]
    numeric: tuple[bool, ...]
    rows: tuple[tuple[str, ...], ...]
    group_starts: tuple[int, ...] = ()
    """Indices of rows that begin a new group (a new task); a rule is drawn above them."""


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return MISSING
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _quantity(value: Any) -> str:
    number = float(value) if value is not None else math.nan
    return MISSING if math.isnan(number) else f"{number:.4g}"


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def percent_text(value: Any) -> str:
    """A fraction as a percentage with two decimals (`–` when missing)."""
    number = _number(value)
    return MISSING if math.isnan(number) else f"{100 * number:.2f}"


def interval_text(low: Any, high: Any, signed: bool = False) -> str:
    """A 95 % interval of fractions in percent (points): `[92.52, 97.48]`; `–` when missing."""
    bounds = (_number(low), _number(high))
    if any(math.isnan(bound) for bound in bounds):
        return MISSING
    spec = "+.2f" if signed else ".2f"
    return "[" + ", ".join(format(100 * bound, spec) for bound in bounds) + "]"


def difference_text(delta: Any, low: Any, high: Any) -> str:
    """A difference of accuracies in percentage points with its interval: `-0.52 [-1.31, +0.27]`."""
    number = _number(delta)
    if math.isnan(number):
        return MISSING
    interval = interval_text(low, high, signed=True)
    return f"{100 * number:+.2f}" + ("" if interval == MISSING else f" {interval}")


def p_value_text(value: Any) -> str:
    """A p-value with three decimals, `<0.001` below that."""
    number = _number(value)
    if math.isnan(number):
        return MISSING
    return "<0.001" if number < 0.001 else f"{number:.3f}"


_FORMAT_HEADERS = {"weights": "Weights", "activations": "Activations", "gradients": "Gradients",
                   "weight_grads": "Weight grads", "optimizer": "Optimizer"}

Column = tuple[str, bool, Any]
"""A text table's column: header, whether it holds numbers (right-aligned), row -> cell text."""


def _format_columns(frame: pd.DataFrame) -> list[str]:
    """Format columns a table shows; weight gradients only where some differ from the gradients."""
    shown = [c for c in _FORMAT_HEADERS if c in frame.columns]
    if "weight_grads" in shown:
        own = frame["weight_grads"].fillna("").astype(str)
        if not ((own != "") & (own != frame.get("gradients", own))).any():
            shown.remove("weight_grads")
    return shown


def _configuration_columns(frame: pd.DataFrame) -> list[Column]:
    """Config label, the tuned values (headed by the field's name), formats and optimizer."""
    tuned = [c for c in frame.columns if str(c).startswith(TUNED_PREFIX)]
    return ([("Config", False, lambda row: _cell(row["label"]))]
            + [(c[len(TUNED_PREFIX):], True, lambda row, c=c: _cell(row[c])) for c in tuned]
            + [(_FORMAT_HEADERS[c], False, lambda row, c=c: _cell(row[c])) for c in _format_columns(frame)])


def _accuracy_columns(frame: pd.DataFrame) -> list[Column]:
    """n, the validation accuracy where there is one, test accuracy (%) and its 95 % t-interval."""
    columns: list[Column] = [("n", True, lambda row: _cell(row.get("n", row.get("n_seeds"))))]
    if "val_accuracy_mean" in frame.columns and frame["val_accuracy_mean"].notna().any():
        columns.append(("Val. accuracy (%)", True, lambda row: percent_text(row["val_accuracy_mean"])))
    columns.append(("Accuracy (%)", True, lambda row: percent_text(row["accuracy_mean"])))
    if "accuracy_ci_low" in frame.columns:
        columns.append(("95 % CI", True,
                        lambda row: interval_text(row["accuracy_ci_low"], row["accuracy_ci_high"])))
    return columns


def _text_table(title: str, frame: pd.DataFrame, columns: list[Column], groups: list[Any]) -> TextTable:
    rows = tuple(tuple(cell(row) for _, _, cell in columns) for _, row in frame.iterrows())
    return TextTable(title, tuple(c[0] for c in columns), tuple(c[1] for c in columns), rows,
                     _group_starts(groups))


def _group_starts(keys: list[Any]) -> tuple[int, ...]:
    return tuple(i for i in range(1, len(keys)) if keys[i] != keys[i - 1])


def _baselines_text(summary: pd.DataFrame) -> str:
    if "baseline" not in summary.columns:
        return ""
    pairs = dict(zip(summary["task"], summary["baseline"], strict=True))
    named = [f"{task}: {label}" for task, label in pairs.items() if isinstance(label, str) and label]
    return f"; baseline {'; '.join(named)}" if named else "; no baseline configuration"


def summary_text_table(summary: pd.DataFrame, workloads: list[str],
                       memory_objective: bool = False) -> TextTable:
    """The summary as a paper shows it: configuration, n, accuracy (%) with its 95 % interval, the
    difference from the baseline with its interval and Welch's p, and energy per workload."""
    columns = [("Task", False, lambda row: _cell(row["task"])), *_configuration_columns(summary),
               ("Diverged", True, lambda row: _cell(row["n_diverged"])),
               ("Errors", True, lambda row: _cell(row["n_error"])), *_accuracy_columns(summary)]
    if "delta_mean" in summary.columns:
        columns += [("Δ vs baseline (pts) [95 % CI]", True,
                     lambda row: difference_text(row["delta_mean"], row["delta_ci_low"],
                                                 row["delta_ci_high"])),
                    ("p (Welch)", True, lambda row: p_value_text(row["p_value"]))]
    for w in workloads:
        columns += [(f"Energy {w} (mJ/iter.)", True, lambda row, w=w: _quantity(row.get(energy_column(w))))]
        if run_energy_column(w) in summary.columns:
            columns += [(f"Run mean {w} (mJ/iter.)", True,
                         lambda row, w=w: _quantity(row.get(run_energy_column(w, mean=True)))),
                        (f"Run {w} (mJ)", True, lambda row, w=w: _quantity(row.get(run_energy_column(w))))]
    if memory_objective:
        columns += [(f"Memory {w} (MiB)", True, lambda row, w=w: _quantity(row.get(memory_column(w))))
                    for w in workloads]
    title = ("Summary over seeds: mean test accuracy with its 95 % t-interval, n counted trials"
             + _baselines_text(summary))
    return _text_table(title, summary, columns, list(summary["task"]))


def pareto_text_table(fronts: pd.DataFrame, memory_objective: bool = False, title: str = "Pareto fronts",
                      keys: bool = True) -> TextTable:
    """Front points: task, workload, configuration, accuracy (%) with its interval, Welch's p against
    the task's most accurate configuration, energy (mJ) and memory if asked.

    `keys=False` leaves out the task and workload columns (for one front whose title names them).
    """
    key_columns: list[Column] = ([("Task", False, lambda row: _cell(row["task"])),
                                  ("Workload", False, lambda row: _cell(row["workload"]))] if keys else [])
    columns = [*key_columns, *_configuration_columns(fronts), *_accuracy_columns(fronts)]
    if "p_vs_best" in fronts.columns:
        columns.append(("p vs best (Welch)", True, lambda row: p_value_text(row["p_vs_best"])))
    if "iteration_energy_mj" in fronts.columns:  # ranked by the run's mean: one iteration beside it
        columns += [("Run mean (mJ/iter.)", True, lambda row: _quantity(row["energy_mj"])),
                    ("Energy (mJ/iter.)", True, lambda row: _quantity(row["iteration_energy_mj"])),
                    ("Run (mJ)", True, lambda row: _quantity(row.get("run_energy_mj")))]
    else:
        columns.append(("Energy (mJ/iter.)", True, lambda row: _quantity(row["energy_mj"])))
    if memory_objective:
        columns.append(("Memory (MiB)", True, lambda row: _quantity(row.get("memory_mib"))))
    groups = list(zip(fronts["task"], fronts["workload"], strict=True)) if len(fronts) else []
    return _text_table(title, fronts, columns, groups)


# --- renderers -----------------------------------------------------------------------------------------

_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}",
    ">": r"\textgreater{}", "±": r"$\pm$", "–": "--", "Δ": r"$\Delta$", "\n": " ",
}
_LATEX_PATTERN = re.compile("|".join(re.escape(k) for k in _LATEX_SPECIALS))


def latex_escape(text: str) -> str:
    """Text safe inside a LaTeX tabular cell (one pass, so an inserted backslash is never re-escaped)."""
    return _LATEX_PATTERN.sub(lambda match: _LATEX_SPECIALS[match.group(0)], text)


def latex_table(table: TextTable) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}); a \\midrule separates the row groups."""
    spec = "".join("r" if n else "l" for n in table.numeric)
    lines = [f"% {latex_escape(table.title)} (generated by dse; needs \\usepackage{{booktabs}})",
             f"\\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(latex_escape(c) for c in table.columns) + r" \\", r"\midrule"]
    for index, row in enumerate(table.rows):
        if index in table.group_starts:
            lines.append(r"\midrule")
        lines.append(" & ".join(latex_escape(c) for c in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _markdown_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def markdown_table(table: TextTable) -> str:
    """A GitHub-flavoured pipe table; numeric columns right-aligned."""
    lines = ["| " + " | ".join(_markdown_cell(c) for c in table.columns) + " |",
             "| " + " | ".join("---:" if n else "---" for n in table.numeric) + " |"]
    lines += ["| " + " | ".join(_markdown_cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines) + "\n"


def check_export_choice(table: str, text_format: str) -> None:
    """Refuse an unknown table or text format, naming the choices."""
    if table not in TABLES:
        raise InputError(f"unknown table {table!r} for --table (choose {', '.join(TABLES)})")
    if text_format not in TEXT_FORMATS:
        raise InputError(f"unknown export format {text_format!r} for --to "
                         f"(choose {', '.join(TEXT_FORMATS)})")


@dataclass(frozen=True)
class SweepTables:
    """A sweep's trials reduced once, for every table, file and printout made of them.

    `summary` and `fronts` report each configuration at its chosen tuning point, or every tuning
    point as its own row where `all_points` was asked for; `points` always has every point.
    """

    workloads: list[str]
    summary: pd.DataFrame
    fronts: pd.DataFrame
    memory_objective: bool
    points: pd.DataFrame
    all_points: bool = False

    @classmethod
    def of(cls, trials: pd.DataFrame, memory_objective: bool = False,
           all_points: bool = False) -> SweepTables:
        workloads = workloads_of(trials)
        points = summarize_trials(trials, all_points=True)
        summary = points if all_points else summarize_trials(trials)
        return cls(workloads, summary, all_fronts(summary, workloads, memory_objective), memory_objective,
                   points, all_points)

    def text_table(self, table: str) -> TextTable:
        """'summary' or 'pareto' (every front) as the table a paper shows."""
        if table == "summary":
            text = summary_text_table(self.summary, self.workloads, self.memory_objective)
            if self.all_points:
                text = dataclasses.replace(text, title=text.title.replace("Summary over seeds",
                                                                          "Every tuning point over seeds", 1))
            return text
        return pareto_text_table(self.fronts, self.memory_objective)


def render_table(trials: pd.DataFrame, table: str, text_format: str, memory_objective: bool = False,
                 all_points: bool = False) -> str:
    """One table of a sweep ('summary' or 'pareto') as 'csv', 'latex' or 'markdown' text; `all_points`
    reports every tuning point instead of each configuration's chosen one."""
    check_export_choice(table, text_format)
    tables = SweepTables.of(trials, memory_objective, all_points)
    if text_format == "csv":
        return (tables.summary if table == "summary" else tables.fronts).to_csv(index=False)
    text_table = tables.text_table(table)
    return latex_table(text_table) if text_format == "latex" else markdown_table(text_table)
