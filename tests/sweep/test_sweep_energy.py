"""A trial is priced as it trained, and energy settings are sweep axes with one column set each."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas
import pytest

from dse.sweep import parse_config
from dse.sweep.energy import EnergyEstimator
from dse.sweep.executors import InlineExecutor
from dse.sweep.runner import plan_sweep, run_sweep
from dse.sweep.store import load_trials
from dse.train.config import TrainConfig

ONE_WORKLOAD = """\
name: priced
task: {model: mlp, dataset: digits}
energy: {node: 7nm, workloads: [resnet18]}
trials:
  - {format: int8}
"""


@pytest.fixture(scope="module")
def estimator() -> EnergyEstimator:
    return EnergyEstimator(parse_config(ONE_WORKLOAD, "s.yaml").energy)


def _total(estimator: EnergyEstimator, **changes: object) -> float:
    config = TrainConfig(model="mlp", dataset="digits", **changes)  # type: ignore[arg-type]
    return estimator.estimate(config)["resnet18"].total_mj


BASE = {"format": "fp8_e4m3", "optimizer": "sgd"}


@pytest.mark.parametrize("change", [
    {"accumulation": "fp16"},                                    # the accumulator's format
    {"accumulation": "fp16", "accumulation_chunk": 64},          # ... and its chunk (K of the unit)
    {"rounding": "stochastic"},                                  # random bits per rounded value
    {"rounding": "toward_zero"},
    {"master_weights": False},                                   # no fp32 master copy
    {"master_weights": "bf16"},                                  # a master copy in another format
    {"full_precision_layers": ("first", "last")},                # layers kept in fp32
    {"weights": "int4", "activations": "fp8_e4m3", "gradients": "fp8_e5m2"},  # int x fp GEMMs
])
def test_each_training_choice_changes_the_energy(estimator: EnergyEstimator,
                                                 change: dict[str, object]) -> None:
    assert _total(estimator, **{**BASE, **change}) != pytest.approx(_total(estimator, **BASE), rel=1e-9)


def test_update_rounding_is_priced_where_the_update_rounds(estimator: EnergyEstimator) -> None:
    """With an fp32 master copy the update never rounds into the weight format, so update_rounding is
    the same hardware; without one it is the rounding of every update."""
    with_master = [_total(estimator, **BASE, update_rounding=mode) for mode in ("nearest", "stochastic")]
    assert with_master[0] == with_master[1]
    without = [_total(estimator, **BASE, master_weights=False, update_rounding=mode)
               for mode in ("nearest", "stochastic")]
    assert without[1] > without[0]


def test_chunk_without_an_accumulation_format_is_the_same_hardware(estimator: EnergyEstimator) -> None:
    """accumulation_chunk only groups products before rounding into `accumulation`; without one,
    torch sums in fp32 and the dot-product unit's K is the energy settings' vector_length."""
    assert _total(estimator, **BASE, accumulation_chunk=64) == _total(estimator, **BASE)


AXES = """\
name: axes
task: {model: mlp, dataset: digits, epochs: 1}
energy: {node: [45nm, 7nm], scope: [pe, system], accumulator: [fp16, fp32], vector_length: [1, 16],
         workloads: [resnet18]}
trials:
  - {format: [fp8_e4m3, bf16]}
"""


def test_energy_axes_give_one_named_column_set_per_point() -> None:
    sweep = parse_config(AXES, "axes.yaml")
    assert len(sweep.energy.points) == 16
    columns = sweep.energy.columns
    assert "resnet18@45nm,pe,acc=fp16,K=1" in columns and "resnet18@7nm,system,acc=fp32,K=16" in columns
    trials, keys, energies = plan_sweep(sweep)
    values = {column: energies[(keys[trials[0].trial_id], column)]["total_mj"] for column in columns}
    assert len(set(values.values())) == 16  # every point prices differently
    assert values["resnet18@7nm,system,acc=fp32,K=16"] < values["resnet18@45nm,system,acc=fp32,K=16"]
    assert values["resnet18@45nm,pe,acc=fp16,K=16"] < values["resnet18@45nm,system,acc=fp16,K=16"]


def test_axis_points_reach_the_reports(fake_train: Callable[..., Any], tmp_path: Path) -> None:
    text = AXES.replace("scope: [pe, system], accumulator: [fp16, fp32], vector_length: [1, 16]", "scope: pe")
    text += f"output: {tmp_path / 'out'}\n"
    run_sweep(parse_config(text, "axes.yaml"), train_fn=fake_train, executor=InlineExecutor(), reports=True)
    frame = load_trials(tmp_path / "out")
    assert frame.attrs["sweep"]["workloads"] == ["resnet18@45nm", "resnet18@7nm"]
    for column in ("energy_mj:resnet18@45nm", "energy_mj:resnet18@7nm", "area_um2:resnet18@7nm"):
        assert frame[column].notna().all() and (frame[column] > 0).all()
    assert (frame["area_um2:resnet18@7nm"] < frame["area_um2:resnet18@45nm"]).all()
    names = {p.name for p in (tmp_path / "out").rglob("*")}
    assert any(name.startswith("pareto_") and "7nm" in name for name in names), names
    assert any(name.startswith("area_") for name in names), names
    assert not math.isnan(frame["area_um2:resnet18@45nm"].iloc[0])


LNS_PERIOD = """\
name: lns
task: {{model: mlp, dataset: digits}}
energy: {{workloads: [resnet18], vector_length: {lengths}, datapath: {{lns_conversion_length: 64}}}}
trials:
  - {{format: lns8}}
"""


def test_lns_conversion_length_is_a_datapath_setting_checked_against_every_k() -> None:
    sweep = parse_config(LNS_PERIOD.format(lengths="[16, 32]"), "lns.yaml")
    assert [point.datapath.lns_conversion_length for point in sweep.energy.points] == [64, 64]
    with pytest.raises(ValueError, match=r"lns.yaml.*lns_conversion_length must be a multiple of"):
        parse_config(LNS_PERIOD.format(lengths="[16, 48]"), "lns.yaml")


# --- energy settings: checked once by the types that own them, placed at their keys --------------

GRID = """\
name: grid
task: {{model: mlp, dataset: digits}}
energy: {energy}
trials:
  - {{format: int8}}
"""


@pytest.mark.parametrize(("energy", "places"), [
    ("{node: [45nm, 3.5nm], scope: [pe, chip]}",
     {"energy.node[1]": "unknown technology node '3.5nm'", "energy.scope[1]": "unknown scope 'chip'"}),
    ("{memory: {sram: tiny}}", {"energy.memory.sram": "unknown sram preset 'tiny'"}),
    ("{datapath: {accumulator: fp77}}", {"energy.datapath.accumulator": "fp77"}),
    ("{vector_length: [16, 0], accumulator: [int32, fp77]}",
     {"energy.vector_length[1]": "vector_length must be", "energy.accumulator[1]": "fp77"}),
    ("{vector_length: 48, datapath: {lns_conversion_length: 64}}",
     {"energy.datapath.lns_conversion_length": "multiple of vector_length (48)"}),
    ("{node: 3nm, node_scaling: calibrated}", {"energy.node": "outside the calibrated range"}),
    ("{node_scaling: linear}", {"energy.node_scaling": "unknown node scaling 'linear'"}),
])
def test_every_bad_energy_setting_is_reported_at_its_key(energy: str, places: dict[str, str]) -> None:
    from dse.errors import InputError, InputErrors

    with pytest.raises(InputError) as raised:
        parse_config(GRID.format(energy=energy), "g.yaml")
    problems = raised.value.problems if isinstance(raised.value, InputErrors) else [str(raised.value)]
    found = {problem.split(": ")[1]: problem for problem in problems}
    assert sorted(found) == sorted(places), problems
    for key, words in places.items():
        assert found[key].startswith(f"g.yaml:3: {key}: ") and words in found[key], found[key]


def test_each_energy_point_builds_its_model_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import dse.energy

    built: list[tuple[str, str]] = []
    real = dse.energy.build_model

    def counting(node: str, *args: object, **kwargs: object) -> object:
        built.append((node, str(kwargs["scope"])))
        return real(node, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(dse.energy, "build_model", counting)
    sweep = parse_config(GRID.format(energy="{node: [45nm, 7nm], scope: [pe, system]}"), "g.yaml")
    assert len(sweep.energy.points) == 4
    assert sorted(built) == sorted({(p.node, p.scope) for p in sweep.energy.points})


@pytest.mark.parametrize("workload", ["proxy", "gpt2-small"])
@pytest.mark.parametrize("rule", [{"full_precision_layers": ("first",)},
                                  {"layers": ({"match": "type:Linear", "weights": "fp8_e4m3"},)}])
def test_a_workload_with_an_embedding_is_priced_under_per_layer_formats(workload: str,
                                                                      rule: dict[str, object]) -> None:
    """Layers a rule gives other formats are priced as a part without the extra parameters; the part
    used to keep the workload's embedding names, which then named no parameter of it, and the sweep
    refused the trial ("'embedding.weight' named as an embedding or frozen but not in extra_params":
    the transformer proxy, gpt2-small, any network with an nn.Embedding, under any `layers` rule or
    full_precision_layers). Found by the grouped-sweep audit (benchmarks/sweep_audit.py)."""
    settings = parse_config(ONE_WORKLOAD.replace("[resnet18]", f"[{workload}]"), "s.yaml").energy
    config = TrainConfig(model="transformer", dataset="sort-easy", format="fp8_e5m2",
                         **rule)  # type: ignore[arg-type]
    plain = TrainConfig(model="transformer", dataset="sort-easy", format="fp8_e5m2")
    priced = EnergyEstimator(settings).estimate(config)[workload].total_mj
    assert math.isfinite(priced) and priced != EnergyEstimator(settings).estimate(plain)[workload].total_mj


@pytest.mark.parametrize("rule", [{"full_precision_layers": ("first",)},
                                  {"layers": ({"match": "type:Linear", "weights": "fp8_e4m3"},)}])
def test_a_rule_reprices_only_the_layers_it_names_and_the_embedding_stays(monkeypatch: pytest.MonkeyPatch,
                                                                         rule: dict[str, object]) -> None:
    """The transformer proxy (an nn.Embedding) under a rule: per layer, the energy rows of every layer
    the rule leaves in the trial's formats and of the embedding table are those of the trial without
    the rule, and the layers it names differ; no row is priced twice (the table is in one part)."""
    import dse.sweep.energy as energy_module

    frames: list[Any] = []
    priced = energy_module.iteration_energy

    def spy(*args: Any) -> Any:
        frames.append(priced(*args))
        return frames[-1]

    monkeypatch.setattr(energy_module, "iteration_energy", spy)
    settings = parse_config(ONE_WORKLOAD.replace("[resnet18]", "[proxy]"), "s.yaml").energy

    def per_layer(**options: Any) -> Any:
        frames.clear()
        config = TrainConfig(model="transformer", dataset="sort-easy", format="fp8_e5m2", **options)
        total = EnergyEstimator(settings).estimate(config)["proxy"].total_mj
        # (the frames of a full batch: an epoch's short last batch is priced too, at its own rows)
        rows = pandas.concat([frame for frame in frames if frame.attrs["batch_size"] == config.batch_size])
        assert math.isclose(rows.energy_pj.sum() / 1e9, total, rel_tol=1e-12)
        return rows.groupby("layer").energy_pj.sum()

    plain, ruled = per_layer(), per_layer(**rule)
    assert list(plain.index) == list(ruled.index)
    changed = {layer for layer in plain.index if plain[layer] != ruled[layer]}
    linears = ("attn.qkv", "attn.out", "ffn_in", "ffn_out")
    named = {"layers.0.attn.qkv"} if "full_precision_layers" in rule else {
        "head", *(f"layers.{i}.{name}" for i in (0, 1) for name in linears)}
    assert changed == named
    assert "embedding.weight" in plain.index
