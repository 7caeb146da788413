"""Energy tables: provenance on every entry, the Horowitz reproduction, and bad tables rejected clearly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from dse.energy import build_model, load_table, load_tables, reproduction, tables_dir
from dse.energy.components import Weights, calibrate, model_energy
from dse.errors import InputError

HOROWITZ = tables_dir() / "horowitz2014_45nm.yaml"


def test_every_entry_has_provenance() -> None:
    for table in load_tables().values():
        assert table.source.cite
        for entry in table.entries:
            assert entry.where.strip()
            assert entry.verified in ("file", "page", "memory", "derived", "user")


def test_unverified_numbers_are_labelled_memory() -> None:
    """HBM2's 3.9 pJ/bit is recalled, not read: the table must say so."""
    presets = {e.preset: e for t in load_tables().values() for _, e in t.of("dram_access") if e.preset}
    assert presets["hbm2"].verified == "memory"
    assert presets["hbm2e"].verified == "page"


def test_horowitz_reproduced_within_5_percent_from_the_yaml() -> None:
    """Compute the model for each raw YAML entry (read here, independently of the loader)."""
    raw = yaml.safe_load(HOROWITZ.read_text())["entries"]
    table = load_table(HOROWITZ)
    components = calibrate(table, Weights.from_tables(list(load_tables().values())))
    checked = 0
    for entry, parsed in zip(raw, table.entries, strict=True):
        model = model_energy(components, parsed)
        if model is None:
            continue
        assert abs(model / entry["energy_pj"] - 1) < 0.05, (entry, model)
        checked += 1
    assert checked == 9  # int add x3, int mult x2, fp add x2, fp mult x2


def test_reproduction_covers_memory_entries_too() -> None:
    frame = reproduction(build_model())
    assert len(frame) == len(yaml.safe_load(HOROWITZ.read_text())["entries"])
    assert (frame["residual"].abs() < 0.05).all()


def test_aladdin_derived_weights_match_the_aladdin_table() -> None:
    aladdin = {(e.op, e.latency_ns): e for e in load_tables()["aladdin2014"].entries}
    adder_bit = aladdin[("int_add", 1)].energy_pj / 32
    weights = Weights.from_tables(list(load_tables().values()))
    register = aladdin[("register", 1)].energy_pj / adder_bit
    comparator = aladdin[("comparator", 1)].energy_pj / 32 / adder_bit
    mux = aladdin[("shifter", 1)].energy_pj / (32 * 5) / adder_bit  # a 32-bit, 5-level log shifter
    assert weights.register_bit_weight == pytest.approx(register, rel=0.01)
    assert weights.comparator_bit_weight == pytest.approx(comparator, rel=0.01)
    assert weights.mux_bit_weight == pytest.approx(mux, rel=0.01)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    return path


GOOD = """\
source:
  key: mine
  cite: my synthesis
  node_nm: 28
entries:
  - {op: int_add, bits: 8, energy_pj: 0.02, area_um2: 20, where: syn, verified: user}
  - {op: int_add, bits: 32, energy_pj: 0.07, area_um2: 75, where: syn, verified: user}
  - {op: int_mul, bits: 8, energy_pj: 0.12, area_um2: 150, where: syn, verified: user}
  - {op: int_mul, bits: 16, energy_pj: 0.45, area_um2: 560, where: syn, verified: user}
  - {op: fp_add, exp_bits: 8, man_bits: 23, energy_pj: 0.5, area_um2: 2000, where: syn, verified: user}
  - {op: fp_mul, exp_bits: 8, man_bits: 23, energy_pj: 2.0, area_um2: 4000, where: syn, verified: user}
"""


@pytest.mark.parametrize(("needle", "replacement", "line", "words"), [
    ("energy_pj: 0.12", "energy_pj: -0.12", 8, "greater than 0"),
    ("energy_pj: 0.45, ", "", 9, "energy_pj"),
    ("energy_pj: 0.5", "energy_pj: abc", 10, "valid number"),
    ("op: fp_mul", "op: fp_div", 11, "fp_div"),
    ("area_um2: 150", "area_um2: -150", 8, "greater than or equal to 0"),
    ("area_um2: 560, ", "", 9, "needs a positive area_um2"),
    ("node_nm: 28", "node_nm: 28\n  node_nm: 32", 5, "duplicate key"),
    ("  - {op: int_add, bits: 8,", "  - {op: int_add bits: 8,", 6, "YAML"),
])
def test_bad_user_table_names_file_and_line(tmp_path: Path, needle: str, replacement: str, line: int,
                                            words: str) -> None:
    assert needle in GOOD
    path = _write(tmp_path, GOOD.replace(needle, replacement, 1))
    with pytest.raises(InputError) as info:
        build_model("28nm", table=path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}:"), message
    assert words in message
    assert "\n" not in message


def test_user_table_missing_an_op_class_is_an_error(tmp_path: Path) -> None:
    text = "\n".join(line for line in GOOD.splitlines() if "fp_mul" not in line) + "\n"
    with pytest.raises(InputError, match=r"mine.yaml:1: missing entry: .*'fp_mul'"):
        build_model(table=_write(tmp_path, text))


def test_user_table_recalibrates_at_its_own_node(tmp_path: Path) -> None:
    """The user's numbers hold at the user's node: the model reproduces them there, not Horowitz's."""
    model = build_model("28nm", table=_write(tmp_path, GOOD))
    assert model.calibration is not None and model.calibration.source.key == "mine"
    assert model.components.multiplier(8, 8) == pytest.approx(0.12, rel=0.05)
    assert model.components.fp_mul(8, 23) == pytest.approx(2.0, rel=0.05)
    assert build_model("45nm").components.multiplier(8, 8) == pytest.approx(0.2)
    assert model.area is not None and model.area.multiplier(8, 8) == pytest.approx(150, rel=0.05)


def test_the_7nm_calibration_reproduces_jouppi_et_al() -> None:
    """The 7 nm fit reproduces Jouppi et al.'s Table 2 as the 45 nm one does Horowitz (within 16 %)."""
    table = load_tables()["jouppi2021"]
    frame = reproduction(build_model("7nm"), table)
    compute = frame[frame["op"].isin(["int_add", "int_mul", "fp_add", "fp_mul"])]
    assert len(compute) == 10
    assert (compute["residual"].abs() < 0.16).all(), compute


def test_tables_directory_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "tables"
    shutil.copytree(tables_dir(), copy)
    raw = (copy / "memory_presets.yaml").read_text()
    raw = raw.replace("energy_pj_per_bit: 6.0", "energy_pj_per_bit: 60.0")
    (copy / "memory_presets.yaml").write_text(raw)
    monkeypatch.setenv("DSE_ENERGY_TABLES", str(copy))
    assert tables_dir() == copy
    assert build_model(tables_directory=copy).dram_pj_per_bit == pytest.approx(60.0)
    monkeypatch.setenv("DSE_ENERGY_TABLES", str(tmp_path / "missing"))
    with pytest.raises(InputError, match="not found"):
        load_tables()


def test_an_unreadable_table_is_an_input_error(tmp_path: Path) -> None:
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)
    with pytest.raises(InputError, match=r"loop.yaml: cannot read energy table \(OSError\)"):
        load_table(loop)
