"""Users' own networks whose GEMMs are function calls or torch's attention modules, for the grouped
training tests (each factory takes the sample shape and the class count, as `model: file.py:factory`),
and the small layers the member-kernel tests and benchmarks/user_kernels.py build networks from.
Sized for the digits data (64 features, 8x8 images); every GEMM big enough that a batched GEMM runs
the kernel of the member's own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Functional(nn.Module):
    """F.linear on a Linear's weight (the module never called), x @ W on a parameter, and an
    activation x activation torch.bmm."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, 32)
        self.w = nn.Parameter(torch.randn(32, 32) * 0.15)
        self.head = nn.Linear(32, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(F.linear(x, self.proj.weight, self.proj.bias))
        h = torch.tanh(h @ self.w)
        tokens = h.reshape(len(h), 4, 8)
        mixed = torch.bmm(tokens, tokens.transpose(1, 2)).softmax(-1) @ tokens
        return self.head(mixed.reshape(len(h), 32) + h)


def functional(shape: tuple[int, ...], classes: int) -> nn.Module:
    return Functional(shape[0], classes)


class Conv(nn.Module):
    """F.conv2d on parameters of the model itself, padding='same'."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(8, 1, 3, 3) * 0.3)
        self.bias = nn.Parameter(torch.zeros(8))
        self.head = nn.Linear(8 * 16, classes)

    def forward(self, x: Tensor) -> Tensor:
        y = F.conv2d(x.reshape(len(x), 1, 8, 8), self.kernel, self.bias, padding="same")
        return self.head(F.max_pool2d(torch.relu(y), 2).flatten(1))


def conv(shape: tuple[int, ...], classes: int) -> nn.Module:
    return Conv(classes)


class Encoder(nn.Module):
    """nn.TransformerEncoderLayer (batch first, no dropout) over the image's 8 rows."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16 * 8, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(self.embed(x.reshape(len(x), 8, 8))).flatten(1))


def encoder(shape: tuple[int, ...], classes: int) -> nn.Module:
    return Encoder(classes)


class Attention(nn.Module):
    """nn.MultiheadAttention, sequence first, returning its attention weights."""

    def __init__(self, classes: int, **options: object) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, **options)  # type: ignore[arg-type]
        self.head = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.reshape(len(x), 8, 8).transpose(0, 1)
        y, weights = self.attn(tokens, tokens, tokens)
        return self.head(y.transpose(0, 1).flatten(1)) + weights.mean((1, 2)).unsqueeze(1)


def attention(shape: tuple[int, ...], classes: int) -> nn.Module:
    return Attention(classes)


class Sdpa(nn.Module):
    """F.scaled_dot_product_attention, causal, on a Linear's q, k, v."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.head = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x.reshape(len(x), 8, 8)).reshape(len(x), 8, 3, 2, 4).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(y.transpose(1, 2).flatten(1))


def sdpa(shape: tuple[int, ...], classes: int) -> nn.Module:
    return Sdpa(classes)


class Tokens(nn.Module):
    """x @ W on a parameter with a 3-axis x (the image's 4 rows of 16 pixels as tokens): alone torch
    folds it into one mm over the batch's tokens."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 96) * 0.2)
        self.head = nn.Linear(4 * 96, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(x.reshape(len(x), 4, 16) @ self.w).flatten(1))


def tokens(shape: tuple[int, ...], classes: int) -> nn.Module:
    return Tokens(classes)



class Checkpointed(nn.Module):
    """Activation checkpointing (torch.utils.checkpoint): a block of a functional GEMM, SiLU and a
    sigmoid gate on 37 features, recomputed in the backward; `form` is "reentrant", "non-reentrant",
    "sequential" (checkpoint_sequential over two segments of a Sequential) or "plain" (no checkpoint).
    `layer`: the block's GEMM is an nn.Linear (a layer dse converts: alone, no mode of dse's is on the
    stack), not a function call."""

    def __init__(self, width: int, classes: int, form: str, layer: bool = False) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(width, 37), nn.Linear(37, classes)
        if form == "sequential":
            self.steps = nn.Sequential(nn.Linear(37, 37), nn.SiLU(), nn.Linear(37, 37), nn.Sigmoid())
        elif layer:
            self.middle = nn.Linear(37, 37)
        else:
            self.w = nn.Parameter(torch.randn(37, 37) * 0.15)
        self.form, self.layer = form, layer

    def block(self, h: Tensor) -> Tensor:
        h = F.silu(self.middle(h) if self.layer else F.linear(h, self.w))
        return h * torch.sigmoid(h)

    def forward(self, x: Tensor) -> Tensor:
        from torch.utils.checkpoint import checkpoint, checkpoint_sequential

        h = self.a(x)
        if self.form == "sequential":
            return self.head(checkpoint_sequential(self.steps, 2, h, use_reentrant=False))
        if self.form == "plain":
            return self.head(self.block(h))
        return self.head(checkpoint(self.block, h, use_reentrant=self.form == "reentrant"))


def checkpointed(shape: tuple[int, ...], classes: int) -> nn.Module:
    return Checkpointed(shape[0], classes, "non-reentrant")


def checkpointed_reentrant(shape: tuple[int, ...], classes: int) -> nn.Module:
    return Checkpointed(shape[0], classes, "reentrant")


def checkpointed_sequential(shape: tuple[int, ...], classes: int) -> nn.Module:
    return Checkpointed(shape[0], classes, "sequential")


def checkpointed_plain(shape: tuple[int, ...], classes: int) -> nn.Module:
    return Checkpointed(shape[0], classes, "plain")


def checkpointed_layer(shape: tuple[int, ...], classes: int) -> nn.Module:
    return Checkpointed(shape[0], classes, "non-reentrant", layer=True)


def checkpointed_layer_reentrant(shape: tuple[int, ...], classes: int) -> nn.Module:
    return Checkpointed(shape[0], classes, "reentrant", layer=True)


def checkpointed_layer_plain(shape: tuple[int, ...], classes: int) -> nn.Module:
    return Checkpointed(shape[0], classes, "plain", layer=True)


class SelfCalling(nn.Module):
    """A network that calls itself inside its own forward (`self(h, depth - 1)`), a functional GEMM
    and SiLU x sigmoid at each depth, on 37 features."""

    def __init__(self, width: int, classes: int, unrolled: bool = False) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(width, 37), nn.Linear(37, classes)
        self.w = nn.Parameter(torch.randn(37, 37) * 0.15)
        # what the forward calls: the network (its hooks run again), or (unrolled) its forward
        self.__dict__["inner"] = self.forward if unrolled else self

    def forward(self, x: Tensor, depth: int = 2) -> Tensor:
        if x.shape[-1] != 37:
            return self.head(self.inner(self.a(x), depth))
        h = F.silu(F.linear(x, self.w)) * torch.sigmoid(x)
        return self.inner(h, depth - 1) if depth > 1 else h


def self_calling(shape: tuple[int, ...], classes: int) -> nn.Module:
    return SelfCalling(shape[0], classes)


class RoundThrough(torch.autograd.Function):
    """A straight-through estimator: rounds in the forward, hands the gradient on as it is."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return torch.round(x * 8) / 8

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


def straight_through(shape: tuple[int, ...], classes: int) -> nn.Module:
    """A user's autograd.Function whose backward calls none of the position-dependent functions."""
    return _Through(shape[0], classes, RoundThrough)


class SwishFunction(torch.autograd.Function):
    """The memory-saving swish of EfficientNet-PyTorch's SwishImplementation: the backward
    recomputes the sigmoid from the saved input."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * (s * (1 + x * (1 - s)))


def swish_function(shape: tuple[int, ...], classes: int) -> nn.Module:
    """A user's autograd.Function whose backward calls torch.sigmoid on the batch."""
    return _Through(shape[0], classes, SwishFunction)


class _SwishOnLargeBatches(nn.Module):
    """SwishFunction only on a batch of at least 10 rows (a branch on the batch: small ones run plain
    SiLU), so a forward on a few samples does not reach the Function."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(width, 37), nn.Linear(37, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        return self.head(SwishFunction.apply(h) if h.shape[-2] >= 10 else F.silu(h))


def swish_on_large_batches(shape: tuple[int, ...], classes: int) -> nn.Module:
    """A user's autograd.Function reached only in some forwards (batches of 10 rows or more)."""
    return _SwishOnLargeBatches(shape[0], classes)


class _Through(nn.Module):
    def __init__(self, width: int, classes: int, function: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(width, 37), nn.Linear(37, classes)
        self.function = function

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.function.apply(self.a(x)))

# --- networks that still train one by one -----------------------------------------------------------

def attention_bias_kv(shape: tuple[int, ...], classes: int) -> nn.Module:
    """MultiheadAttention's add_bias_kv: bias_k and bias_v are concatenated to the keys, not a GEMM's."""
    return Attention(classes, add_bias_kv=True)


def attention_dropout(shape: tuple[int, ...], classes: int) -> nn.Module:
    """Dropout on the attention weights draws from torch's global generator."""
    return Attention(classes, dropout=0.25)


class Transposed(nn.Module):
    """x @ self.w.t(): the GEMM takes a view the forward made of the parameter (each member's view of
    its own, in a group)."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(classes, width) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.w.t()


def transposed(shape: tuple[int, ...], classes: int) -> nn.Module:
    return Transposed(shape[0], classes)


class ScaledScores(nn.Module):
    """A leaf layer with a weight used outside GEMMs (so run member by member) that calls a matmul."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.reshape(len(x), 8, 8)
        return (tokens @ tokens.transpose(1, 2) * self.temperature).flatten(1)[:, :10]


def scaled_scores(shape: tuple[int, ...], classes: int) -> nn.Module:
    return ScaledScores(classes)


def tiny(shape: tuple[int, ...], classes: int) -> nn.Module:
    """Three hidden units: at a batch of 4 each member's GEMMs have fewer than 400 multiply-adds."""
    return nn.Sequential(nn.Linear(shape[0], 3), nn.ReLU(), nn.Linear(3, classes))


def bottleneck(shape: tuple[int, ...], classes: int) -> nn.Module:
    """A one-unit bottleneck: its GEMMs have a single output column or a reduction of one, where
    MKL's batched GEMM sums otherwise than the member's own mm, whatever the batch."""
    return nn.Sequential(nn.Linear(shape[0], 1), nn.Tanh(), nn.Linear(1, classes))


class TokenMatmul(nn.Module):
    """x @ W on a parameter over `tokens` tokens of `features` features a sample: alone torch.matmul
    folds the batch into one mm, in a group each sample's (tokens, features) @ W is a batch entry."""

    def __init__(self, width: int, classes: int, tokens: int, features: int) -> None:
        super().__init__()
        self.tokens, self.features = tokens, features
        self.proj = nn.Linear(width, tokens * features)
        self.w = nn.Parameter(torch.randn(features, features) * 0.3)
        self.head = nn.Linear(tokens * features, classes)

    def forward(self, x: Tensor) -> Tensor:
        t = torch.tanh(self.proj(x)).reshape(len(x), self.tokens, self.features)
        return self.head(torch.tanh(t @ self.w).flatten(1))


def small_tokens(shape: tuple[int, ...], classes: int) -> nn.Module:
    """4 tokens of 8 features: 4 x 8 x 8 = 256 multiply-adds a sample's product."""
    return TokenMatmul(shape[0], classes, 4, 8)


def one_token(shape: tuple[int, ...], classes: int) -> nn.Module:
    """One token a sample: a single row in each sample's product."""
    return TokenMatmul(shape[0], classes, 1, 32)


class WideHead(nn.Module):
    """A 1024-unit hidden layer and logits as x @ W on a parameter: the logits' reduction is 1024 long,
    where at two threads torch's batched matmul sums otherwise than the member's own mm (16 rows and
    more, 10 columns), and the logits reach the loss unrounded."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, 1024)
        self.w = nn.Parameter(torch.randn(1024, classes) * 0.03)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.proj(x)) @ self.w


def wide_head(shape: tuple[int, ...], classes: int) -> nn.Module:
    return WideHead(shape[0], classes)


class Gated(nn.Module):
    """Linear -> SiLU -> Linear -> sigmoid gate -> Linear: position-dependent activations (their CPU
    vector and scalar kernels disagree in the last bit) on 74 and 37 features, so a member's
    batch of 50 leaves a scalar tail that the group's folded batch does not."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(width, 74), nn.Linear(74, 37), nn.Linear(37, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.b(F.silu(self.a(x)))
        return self.head(h * torch.sigmoid(h))


def gated(shape: tuple[int, ...], classes: int) -> nn.Module:
    return Gated(shape[0], classes)


class Recurrent(nn.Module):
    """nn.GRU (batch first) over the image's 8 rows: a leaf layer with weights, run member by member
    (its gates' sigmoid and tanh inside torch's kernel, each member's own call)."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.rnn = nn.GRU(8, 12, batch_first=True)
        self.head = nn.Linear(8 * 12, classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x.reshape(len(x), 8, 8))
        return self.head(out.flatten(1))


def recurrent(shape: tuple[int, ...], classes: int) -> nn.Module:
    return Recurrent(classes)


class SequenceFirstSilu(nn.Module):
    """nn.MultiheadAttention sequence first, then SiLU on its (L, N, E) output: 8 tokens of 7 features,
    so a member's 8 * B * 7 elements leave a scalar tail (and its members sit along the second axis)."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.embed, self.attn = nn.Linear(width, 56), nn.MultiheadAttention(7, 1)
        self.head = nn.Linear(56, classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x).reshape(len(x), 8, 7).transpose(0, 1)
        y, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return self.head(F.silu(y).transpose(0, 1).flatten(1))


def sequence_first_silu(shape: tuple[int, ...], classes: int) -> nn.Module:
    return SequenceFirstSilu(shape[0], classes)


class Normed(nn.Module):
    """A Linear, BatchNorm1d (running statistics that training updates and evaluation reads), a head."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.body = nn.Linear(width, 16)
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.norm(self.body(x))))


def normed(shape: tuple[int, ...], classes: int) -> nn.Module:
    return Normed(shape[0], classes)


class ChannelScale(nn.Module):
    """A layer with a weight of its own (run member by member in a group) that returns a view in another
    order of dimensions: tokens (B, L, C) scaled per channel, as (B, C, L)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x: Tensor) -> Tensor:
        return (x * self.weight).transpose(1, 2)


class ScaledPool(nn.Module):
    """Tokens from a Linear, scaled per channel by `ChannelScale` and summed over the tokens (a
    reduction whose order follows the layout of the scaled view), a head."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Linear(width, 8 * 16)
        self.scale = ChannelScale(16)
        self.head = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = torch.tanh(self.embed(x)).reshape(len(x), 8, 16)
        return self.head(self.scale(tokens).sum(-1))


def scaled_pool(shape: tuple[int, ...], classes: int) -> nn.Module:
    return ScaledPool(shape[0], classes)


class BatchInnerScale(nn.Module):
    """A layer with a weight of its own (run member by member in a group) that works on its input
    batch-innermost: (B, C) in, scaled per channel as a contiguous (C, B), returned as a (B, C) view."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x: Tensor) -> Tensor:
        return (x.t().contiguous() * self.weight[:, None]).t()


def batch_inner(shape: tuple[int, ...], classes: int) -> nn.Module:
    """A Linear, `BatchInnerScale` and a head (a GEMM of its batch-innermost output)."""
    return nn.Sequential(nn.Linear(shape[0], 40), nn.Tanh(), BatchInnerScale(40), nn.Linear(40, classes))


class Frozen(nn.Module):
    """Fine-tuning: a frozen first layer and a frozen norm (requires_grad=False), a trained convolution, a
    layer whose weight is frozen and whose bias trains, a trained head."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.pre = nn.Linear(width, 64)
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.mid = nn.Linear(8 * 16, 32)
        self.head = nn.Linear(32, classes)
        for param in (*self.pre.parameters(), *self.norm.parameters(), self.mid.weight):
            param.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.stem(torch.relu(self.pre(x)).reshape(len(x), 1, 8, 8))
        y = F.max_pool2d(torch.relu(self.norm(y)), 2).flatten(1)
        return self.head(torch.relu(self.mid(y)))


def frozen(shape: tuple[int, ...], classes: int) -> nn.Module:
    return Frozen(shape[0], classes)


# --- layers the member-kernel tests and benchmarks/user_kernels.py build networks from ----------------

class Gate(nn.Module):
    """A user's leaf layer with a weight of its own that calls sigmoid: it runs member by member."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, features))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x * self.gain)


class ResidualGate(nn.Module):
    """A residual around a Gate: the input's gradient is the sum of three terms, two from inside it."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.a, self.gate, self.b = nn.Linear(width, 37), Gate(37), nn.Linear(37, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x))
        return self.b(h + self.gate(h))


def residual_gate(shape: tuple[int, ...], classes: int) -> nn.Module:
    return ResidualGate(shape[0], classes)


class SequenceFirst(nn.Module):
    """nn.MultiheadAttention sequence first (L, N, E), then `activation` on its output, where a group's
    members sit along the second axis (8 tokens of 7 features: a member's 8 * B * 7 elements leave a
    scalar tail where B is 50)."""

    def __init__(self, activation: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.embed, self.attn, self.head = nn.Linear(64, 56), nn.MultiheadAttention(7, 1), nn.Linear(56, 10)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x).reshape(len(x), 8, 7).transpose(0, 1)
        y, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return self.head(self.activation(y).transpose(0, 1).flatten(1))


class _Silu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(37, 37)

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(self.l(x))


def composable_checkpoint(shape: tuple[int, ...], classes: int) -> nn.Module:
    """torch.distributed's composable checkpoint on a block with SiLU (it binds torch's checkpoint
    generator by its own name: dse/train/recompute.py sets that one too)."""
    from torch.distributed._composable import checkpoint

    block = _Silu()
    checkpoint(block)
    return nn.Sequential(nn.Linear(shape[0], 37), block, nn.Linear(37, classes))
