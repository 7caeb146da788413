"""A trial's run energy is the sum over the batches it ran of each one's energy in the formats it ran in
and at its own rows: a warm-up's in fp32, the rest in its own, an epoch's short last batch at its rows;
a diverged run up to its diverging batch, whose forward ran."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from dse.data import load_dataset, with_validation
from dse.report import write_reports
from dse.sweep import parse_config
from dse.sweep.energy import EnergyEstimator
from dse.sweep.executors import InlineExecutor
from dse.sweep.runner import run_sweep
from dse.sweep.store import load_trials, store_path
from dse.train import train
from dse.train.config import TrainConfig, TrainResult
from dse.train.loop import EXAMPLE_SAMPLES

EPOCHS, BATCH, WARMUP = 3, 128, 1
SWEEP = f"""\
name: warm
task: {{model: mlp, dataset: digits, epochs: {EPOCHS}, batch_size: {BATCH}}}
energy: {{node: 7nm, workloads: [proxy, resnet50]}}
trials:
  - {{format: fp32}}
  - {{format: "posit(16,1)"}}
  - {{format: "posit(16,1)", warmup_epochs: {WARMUP}}}
  - {{format: int8, optimizer: niti, niti_mu: 4, warmup_epochs: {WARMUP}}}
executor: {{backend: local, workers: 1}}
"""


def _iterations_per_epoch() -> int:
    """Batches of one epoch of digits at BATCH, counted from the data (not from the code under test)."""
    return math.ceil(len(with_validation(load_dataset("digits")).x_train) / BATCH)


def _batches(weights: str, workload: str) -> tuple[float, float, float]:
    """(full iteration, last short iteration, forward of a full batch) of SWEEP's trial in `weights`,
    from the energy estimate of its configuration (tests/energy prices each against the model)."""
    sweep = parse_config(SWEEP + "output: unused\n", "warm.yaml")
    config = TrainConfig(model="mlp", dataset="digits", epochs=EPOCHS, batch_size=BATCH, format=weights)
    energy = EnergyEstimator(sweep.energy).estimate(config)[workload]
    assert len(with_validation(load_dataset("digits")).x_train) % BATCH  # (a short last batch to price)
    return energy.total_mj, energy.last_iteration_mj, energy.forward_mj


def _epoch_mj(weights: str, workload: str) -> float:
    full, last, _ = _batches(weights, workload)
    return (_iterations_per_epoch() - 1) * full + last


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("warm") / "out"
    run_sweep(parse_config(SWEEP + f"output: {out}\n", "warm.yaml"), executor=InlineExecutor(), reports=False)
    return out


TRIALS = {"fp32": ("fp32", "sgd", 0), "posit": ("posit(16,1)", "sgd", 0),
          "posit warm": ("posit(16,1)", "sgd", WARMUP), "niti warm": ("int8", "niti", WARMUP)}
"""Name -> (weights, optimizer, warmup_epochs) of SWEEP's trials."""


def _row(frame: Any, name: str) -> dict[str, Any]:
    weights, optimizer, warmup = TRIALS[name]
    rows = frame[(frame["weights"] == weights) & (frame["optimizer"] == optimizer)
                 & (frame["warmup_epochs"] == warmup)]
    assert len(rows) == 1, name
    return dict(rows.iloc[0])


@pytest.mark.parametrize("workload", ["proxy", "resnet50"])
def test_a_warmup_trials_run_energy_is_its_fp32_warmup_iterations_plus_its_format_iterations(
        swept: Path, workload: str) -> None:
    """Priced from two other trials' per-iteration figures: the fp32 trial's and the posit trial's."""
    frame = load_trials(swept)
    fp32, posit, warm = (_row(frame, label) for label in ("fp32", "posit", "posit warm"))
    steps = _iterations_per_epoch()
    fp32_mj, posit_mj = float(fp32[f"energy_mj:{workload}"]), float(posit[f"energy_mj:{workload}"])
    assert fp32_mj > posit_mj * 1.2  # (else the test could not tell the two apart)
    assert (fp32_mj, posit_mj) == (_batches("fp32", workload)[0], _batches("posit(16,1)", workload)[0])
    expected = WARMUP * _epoch_mj("fp32", workload) + (EPOCHS - WARMUP) * _epoch_mj("posit(16,1)", workload)
    assert warm[f"run_energy_mj:{workload}"] == pytest.approx(expected, rel=1e-12)
    assert warm[f"run_mean_energy_mj:{workload}"] == pytest.approx(expected / (EPOCHS * steps), rel=1e-12)
    assert warm[f"energy_mj:{workload}"] == pytest.approx(posit_mj, rel=1e-12)  # one steady-state iteration


def test_a_trial_without_warmup_pays_each_epochs_full_batches_and_its_short_last_one(swept: Path) -> None:
    frame = load_trials(swept)
    steps = _iterations_per_epoch()
    for label in ("fp32", "posit"):
        row = _row(frame, label)
        for workload in ("proxy", "resnet50"):
            expected = EPOCHS * _epoch_mj(TRIALS[label][0], workload)
            assert row[f"run_energy_mj:{workload}"] == pytest.approx(expected, rel=1e-12)
            mean = row[f"run_mean_energy_mj:{workload}"]
            assert mean == pytest.approx(expected / (EPOCHS * steps), rel=1e-12)
            assert row[f"run_mean_energy_mj:{workload}"] < row[f"energy_mj:{workload}"]  # the short batch
    niti = _row(frame, "niti warm")  # NITI trains its integer network from the first epoch: no fp32 epoch
    for workload in ("proxy", "resnet50"):
        assert niti[f"run_mean_energy_mj:{workload}"] < niti[f"energy_mj:{workload}"]


def test_the_front_ranks_a_warmup_trial_by_its_run_mean(swept: Path, tmp_path: Path) -> None:
    frame = load_trials(swept)
    write_reports(frame, tmp_path)
    with open(tmp_path / "summary.csv") as handle:
        header = handle.readline()
    assert "run_energy_mj:proxy" in header and "run_mean_energy_mj:resnet50" in header
    assert "Run mean (mJ/iter.)" in (tmp_path / "pareto.tex").read_text()
    assert "Run mean resnet50 (mJ/iter.)" in (tmp_path / "summary.tex").read_text()
    from dse.report import SweepTables

    fronts = SweepTables.of(frame).fronts
    warm = fronts[(fronts["weights"] == "posit(16,1)") & (fronts["warmup_epochs"] == WARMUP)]
    for _, row in warm.iterrows():
        mean = _row(frame, "posit warm")[f"run_mean_energy_mj:{row['workload']}"]
        assert row["energy_mj"] == pytest.approx(mean, rel=1e-12)
        assert row["energy_mj"] > row["iteration_energy_mj"]


def _diverging_factory(after: int):  # type: ignore[no-untyped-def]
    """A model whose loss turns NaN at its `after`-th training forward (a real run's divergence)."""
    def build(sample_shape: tuple[int, ...], classes: int) -> nn.Module:
        class Diverging(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.linear = nn.Linear(int(torch.tensor(sample_shape).prod()), classes)
                self.calls = 0

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out = self.linear(x.flatten(1))
                if self.training and len(x) > EXAMPLE_SAMPLES:  # (not the forward that finds the GEMMs)
                    self.calls += 1
                    if self.calls >= after:
                        out = out * math.nan
                return out
        return Diverging()
    return build


def test_a_diverged_run_records_only_the_iterations_it_trained() -> None:
    steps = _iterations_per_epoch()
    after = steps + 4  # the loss of the fourth batch of the second epoch is NaN
    result = train(TrainConfig(model="mlp", dataset="digits", epochs=EPOCHS, batch_size=BATCH),
                   model=_diverging_factory(after))
    assert result.diverged and result.epoch_iterations == [steps, after - 1 - steps]


def test_a_diverged_trials_run_energy_counts_the_iterations_it_trained_and_its_diverging_forward(
        tmp_path: Path) -> None:
    counts = [_iterations_per_epoch(), 3]

    def diverging(config: TrainConfig) -> TrainResult:
        return TrainResult(test_accuracy=0.1, final_loss=math.nan, diverged=True, epochs_run=2,
                           wall_time_s=0.01, params=10, loss_curve=[1.0, math.nan], epoch_iterations=counts,
                           config=config.to_dict())

    text = SWEEP.replace("  - {format: int8, optimizer: niti", "  # ") + f"output: {tmp_path / 'out'}\n"
    run_sweep(parse_config(text, "warm.yaml"), train_fn=diverging, executor=InlineExecutor(), reports=False)
    frame = load_trials(tmp_path / "out")
    fp32, posit, warm = (_row(frame, label) for label in ("fp32", "posit", "posit warm"))
    for workload in ("proxy", "resnet50"):
        posit_mj, _, posit_forward_mj = _batches("posit(16,1)", workload)
        assert posit[f"run_energy_mj:{workload}"] == pytest.approx(
            _epoch_mj("posit(16,1)", workload) + counts[1] * posit_mj + posit_forward_mj, rel=1e-12)
        assert warm[f"run_energy_mj:{workload}"] == pytest.approx(
            _epoch_mj("fp32", workload) + counts[1] * posit_mj + posit_forward_mj, rel=1e-12)
        assert fp32[f"run_mean_energy_mj:{workload}"] == pytest.approx(
            fp32[f"run_energy_mj:{workload}"] / sum(counts), rel=1e-12)


def _old_store(swept: Path, old: Path) -> None:
    """`swept` copied to `old` as dse wrote it before iterations were counted, warm-ups priced and
    batches priced at their rows."""
    import shutil

    shutil.copytree(swept, old)
    with sqlite3.connect(store_path(old)) as connection:
        connection.execute("ALTER TABLE plan DROP COLUMN warmup_energy_key")
        for column in ("last_iteration_mj", "forward_mj", "last_forward_mj", "epoch_batches"):
            connection.execute(f"ALTER TABLE energy DROP COLUMN {column}")
        for trial_id, result in connection.execute("SELECT trial_id, result FROM trials").fetchall():
            values = json.loads(result)
            values.pop("epoch_iterations")
            connection.execute("UPDATE trials SET result = ? WHERE trial_id = ?",
                               (json.dumps(values), trial_id))
    connection.close()


def test_an_old_store_without_run_columns_loads_reports_and_resumes(swept: Path, tmp_path: Path) -> None:
    """A store from before: no warm-up key in its plan, no epoch_iterations in its results, no batch
    costs in its energy rows. It loads and reports with one iteration's energy and no run figures; a run
    of the sweep recomputes the energy and rewrites the plan, training nothing again: then its trials
    that trained every epoch alike get their run's mean (epochs weigh alike), not its total."""
    old = tmp_path / "old"
    _old_store(swept, old)
    frame = load_trials(old)
    posit, warm = _row(frame, "posit"), _row(frame, "posit warm")
    assert posit["energy_mj:proxy"] == _row(load_trials(swept), "posit")["energy_mj:proxy"]
    assert math.isnan(posit["run_mean_energy_mj:proxy"]) and math.isnan(posit["run_energy_mj:proxy"])
    assert math.isnan(warm["run_mean_energy_mj:proxy"])
    write_reports(frame, tmp_path / "reports")
    assert (tmp_path / "reports" / "pareto.csv").is_file()

    def untrained(config: TrainConfig) -> TrainResult:
        raise AssertionError("a resumed sweep trained a stored trial again")

    run_sweep(parse_config(SWEEP + f"output: {old}\n", "warm.yaml"), train_fn=untrained,
              executor=InlineExecutor(), reports=False)
    column = "run_mean_energy_mj:proxy"
    for label in ("posit", "posit warm"):
        resumed, expected = _row(load_trials(old), label), _row(load_trials(swept), label)
        assert resumed[column] == pytest.approx(expected[column], rel=1e-12)
        assert math.isnan(resumed["run_energy_mj:proxy"])


def test_an_old_stores_fronts_rank_every_configuration_by_one_iteration(swept: Path, tmp_path: Path) -> None:
    """Its warm-up trial has no run mean until a run prices the warm-up: ranked by the run's mean it would
    leave the fronts unseen, so the fronts rank every configuration by one iteration, as they did
    before dse priced runs (the run columns dropped: the fronts of the same results without them)."""
    from dse.report import SweepTables

    old = tmp_path / "old"
    _old_store(swept, old)
    frame = load_trials(old)
    assert math.isnan(_row(frame, "posit warm")["run_mean_energy_mj:proxy"])
    runless = frame.drop(columns=[c for c in frame.columns if str(c).startswith("run_")])
    fronts, expected = SweepTables.of(frame).fronts, SweepTables.of(runless).fronts
    assert "iteration_energy_mj" not in fronts.columns
    assert fronts[["task", "workload", "label", "energy_mj"]].equals(
        expected[["task", "workload", "label", "energy_mj"]])


@pytest.mark.parametrize("surplus", [1, -1])
def test_a_result_whose_epoch_does_not_fit_its_priced_epoch_has_no_run_energy(tmp_path: Path,
                                                                              surplus: int) -> None:
    """Its iterations do not fit the training set its energy was priced on (a user's dataset that changed
    since): more iterations in an epoch than it has batches, or fewer in a run that did not diverge. Its
    run is unknown, not priced as though they fit, and the store still loads."""
    def misfit(config: TrainConfig) -> TrainResult:
        return TrainResult(test_accuracy=0.5, final_loss=1.0, diverged=False, epochs_run=1, wall_time_s=0.01,
                           params=10, loss_curve=[1.0], epoch_iterations=[_iterations_per_epoch() + surplus],
                           config=config.to_dict())

    text = SWEEP.replace("  - {format: int8, optimizer: niti", "  # ") + f"output: {tmp_path / 'out'}\n"
    run_sweep(parse_config(text, "warm.yaml"), train_fn=misfit, executor=InlineExecutor(), reports=False)
    posit = _row(load_trials(tmp_path / "out"), "posit")
    assert math.isnan(posit["run_energy_mj:proxy"]) and math.isnan(posit["run_mean_energy_mj:proxy"])
    assert posit["energy_mj:proxy"] > 0


def test_planning_a_sweep_on_built_in_workloads_loads_each_tasks_dataset_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep counts each task's training samples when it checks its tasks; pricing the batches of an
    epoch on built-in workloads takes that count and loads no dataset again."""
    import dse.data
    from dse.sweep.runner import plan_sweep

    sweep = parse_config(SWEEP.replace("[proxy, resnet50]", "[resnet50]") + "output: x\n", "warm.yaml")
    loads: list[str] = []
    load = dse.data.load_dataset

    def counted(name: str, *args: Any, **kwargs: Any) -> Any:
        loads.append(name)
        return load(name, *args, **kwargs)

    monkeypatch.setattr(dse.data, "load_dataset", counted)
    _, _, rows = plan_sweep(sweep)
    assert loads == ["digits"]
    assert {row["epoch_batches"] for row in rows.values()} == {_iterations_per_epoch()}
