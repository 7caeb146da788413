"""Figures fit for a paper: every configuration named, plain log ticks, no title unless asked, the
breakdown as a whole, compute only and shares, and a note where accuracy and energy come from
different workloads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest

from dse.report import summarize_trials
from dse.report.pareto import pareto_front
from dse.report.plots import accuracy_energy_figure, breakdown_figure

CONFIGS = {"fp32 sgd": ("fp32", 0.95, 4.0), "bf16 sgd": ("bf16", 0.94, 2.5), "int8 sgd": ("int8", 0.92, 1.5),
           "int4 sgd": ("int4", 0.60, 1.2), "posit8 sgd": ("posit8", 0.91, 2.0)}
"""label -> (format, accuracy, energy in mJ on both workloads): within one decade of energy."""


@pytest.fixture
def summary(make_trial_row: Callable[..., dict[str, Any]], make_trials_frame: Callable[..., pd.DataFrame]
            ) -> pd.DataFrame:
    """The summary of CONFIGS over two seeds."""
    rows = [make_trial_row("t", label, seed, accuracy + 0.001 * seed,
                           {"proxy": energy, "resnet50": 100 * energy}, format=fmt)
            for label, (fmt, accuracy, energy) in CONFIGS.items() for seed in range(2)]
    return summarize_trials(make_trials_frame(rows, ["proxy", "resnet50"]))


def _texts(figure: object) -> list[str]:
    return [text.get_text() for text in figure.findobj(lambda artist: hasattr(artist, "get_text"))]


def test_every_configuration_is_named_and_ticks_are_plain_numbers(summary: pd.DataFrame) -> None:
    figure = accuracy_energy_figure(summary, "t", "proxy")
    figure.draw_without_rendering()  # tick labels are made at draw time
    (legend,) = figure.legends
    assert [t.get_text() for t in legend.get_texts()] == list(CONFIGS)  # the front is only some of them
    ticks = [label.get_text() for label in figure.axes[0].get_xticklabels() if label.get_text()]
    assert len(ticks) >= 3 and all("e" not in tick and "$" not in tick for tick in ticks), ticks


def test_no_title_unless_asked_and_a_note_when_the_energy_is_another_workload(summary: pd.DataFrame) -> None:
    plain = accuracy_energy_figure(summary, "t", "proxy")
    assert plain.axes[0].get_title() == "" and not any("as trained" in t for t in _texts(plain))
    titled = accuracy_energy_figure(summary, "t", "resnet50", title=True)
    assert "accuracy vs energy" in titled.axes[0].get_title()
    note = "accuracy: t as trained; energy: one training iteration of resnet50"
    assert any(note in text for text in _texts(titled))


def test_the_breakdown_shows_the_whole_compute_only_and_shares(summary: pd.DataFrame,
                                                                unit_shares: tuple[float, ...]) -> None:
    front = pareto_front(summary, "proxy").assign(task="t", workload="proxy")
    figure = breakdown_figure(front, "t", "proxy")
    whole, compute, shares = figure.axes
    assert figure.texts == [] and figure._suptitle is None
    heights = {ax: np.array([bar.get_height() for bar in ax.patches]).reshape(-1, len(front))
               for ax in (whole, compute, shares)}
    units = len(unit_shares)
    assert heights[whole].shape[0] == units and heights[compute].shape[0] == units - 1  # memory left out
    np.testing.assert_allclose(heights[shares].sum(axis=0), 100.0)
    np.testing.assert_allclose(heights[shares][:, 0], 100.0 * np.array(unit_shares))
    np.testing.assert_allclose(heights[compute].sum(axis=0), heights[whole][:-1].sum(axis=0))


@pytest.mark.parametrize("workload", ["proxy", "resnet50"])
@pytest.mark.parametrize("run", [False, True])
def test_every_text_of_the_accuracy_energy_figure_lies_inside_it(
        make_trial_row: Callable[..., dict[str, Any]], make_trials_frame: Callable[..., pd.DataFrame],
        workload: str, run: bool) -> None:
    """A long configuration label (the quickstart's LNS-Madam one) widens the legend and narrows the axes:
    the x label, longer where it names the run's mean, must still be whole on the page."""
    long = "lns8 lns-madam lr=0.03125 p-scale=10.0 master=lns(16,gamma=2048)"
    labels = {**CONFIGS, long: ("lns8", 0.93, 1.8)}
    rows = []
    for label, (fmt, accuracy, energy) in labels.items():
        for seed in range(2):
            row = make_trial_row("mlp/mnist1d", label, seed, accuracy + 0.001 * seed,
                                 {"proxy": energy, "resnet50": 100 * energy}, format=fmt)
            if run:
                for w, mj in (("proxy", energy), ("resnet50", 100 * energy)):
                    row[f"run_mean_energy_mj:{w}"], row[f"run_energy_mj:{w}"] = 1.1 * mj, 540 * 1.1 * mj
            rows.append(row)
    figure = accuracy_energy_figure(summarize_trials(make_trials_frame(rows, ["proxy", "resnet50"])),
                                    "mlp/mnist1d", workload)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(figure).get_renderer()  # as the reports render it (PNG)
    figure.draw(renderer)
    page = figure.bbox
    (ax,) = figure.axes
    texts = [ax.xaxis.label, ax.yaxis.label, *(t for legend in (*figure.legends, *ax.get_children())
                                               if hasattr(legend, "get_texts") for t in legend.get_texts()),
             *([figure._supxlabel] if figure._supxlabel is not None else [])]
    assert len(texts) > 2 + len(labels)
    for text in texts:
        box = text.get_window_extent(renderer)
        assert (box.x0 >= page.x0 - 0.5 and box.x1 <= page.x1 + 0.5 and box.y0 >= page.y0 - 0.5
                and box.y1 <= page.y1 + 0.5), (text.get_text(), box, page)
