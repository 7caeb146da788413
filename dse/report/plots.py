"""Figures of a sweep, per task and workload: accuracy against energy with the front, and the front's energy.

Figures are for papers: every configuration is named in a legend (no label ever overlaps another),
log axes carry readable plain-number ticks even over less than a decade, and there is no title unless
asked for (`title=True`): the caption belongs to the paper. Figures are built on
`matplotlib.figure.Figure` directly (no pyplot), so no global backend or window is touched; saving
picks the Agg (PNG) and PDF canvases. Writing files is `dse.report.files`'s job.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dse.report.pareto import (
    ENERGY_UNITS,
    area_column,
    front_energy_column,
    non_dominated,
    pareto_front,
    run_energy_column,
)
from dse.report.stats import SIGNIFICANCE

if TYPE_CHECKING:
    from matplotlib.figure import Figure

UNIT_COLORS = {"multiply": "tab:blue", "conversion": "tab:orange", "accumulation": "tab:green",
               "update": "tab:purple", "memory": "tab:gray"}
COMPUTE_UNITS = ("multiply", "conversion", "accumulation", "update")
"""The units of the breakdown's compute-only view: everything but memory traffic."""
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
PROXY_WORKLOAD = "proxy"
"""The energy column of the trained model itself (dse.sweep.config's name; reports do not import sweeps)."""


def _configuration_styles(count: int) -> list[tuple[str, str]]:
    """(color, marker) of each of `count` configurations: 10 colors x 10 markers before a repeat."""
    colors = [f"C{i}" for i in range(10)]
    return [(colors[i % 10], MARKERS[(i // 10 + i) % len(MARKERS)]) for i in range(count)]


def readable_log_axis(axis: Any, values: np.ndarray) -> None:
    """A log axis whose ticks are plain numbers (0.02, 0.05, 0.1; not 2x10^-2), with 1-2-5 ticks when
    the values span under two decades, so that even a narrow range carries several labelled ticks."""
    from matplotlib import ticker

    positive = values[np.isfinite(values) & (values > 0)]
    span = np.log10(positive.max() / positive.min()) if positive.size else 0.0
    subs = (1.0, 2.0, 5.0) if span < 2 else (1.0,)
    axis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
    axis.set_major_formatter(ticker.FuncFormatter(
        lambda value, _: np.format_float_positional(float(f"{value:.3g}"), trim="-")))
    axis.set_minor_formatter(ticker.NullFormatter())


def _workload_note(fig: Figure, task: str, workload: str, run: bool = False) -> None:
    """Say on the figure where each axis comes from when the energy is not the trained model's (`run`:
    the energy is the run's mean per iteration)."""
    if workload != PROXY_WORKLOAD:
        energy = (f"training iterations of {workload} in the formats and share of warm-up each trial trained"
                  if run else f"one training iteration of {workload} in the same formats")
        fig.supxlabel(f"accuracy: {task} as trained; energy: {energy}", fontsize=7, color="dimgray")


def slug(text: str) -> str:
    """A file-name-safe form of a task or workload name: lower case, runs of other characters as '-'."""
    return re.sub(r"[^a-z0-9.]+", "-", str(text).lower()).strip("-.") or "unnamed"


def _percent(values: pd.Series) -> np.ndarray:
    return 100.0 * pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)


def _interval_bars(rows: pd.DataFrame, accuracy: np.ndarray) -> np.ndarray:
    """Error bars (2 x n, below and above the mean) of the 95 % t-interval; the std where there is no
    interval column (a summary from elsewhere), zero where neither exists."""
    if "accuracy_ci_low" in rows.columns:
        below = accuracy - _percent(rows["accuracy_ci_low"])
        above = _percent(rows["accuracy_ci_high"]) - accuracy
    else:
        below = above = _percent(rows["accuracy_std"])
    return np.nan_to_num(np.vstack([below, above]), nan=0.0)


def _seeds_text(rows: pd.DataFrame) -> str:
    """`, n = 3 seeds` (or `n = 2-3`) over the plotted configurations; empty without an `n` column."""
    if "n" not in rows.columns or rows.empty:
        return ""
    low, high = int(rows["n"].min()), int(rows["n"].max())
    if low == high:
        return f", n = {low} seed{'s' if low != 1 else ''}"
    return f", n = {low}-{high} seeds"


def tied_with_best(front: pd.DataFrame) -> np.ndarray:
    """Front points whose accuracy is not significantly below the task's best (Welch p >= SIGNIFICANCE);
    the best itself is one of them. Needs `p_vs_best` (summarize_trials); all False without it."""
    if "p_vs_best" not in front.columns:
        return np.zeros(len(front), dtype=bool)
    p_values = pd.to_numeric(front["p_vs_best"], errors="coerce").to_numpy(dtype=float)
    return np.nan_to_num(p_values, nan=0.0) >= SIGNIFICANCE


def accuracy_energy_figure(summary: pd.DataFrame, task: str, workload: str,
                           memory_objective: bool = False, title: bool = False) -> Figure | None:
    """Every configuration of `task` (mean accuracy, error bar = 95 % t-interval over seeds) against its
    energy on `workload` (log scale), each with its own color and marker named in the legend, and the
    accuracy-energy front as a step line; front points not significantly less accurate than the best
    (Welch p >= 0.05) are starred.

    With the memory objective, points that are on the front only thanks to memory are ringed.
    None when no configuration has both an accuracy and a positive energy.
    """
    from matplotlib.figure import Figure

    rows = summary[summary["task"] == task]
    measure = front_energy_column(summary, workload)  # (the summary's: one measure in a report)
    energy = pd.to_numeric(rows[measure], errors="coerce").to_numpy(dtype=float)
    accuracy = _percent(rows["accuracy_mean"])
    bars = _interval_bars(rows, accuracy)
    shown = np.isfinite(accuracy) & np.isfinite(energy) & (energy > 0)
    if not shown.any():
        return None
    fig = Figure(figsize=(8.0, 4.6), layout="constrained")
    ax = fig.subplots()
    labels = rows["label"].astype(str).to_numpy()
    styles = _configuration_styles(int(shown.sum()))
    for (color, marker), index in zip(styles, np.flatnonzero(shown), strict=True):
        ax.errorbar(energy[index], accuracy[index], yerr=bars[:, [index]], fmt=marker, color=color,
                    capsize=3, markersize=6, label=labels[index], zorder=3)
    diverged = shown & (pd.to_numeric(rows["n_diverged"], errors="coerce").fillna(0).to_numpy() > 0)
    markers: list[Any] = []
    if diverged.any():
        markers.append(ax.scatter(energy[diverged], accuracy[diverged], marker="x", color="black", s=60,
                                  zorder=4, label="some seeds diverged"))
    fronts = pareto_front(summary, workload)
    front = fronts[fronts["task"] == task]
    front_energy = front["energy_mj"].to_numpy(dtype=float)
    front_accuracy = _percent(front["accuracy_mean"])
    (line,) = ax.step(front_energy, front_accuracy, where="post", color="tab:red", linewidth=1.5, zorder=2,
                      label="Pareto front (accuracy vs energy)")
    markers.insert(0, line)
    tied = tied_with_best(front)
    if tied.any():
        markers.append(ax.scatter(front_energy[tied], front_accuracy[tied], marker="*", s=180,
                                  facecolors="gold", edgecolors="black", linewidths=0.6, zorder=5,
                                  label="front, not significantly below the best (Welch p ≥ 0.05)"))
    if memory_objective:
        with_memory = pareto_front(summary, workload, memory_objective=True)
        with_memory = with_memory[with_memory["task"] == task]
        extra = with_memory[~with_memory["label"].isin(front["label"])]
        if len(extra):
            markers.append(ax.scatter(extra["energy_mj"], _percent(extra["accuracy_mean"]), s=130,
                                      facecolors="none", edgecolors="tab:red", zorder=4,
                                      label="on the front with memory"))
    ax.set_xscale("log")
    readable_log_axis(ax.xaxis, energy[shown])
    run = measure == run_energy_column(workload, mean=True)
    # the run's label on two lines: on one, beside a wide legend, it ran off the page's left edge
    ax.set_xlabel(f"energy per training iteration on {workload}"
                  + ("\n(the run's mean, mJ, log scale)" if run else " (mJ, log scale)"))
    ax.set_ylabel(f"test accuracy (%), mean and 95 % CI{_seeds_text(rows[shown])}")
    if title:
        ax.set_title(f"{task}: accuracy vs energy (workload {workload}){_seeds_text(rows[shown])}",
                     fontsize=10)
    ax.margins(x=0.12, y=0.08)
    ax.grid(alpha=0.3, which="both")
    handles, names = ax.get_legend_handles_labels()
    fig.legend([h for h in handles if not any(h is m for m in markers)],
               [n for h, n in zip(handles, names, strict=True) if not any(h is m for m in markers)],
               title="configuration", loc="outside right upper", fontsize=7, title_fontsize=8, frameon=False)
    ax.legend(handles=markers, loc="lower right", fontsize=7)
    _workload_note(fig, task, workload, run)
    return fig


def accuracy_area_figure(summary: pd.DataFrame, task: str, workload: str,
                         title: bool = False) -> Figure | None:
    """Every configuration of `task` (mean accuracy) against the area of the datapath it trained on (at
    the node of `workload`'s column), each named in the legend, with the accuracy-area front. None
    without area figures."""
    from matplotlib.figure import Figure

    column = area_column(workload)
    if column not in summary.columns:
        return None
    rows = summary[summary["task"] == task]
    area = pd.to_numeric(rows[column], errors="coerce").to_numpy(dtype=float)
    accuracy = _percent(rows["accuracy_mean"])
    shown = np.isfinite(accuracy) & np.isfinite(area) & (area > 0)
    if not shown.any():
        return None
    fig = Figure(figsize=(8.0, 4.6), layout="constrained")
    ax = fig.subplots()
    labels = rows["label"].astype(str).to_numpy()
    for (color, marker), index in zip(_configuration_styles(int(shown.sum())), np.flatnonzero(shown),
                                      strict=True):
        ax.scatter(area[index], accuracy[index], color=color, marker=marker, s=40, label=labels[index],
                   zorder=3)
    points = np.stack([-accuracy[shown], area[shown]], axis=1)
    on_front = non_dominated(points)
    order = np.argsort(area[shown][on_front])
    front_area, front_accuracy = area[shown][on_front][order], accuracy[shown][on_front][order]
    (line,) = ax.step(front_area, front_accuracy, where="post", color="tab:red", linewidth=1.5,
                      label="Pareto front (accuracy vs area)")
    ax.set_xscale("log")
    readable_log_axis(ax.xaxis, area[shown])
    ax.set_xlabel(f"datapath area (um^2, log scale; node of {workload})")
    ax.set_ylabel("test accuracy (%)")
    if title:
        ax.set_title(f"{task}: accuracy vs datapath area ({workload})", fontsize=10)
    ax.margins(x=0.12, y=0.08)
    ax.grid(alpha=0.3, which="both")
    handles, names = ax.get_legend_handles_labels()
    fig.legend([h for h in handles if h is not line], [n for h, n in zip(handles, names, strict=True)
                                                       if h is not line],
               title="configuration", loc="outside right upper", fontsize=7, title_fontsize=8, frameon=False)
    ax.legend(handles=[line], loc="lower right", fontsize=7)
    return fig


def breakdown_figure(front: pd.DataFrame, task: str, workload: str, title: bool = False) -> Figure | None:
    """The front's energy per iteration in its own formats by unit (multiply, conversion, accumulation,
    update, memory; a warm-up's fp32 iterations are not in it), one bar per front point in the front's
    order, in three panels: the whole iteration (mJ), compute only
    (mJ, memory left out, so the units that differ between formats show when memory dominates), and
    each unit's share of the iteration (%). `front` is `pareto_front`'s output.

    None when the front is empty or carries no per-unit energy.
    """
    from matplotlib.figure import Figure

    rows = front[(front["task"] == task) & (front["workload"] == workload)]
    units = [u for u in ENERGY_UNITS if f"energy_mj:{u}" in rows.columns]
    if rows.empty or not units:
        return None
    values = {unit: np.nan_to_num(pd.to_numeric(rows[f"energy_mj:{unit}"], errors="coerce").to_numpy(float))
              for unit in units}
    total = np.sum([values[unit] for unit in units], axis=0)
    compute = [unit for unit in units if unit in COMPUTE_UNITS]
    panels = [("whole iteration (mJ)", units, 1.0),
              ("compute only, memory left out (mJ)", compute, 1.0),
              ("share of the iteration (%)", units, 100.0 / np.where(total > 0, total, 1.0))]
    width = max(9.0, 3 * (0.45 * len(rows) + 1.6))
    fig = Figure(figsize=(width, 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels))
    positions = np.arange(len(rows))
    for ax, (ylabel, shown_units, scale) in zip(axes, panels, strict=True):
        bottom = np.zeros(len(rows))
        for unit in shown_units:
            height = values[unit] * scale
            ax.bar(positions, height, bottom=bottom, color=UNIT_COLORS[unit], label=unit, width=0.7)
            bottom += height
        ax.set_xticks(positions, [str(label) for label in rows["label"]], rotation=35, ha="right", fontsize=7)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(f"{task}: energy of the Pareto front's points by unit (workload {workload})",
                     fontsize=10)
    _workload_note(fig, task, workload)
    return fig
