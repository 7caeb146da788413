"""Layer shapes of training workloads, for the energy model (no torch: shapes only).

Every layer that does the multiply-accumulate work is a GEMM: per sample, `groups` products of
[m, k] x [k, n] (a convolution as im2col: m output positions, k = (c_in / groups) * kernel area,
n = c_out / groups; attention scores: one group per head). Elementwise layers (normalisation,
activations, softmax, pooling, bias adds) are not modelled. Parameters that are no GEMM's weight
(biases, normalisation scales and shifts, embedding tables) are listed separately, in `extra_params`,
so the optimizer still updates them (as training does, in fp32: dse/energy/iteration.py).

Full-size workloads: resnet18, resnet50, mobilenetv2, vit-b16 (ImageNet 224x224), bert-base (sequence
128), gpt2-small (sequence 1024), llama-7b (sequence 2048; `llama(blocks=N,width=D)` for other sizes).
Proxies: the small models the sweep trains. More can be added with `register_workload(name, builder)`;
`get_workload` also reads a user's network: an ONNX file, a YAML/CSV list of GEMM shapes, or a model
function (`file.py:function`) traced on a dataset.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dse.errors import InputError, number_problem
from dse.usercode import is_ref


class UnpricedWarning(UserWarning):
    """Part of a user's network that the energy model leaves unpriced (a kernel the tracer cannot take
    apart, an ONNX node it does not read): named, never a silent gap; the CLI prints it as one line."""


@dataclass(frozen=True)
class GemmLayer:
    """One GEMM-shaped layer, per sample: `groups` products of [m, k] x [k, n]."""

    name: str
    m: int
    k: int
    n: int
    groups: int = 1
    input_elems: int | None = None
    """True size of the first operand per sample (a conv input is smaller than its im2col view)."""
    b_is_weight: bool = True
    """False for activation x activation products (attention), whose second operand is per sample."""
    needs_input_grad: bool = True
    """False for the first layer: nothing upstream needs the gradient of its input."""
    kind: str = "linear"
    needs_weight_grad: bool = True
    """False where torch's autograd computes no gradient of the second operand, so no backward-weight GEMM
    runs: a frozen weight (requires_grad=False), which the optimizer then leaves alone too (no update, no
    state), or a product of two activations whose second needs none (both come from the model's input)."""
    repeated_weight: bool = False
    """True where the weight is an earlier layer's (a layer applied again, a tied weight): read again by
    this GEMM, but stored, updated and given optimizer state once, with the layer that first used it."""
    recomputed: bool = False
    """True where training runs the forward GEMM again in the backward (a layer inside a block that
    torch.utils.checkpoint checkpoints): it is priced once more, as pass `recompute`."""
    needs_bias_grad: bool = False
    """True where the layer's own bias trains: its backward then runs and quantizes the incoming error
    for the bias's gradient even where it runs neither backward GEMM (a frozen first layer)."""

    @property
    def trained_params(self) -> int:
        """The weights the optimizer updates: a frozen weight is stored but never updated."""
        return self.params if self.needs_weight_grad else 0

    def __post_init__(self) -> None:
        for name in ("m", "k", "n", "groups"):
            if getattr(self, name) < 1:
                raise InputError(f"layer {self.name!r}: {name} must be >= 1")

    @property
    def macs_per_sample(self) -> int:
        return self.groups * self.m * self.k * self.n

    @property
    def a_elems(self) -> int:
        return self.input_elems if self.input_elems is not None else self.groups * self.m * self.k

    @property
    def b_elems(self) -> int:
        """Weights (shared by the batch) or, for attention, the second operand per sample."""
        return self.groups * self.k * self.n

    @property
    def out_elems(self) -> int:
        return self.groups * self.m * self.n

    @property
    def params(self) -> int:
        """The weights this layer stores and updates (none where they are an earlier layer's)."""
        return self.b_elems if self.b_is_weight and not self.repeated_weight else 0

    def training_gemms(self) -> tuple[tuple[str, int, int, int], ...]:
        """The GEMMs one training step runs for this layer, per sample, as (pass, m, k, n), each done
        `groups` times: forward A [m,k] x B [k,n] (and once more, `recompute`, where it is
        checkpointed); backward_data dA = dOut [m,n] x B^T [n,k] (only
        when the input needs its gradient); backward_weight dB = A^T [k,m] x dOut [m,n] (the weight
        gradient, summed over the batch; for a product of two activations, the second one's gradient,
        only when it needs one). The energy model costs exactly these (dse.energy.iteration)."""
        gemms = [("forward", self.m, self.k, self.n)]
        if self.recomputed:
            gemms.append(("recompute", self.m, self.k, self.n))
        if self.needs_input_grad:
            gemms.append(("backward_data", self.m, self.n, self.k))
        if self.needs_weight_grad:
            gemms.append(("backward_weight", self.k, self.m, self.n))
        return tuple(gemms)


@dataclass(frozen=True)
class Workload:
    name: str
    layers: tuple[GemmLayer, ...]
    batch_size: int
    optimizer: str = "sgd"
    extra_params: dict[str, int] = field(default_factory=dict)
    description: str = ""
    proxy: bool = False
    embeddings: tuple[str, ...] = ()
    """The extra_params that are embedding tables (looked up by index, never a GEMM operand): fp32 like
    every other extra parameter, except under NITI, which trains them as integer tables."""
    frozen: tuple[str, ...] = ()
    """The extra_params training leaves as initialised (requires_grad=False): stored, never updated."""
    fp32_layers: tuple[str, ...] = ()
    """The layers a trained network computes in fp32 whatever a trial's formats: the GEMMs a traced model
    ran inside a module or function training cannot quantize (models.trace.LeftFp32)."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.embeddings) - set(self.extra_params))
        unknown += sorted(set(self.frozen) - set(self.extra_params))
        if unknown:
            raise InputError(f"workload {self.name!r}: {', '.join(map(repr, unknown))} named as an embedding "
                             f"or frozen but not in extra_params")
        strange = sorted(set(self.fp32_layers) - {layer.name for layer in self.layers})
        if strange:
            raise InputError(f"workload {self.name!r}: {', '.join(map(repr, strange))} named as fp32 but not "
                             f"a layer")

    def forward_macs(self, batch_size: int = 1) -> int:
        return batch_size * sum(layer.macs_per_sample for layer in self.layers)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers) + sum(self.extra_params.values())

    def training_gemms(self, batch_size: int | None = None) -> list[dict[str, Any]]:
        """One row per GEMM of a training iteration at `batch_size` (default the workload's): layer,
        pass, m, k, n, groups (per sample) and macs (the whole batch); then one `update` row per
        parameter tensor with its parameter count (what the optimizer step touches)."""
        batch = self.batch_size if batch_size is None else batch_size
        rows: list[dict[str, Any]] = []
        for layer in self.layers:
            for name, m, k, n in layer.training_gemms():
                rows.append({"layer": layer.name, "pass": name, "m": m, "k": k, "n": n,
                             "groups": layer.groups, "macs": batch * layer.groups * m * k * n, "params": 0})
        updates = [(layer.name, layer.trained_params) for layer in self.layers if layer.trained_params]
        extra = [(name, count) for name, count in self.extra_params.items() if name not in self.frozen]
        for name, count in [*updates, *extra]:
            rows.append({"layer": name, "pass": "update", "m": 0, "k": 0, "n": 0, "groups": 0, "macs": 0,
                         "params": count})
        return rows


# --- layer constructors --------------------------------------------------------------------------

def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def conv2d(name: str, c_in: int, c_out: int, kernel: int, h: int, w: int, stride: int = 1,
           padding: int | None = None, groups: int = 1, first: bool = False) -> tuple[GemmLayer, int, int]:
    """A 2-D convolution on an h x w input; returns the layer and the output size."""
    pad = kernel // 2 if padding is None else padding
    h_out, w_out = _out_size(h, kernel, stride, pad), _out_size(w, kernel, stride, pad)
    layer = GemmLayer(name, m=h_out * w_out, k=(c_in // groups) * kernel * kernel, n=c_out // groups,
                      groups=groups, input_elems=c_in * h * w, needs_input_grad=not first, kind="conv")
    return layer, h_out, w_out


def conv1d(name: str, c_in: int, c_out: int, kernel: int, length: int, stride: int = 1,
           padding: int | None = None, first: bool = False) -> tuple[GemmLayer, int]:
    pad = kernel // 2 if padding is None else padding
    out = _out_size(length, kernel, stride, pad)
    layer = GemmLayer(name, m=out, k=c_in * kernel, n=c_out, input_elems=c_in * length,
                      needs_input_grad=not first, kind="conv")
    return layer, out


def linear(name: str, d_in: int, d_out: int, tokens: int = 1, first: bool = False) -> GemmLayer:
    """A fully connected layer applied to `tokens` positions per sample."""
    return GemmLayer(name, m=tokens, k=d_in, n=d_out, needs_input_grad=not first, kind="linear")


def attention(name: str, seq: int, heads: int, d_head: int) -> list[GemmLayer]:
    """Scores Q K^T and context P V of multi-head attention (dense, no causal saving)."""
    shared: dict[str, Any] = {"groups": heads, "b_is_weight": False, "kind": "attention"}
    return [GemmLayer(f"{name}.scores", m=seq, k=d_head, n=seq, **shared),
            GemmLayer(f"{name}.context", m=seq, k=seq, n=d_head, **shared)]


def layer_name_of(param_name: str) -> str:
    """The GEMM layer a weight parameter names: `fc.weight` -> `fc`, `attn.in_proj_weight` -> `attn.in_proj`
    (tracing and ONNX name weight GEMMs alike, so per-layer rules see the module names)."""
    for suffix in (".weight", "_weight"):
        if param_name.endswith(suffix):
            return param_name[: -len(suffix)]
    return param_name


def unique_names(layers: list[GemmLayer]) -> list[GemmLayer]:
    """A name used again (a module called twice, an exporter's repeated node path) gets #2, #3, ..."""
    seen: dict[str, int] = {}
    out = []
    for layer in layers:
        seen[layer.name] = seen.get(layer.name, 0) + 1
        count = seen[layer.name]
        out.append(layer if count == 1 else dataclasses.replace(layer, name=f"{layer.name}#{count}"))
    return out


def matmul(name: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...], samples: int, a_is_weight: bool,
           b_is_weight: bool, needs_input_grad: bool, needs_weight_grad: bool = True) -> GemmLayer:
    """The per-sample GEMM of a broadcasting matmul of shapes a (..., M, K) and b (..., K, N), run on
    `samples` samples (torch.matmul and ONNX MatMul semantics; a 1-D operand is a vector).

    A 2-D weight operand is shared by every row of the other, so those rows fold into m (a weight on
    the left is the transposed product). Otherwise the broadcast batch dimensions, less the samples,
    are the groups: attention's heads.
    """
    a = (1, *a_shape) if len(a_shape) == 1 else tuple(a_shape)
    b = (*b_shape, 1) if len(b_shape) == 1 else tuple(b_shape)
    rows_a, k, n = math.prod(a[:-1]), a[-1], b[-1]
    if b_is_weight and len(b) <= 2:
        return GemmLayer(name, m=max(1, rows_a // samples), k=k, n=n, needs_input_grad=needs_input_grad,
                         needs_weight_grad=needs_weight_grad)
    if a_is_weight and len(a) <= 2 and not b_is_weight:
        columns = math.prod(b[:-2]) * n
        return GemmLayer(name, m=max(1, columns // samples), k=k, n=a[-2], needs_input_grad=needs_input_grad,
                         needs_weight_grad=needs_weight_grad)
    batch = max(math.prod(a[:-2]), math.prod(b[:-2]))  # the broadcast batch (one side broadcasts)
    m = a[-2]
    if batch == 1 and m % samples == 0:
        m //= samples  # a 2-D product over the whole batch: its rows are the samples
        groups = 1
    else:
        groups = max(1, batch // samples)
    return GemmLayer(name, m=m, k=k, n=n, groups=groups, b_is_weight=b_is_weight,
                     needs_input_grad=needs_input_grad, needs_weight_grad=needs_weight_grad,
                     kind="linear" if b_is_weight else "attention")


def biases(layers: list[GemmLayer]) -> dict[str, int]:
    """The bias of each weight layer (one per output channel or feature), named `<layer>.bias`."""
    return {f"{layer.name}.bias": layer.groups * layer.n for layer in layers if layer.b_is_weight}


def norms(names: list[str], width: int) -> dict[str, int]:
    """LayerNorm / BatchNorm parameters (a scale and a shift per channel) of each name."""
    return {name: 2 * width for name in names}


def mlp(sizes: list[int]) -> list[GemmLayer]:
    return [linear(f"fc{i + 1}", d_in, d_out, first=i == 0)
            for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=False))]


def transformer_layers(n_layers: int, d_model: int, heads: int, d_ff: int, seq: int,
                       prefix: str = "layer") -> list[GemmLayer]:
    layers: list[GemmLayer] = []
    for i in range(n_layers):
        p = f"{prefix}{i}"
        layers.append(linear(f"{p}.attn.qkv", d_model, 3 * d_model, tokens=seq))
        layers += attention(f"{p}.attn", seq, heads, d_model // heads)
        layers.append(linear(f"{p}.attn.out", d_model, d_model, tokens=seq))
        layers.append(linear(f"{p}.ffn.in", d_model, d_ff, tokens=seq))
        layers.append(linear(f"{p}.ffn.out", d_ff, d_model, tokens=seq))
    return layers


# --- full-size workloads -------------------------------------------------------------------------

def _resnet(name: str, blocks: list[int], bottleneck: bool, classes: int = 1000, size: int = 224) -> Workload:
    """torchvision ResNet (v1.5: the stride sits on the 3x3 convolution of a bottleneck)."""
    layers: list[GemmLayer] = []
    conv, h, w = conv2d("conv1", 3, 64, 7, size, size, stride=2, padding=3, first=True)
    layers.append(conv)
    h, w = _out_size(h, 3, 2, 1), _out_size(w, 3, 2, 1)  # max pool
    c_in = 64
    expansion = 4 if bottleneck else 1
    for stage, (count, width) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True)):
        for block in range(count):
            stride = 2 if stage > 0 and block == 0 else 1
            p = f"layer{stage + 1}.{block}"
            c_out = width * expansion
            if bottleneck:
                a, _, _ = conv2d(f"{p}.conv1", c_in, width, 1, h, w)
                b, h2, w2 = conv2d(f"{p}.conv2", width, width, 3, h, w, stride=stride)
                c, _, _ = conv2d(f"{p}.conv3", width, c_out, 1, h2, w2)
                layers += [a, b, c]
            else:
                a, h2, w2 = conv2d(f"{p}.conv1", c_in, width, 3, h, w, stride=stride)
                b, _, _ = conv2d(f"{p}.conv2", width, width, 3, h2, w2)
                layers += [a, b]
            if stride != 1 or c_in != c_out:
                down, _, _ = conv2d(f"{p}.downsample", c_in, c_out, 1, h, w, stride=stride, padding=0)
                layers.append(down)
            c_in, h, w = c_out, h2, w2
    layers.append(linear("fc", c_in, classes))
    batch_norms = {f"{layer.name}.bn": 2 * layer.groups * layer.n for layer in layers if layer.kind == "conv"}
    return Workload(name, tuple(layers), batch_size=32, optimizer="sgd",
                    extra_params=batch_norms | biases(layers[-1:]),
                    description=f"{name}, ImageNet {size}x{size}, batch 32")


def resnet18() -> Workload:
    return _resnet("resnet18", [2, 2, 2, 2], bottleneck=False)


def resnet50() -> Workload:
    return _resnet("resnet50", [3, 4, 6, 3], bottleneck=True)


def bert_base(seq: int = 128) -> Workload:
    """BERT-base encoder (12 x 768, 12 heads, FFN 3072), pooler and a 2-class head."""
    layers = transformer_layers(12, 768, 12, 3072, seq)
    layers += [linear("pooler", 768, 768), linear("classifier", 768, 2)]
    embeddings = {"embeddings.word": 30522 * 768, "embeddings.position": 512 * 768,
                  "embeddings.type": 2 * 768}
    layer_norms = norms(["embeddings.norm", *(f"layer{i}.norm{j}" for i in range(12) for j in (1, 2))], 768)
    extra = embeddings | layer_norms | biases(layers)
    return Workload("bert-base", tuple(layers), batch_size=32, optimizer="adam", extra_params=extra,
                    embeddings=tuple(embeddings),
                    description=f"BERT-base, sequence {seq}, batch 32")


def gpt2_small(seq: int = 1024) -> Workload:
    """GPT-2 small (124M): 12 x 768, 12 heads, FFN 3072; the LM head shares the token embedding."""
    layers = transformer_layers(12, 768, 12, 3072, seq, prefix="h")
    extra = {"wpe": 1024 * 768} | norms([*(f"h{i}.ln_{j}" for i in range(12) for j in (1, 2)), "ln_f"], 768)
    extra |= biases(layers)  # the LM head (the token embedding, tied) has none
    layers.append(linear("lm_head", 768, 50257, tokens=seq))
    return Workload("gpt2-small", tuple(layers), batch_size=8, optimizer="adam", extra_params=extra,
                    embeddings=("wpe",),
                    description=f"GPT-2 small decoder, sequence {seq}, batch 8 (dense attention)")


def vit_b16(size: int = 224, classes: int = 1000) -> Workload:
    """ViT-B/16 (Dosovitskiy et al. 2021): 16x16 patches as a stride-16 convolution, a class token,
    12 x 768 pre-LN layers (12 heads, MLP 3072), the head on the class token."""
    patch, h, w = conv2d("patch_embed", 3, 768, 16, size, size, stride=16, padding=0, first=True)
    tokens = h * w + 1
    layers = [patch, *transformer_layers(12, 768, 12, 3072, tokens, prefix="blocks."),
              linear("head", 768, classes)]
    layer_norms = norms([*(f"blocks.{i}.norm{j}" for i in range(12) for j in (1, 2)), "norm"], 768)
    extra = {"cls_token": 768, "pos_embed": tokens * 768, **layer_norms, **biases(layers)}
    return Workload("vit-b16", tuple(layers), batch_size=32, optimizer="adam", extra_params=extra,
                    description=f"ViT-B/16, ImageNet {size}x{size} ({tokens} tokens), batch 32")


MOBILENET_V2_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1))
"""(expansion t, channels c, repeats n, first stride s) of Sandler et al. 2018, Table 2."""


def mobilenet_v2(size: int = 224, classes: int = 1000) -> Workload:
    """MobileNetV2 1.0 (Sandler et al. 2018; torchvision's layout): inverted residual blocks of a 1x1
    expansion, a 3x3 depthwise convolution (one group per channel) and a 1x1 projection."""
    conv, h, w = conv2d("features.0", 3, 32, 3, size, size, stride=2, first=True)
    layers = [conv]
    batch_norms = {"features.0.bn": 2 * 32}
    c_in, index = 32, 1
    for t, c, n, s in MOBILENET_V2_BLOCKS:
        for repeat in range(n):
            stride = s if repeat == 0 else 1
            hidden, p = c_in * t, f"features.{index}"
            if t != 1:
                expand, _, _ = conv2d(f"{p}.expand", c_in, hidden, 1, h, w, padding=0)
                layers.append(expand)
                batch_norms[f"{p}.expand.bn"] = 2 * hidden
            depthwise, h, w = conv2d(f"{p}.depthwise", hidden, hidden, 3, h, w, stride=stride, groups=hidden)
            project, _, _ = conv2d(f"{p}.project", hidden, c, 1, h, w, padding=0)
            layers += [depthwise, project]
            batch_norms |= {f"{p}.depthwise.bn": 2 * hidden, f"{p}.project.bn": 2 * c}
            c_in, index = c, index + 1
    last, h, w = conv2d(f"features.{index}", c_in, 1280, 1, h, w, padding=0)
    batch_norms[f"features.{index}.bn"] = 2 * 1280
    layers += [last, linear("classifier", 1280, classes)]
    return Workload("mobilenetv2", tuple(layers), batch_size=32, optimizer="sgd",
                    extra_params=batch_norms | biases(layers[-1:]),
                    description=f"MobileNetV2 1.0, ImageNet {size}x{size}, batch 32")


def llama_ffn_width(width: int, multiple_of: int = 256) -> int:
    """The SwiGLU hidden width of Llama's reference code: 2/3 of 4 x width, rounded up to a multiple."""
    hidden = int(2 * 4 * width / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def llama(blocks: int = 32, width: int = 4096, heads: int | None = None, ffn: int | None = None,
          kv_heads: int | None = None, vocab: int = 32000, seq: int = 2048, batch_size: int = 4,
          name: str | None = None) -> Workload:
    """A Llama-style decoder; the defaults are LLaMA-7B (Touvron et al. 2023, Table 2: 32 layers of
    4096, 32 heads, sequence 2048, vocabulary 32k). Pre-RMSNorm blocks of attention (q, k, v, o
    projections without bias; `kv_heads` below `heads` for grouped-query attention) and a SwiGLU MLP
    (gate, up, down), an untied output head. Heads default to width / 128 and the MLP to Llama's rule
    (llama_ffn_width). Attention is dense (no causal saving), as for the other workloads."""
    heads = heads or max(1, width // 128)
    if width % heads:
        raise InputError(f"llama: width {width} is not a multiple of heads {heads}")
    kv_heads = kv_heads or heads
    ffn = ffn or llama_ffn_width(width)
    d_head = width // heads
    layers: list[GemmLayer] = []
    for i in range(blocks):
        p = f"layers.{i}"
        layers += [linear(f"{p}.attn.q", width, width, tokens=seq),
                   linear(f"{p}.attn.k", width, kv_heads * d_head, tokens=seq),
                   linear(f"{p}.attn.v", width, kv_heads * d_head, tokens=seq),
                   *attention(f"{p}.attn", seq, heads, d_head),
                   linear(f"{p}.attn.o", width, width, tokens=seq),
                   linear(f"{p}.mlp.gate", width, ffn, tokens=seq),
                   linear(f"{p}.mlp.up", width, ffn, tokens=seq),
                   linear(f"{p}.mlp.down", ffn, width, tokens=seq)]
    layers.append(linear("lm_head", width, vocab, tokens=seq))
    extra = {"embed_tokens": vocab * width, "norm": width,
             **{f"layers.{i}.{norm}": width for i in range(blocks) for norm in ("attn_norm", "mlp_norm")}}
    return Workload(name or f"llama(blocks={blocks},width={width})", tuple(layers), batch_size=batch_size,
                    optimizer="adam", extra_params=extra, embeddings=("embed_tokens",),
                    description=f"Llama-style decoder, {blocks} x {width}, {heads} heads, MLP {ffn}, "
                    f"sequence {seq}, batch {batch_size}")


MAX_LLAMA_BLOCKS = 4096
"""The most decoder blocks llama(...) builds (published decoders have up to about 130): each block is
a list of layers, so a mistyped count (blocks=99999999) would fill memory for minutes."""
_LLAMA_SPEC = re.compile(r"^llama\((?P<args>[^()]*)\)$")
_LLAMA_KEYS = ("blocks", "width", "heads", "ffn", "kv_heads", "vocab", "seq", "batch_size")


def _llama_from_spec(spec: str) -> Workload | None:
    """`llama(blocks=8,width=1024)`: the decoder with those settings, the others at LLaMA-7B's."""
    match = _LLAMA_SPEC.match(spec.replace(" ", ""))
    if match is None:
        return None
    settings: dict[str, Any] = {}  # llama's int parameters, by name
    for item in filter(None, match["args"].split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in _LLAMA_KEYS:
            raise InputError(f"workload {spec!r}: {item!r} is not key=value with a key in "
                             f"{', '.join(_LLAMA_KEYS)}")
        if not value.isdigit() or int(value) < 1:
            raise InputError(f"workload {spec!r}: {key} must be a positive integer, got {value!r}")
        problem = number_problem(int(value))
        if problem is None and key == "blocks" and int(value) > MAX_LLAMA_BLOCKS:
            problem = f"must be at most {MAX_LLAMA_BLOCKS} (one layer list per block), got {value}"
        if problem is not None:
            raise InputError(f"workload {spec!r}: {key} {problem}")
        settings[key] = int(value)
    return llama(**settings)


# --- proxies: the small models dse trains (models/proxies.py) ------------------------------------

def digits_mlp() -> Workload:
    layers = mlp([64, 128, 10])
    return Workload("digits-mlp", tuple(layers), batch_size=32, proxy=True, extra_params=biases(layers),
                    description="sklearn digits 8x8, MLP 64-128-10")


def digits_cnn() -> Workload:
    c1, h, w = conv2d("conv1", 1, 16, 3, 8, 8, first=True)
    c2, h, w = conv2d("conv2", 16, 32, 3, h, w)
    fc = linear("fc", 32 * (h // 2) * (w // 2), 10)
    return Workload("digits-cnn", (c1, c2, fc), batch_size=32, proxy=True, extra_params=biases([c1, c2, fc]),
                    description="sklearn digits 8x8, conv3x3(1-16)-conv3x3(16-32)-maxpool-fc(512-10)")


def m1d_mlp() -> Workload:
    layers = mlp([40, 256, 256, 10])
    return Workload("m1d-mlp", tuple(layers), batch_size=100, proxy=True, extra_params=biases(layers),
                    description="MNIST-1D, MLP 40-256-256-10")


def m1d_cnn() -> Workload:
    c1, n = conv1d("conv1", 1, 25, 5, 40, stride=2, padding=1, first=True)
    c2, n = conv1d("conv2", 25, 25, 3, n, stride=2, padding=1)
    c3, n = conv1d("conv3", 25, 25, 3, n, stride=2, padding=1)
    layers = [c1, c2, c3, linear("fc", 25 * n, 10)]
    return Workload("m1d-cnn", tuple(layers), batch_size=100, proxy=True, extra_params=biases(layers),
                    description="MNIST-1D, 3 strided conv1d (25 channels) + linear")


def mx5k_mlp() -> Workload:
    layers = mlp([784, 128, 10])
    return Workload("mx5k-mlp", tuple(layers), batch_size=64, proxy=True, extra_params=biases(layers),
                    description="MNIST 5k subset, MLP 784-128-10")


def mx5k_cnn() -> Workload:
    c1, h, w = conv2d("conv1", 1, 8, 3, 28, 28, first=True)
    c2, h, w = conv2d("conv2", 8, 16, 3, h // 2, w // 2)
    fc = linear("fc", 16 * (h // 2) * (w // 2), 10)
    return Workload("mx5k-cnn", (c1, c2, fc), batch_size=64, proxy=True, extra_params=biases([c1, c2, fc]),
                    description="MNIST 5k subset, conv(1-8)-pool-conv(8-16)-pool-fc(784-10)")


def sort_transformer() -> Workload:
    """Tiny transformer (2 x 64, 4 heads, FFN 256) sorting 24 tokens over a vocabulary of 64."""
    layers = transformer_layers(2, 64, 4, 256, 24)
    layers.append(linear("head", 64, 64, tokens=24))
    layer_norms = norms([*(f"layer{i}.ln{j}" for i in range(2) for j in (1, 2)), "ln_f"], 64)
    return Workload("sort-transformer", tuple(layers), batch_size=128, optimizer="adam", proxy=True,
                    extra_params={"embedding": 64 * 64, "position": 24 * 64, **layer_norms, **biases(layers)},
                    embeddings=("embedding",),  # nn.Embedding; the position table is a free Parameter
                    description="tiny transformer, sort 24 tokens / vocab 64, batch 128")


# --- registry ------------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[[], Workload]] = {}


def register_workload(name: str, builder: Callable[[], Workload], replace: bool = False) -> None:
    """Make `name` available to the energy model (and `dse energy --workload name`)."""
    key = name.lower()
    if key in _REGISTRY and not replace:
        raise ValueError(f"workload {name!r} is already registered (pass replace=True)")
    _REGISTRY[key] = builder


def workload_names(proxy: bool | None = None) -> list[str]:
    return [n for n, b in _REGISTRY.items() if proxy is None or b().proxy == proxy]


WORKLOAD_FILE_SUFFIXES = (".onnx", ".yaml", ".yml", ".csv")


def is_workload_file(spec: str) -> bool:
    return Path(spec.strip()).suffix.lower() in WORKLOAD_FILE_SUFFIXES


def get_workload(spec: str | Workload, dataset: Any = None, batch_size: int | None = None) -> Workload:
    """A workload from any of its sources: a built-in name, an ONNX file, a YAML or CSV list of layer
    shapes, or a user's model (`file.py:function`, traced on `dataset`: a name or a dse Dataset).

    `batch_size` replaces the batch of a file or traced model (default 32); a built-in keeps its own.
    """
    if isinstance(spec, Workload):
        return spec
    builder = _REGISTRY.get(spec.strip().lower())
    if builder is not None:
        return builder()
    text = spec.strip()
    decoder = _llama_from_spec(text.lower())
    if decoder is not None:
        return decoder
    if is_ref(text):
        return _traced(text, dataset, batch_size or DEFAULT_BATCH)
    suffix = Path(text).suffix.lower()
    if suffix == ".onnx":
        from dse.models.onnx_workload import load_onnx

        return load_onnx(text, batch_size or DEFAULT_BATCH)
    if suffix in WORKLOAD_FILE_SUFFIXES:
        from dse.models.workload_files import load_layer_file

        workload = load_layer_file(text)
        return dataclasses.replace(workload, batch_size=batch_size) if batch_size else workload
    raise InputError(f"unknown workload {spec!r}: not a built-in ({', '.join(sorted(_REGISTRY))}), an .onnx, "
                     ".yaml, .yml or .csv file, or a model given as file.py:function")


DEFAULT_BATCH = 32
"""Batch of a workload read from a file or traced from a model, unless one is given."""


def _traced(spec: str, dataset: Any, batch_size: int) -> Workload:
    """A user's model, built by its function for `dataset` and traced on two of its samples."""
    if dataset is None:
        raise InputError(f"workload {spec!r} is a model: give the dataset it runs on (dse energy --dataset "
                         "NAME; a sweep traces it on each task's dataset)")
    import torch

    from dse.data import load_dataset
    from dse.models.proxies import build_model, trace_workload

    data = load_dataset(dataset) if isinstance(dataset, str) else dataset
    with torch.random.fork_rng(devices=[]):  # the caller's RNG is left as it was
        torch.manual_seed(0)
        model = build_model(spec, data, trained=False)
    workload = trace_workload(model, data, spec, batch_size)
    return dataclasses.replace(workload, proxy=False)


BUILT_IN_WORKLOADS: dict[str, Callable[[], Workload]] = {
    "resnet18": resnet18, "resnet50": resnet50, "bert-base": bert_base, "gpt2-small": gpt2_small,
    "vit-b16": vit_b16, "mobilenetv2": mobilenet_v2, "llama-7b": functools.partial(llama, name="llama-7b"),
    "digits-mlp": digits_mlp, "digits-cnn": digits_cnn, "m1d-mlp": m1d_mlp, "m1d-cnn": m1d_cnn,
    "mx5k-mlp": mx5k_mlp, "mx5k-cnn": mx5k_cnn, "sort-transformer": sort_transformer,
}
"""The workloads dse ships (register_workload adds more)."""

for _name, _builder in BUILT_IN_WORKLOADS.items():
    register_workload(_name, _builder)
