"""Per-layer formats in sweeps: validation at the rule's line, trial identity, energy priced per layer."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from dse.cli import app
from dse.sweep import parse_config
from dse.sweep.energy import EnergyEstimator
from dse.sweep.trials import expand
from dse.train.config import TrainConfig

SWEEP = """\
name: per-layer
task: {{model: mlp, dataset: digits, epochs: 1}}
trials:
  - format: int8
    layers: {layers}
energy: {{workloads: [proxy, resnet18]}}
output: {output}
"""


def _estimator() -> EnergyEstimator:
    return EnergyEstimator(parse_config(SWEEP.format(layers="[]", output="x"), "s.yaml").energy)


def test_a_rule_that_matches_no_layer_stops_the_sweep_at_its_line(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(SWEEP.format(layers="[{match: head, format: fp32}]", output=tmp_path / "out"))
    result = CliRunner().invoke(app, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 2
    assert f"{path}:5: layer rule {{match: 'head'}} matches no GEMM layer (layers: 1, 3)" in result.output
    assert not (tmp_path / "out").exists()


def test_rules_are_part_of_the_trial_identity_and_label() -> None:
    text = SWEEP.format(layers="[[], [{match: '3', format: fp32}], [{match: '3', format: 'lns(8,gamma=8)'}]]",
                        output="x")
    trials = expand(parse_config(text, "s.yaml"))
    assert len({t.trial_id for t in trials}) == 3
    assert trials[1].label == "int8 sgd layers=3:format=fp32"
    assert trials[2].label == "int8 sgd layers=3:format=lns8"  # specs in canonical spelling


def test_energy_prices_each_layer_in_its_own_formats() -> None:
    estimator = _estimator()
    trial = TrainConfig(format="int8")
    by_rule = estimator.estimate(trial.replace(layers=[{"match": "3", "format": "fp32"}]))
    by_shorthand = estimator.estimate(trial.replace(full_precision_layers=("last",)))
    assert by_rule["proxy"] == by_shorthand["proxy"]  # one resolution for both spellings
    assert by_rule["resnet18"] == estimator.estimate(trial)["resnet18"]  # no layer '3' in ResNet-18
    # a rule over every layer is the same as the trial having those formats
    everything = estimator.estimate(trial.replace(layers=[{"match": "type:Linear", "format": "lns8"}]))
    assert everything["proxy"] == estimator.estimate(TrainConfig(format="lns8"))["proxy"]


def test_narrower_weights_in_some_layers_cost_less_and_only_there() -> None:
    estimator = _estimator()
    trial = TrainConfig(format="int8")
    base = estimator.estimate(trial)["resnet18"]
    convs = [{"match": "type:Conv2d", "weights": "int4"}]
    narrow = estimator.estimate(trial.replace(layers=convs))["resnet18"]
    head_only = estimator.estimate(trial.replace(layers=[{"match": "fc", "weights": "int4"}]))["resnet18"]
    assert narrow.total_mj < head_only.total_mj < base.total_mj
    assert narrow.memory_mib < base.memory_mib


@pytest.mark.parametrize(("weights", "activations", "priced"), [("int4", "fp8_e4m3", True),
                                                                 ("lns8", "fp8_e4m3", False)])
def test_mixed_family_gemms_are_priced_or_refused_with_the_reason(weights: str, activations: str,
                                                                  priced: bool) -> None:
    estimator = _estimator()
    config = TrainConfig(weights=weights, activations=activations, gradients=activations)
    if priced:
        assert estimator.estimate(config)["resnet18"].total_mj > 0
    else:
        with pytest.raises(ValueError, match="no datapath for fp x lns operands"):
            estimator.estimate(config)
