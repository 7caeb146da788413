"""`dse energy` and `dse compare`: output, CSV, and bad input -> one line, exit 2, nothing written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dse.cli import app

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


CALIBRATION_TABLE = """\
source:
  key: mine
  cite: my synthesis
  node_nm: 28
entries:
  - {op: int_add, bits: 8, energy_pj: 0.02, area_um2: 36, where: syn, verified: user}
  - {op: int_mul, bits: 8, energy_pj: 0.12, area_um2: 282, where: syn, verified: user}
  - {op: fp_add, exp_bits: 8, man_bits: 23, energy_pj: 0.5, area_um2: 2000, where: syn, verified: user}
  - {op: fp_mul, exp_bits: 8, man_bits: 23, energy_pj: 2.0, area_um2: 4000, where: syn, verified: user}
"""

BAD_TABLE = """\
source: {key: mine, cite: x, node_nm: 28}
entries:
  - {op: int_add, bits: 8, energy_pj: -1, where: x, verified: user}
"""


@pytest.mark.parametrize(("args", "words"), [
    (["compare", "int8", "--workload", "nope"], "unknown workload 'nope'"),
    (["compare", "int8", "nonsense9"], "invalid format spec 'nonsense9'"),
    (["compare", "int8", "--node", "6nm"], "unknown technology node '6nm' (known: "),
    (["compare", "int8", "--node", "3.5nm"], "unknown technology node '3.5nm' (known: "),
    (["compare", "int8", "--node", "3nm"], "technology node '3nm' is outside the calibrated range 7-45 nm"),
    (["compare", "int8", "--vector-length", "0"], "vector_length must be an integer >= 1, got 0"),
    (["compare", "lns8", "--lns-conversion-length", "24"], "lns_conversion_length must be a multiple of"),
    (["compare", "int8", "--scope", "chip"], "unknown scope 'chip' (known: datapath, pe, system)"),
    (["compare", "int8", "--node-scaling", "magic"], "unknown node scaling 'magic'"),
    (["compare", "int8", "--optimizer", "lion"], "unknown optimizer 'lion' (known: sgd, adam, adamw"),
    (["compare", "int8", "--rounding", "roundish"], "unknown rounding 'roundish'"),
    (["compare", "int8", "--table", "AREA"], "mine.yaml:7: int_mul entry needs a positive area_um2"),
    (["compare", "int8", "--table", "NEGATIVE_AREA"], "mine.yaml:6: entries[0].area_um2"),
    (["energy", "-w", "resnet18", "-f", "int8", "--sram", "nope"], "unknown sram preset"),
    (["compare", "int8", "--table", "TABLE"], "mine.yaml:3: entries[0].energy_pj"),
    (["compare", "int8", "--table", "MISSING"], "energy table not found"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path: Path, args: list[str],
                                                          words: str) -> None:
    table = tmp_path / "mine.yaml"
    table.write_text(BAD_TABLE)
    out = tmp_path / "out.csv"
    no_area = tmp_path / "no_area" / "mine.yaml"
    no_area.parent.mkdir()
    no_area.write_text(CALIBRATION_TABLE.replace("area_um2: 282, ", ""))
    negative = tmp_path / "negative" / "mine.yaml"
    negative.parent.mkdir()
    negative.write_text(CALIBRATION_TABLE.replace("area_um2: 36", "area_um2: -36"))
    paths = {"TABLE": str(table), "MISSING": str(tmp_path / "missing.yaml"), "AREA": str(no_area),
             "NEGATIVE_AREA": str(negative)}
    args = [paths.get(a, a) for a in args]
    result = runner.invoke(app, [*args, "--csv", str(out)] if args[0] == "compare" else args)
    assert result.exit_code == 2
    assert words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert not out.exists()


def test_energy_json_and_csv_agree(tmp_path: Path) -> None:
    out = tmp_path / "breakdown.csv"
    args = ["energy", "-w", "resnet18", "-f", "fp8_e4m3", "--optimizer", "adamw", "--batch-size", "4",
            "--node", "7nm", "--scope", "pe", "--json", "--csv", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["batch_size"] == 4 and data["scope"] == "pe" and "opt=adam" in data["formats"]
    rows = list(csv.DictReader(out.open()))
    assert sum(float(r["energy_pj"]) for r in rows) * 1e-9 == pytest.approx(data["iteration_mj"])
    assert not any(r["level"] == "dram" for r in rows)  # the PE scope stops at the on-chip buffer
    assert data["area_um2"]["pe"] > data["area_um2"]["datapath"] > 0


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "madam", "lns-madam", "niti"])
def test_every_optimizer_train_accepts_is_priced(optimizer: str) -> None:
    result = runner.invoke(app, ["compare", "int8", "--optimizer", optimizer, "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert rows[0]["update_mj"] > 0


def test_compare_json_shows_area_and_scopes_nest() -> None:
    totals = {}
    for scope in ("datapath", "pe", "system"):
        result = runner.invoke(app, ["compare", "fp8_e4m3", "--scope", scope, "--json"])
        assert result.exit_code == 0, result.output
        row = json.loads(result.stdout)["rows"][0]
        totals[scope] = row["iteration_mj"]
        assert row["datapath_um2"] > 0
    assert totals["datapath"] < totals["pe"] < totals["system"]


SUPPORT = Path(__file__).resolve().parents[1] / "support"


def _gru_onnx(path: Path) -> Path:
    """tests/support/own_networks.py's GRU network exported to ONNX (one GRU node)."""
    pytest.importorskip("onnx")
    import warnings

    import torch
    from support import own_networks

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation notes
        torch.onnx.export(own_networks.last_step_gru((64,), 10).eval(), (torch.randn(2, 64),), str(path),
                          dynamo=False)
    return path


@pytest.mark.parametrize("source", ["traced", "onnx"])
def test_what_a_workload_leaves_unpriced_is_one_warning_line(source: str, tmp_path: Path) -> None:
    """A kernel the tracer cannot take apart (torch.cdist) or an ONNX node the reader does not read (GRU)
    is one `warning:` line on stderr, as dse's other notes are, not Python's warning with its source
    line."""
    if source == "traced":
        args = ["--workload", f"{SUPPORT / 'own_networks.py'}:prototypes", "--dataset", "digits"]
    else:
        args = ["--workload", str(_gru_onnx(tmp_path / "gru.onnx"))]
    result = CliRunner().invoke(app, ["energy", *args, "--format", "int8", "--layers", "1"])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "not priced" in lines[0], lines


def test_a_sweep_prints_what_its_workload_leaves_unpriced_as_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dse.sweep.executors
    import dse.sweep.runner
    from dse.sweep.executors import InlineExecutor

    monkeypatch.setattr(dse.sweep.runner, "make_executor", lambda sweep: InlineExecutor())
    monkeypatch.setattr(dse.sweep.runner, "start_worker_server", lambda: None)
    monkeypatch.setattr(dse.sweep.executors, "start_worker_server", lambda: None)
    config = tmp_path / "s.yaml"
    config.write_text(f"name: unpriced\ntask: {{model: {SUPPORT / 'own_networks.py'}:prototypes, "
                      f"dataset: digits, epochs: 1, batch_size: 200}}\nenergy: {{workloads: [proxy]}}\n"
                      f"trials:\n  - {{format: int8}}\noutput: {tmp_path / 'out'}\n")
    result = CliRunner().invoke(app, ["sweep", str(config), "-q"])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "not priced" in lines[0], lines
