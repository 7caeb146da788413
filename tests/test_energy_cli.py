"""`dse energy` and `dse compare`: output, CSV, and bad input -> one line, exit 2, nothing written."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


def test_energy_prints_the_breakdown() -> None:
    result = runner.invoke(app, ["energy", "--workload", "resnet50", "--format", "lns(8,gamma=8)"])
    assert result.exit_code == 0, result.output
    for needle in ("Energy per iteration by pass and unit", "backward_weight", "Memory by level",
                   "Top 10 layers", "opt=madam"):
        assert needle in result.stdout


def test_compare_csv_has_the_printed_rows(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    specs = ["lns8", "posit8", "int8", "fp8_e4m3", "bf16", "fp32"]
    args = ["compare", *specs, "--workload", "bert-base", "--node", "7nm", "--csv", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert [r["format"] for r in rows] == specs
    lines = [line for line in result.stdout.splitlines() if line.startswith("│")]
    printed = {line.split("│")[1].strip(): line for line in lines}
    for row in rows:
        line = printed[row["format"]]
        cells = [c.strip() for c in line.split("│")[1:-1]]
        values = [float(v) for k, v in row.items() if k != "format"]
        assert [float(c) for c in cells[1:]] == pytest.approx(values, rel=1e-3)
    by_format = {r["format"]: r for r in rows}
    assert float(by_format["fp32"]["vs_fp32"]) == 1.0 and float(by_format["int8"]["vs_int8"]) == 1.0


BAD_TABLE = """\
source: {key: mine, cite: x, node_nm: 28}
entries:
  - {op: int_add, bits: 8, energy_pj: -1, where: x, verified: user}
"""


@pytest.mark.parametrize(("args", "words"), [
    (["compare", "int8", "--workload", "nope"], "unknown workload 'nope'"),
    (["compare", "int8", "nonsense9"], "invalid format spec 'nonsense9'"),
    (["compare", "int8", "--node", "6nm"], "unknown technology node"),
    (["energy", "-w", "resnet18", "-f", "int8", "--sram", "nope"], "unknown sram preset"),
    (["compare", "int8", "--table", "TABLE"], "mine.yaml:3: entries[0].energy_pj"),
    (["compare", "int8", "--table", "MISSING"], "energy table not found"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path: Path, args: list[str],
                                                          words: str) -> None:
    table = tmp_path / "mine.yaml"
    table.write_text(BAD_TABLE)
    out = tmp_path / "out.csv"
    paths = {"TABLE": str(table), "MISSING": str(tmp_path / "missing.yaml")}
    args = [paths.get(a, a) for a in args]
    result = runner.invoke(app, [*args, "--csv", str(out)] if args[0] == "compare" else args)
    assert result.exit_code == 2
    assert words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert not out.exists()
