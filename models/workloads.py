"""Layer shapes of training workloads, for the energy model (no torch: shapes only).

Every layer that does the multiply-accumulate work is a GEMM: per sample, `groups` products of
[m, k] x [k, n] (a convolution as im2col: m output positions, k = (c_in / groups) * kernel area,
n = c_out / groups; attention scores: one group per head). Elementwise layers (normalisation,
activations, softmax, pooling) are not modelled. Parameters that no GEMM owns (embedding tables)
are listed separately so the optimizer still updates them.

Full-size workloads: resnet18, resnet50 (ImageNet 224x224), bert-base (sequence 128), gpt2-small
(sequence 1024). Proxies: the small models the sweep trains. More can be added with
`register_workload(name, builder)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from dse.errors import InputError


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
        return self.b_elems if self.b_is_weight else 0


@dataclass(frozen=True)
class Workload:
    name: str
    layers: tuple[GemmLayer, ...]
    batch_size: int
    optimizer: str = "sgd"
    extra_params: dict[str, int] = field(default_factory=dict)
    description: str = ""
    proxy: bool = False

    def forward_macs(self, batch_size: int = 1) -> int:
        return batch_size * sum(layer.macs_per_sample for layer in self.layers)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers) + sum(self.extra_params.values())


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
    shared = {"groups": heads, "b_is_weight": False, "kind": "attention"}
    return [GemmLayer(f"{name}.scores", m=seq, k=d_head, n=seq, **shared),  # type: ignore[arg-type]
            GemmLayer(f"{name}.context", m=seq, k=seq, n=d_head, **shared)]  # type: ignore[arg-type]


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
    return Workload(name, tuple(layers), batch_size=32, optimizer="sgd",
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
    return Workload("bert-base", tuple(layers), batch_size=32, optimizer="adam", extra_params=embeddings,
                    description=f"BERT-base, sequence {seq}, batch 32")


def gpt2_small(seq: int = 1024) -> Workload:
    """GPT-2 small (124M): 12 x 768, 12 heads, FFN 3072; the LM head shares the token embedding."""
    layers = transformer_layers(12, 768, 12, 3072, seq, prefix="h")
    layers.append(linear("lm_head", 768, 50257, tokens=seq))
    return Workload("gpt2-small", tuple(layers), batch_size=8, optimizer="adam",
                    extra_params={"wpe": 1024 * 768},
                    description=f"GPT-2 small decoder, sequence {seq}, batch 8 (dense attention)")


# --- proxies (docs: ../shared/reference/proxies.md) ----------------------------------------------

def digits_mlp() -> Workload:
    return Workload("digits-mlp", tuple(mlp([64, 128, 10])), batch_size=32, proxy=True,
                    description="sklearn digits 8x8, MLP 64-128-10")


def digits_cnn() -> Workload:
    c1, h, w = conv2d("conv1", 1, 16, 3, 8, 8, first=True)
    c2, h, w = conv2d("conv2", 16, 32, 3, h, w)
    fc = linear("fc", 32 * (h // 2) * (w // 2), 10)
    return Workload("digits-cnn", (c1, c2, fc), batch_size=32, proxy=True,
                    description="sklearn digits 8x8, conv3x3(1-16)-conv3x3(16-32)-maxpool-fc(512-10)")


def m1d_mlp() -> Workload:
    return Workload("m1d-mlp", tuple(mlp([40, 256, 256, 10])), batch_size=100, proxy=True,
                    description="MNIST-1D, MLP 40-256-256-10")


def m1d_cnn() -> Workload:
    c1, n = conv1d("conv1", 1, 25, 5, 40, stride=2, padding=1, first=True)
    c2, n = conv1d("conv2", 25, 25, 3, n, stride=2, padding=1)
    c3, n = conv1d("conv3", 25, 25, 3, n, stride=2, padding=1)
    return Workload("m1d-cnn", (c1, c2, c3, linear("fc", 25 * n, 10)), batch_size=100, proxy=True,
                    description="MNIST-1D, 3 strided conv1d (25 channels) + linear")


def mx5k_mlp() -> Workload:
    return Workload("mx5k-mlp", tuple(mlp([784, 128, 10])), batch_size=64, proxy=True,
                    description="MNIST 5k subset, MLP 784-128-10")


def mx5k_cnn() -> Workload:
    c1, h, w = conv2d("conv1", 1, 8, 3, 28, 28, first=True)
    c2, h, w = conv2d("conv2", 8, 16, 3, h // 2, w // 2)
    fc = linear("fc", 16 * (h // 2) * (w // 2), 10)
    return Workload("mx5k-cnn", (c1, c2, fc), batch_size=64, proxy=True,
                    description="MNIST 5k subset, conv(1-8)-pool-conv(8-16)-pool-fc(784-10)")


def sort_transformer() -> Workload:
    """Tiny transformer (2 x 64, 4 heads, FFN 256) sorting 24 tokens over a vocabulary of 64."""
    layers = transformer_layers(2, 64, 4, 256, 24)
    layers.append(linear("head", 64, 64, tokens=24))
    return Workload("sort-transformer", tuple(layers), batch_size=128, optimizer="adam", proxy=True,
                    extra_params={"embedding": 64 * 64, "position": 24 * 64},
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


def get_workload(name: str | Workload) -> Workload:
    if isinstance(name, Workload):
        return name
    builder = _REGISTRY.get(name.strip().lower())
    if builder is None:
        raise InputError(f"unknown workload {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    return builder()


for _name, _builder in {
    "resnet18": resnet18, "resnet50": resnet50, "bert-base": bert_base, "gpt2-small": gpt2_small,
    "digits-mlp": digits_mlp, "digits-cnn": digits_cnn, "m1d-mlp": m1d_mlp, "m1d-cnn": m1d_cnn,
    "mx5k-mlp": mx5k_mlp, "mx5k-cnn": mx5k_cnn, "sort-transformer": sort_transformer,
}.items():
    register_workload(_name, _builder)
