"""Lu et al.'s layer-wise scale (`layer_scaling`) is priced where training computes it: on every posit
tensor class quantized without a scale of its own, each time training quantizes a tensor of it."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from dse.energy import TrainingFormats, build_model, iteration_energy
from dse.models.workloads import Workload, linear
from dse.precision import ACTIVATIONS
from dse.sweep import parse_config
from dse.sweep.config import EnergyConfig
from dse.sweep.energy import EnergyEstimator, energy_key
from dse.train.config import TrainConfig

SETTINGS: EnergyConfig = parse_config(
    "name: scaled\ntask: {model: mlp, dataset: mnist1d, epochs: 1, batch_size: 100}\n"
    "energy: {node: 7nm, workloads: [proxy, resnet50]}\ntrials: [{format: fp32}]\n", "scaled.yaml").energy
UNCHANGED = ("multiply_mj", "accumulation_mj", "update_mj", "memory_mj", "memory_mib")


def _config(fmt: str, layer_scaling: bool) -> TrainConfig:
    return TrainConfig(model="mlp", dataset="mnist1d", epochs=1, batch_size=100, format=fmt,
                       layer_scaling=layer_scaling)


@pytest.fixture(scope="module")
def estimator() -> EnergyEstimator:
    return EnergyEstimator(SETTINGS)


@pytest.mark.parametrize("fmt", ["posit(16,1)", "posit(8,1)"])
def test_layer_scaling_adds_the_scales_conversion_energy_to_a_posit_trial(estimator: EnergyEstimator,
                                                                          fmt: str) -> None:
    plain, scaled = _config(fmt, False), _config(fmt, True)
    assert energy_key(plain, SETTINGS) != energy_key(scaled, SETTINGS)
    before, after = estimator.estimate(plain), estimator.estimate(scaled)
    for column in ("proxy", "resnet50"):
        assert after[column].conversion_mj > before[column].conversion_mj
        assert after[column].total_mj - before[column].total_mj == pytest.approx(
            after[column].conversion_mj - before[column].conversion_mj, rel=1e-9)
        assert after[column].forward_mj > before[column].forward_mj  # the activations' scale
        for name in UNCHANGED:
            assert getattr(after[column], name) == getattr(before[column], name), name


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8", "posit16(scale=tensor,pow2=1)"])
def test_layer_scaling_costs_nothing_where_training_scales_no_tensor_by_it(estimator: EnergyEstimator,
                                                                          fmt: str) -> None:
    """Training gives a layer scale only to posit classes without a scale of their own."""
    before, after = estimator.estimate(_config(fmt, False)), estimator.estimate(_config(fmt, True))
    for column in ("proxy", "resnet50"):
        assert after[column].as_row() == before[column].as_row()


def test_the_layer_scale_of_a_tensor_costs_its_ops_per_value_and_one_divide() -> None:
    """One linear layer, only activations scaled: the forward's input (batch x 256 values) pays, per
    value, two 8-bit and two 31-bit comparisons, two 8-bit exponent adds, a 32-entry 9-bit table read
    and a 31-bit add (the log2's correction), an add into a running sum of 31 + ceil(log2 n) bits and a
    count of ceil(log2 n) bits; per tensor a float64 divide."""
    model = build_model("45nm")
    workload = Workload("one-linear", (linear("fc", 256, 64, first=True),), batch_size=8)
    plain = TrainingFormats.of("posit(16,1)", optimizer="sgd")
    scaled = TrainingFormats.of("posit(16,1)", optimizer="sgd", layer_scaled=frozenset({ACTIVATIONS}))
    before, after = iteration_energy(workload, plain, model), iteration_energy(workload, scaled, model)
    c = model.components
    values = 8 * 256
    width = math.ceil(math.log2(values))
    per_value = (2 * c.comparator(8) + 2 * c.comparator(31) + 2 * c.adder(8) + c.lut(32, 9) + c.adder(31)
                 + c.adder(31 + width) + c.incrementer(width))
    expected = values * per_value + c.weights.divide_multiplies * c.fp_mul(11, 52)
    added = after["energy_pj"].sum() - before["energy_pj"].sum()
    assert added == pytest.approx(expected, rel=1e-9)
    forward = after[after["pass"] == "forward"]["energy_pj"].sum() - \
        before[before["pass"] == "forward"]["energy_pj"].sum()
    assert forward == pytest.approx(expected, rel=1e-9)


def _scaled_in_one_training_step(config: TrainConfig) -> list[int]:
    """The values of each tensor one training step (forward, backward, update) of `config` quantizes with
    Lu et al.'s layer scale, recorded from training itself (`lu_layer_scale`'s calls)."""
    import dse.train.policy as policy_module
    from dse.data import load_dataset
    from dse.models.proxies import build_model
    from dse.train.loop import prepare

    data = load_dataset(config.dataset)
    x, y = data.x_train[:config.batch_size], data.y_train[:config.batch_size]
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    setup = prepare(build_model(config.model, data), config, generator, x[:8])
    scaled: list[int] = []
    original = policy_module.lu_layer_scale

    def recording(tensor: torch.Tensor, fmt: Any) -> float:
        scaled.append(tensor.numel())
        return original(tensor, fmt)

    policy_module.lu_layer_scale = recording  # type: ignore[assignment]
    try:
        setup.loss_fn(setup.model(x), y).backward()
        setup.optimizer.step()
    finally:
        policy_module.lu_layer_scale = original
    return scaled


@pytest.mark.parametrize(("master", "last_fp32"), [(True, False), (False, False), ("posit(16,2)", False),
                                                   (True, True)])
def test_the_model_prices_a_layer_scale_for_exactly_the_tensors_training_scales(
        estimator: EnergyEstimator, master: bool | str, last_fp32: bool) -> None:
    """One training step of the proxy MLP (posit(8,1), layer_scaling) scales the forward's operands (the
    network's input among them, not the logits), each backward's incoming error once, the weight
    gradients, and the stored weights where a step rounds them into a posit (no fp32 master copy, or a
    posit one); the model's added conversion energy is the scale's cost over exactly those tensors."""
    from dse.energy.iteration import layer_scale_pj

    config = TrainConfig(model="mlp", dataset="mnist1d", epochs=1, batch_size=100, format="posit(8,1)",
                         optimizer="sgd", master_weights=master, layer_scaling=True,
                         full_precision_layers=["last"] if last_fp32 else [])
    scaled = _scaled_in_one_training_step(config)
    expected_pj = float(layer_scale_pj(build_model(SETTINGS.node).components, np.array(scaled, float)).sum())
    plain = estimator.estimate(config.replace(layer_scaling=False))["proxy"]
    priced = estimator.estimate(config)["proxy"]
    assert priced.conversion_mj - plain.conversion_mj == pytest.approx(expected_pj / 1e9, rel=1e-9)


@pytest.mark.parametrize(("model", "dataset", "master"), [("cnn", "mnist1d", False),
                                                          ("resnet", "mnist1d", True),
                                                          ("transformer", "sort", False)])
def test_the_layer_scales_priced_are_those_training_computes_in_convolutions_and_attention(
        estimator: EnergyEstimator, model: str, dataset: str, master: bool) -> None:
    """As for the MLP, in the other built-in networks: a convolution scales its input as given, not
    unfolded; attention's products of two activations quantize both operands and the incoming error
    once for their two backward GEMMs."""
    from dse.energy.iteration import layer_scale_pj

    config = TrainConfig(model=model, dataset=dataset, epochs=1, batch_size=100, format="posit(8,1)",
                         optimizer="sgd", master_weights=master, layer_scaling=True)
    scaled = _scaled_in_one_training_step(config)
    expected_pj = float(layer_scale_pj(build_model(SETTINGS.node).components, np.array(scaled, float)).sum())
    plain = estimator.estimate(config.replace(layer_scaling=False))["proxy"]
    priced = estimator.estimate(config)["proxy"]
    assert priced.conversion_mj - plain.conversion_mj == pytest.approx(expected_pj / 1e9, rel=1e-9)


@pytest.mark.parametrize("master", [True, False, "posit(16,2)"])
def test_the_layer_scales_of_a_fine_tuned_network_are_those_training_computes(
        estimator: EnergyEstimator, master: bool | str) -> None:
    """A first layer whose weight is frozen and whose bias trains runs its backward for the bias: it
    scales the incoming error there (before: not priced, as no backward GEMM runs); and a frozen weight
    is rounded into a posit after every step like any stored weight, where there is no fp32 copy (before:
    not priced)."""
    from dse.energy.iteration import layer_scale_pj

    config = TrainConfig(model="support.fine_tuned:frozen_first", dataset="digits", epochs=1, batch_size=100,
                         format="posit(8,1)", optimizer="sgd", master_weights=master, layer_scaling=True)
    scaled = _scaled_in_one_training_step(config)
    expected_pj = float(layer_scale_pj(build_model(SETTINGS.node).components, np.array(scaled, float)).sum())
    plain = estimator.estimate(config.replace(layer_scaling=False))["proxy"]
    priced = estimator.estimate(config)["proxy"]
    assert priced.conversion_mj - plain.conversion_mj == pytest.approx(expected_pj / 1e9, rel=1e-9)
