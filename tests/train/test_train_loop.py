"""The training loop as users run it: `dse train` and `dse.train.train`, on real (tiny) runs."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from dse.cli import app
from dse.errors import InputError
from dse.train import TrainConfig, train
from dse.train.tally import members_finite

runner = CliRunner()
QUICK = TrainConfig(model="mlp", dataset="digits", epochs=2, batch_size=64)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_fp32_digits_mlp_learns_far_above_chance() -> None:
    result = train(QUICK.replace(epochs=3))
    assert result.test_accuracy > 0.8 and not result.diverged
    assert result.epochs_run == 3 and len(result.loss_curve) == len(result.accuracy_curve) == 3
    assert result.loss_curve[-1] < result.loss_curve[0]
    assert result.params == 64 * 128 + 128 + 128 * 10 + 10


def test_validation_accuracy_is_measured_on_the_validation_split_each_epoch() -> None:
    from dse.data import load_dataset

    data = load_dataset("digits")
    assert data.x_val is not None
    same = dataclasses.replace(data, x_val=data.x_test, y_val=data.y_test)
    result = train(QUICK, dataset=same)
    assert result.val_accuracy_curve == result.accuracy_curve and result.val_accuracy == result.test_accuracy
    shifted = dataclasses.replace(data, x_val=data.x_test, y_val=(data.y_test + 1) % 10)
    other = train(QUICK, dataset=shifted)
    assert other.accuracy_curve == result.accuracy_curve  # the validation split never feeds training
    assert len(other.val_accuracy_curve) == QUICK.epochs and other.val_accuracy < 0.2


@pytest.mark.parametrize("overrides", [
    {}, {"format": "lns(8,gamma=8)", "optimizer": "lns-madam", "master_weights": False},
    {"format": "posit8", "rounding": "stochastic"}])
def test_same_seed_same_numbers_and_another_seed_differs(overrides: dict) -> None:
    config = QUICK.replace(**overrides)
    first, second = train(config), train(config)
    assert first.loss_curve == second.loss_curve and first.test_accuracy == second.test_accuracy
    other = train(config.replace(seed=1))
    assert other.loss_curve != first.loss_curve


def test_a_format_changes_the_run_and_fp32_warmup_over_every_epoch_is_fp32() -> None:
    fp32 = train(QUICK)
    int4 = train(QUICK.replace(format="int4"))
    assert int4.loss_curve != fp32.loss_curve
    warm = train(QUICK.replace(format="int4", warmup_epochs=QUICK.epochs))
    assert warm.loss_curve == fp32.loss_curve


def test_a_loss_that_blows_up_is_a_diverged_result_not_a_crash() -> None:
    result = train(QUICK.replace(format="fp16", lr=100.0, epochs=3))  # the activations overflow fp16
    assert result.diverged
    assert result.epochs_run <= 3 and math.isnan(result.final_loss)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_member_is_finite_when_every_one_of_its_weights_is_and_alone_is_a_group_of_one(bad: float) -> None:
    weights = [torch.zeros(3, 4, 5), torch.zeros(3, 5)]
    weights[1][2, 4] = bad  # member 2's last bias
    assert members_finite(weights, 3) == [True, True, False]
    assert members_finite([w[0] for w in weights]) == [True]
    assert members_finite([w[2] for w in weights]) == [False]


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"model": "foo"}, "unknown model 'foo'"),
    ({"dataset": "digitz"}, "did you mean 'digits'"),
    ({"optimizer": "lion"}, "unknown optimizer 'lion'"),
    ({"format": "posit(8,9)"}, "posit(8,9)"),
    ({"epochs": 0}, "epochs must be >= 1"),
    ({"momentum": -0.5}, "momentum must be >= 0"),
    ({"weights": "posit(8,9)"}, "config weights: invalid format spec 'posit(8,9)'"),
    ({"full_precision_layers": ("frist",)}, "did you mean 'first'"),
    ({"model": "transformer"}, "transformer"),
    ({"dataset": "mnist"}, "mnist"),
])
def test_bad_input_is_one_line_naming_the_problem(overrides: dict, needle: str) -> None:
    with pytest.raises(InputError) as caught:
        train(QUICK.replace(**overrides))
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_cli_json_is_the_api_record() -> None:
    outcome = runner.invoke(app, ["train", "--model", "mlp", "--dataset", "digits", "--format", "lns8",
                                  "--epochs", "2", "--seed", "3", "--json"])
    assert outcome.exit_code == 0, outcome.output
    record = json.loads(outcome.stdout)
    direct = train(QUICK.replace(format="lns8", seed=3))
    assert record["test_accuracy"] == direct.test_accuracy and record["diverged"] is False
    assert record["loss_curve"] == direct.loss_curve
    assert record["config"]["format"] == "lns8"


def test_cli_table_and_bad_input_exit_code() -> None:
    outcome = runner.invoke(app, ["train", "--epochs", "1"])
    assert outcome.exit_code == 0 and "test accuracy" in outcome.stdout
    bad = runner.invoke(app, ["train", "--format", "foo8"])
    assert bad.exit_code == 2
    assert bad.stderr.count("\n") == 1 and "foo8" in bad.stderr


def test_cli_train_has_an_option_for_every_config_field() -> None:
    import dataclasses

    from dse.train import TrainConfig

    help_text = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).stdout
    for field in dataclasses.fields(TrainConfig):
        assert f"--{field.name.replace('_', '-')}" in help_text, field.name


def test_cli_train_passes_optimizer_and_layer_options_through() -> None:
    args = ["train", "--epochs", "1", "--format", "int8", "--full-precision-layers", "first, last",
            "--momentum", "0.5", "--weight-decay", "0.001", "--json"]
    record = json.loads(runner.invoke(app, args).stdout)
    config = record["config"]
    assert config["full_precision_layers"] == ["first", "last"]
    assert config["momentum"] == 0.5 and config["weight_decay"] == 0.001
    direct = train(QUICK.replace(epochs=1, format="int8", full_precision_layers=("first", "last"),
                                 momentum=0.5, weight_decay=0.001))
    assert record["loss_curve"] == direct.loss_curve
    niti = json.loads(runner.invoke(app, ["train", "--epochs", "1", "--format", "int8", "--optimizer", "niti",
                                          "--niti-mu", "3", "--json"]).stdout)
    assert niti["config"]["niti_mu"] == 3
    assert niti["loss_curve"] == train(QUICK.replace(epochs=1, format="int8", optimizer="niti",
                                                     niti_mu=3)).loss_curve
    bad = runner.invoke(app, ["train", "--full-precision-layers", "middle"])
    assert bad.exit_code == 2 and "middle" in bad.stderr and bad.stderr.count("\n") == 1


def test_a_run_uses_its_own_settings_and_gives_the_callers_back() -> None:
    """During a run: its thread count and deterministic cuDNN without autotuning (same seed, same
    result on a GPU too); afterwards the caller's settings, as a library call should leave them."""
    import torch

    cudnn = torch.backends.cudnn
    before = torch.get_num_threads(), cudnn.deterministic, cudnn.benchmark
    seen = []
    try:
        torch.set_num_threads(2)
        cudnn.deterministic, cudnn.benchmark = False, True

        def look(*_: object) -> None:
            seen.append((torch.get_num_threads(), cudnn.deterministic, cudnn.benchmark))

        train(QUICK.replace(epochs=1, threads=1), progress=look)
        assert seen == [(1, True, False)]
        assert (torch.get_num_threads(), cudnn.deterministic, cudnn.benchmark) == (2, False, True)
    finally:
        torch.set_num_threads(before[0])
        cudnn.deterministic, cudnn.benchmark = before[1], before[2]


# --- learning-rate schedules ------------------------------------------------------------------------


def _epoch_lrs(config: TrainConfig) -> list[float]:
    """The optimizer's learning rate in each epoch, as the loop sets it."""
    from dse.data import load_dataset
    from dse.models.proxies import build_model
    from dse.train.loop import prepare

    model = build_model(config.model, load_dataset(config.dataset))
    setup = prepare(model, config, torch.Generator().manual_seed(0))
    rates = []
    for epoch in range(config.epochs):
        setup.on_epoch_start(epoch)
        rates.append(setup.optimizer.param_groups[0]["lr"])
    return rates


def test_lr_schedules_follow_their_formulas() -> None:
    base = TrainConfig(lr=0.1, epochs=8)
    assert _epoch_lrs(base) == [0.1] * 8
    cosine = _epoch_lrs(base.replace(lr_schedule="cosine"))
    assert cosine == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi * e / 8)) for e in range(8)])
    step = _epoch_lrs(base.replace(lr_schedule="step", lr_step_epochs=3, lr_gamma=0.5))
    assert step == pytest.approx([0.1] * 3 + [0.05] * 3 + [0.025] * 2)
    warm = _epoch_lrs(base.replace(lr_schedule="cosine", lr_warmup_epochs=2))
    assert warm[:2] == pytest.approx([0.05, 0.1])
    assert warm[2:] == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi * t / 6)) for t in range(6)])
    madam = _epoch_lrs(TrainConfig(optimizer="lns-madam", epochs=4, lr_schedule="step", lr_step_epochs=2))
    assert madam == pytest.approx([1 / 128, 1 / 128, 1 / 1280, 1 / 1280])  # the default lr is the base


def test_a_schedule_changes_training_and_constant_is_today() -> None:
    constant = train(QUICK.replace(lr=0.1))
    assert train(QUICK.replace(lr=0.1, lr_schedule="constant")).loss_curve == constant.loss_curve
    cosine = train(QUICK.replace(lr=0.1, lr_schedule="cosine"))
    assert cosine.loss_curve[0] == constant.loss_curve[0] and cosine.loss_curve[1] != constant.loss_curve[1]


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"lr_schedule": "linear"}, "unknown lr_schedule 'linear'"),
    ({"lr_gamma": 0.0}, "lr_gamma must be a positive"),
    ({"lr_step_epochs": 0}, "lr_step_epochs must be >= 1"),
    ({"lr_warmup_epochs": -1}, "lr_warmup_epochs must be >= 0"),
    ({"p_scale": 0.0}, "p_scale must be a positive"),
    ({"g_bound": -1.0}, "g_bound must be a positive"),
    ({"format": "int8", "optimizer": "niti", "lr_schedule": "cosine"}, "niti_mu"),
])
def test_schedule_and_madam_fields_reject_bad_values(overrides: dict, needle: str) -> None:
    with pytest.raises(InputError) as caught:
        train(QUICK.replace(**overrides))
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_cli_passes_schedule_madam_and_master_copy_options_through() -> None:
    args = ["train", "--epochs", "2", "--format", "lns(8,gamma=8)", "--optimizer", "lns-madam",
            "--p-scale", "10", "--g-bound", "5", "--lr-schedule", "step", "--lr-step-epochs", "1",
            "--lr-gamma", "0.5", "--lr-warmup-epochs", "1", "--master-weights", "lns(12, gamma=128)",
            "--json"]
    outcome = runner.invoke(app, args)
    assert outcome.exit_code == 0, outcome.output
    record = json.loads(outcome.stdout)
    config = TrainConfig.from_dict(record["config"])
    assert config.master_weights == "lns(12,gamma=128)" and config.p_scale == 10 and config.g_bound == 5
    assert record["loss_curve"] == train(config).loss_curve
    none = json.loads(runner.invoke(app, ["train", "--epochs", "1", "--format", "int8", "--no-master-weights",
                                          "--json"]).stdout)
    assert none["config"]["master_weights"] is False
    lns_madam_bf16 = ["--format", "int8", "--optimizer", "lns-madam", "--master-weights", "bf16"]
    for bad, needle in ((["--p-scale", "0"], "p_scale"), (["--master-weights", "lns(16,gama=2)"], "gama"),
                        (lns_madam_bf16, "bf16")):
        outcome = runner.invoke(app, ["train", "--epochs", "1", *bad])
        assert outcome.exit_code == 2 and needle in outcome.stderr and outcome.stderr.count("\n") == 1


@pytest.mark.parametrize(("field", "value", "message"), [
    ("rounding", "nearst", "unknown rounding"),
    ("update_rounding", "stochastic(99)", "stochastic"),
    ("lr", 1e9, "lr must be at most"),
    ("momentum", 5.0, "momentum must be below 1"),
    ("epochs", 0, "epochs must be >= 1"),
    ("optimizer", "sdg", "did you mean 'sgd'"),
    ("format", "int99", "config format: invalid format spec"),
    ("master_weights", "posit(99,1)", "config master_weights"),
])
def test_a_train_config_checks_each_field_once_where_the_sweep_and_the_cli_read_it(
        field: str, value: object, message: str, tmp_path) -> None:
    """TrainConfig checks every field when it is made (a SettingError naming the field); the sweep file
    places the same check's message at the key's line and `dse train` at its flag, exit 2."""
    from dse.errors import SettingError
    from dse.sweep import parse_config

    with pytest.raises(SettingError, match=message) as caught:
        TrainConfig(**{field: value})
    assert caught.value.setting == field and "\n" not in str(caught.value)
    text = f"task: {{model: mlp, dataset: digits}}\ntrials:\n  - {{{field}: {json.dumps(value)}}}\n"
    with pytest.raises(InputError, match=f"t.yaml:3: trials\\[0\\].{field}: .*") as in_file:
        parse_config(text, "t.yaml")
    assert str(in_file.value).split(f"{field}: ", 1)[1].removeprefix(f"config {field}: ") in \
        str(caught.value)
    flag = "--" + field.replace("_", "-")
    epochs = [] if field == "epochs" else ["--epochs", "1"]  # (a bad value never trains)
    result = CliRunner().invoke(app, ["train", *epochs, flag, str(value), "--quiet"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
