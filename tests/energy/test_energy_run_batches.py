"""A run is priced batch by batch: an epoch's short last batch at its own rows, a diverging batch's
forward (it ran; its backward and update did not), each epoch in the formats it trained in."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dse.energy import TrainingFormats, iteration_energy
from dse.models.workloads import get_workload
from dse.sweep import parse_config
from dse.sweep.config import EnergyConfig
from dse.sweep.energy import EnergyEstimator
from dse.sweep.run_energy import BatchEnergies, epoch_batches, last_batch_rows, run_energy
from dse.train.config import TrainConfig

FULL = BatchEnergies(iteration_mj=10.0, last_iteration_mj=3.0, forward_mj=4.0, last_forward_mj=1.0,
                     epoch_batches=5)
WARM = BatchEnergies(iteration_mj=100.0, last_iteration_mj=30.0, forward_mj=40.0, last_forward_mj=10.0,
                     epoch_batches=5)


def test_an_epoch_that_trained_every_batch_pays_its_short_last_batch_once() -> None:
    run = run_energy([5, 5], 0, FULL, None, diverged=False)
    assert run.total_mj == 2 * (4 * 10.0 + 3.0)
    assert run.mean_mj == run.total_mj / 10


def test_a_diverged_run_pays_the_forward_of_the_batch_whose_loss_was_not_finite() -> None:
    assert run_energy([5, 2], 0, FULL, None, diverged=True).total_mj == 43.0 + 2 * 10.0 + 4.0
    # the batch that diverged was the epoch's last, short one: its forward at its own rows
    assert run_energy([5, 4], 0, FULL, None, diverged=True).total_mj == 43.0 + 4 * 10.0 + 1.0
    # every batch trained, then the weights were not finite: no forward ran after the last update
    assert run_energy([5, 5], 0, FULL, None, diverged=True).total_mj == 2 * 43.0


def test_a_run_that_diverged_at_its_first_batch_costs_one_forward_and_has_no_mean() -> None:
    run = run_energy([0], 0, FULL, None, diverged=True)
    assert run.total_mj == 4.0 and math.isnan(run.mean_mj)


def test_a_warmup_epoch_is_priced_at_the_warmups_batches_even_where_it_diverged() -> None:
    assert run_energy([5, 5], 1, FULL, WARM, diverged=False).total_mj == (4 * 100.0 + 30.0) + 43.0
    assert run_energy([2], 1, FULL, WARM, diverged=True).total_mj == 2 * 100.0 + 40.0


def test_an_epoch_with_more_iterations_than_batches_is_refused() -> None:
    with pytest.raises(ValueError, match="epoch 0 trained 6 iterations, but an epoch has 5 batches"):
        run_energy([6], 0, FULL, None, diverged=False)


def test_only_a_diverged_runs_last_epoch_may_train_fewer_batches_than_an_epoch_has() -> None:
    """Training stops an epoch early only at a loss that is not finite, and then stops the run: any other
    short epoch ran over another training set than the one priced."""
    with pytest.raises(ValueError, match="epoch 0 trained 4 iterations, but an epoch has 5 batches"):
        run_energy([4], 0, FULL, None, diverged=False)
    with pytest.raises(ValueError, match="epoch 0 trained 3 iterations, but an epoch has 5 batches"):
        run_energy([3, 5], 0, FULL, None, diverged=True)
    assert run_energy([5, 3], 0, FULL, None, diverged=True).total_mj == 43.0 + 3 * 10.0 + 4.0


@given(st.floats(1e-6, 1e4, allow_subnormal=False), st.integers(1, 2_000), st.integers(1, 50),
       st.integers(0, 3))
def test_a_run_whose_every_iteration_costs_one_iterations_energy_has_that_mean_to_the_last_bit(
        iteration_mj: float, batches: int, epochs: int, warmup: int) -> None:
    """Full epochs whose last batch is full (a warm-up's too, where it costs the same): the run's mean is
    one iteration's energy exactly, so fronts ranked by it and by one iteration agree to the last bit, and
    its total is iterations x one iteration."""
    forward_mj = iteration_mj / 3
    energies = BatchEnergies(iteration_mj=iteration_mj, last_iteration_mj=iteration_mj, forward_mj=forward_mj,
                             last_forward_mj=forward_mj, epoch_batches=batches)
    run = run_energy([batches] * epochs, min(warmup, epochs), energies, energies, diverged=False)
    assert run.mean_mj == iteration_mj
    assert run.total_mj == (epochs * batches) * iteration_mj


@given(st.integers(1, 10_000), st.integers(1, 512))
def test_an_epochs_batches_hold_every_row_once(rows: int, batch: int) -> None:
    batches, last = epoch_batches(rows, batch), last_batch_rows(rows, batch)
    assert 1 <= last <= batch and (batches - 1) * batch + last == rows


SETTINGS: EnergyConfig = parse_config(
    "name: batches\ntask: {model: mlp, dataset: digits, epochs: 2, batch_size: 128}\n"
    "energy: {node: 7nm, workloads: [proxy, resnet50]}\ntrials: [{format: fp32}]\n", "batches.yaml").energy
CONFIG = TrainConfig(model="mlp", dataset="digits", epochs=2, batch_size=128, format="posit(16,1)")
"""digits trains on 1293 rows: 10 batches of 128 and one of 13."""


@pytest.fixture(scope="module")
def estimated() -> tuple[EnergyEstimator, dict]:  # type: ignore[type-arg]
    estimator = EnergyEstimator(SETTINGS)
    return estimator, estimator.estimate(CONFIG)


def test_a_short_last_batch_costs_what_an_iteration_of_its_rows_costs(estimated) -> None:  # type: ignore[no-untyped-def]
    estimator, energy = estimated
    assert energy["proxy"].epoch_batches == 11
    # the same trial at a batch of 13: its proxy traced and priced at 13 rows
    alone = estimator.estimate(CONFIG.replace(batch_size=13))["proxy"]
    assert energy["proxy"].last_iteration_mj == pytest.approx(alone.total_mj, rel=1e-12)
    assert energy["proxy"].last_iteration_mj < energy["proxy"].total_mj


def test_a_workload_at_its_own_batch_prices_its_last_batch_at_the_same_share_of_its_rows(  # type: ignore[no-untyped-def]
        estimated) -> None:
    estimator, energy = estimated
    resnet = get_workload("resnet50")
    rows = round(resnet.batch_size * 13 / 128)
    formats = TrainingFormats.of("posit(16,1)", optimizer="sgd", master_weights="fp32")
    model = estimator.models[SETTINGS.points[0].name]
    frame = iteration_energy(resnet, formats, model, rows)
    assert energy["resnet50"].last_iteration_mj == pytest.approx(frame["energy_pj"].sum() / 1e9, rel=1e-9)
    full = iteration_energy(resnet, formats, model)
    assert energy["resnet50"].total_mj == pytest.approx(full["energy_pj"].sum() / 1e9, rel=1e-9)
    forward = full.loc[full["pass"] == "forward", "energy_pj"].sum() / 1e9
    assert energy["resnet50"].forward_mj == pytest.approx(forward, rel=1e-9)
    last_forward = frame.loc[frame["pass"] == "forward", "energy_pj"].sum() / 1e9
    assert energy["resnet50"].last_forward_mj == pytest.approx(last_forward, rel=1e-9)


@pytest.mark.parametrize("fmt", ["fp32", "posit16", "posit(8,1)"])
def test_a_batch_size_that_divides_the_training_set_gives_a_last_batch_equal_to_a_full_one(fmt: str) -> None:
    """Where the last batch is full, it costs what every batch costs, to the last bit: a full epoch's run
    total is then batches x one iteration, on the proxy and on a workload at its own batch."""
    config = TrainConfig(model="mlp", dataset="digits", epochs=2, batch_size=431, format=fmt)  # 3 x 431
    for energy in EnergyEstimator(SETTINGS).estimate(config).values():
        assert energy.epoch_batches == 3
        assert energy.last_iteration_mj == energy.total_mj and energy.last_forward_mj == energy.forward_mj
