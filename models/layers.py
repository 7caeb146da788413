"""Building blocks the proxies share with users' own models."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Matmul(nn.Module):
    """`a @ b` as a module, so that attention's matmuls can be found and quantized like Linear."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a @ b


class PositionEmbedding(nn.Module):
    """A learned embedding per position, added to a sequence (B, T, d): x + weight[:T]. Initialized
    as N(0, std^2); a layer of its own, so that grouped training can give each member its own."""

    def __init__(self, positions: int, width: int, std: float = 0.02) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(positions, width) * std)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.weight[: x.shape[1]]
