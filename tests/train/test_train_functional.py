"""Every GEMM quantized, or named: attention modules, functional GEMMs, per-layer formats, mixed families
(dse/train/functional.py, layers.py quantize_model, policy.py for_layer)."""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dse.errors import InputError
from dse.formats import get
from dse.train.config import TrainConfig
from dse.train.layers import UnconvertedGemmWarning, quantize_model, stored_weights
from dse.train.loop import train
from dse.train.optim import make_optimizer
from dse.train.policy import QuantPolicy, TensorQuant

torch.set_num_threads(1)

INT4, INT5, INT6, INT3 = get("int4"), get("int(5)"), get("int(6)"), get("int(3)")


def distinct_policy(**changes: object) -> QuantPolicy:
    """A different format per GEMM tensor class, so a swapped operand shows up."""
    policy = QuantPolicy(weights=TensorQuant(INT4), activations=TensorQuant(INT5),
                         gradients=TensorQuant(INT6), weight_grads=TensorQuant(INT3),
                         optimizer_state=TensorQuant(None),
                         master_weights=TensorQuant(None))
    return dataclasses.replace(policy, **changes)


def levels(t: torch.Tensor) -> int:
    return int(torch.unique(t).numel())


def quiet_quantize(model: nn.Module, policy: QuantPolicy, example: torch.Tensor | None = None):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning expected
        return quantize_model(model, policy, example_input=example)


# --- nn.MultiheadAttention: its decomposition is torch's, its four GEMMs are quantized ----------------

MHA_CASES = [
    dict(),
    dict(batch_first=True),
    dict(bias=False),
    dict(kdim=6, vdim=5),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True),
]


@pytest.mark.parametrize("options", MHA_CASES)
@pytest.mark.parametrize("call", ["self", "cross", "masks", "per_head_weights", "unbatched"])
def test_unquantized_attention_is_torchs_multihead_attention(options: dict, call: str) -> None:
    torch.manual_seed(0)
    mine = nn.MultiheadAttention(8, 2, **options)
    reference = copy.deepcopy(mine)
    quiet_quantize(mine, QuantPolicy.fp32())
    separate = "kdim" in options
    first = options.get("batch_first", False)
    if call == "unbatched":
        q = torch.randn(4, 8, requires_grad=True)
        k = torch.randn(3, 6 if separate else 8)
        v = torch.randn(3, 5 if separate else 8)
    else:
        shape = (2, 4, 8) if first else (4, 2, 8)
        q = torch.randn(*shape, requires_grad=True)
        k_shape = ((2, 3) if first else (3, 2))
        k = q if call == "self" and not separate else torch.randn(*k_shape, 6 if separate else 8)
        v = k if not separate else torch.randn(*k_shape, 5)
    kwargs: dict = {}
    if call == "masks":
        kwargs["key_padding_mask"] = torch.tensor([[False, False, True], [False, True, False]])
        kwargs["attn_mask"] = torch.tensor([[False, True, False], [True, False, False], [False, False, True],
                                            [False, True, True]])  # every query keeps a key
    if call == "per_head_weights":
        kwargs["average_attn_weights"] = False
    out, weights = mine(q, k, v, **kwargs)
    ref_out, ref_weights = reference(q, k, v, **kwargs)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), [q, mine.out_proj.weight])
    ref_grads = torch.autograd.grad(ref_out.square().sum(), [q, reference.out_proj.weight])
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("need_weights", [False, True])
def test_a_query_with_every_key_masked_behaves_as_in_torch(need_weights: bool) -> None:
    torch.manual_seed(0)
    mine = nn.MultiheadAttention(8, 2)
    reference = copy.deepcopy(mine)
    quiet_quantize(mine, QuantPolicy.fp32())
    q, kv = torch.randn(4, 2, 8), torch.randn(3, 2, 8)
    mask = torch.zeros(4, 3, dtype=torch.bool)
    mask[1] = True
    out, _ = mine(q, kv, kv, attn_mask=mask, need_weights=need_weights)
    ref_out, _ = reference(q, kv, kv, attn_mask=mask, need_weights=need_weights)
    torch.testing.assert_close(out, ref_out, equal_nan=True)  # zeros from SDPA, NaN with the weights
    assert out[1].isnan().all() == need_weights


def test_attention_quantizes_the_operands_of_all_four_gemms() -> None:
    """Bit for bit the attention written out by hand, each GEMM operand rounded onto its format, in
    the layout torch's F.multi_head_attention_forward computes in: sequence-first (L, N, E), heads
    (N * H, L, E / H). A GEMM's last bits depend on its rows' layout (on the AMD EPYC of session 13,
    MKL sums a 3-row product without FMA, a 15-row one with it), and one bit moves a rounded operand
    by a step of its format: a hand-written batch-first projection differed by 0.018 there."""
    torch.manual_seed(1)
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    gemms = quiet_quantize(attn, distinct_policy())
    assert [g.name for g in gemms] == ["in_proj", "scores", "context", "out_proj"]
    x = torch.randn(3, 5, 8)
    out, _ = attn(x, x, x, need_weights=False)
    qa, qw = INT5.quantize, INT4.quantize
    sequence_first = x.transpose(0, 1)
    q, k, v = F.linear(qa(sequence_first), qw(attn.in_proj_weight.detach()),
                       attn.in_proj_bias.detach()).chunk(3, -1)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(5, 3 * 2, 4).transpose(0, 1)

    scores = qa(heads(q)) @ qa(heads(k)).transpose(-2, -1) / math.sqrt(4)
    context = qa(torch.softmax(scores, -1)) @ qa(heads(v))
    rows = context.transpose(0, 1).reshape(5 * 3, 8)
    expected = F.linear(qa(rows), qw(attn.out_proj.weight.detach()), attn.out_proj.bias.detach())
    assert torch.equal(out, expected.reshape(5, 3, 8).transpose(0, 1))


def test_attention_weight_gradients_are_rounded_as_weight_gradients() -> None:
    torch.manual_seed(2)
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    quiet_quantize(attn, distinct_policy())
    x = torch.randn(3, 5, 8, requires_grad=True)
    out, _ = attn(x, x, x)
    out.square().sum().backward()
    for weight in (attn.in_proj_weight, attn.out_proj.weight):
        assert torch.equal(weight.grad, INT3.quantize(weight.grad))  # on int3's grid
        assert levels(weight.grad) <= 7
    assert levels(x.grad) > 7  # x's gradient sums three GEMMs' backward-data outputs: not one grid


@pytest.mark.parametrize("layer_type", ["encoder", "decoder"])
def test_transformer_layers_train_quantized_and_evaluate_quantized(layer_type: str) -> None:
    torch.manual_seed(3)
    if layer_type == "encoder":
        model = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)

        def forward(x: torch.Tensor) -> torch.Tensor:
            return model(x)
    else:
        model = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        memory = torch.randn(4, 3, 16)

        def forward(x: torch.Tensor) -> torch.Tensor:
            return model(x, memory)
    reference = copy.deepcopy(model)
    x, target = torch.randn(4, 5, 16), torch.randn(4, 5, 16)
    example = x if layer_type == "encoder" else (x, memory)
    gemms = quiet_quantize(model, QuantPolicy.from_config(TrainConfig(format="fp8_e4m3")), example)
    attention = 2 if layer_type == "decoder" else 1
    assert len(gemms) == 4 * attention + 2 and all(g.quantized for g in gemms)
    assert not torch.allclose(forward(x), reference(x) if layer_type == "encoder" else reference(x, memory))
    optimizer = make_optimizer("sgd", model, QuantPolicy.from_config(TrainConfig(format="fp8_e4m3")), 0.05,
                               0.9, 0.0)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(forward(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]
    # evaluation (no grad) stays quantized: torch's fused fast path would skip the quantized GEMMs
    training_out = forward(x).detach()
    model.eval()
    with torch.no_grad():
        assert torch.equal(forward(x), training_out)


def test_rules_reach_the_gemms_of_attention() -> None:
    torch.manual_seed(4)
    model = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    config = TrainConfig(format="int4", layers=[{"match": "self_attn.*", "format": "fp32"},
                                                {"match": "type:Linear", "weights": "int8"}])
    gemms = {g.name: g for g in quiet_quantize(model, QuantPolicy.from_config(config), torch.randn(2, 3, 16))}
    parts = ("in_proj", "scores", "context", "out_proj")
    assert not any(gemms[f"self_attn.{part}"].quantized for part in parts)
    assert gemms["linear1"].formats.weights == "int8" and gemms["linear1"].formats.activations == "int4"


# --- functional GEMMs in a user's forward ---------------------------------------------------------


class Functional(nn.Module):
    """GEMMs written as functions: F.linear, @ with a parameter, bmm, conv2d with 'same' padding."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(3, 1, 3, 3) * 0.3)
        self.proj = nn.Parameter(torch.randn(6, 12) * 0.3)
        self.mix = nn.Parameter(torch.randn(6, 4) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, self.kernel, padding="same").flatten(2)  # (N, 3, 16)
        h = F.linear(h[..., :12], self.proj)  # (N, 3, 6)
        h = torch.bmm(h, h.transpose(1, 2))  # (N, 3, 3): activation x activation
        return (h.flatten(1)[:, :6] @ self.mix).relu()


def test_functional_gemms_are_found_named_and_quantized() -> None:
    torch.manual_seed(5)
    model = Functional()
    x = torch.randn(2, 1, 4, 4)
    plain = model(x)
    gemms = quiet_quantize(model, distinct_policy(), x)
    assert [g.name for g in gemms] == ["kernel", "proj", "bmm0", "mix"]
    qa, qw = INT5.quantize, INT4.quantize
    h = F.conv2d(qa(x), qw(model.kernel.detach()), padding=1).flatten(2)
    h = F.linear(qa(h[..., :12]), qw(model.proj.detach()))
    h = qa(h) @ qa(h.transpose(1, 2))
    expected = (qa(h.flatten(1)[:, :6]) @ qw(model.mix.detach())).relu()
    out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, plain)
    out.square().sum().backward()
    for weight in (model.kernel, model.proj, model.mix):
        assert torch.equal(weight.grad, INT3.quantize(weight.grad))


def test_functional_gemms_are_found_as_they_run_without_an_example() -> None:
    torch.manual_seed(6)
    model = Functional()
    x = torch.randn(2, 1, 4, 4)
    reference = copy.deepcopy(model)
    quiet_quantize(reference, distinct_policy(), x)
    assert quiet_quantize(model, distinct_policy()) == []  # nothing known before the first forward
    assert torch.equal(model(x), reference(x))


def test_finding_gemms_leaves_buffers_and_random_state_as_they_were() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 4)
    state = torch.get_rng_state()
    quiet_quantize(model, distinct_policy(), x)
    assert torch.equal(torch.get_rng_state(), state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_gemms_it_cannot_convert_are_named_in_warnings() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(4, 4, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, _ = self.rnn(x)
            h = torch.einsum("nld,nmd->nlm", h, h).sum(-1, keepdim=True) * h
            return self.head(h)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gemms = quantize_model(Mixed(), distinct_policy(), example_input=torch.randn(2, 3, 4))
    messages = sorted(str(w.message) for w in caught if w.category is UnconvertedGemmWarning)
    assert [g.name for g in gemms] == ["head"]
    assert len(messages) == 2
    assert messages[0].startswith("model (Mixed): torch.einsum stays fp32")
    assert messages[1].startswith("rnn (LSTM): its GEMMs stay fp32")


# --- per-layer formats and mixed families in training ---------------------------------------------


def test_each_layer_stores_its_weights_in_its_own_format_without_a_master_copy() -> None:
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    config = TrainConfig(format="int8", master_weights=False, layers=[{"match": "2", "weights": "int(3)"}])
    policy = QuantPolicy.from_config(config)
    quiet_quantize(model, policy, torch.randn(2, 16))
    assert {id(p): q.format.spec for p, q in stored_weights(model)} == {
        id(model[0].weight): "int8", id(model[2].weight): get("int(3)").spec}
    optimizer = make_optimizer("sgd", model, policy, 0.1, 0.9, 0.0)
    F.cross_entropy(model(torch.randn(8, 16)), torch.randint(0, 4, (8,))).backward()
    optimizer.step()
    assert levels(model[2].weight) <= 7 < levels(model[0].weight)


@pytest.mark.parametrize(("weights", "activations"), [("int4", "fp8_e4m3"), ("lns8", "fp8_e4m3")])
def test_mixed_families_in_one_gemm_round_each_operand_onto_its_own_grid(weights: str,
                                                                          activations: str) -> None:
    torch.manual_seed(9)
    layer = nn.Linear(12, 5)
    policy = QuantPolicy.from_config(TrainConfig(weights=weights, activations=activations))
    quiet_quantize(layer, policy)
    x = torch.randn(7, 12)
    qx, qw = get(activations).quantize(x), get(weights).quantize(layer.weight.detach())
    expected = F.linear(qx, qw, layer.bias)
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize(("weights", "activations"), [("int4", "fp8_e4m3"), ("lns8", "fp8_e4m3")])
def test_mixed_families_train(weights: str, activations: str) -> None:
    result = train(TrainConfig(weights=weights, activations=activations, gradients="fp8_e5m2", epochs=2))
    assert not result.diverged and result.test_accuracy > 0.8  # digits: 10 classes


def test_train_reports_every_gemm_with_its_layer_formats() -> None:
    seen: dict = {}
    config = TrainConfig(format="int8", epochs=1, layers=[{"match": "3", "format": "fp32"}])
    train(config, on_gemms=lambda gemms, unconverted: seen.update(gemms=gemms, unconverted=unconverted))
    assert [(g.name, g.quantized) for g in seen["gemms"]] == [("1", True), ("3", False)]
    assert seen["unconverted"] == []
    problem = r"layer rule \{match: 'head'\} matches no GEMM layer \(layers: 1, 3\)"
    with pytest.raises(InputError, match=problem):
        train(config.replace(layers=[{"match": "head", "format": "fp32"}]))


class Attention(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.randn(q.shape[-2], k.shape[-2]),
                                                scale=0.3)
        return causal + masked


def test_scaled_dot_product_attention_is_torchs_and_its_gemms_are_named() -> None:
    torch.manual_seed(10)
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    torch.manual_seed(11)
    reference = Attention()(q, k, v)
    model = Attention()
    gemms = quiet_quantize(model, QuantPolicy.fp32(), (q, k, v))
    assert [g.name for g in gemms] == ["sdpa0.scores", "sdpa0.context", "sdpa1.scores", "sdpa1.context"]
    torch.manual_seed(11)
    torch.testing.assert_close(model(q, k, v), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_attention_and_functional_gemms_on_cuda_match_the_cpu() -> None:
    torch.manual_seed(12)
    cpu = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    cuda = copy.deepcopy(cpu).cuda()
    policy = QuantPolicy.from_config(TrainConfig(format="fp8_e4m3"))
    x = torch.randn(3, 5, 16)
    quiet_quantize(cpu, policy, x)
    quiet_quantize(cuda, policy, x.cuda())
    torch.testing.assert_close(cuda(x.cuda()).cpu(), cpu(x), rtol=1e-4, atol=1e-4)
    model = Functional()
    on_gpu = copy.deepcopy(model).cuda()
    example = torch.randn(2, 1, 4, 4)
    quiet_quantize(model, distinct_policy(), example)
    quiet_quantize(on_gpu, distinct_policy(), example.cuda())
    torch.testing.assert_close(on_gpu(example.cuda()).cpu(), model(example), rtol=1e-4, atol=1e-4)


class Branch(nn.Module):
    """A GEMM written as `@` (so the example forward finds a functional GEMM and the mode is installed),
    then a GEMM against a parameter and an unconvertible einsum that only a batch of more than two
    samples reaches (the example forward runs on two)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Parameter(torch.randn(6, 6))
        self.extra = nn.Parameter(torch.randn(6, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.first
        if x.shape[0] > 2:
            y = y @ self.extra + torch.einsum("bi,ij->bj", y, self.extra)
        return y


def test_a_gemm_the_example_forward_missed_joins_the_returned_list_when_it_first_runs() -> None:
    model = Branch()
    gemms = quantize_model(model, QuantPolicy.from_config(TrainConfig(format="int8")),
                           example_input=torch.randn(2, 6))
    assert [g.name for g in gemms] == ["first"] and gemms.unconverted == []
    x = torch.randn(4, 6)
    with pytest.warns(UnconvertedGemmWarning, match=r"torch\.einsum stays fp32"):
        out = model(x)
    assert [(g.name, g.kind, g.quantized) for g in gemms] == [("first", "matmul", True),
                                                              ("extra", "matmul", True)]
    assert gemms[1].formats is not None and gemms[1].formats.weights == "int8"
    assert len(gemms.unconverted) == 1 and "einsum" in gemms.unconverted[0]
    int8 = get("int8")
    with torch.no_grad():  # both ran quantized: int8 activations x int8 weights
        y = int8.quantize(x) @ int8.quantize(model.first)
        expected = int8.quantize(y) @ int8.quantize(model.extra) + torch.einsum("bi,ij->bj", y, model.extra)
    assert torch.equal(out.detach(), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # seen before: no second warning, no second entry
        model(x)
    assert [g.name for g in gemms] == ["first", "extra"] and len(gemms.unconverted) == 1


BRANCH_MODEL = '''
import torch
from torch import nn


def branch(sample_shape, num_classes):
    return Branch(int(torch.tensor(sample_shape).prod()), num_classes)


class Branch(nn.Module):
    """A head GEMM only a batch of more than two samples runs (dse's example forward has two)."""

    def __init__(self, d_in, classes):
        super().__init__()
        self.w = nn.Parameter(torch.randn(classes, d_in) * 0.1)
        self.late = nn.Parameter(torch.eye(classes))

    def forward(self, x):
        y = nn.functional.linear(x.flatten(1), self.w)
        return y @ self.late if x.shape[0] > 2 else y
'''


def test_dse_train_verbose_prints_the_gemms_first_run_during_training(tmp_path) -> None:
    from typer.testing import CliRunner

    from dse.cli import app

    (tmp_path / "branch.py").write_text(BRANCH_MODEL, encoding="utf-8")
    model = f"{tmp_path / 'branch.py'}:branch"
    outcome = CliRunner().invoke(app, ["train", "--model", model, "--format", "int8", "--epochs", "1",
                                       "--verbose"])
    assert outcome.exit_code == 0, outcome.output
    before, after = outcome.stderr.split("GEMMs first run during training")
    assert "GEMMs (1 of 1 quantized):" in before and "w (F.linear): W=int8" in before and "late" not in before
    assert after.startswith(" (1 more; 2 of 2 quantized in all):")
    assert "late (matmul): W=int8 A=int8 G=int8 dW=int8" in after


@pytest.mark.parametrize("form", ["reentrant", "non-reentrant"])
def test_a_checkpointed_functional_gemm_is_recomputed_quantized_as_in_its_forward(form: str) -> None:
    """A block with F.linear on a parameter under torch.utils.checkpoint, alone (`dse train`): the
    recomputation in the backward runs under the functional-GEMM mode of its forward, so the gradients
    are the network's without checkpointing, bit for bit (int8, nearest rounding). Measured before
    (torch 2.13): non-reentrant raised CheckpointError (a quantized GEMM's saved tensors against
    F.linear's), reentrant computed the block's gradients through an unquantized F.linear."""
    from support.user_models import Checkpointed

    policy = QuantPolicy.from_config(TrainConfig(model="mlp", dataset="digits", format="int8"))
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(0)) * 3
    grads = []
    for variant in (form, "plain"):
        torch.manual_seed(0)
        net = Checkpointed(64, 10, variant)
        quantize_model(net, policy, example_input=x[:2])
        (net(x) * torch.linspace(-1, 1, 10)).sum().backward()
        grads.append({name: p.grad for name, p in net.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_a_model_calling_itself_quantizes_as_its_forward_unrolled() -> None:
    """A model whose forward calls the model itself (its hooks run again inside its forward; the mode
    keeps one copy of itself on the stack and its module stack): outputs and gradients equal those of
    the same forward with the inner calls made without the model's hooks (its `forward` called)."""
    from support.user_models import SelfCalling

    policy = QuantPolicy.from_config(TrainConfig(model="mlp", dataset="digits", format="int8"))
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(0)) * 3
    results = []
    for unrolled in (False, True):
        torch.manual_seed(0)
        net = SelfCalling(64, 10, unrolled)
        quantize_model(net, policy, example_input=x[:2])
        out = net(x)
        out.sum().backward()
        results.append((out.detach(), {name: p.grad for name, p in net.named_parameters()}))
    assert torch.equal(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        assert torch.equal(grad, results[1][1][name]), name
