"""Small trainable proxy networks, and the GEMM workload a network runs (for the energy model).

Every multiply-accumulate layer is a standard `nn.Linear`, `nn.Conv1d` or `nn.Conv2d`, and the two
matmuls of attention are `Matmul` modules, so the training code can swap all of them for quantized
versions; everything else (ReLU, pooling, normalisation, softmax, embeddings) stays in FP32.
Architectures and the accuracies they reach in FP32 follow the project's proxy notes: e.g. MNIST-1D
with the 1-D CNN (5.2k params, ~91 %), digits with the MLP 64-128-10 (9,610 params, ~96 %).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from dse.data import Dataset
from dse.errors import InputError, choice
from dse.models.layers import Matmul, PositionEmbedding
from dse.models.workloads import Workload
from dse.usercode import call, describe, is_ref

if TYPE_CHECKING:
    from dse.models.trace import LeftFp32

MODELS: tuple[str, ...] = ("mlp", "cnn", "resnet", "transformer")

MLP_HIDDEN: dict[str, tuple[int, ...]] = {
    "digits": (128,), "mnist1d": (256, 256), "mnist5k": (128,), "mnist": (128,), "cifar10": (256,),
}
"""Hidden widths per dataset (they match the hand-written workloads digits-mlp, m1d-mlp, mx5k-mlp)."""
DEFAULT_MLP_HIDDEN = (128,)

LAYOUTS: dict[str, tuple[int, ...]] = {
    "digits": (1, 8, 8), "mnist5k": (1, 28, 28), "mnist": (1, 28, 28), "cifar10": (3, 32, 32),
    "mnist1d": (1, 40),
}
"""How a flat sample is viewed by the convolutional models: (C, H, W) images or (C, L) signals."""


# --- building blocks -----------------------------------------------------------------------------

class _Reshape(nn.Module):
    """View each sample as `shape` (flat datasets feed the convolutional models this way)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


def _mlp(d_in: int, hidden: tuple[int, ...], classes: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for width in hidden:
        layers += [nn.Linear(d_in, width), nn.ReLU()]
        d_in = width
    layers.append(nn.Linear(d_in, classes))
    return nn.Sequential(*layers)


def _cnn1d(layout: tuple[int, ...], classes: int) -> nn.Module:
    """MNIST-1D's ConvBase: three stride-2 convolutions with 25 channels (kernels 5, 3, 3), then a linear."""
    channels, length = layout
    layers: list[nn.Module] = [_Reshape(layout)]
    c_in = channels
    for kernel in (5, 3, 3):
        layers += [nn.Conv1d(c_in, 25, kernel, stride=2, padding=1), nn.ReLU()]
        c_in = 25
        length = (length + 2 - kernel) // 2 + 1
    layers += [nn.Flatten(), nn.Linear(25 * length, classes)]
    return nn.Sequential(*layers)


def _cnn2d(layout: tuple[int, ...], classes: int) -> nn.Module:
    """Two 3x3 convolutions. Tiny images (digits 8x8): conv-conv-maxpool-fc; larger ones:
    conv-pool-conv-pool-fc with 8/16 channels (grey) or 16/32 (colour)."""
    channels, height, width = layout
    if height * width <= 64:
        return nn.Sequential(
            _Reshape(layout),
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * (height // 2) * (width // 2), classes))
    c1 = 8 if channels == 1 else 16
    return nn.Sequential(
        _Reshape(layout),
        nn.Conv2d(channels, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, 2 * c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * c1 * (height // 4) * (width // 4), classes))


class _ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (through a strided 1x1 conv + BN when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int, dims: int) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        self.conv1 = conv(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(c_out)
        self.conv2 = conv(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = norm(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(conv(c_in, c_out, 1, stride=stride, bias=False), norm(c_out))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet: stem conv, three residual blocks (16, 32, 64 channels; strides 1, 2, 2),
    global average pool, linear. 1-D for signals, 2-D for images; inputs above 16 pixels a side get
    a stride-2 stem to keep the CPU cost down."""

    def __init__(self, layout: tuple[int, ...], classes: int) -> None:
        super().__init__()
        dims = len(layout) - 1
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        stem_stride = 2 if dims == 2 and layout[1] > 16 else 1
        self.reshape = _Reshape(layout)
        self.stem = nn.Sequential(conv(layout[0], 16, 3, stride=stem_stride, padding=1, bias=False),
                                  norm(16), nn.ReLU())
        self.blocks = nn.Sequential(_ResidualBlock(16, 16, 1, dims), _ResidualBlock(16, 32, 2, dims),
                                    _ResidualBlock(32, 64, 2, dims))
        self.fc = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        y = self.blocks(self.stem(self.reshape(x)))
        return self.fc(y.flatten(2).mean(-1))


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention; both matmuls are `Matmul` modules so they get quantized."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.scores = Matmul()
        self.context = Matmul()
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, d_model = x.shape
        d_head = d_model // self.heads
        q, k, v = self.qkv(x).view(batch, seq, 3, self.heads, d_head).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(self.scores(q, k.transpose(-2, -1)) / math.sqrt(d_head), dim=-1)
        y = self.context(weights, v)
        return self.out(y.transpose(1, 2).reshape(batch, seq, d_model))


class TransformerLayer(nn.Module):
    """Pre-LayerNorm block: x + attn(ln(x)), then x + ffn(ln(x)) with a GELU FFN."""

    def __init__(self, d_model: int, heads: int, d_ff: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.ffn_in = nn.Linear(d_model, d_ff)
        self.ffn_out = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ffn_out(torch.nn.functional.gelu(self.ffn_in(self.ln2(x))))


class Transformer(nn.Module):
    """Tiny encoder for token-to-token tasks (sorting): learned token + position embeddings,
    pre-LN layers, final LayerNorm, per-token logits (B, T, vocab)."""

    def __init__(self, vocab: int, seq: int, d_model: int = 64, heads: int = 4, d_ff: int = 256,
                 n_layers: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, d_model)
        self.position = PositionEmbedding(seq, d_model)
        self.layers = nn.ModuleList(TransformerLayer(d_model, heads, d_ff) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.position(self.embedding(tokens))
        for layer in self.layers:
            x = layer(x)
        return self.head(self.ln_f(x))


# --- model choice --------------------------------------------------------------------------------

def _layout(dataset: Dataset) -> tuple[int, ...] | None:
    """(C, H, W) or (C, L) of a sample, from the dataset's name or a multi-dimensional sample shape."""
    known = LAYOUTS.get(dataset.name)
    if known is not None and math.prod(known) == math.prod(dataset.sample_shape):
        return known
    shape = dataset.sample_shape
    return shape if len(shape) in (2, 3) else None


def _builders(dataset: Dataset) -> dict[str, Callable[[], nn.Module]]:
    """The models that fit this dataset, by name."""
    if dataset.task == "sequence":
        vocab, seq = dataset.num_classes, dataset.sample_shape[0]
        return {"transformer": lambda: Transformer(vocab, seq)}
    classes = dataset.num_classes
    builders: dict[str, Callable[[], nn.Module]] = {
        "mlp": lambda: _mlp(math.prod(dataset.sample_shape), MLP_HIDDEN.get(dataset.name, DEFAULT_MLP_HIDDEN),
                            classes)}
    layout = _layout(dataset)
    if layout is not None:
        builders["cnn"] = lambda: (_cnn1d if len(layout) == 2 else _cnn2d)(layout, classes)
        builders["resnet"] = lambda: ResNet(layout, classes)
    return builders


def compatible_models(dataset: Dataset) -> tuple[str, ...]:
    """Names of the models build_model accepts for this dataset."""
    return tuple(name for name in MODELS if name in _builders(dataset))


ModelFactory = Callable[[tuple[int, ...], int], nn.Module]
"""A user's model: called with the dataset's sample shape and number of classes (the vocabulary for a
sequence task), after the run's seed is set; returns a fresh nn.Module."""


def build_model(name: str | ModelFactory, dataset: Dataset, trained: bool = True) -> nn.Module:
    """A fresh model for `dataset`: a built-in proxy by name, or a user's own given as a function or a
    `file.py:function` / `package.module:function` reference. Its initial weights come from torch's
    global RNG (seed it). A user's model is run once on two samples to check that its output fits, and,
    to be `trained` (not only priced), that it has a parameter to train."""
    if callable(name) or is_ref(name):
        model = _user_model(name, dataset)
        if trained and not any(p.requires_grad for p in model.parameters()):
            label = f"model {name!r}" if isinstance(name, str) else f"model {describe(name)}"
            raise InputError(f"{label} has no parameter to train (none, or each with requires_grad=False)")
        return model
    key = choice("model", name, MODELS)
    builders = _builders(dataset)
    if key not in builders:
        fits = ", ".join(builders) or "none"
        why = {"transformer": "it needs a sequence task (sort, sort-easy)",
               "mlp": "it needs a classification task", "cnn": "it needs a classification task with "
               "an image (C, H, W) or signal (C, L) layout", "resnet": "it needs a classification task "
               "with an image (C, H, W) or signal (C, L) layout"}[key]
        raise InputError(f"model {key!r} does not fit dataset {dataset.name!r} ({dataset.task}, samples "
                         f"{tuple(dataset.sample_shape)}): {why}; models for {dataset.name!r}: {fits}")
    return builders[key]()


def _user_model(factory: str | ModelFactory, dataset: Dataset) -> nn.Module:
    label = f"model {factory!r}" if isinstance(factory, str) else f"model {describe(factory)}"
    args = (tuple(dataset.sample_shape), dataset.num_classes)
    if isinstance(factory, str):
        model = call(factory, "model", *args)
    else:
        try:
            model = factory(*args)
        except Exception as error:
            raise InputError(f"{label} raised {type(error).__name__}: {str(error).splitlines()[0]}") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"{label} returned {type(model).__name__!r} object, not a torch.nn.Module")
    check_output_fits(model, dataset, label)
    return model


def check_output_fits(model: nn.Module, dataset: Dataset, label: str) -> None:
    """Run two training samples through `model` (eval mode, no gradient, RNG untouched) and check that
    it returns one logit per class: (N, classes), or (N, T, vocabulary) for a sequence task."""
    x = dataset.x_train[:2]
    expected = (len(x), *dataset.y_train.shape[1:], dataset.num_classes)
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.eval()
            out = model(x)
    except Exception as error:
        raise InputError(f"{label} does not accept samples of dataset {dataset.name!r} (shape "
                         f"{tuple(dataset.sample_shape)}): {type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}") from None
    finally:
        model.train(was_training)
    shape = tuple(out.shape) if isinstance(out, Tensor) else None
    if shape != expected:
        got = f"shape {shape}" if shape is not None else f"a {type(out).__name__}"
        raise InputError(f"{label} returns {got} for {len(x)} samples of dataset {dataset.name!r}; it "
                         f"needs {expected} (one logit per class)")
    if not out.is_floating_point():
        raise InputError(f"{label} returns {out.dtype} logits for samples of dataset {dataset.name!r}; "
                         "they must be floating point (a loss and its gradient are computed from them)")



# --- workload tracing ----------------------------------------------------------------------------

def trace_workload(model: nn.Module, dataset: Dataset, name: str, batch_size: int,
                   optimizer: str = "sgd", left_fp32: LeftFp32 | None = None) -> Workload:
    """The GEMMs one sample of `dataset` costs in `model` (models.trace.trace_model on a few of its
    training samples, the GEMMs inside `left_fp32` named as fp32), as a proxy workload at `batch_size`."""
    from dse.models.trace import TRACE_SAMPLES, trace_model

    if batch_size < 1:
        raise InputError(f"trace_workload: batch_size must be >= 1, got {batch_size}")
    samples = min(TRACE_SAMPLES, dataset.x_train.shape[0])
    if samples < 1:
        raise InputError(f"trace_workload: dataset {dataset.name!r} has no training samples")
    try:
        workload = trace_model(model, dataset.x_train[:samples], name, batch_size, optimizer,
                               f"{type(model).__name__} traced on {dataset.name}, batch {batch_size}",
                               left_fp32)
    except RuntimeError as exc:
        raise InputError(f"trace_workload: the model does not accept samples of dataset {dataset.name!r} "
                         f"(shape {tuple(dataset.sample_shape)}): {str(exc).splitlines()[0]}") from exc
    if not workload.layers:
        raise InputError(f"trace_workload: {type(model).__name__} ran no matrix product or convolution")
    return dataclasses.replace(workload, proxy=True)
