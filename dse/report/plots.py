"""Figures of a sweep, per task and workload: accuracy against energy with the front, and the front's energy.

Figures are built on `matplotlib.figure.Figure` directly (no pyplot), so no global backend or
window is touched; saving picks the Agg (PNG) and PDF canvases. Writing files is `dse.report.files`'s job.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from dse.report.pareto import ENERGY_UNITS, area_column, energy_column, non_dominated, pareto_front
from dse.report.stats import SIGNIFICANCE

if TYPE_CHECKING:
    from matplotlib.figure import Figure

UNIT_COLORS = {"multiply": "tab:blue", "conversion": "tab:orange", "accumulation": "tab:green",
               "update": "tab:purple", "memory": "tab:gray"}


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
    return f", n = {low} seeds" if low == high else f", n = {low}-{high} seeds"


def tied_with_best(front: pd.DataFrame) -> np.ndarray:
    """Front points whose accuracy is not significantly below the task's best (Welch p >= SIGNIFICANCE);
    the best itself is one of them. Needs `p_vs_best` (summarize_trials); all False without it."""
    if "p_vs_best" not in front.columns:
        return np.zeros(len(front), dtype=bool)
    p_values = pd.to_numeric(front["p_vs_best"], errors="coerce").to_numpy(dtype=float)
    return np.nan_to_num(p_values, nan=0.0) >= SIGNIFICANCE


def accuracy_energy_figure(summary: pd.DataFrame, task: str, workload: str,
                           memory_objective: bool = False) -> Figure | None:
    """Every configuration of `task` (mean accuracy, error bar = 95 % t-interval over seeds) against its
    energy on `workload` (log scale), with the accuracy-energy front as a step line and its points
    labelled; front points not significantly less accurate than the best (Welch p >= 0.05) are starred.

    With the memory objective, points that are on the front only thanks to memory are ringed.
    None when no configuration has both an accuracy and a positive energy.
    """
    from matplotlib.figure import Figure

    rows = summary[summary["task"] == task]
    energy = pd.to_numeric(rows[energy_column(workload)], errors="coerce").to_numpy(dtype=float)
    accuracy = _percent(rows["accuracy_mean"])
    bars = _interval_bars(rows, accuracy)
    shown = np.isfinite(accuracy) & np.isfinite(energy) & (energy > 0)
    if not shown.any():
        return None
    fig = Figure(figsize=(7.0, 4.6), layout="constrained")
    ax = fig.subplots()
    ax.errorbar(energy[shown], accuracy[shown], yerr=bars[:, shown], fmt="o", color="tab:blue", alpha=0.6,
                capsize=3, markersize=5, label="configuration (mean, 95 % CI over seeds)")
    diverged = shown & (pd.to_numeric(rows["n_diverged"], errors="coerce").fillna(0).to_numpy() > 0)
    if diverged.any():
        ax.scatter(energy[diverged], accuracy[diverged], marker="x", color="black", zorder=3,
                   label="some seeds diverged")
    front = pareto_front(rows, workload)
    front_energy = front["energy_mj"].to_numpy(dtype=float)
    front_accuracy = _percent(front["accuracy_mean"])
    ax.step(front_energy, front_accuracy, where="post", color="tab:red", linewidth=1.5, zorder=2,
            label="Pareto front (accuracy vs energy)")
    ax.scatter(front_energy, front_accuracy, color="tab:red", s=40, zorder=4)
    tied = tied_with_best(front)
    if tied.any():
        ax.scatter(front_energy[tied], front_accuracy[tied], marker="*", s=180, facecolors="gold",
                   edgecolors="black", linewidths=0.6, zorder=5,
                   label="front, not significantly below the best (Welch p ≥ 0.05)")
    for x, y, label in zip(front_energy, front_accuracy, front["label"], strict=True):
        ax.annotate(str(label), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if memory_objective:
        with_memory = pareto_front(rows, workload, memory_objective=True)
        extra = with_memory[~with_memory["label"].isin(front["label"])]
        if len(extra):
            ax.scatter(extra["energy_mj"], _percent(extra["accuracy_mean"]), s=110, facecolors="none",
                       edgecolors="tab:red", zorder=4, label="on the front with memory")
            for x, y, label in zip(extra["energy_mj"], _percent(extra["accuracy_mean"]), extra["label"],
                                   strict=True):
                ax.annotate(str(label), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel(f"energy per training iteration on {workload} (mJ, log scale)")
    ax.set_ylabel("test accuracy (%), mean and 95 % CI")
    ax.set_title(f"{task}: accuracy vs energy (workload {workload}){_seeds_text(rows[shown])}", fontsize=10)
    ax.margins(x=0.12, y=0.08)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def accuracy_area_figure(summary: pd.DataFrame, task: str, workload: str) -> Figure | None:
    """Every configuration of `task` (mean accuracy) against the area of the datapath it trained on (at
    the node of `workload`'s column), with the accuracy-area front. None without area figures."""
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
    fig = Figure(figsize=(7.0, 4.6), layout="constrained")
    ax = fig.subplots()
    ax.scatter(area[shown], accuracy[shown], color="tab:blue", alpha=0.6,
               label="configuration (mean over seeds)")
    points = np.stack([-accuracy[shown], area[shown]], axis=1)
    on_front = non_dominated(points)
    order = np.argsort(area[shown][on_front])
    front_area, front_accuracy = area[shown][on_front][order], accuracy[shown][on_front][order]
    labels = rows["label"].to_numpy()[shown][on_front][order]
    ax.step(front_area, front_accuracy, where="post", color="tab:red", linewidth=1.5,
            label="Pareto front (accuracy vs area)")
    for x, y, label in zip(front_area, front_accuracy, labels, strict=True):
        ax.annotate(str(label), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel(f"datapath area (um^2, log scale; node of {workload})")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{task}: accuracy vs datapath area ({workload})", fontsize=10)
    ax.margins(x=0.12, y=0.08)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def breakdown_figure(front: pd.DataFrame, task: str, workload: str) -> Figure | None:
    """Stacked bars of the front's energy per iteration by unit (multiply, conversion, accumulation,
    update, memory), one bar per front point in the front's order. `front` is `pareto_front`'s output.

    None when the front is empty or carries no per-unit energy.
    """
    from matplotlib.figure import Figure

    rows = front[(front["task"] == task) & (front["workload"] == workload)]
    units = [u for u in ENERGY_UNITS if f"energy_mj:{u}" in rows.columns]
    if rows.empty or not units:
        return None
    fig = Figure(figsize=(max(5.0, 0.7 * len(rows) + 2.5), 4.6), layout="constrained")
    ax = fig.subplots()
    positions = np.arange(len(rows))
    bottom = np.zeros(len(rows))
    for unit in units:
        values = np.nan_to_num(pd.to_numeric(rows[f"energy_mj:{unit}"], errors="coerce").to_numpy(float))
        ax.bar(positions, values, bottom=bottom, color=UNIT_COLORS[unit], label=unit, width=0.7)
        bottom += values
    ax.set_xticks(positions, [str(label) for label in rows["label"]], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("energy per training iteration (mJ)")
    ax.set_title(f"{task}: energy of the Pareto front's points by unit\n(workload {workload})", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig
