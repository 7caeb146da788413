"""Workloads from a user's network (a traced nn.Module, an ONNX file, a YAML or CSV list of GEMM shapes)
and the built-in full-size workloads, each MAC count checked against a published or hand-derived figure."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from dse.cli import app
from dse.errors import InputError
from dse.models.trace import trace_model
from dse.models.workloads import (
    BUILT_IN_WORKLOADS,
    Workload,
    get_workload,
    llama,
    llama_ffn_width,
    workload_names,
)
from dse.sweep import parse_config
from dse.sweep.energy import EnergyEstimator
from dse.train.config import TrainConfig

# --- tracing ---------------------------------------------------------------------------------------


class Functional(nn.Module):
    """GEMMs a user writes by hand: F.linear, @ on a parameter, torch.bmm, einsum and fused attention."""

    def __init__(self) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(32, 12))
        self.w_out = nn.Parameter(torch.randn(32, 5))
        self.mix = nn.Linear(8, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 6, 12)
        h = F.linear(x, self.w_in)                             # (B, 6, 32)
        q = h.view(-1, 6, 4, 8).transpose(1, 2)                # (B, 4, 6, 8)
        a = F.scaled_dot_product_attention(q, q, q)            # scores and context, 4 heads
        g = torch.bmm(h, h.transpose(1, 2))                    # (B, 6, 6)
        e = torch.einsum("bhtd,de->bhte", a, self.mix.weight)  # a weight GEMM through einsum
        return (g @ h).mean(1) @ self.w_out + e.sum()


def _flops(model: nn.Module, x: torch.Tensor) -> int:
    """torch's count of a forward pass as training runs it (with gradients: no inference fast path).
    Attention runs unfused here (torch's counter skips the fused CPU kernel), so its two products show
    up as matmuls; the tracer sees the fused kernel and must count the same."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    counter = FlopCounterMode(display=False)
    with counter, torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        model.eval()(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("build, shape", [
    (lambda: nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), (5, 16)),
    (lambda: nn.TransformerDecoderLayer(16, 2, 32, batch_first=True), (5, 16)),
    (lambda: Functional(), (6, 12)),
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8, padding=1),
                           nn.ConvTranspose2d(8, 4, 2, stride=2)), (3, 10, 10)),
])
def test_tracing_finds_every_multiply_torch_counts(build, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build()
    x = torch.randn(3, *shape)
    if isinstance(model, nn.TransformerDecoderLayer):
        model = _Decoder(model)
    workload = trace_model(model, x[:2], "t", batch_size=3)
    assert 2 * workload.forward_macs(3) == _flops(model, x)  # torch counts 2 flops per multiply-add


class _Decoder(nn.Module):
    def __init__(self, layer: nn.TransformerDecoderLayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, x)


def test_multihead_attention_is_named_by_its_projections_and_products() -> None:
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    workload = trace_model(layer, torch.randn(2, 5, 16), "enc", batch_size=8)
    names = [g.name for g in workload.layers]
    assert names == ["self_attn.in_proj", "self_attn.scores", "self_attn.context", "self_attn.out_proj",
                     "linear1", "linear2"]
    scores = workload.layers[1]
    assert (scores.m, scores.k, scores.n, scores.groups, scores.b_is_weight) == (5, 8, 5, 2, False)
    assert not workload.layers[0].needs_input_grad and all(g.needs_input_grad for g in workload.layers[1:])
    # the biases and the norms are the extra parameters (the optimizer updates them, in fp32)
    assert set(workload.extra_params) == {"norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                                          "self_attn.in_proj_bias", "self_attn.out_proj.bias", "linear1.bias",
                                          "linear2.bias"}
    assert workload.params == sum(p.numel() for p in layer.parameters())


class _Attention(nn.Module):
    """nn.MultiheadAttention called directly (need_weights: its explicit bmm path, or a fused kernel) or
    inside an nn.TransformerEncoderLayer."""

    def __init__(self, call: str) -> None:
        super().__init__()
        self.call = call
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.call == "encoder":
            return self.encoder(x)
        return self.attn(x, x, x, need_weights=self.call == "need_weights")[0]


@pytest.mark.parametrize("call", ["need_weights", "fused", "encoder"])
@pytest.mark.parametrize("training", [True, False])
def test_an_attentions_products_are_named_as_training_names_them(call: str, training: bool) -> None:
    """Whichever kernels torch runs an nn.MultiheadAttention's products with (two bmm where it returns
    its weights or trains with dropout, one fused kernel otherwise), the tracer names them `scores` and
    `context`, as training does (model_layers), so that a `layers:` rule prices them as they trained
    (before: `attn.matmul` and `attn.matmul#2` where the weights were asked for)."""
    from dse.train.functional import model_layers

    model, x = _Attention(call).train(training), torch.randn(2, 5, 16)
    traced = [g.name for g in trace_model(model, x, "a", batch_size=2).layers]
    ran = "encoder." if call == "encoder" else "attn."  # (model_layers lists both modules' layers)
    assert traced == [layer.name for layer in model_layers(model, x) if layer.name.startswith(ran)]
    assert {"scores", "context"} <= {name.rsplit(".", 1)[-1] for name in traced}


def test_tracing_leaves_the_models_mode_buffers_and_random_state_as_they_were() -> None:
    """The trace runs the forward in training mode, as training does; it leaves a norm's running
    statistics, the module's mode and torch's random state (dropout draws from it) as it found them."""
    for training in (True, False):
        model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
        model.train(training)
        buffers, x = [b.clone() for b in model.buffers()], torch.randn(4, 8)
        state = torch.random.get_rng_state()
        trace_model(model, x, "m", batch_size=4)
        assert model.training is training and torch.equal(torch.random.get_rng_state(), state)
        assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))


def test_functional_weights_are_found_by_their_parameter() -> None:
    workload = trace_model(Functional(), torch.randn(2, 6, 12), "f", batch_size=4)
    by_name = {g.name: g for g in workload.layers}
    w_in = by_name["w_in"]
    assert w_in.b_is_weight and (w_in.m, w_in.k, w_in.n) == (6, 12, 32)
    assert by_name["mix"].b_is_weight and by_name["w_out"].b_is_weight
    assert workload.extra_params == {}  # every parameter is some GEMM's weight
    assert sum(g.params for g in workload.layers) == 32 * 12 + 32 * 5 + 8 * 8


@settings(max_examples=25, deadline=None)
@given(batch=st.lists(st.integers(1, 3), min_size=0, max_size=2), m=st.integers(1, 5), k=st.integers(1, 5),
       n=st.integers(1, 5), weight=st.booleans(), samples=st.integers(1, 3))
def test_a_traced_matmul_counts_what_torch_counts(batch: list[int], m: int, k: int, n: int, weight: bool,
                                                  samples: int) -> None:
    class Product(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(k, n))

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # a weight, or x itself: [m,k] x [k,m]
            return x @ (self.w if weight else x.transpose(-1, -2))

    model = Product()
    x = torch.randn(samples, *batch, m, k)
    workload = trace_model(model, x, "p", batch_size=samples)
    assert 2 * workload.forward_macs(samples) == _flops(model, x)
    assert len(workload.layers) == 1 and workload.layers[0].b_is_weight == weight


# --- ONNX ------------------------------------------------------------------------------------------

class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.depthwise(self.conv(x))).flatten(1)
        t = y.reshape(-1, 16, 16)
        a, _ = self.attn(t, t, t)
        return self.fc(y) + a.mean((1, 2))[:, None]


def _export(model: nn.Module, path: Path, x: torch.Tensor, dynamic: bool = True) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}} if dynamic else None)
    return path


def test_an_onnx_file_gives_the_same_gemms_as_tracing(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = _Small().eval()
    x = torch.randn(2, 1, 8, 8)
    from_onnx = get_workload(str(_export(model, tmp_path / "small.onnx", x)))
    traced = trace_model(model, x, "t", batch_size=32)
    def shapes(workload: Workload) -> list[tuple[object, ...]]:
        return [(g.m, g.k, g.n, g.groups, g.b_is_weight, g.needs_input_grad, g.kind) for g in workload.layers]

    assert shapes(from_onnx) == shapes(traced)
    assert from_onnx.forward_macs() == traced.forward_macs() and from_onnx.params == traced.params
    names = [g.name for g in from_onnx.layers]
    assert names[:2] == ["conv", "depthwise"] and names[-1] == "fc"
    fixed = get_workload(str(_export(model, tmp_path / "fixed.onnx", torch.randn(3, 1, 8, 8), dynamic=False)))
    assert fixed.layers == from_onnx.layers  # exported for a batch of 3: still per sample


def test_a_bad_onnx_file_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(InputError, match="junk.onnx'?: not a readable ONNX model"):
        get_workload(str(tmp_path / "junk.onnx"))
    with pytest.raises(InputError, match="file not found"):
        get_workload(str(tmp_path / "none.onnx"))


# --- YAML and CSV ----------------------------------------------------------------------------------

def test_yaml_and_csv_layer_lists_give_the_same_workload(tmp_path: Path) -> None:
    (tmp_path / "net.yaml").write_text(
        "batch_size: 16\noptimizer: adam\nextra_params: {embedding: 100}\nlayers:\n"
        "  - {name: conv1, m: 196, k: 9, n: 16, kind: conv, input_elems: 784}\n"
        "  - {name: attn.scores, m: 49, k: 32, n: 49, groups: 2, weight: false}\n"
        "  - {name: fc, m: 1, k: 1568, n: 10}\n")
    (tmp_path / "net.csv").write_text(
        "name,m,k,n,groups,kind,input_elems,weight\nconv1,196,9,16,,conv,784,\n"
        "attn.scores,49,32,49,2,,,false\nfc,1,1568,10,,,,\n")
    from_yaml, from_csv = get_workload(str(tmp_path / "net.yaml")), get_workload(str(tmp_path / "net.csv"))
    assert from_yaml.layers == from_csv.layers
    assert from_yaml.forward_macs() == 196 * 9 * 16 + 2 * 49 * 32 * 49 + 1568 * 10
    assert from_yaml.params == 9 * 16 + 1568 * 10 + 100 and from_yaml.batch_size == 16
    first, scores = from_yaml.layers[0], from_yaml.layers[1]
    assert not first.needs_input_grad and scores.needs_input_grad and scores.kind == "attention"
    assert get_workload(str(tmp_path / "net.csv"), batch_size=4).batch_size == 4


@pytest.mark.parametrize("name, text, message", [
    ("a.yaml", "layers:\n  - {name: fc, m: 1, k: 4}\n", r"a.yaml:2: layers\[0\]: missing key 'n'"),
    ("b.yaml", "layers:\n  - {name: fc, m: 1, k: 4, n: 2}\n  - {name: x, m: 0, k: 1, n: 1}\n",
     r"b.yaml:3: layers\[1\].m: Input should be greater than or equal to 1"),
    ("c.yaml", "layers:\n  - {name: fc, m: 1, k: 4, n: 2, colour: red}\n",
     r"c.yaml:2: .*unknown key 'colour'"),
    ("d.csv", "name,m,k,n\nfc,1,4,2\nfc2,1,four,2\n", r"d.csv:3: k: Input should be a valid integer"),
    ("e.csv", "name,m,k,n\nfc,1,4,2\nfc,1,4,2\n", r"layer name 'fc' is used twice"),
])
def test_a_bad_layer_file_names_file_and_line(tmp_path: Path, name: str, text: str, message: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(InputError, match=message):
        get_workload(str(tmp_path / name))


# --- the CLI and sweeps ----------------------------------------------------------------------------

MODEL = ("import torch.nn as nn\n\ndef net(shape, classes):\n"
         "    return nn.Sequential(nn.Linear(shape[0], 20), nn.ReLU(), nn.Linear(20, classes))\n")


def test_energy_and_compare_price_each_kind_of_source(tmp_path: Path) -> None:
    (tmp_path / "model.py").write_text(MODEL)
    (tmp_path / "net.csv").write_text("name,m,k,n\nfc1,1,64,20\nfc2,1,20,10\n")
    runner = CliRunner()
    macs = []
    for workload in (f"{tmp_path}/model.py:net", f"{tmp_path}/net.csv"):
        extra = ["--dataset", "digits"] if workload.endswith(":net") else []
        result = runner.invoke(app, ["energy", "-w", workload, "-f", "int8", "--batch-size", "10", *extra])
        assert result.exit_code == 0, result.output
        macs.append(result.stdout.split(" MACs per iteration")[0].split()[-1])
        result = runner.invoke(app, ["compare", "int8", "lns8", "-w", workload, *extra])
        assert result.exit_code == 0, result.output
    # forward and backward-weight of both layers, backward-data of the second: the same for both sources
    assert macs == [f"{10 * (2 * (64 * 20 + 20 * 10) + 20 * 10):.4g}"] * 2
    result = runner.invoke(app, ["energy", "-w", f"{tmp_path}/model.py:net", "-f", "int8"])
    assert result.exit_code == 2 and "--dataset" in result.stderr


def test_a_sweep_prices_user_workloads_of_every_kind(tmp_path: Path) -> None:
    (tmp_path / "model.py").write_text(MODEL)
    (tmp_path / "layers.yaml").write_text("batch_size: 10\nextra_params: {0.bias: 20, 2.bias: 10}\nlayers:\n"
                                          "  - {name: fc1, m: 1, k: 64, n: 20}\n"
                                          "  - {name: fc2, m: 1, k: 20, n: 10}\n")
    text = ("task: {model: model.py:net, dataset: digits, batch_size: 10}\ntrials: [{format: int8}]\n"
            "energy: {workloads: [proxy, layers.yaml, model.py:net, 'llama(blocks=1,width=128)']}\n")
    sweep = parse_config(text, str(tmp_path / "s.yaml"))
    assert sweep.energy.workloads == ("proxy", "layers", "net", "llama(blocks=1,width=128)")
    estimates = EnergyEstimator(sweep.energy).estimate(TrainConfig(**sweep.tasks[0].defaults, format="int8"))
    # the trial's own model (proxy), the same net named as a workload, and its shapes written as YAML
    assert estimates["proxy"] == estimates["net"]
    assert estimates["layers"].total_mj == pytest.approx(estimates["proxy"].total_mj, rel=1e-12)
    assert estimates["llama(blocks=1,width=128)"].total_mj > estimates["proxy"].total_mj


def test_a_sweep_rejects_an_unknown_or_broken_workload_before_running(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("name,m,k\nfc,1,2\n")
    base = "task: {model: mlp, dataset: digits}\ntrials: [{format: int8}]\nenergy: {workloads: [%s]}\n"
    with pytest.raises(InputError, match=r"s.yaml:3: energy.workloads\[0\]: .*bad.csv:2: row: missing key"):
        parse_config(base % "bad.csv", str(tmp_path / "s.yaml"))
    with pytest.raises(InputError, match=r"unknown workload 'resnet19' \(did you mean 'resnet18'\?\)"):
        parse_config(base % "resnet19", str(tmp_path / "s.yaml"))
    with pytest.raises(InputError, match=r"energy.workloads\[0\]: .*missing.py' not found"):
        parse_config(base % "missing.py:net", str(tmp_path / "s.yaml"))


# --- built-in workloads against published or hand-derived figures ----------------------------------

def _palm_forward_macs(non_embedding_params: int, blocks: int, width: int, seq: int) -> int:
    """Forward multiply-adds of a decoder over `seq` tokens: every weight once per token, plus dense
    attention's QK^T and PV, each seq x width per token and block (Chowdhery et al. 2022, PaLM,
    Appendix B: 6N + 12 L H Q T training FLOPs per token, i.e. N + 2 L d T forward MACs)."""
    return seq * (non_embedding_params + 2 * blocks * width * seq)


PUBLISHED = {  # name: (forward GMACs per sample, million parameters, rel. tolerance, source)
    "resnet18": (1.81, 11.7, 0.02, "torchvision model card: 1.81 GFLOPS (multiply-adds), 11.7 M"),
    "resnet50": (4.09, 25.5, 0.02, "torchvision model card: 4.09 GFLOPS, 25.6 M"),
    "mobilenetv2": (0.300, 3.5, 0.01, "Sandler et al. 2018, Table 4: 300 M multiply-adds; torchvision 3.5 M"),
    "vit-b16": (17.6, 86.0, 0.01, "Touvron et al. 2021 (DeiT), Table 1: ViT-B 17.6 GFLOPs, 86 M"),
    "bert-base": (None, 110.0, 0.01, "Devlin et al. 2019: BERT-base 110 M"),
    "gpt2-small": (None, 124.0, 0.01, "Radford et al. 2019: 124 M (117 M without position table)"),
    "llama-7b": (None, 6738.4, 0.001, "Touvron et al. 2023, Table 2: 6.7 B"),
}


def test_every_full_size_workload_has_a_figure() -> None:
    assert {name for name, build in BUILT_IN_WORKLOADS.items() if not build().proxy} == set(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_figures(name: str) -> None:
    gmacs, params_m, tolerance, _ = PUBLISHED[name]
    workload = get_workload(name)
    assert workload.params / 1e6 == pytest.approx(params_m, rel=tolerance)
    if gmacs is not None:
        assert workload.forward_macs() / 1e9 == pytest.approx(gmacs, rel=tolerance)


def test_mobilenet_v2_matches_torchvisions_parameter_count_exactly() -> None:
    # torchvision mobilenet_v2: 3,504,872 parameters (BatchNorms and the classifier's bias included)
    assert get_workload("mobilenetv2").params == 3_504_872


def test_llama_7b_count_and_forward_macs() -> None:
    workload = get_workload("llama-7b")
    assert workload.params == 6_738_415_616  # the released LLaMA-7B checkpoint
    assert llama_ffn_width(4096) == 11008
    non_embedding = workload.params - 32000 * 4096 - (2 * 32 + 1) * 4096  # less token table and RMSNorms
    assert workload.forward_macs() == _palm_forward_macs(non_embedding, 32, 4096, 2048)


def test_bert_base_forward_macs() -> None:
    workload = get_workload("bert-base")
    encoder = 12 * (4 * 768 * 768 + 2 * 768 * 3072)
    heads = 768 * 768 + 768 * 2  # pooler and the 2-class head, on the [CLS] token only
    assert workload.forward_macs() == _palm_forward_macs(encoder, 12, 768, 128) + heads


def test_gpt2_small_forward_macs() -> None:
    workload = get_workload("gpt2-small")
    weights = 12 * (4 * 768 * 768 + 2 * 768 * 3072) + 768 * 50257  # the tied LM head is a GEMM
    assert workload.forward_macs() == _palm_forward_macs(weights, 12, 768, 1024)


def test_a_configured_llama_and_grouped_query_attention() -> None:
    small = get_workload("llama(blocks=2, width=256)")
    assert small.name == "llama(blocks=2,width=256)" and len(small.layers) == 2 * 9 + 1
    assert small.forward_macs() == _palm_forward_macs(2 * (4 * 256 * 256 + 3 * 256 * 768) + 256 * 32000,
                                                      2, 256, 2048)
    grouped = llama(blocks=1, width=512, heads=8, kv_heads=2)
    k_proj = next(g for g in grouped.layers if g.name.endswith("attn.k"))
    assert k_proj.n == 2 * 64
    with pytest.raises(InputError, match="depth=3"):
        get_workload("llama(depth=3)")


PROXIES = {"digits-mlp": ("mlp", "digits"), "digits-cnn": ("cnn", "digits"), "m1d-mlp": ("mlp", "mnist1d"),
           "m1d-cnn": ("cnn", "mnist1d"), "mx5k-mlp": ("mlp", "mnist5k"), "mx5k-cnn": ("cnn", "mnist5k"),
           "sort-transformer": ("transformer", "sort")}


@pytest.mark.parametrize("name", sorted(PROXIES))
def test_proxy_workloads_match_torchs_count_of_the_trained_model(name: str) -> None:
    from dse.data import load_dataset
    from dse.models.proxies import build_model

    model_name, dataset_name = PROXIES[name]
    data = load_dataset(dataset_name)
    model = build_model(model_name, data)
    assert 2 * get_workload(name).forward_macs(3) == _flops(model, data.x_train[:3])


def test_every_proxy_workload_is_counted() -> None:
    assert {name for name, build in BUILT_IN_WORKLOADS.items() if build().proxy} == set(PROXIES)
    assert set(PROXIES) | set(PUBLISHED) <= set(workload_names())


# --- the passes of a training iteration ------------------------------------------------------------

@pytest.mark.parametrize("source", ["resnet18", "bert-base", "mobilenetv2", "encoder"])
def test_training_gemms_are_what_the_energy_model_costs(source: str) -> None:
    from dse.energy import build_model, iteration_energy

    if source == "encoder":
        workload = trace_model(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), torch.randn(2, 5, 16),
                               "encoder", batch_size=8)
    else:
        workload = get_workload(source)
    rows = workload.training_gemms(4)
    frame = iteration_energy(workload, "int8", build_model("45nm"), 4)
    assert sum(row["macs"] for row in rows) == frame.attrs["macs"]
    assert sum(row["params"] for row in rows) == workload.params
    for layer in workload.layers:  # every pass is the forward product's MACs, rearranged
        passes = [row for row in rows if row["layer"] == layer.name and row["pass"] != "update"]
        assert all(row["macs"] == 4 * layer.macs_per_sample for row in passes)
        assert len(passes) == 2 + layer.needs_input_grad


def test_energy_lists_the_gemms_of_each_pass(tmp_path: Path) -> None:
    (tmp_path / "net.csv").write_text("name,m,k,n\nfc1,1,64,20\nfc2,3,20,10\n")
    result = CliRunner().invoke(app, ["energy", "-w", str(tmp_path / "net.csv"), "-f", "int8", "--batch-size",
                                      "2", "--gemms"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if "fc2" in line]
    data = [line for line in lines if "backward_data" in line]
    assert len(data) == 1 and "1 x [3, 10] x [10, 20]" in data[0] and "1,200" in data[0]
    assert not any("fc1" in line and "backward_data" in line for line in result.stdout.splitlines())


@pytest.mark.parametrize("cell, gates", [(nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_recurrent_layers_are_priced_from_the_module(cell: type[nn.RNNBase], gates: int,
                                                     bidirectional: bool) -> None:
    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = cell(8, 16, num_layers=2, batch_first=True, bidirectional=bidirectional)
            self.fc = nn.Linear(16 * (2 if bidirectional else 1), 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.rnn(x)[0])

    model = Tagger()
    workload = trace_model(model, torch.randn(2, 5, 8), "tagger", batch_size=4)
    directions = 2 if bidirectional else 1
    # per time step and direction: the input (8, then 16 x directions) and the hidden state (16) into
    # `gates` x 16 gate pre-activations, in each of the two layers; then the head on each of 5 steps
    per_step = directions * (8 + 16 + 16 * directions + 16) * gates * 16
    assert workload.forward_macs() == 5 * per_step + 5 * 16 * directions * 3
    assert workload.params == sum(p.numel() for p in model.parameters())
    assert set(workload.extra_params) == {name for name, _ in model.named_parameters() if "bias" in name}
    first = {"rnn.weight_ih_l0", "rnn.weight_ih_l0_reverse"}  # both directions read the input itself
    assert workload.layers[0].name == "rnn.weight_ih_l0"
    assert all(layer.needs_input_grad == (layer.name not in first) for layer in workload.layers)


def test_an_lstm_with_a_projection() -> None:
    lstm = nn.LSTM(8, 16, proj_size=4)
    workload = trace_model(lstm, torch.randn(5, 2, 8), "p", batch_size=2)  # (T, B, features)
    assert workload.forward_macs() == 5 * (8 * 64 + 4 * 64 + 16 * 4)
    assert workload.params == sum(p.numel() for p in lstm.parameters())
