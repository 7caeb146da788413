"""Fine-tuned networks: a first layer whose weight is frozen and whose bias trains, a layer frozen
whole, a trained head. The factory takes the sample shape and the class count (digits: 64 features),
as `model: support.fine_tuned:frozen_first`."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FrozenFirst(nn.Module):
    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.pre = nn.Linear(features, 32)
        self.mid = nn.Linear(32, 32)
        self.head = nn.Linear(32, classes)
        for param in (self.pre.weight, *self.mid.parameters()):
            param.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.mid(torch.relu(self.pre(x.reshape(len(x), -1))))))


def frozen_first(shape: tuple[int, ...], classes: int) -> nn.Module:
    return FrozenFirst(shape[0], classes)
