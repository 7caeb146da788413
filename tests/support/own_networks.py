"""Networks a researcher brings as their own, as the user audit of own networks wrote them: a GRU read at
its last step, an LSTM read from its final state or (batch_first=False) its last step, a GRU or LSTM
given its initial state (and an LSTM run along its batch by mistake), a weight used by two GEMMs (tied
through `.t()`, a layer applied again), `torch.cdist` against a layer's weight (prototypes) and
between a sample's tokens, GEMMs on views of parameters or on a weight computed from one, layers
that write their GEMM's weight (or a view of it) in place (a max-norm renorm, or from another tensor),
and an nn.TransformerEncoder given a causal mask without `is_causal`. Each factory takes
the sample shape and the class count (digits: 64 features, 8x8 images), as
`model: support.own_networks:factory`."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LastStepGru(nn.Module):
    """The 8x8 image as 8 steps of 8 features through an nn.GRU; the head reads the last step."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.rnn = nn.GRU(8, 16, batch_first=True)
        self.head = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        steps, _ = self.rnn(x.reshape(len(x), 8, 8))
        return self.head(steps[:, -1])


def last_step_gru(shape: tuple[int, ...], classes: int) -> nn.Module:
    return LastStepGru(classes)


class TiedDecoder(nn.Module):
    """An encoder whose weight, transposed, decodes again (F.linear on `enc.weight.t()`)."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.enc = nn.Linear(features, 32)
        self.head = nn.Linear(features, classes)

    def forward(self, x: Tensor) -> Tensor:
        code = torch.tanh(self.enc(x))
        return self.head(nn.functional.linear(code, self.enc.weight.t()) + x)


def tied_decoder(shape: tuple[int, ...], classes: int) -> nn.Module:
    return TiedDecoder(shape[0], classes)


def repeated_layer(shape: tuple[int, ...], classes: int) -> nn.Module:
    """One Linear(64, 64) applied three times, then a head."""
    shared = nn.Linear(shape[0], shape[0])
    return nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), shared, nn.Linear(shape[0], classes))


class Prototypes(nn.Module):
    """Logits are minus the distances (torch.cdist) to one learned prototype per class."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Linear(features, 24)
        self.prototypes = nn.Linear(24, classes)  # its weight serves as the prototypes

    def forward(self, x: Tensor) -> Tensor:
        return -torch.cdist(self.embed(x), self.prototypes.weight)


def prototypes(shape: tuple[int, ...], classes: int) -> nn.Module:
    return Prototypes(shape[0], classes)


class StateLstm(nn.Module):
    """An nn.LSTM of `layers` layers over the image's 8 rows, classified from its last layer's final
    hidden state h_n[-1] (h_n is (layers, batch, hidden): its batch on the second axis)."""

    def __init__(self, layers: int, classes: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 16, num_layers=layers, batch_first=True)
        self.head = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        _, (state, _) = self.rnn(x.reshape(len(x), 8, 8))
        return self.head(state[-1])


def lstm_state_1(shape: tuple[int, ...], classes: int) -> nn.Module:
    return StateLstm(1, classes)


def lstm_state_2(shape: tuple[int, ...], classes: int) -> nn.Module:
    return StateLstm(2, classes)


def lstm_state_3(shape: tuple[int, ...], classes: int) -> nn.Module:
    return StateLstm(3, classes)


class SequenceFirstLstm(nn.Module):
    """An nn.LSTM with batch_first=False: the image's 8 rows as (steps, batch, features), classified
    from the output's last step (the batch on the second axis of the layer's input and output)."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 16)
        self.head = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        steps, _ = self.rnn(x.reshape(len(x), 8, 8).transpose(0, 1))
        return self.head(steps[-1])


def sequence_first_lstm(shape: tuple[int, ...], classes: int) -> nn.Module:
    return SequenceFirstLstm(classes)


class ZeroStateLstm(nn.Module):
    """An nn.LSTM with batch_first=False given its initial state (h0, c0) as zeros made for the batch,
    (1, batch, hidden) each; the head reads the output's last step."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 16)
        self.head = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        start = torch.zeros(1, len(x), 16)
        steps, _ = self.rnn(x.reshape(len(x), 8, 8).transpose(0, 1), (start, start))
        return self.head(steps[-1])


def lstm_zero_states(shape: tuple[int, ...], classes: int) -> nn.Module:
    return ZeroStateLstm(classes)


class ProjectedSequenceFirstGru(nn.Module):
    """The image's rows projected by a Linear (batch first), transposed to (steps, batch, 12) for a
    2-layer nn.GRU with batch_first=False given zeros (2, batch, 16) as h0; the head reads the last
    step. The GRU's input needs a gradient and is not contiguous."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 12)
        self.rnn = nn.GRU(12, 16, num_layers=2)
        self.head = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = torch.tanh(self.proj(x.reshape(len(x), 8, 8))).transpose(0, 1)
        steps, _ = self.rnn(tokens, torch.zeros(2, len(x), 16))
        return self.head(steps[-1])


def projected_sequence_first_gru(shape: tuple[int, ...], classes: int) -> nn.Module:
    return ProjectedSequenceFirstGru(classes)


class EncodedStateGru(nn.Module):
    """An nn.GRU (batch_first=False, hidden 10) whose initial state is encoded from the sample by a
    Linear, (1, batch, 10) made for the batch: a member's state lies in the group's at 40 bytes a
    sample, off the 64-byte alignment it has alone for most batch sizes."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.start = nn.Linear(64, 10)
        self.rnn = nn.GRU(8, 10)
        self.head = nn.Linear(10, classes)

    def forward(self, x: Tensor) -> Tensor:
        h0 = torch.tanh(self.start(x)).unsqueeze(0)
        steps, _ = self.rnn(x.reshape(len(x), 8, 8).transpose(0, 1), h0)
        return self.head(steps[-1])


def gru_encoded_state(shape: tuple[int, ...], classes: int) -> nn.Module:
    return EncodedStateGru(classes)


class BatchAlongStepsLstm(nn.Module):
    """A user's slip: an nn.LSTM with batch_first=False given a batch-first (batch, 8, 8) input, so
    that it runs along the batch (each sample's state passes to the next sample), classified from
    its final hidden state: every sample's output depends on the samples before it."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 16)
        self.head = nn.Linear(16 * 8, classes)

    def forward(self, x: Tensor) -> Tensor:
        steps, _ = self.rnn(x.reshape(len(x), 8, 8))
        return self.head(steps.flatten(1))


def lstm_along_batch(shape: tuple[int, ...], classes: int) -> nn.Module:
    return BatchAlongStepsLstm(classes)


class LearnedStart(nn.Module):
    """A learned initial state (1, 1, hidden), expanded to the batch of the samples it is given."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.start = nn.Parameter(torch.randn(1, 1, hidden) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return self.start.expand(1, len(x), self.start.shape[-1])


class InitialStateGru(nn.Module):
    """An nn.GRU (batch_first) given its own initial state h0, (layers, batch, hidden): zeros, or a
    learned state (a layer of its own) expanded to the batch; the head reads the last step."""

    def __init__(self, learned: bool, classes: int) -> None:
        super().__init__()
        self.rnn = nn.GRU(8, 16, batch_first=True)
        self.start = LearnedStart(16) if learned else None
        self.head = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        h0 = self.start(x) if self.start is not None else torch.zeros(1, len(x), 16)
        steps, _ = self.rnn(x.reshape(len(x), 8, 8), h0)
        return self.head(steps[:, -1])


def gru_zero_state(shape: tuple[int, ...], classes: int) -> nn.Module:
    return InitialStateGru(False, classes)


def gru_learned_state(shape: tuple[int, ...], classes: int) -> nn.Module:
    return InitialStateGru(True, classes)


class TokenDistances(nn.Module):
    """The sample as 4 tokens of 6 features; their pairwise distances (torch.cdist, per sample) feed the
    head."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Linear(features, 24)
        self.head = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x).reshape(len(x), 4, 6)
        return self.head(torch.cdist(tokens, tokens).flatten(1))


def token_distances(shape: tuple[int, ...], classes: int) -> nn.Module:
    return TokenDistances(shape[0], classes)


class HeadFirst(nn.Module):
    """The head registered before the body it follows: registration order (training's first/last) is
    not the order the forward runs them."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(32, classes)
        self.body = nn.Linear(features, 32)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.body(x)))


def head_first(shape: tuple[int, ...], classes: int) -> nn.Module:
    return HeadFirst(shape[0], classes)


class MaxNormLinear(nn.Module):
    """A linear layer with a max-norm constraint: under no_grad its forward renorms its weight's rows
    to norm 1 at most (`renorm_`, in place), then calls F.linear on it."""

    def __init__(self, features: int, out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out, features) * 0.3)  # rows of norm about 2.4: renormed
        self.bias = nn.Parameter(torch.zeros(out))

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            self.weight.renorm_(2, 0, 1.0)
        return nn.functional.linear(x, self.weight, self.bias)


def max_norm_linear(shape: tuple[int, ...], classes: int) -> nn.Module:
    return nn.Sequential(MaxNormLinear(shape[0], 32), nn.Tanh(), nn.Linear(32, classes))


class BatchShrunkLinear(MaxNormLinear):
    """As MaxNormLinear, but its forward shrinks its weight by a statistic of its batch
    (`mul_(1 / (1 + x.abs().mean()))`): alone each trial's weight shrinks by its own batch's."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            self.weight.mul_(1 / (1 + x.abs().mean()))
        return nn.functional.linear(x, self.weight, self.bias)


def batch_shrunk_linear(shape: tuple[int, ...], classes: int) -> nn.Module:
    return nn.Sequential(BatchShrunkLinear(shape[0], 32), nn.Tanh(), nn.Linear(32, classes))


class DataMaxNormLinear(MaxNormLinear):
    """As MaxNormLinear, the renorm written through `.data` (outside no_grad), as older code does."""

    def forward(self, x: Tensor) -> Tensor:
        self.weight.data.renorm_(2, 0, 1.0)
        return nn.functional.linear(x, self.weight, self.bias)


def data_max_norm_linear(shape: tuple[int, ...], classes: int) -> nn.Module:
    return nn.Sequential(DataMaxNormLinear(shape[0], 32), nn.Tanh(), nn.Linear(32, classes))


class DataNormCappedLinear(MaxNormLinear):
    """Caps its weight's rows at norm 1 by dividing through `.data` by their norms (`w.data.div_(
    w.data.norm(dim=1, ...))`): the write takes another tensor of the weight's, whose axes on the
    stacked weight would be other ones (dim 1 the rows of every member at once)."""

    def forward(self, x: Tensor) -> Tensor:
        self.weight.data.div_(self.weight.data.norm(dim=1, keepdim=True).clamp(min=1))
        return nn.functional.linear(x, self.weight, self.bias)


def data_norm_capped_linear(shape: tuple[int, ...], classes: int) -> nn.Module:
    return nn.Sequential(DataNormCappedLinear(shape[0], 32), nn.Tanh(), nn.Linear(32, classes))


class ViewedWeights(nn.Module):
    """GEMMs on views the forward makes of its parameters: `x @ self.w.t()` (w stored (out, in)),
    `F.linear(h, self.v[:16])` (the first 16 rows of a (24, 32) weight), and the two halves of
    `self.u.chunk(2)` (a (2 x classes, 16) weight) summed."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, features) * 0.1)
        self.v = nn.Parameter(torch.randn(24, 32) * 0.2)
        self.u = nn.Parameter(torch.randn(2 * classes, 16) * 0.2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(x @ self.w.t())
        h = torch.tanh(nn.functional.linear(h, self.v[:16]))
        first, second = self.u.chunk(2)
        return nn.functional.linear(h, first) + nn.functional.linear(h, second)


def viewed_weights(shape: tuple[int, ...], classes: int) -> nn.Module:
    return ViewedWeights(shape[0], classes)


class NormalizedWeight(nn.Module):
    """GEMMs on a parameter and on a weight computed from it, `F.linear(x, self.w) + F.linear(x, self.w /
    self.w.norm())`: the norm of the stacked weight would be every member's at once."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(classes, features))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.w) + nn.functional.linear(x, self.w / self.w.norm()) * 10


def normalized_weight(shape: tuple[int, ...], classes: int) -> nn.Module:
    return NormalizedWeight(shape[0], classes)


class MoreViewedWeights(nn.Module):
    """GEMMs on the other views a forward makes of its parameters: `transpose`, `permute`, `.mT`,
    `swapaxes`, a view of a view (`w.t()[:, :32]`), `narrow` and `split` along the input axis (each
    half of the input by its half of the columns), `view` there and back, `unsqueeze` then `squeeze`,
    and every other row (`v[::2]`)."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, features) * 0.1)
        self.v = nn.Parameter(torch.randn(32, 32) * 0.2)
        self.u = nn.Parameter(torch.randn(classes, 16) * 0.2)

    def forward(self, x: Tensor) -> Tensor:
        w, v, half = self.w, self.v, x.shape[1] // 2
        h = torch.tanh(x @ w.transpose(0, 1) + x @ w.permute(1, 0)[:, :32] + x @ w.mT)
        h = h + torch.tanh(nn.functional.linear(x[:, :half], w.narrow(1, 0, half))
                           + nn.functional.linear(x[:, half:], torch.split(w, half, dim=1)[1]))
        h = torch.tanh(h @ torch.swapaxes(v, 0, 1) + nn.functional.linear(h, v.view(-1).view(32, 32)))
        h = torch.tanh(nn.functional.linear(h, v.unsqueeze(0).squeeze(0)[::2]))
        return nn.functional.linear(h, self.u)


def more_viewed_weights(shape: tuple[int, ...], classes: int) -> nn.Module:
    return MoreViewedWeights(shape[0], classes)


class WrittenViewsLinear(MaxNormLinear):
    """As MaxNormLinear, its max-norm written through views of its weight under no_grad: its transpose
    renormed along the transpose's second axis (`w.t().renorm_(2, 1, 1.0)`, the weight's rows) and its
    first 8 rows clamped (`w[:8].clamp_(-0.1, 0.1)`)."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            self.weight.t().renorm_(2, 1, 1.0)
            self.weight[:8].clamp_(-0.1, 0.1)
        return nn.functional.linear(x, self.weight, self.bias)


def written_views_linear(shape: tuple[int, ...], classes: int) -> nn.Module:
    return nn.Sequential(WrittenViewsLinear(shape[0], 32), nn.Tanh(), nn.Linear(32, classes))


class UnboundRows(nn.Module):
    """`x @ r` for each row r of `self.w.unbind(0)`: a matmul with a 1-d operand per member."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(classes, features) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([x @ row for row in self.w.unbind(0)], 1)


def unbound_rows(shape: tuple[int, ...], classes: int) -> nn.Module:
    return UnboundRows(shape[0], classes)


class MaskedEncoder(nn.Module):
    """Tokens (the image's 8 rows, embedded) through an nn.TransformerEncoder given a causal mask it
    makes each forward, without `is_causal` (torch then checks the mask against a causal one and reads
    the comparison's bool); `scaled` multiplies the mask by a statistic of the batch first, which
    leaves it causal but makes it the batch's."""

    def __init__(self, scaled: bool, classes: int) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(16, classes)
        self.scaled = scaled

    def forward(self, x: Tensor) -> Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(8)
        if self.scaled:
            mask = mask * (1 + x.abs().mean())
        return self.head(self.encoder(self.embed(x.reshape(len(x), 8, 8)), mask=mask)[:, -1])


def masked_encoder(shape: tuple[int, ...], classes: int) -> nn.Module:
    return MaskedEncoder(False, classes)


def batch_masked_encoder(shape: tuple[int, ...], classes: int) -> nn.Module:
    return MaskedEncoder(True, classes)
