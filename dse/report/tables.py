"""Tables of a sweep: the per-configuration summary over seeds, and text renderings (CSV, LaTeX, Markdown).

`summarize_trials` turns one row per trial into one row per (task, label); the `*_text_table`
functions pick and format the columns a paper shows; `latex_table` and `markdown_table` render them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from dse.errors import InputError
from dse.report.pareto import (
    COUNT_COLUMNS,
    IDENTITY_COLUMNS,
    all_fronts,
    energy_column,
    memory_column,
    workloads_of,
)

REQUIRED_TRIAL_COLUMNS: tuple[str, ...] = ("task", "label", "status", "diverged", "test_accuracy")
TABLES: tuple[str, ...] = ("summary", "pareto")
TEXT_FORMATS: tuple[str, ...] = ("csv", "latex", "markdown")
_MEAN_COLUMNS = {"final_loss": "final_loss_mean", "wall_time_s": "wall_time_s_mean"}
"""Per-trial measurements averaged over a configuration's trials that did not raise."""
MISSING = "–"
"""What a table shows for a missing value (no accuracy, no std from a single seed, no format)."""


def summarize_trials(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, label): the configuration, seed counts, accuracy mean/std and energy columns.

    Accuracy statistics are over the trials that did not raise: a diverged trial counts with the
    accuracy it recorded (a diverged format is a bad result, not a missing one), a trial with
    status "error" or no accuracy (NaN) is left out. `accuracy_std` is the sample standard deviation
    (ddof=1), NaN when fewer than two trials count. Energy and memory columns (`energy_mj:*`,
    `memory_mib:*`, `area_um2:*`) depend on the configuration, not the seed: their mean over the group's
    trials
    is carried over. Groups keep the order in which they first appear.
    """
    missing = [c for c in REQUIRED_TRIAL_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(f"sweep results lack the column {missing[0]!r} "
                         f"(columns: {', '.join(map(str, frame.columns)) or 'none'})")
    identity = [c for c in IDENTITY_COLUMNS if c in frame.columns]
    measured = [c for c in frame.columns if str(c).startswith(("energy_mj:", "memory_mib:", "area_um2:"))]
    rows: list[dict[str, Any]] = []
    for (task, label), group in frame.groupby(["task", "label"], sort=False, dropna=False):
        error = (group["status"] == "error").to_numpy()
        accuracy = pd.to_numeric(group["test_accuracy"], errors="coerce").to_numpy(dtype=float)
        counted = accuracy[~error & np.isfinite(accuracy)]
        diverged = group["diverged"].fillna(False).astype(bool).to_numpy()
        row: dict[str, Any] = {"task": task, "label": label}
        row.update({c: group[c].iloc[0] for c in identity})
        row.update(n_seeds=len(group), n_ok=int((group["status"] == "ok").sum()),
                   n_diverged=int((diverged & ~error).sum()), n_error=int(error.sum()),
                   accuracy_mean=float(counted.mean()) if len(counted) else math.nan,
                   accuracy_std=float(counted.std(ddof=1)) if len(counted) >= 2 else math.nan)
        for column, name in _MEAN_COLUMNS.items():
            if column in group.columns:
                values = pd.to_numeric(group[column][~error], errors="coerce")
                row[name] = float(values.mean()) if values.notna().any() else math.nan
        for column in measured:
            values = pd.to_numeric(group[column], errors="coerce")
            row[column] = float(values.mean()) if values.notna().any() else math.nan
        rows.append(row)
    columns = (["task", "label", *identity, *COUNT_COLUMNS, "accuracy_mean", "accuracy_std"]
               + [name for column, name in _MEAN_COLUMNS.items() if column in frame.columns]
               + measured)
    summary = pd.DataFrame(rows, columns=columns)
    summary.attrs = dict(frame.attrs)
    return summary


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


def accuracy_text(mean: float, std: float) -> str:
    """Accuracy in percent as 'mean ± std' (two decimals); just the mean when there is no std."""
    if mean is None or math.isnan(mean):
        return MISSING
    if std is None or math.isnan(std):
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


_FORMAT_HEADERS = {"weights": "Weights", "activations": "Activations", "gradients": "Gradients",
                   "weight_grads": "Weight grads", "optimizer": "Optimizer"}


def _format_columns(frame: pd.DataFrame) -> list[str]:
    """Format columns a table shows; weight gradients only where some differ from the gradients."""
    shown = [c for c in _FORMAT_HEADERS if c in frame.columns]
    if "weight_grads" in shown:
        own = frame["weight_grads"].fillna("").astype(str)
        if not ((own != "") & (own != frame.get("gradients", own))).any():
            shown.remove("weight_grads")
    return shown


def _group_starts(keys: list[Any]) -> tuple[int, ...]:
    return tuple(i for i in range(1, len(keys)) if keys[i] != keys[i - 1])


def summary_text_table(summary: pd.DataFrame, workloads: list[str],
                       memory_objective: bool = False) -> TextTable:
    """The summary as a paper shows it: configuration, seeds, accuracy (%) and energy per workload."""
    formats = _format_columns(summary)
    columns = ["Task", "Config", *(_FORMAT_HEADERS[c] for c in formats), "Seeds", "Diverged", "Errors",
               "Accuracy (%)", *(f"Energy {w} (mJ)" for w in workloads)]
    if memory_objective:
        columns += [f"Memory {w} (MiB)" for w in workloads]
    numeric = [False] * (2 + len(formats)) + [True] * (len(columns) - 2 - len(formats))
    rows = []
    for _, row in summary.iterrows():
        cells = [_cell(row["task"]), _cell(row["label"]), *(_cell(row[c]) for c in formats),
                 _cell(row["n_seeds"]), _cell(row["n_diverged"]), _cell(row["n_error"]),
                 accuracy_text(row["accuracy_mean"], row["accuracy_std"])]
        cells += [_quantity(row.get(energy_column(w))) for w in workloads]
        if memory_objective:
            cells += [_quantity(row.get(memory_column(w))) for w in workloads]
        rows.append(tuple(cells))
    return TextTable("Summary over seeds", tuple(columns), tuple(numeric), tuple(rows),
                     _group_starts(list(summary["task"])))


def pareto_text_table(fronts: pd.DataFrame, memory_objective: bool = False, title: str = "Pareto fronts",
                      keys: bool = True) -> TextTable:
    """Front points: task, workload, configuration, accuracy (%), energy (mJ) and memory if asked.

    `keys=False` leaves out the task and workload columns (for one front whose title names them).
    """
    formats = _format_columns(fronts)
    key_columns = ["Task", "Workload"] if keys else []
    text_columns = [*key_columns, "Config", *(_FORMAT_HEADERS[c] for c in formats)]
    columns = [*text_columns, "Accuracy (%)", "Energy (mJ)"] + (["Memory (MiB)"] if memory_objective else [])
    numeric = [False] * len(text_columns) + [True] * (len(columns) - len(text_columns))
    rows = []
    for _, row in fronts.iterrows():
        cells = ([_cell(row["task"]), _cell(row["workload"])] if keys else []) + [
            _cell(row["label"]), *(_cell(row[c]) for c in formats),
            accuracy_text(row["accuracy_mean"], row.get("accuracy_std", math.nan)),
            _quantity(row["energy_mj"])]
        if memory_objective:
            cells.append(_quantity(row.get("memory_mib")))
        rows.append(tuple(cells))
    groups = list(zip(fronts["task"], fronts["workload"], strict=True)) if len(fronts) else []
    return TextTable(title, tuple(columns), tuple(numeric), tuple(rows), _group_starts(groups))


# --- renderers -----------------------------------------------------------------------------------------

_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}",
    ">": r"\textgreater{}", "±": r"$\pm$", "–": "--", "\n": " ",
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
        raise InputError(f"unknown export format {text_format!r} for --format "
                         f"(choose {', '.join(TEXT_FORMATS)})")


@dataclass(frozen=True)
class SweepTables:
    """A sweep's trials reduced once, for every table, file and printout made of them."""

    workloads: list[str]
    summary: pd.DataFrame
    fronts: pd.DataFrame
    memory_objective: bool

    @classmethod
    def of(cls, trials: pd.DataFrame, memory_objective: bool = False) -> SweepTables:
        workloads = workloads_of(trials)
        summary = summarize_trials(trials)
        return cls(workloads, summary, all_fronts(summary, workloads, memory_objective), memory_objective)

    def text_table(self, table: str) -> TextTable:
        """'summary' or 'pareto' (every front) as the table a paper shows."""
        if table == "summary":
            return summary_text_table(self.summary, self.workloads, self.memory_objective)
        return pareto_text_table(self.fronts, self.memory_objective)


def render_table(trials: pd.DataFrame, table: str, text_format: str, memory_objective: bool = False) -> str:
    """One table of a sweep ('summary' or 'pareto') as 'csv', 'latex' or 'markdown' text."""
    check_export_choice(table, text_format)
    tables = SweepTables.of(trials, memory_objective)
    if text_format == "csv":
        return (tables.summary if table == "summary" else tables.fronts).to_csv(index=False)
    text_table = tables.text_table(table)
    return latex_table(text_table) if text_format == "latex" else markdown_table(text_table)
