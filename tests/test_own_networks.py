"""Networks a researcher brings as their own (tests/support/own_networks.py): what training and
pricing say about the GEMMs they leave fp32, and the weights a traced network stores and updates."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from support import own_networks
from support.group_runs import (
    assert_group_trains_as_alone,
    assert_grouped_as_alone,
    assert_results_as_alone,
    short_digits,
    train_group_saying,
)
from torch import nn

from dse.models.onnx_workload import load_onnx
from dse.models.trace import trace_model
from dse.models.workloads import Workload
from dse.sweep import parse_config
from dse.sweep.energy import EnergyEstimator
from dse.sweep.executors import InlineExecutor
from dse.sweep.runner import run_sweep
from dse.train import TrainConfig, train
from dse.train.grouped import GroupSplitWarning, group_reason, train_group
from dse.train.layers import UnconvertedGemmWarning, quantize_model
from dse.train.policy import QuantPolicy


def _unconverted(caught: list[warnings.WarningMessage]) -> set[str]:
    return {str(w.message) for w in caught if issubclass(w.category, UnconvertedGemmWarning)}


@pytest.mark.parametrize("factory", ["last_step_gru", "token_distances"])
def test_a_group_names_each_gemm_it_leaves_fp32_as_a_trial_alone_does(factory: str) -> None:
    configs = [TrainConfig(model=f"support.own_networks:{factory}", dataset="digits", format="int8", epochs=1,
                           batch_size=50, seed=seed) for seed in (0, 1)]
    data = short_digits()
    assert group_reason(configs[0], data=data) is None  # (train_group trains a refused group one by one)
    with warnings.catch_warnings(record=True) as together:
        warnings.simplefilter("always")
        train_group(configs, data)
    with warnings.catch_warnings(record=True) as alone:
        warnings.simplefilter("always")
        train(configs[0], data)
    assert not [w for w in together if issubclass(w.category, GroupSplitWarning)]  # it trained as a group
    assert _unconverted(alone)
    assert _unconverted(together) == _unconverted(alone)


@pytest.mark.filterwarnings("ignore::dse.train.layers.UnconvertedGemmWarning")
@pytest.mark.parametrize("factory", ["last_step_gru", "token_distances"])
def test_a_network_with_gemms_left_fp32_trains_in_a_group_as_alone(factory: str) -> None:
    configs = [TrainConfig(model=f"support.own_networks:{factory}", dataset="digits", format="int8", epochs=1,
                           batch_size=50, seed=seed) for seed in (0, 1)]
    assert group_reason(configs[0], data=short_digits()) is None
    assert_group_trains_as_alone(configs, short_digits())


@pytest.mark.parametrize("group_size", [1, 2])
def test_a_sweep_names_each_gemm_left_fp32_once_per_configuration(group_size: int, tmp_path: Path) -> None:
    """`dse sweep` prints what `dse train` warns of a trial's GEMMs left fp32 as one line per
    configuration, its trials grouped or not (before: six raw warnings alone, none grouped)."""
    text = (f"name: gru\nseeds: [0, 1]\ntask: {{model: support.own_networks:last_step_gru, dataset: digits, "
            f"epochs: 1, batch_size: 50}}\ntrials:\n  - {{format: [fp32, int8]}}\n"
            f"executor: {{group_size: {group_size}}}\noutput: {tmp_path}\n")
    expected = []
    for format in ("fp32", "int8"):  # as `dse train` warns each (fp32 too: nn.GRU is never converted)
        with warnings.catch_warnings(record=True) as alone:
            warnings.simplefilter("always")
            train(TrainConfig(model="support.own_networks:last_step_gru", dataset="digits", format=format,
                              epochs=1, batch_size=50), short_digits())
        expected += [[f"{format} sgd", message] for message in sorted(_unconverted(alone))]
    with warnings.catch_warnings(record=True) as swept:
        warnings.simplefilter("always")
        summary = run_sweep(parse_config(text, "s.yaml"), executor=InlineExecutor(), reports=False)
    assert summary.ok == 4 and expected
    assert sorted(note.split(": ", 2)[1:] for note in summary.notes) == expected
    assert not _unconverted(swept)


def test_torch_cdist_is_named_as_left_fp32_by_training_and_as_unpriced_by_tracing() -> None:
    """torch.cdist runs a GEMM inside one kernel (past 25 rows): training cannot quantize it and the
    tracer cannot price it; each says so rather than leave it out silently."""
    model = own_networks.prototypes((64,), 10)
    with pytest.warns(UserWarning, match=r"not priced .*cdist"):
        trace_model(model, torch.randn(2, 64), "prototypes", batch_size=50)
    with pytest.warns(UnconvertedGemmWarning, match=r"torch\.cdist stays fp32"):
        quantize_model(model, QuantPolicy.from_config(TrainConfig(format="int8")),
                       example_input=torch.randn(2, 64))


def _exported(model: nn.Module, samples: torch.Tensor, path: Path) -> Workload:
    pytest.importorskip("onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation notes
        torch.onnx.export(model.eval(), (samples,), str(path), dynamo=False)
    model.train()
    return load_onnx(path, batch_size=8)


@pytest.mark.parametrize("source", ["traced", "onnx"])
@pytest.mark.parametrize("factory", ["tied_decoder", "repeated_layer"])
def test_a_weight_used_by_several_gemms_is_stored_and_updated_once(factory: str, source: str,
                                                                  tmp_path: Path) -> None:
    """The parameters a traced (or exported) workload stores are the model's, and its update rows touch
    as many weights as torch's SGD keeps momentum for after a step (each parameter once, however often
    used)."""
    model: nn.Module = getattr(own_networks, factory)((64,), 10)
    samples = torch.randn(8, 64)
    workload = (trace_model(model, samples[:2], factory, batch_size=8) if source == "traced"
                else _exported(model, samples[:2], tmp_path / f"{factory}.onnx"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(samples).sum().backward()
    optimizer.step()
    momentum = sum(state["momentum_buffer"].numel() for state in optimizer.state.values())
    updated = sum(row["params"] for row in workload.training_gemms() if row["pass"] == "update")
    assert workload.params == sum(p.numel() for p in model.parameters())
    assert updated == momentum
    assert sorted(layer.macs_per_sample for layer in workload.layers if layer.params == 0) == (
        [32 * 64] if factory == "tied_decoder" else [64 * 64] * 2)  # each later use still multiplies


def test_an_exported_recurrent_layer_is_named_as_unpriced(tmp_path: Path) -> None:
    """ONNX holds nn.GRU as one GRU node, which the reader does not take apart: it says so."""
    with pytest.warns(UserWarning, match="GRU nodes are not priced"):
        _exported(own_networks.last_step_gru((64,), 10), torch.randn(2, 64), tmp_path / "gru.onnx")


GRU_PRICED = """\
name: priced
task: {model: support.own_networks:last_step_gru, dataset: digits}
energy: {node: 7nm, workloads: [proxy]}
trials:
  - {format: int8}
"""


@pytest.mark.parametrize("trial, as_trained", [
    ({}, {"layers": ({"match": "rnn.*", "format": "fp32"},)}),
    ({"full_precision_layers": ("first",)}, {"layers": ({"match": "rnn.*", "format": "fp32"},
                                                        {"match": "head", "format": "fp32"})}),
])
def test_a_layer_training_leaves_fp32_is_priced_in_fp32(trial: dict[str, object],
                                                       as_trained: dict[str, object]) -> None:
    """An int8 trial of a GRU network trains the GRU's GEMMs in fp32 (quantize_model cannot convert
    them, and its first and last weight layer is the head): its price is that of the same network with those
    layers ruled fp32, not of an int8 GRU."""
    estimator = EnergyEstimator(parse_config(GRU_PRICED, "s.yaml").energy)

    def total(**changes: object) -> float:
        config = TrainConfig(model="support.own_networks:last_step_gru", dataset="digits", format="int8",
                             **changes)  # type: ignore[arg-type]
        return estimator.estimate(config)["proxy"].total_mj

    assert total(**trial) == total(**as_trained)


@pytest.mark.parametrize("factory", ["head_first", "last_step_gru"])
@pytest.mark.parametrize("which", ["first", "last"])
def test_full_precision_layers_are_priced_on_the_layer_training_keeps_fp32(factory: str, which: str) -> None:
    """first/last is the first/last weight layer in registration order, as training picks it (a head
    registered before the body it follows is `first`), not in the order the traced forward runs them:
    the price is that of the layer quantize_model left a plain nn.Linear ruled fp32 (before: the body's
    and the head's swapped for head_first)."""
    model = f"support.own_networks:{factory}"
    network = getattr(own_networks, factory)((64,), 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnconvertedGemmWarning)
        policy = QuantPolicy.from_config(TrainConfig(format="int8", full_precision_layers=(which,)))
        quantize_model(network, policy, example_input=torch.randn(2, 64))
    (kept,) = [name for name, module in network.named_modules() if type(module) is nn.Linear]
    estimator = EnergyEstimator(parse_config(GRU_PRICED.replace("last_step_gru", factory), "s.yaml").energy)

    def total(**changes: object) -> float:
        config = TrainConfig(model=model, dataset="digits", format="int8", **changes)  # type: ignore[arg-type]
        return estimator.estimate(config)["proxy"].total_mj

    assert total(full_precision_layers=(which,)) == total(layers=({"match": kept, "format": "fp32"},))
    assert total(full_precision_layers=(which,)) != total()


@pytest.mark.filterwarnings("ignore::dse.train.layers.UnconvertedGemmWarning")
@pytest.mark.parametrize("factory", ["lstm_state_1", "lstm_state_2", "lstm_state_3"])
def test_an_lstm_classified_from_its_final_hidden_state_trains_as_a_group(factory: str) -> None:
    """h_n[-1], the common way to read an LSTM, has its batch on the second axis whatever the layer
    count: a group joins it there (the check forwards on 2 and 3 samples make h_n (2, 2, 16) and
    (3, 3, 16), whose batch axis no size tells), and trains each member as alone."""
    configs = [TrainConfig(model=f"support.own_networks:{factory}", dataset="digits", format="int8", epochs=1,
                           batch_size=50, seed=seed) for seed in (0, 1)]
    assert group_reason(configs[0], data=short_digits()) is None  # (train_group trains a refused group
    assert_group_trains_as_alone(configs, short_digits())  # one by one)


@pytest.mark.filterwarnings("ignore::dse.train.layers.UnconvertedGemmWarning")
@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_a_gru_given_a_learned_initial_state_trains_as_a_group(fmt: str) -> None:
    """h0 from a layer of its own (LearnedStart, (1, B, 16) per member) reaches each member's GRU as
    its own state: the group joins and splits it on the same axis."""
    configs = [TrainConfig(model="support.own_networks:gru_learned_state", dataset="digits", format=fmt,
                           epochs=1, batch_size=50, seed=seed) for seed in (0, 1)]
    assert group_reason(configs[0], data=short_digits()) is None
    assert_group_trains_as_alone(configs, short_digits())


@pytest.mark.filterwarnings("ignore::dse.train.layers.UnconvertedGemmWarning")
@pytest.mark.parametrize("fmt", ["fp32", "int8"])
@pytest.mark.parametrize("factory", ["sequence_first_lstm", "gru_zero_state", "lstm_zero_states",
                                     "projected_sequence_first_gru", "gru_encoded_state"])
def test_a_recurrent_layer_with_its_batch_on_the_second_axis_trains_in_a_group_as_alone(
        factory: str, fmt: str) -> None:
    """A member's rows of a batch_first=False input (L, G x B, E), and of an initial state made for the
    folded batch (h0, an LSTM's (h0, c0): (layers, G x B, hidden)), lie on the second axis: the group
    hands each member's layer its own block of that axis, in the strides it has alone, and joins the
    outputs there (before, the check forward refused both: "a member's output is not its own", "its
    forward fails on a folded batch")."""
    configs = [TrainConfig(model=f"support.own_networks:{factory}", dataset="digits", format=fmt, epochs=1,
                           batch_size=50, seed=seed) for seed in (0, 1)]
    assert_grouped_as_alone(configs, short_digits())


@pytest.mark.filterwarnings("ignore::dse.train.layers.UnconvertedGemmWarning")
def test_an_lstm_run_along_its_batch_trains_one_by_one_as_alone() -> None:
    """batch_first=False given a batch-first input runs the LSTM along the batch (each sample's state
    passes to the next): a member's outputs depend on the group's other samples, so the check forward
    refuses the group with its reason, and each trial trains as alone."""
    configs = [TrainConfig(model="support.own_networks:lstm_along_batch", dataset="digits", format="fp32",
                           epochs=1, batch_size=50, seed=seed) for seed in (0, 1)]
    refused = group_reason(configs[0], data=short_digits())
    assert refused is not None and "a member's output is not its own" in refused
    assert_group_trains_as_alone(configs, short_digits())


@pytest.mark.parametrize(("fmt", "optimizer"), [("fp32", "sgd"), ("int8", "sgd"), ("fp8_e4m3", "adam")])
@pytest.mark.parametrize("factory", ["max_norm_linear", "data_max_norm_linear"])
def test_a_layer_that_renorms_the_weight_it_passes_to_f_linear_trains_in_a_group_as_alone(
        factory: str, fmt: str, optimizer: str) -> None:
    """A max-norm constraint written in place (`self.weight.renorm_(2, 0, 1.0)` under no_grad, or
    through `.data`, then `F.linear(x, self.weight)`) runs member by member on each member's own
    weight, laid out as alone (before: refused, "weight is a GEMM's operand and also taken by
    torch.Tensor.renorm_" / "torch.Tensor.data.__get__"; on the stacked weight renorm_ would norm
    each member's whole weight, not its rows)."""
    configs = [TrainConfig(model=f"support.own_networks:{factory}", dataset="digits", format=fmt,
                           optimizer=optimizer, epochs=1, batch_size=50, seed=seed) for seed in (0, 1)]
    assert_grouped_as_alone(configs, short_digits())


@pytest.mark.parametrize(("factory", "use"), [("batch_shrunk_linear", "torch.Tensor.mul_"),
                                            ("data_norm_capped_linear", "torch.Tensor.data.__get__")])
def test_a_layer_that_writes_its_gemm_weight_from_another_tensor_trains_one_by_one_as_alone(
        factory: str, use: str) -> None:
    """A write in place that takes another tensor (a statistic of the batch, which in a group is every
    member's; the weight's own row norms, which on the stacked weight run along other axes) is no
    member's own write: refused with its reason, each trial as alone."""
    configs = [TrainConfig(model=f"support.own_networks:{factory}", dataset="digits", format="fp32",
                           epochs=1, batch_size=50, seed=seed) for seed in (0, 1)]
    refused = group_reason(configs[0], data=short_digits())
    assert refused is not None and f"taken by {use}" in refused
    assert_group_trains_as_alone(configs, short_digits())


@pytest.mark.parametrize(("fmt", "optimizer"), [("fp32", "sgd"), ("int8", "sgd"), ("mxfp4", "adam")])
@pytest.mark.parametrize("factory", ["viewed_weights", "tied_decoder"])
def test_gemms_on_views_of_parameters_train_in_a_group_as_alone(factory: str, fmt: str, optimizer: str
                                                                ) -> None:
    """`x @ self.w.t()`, `F.linear(h, self.v[:16])` and `self.u.chunk(2)`'s halves, and a Linear's weight
    transposed to decode (`F.linear(code, self.enc.weight.t())`): a view of a member tensor is each
    member's view of its own block (before: refused, "w is a GEMM's operand and also taken by
    torch.Tensor.t")."""
    configs = [TrainConfig(model=f"support.own_networks:{factory}", dataset="digits", format=fmt,
                           optimizer=optimizer, epochs=1, batch_size=50, seed=seed) for seed in (0, 1)]
    assert_grouped_as_alone(configs, short_digits())


@pytest.mark.parametrize("fmt", ["fp32", "int8"])
@pytest.mark.parametrize("factory", ["more_viewed_weights", "written_views_linear"])
def test_gemms_on_and_writes_through_other_views_of_parameters_train_in_a_group_as_alone(factory: str,
                                                                                      fmt: str) -> None:
    """The other views a GEMM takes (transpose, permute, .mT, swapaxes, a view of a view, narrow and
    split along the input axis, view, unsqueeze/squeeze, a step slice), and max-norm writes through
    views (`w.t().renorm_(2, 1, 1.0)`, `w[:8].clamp_`): each member's view of its own block."""
    configs = [TrainConfig(model=f"support.own_networks:{factory}", dataset="digits", format=fmt,
                           epochs=1, batch_size=50, seed=seed) for seed in (0, 1)]
    assert_grouped_as_alone(configs, short_digits())


def test_a_matmul_on_a_row_of_a_parameter_trains_one_by_one_as_alone() -> None:
    """`x @ row` for the rows of `w.unbind(0)`: a 1-d operand per member, refused as such."""
    configs = [TrainConfig(model="support.own_networks:unbound_rows", dataset="digits", format="fp32",
                           epochs=1, batch_size=50, seed=seed) for seed in (0, 1)]
    refused = group_reason(configs[0], data=short_digits())
    assert refused is not None and "a matmul with a 1-d operand" in refused
    assert_group_trains_as_alone(configs, short_digits())


def test_a_gemm_on_a_weight_computed_from_its_parameter_trains_one_by_one_as_alone() -> None:
    """`F.linear(x, self.w / self.w.norm())` beside `F.linear(x, self.w)`: the norm is no view; refused
    with its reason, each trial as alone."""
    configs = [TrainConfig(model="support.own_networks:normalized_weight", dataset="digits", format="fp32",
                           epochs=1, batch_size=50, seed=seed) for seed in (0, 1)]
    refused = group_reason(configs[0], data=short_digits())
    assert refused is not None and "w is a GEMM's operand and also taken by torch.Tensor.norm" in refused
    assert_group_trains_as_alone(configs, short_digits())





@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_a_transformer_encoder_given_a_mask_without_is_causal_trains_in_a_group_as_alone(fmt: str) -> None:
    """nn.TransformerEncoder checks a mask given without `is_causal` against a causal one and reads the
    comparison's bool in every forward; a mask the forward makes from no tensor of the group's holds
    the same values in a group as alone, so reading it is no member's value (before: the group was
    dropped at its second forward, "reads a value of the group's tensors into Python")."""
    configs = [TrainConfig(model="support.own_networks:masked_encoder", dataset="digits", format=fmt,
                           epochs=1, batch_size=50, seed=seed) for seed in (0, 1)]
    assert_grouped_as_alone(configs, short_digits())


def test_a_transformer_encoder_given_a_mask_made_from_its_batch_trains_one_by_one_as_alone() -> None:
    """The same mask scaled by a statistic of the batch is the group's batch's: torch's read of it in a
    later forward drops the group (its line says so), and each trial trains as alone."""
    configs = [TrainConfig(model="support.own_networks:batch_masked_encoder", dataset="digits",
                           format="fp32", epochs=1, batch_size=50, seed=seed) for seed in (0, 1)]
    results, said = train_group_saying(configs, short_digits())
    assert len(said) == 1 and "reads a value of the group's tensors into Python" in said[0]
    assert_results_as_alone(configs, results, short_digits())
