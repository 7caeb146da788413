"""Users' networks the audits of grouped training draw beside tests/support/user_models.py's: odd widths
(a member's share of a folded batch then starts off a 64-byte boundary), convolutions of odd shapes
(1-d, strided, depthwise, transposed), leaf layers a group runs member by member (LSTM, RNN, GroupNorm,
an Embedding, a LayerNorm subclass, which reads its input through `_MemberReads`), and a sequence
network on the sort task. Each factory takes the sample shape and the class count (digits: 64
features, 8x8 images; sort: 10 tokens), as `model: file.py:factory` or `support.audit_networks:factory`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class OddConv(nn.Module):
    """Conv2d to 3 channels (3x3, no padding: 6x6), GroupNorm over them, a 2x2 stride-2 convolution to
    5 (3x3), a Linear to 13 and a head: no width a multiple of 16 bytes."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3)
        self.norm = nn.GroupNorm(1, 3)
        self.conv2 = nn.Conv2d(3, 5, 2, stride=2)
        self.hidden = nn.Linear(45, 13)
        self.head = nn.Linear(13, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.norm(self.conv1(x.reshape(len(x), 1, 8, 8))))
        h = torch.tanh(self.conv2(h)).flatten(1)
        return self.head(torch.nn.functional.gelu(self.hidden(h)))


def odd_conv(shape: tuple[int, ...], classes: int) -> nn.Module:
    return OddConv(classes)


class Conv1dNet(nn.Module):
    """Conv1d over the 64 features as one channel (kernel 7, stride 3: 20 positions of 5 channels), a
    depthwise Conv1d (groups=5, padding 1), max pooling to 10 and a head."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 5, 7, stride=3)
        self.depthwise = nn.Conv1d(5, 5, 3, padding=1, groups=5)
        positions = (features - 7) // 3 + 1
        self.head = nn.Linear(5 * (positions // 2), classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv(x.unsqueeze(1)))
        h = nn.functional.max_pool1d(torch.relu(self.depthwise(h)), 2)
        return self.head(h.flatten(1))


def conv1d(shape: tuple[int, ...], classes: int) -> nn.Module:
    return Conv1dNet(shape[0], classes)


class Upsampled(nn.Module):
    """A strided Conv2d (8x8 to 4x4, 6 channels), a ConvTranspose2d back to 8x8 (a layer with a weight
    that is no GEMM dse quantizes, so run member by member), average pooling and a head."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(1, 6, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(6, 3, 2, stride=2)
        self.head = nn.Linear(3 * 16, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.down(x.reshape(len(x), 1, 8, 8)))
        h = nn.functional.avg_pool2d(torch.sigmoid(self.up(h)), 2)
        return self.head(h.flatten(1))


def upsampled(shape: tuple[int, ...], classes: int) -> nn.Module:
    return Upsampled(classes)


class LstmRows(nn.Module):
    """nn.LSTM (batch first, hidden 7) over the image's 8 rows, then nn.RNN (tanh, hidden 5) over its
    outputs, and a head on the last step: two recurrent leaf layers of odd widths."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 7, batch_first=True)
        self.rnn = nn.RNN(7, 5, batch_first=True)
        self.head = nn.Linear(5, classes)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.lstm(x.reshape(len(x), 8, 8))
        h, _ = self.rnn(h)
        return self.head(h[:, -1])


def lstm_rows(shape: tuple[int, ...], classes: int) -> nn.Module:
    return LstmRows(classes)


class ScaledNorm(nn.LayerNorm):
    """A user's LayerNorm subclass: not one of the layers known to read their input once, so a group
    runs it member by member through `_MemberReads`."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * 0.5 + x * 0.5


class OddNormed(nn.Module):
    """Linear to 37, the LayerNorm subclass, SiLU, Linear to 11, LayerNorm, a head: odd widths around
    leaf layers with weights."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.first = nn.Linear(features, 37)
        self.norm = ScaledNorm(37)
        self.second = nn.Linear(37, 11)
        self.norm2 = nn.LayerNorm(11)
        self.head = nn.Linear(11, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.nn.functional.silu(self.norm(self.first(x)))
        return self.head(torch.relu(self.norm2(self.second(h))))


def odd_normed(shape: tuple[int, ...], classes: int) -> nn.Module:
    return OddNormed(shape[0], classes)


class Embedded(nn.Module):
    """A sequence network for the sort task: an Embedding of 7 features a token, a LayerNorm, a Linear to
    13 mixing in the mean over the tokens, and one logit per class a token."""

    def __init__(self, vocabulary: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, 7)
        self.norm = nn.LayerNorm(7)
        self.hidden = nn.Linear(14, 13)
        self.head = nn.Linear(13, vocabulary)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.norm(self.embed(tokens))
        pooled = h.mean(1, keepdim=True).expand_as(h)
        return self.head(torch.relu(self.hidden(torch.cat([h, pooled], -1))))


def embedded(shape: tuple[int, ...], classes: int) -> nn.Module:
    return Embedded(classes)
