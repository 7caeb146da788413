"""The energy figures docs/energy-model.md quotes are what the model gives now: every row that
benchmarks/published.py prints (the per-MAC and ResNet-50 tables, the LNS-Madam ablation and baseline
grid, and the "dse now" column of the published-figures table) appears in the page as printed, so a
change to the model or its tables that moves a number fails here until the page is regenerated."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
from support.benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "energy-model.md"


@pytest.fixture(scope="module")
def published() -> ModuleType:
    return load_benchmark("published", keep_registered=False)


def table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|") and not line.startswith("|---")]


def missing_from_page(rows: list[str]) -> list[str]:
    page = set(PAGE.read_text().splitlines())
    return [row for row in rows if row not in page]


def test_the_per_mac_and_resnet50_tables_are_the_models(published: ModuleType) -> None:
    rows = table_rows(published.model_tables())
    assert len(rows) > 30
    assert missing_from_page(rows) == []


def test_the_lns_madam_ablation_and_baselines_are_the_models(published: ModuleType) -> None:
    rows = table_rows(published.lns_madam_ablation()) + table_rows(published.lns_madam_baselines())
    assert len(rows) > 20
    assert missing_from_page(rows) == []


def test_the_published_figures_table_shows_the_model_now(published: ModuleType) -> None:
    def without_before(row: str) -> str:
        cells = row.split(" | ")
        return " | ".join(cells[:-2] + cells[-1:])  # the "dse before" column needs the older commit

    rows = [without_before(row) for row in table_rows(published.table(None, published._values(), True))]
    assert len(rows) > 20
    page = {without_before(row) for row in table_rows(PAGE.read_text())}
    assert [row for row in rows if row not in page] == []
