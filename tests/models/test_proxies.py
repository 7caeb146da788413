"""Proxy models: shapes, parameter counts, quantizable layers, and traced workloads vs hand-written ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dse.data import Dataset, load_dataset
from dse.errors import InputError
from dse.models.proxies import MODELS, build_model, compatible_models, trace_workload
from dse.models.workloads import get_workload
from dse.train.layers import Matmul

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Dataset]:
    """Real small datasets, plus MNIST/CIFAR-shaped fakes (those need files the tests do not have)."""
    cache = tmp_path_factory.mktemp("cache")
    found = {name: load_dataset(name, cache_dir=cache)
             for name in ("digits", "mnist1d", "mnist5k", "sort", "sort-easy")}
    gen = torch.Generator().manual_seed(0)

    def fake(name: str, shape: tuple[int, ...]) -> Dataset:
        x = torch.rand((8, *shape), generator=gen)
        y = torch.randint(0, 10, (8,), generator=gen)
        return Dataset(name, x, y, x[:4], y[:4], num_classes=10, task="classification")

    found["mnist"] = fake("mnist", (784,))
    found["cifar10"] = fake("cifar10", (3, 32, 32))
    return found


CLASSIFICATION = ("digits", "mnist1d", "mnist5k", "mnist", "cifar10")
PAIRS = [(model, name) for name in CLASSIFICATION for model in ("mlp", "cnn", "resnet")] + [
    ("transformer", "sort"), ("transformer", "sort-easy")]


def test_compatible_models(datasets: dict[str, Dataset]) -> None:
    for name in CLASSIFICATION:
        assert compatible_models(datasets[name]) == ("mlp", "cnn", "resnet")
    assert compatible_models(datasets["sort"]) == ("transformer",)
    assert set(MODELS) == {"mlp", "cnn", "resnet", "transformer"}


@pytest.mark.parametrize("model_name, data_name", PAIRS)
def test_every_pair_builds_runs_and_backpropagates(model_name: str, data_name: str,
                                                   datasets: dict[str, Dataset]) -> None:
    data = datasets[data_name]
    torch.manual_seed(0)
    model = build_model(model_name, data)
    x, y = data.x_train[:4], data.y_train[:4]
    out = model(x)
    if data.task == "sequence":
        assert out.shape == (4, data.sample_shape[0], data.num_classes)
        loss = F.cross_entropy(out.reshape(-1, data.num_classes), y.reshape(-1))
    else:
        assert out.shape == (4, data.num_classes)
        loss = F.cross_entropy(out, y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # Only swappable layers multiply: every GEMM-type module is a standard Linear / Conv / Matmul.
    assert any(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) for m in model.modules())


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model_name, data_name, expected", [
    # Parameter counts from the proxy notes (Table A), computed there for the same architectures.
    ("mlp", "digits", 9_610), ("cnn", "digits", 9_930), ("mlp", "mnist1d", 78_858),
    ("cnn", "mnist1d", 5_210), ("mlp", "mnist5k", 101_770), ("cnn", "mnist5k", 9_098),
    ("mlp", "mnist", 101_770), ("cnn", "mnist", 9_098),
])
def test_parameter_counts_match_the_reference(model_name: str, data_name: str, expected: int,
                                              datasets: dict[str, Dataset]) -> None:
    assert _params(build_model(model_name, datasets[data_name])) == expected


def test_transformer_size_and_attention_modules(datasets: dict[str, Dataset],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    data = datasets["sort"]
    model = build_model("transformer", data)
    assert 100_000 < _params(model) < 120_000  # "2 layers, d=64, 110 k params" in the proxy notes
    matmuls = [m for m in model.modules() if isinstance(m, Matmul)]
    assert len(matmuls) == 4  # QK^T and attention x V in each of the 2 layers
    shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for m in matmuls:
        m.register_forward_hook(lambda mod, inp, out: shapes.append((tuple(inp[0].shape), tuple(out.shape))))

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("attention must go through Matmul modules")

    monkeypatch.setattr(F, "scaled_dot_product_attention", forbidden)
    model(data.x_train[:3])
    assert shapes[0] == ((3, 4, 24, 16), (3, 4, 24, 24))  # scores: per head, 24 x 16 @ 16 x 24
    assert shapes[1] == ((3, 4, 24, 24), (3, 4, 24, 16))  # context: 24 x 24 @ 24 x 16
    assert len(shapes) == 4


def test_transformer_is_bidirectional(datasets: dict[str, Dataset]) -> None:
    """Sorting needs every token to see the whole sequence: changing the last token moves the first output."""
    torch.manual_seed(0)
    model = build_model("transformer", datasets["sort"]).eval()
    x = datasets["sort"].x_train[:1].clone()
    before = model(x)[0, 0]
    x[0, -1] = (x[0, -1] + 1) % 64
    assert not torch.allclose(before, model(x)[0, 0])


def test_initial_weights_follow_the_global_seed(datasets: dict[str, Dataset]) -> None:
    def weights(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return torch.cat([p.detach().flatten() for p in build_model("cnn", datasets["mnist1d"]).parameters()])

    assert torch.equal(weights(3), weights(3))
    assert not torch.equal(weights(3), weights(4))


# --- errors ----------------------------------------------------------------------------------------

def test_unknown_model(datasets: dict[str, Dataset]) -> None:
    with pytest.raises(InputError) as exc:
        build_model("resnt", datasets["digits"])
    message = str(exc.value)
    assert "\n" not in message and "'resnt'" in message and "did you mean 'resnet'" in message
    assert all(name in message for name in MODELS)


@pytest.mark.parametrize("model_name, data_name, works", [
    ("transformer", "digits", "mlp, cnn, resnet"), ("mlp", "sort", "transformer"),
    ("cnn", "sort-easy", "transformer"),
])
def test_incompatible_pair_names_both_and_what_works(model_name: str, data_name: str, works: str,
                                                      datasets: dict[str, Dataset]) -> None:
    with pytest.raises(InputError) as exc:
        build_model(model_name, datasets[data_name])
    message = str(exc.value)
    assert "\n" not in message
    assert f"'{model_name}'" in message and f"'{data_name}'" in message and works in message


def test_convolutional_models_need_a_layout() -> None:
    x = torch.rand(4, 50)
    flat = Dataset("custom", x, torch.zeros(4, dtype=torch.int64), x, torch.zeros(4, dtype=torch.int64),
                   num_classes=3, task="classification")
    assert compatible_models(flat) == ("mlp",)
    with pytest.raises(InputError, match="layout"):
        build_model("cnn", flat)
    assert build_model("mlp", flat)(x).shape == (4, 3)


# --- workload tracing ------------------------------------------------------------------------------

def _shape(layer: object) -> tuple[object, ...]:
    return tuple(getattr(layer, f) for f in ("m", "k", "n", "groups", "input_elems", "b_is_weight",
                                              "needs_input_grad", "kind"))


@pytest.mark.parametrize("model_name, data_name, workload", [
    ("mlp", "digits", "digits-mlp"), ("cnn", "digits", "digits-cnn"), ("mlp", "mnist1d", "m1d-mlp"),
    ("cnn", "mnist1d", "m1d-cnn"), ("mlp", "mnist5k", "mx5k-mlp"), ("cnn", "mnist5k", "mx5k-cnn"),
    ("transformer", "sort", "sort-transformer"),
])
def test_trace_matches_hand_written_workload(model_name: str, data_name: str, workload: str,
                                             datasets: dict[str, Dataset]) -> None:
    hand = get_workload(workload)
    traced = trace_workload(build_model(model_name, datasets[data_name]), datasets[data_name], workload,
                            hand.batch_size, optimizer=hand.optimizer)
    assert traced.proxy and traced.optimizer == hand.optimizer and traced.batch_size == hand.batch_size
    assert traced.forward_macs(7) == hand.forward_macs(7)
    assert [_shape(layer) for layer in traced.layers] == [_shape(layer) for layer in hand.layers]
    assert sum(layer.params for layer in traced.layers) == sum(layer.params for layer in hand.layers)
    # every parameter the optimizer updates: GEMM weights, biases, norms and embeddings
    assert traced.params == hand.params == _params(build_model(model_name, datasets[data_name]))


@pytest.mark.parametrize("model_name, data_name", PAIRS)
def test_trace_accounts_for_every_multiply_and_parameter(model_name: str, data_name: str,
                                                         datasets: dict[str, Dataset]) -> None:
    data = datasets[data_name]
    model = build_model(model_name, data).eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(data.x_train[:3])
    traced = trace_workload(model, data, "t", batch_size=3)
    assert 2 * traced.forward_macs(3) == counter.get_total_flops()  # torch counts 2 flops per MAC
    assert traced.params == _params(model)  # biases and norms are extra parameters the optimizer updates
    assert [layer.needs_input_grad for layer in traced.layers][0] is (data.task == "sequence")
    assert len({layer.name for layer in traced.layers}) == len(traced.layers)


def test_trace_leaves_the_model_as_it_was(datasets: dict[str, Dataset]) -> None:
    data = datasets["digits"]
    model = build_model("resnet", data)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trace_workload(model, data, "r", batch_size=16)
    assert model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BN statistics too
    assert all(not m._forward_hooks for m in model.modules())


def test_tracing_does_not_import_torch_dynamo(repo_root: Path) -> None:
    """Every sweep traces its proxy to price it, and finds its GEMM layers for per-layer rules;
    torch._dynamo costs about a second to import and is not needed for either (the tracer is a dispatch
    mode nothing compiles; finding the layers runs no backward, so no checkpoint recomputes and
    recompute's check, whose checkpoint imports it, waits for a run to train)."""
    code = ("import sys; from dse.data import load_dataset; from dse.models.proxies import build_model, "
            "trace_workload; from dse.train.functional import model_layers; data = load_dataset('digits'); "
            "trace_workload(build_model('mlp', data), data, 'm', batch_size=4); "
            "model_layers(build_model('mlp', data), data.x_train[:2]); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(repo_root)}).stdout.split()
    assert out == ["False"]


def test_trace_rejects_bad_input(datasets: dict[str, Dataset]) -> None:
    model = build_model("mlp", datasets["digits"])
    with pytest.raises(InputError, match="batch_size"):
        trace_workload(model, datasets["digits"], "x", batch_size=0)
    with pytest.raises(InputError, match="mnist1d"):
        trace_workload(model, datasets["mnist1d"], "x", batch_size=4)  # 40 features into a 64-input MLP


# --- training sanity -------------------------------------------------------------------------------

def test_one_epoch_of_sgd_on_digits_beats_chance(datasets: dict[str, Dataset]) -> None:
    data = datasets["digits"]
    torch.manual_seed(0)
    model = build_model("mlp", data)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(0))
    for start in range(0, len(order), 32):
        batch = order[start:start + 32]
        loss = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    assert accuracy > 0.6  # chance is 0.1; the reference reaches ~0.8 after one epoch
