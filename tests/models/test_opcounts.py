"""The operation counts dse prices, checked against torch's own FLOP counter (torch.utils.flop_counter)
over whole training steps (forward and backward), pass by pass, at several batch sizes: every proxy
model, every full-size built-in workload (written as plain torch modules in tests/support, built on the
meta device), users' networks (a model function and its ONNX export) and a trial's model as training
runs it (quantized layers, accumulation emulation, NITI, LNS-Madam). Memory traffic, which no counter
sees, is checked against the sizes of the tensors a traced forward really makes."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from support.reference_networks import REFERENCES
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from dse.data import Dataset, load_dataset
from dse.energy import build_model as build_energy_model
from dse.energy import datapath_for, iteration_energy
from dse.formats import get
from dse.models.proxies import build_model, trace_workload
from dse.models.workloads import Workload, get_workload
from dse.train.config import TrainConfig

torch.set_num_threads(1)
aten = torch.ops.aten
ENERGY = build_energy_model("45nm")
BACKWARD = ("recompute", "backward_data", "backward_weight")
"""The passes that run in the backward: a checkpointed layer's forward runs there again."""


def _conv_backward_flops(grad_out_shape: list[int], x_shape: list[int], w_shape: list[int], _bias: Any,
                         _stride: Any, _padding: Any, _dilation: Any, transposed: bool, _output_padding: Any,
                         _groups: int, output_mask: list[bool], out_shape: Any = None, **kwargs: Any) -> int:
    """Each gradient a convolution's backward computes (input, weight) takes as many multiply-adds as
    its forward: one per (output position, weight element, sample) pair. torch's own formula
    (torch/utils/flop_counter.py, conv_backward_flop, torch 2.13) drops the groups from the weight
    gradient's term, which overcounts a depthwise convolution's by its channel count (pytorch/pytorch
    PR 183405 proposes the same division); the forward formula counts groups through the weight's shape."""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def _counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping={aten.convolution_backward: _conv_backward_flops})


def _loss(out: Tensor, y: Tensor | None) -> Tensor:
    if y is None:
        return out.float().sum()
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def torch_training_macs(run: Callable[[], Tensor], y: Tensor | None = None) -> dict[str, int]:
    """torch's count of one training step: multiply-adds of the forward and of the backward (FLOPs / 2)."""
    counts = {}
    with sdpa_kernel(SDPBackend.MATH):  # torch's counter skips the fused CPU attention kernel
        forward = _counter()
        with forward:
            loss = _loss(run(), y)
        backward = _counter()
        with backward:
            loss.backward()
    for name, counter in (("forward", forward), ("backward", backward)):
        flops = counter.get_total_flops()
        assert flops % 2 == 0
        counts[name] = flops // 2
    return counts


def priced_macs(workload: Workload, batch: int) -> dict[str, int]:
    """The multiply-adds dse prices per pass, read from the energy frame itself: with INT8 operands every
    MAC pays the multiplier once (and nothing else pays it), so multiply energy / its energy is the
    count. Checked against the workload's own list of training GEMMs."""
    int8 = get("int8")
    datapath = datapath_for(int8, int8, ENERGY.components, ENERGY.datapath)
    assert datapath.per_group.multiply_pj == datapath.per_output.multiply_pj == 0
    frame = iteration_energy(workload, int8, ENERGY, batch)
    multiply = frame[frame["unit"] == "multiply"].groupby("pass")["energy_pj"].sum()
    per_mac = datapath.per_product.multiply_pj
    counts = {"forward": round(multiply.get("forward", 0.0) / per_mac),
              "backward": round(sum(multiply.get(p, 0.0) for p in BACKWARD) / per_mac)}
    rows = workload.training_gemms(batch)
    assert counts == {"forward": sum(r["macs"] for r in rows if r["pass"] == "forward"),
                      "backward": sum(r["macs"] for r in rows if r["pass"] in BACKWARD)}
    return counts


# --- the counter itself ------------------------------------------------------------------------------

@pytest.mark.parametrize("groups, stride, transposed", [(1, 1, False), (4, 2, False), (16, 1, False),
                                                        (2, 2, True)])
def test_the_corrected_counter_counts_a_grouped_convolution_by_hand(groups: int, stride: int,
                                                                      transposed: bool) -> None:
    """Three GEMMs of one (grouped, strided or transposed) convolution, each as many MACs as the forward:
    per sample and output position (input position for a transposed one), c_out x c_in / groups x
    kernel area. torch's unmodified counter gets the weight gradient wrong for groups > 1."""
    conv: nn.Module
    if transposed:
        conv = nn.ConvTranspose2d(16, 16, 3, stride=stride, groups=groups, bias=False)
    else:
        conv = nn.Conv2d(16, 16, 3, stride=stride, padding=1, groups=groups, bias=False)
    x = torch.randn(3, 16, 9, 9, requires_grad=True)
    positions = 9 * 9 if transposed else conv(x).shape[-1] * conv(x).shape[-2]
    by_hand = 3 * positions * 16 * 16 // groups * 9
    assert torch_training_macs(lambda: conv(x)) == {"forward": by_hand, "backward": 2 * by_hand}
    plain = FlopCounterMode(display=False)
    out = conv(x).sum()
    with plain:
        out.backward()
    assert (plain.get_total_flops() == 2 * 2 * by_hand) == (groups == 1)  # torch 2.13's own formula


# --- the proxies a sweep trains ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def datasets() -> dict[str, Dataset]:
    return {name: load_dataset(name) for name in ("digits", "mnist1d", "sort")}


PAIRS = [("mlp", "digits"), ("cnn", "digits"), ("resnet", "digits"), ("mlp", "mnist1d"), ("cnn", "mnist1d"),
         ("resnet", "mnist1d"), ("transformer", "sort")]


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("model_name, data_name", PAIRS)
def test_a_proxys_training_step_runs_the_gemms_dse_prices(model_name: str, data_name: str, batch: int,
                                                          datasets: dict[str, Dataset]) -> None:
    data = datasets[data_name]
    torch.manual_seed(0)
    model = build_model(model_name, data)
    workload = trace_workload(model, data, "t", batch)  # what a sweep prices for the trial's own model
    x, y = data.x_train[:batch], data.y_train[:batch]
    assert priced_macs(workload, batch) == torch_training_macs(lambda: model(x), y)


HAND_WRITTEN = {"digits-mlp": ("mlp", "digits"), "digits-cnn": ("cnn", "digits"),
                "m1d-mlp": ("mlp", "mnist1d"), "m1d-cnn": ("cnn", "mnist1d"),
                "sort-transformer": ("transformer", "sort")}


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_a_hand_written_proxy_workload_prices_the_models_training_step(name: str,
                                                                        datasets: dict[str, Dataset]) -> None:
    model_name, data_name = HAND_WRITTEN[name]
    data = datasets[data_name]
    model = build_model(model_name, data)
    x, y = data.x_train[:3], data.y_train[:3]
    assert priced_macs(get_workload(name), 3) == torch_training_macs(lambda: model(x), y)


# --- the full-size workloads -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def references() -> dict[str, nn.Module]:
    with torch.device("meta"):
        return {name: build() for name, (build, _) in REFERENCES.items()}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_a_full_size_workload_prices_what_torch_counts_in_its_training_step(name: str,
                                                                             references: dict[str, nn.Module]
                                                                             ) -> None:
    """ResNet-18/50, MobileNetV2, ViT-B/16, BERT-base, GPT-2 small and LLaMA-7B as torch modules (meta
    tensors: shapes only): forward and backward multiply-adds at batches 1 and 3 equal what dse prices."""
    net, make_input = references[name], REFERENCES[name][1]
    for batch in (1, 3):
        counts = torch_training_macs(lambda: net(make_input(batch)))  # noqa: B023 (called at once)
        assert priced_macs(get_workload(name), batch) == counts, batch


# --- a trial's model as training runs it -------------------------------------------------------------

TRIALS: list[dict[str, Any]] = [
    {"model": "mlp", "dataset": "digits", "format": "int8"},
    {"model": "cnn", "dataset": "digits", "format": "mxfp8_e4m3"},
    {"model": "cnn", "dataset": "mnist1d", "format": "int8", "accumulation": "fp16", "accumulation_chunk": 8},
    {"model": "mlp", "dataset": "digits", "format": "lns8", "optimizer": "lns-madam"},
    {"model": "transformer", "dataset": "sort", "format": "fp8_e4m3", "optimizer": "adam",
     "accumulation": "bf16"},
    {"model": "resnet", "dataset": "digits", "format": "posit8"},
    {"model": "cnn", "dataset": "digits", "format": "int8", "optimizer": "niti"},
    {"model": "USER:frozen", "dataset": "digits", "format": "int8", "optimizer": "adam"},
    {"model": "USER:frozen", "dataset": "digits", "format": "int8", "optimizer": "niti"},
    {"model": "support.checkpointed:non_reentrant", "dataset": "digits", "format": "int8"},
    {"model": "support.checkpointed:non_reentrant", "dataset": "digits", "format": "fp32"},
    {"model": "support.checkpointed:reentrant", "dataset": "digits", "format": "posit8"},
    {"model": "support.checkpointed:training_only", "dataset": "digits", "format": "int8"},
    {"model": "support.checkpointed:sequential", "dataset": "digits", "format": "int8",
     "accumulation": "fp16", "accumulation_chunk": 8},
]


SWEEP = "task: {model: mlp, dataset: digits}\ntrials: [{format: int8}]\n"


@pytest.mark.parametrize("trial", TRIALS, ids=lambda t: "-".join(str(v) for v in t.values()))
def test_a_trials_quantized_training_step_runs_the_gemms_its_energy_prices(
        trial: dict[str, Any], datasets: dict[str, Dataset]) -> None:
    """The model training runs (quantized layers, each GEMM folded chunk by chunk into an accumulator
    format where the trial has one, NITI's integer network) does the GEMMs the sweep's energy columns
    price for that trial (EnergyEstimator.proxy: the trial's model traced at its batch size)."""
    from dse.sweep import parse_config
    from dse.sweep.energy import EnergyEstimator
    from dse.train.loop import prepare

    for batch in (4, 9):
        config = TrainConfig(**{**trial, "model": trial["model"].replace("USER", str(USER_MODELS))},
                             batch_size=batch)
        data = datasets[config.dataset]
        torch.manual_seed(config.seed)
        setup = prepare(build_model(config.model, data), config, torch.Generator().manual_seed(0),
                        data.x_train[:2])
        x, y = data.x_train[:batch], data.y_train[:batch]
        counts = torch_training_macs(lambda: setup.model(x), y)  # noqa: B023 (called at once)
        workload = EnergyEstimator(parse_config(SWEEP, "s.yaml").energy).proxy(config)
        assert priced_macs(workload, batch) == counts, batch


# --- users' networks: a model function and its ONNX export --------------------------------------------

USER_MODELS = Path(__file__).parents[1] / "support" / "user_models.py"
OWN_MODEL = Path(__file__).parents[2] / "examples" / "own_model" / "model.py"


@pytest.mark.parametrize("ref", [f"{OWN_MODEL}:small_resnet"] + [
    f"{USER_MODELS}:{name}" for name in ("functional", "conv", "encoder", "attention", "sdpa", "tokens",
                                         "transposed", "scaled_scores")])
def test_a_users_network_is_priced_as_torch_counts_its_training_step(ref: str, tmp_path: Path,
                                                                     datasets: dict[str, Dataset]) -> None:
    """As users give them (docs/own-network.md): `file.py:function` traced on the dataset, and the same
    network exported to ONNX, at two batch sizes."""
    pytest.importorskip("onnx")
    data = datasets["digits"]
    torch.manual_seed(0)
    model = build_model(ref, data)
    for batch in (2, 5):
        x, y = data.x_train[:batch], data.y_train[:batch]
        counts = torch_training_macs(lambda: model(x), y)  # noqa: B023 (called at once)
        assert priced_macs(get_workload(ref, "digits", batch), batch) == counts, batch
    path = tmp_path / "net.onnx"  # at the batch it is traced with: these models write len(x) in reshapes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (data.x_train[:3],), str(path), dynamo=False, input_names=["x"])
    model.train()
    for batch in (2, 5):
        x, y = data.x_train[:batch], data.y_train[:batch]
        counts = torch_training_macs(lambda: model(x), y)  # noqa: B023 (called at once)
        assert priced_macs(get_workload(str(path), batch_size=batch), batch) == counts, batch


def test_an_onnx_file_whose_graph_fixes_the_batch_is_refused_not_priced_twice(tmp_path: Path) -> None:
    """A model that writes len(x) into a reshape, exported with an open batch axis: the file's Reshape
    holds the export's batch, so with the batch at 1 its later GEMMs would count 3 samples each."""
    pytest.importorskip("onnx")
    from dse.errors import InputError

    data = load_dataset("digits")
    model = build_model(f"{USER_MODELS}:conv", data).eval()
    path = tmp_path / "dynamic.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (data.x_train[:3],), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    with pytest.raises(InputError, match=r"dynamic.onnx'?: the batch axis is open but .* does not follow it"):
        get_workload(str(path))


def test_a_product_of_two_inputs_that_need_no_gradient_has_no_backward_gemm() -> None:
    """(x @ x^T) * s on the model's input: torch computes neither operand's gradient, and dse prices
    neither (before, the backward-weight GEMM of such a product was priced although it never runs)."""
    from dse.models.trace import trace_model

    class Gram(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x: Tensor) -> Tensor:
            tokens = x.reshape(len(x), 4, 16)
            return (tokens @ tokens.transpose(1, 2)).flatten(1) * self.scale

    model, x = Gram(), torch.randn(3, 64)
    workload = trace_model(model, x, "gram", batch_size=3)
    assert priced_macs(workload, 3) == torch_training_macs(lambda: model(x)) == {"forward": 3 * 4 * 16 * 4,
                                                                                "backward": 0}


# --- parameters: every one the optimizer updates, in the format training keeps it in --------------------

PUBLISHED_PARAMS = {  # parameters of the network each reference module writes out, and the count's source
    "resnet18": (11_689_512, "torchvision resnet18 model card (num_params)"),
    "resnet50": (25_557_032, "torchvision resnet50 model card (num_params)"),
    "mobilenetv2": (3_504_872, "torchvision mobilenet_v2 model card (num_params)"),
    "vit-b16": (86_567_656, "torchvision vit_b_16 model card (num_params)"),
    "bert-base": (109_482_240 + 768 * 2 + 2, "Hugging Face bert-base-uncased BertModel, plus a 2-class head"),
    "gpt2-small": (124_439_808, "Hugging Face gpt2 (the LM head tied to the token embedding)"),
    "llama-7b": (6_738_415_616, "the released LLaMA-7B checkpoint"),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_a_full_size_workload_updates_every_parameter_of_its_network(
        name: str, references: dict[str, nn.Module]) -> None:
    """GEMM weights plus the biases, norms and embeddings (extra_params): before, ResNet's BatchNorms,
    BERT's and GPT-2's LayerNorms and every bias were left out of the update and the state."""
    published, _ = PUBLISHED_PARAMS[name]
    assert sum(p.numel() for p in references[name].parameters()) == published
    assert get_workload(name).params == published


def test_parameters_outside_gemms_are_updated_in_fp32_whatever_the_trials_format() -> None:
    """Training quantizes GEMM operands only: biases, norms and embeddings stay fp32 (no master copy
    besides), and so does their gradient; their optimizer state is the trial's state format."""
    workload = get_workload("bert-base")
    extra = set(workload.extra_params)

    def update(spec: str) -> Any:
        frame = iteration_energy(workload, spec, ENERGY, 2)
        rows = frame[(frame["pass"] == "update") & frame["layer"].isin(extra)]
        return rows.groupby(["unit", "tensor", "level"])["energy_pj"].sum()

    fp32, int8, lns8 = update("fp32"), update("int8"), update("lns8")
    assert int8.to_dict() == pytest.approx(fp32.to_dict(), rel=1e-12)
    dram = fp32.xs("dram", level="level").groupby("tensor").sum() / ENERGY.dram_pj_per_bit
    params = sum(workload.extra_params.values())  # Adam (BERT's): two states, fp32 by default
    expected = {"weight_grads": 32 * params, "optimizer_state": 4 * 32 * params, "weights": 2 * 32 * params}
    assert dram.to_dict() == pytest.approx(expected, rel=1e-12)
    assert "master_weights" not in set(fp32.index.get_level_values("tensor"))
    assert lns8.sum() != pytest.approx(fp32.sum(), rel=1e-3)  # Madam's update (LNS weights' optimizer)


STATE_TRIALS: list[dict[str, Any]] = [
    {"model": "mlp", "dataset": "digits", "format": "int8", "optimizer": "sgd"},
    {"model": "resnet", "dataset": "digits", "format": "fp8_e4m3", "optimizer": "adam",
     "master_weights": False},
    {"model": "transformer", "dataset": "sort", "format": "int8", "optimizer": "adam",
     "optimizer_state": "bf16"},
    {"model": "cnn", "dataset": "digits", "format": "lns8", "optimizer": "lns-madam",
     "master_weights": False},
    {"model": "cnn", "dataset": "digits", "format": "posit(8,1)", "optimizer": "sgd", "warmup_epochs": 1,
     "layer_scaling": True, "master_weights": "posit(16,1)"},
    {"model": "USER:frozen", "dataset": "digits", "format": "int8", "optimizer": "adam"},
]


@pytest.mark.parametrize("trial", STATE_TRIALS, ids=lambda t: "-".join(str(v) for v in t.values()))
def test_a_trials_memory_column_is_the_state_its_training_holds(trial: dict[str, Any],
                                                                datasets: dict[str, Dataset]) -> None:
    """memory_mib (trials.csv's memory column) against the training run itself after one step: each GEMM
    weight in its format (plus an fp32 master copy when the trial keeps one), every other parameter in
    fp32, and every state tensor torch's optimizer holds, in the state format."""
    from dse.sweep import parse_config
    from dse.sweep.energy import EnergyEstimator
    from dse.train.layers import quantized_layers
    from dse.train.loop import prepare

    config = TrainConfig(**{**trial, "model": trial["model"].replace("USER", str(USER_MODELS))}, batch_size=4)
    data = datasets[config.dataset]
    setup = prepare(build_model(config.model, data), config, torch.Generator().manual_seed(0),
                    data.x_train[:2])
    setup.loss_fn(setup.model(data.x_train[:4]), data.y_train[:4]).backward()
    setup.optimizer.step()
    gemm_weights = {id(m.weight) for m in quantized_layers(setup.model)
                    if getattr(m, "weight", None) is not None}
    copy = config.master_weights
    weight_bits = get(config.format).bits + (32 if copy is True else get(copy).bits if copy else 0)
    state_bits = get(config.optimizer_state).bits if config.optimizer_state else 32
    bits = 0
    for p in setup.model.parameters():
        bits += p.numel() * (weight_bits if id(p) in gemm_weights else 32)
        states = setup.optimizer.state[p].values()
        bits += sum(s.numel() for s in states if isinstance(s, Tensor) and s.shape == p.shape) * state_bits
    sweep = parse_config("task: {model: mlp, dataset: digits}\ntrials: [{format: int8}]\n"
                         "energy: {workloads: [proxy]}\n", "s.yaml")
    priced = EnergyEstimator(sweep.energy).estimate(config)["proxy"].memory_mib
    assert priced * 8 * 2**20 == pytest.approx(bits, rel=1e-12)


# --- memory traffic: the tensors each GEMM reads and writes ----------------------------------------------

def test_each_gemms_dram_traffic_is_the_size_of_the_tensors_training_moves() -> None:
    """No counter sees memory traffic: the model's compulsory traffic (each GEMM reads its two operands and
    writes its output once) against the sizes of the tensors a forward really makes, from module hooks:
    forward x, w -> y; backward-data dy, w -> dx; backward-weight x, dy -> dw (INT8: 8 bits each)."""
    from dse.models.trace import trace_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.Flatten(), nn.Linear(8 * 5 * 5, 10))
    x = torch.randn(3, 3, 10, 10)
    sizes: dict[str, tuple[int, int, int]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            sizes[name] = (args[0].numel(), module.weight.numel(), out.numel())
        return hook

    hooks = [module.register_forward_hook(record(name)) for name, module in model.named_modules()
             if isinstance(module, (nn.Conv2d, nn.Linear))]
    model(x)
    for hook in hooks:
        hook.remove()
    workload = trace_model(model, x[:2], "net", batch_size=3)
    frame = iteration_energy(workload, "int8", ENERGY, 3)
    dram = frame[(frame["level"] == "dram") & (frame["pass"] != "update")]
    priced = dram.groupby(["layer", "pass", "tensor"])["energy_pj"].sum() / ENERGY.dram_pj_per_bit / 8
    expected: dict[tuple[str, str, str], int] = {}
    for index, (name, (x_elems, w_elems, y_elems)) in enumerate(sizes.items()):
        expected[(name, "forward", "activations")] = x_elems + y_elems
        expected[(name, "forward", "weights")] = w_elems
        if index:  # the first layer's input needs no gradient
            expected[(name, "backward_data", "gradients")] = y_elems + x_elems
            expected[(name, "backward_data", "weights")] = w_elems
        expected[(name, "backward_weight", "activations")] = x_elems
        expected[(name, "backward_weight", "gradients")] = y_elems
        expected[(name, "backward_weight", "weight_grads")] = w_elems
    assert {key: round(value) for key, value in priced.items()} == expected


@pytest.mark.parametrize("model_name, data_name, master", [
    ("cnn", "digits", True), ("cnn", "digits", "int16"), ("transformer", "sort", True)])
def test_a_niti_trial_is_priced_with_its_integer_update(model_name: str, data_name: str, master: bool | str,
                                                        datasets: dict[str, Dataset]) -> None:
    """NITI keeps int8 weights (or an int16 accumulator besides, when master_weights names one), no
    optimizer state, and freezes every parameter outside its integer layers (biases, norms, a free
    position table) but trains an nn.Embedding as an integer table (NitiEmbedding): before, its trials
    were priced as SGD with an fp32 master copy and fp32 momentum for every parameter, and then with
    the embedding frozen in fp32."""
    from dse.energy import TrainingFormats
    from dse.sweep import parse_config
    from dse.sweep.energy import EnergyEstimator
    from dse.train.loop import prepare

    config = TrainConfig(model=model_name, dataset=data_name, format="int8", optimizer="niti",
                         master_weights=master, batch_size=4)
    data = datasets[data_name]
    setup = prepare(build_model(model_name, data), config, torch.Generator().manual_seed(0), data.x_train[:2])
    setup.loss_fn(setup.model(data.x_train[:4]), data.y_train[:4]).backward()
    setup.optimizer.step()
    trained = {id(p) for group in setup.optimizer.param_groups for p in group["params"]}
    assert all(p.requires_grad == (id(p) in trained) for p in setup.model.parameters())
    bits = sum(p.numel() * (8 if id(p) in trained else 32) for p in setup.model.parameters())
    bits += sum(s.numel() * 16 for state in setup.optimizer.state.values() for s in state.values()
                if isinstance(s, Tensor))  # the int16 accumulator, when there is one
    sweep = parse_config("task: {model: mlp, dataset: digits}\ntrials: [{format: int8}]\n"
                         "energy: {workloads: [proxy]}\n", "s.yaml")
    estimator = EnergyEstimator(sweep.energy)
    assert estimator.estimate(config)["proxy"].memory_mib * 8 * 2**20 == pytest.approx(bits, rel=1e-12)

    workload = estimator.proxy(config)
    copy = master if isinstance(master, str) else None
    frame = iteration_energy(workload, TrainingFormats.of("int8", optimizer="niti", master_weights=copy),
                             ENERGY, 4)
    update = frame[frame["pass"] == "update"]
    names = {name for name, p in setup.model.named_parameters() if id(p) in trained}
    assert set(update["layer"]) == {name.removesuffix(".weight") if name.removesuffix(".weight") in
                                    {layer.name for layer in workload.layers} else name for name in names}
    traffic = update[update["level"] == "dram"].groupby("tensor")["energy_pj"].sum() / ENERGY.dram_pj_per_bit
    params = sum(p.numel() for p in setup.model.parameters() if id(p) in trained)
    expected = {"weight_grads": 8 * params, "weights": (1 if copy else 2) * 8 * params}
    if copy:
        expected["master_weights"] = 2 * 16 * params
    assert traffic.to_dict() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("optimizer", ["sgd", "niti"])
def test_a_frozen_parameter_is_stored_but_neither_differentiated_nor_updated(optimizer: str,
                                                                             datasets: dict[str, Dataset]
                                                                             ) -> None:
    """A user's network with frozen parameters (requires_grad=False), as a trial trains it: torch runs no
    weight-gradient GEMM for a frozen weight and its optimizer skips every frozen parameter (no update,
    no state); NITI leaves a frozen weight as it is too (before, its integer layers updated it), and
    freezes every bias. The update rows are exactly the parameters that changed in two steps."""
    from dse.energy import TrainingFormats
    from dse.sweep import parse_config
    from dse.sweep.energy import EnergyEstimator
    from dse.train.loop import prepare

    config = TrainConfig(model=f"{USER_MODELS}:frozen", dataset="digits", format="int8", optimizer=optimizer,
                         batch_size=4)
    data = datasets["digits"]
    setup = prepare(build_model(config.model, data), config, torch.Generator().manual_seed(0),
                    data.x_train[:2])
    before = {name: p.detach().clone() for name, p in setup.model.named_parameters()}
    for step in range(2):
        setup.loss_fn(setup.model(data.x_train[4 * step:4 * step + 4]), data.y_train[4 * step:4 * step + 4]
                      ).backward()
        setup.optimizer.step()
        setup.optimizer.zero_grad()
    changed = {name for name, p in setup.model.named_parameters() if not torch.equal(p, before[name])}
    sweep = parse_config(SWEEP, "s.yaml")
    workload = EnergyEstimator(sweep.energy).proxy(config)
    frame = iteration_energy(workload, TrainingFormats.of("int8", optimizer=optimizer), ENERGY, 4)
    updated = set(frame[frame["pass"] == "update"]["layer"])
    assert updated == {name.removesuffix(".weight") if name.endswith(".weight") else name for name in changed}
    trained_biases = {"stem.bias", "mid.bias", "head.bias"} if optimizer == "sgd" else set()
    assert updated == {"stem", "head"} | trained_biases
    backward_weight = set(frame[frame["pass"] == "backward_weight"]["layer"])
    assert backward_weight == {"stem", "head"}


@pytest.mark.parametrize("fmt, optimizer, master", [
    ("int8", "sgd", True), ("int8", "sgd", False), ("int8", "sgd", "int16"),
    ("lns8", "lns-madam", "lns(16,gamma=2048)"), ("lns8", "lns-madam", False), ("lns8", "lns-madam", True)])
def test_a_step_rounds_the_stored_weights_the_model_prices_a_rounding_for(
        fmt: str, optimizer: str, master: bool | str, datasets: dict[str, Dataset]) -> None:
    """After each step training rounds every stored GEMM weight into its format (no fp32 copy: the
    weights' own, or the copy's), frozen ones too, except LNS-Madam, which moves only the weights it
    updates, on their grid: the weights a real step writes are the layers whose weights the model
    prices an update-pass write and rounding for (before: a frozen weight was not priced, as if a step
    left it alone; then LNS-Madam's frozen weights were, in an LNS master copy)."""
    from dse.energy import TrainingFormats
    from dse.sweep import parse_config
    from dse.sweep.energy import ENERGY_OPTIMIZERS, EnergyEstimator, master_format
    from dse.train.loop import prepare

    config = TrainConfig(model="support.fine_tuned:frozen_first", dataset="digits", format=fmt,
                         optimizer=optimizer, master_weights=master, batch_size=4)
    data = datasets["digits"]
    setup = prepare(build_model(config.model, data), config, torch.Generator().manual_seed(0),
                    data.x_train[:2])
    weights = {name.removesuffix(".weight"): p for name, p in setup.model.named_parameters()
               if name.endswith(".weight")}
    setup.loss_fn(setup.model(data.x_train[:4]), data.y_train[:4]).backward()
    versions = {name: p._version for name, p in weights.items()}
    setup.optimizer.step()
    written = {name for name, p in weights.items() if p._version != versions[name]}
    workload = EnergyEstimator(parse_config(SWEEP, "s.yaml").energy).proxy(config)
    frame = iteration_energy(workload, TrainingFormats.of(fmt, optimizer=ENERGY_OPTIMIZERS[optimizer],
                                                          master_weights=master_format(config)), ENERGY, 4)
    update = frame[(frame["pass"] == "update") & frame["layer"].isin(list(weights))]
    stored = "master_weights" if isinstance(master, str) else "weights"
    assert set(update[update["tensor"] == stored]["layer"]) == written
    rounds_all = master is not True and optimizer != "lns-madam"
    assert written == ({"pre", "mid", "head"} if rounds_all else {"head"})


def test_a_layer_files_frozen_weight_has_no_weight_gradient_and_no_update(tmp_path: Path) -> None:
    """A layer file's `needs_weight_grad: false` on a weight layer is a frozen weight: no backward-weight
    GEMM and no update; a file without the key (the default) prices both, as before."""
    path = tmp_path / "net.yaml"
    path.write_text("layers:\n  - {name: a, m: 4, k: 8, n: 8, needs_weight_grad: false}\n"
                    "  - {name: b, m: 4, k: 8, n: 2}\n")
    frame = iteration_energy(get_workload(str(path)), "int8", ENERGY, 2)
    assert set(frame[frame["pass"] == "backward_weight"]["layer"]) == {"b"}
    assert set(frame[frame["pass"] == "update"]["layer"]) == {"b"}
