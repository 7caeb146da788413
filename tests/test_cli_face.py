"""The command line's face: --version, one-line usage errors, flags without metavars, help that fits
80 columns, one spelling per idea, readable `formats show`, progress per epoch, every error of a sweep
file at once, range checks, --retry-failed and what a Ray task reserves."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from dse import __version__
from dse.cli import app
from dse.errors import InputError, InputErrors
from dse.sweep import load_trials, parse_config, run_sweep
from dse.sweep.executors import InlineExecutor, TrialJob
from dse.train.config import TrainConfig
from dse.train.loop import check_config

runner = CliRunner()
COMMANDS = ("train", "energy", "compare", "sweep", "report", "export", "formats")


def test_version_prints_the_package_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"dse {__version__}"


@pytest.mark.parametrize(("args", "needle"), [
    (["train", "--epochs", "ten"], "'--epochs'"),
    (["train", "--no-such-option"], "--no-such-option"),
    (["energy", "-w", "resnet18", "-f", "int8", "--layers", "-2"], "--layers must be >= 1"),
    (["energy", "-w", "resnet18", "-f", "int8", "--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_a_usage_error_is_one_line_naming_the_option_and_exit_code_2(args: list[str], needle: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert "╭" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_help_fits_80_columns_with_no_bool_metavar_and_nothing_cut(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "<bool>" not in result.stdout and "…" not in result.stdout


def test_one_spelling_per_idea_across_commands() -> None:
    train = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).stdout
    energy = runner.invoke(app, ["energy", "--help"], env={"COLUMNS": "200"}).stdout
    export = runner.invoke(app, ["export", "--help"], env={"COLUMNS": "200"}).stdout
    assert "--batch-size" in train and "--batch-size" in energy and "--batch " not in energy
    assert "-f" in train.split("--format")[1][:20] and "-f" in energy.split("--format")[1][:20]
    assert "--to" in export and "--format" not in export and " -f " not in export
    for text in (train, energy):  # the rounding options name their choices
        assert "stochastic(k)" in text.split("--update-rounding")[1][:400]
    from dse.cli import _ROUNDINGS
    from dse.formats import ROUNDINGS

    assert all(mode in _ROUNDINGS for mode in ROUNDINGS)


def test_formats_show_lists_each_property_once_with_scaling_in_words() -> None:
    result = runner.invoke(app, ["formats", "show", "lns8"], env={"COLUMNS": "120"})
    assert result.exit_code == 0
    names = [line.split("│")[1].strip() for line in result.stdout.splitlines() if line.count("│") == 3]
    assert len(names) == len(set(names)) and "bits" in names
    assert "one scale per tensor" in result.stdout and "Scaling(" not in result.stdout
    block = runner.invoke(app, ["formats", "show", "mxfp8_e4m3"], env={"COLUMNS": "120"}).stdout
    assert "one scale per block of 32 along the last axis" in block


def test_train_prints_the_validation_accuracy_per_epoch_unless_quiet_or_json() -> None:
    """Per epoch the loss and the validation accuracy (what a sweep chooses by; the test accuracy
    per epoch would invite choosing an epoch by it); at the end validation, then test, as `dse
    sweep` shows its best trial."""
    args = ["train", "--epochs", "2", "--batch-size", "256"]
    loud = runner.invoke(app, args)
    assert loud.exit_code == 0, loud.output
    record = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert record["epochs_run"] == 2
    expected = [f"epoch {epoch + 1}/2: training loss {loss:.4f}, validation accuracy {validation:.4f}"
                for epoch, (loss, validation) in enumerate(zip(record["loss_curve"],
                                                               record["val_accuracy_curve"], strict=True))]
    assert loud.stderr.splitlines() == expected
    table = [line for line in loud.stdout.splitlines() if "accuracy" in line]
    assert ["validation accuracy" in table[0], "test accuracy" in table[1]] == [True, True]
    assert f"{record['val_accuracy']:.4f}" in table[0] and f"{record['test_accuracy']:.4f}" in table[1]
    for flag in ("--quiet", "--json"):
        quiet = runner.invoke(app, [*args, flag])
        assert quiet.exit_code == 0 and quiet.stderr == ""


def test_an_unwritable_csv_is_refused_before_any_work_naming_csv(tmp_path: Path) -> None:
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    targets = [tmp_path / "missing" / "x.csv", tmp_path]
    if not os.access(locked, os.W_OK):  # (root may write anywhere)
        targets.append(locked / "x.csv")
    for target in targets:
        result = runner.invoke(app, ["compare", "int8", "lns8", "--csv", str(target)])
        assert result.exit_code == 2 and "--csv" in result.stderr and result.stdout == "", target
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "missing").exists() and not (locked / "x.csv").exists()


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("lr", 1e9, "lr must be at most"), ("momentum", 5.0, "momentum must be below 1"),
    ("momentum", 1.0, "momentum must be below 1"), ("batch_size", 0, "batch_size must be >= 1"),
])
def test_training_settings_out_of_range_are_refused(field: str, value: float, needle: str) -> None:
    with pytest.raises(InputError, match=needle):
        check_config(TrainConfig(**{field: value}))


def _sweep_text(output: Path, task: str = "epochs: 1", trials: str = "  - {format: int8}\n") -> str:
    return f"name: face\ntask: {{model: mlp, dataset: digits, {task}}}\ntrials:\n{trials}output: {output}\n"


def test_a_sweep_file_with_several_errors_reports_them_all(tmp_path: Path) -> None:
    text = _sweep_text(tmp_path / "out", "epochs: 1, bogus: 2",
                       "  - {format: int88}\n  - {format: int8, optimizer: foo, lr: 1.0e+9}\n")
    with pytest.raises(InputErrors) as raised:
        parse_config(text, "s.yaml")
    problems = raised.value.problems
    assert [p.split(": ")[1] for p in problems] == ["task.bogus", "trials[0].format", "trials[1].optimizer",
                                                    "trials[1].lr"]
    assert [p.split(":")[1] for p in problems] == ["2", "4", "5", "5"]  # each at its own line
    path = tmp_path / "s.yaml"
    path.write_text(text)
    result = runner.invoke(app, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 4


def test_a_batch_larger_than_the_training_set_fails_the_dry_run(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(_sweep_text(tmp_path / "out", "epochs: 1, batch_size: 100000"))
    result = runner.invoke(app, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 2 and "larger than the training set" in result.stderr
    assert not (tmp_path / "out").exists()


def test_lns_madam_with_int8_stored_weights_fails_the_dry_run(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(_sweep_text(tmp_path / "out", trials="  - {format: int8, optimizer: lns-madam, "
                                "master_weights: false}\n"))
    result = runner.invoke(app, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 2 and "lns-madam" in result.stderr and "s.yaml:4" in result.stderr


def test_retry_failed_reruns_only_the_failed_trials(fake_train: Callable[..., Any], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv("DSE_FAKE_LOG", str(log))
    sweep = parse_config(_sweep_text(tmp_path / "out", trials="  - {format: [int8, int4, fp32]}\n"), "s.yaml")
    first = run_sweep(sweep, train_fn=fake_train, executor=InlineExecutor(), reports=False)
    assert (first.ok, first.errors) == (2, 1)  # fake_train raises for int4
    log.unlink()
    resumed = run_sweep(sweep, train_fn=fake_train, executor=InlineExecutor(), reports=False)
    assert resumed.ran == 0 and not log.exists()
    retried = run_sweep(sweep, retry_failed=True, train_fn=fake_train, executor=InlineExecutor(),
                        reports=False)
    trained = [json.loads(line)["format"] for line in log.read_text().splitlines()]
    assert retried.ran == 1 and trained == ["int4"]
    assert len(load_trials(tmp_path / "out")) == 3


def test_a_ray_task_reserves_a_gpu_on_cuda_and_retries_lost_workers() -> None:
    pytest.importorskip("ray")
    from dse.sweep.executors import RayExecutor

    executor = RayExecutor(workers=2, threads=3, retries=4)
    on_cpu = TrialJob("a", TrainConfig(device="cpu").to_dict())
    on_cuda = TrialJob("b", {**TrainConfig().to_dict(), "device": "cuda:0"})
    assert executor.task_options(on_cpu) == {"num_cpus": 3, "num_gpus": 0, "max_retries": 4}
    assert executor.task_options(on_cuda)["num_gpus"] == 1
    settings = parse_config(_sweep_text(Path("out")) + "executor: {retries: 5}\n", "s.yaml").executor
    assert settings.retries == 5


def test_the_sweep_command_ends_with_each_tasks_front(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(_sweep_text(tmp_path / "out", "epochs: 1, batch_size: 256",
                                "  - {format: [fp32, int8]}\n") + "executor: {workers: 1}\n")
    result = runner.invoke(app, ["sweep", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Pareto front: mlp/digits on proxy" in result.stdout


def test_train_has_one_option_per_config_field_with_its_default() -> None:
    import dataclasses
    import inspect

    from dse.cli import _config_text, train

    parameters = inspect.signature(train).parameters
    command_options = {name: parameter.default for name, parameter in parameters.items()}
    for field in dataclasses.fields(TrainConfig):
        assert field.name in command_options, field.name
        default = command_options[field.name]
        expected = field.default if field.name not in ("master_weights", "full_precision_layers") else \
            _config_text(field.default)
        assert default == (None if field.name == "layers" else expected), field.name
    cli_only = set(command_options) - {field.name for field in dataclasses.fields(TrainConfig)}
    assert cli_only == {"no_master_weights", "as_json", "quiet", "verbose"}


def test_energy_and_compare_take_their_shared_options_from_one_group() -> None:
    import dataclasses
    import inspect

    from dse.cli import _EnergyOptions, compare, energy

    for command in (energy, compare):
        parameters = inspect.signature(command).parameters
        for field in dataclasses.fields(_EnergyOptions):
            assert parameters[field.name].default == field.default, (command.__name__, field.name)
    args = ["compare", "int8", "--workload", "resnet18", "--batch-size", "2", "--node", "7nm", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["node_nm"] == 7.0


def test_the_sweep_energy_sections_take_their_bounds_from_the_energy_parameters(tmp_path: Path) -> None:
    from dse.energy import DatapathParams

    text = _sweep_text(tmp_path / "out") + ("energy: {datapath: {alignment_bits: 2}, memory: "
                                            "{operand_reuse: 0.5}}\n")
    with pytest.raises(InputErrors) as raised:
        parse_config(text, "s.yaml")
    assert [p.split(": ")[1] for p in raised.value.problems] == ["energy.datapath.alignment_bits",
                                                                 "energy.memory.operand_reuse"]
    with pytest.raises(InputError, match="alignment_bits must be in 4..256"):  # the same rule, one place
        DatapathParams(alignment_bits=2)


def test_every_config_field_has_a_docstring_which_is_its_option_help() -> None:
    import dataclasses

    from dse.cli import _field_docs

    docs = _field_docs(TrainConfig)
    assert {field.name for field in dataclasses.fields(TrainConfig)} <= set(docs)
    text = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "300"}).stdout
    assert "Weight-gradient format (default: gradients)." in text


@pytest.mark.parametrize("name", ["[red]x", "smile:x:"])
def test_names_and_paths_print_as_written_not_as_markup_or_emoji(name: str, tmp_path: Path) -> None:
    """Rich read a sweep's name as markup and ':x:' as an emoji code: `name: '[red]x'` printed its
    results folder as results/x (it is results/[red]x), and an error named `a:x:b.yaml` 'a❌b.yaml'."""
    config = tmp_path / "s.yaml"
    config.write_text(f"name: '{name}'\ntask: {{model: mlp, dataset: digits}}\ntrials: [{{format: fp32}}]\n")
    result = runner.invoke(app, ["sweep", str(config), "--dry-run"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"{name}: 1 trials -> results/{name}" in result.stdout
    missing = tmp_path / f"a{name}b.yaml"
    result = runner.invoke(app, ["sweep", str(missing)])
    assert result.exit_code == 2 and result.stderr.strip() == f"error: sweep file '{missing}' not found"
