"""Networks a researcher brings as their own, as the user audit of own networks wrote them: a GRU read at
its last step, an LSTM read from its final state, a weight used by two GEMMs (tied through `.t()`, a
layer applied again), and `torch.cdist` against a layer's weight (prototypes) and between a sample's
tokens. Each factory takes the sample shape and the class count (digits: 64 features, 8x8 images), as
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
