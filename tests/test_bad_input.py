"""Bad input across the command line: one line naming the problem and where, exit code 2, no
traceback, nothing written. Each test is a rule an audit of every command and key found broken."""

from __future__ import annotations

import math
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from dse.cli import app
from dse.errors import InputError
from dse.sweep import load_trials, parse_config, run_sweep
from dse.sweep.executors import InlineExecutor
from dse.sweep.store import STORE_FILE
from dse.train.config import TrainConfig
from dse.train.loop import check_config

runner = CliRunner()


def _one_error_line(result: Any, *needles: str) -> str:
    """The one `error:` line of a refused command (exit 2, no traceback, nothing on stdout)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(("args", "needle"), [
    (["energy", "-w", "resnet18", "-f", "int8", "--batch-size", str(10**23)],
     "--batch-size must fit in 64 bits"),
    (["compare", "int8", "-w", "resnet18", "--operand-reuse", "inf"], "--operand-reuse must be a finite"),
    (["train", "--weight-decay", "inf"], "--weight-decay must be a finite number"),
    (["train", "--lr", "nan"], "--lr must be a finite number"),
])
def test_a_number_no_setting_can_hold_is_refused_on_the_command_line_naming_its_option(
        args: list[str], needle: str) -> None:
    _one_error_line(runner.invoke(app, args), needle)


@pytest.mark.parametrize(("line", "needle"), [
    ("task: {model: mlp, dataset: digits, epochs: 100000000000000000000000}",
     "s.yaml:2: task.epochs: must fit"),
    ("task: {model: mlp, dataset: digits, weight_decay: .inf}",
     "s.yaml:2: task.weight_decay: must be a finite"),
    ("energy: {memory: {operand_reuse: .inf}}\ntask: {model: mlp, dataset: digits}",
     "s.yaml:2: energy.memory.operand_reuse: must be a finite"),
])
def test_a_number_no_setting_can_hold_is_refused_in_a_yaml_file_at_its_line(line: str, needle: str) -> None:
    with pytest.raises(InputError) as raised:
        parse_config(f"name: n\n{line}\ntrials: [{{format: fp32}}]\n", "s.yaml")
    assert str(raised.value).startswith(needle), raised.value


@pytest.mark.parametrize(("field", "value"), [("weight_decay", math.inf), ("momentum", math.nan),
                                              ("epochs", 10**23)])
def test_a_training_setting_is_a_finite_64_bit_number(field: str, value: float) -> None:
    with pytest.raises(InputError, match=f"^{field} must"):
        TrainConfig(**{field: value})


def test_madam_with_weight_decay_is_refused_before_anything_trains(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no weight decay"):
        check_config(TrainConfig(optimizer="madam", weight_decay=0.1))
    path = tmp_path / "s.yaml"
    path.write_text(f"name: n\ntask: {{model: mlp, dataset: digits, epochs: 1}}\ntrials:\n"
                    f"  - {{format: fp32, optimizer: lns-madam, weight_decay: 0.01}}\n"
                    f"output: {tmp_path / 'out'}\n")
    result = runner.invoke(app, ["sweep", str(path), "--dry-run"])
    _one_error_line(result, "s.yaml:4: trials[0]", "weight decay")
    assert not (tmp_path / "out").exists()


def test_a_plot_into_a_directory_is_refused_before_any_work(tmp_path: Path) -> None:
    result = runner.invoke(app, ["formats", "show", "int8", "--plot", str(tmp_path)])
    _one_error_line(result, "--plot", "directory")
    assert list(tmp_path.iterdir()) == []  # (matplotlib wrote <dir>.png beside it)
    assert not tmp_path.with_suffix(".png").exists()


def test_a_plot_of_a_file_type_matplotlib_cannot_write_is_refused_before_any_work(tmp_path: Path) -> None:
    target = tmp_path / "density.xyz"
    result = runner.invoke(app, ["formats", "show", "int8", "--plot", str(target)])
    _one_error_line(result, "--plot", ".xyz", ".png")
    untyped = runner.invoke(app, ["formats", "show", "int8", "--plot", str(tmp_path / "density")])
    assert untyped.exit_code == 0 and f"wrote {tmp_path / 'density.png'}" in untyped.stdout.replace("\n", "")
    assert [path.name for path in tmp_path.iterdir()] == ["density.png"]


def test_a_dataset_given_for_a_workload_that_is_not_a_model_function_is_refused() -> None:
    result = runner.invoke(app, ["energy", "-w", "resnet18", "-f", "int8", "--dataset", "digits"])
    _one_error_line(result, "--dataset", "'resnet18'")


def _damage(store: Path, statement: str) -> None:
    with sqlite3.connect(store) as connection:
        connection.executescript(statement)
    connection.close()


@pytest.mark.parametrize("statement", [
    "DROP TABLE plan", "DROP TABLE energy", "ALTER TABLE trials DROP COLUMN seed",
    "UPDATE trials SET config = substr(config, 1, 10)", "UPDATE plan SET tuning = '[1]'",
    "PRAGMA ignore_check_constraints = 1; UPDATE trials SET status = 'weird'",
])
def test_a_damaged_store_is_one_line_naming_it_and_no_report_is_written(
        statement: str, fake_train: Callable[..., Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    text = f"name: n\ntask: {{model: mlp, dataset: digits}}\ntrials: [{{format: fp32}}]\noutput: {out}\n"
    run_sweep(parse_config(text, "s.yaml"), train_fn=fake_train, executor=InlineExecutor(), reports=False)
    store = out / STORE_FILE
    _damage(store, statement)
    before = sorted(path.name for path in out.iterdir())
    with pytest.raises(InputError, match=f"^{store} is not a readable sweep store"):
        load_trials(out)
    _one_error_line(runner.invoke(app, ["report", str(out)]), str(store))
    _one_error_line(runner.invoke(app, ["export", str(out), "--to", "csv"]), str(store))
    assert sorted(path.name for path in out.iterdir()) == before  # no report, no -wal or -shm left


def test_reading_a_store_leaves_its_directory_as_it_was(fake_train: Callable[..., Any],
                                                        tmp_path: Path) -> None:
    out = tmp_path / "out"
    text = f"name: n\ntask: {{model: mlp, dataset: digits}}\ntrials: [{{format: fp32}}]\noutput: {out}\n"
    run_sweep(parse_config(text, "s.yaml"), train_fn=fake_train, executor=InlineExecutor(), reports=False)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    assert runner.invoke(app, ["export", str(out), "--to", "csv"]).exit_code == 0
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def _stored_sweep(fake_train: Callable[..., Any], out: Path) -> None:
    text = (f"name: n\ntask: {{model: mlp, dataset: digits}}\ntrials: [{{format: fp32}}, {{format: int8}}]\n"
            f"output: {out}\n")
    run_sweep(parse_config(text, "s.yaml"), train_fn=fake_train, executor=InlineExecutor(), reports=False)


def _kill_while_holding_trials_in_the_wal(out: Path) -> None:
    """A sweep killed mid-run: its last committed trials are in sweep.sqlite-wal only."""
    code = (f"import os, sqlite3\nconnection = sqlite3.connect({str(out / STORE_FILE)!r})\n"
            "with connection:\n    connection.execute('UPDATE trials SET test_accuracy = 0.125')\n"
            "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (out / f"{STORE_FILE}-wal").stat().st_size > 0


@pytest.mark.parametrize(("file_writable", "killed"), [(False, False), (True, False), (False, True)],
                         ids=["read-only media", "write-protected directory", "killed, read-only"])
def test_a_store_on_read_only_media_is_read_and_left_as_it_was(
        file_writable: bool, killed: bool, fake_train: Callable[..., Any], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the WAL index cannot be made (measured on a read-only mount: SQLite's mode=rw and mode=ro
    both fail with 'unable to open database file' on a cleanly closed WAL store, and on a killed sweep's
    store whose -shm file was not copied; only immutable=1 reads the first), the store is read as it
    would be on writable media, its -wal file's trials included."""
    out = tmp_path / "out"
    _stored_sweep(fake_train, out)
    if killed:
        _kill_while_holding_trials_in_the_wal(out)
        (out / f"{STORE_FILE}-shm").unlink()
        shutil.copytree(out, tmp_path / "writable")
        expected = runner.invoke(app, ["export", str(tmp_path / "writable"), "--to", "csv"])
        assert "0.125" in expected.stdout
    else:
        expected = runner.invoke(app, ["export", str(out), "--to", "csv"])
    assert expected.exit_code == 0 and "int8" in expected.stdout
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    connect, access = sqlite3.connect, os.access

    def read_only_media(database: str, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        if str(database).startswith(f"file:{out}") and "immutable=1" not in str(database):
            database = f"file:{tmp_path / 'cannot' / 'open'}?mode=rw"  # unable to open database file
        return connect(database, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", read_only_media)
    monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and (
        file_writable or not mode & os.W_OK or not str(path).startswith(str(out))))
    result = runner.invoke(app, ["export", str(out), "--to", "csv"])
    assert (result.exit_code, result.stdout) == (0, expected.stdout), result.output
    assert len(load_trials(out)) == 2
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def test_a_killed_sweeps_store_is_read_with_every_trial_in_its_wal_file(
        fake_train: Callable[..., Any], tmp_path: Path) -> None:
    """A sweep killed mid-run leaves trials in sweep.sqlite-wal only; a read sees them and loses none."""
    out = tmp_path / "out"
    _stored_sweep(fake_train, out)
    expected = load_trials(out)
    _kill_while_holding_trials_in_the_wal(out)
    for _ in range(2):
        read = list(load_trials(out)["test_accuracy"])
        assert read == [0.125] * len(expected) != list(expected["test_accuracy"])


def test_a_spec_that_yaml_split_at_its_comma_says_to_quote_it() -> None:
    text = "name: n\ntask: {model: mlp, dataset: digits}\ntrials:\n  - {format: posit(8,1), optimizer: sgd}\n"
    with pytest.raises(InputError) as raised:
        parse_config(text, "s.yaml")
    first = str(raised.value).splitlines()[0]
    assert first.startswith("s.yaml:4: trials[0].format: invalid format spec 'posit(8'") and "quoted" in first


def test_an_alias_inside_its_own_anchor_is_one_line_at_it(tmp_path: Path) -> None:
    """A YAML document that contains itself (`&r [..., *r]`) was a RecursionError traceback."""
    config = tmp_path / "s.yaml"
    config.write_text("name: n\ntask: {model: mlp, dataset: digits}\ntrials: &r [{format: fp32}, *r]\n")
    line = _one_error_line(runner.invoke(app, ["sweep", str(config), "--dry-run"]), f"{config}:3: trials[1]")
    assert "alias inside its own anchor" in line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["s.yaml"]


def test_an_alias_and_a_merge_key_still_read_as_their_anchor() -> None:
    text = ("name: n\ntasks:\n  - &t {name: a, model: mlp, dataset: digits, epochs: 1}\n"
            "  - {<<: *t, name: b, epochs: 2}\ntrials: [&f {format: fp32}, {<<: *f, optimizer: adam}]\n")
    config = parse_config(text, "s.yaml")
    assert [(task.name, task.defaults["epochs"], task.defaults["model"]) for task in config.tasks] == [
        ("a", 1, "mlp"), ("b", 2, "mlp")]


def test_a_data_dir_for_a_dataset_that_reads_no_files_is_refused(tmp_path: Path) -> None:
    from dse.data import load_dataset

    with pytest.raises(InputError, match="dataset 'digits' reads none"):
        load_dataset("digits", data_dir=tmp_path)
    path = tmp_path / "s.yaml"
    path.write_text(f"name: n\ntask: {{model: mlp, dataset: digits, data_dir: {tmp_path}}}\n"
                    f"trials: [{{format: fp32}}]\noutput: {tmp_path / 'out'}\n")
    _one_error_line(runner.invoke(app, ["sweep", str(path), "--dry-run"]), "s.yaml:2: task: data_dir")


def test_a_seed_is_at_least_zero_in_train_as_in_a_sweep_file() -> None:
    with pytest.raises(InputError, match="seed must be >= 0"):
        TrainConfig(seed=-1)


_HOLD_LOCK = """\
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1])
connection.execute("PRAGMA locking_mode=EXCLUSIVE")
connection.execute("BEGIN EXCLUSIVE")
connection.execute("INSERT OR REPLACE INTO meta VALUES ('held', 'by another process')")
print("locked", flush=True)
time.sleep(60)
"""


def test_a_store_locked_by_another_process_is_one_line_saying_so_and_nothing_is_lost(
        fake_train: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store another process holds a write lock on was a traceback (sqlite3.OperationalError: database
    is locked) after 60 s; its reading, where the lock let it read nothing, said to remove the store."""
    from dse.sweep import store

    out = tmp_path / "out"
    _stored_sweep(fake_train, out)
    path = out / STORE_FILE
    before = load_trials(out)
    monkeypatch.setattr(store, "BUSY_TIMEOUT_S", 0.2)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        config = tmp_path / "s.yaml"
        config.write_text(f"name: n\ntask: {{model: mlp, dataset: digits}}\n"
                          f"trials: [{{format: fp32}}, {{format: int8}}]\noutput: {out}\n")
        line = _one_error_line(runner.invoke(app, ["sweep", str(config), "--force"]), str(path))
        assert "locked by another process" in line and "remove" not in line
    finally:
        holder.kill()
        holder.wait()
    assert not [p.name for p in out.iterdir() if not p.name.startswith(STORE_FILE)]  # no report written
    pd.testing.assert_frame_equal(load_trials(out), before)


@pytest.mark.parametrize("stopped", ["before its plan", "as it opened the store"])
def test_a_store_a_sweep_was_stopped_in_before_its_plan_is_used_not_refused(
        stopped: str, fake_train: Callable[..., Any], tmp_path: Path) -> None:
    """A sweep stopped between creating its store and writing its plan leaves empty tables: the next run
    said the store was not a dse store and to remove it. Stopped as SQLite opened the file (before its
    first write), the store is an empty file, which SQLite reads as an empty database: it was refused
    as 'not a dse sweep store (it has no sweep name)'."""
    from dse.sweep.store import SweepStore

    out = tmp_path / "out"
    out.mkdir()
    if stopped == "before its plan":
        SweepStore(out).close()
    else:
        (out / STORE_FILE).touch()
    _one_error_line(runner.invoke(app, ["report", str(out)]), f"{out / STORE_FILE} holds no sweep yet")
    _stored_sweep(fake_train, out)
    assert len(load_trials(out)) == 2


@pytest.mark.parametrize("statement", ["CREATE TABLE notes (text TEXT)", "CREATE TABLE meta (key, value)"])
def test_another_sqlite_file_in_place_of_the_store_is_named_and_kept(
        statement: str, fake_train: Callable[..., Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with sqlite3.connect(out / STORE_FILE) as connection:
        connection.execute(statement)
    connection.close()
    kept = (out / STORE_FILE).read_bytes()
    config = tmp_path / "s.yaml"
    config.write_text(f"name: n\ntask: {{model: mlp, dataset: digits}}\ntrials: [{{format: fp32}}]\n"
                      f"output: {out}\n")
    line = _one_error_line(runner.invoke(app, ["sweep", str(config)]),
                           f"{out / STORE_FILE} is not a dse sweep store")
    assert "remove" not in line and "output" in line
    line = _one_error_line(runner.invoke(app, ["report", str(out)]), str(out / STORE_FILE))
    assert "remove" not in line
    assert [p.name for p in out.iterdir()] == [STORE_FILE] and (out / STORE_FILE).read_bytes() == kept


def _laughs(levels: int, key: str = "x") -> str:
    """YAML whose aliases multiply: level k is ten aliases of level k - 1, so 10^levels values."""
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * 10)}]" for k in range(1, levels)]
    return "\n".join(lines) + f"\n{key}: *l{levels - 1}\n"


@pytest.mark.parametrize("dry_run", [True, False], ids=["--dry-run", "run"])
def test_aliases_that_multiply_are_one_line_at_the_file_and_line_not_a_hang(dry_run: bool,
                                                                             tmp_path: Path) -> None:
    """A 'billion laughs' sweep file (10^9 values from 12 lines) was walked in full: dse sweep hung
    (measured: still walking after 60 s, memory growing) and would have exhausted memory."""
    config = tmp_path / "s.yaml"
    config.write_text(_laughs(9, "name") + "task: {model: mlp, dataset: digits}\ntrials: [{format: fp32}]\n")
    args = [sys.executable, "cli.py", "sweep", str(config), *(["--dry-run"] if dry_run else [])]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 2 and result.stdout == "", result.stderr
    line, = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {config}:") and "aliases repeat more than 100000 values" in line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["s.yaml"]


def test_aliases_up_to_the_bound_read_in_full_and_their_errors_name_the_alias_line() -> None:
    from dse.yaml_lines import ALIAS_EXPANSION_LIMIT, load_yaml

    data, _ = load_yaml(_laughs(4), "a.yaml")  # 10^4 values from aliases: an ordinary document's worth
    assert len(data["x"]) == 10 and all(len(item) == 10 for item in data["x"])
    assert sum(len(c) for b in data["x"] for a in b for c in a) == 10_000 < ALIAS_EXPANSION_LIMIT
    with pytest.raises(InputError, match=r"^a\.yaml:5: l4\[\d\]: aliases repeat more than"):
        load_yaml(_laughs(6), "a.yaml")  # (10^5 repeats are passed inside l4, on line 5)
    _, source = load_yaml("a: &a {lr: 1}\nb:\n  - 1\n  - *a\n", "a.yaml")
    assert (source.line(["b", 1]), source.line(["b", 1, "lr"])) == (4, 1)  # the alias, its anchor's key


def test_one_alias_per_trial_to_defaults_reads_in_a_sweep_of_any_length() -> None:
    """The bound grows with the values the file writes out: before, a flat 100000 refused 2000 trials
    merging a block of 60 defaults (and 17000 trials merging 5) as 'aliases of aliases multiply'."""
    from dse.yaml_lines import ALIAS_EXPANSION_LIMIT, load_yaml

    defaults = ", ".join(f"k{i}: {i}" for i in range(60))
    text = f"defaults: &t {{{defaults}}}\ntrials:\n" + "".join(f"  - {{<<: *t, lr: {i}}}\n"
                                                                 for i in range(2000))
    data, source = load_yaml(text, "s.yaml")
    assert len(data["trials"]) == 2000 and 2000 * 61 > ALIAS_EXPANSION_LIMIT
    assert data["trials"][1999] == {**{f"k{i}": i for i in range(60)}, "lr": 1999}
    assert source.line(["trials", 1999, "lr"]) == 2002


def test_train_layers_from_yaml_are_bounded_and_read_as_sweep_files_are(tmp_path: Path) -> None:
    rules = tmp_path / "layers.yaml"
    rules.write_text(_laughs(9, "layers"))
    line = _one_error_line(runner.invoke(app, ["train", "--layers", str(rules)]), f"{rules}:")
    assert "aliases repeat more than" in line
    rules.write_text("- {match: head, format: fp32, lr: 1e-3}\n- {match: [, format: fp32}\n")
    _one_error_line(runner.invoke(app, ["train", "--layers", str(rules)]), f"{rules}:2: invalid YAML")


def test_an_option_given_positionally_and_by_name_says_so_in_spec_words() -> None:
    """Was Python's own `posit() got multiple values for argument 'es'`."""
    from dse.formats import get

    with pytest.raises(InputError, match=r"^invalid format spec 'posit\(8,1,es=2\)': option 'es' given "):
        get("posit(8,1,es=2)")


def test_a_llama_workload_with_more_blocks_than_can_be_built_is_refused_at_once() -> None:
    """`llama(blocks=99999999)` built a layer list per block: still running after 120 s (measured)."""
    _one_error_line(runner.invoke(app, ["energy", "-w", "llama(blocks=99999999,width=64)", "-f", "int8"]),
                    "blocks must be at most 4096")
    _one_error_line(runner.invoke(app, ["energy", "-w", f"llama(blocks=2,width={2**70})", "-f", "int8"]),
                    "width must fit in 64 bits")


def test_the_value_density_of_a_63_bit_format_is_plotted(tmp_path: Path) -> None:
    """fp(e=10,m=52) has 2^63 codes, past int64: `formats show --plot` was a RuntimeError traceback."""
    result = runner.invoke(app, ["formats", "show", "fp(e=10,m=52)", "--plot", str(tmp_path / "d.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG" and len(list(tmp_path.iterdir())) == 1


_PLAIN_SWEEP = "task: {model: mlp, dataset: digits}\ntrials: [{format: fp32}]\n"


@pytest.mark.parametrize(("text", "needle"), [
    ("name: ../../elsewhere\n" + _PLAIN_SWEEP, "s.yaml:1: name: the sweep name '../../elsewhere' is a path"),
    ("name: n\n" + _PLAIN_SWEEP + "output: ''\n", "s.yaml:4: output: empty path"),
])
def test_a_sweep_name_that_is_a_path_or_an_empty_output_is_refused(text: str, needle: str,
                                                                    tmp_path: Path) -> None:
    """`name: ../../x` put the results in ../x (results/../../x), `output: ''` in the current folder."""
    config = tmp_path / "s.yaml"
    config.write_text(text)
    _one_error_line(runner.invoke(app, ["sweep", str(config), "--dry-run"]), needle)
