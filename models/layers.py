"""Building blocks the proxies share with users' own models."""

from __future__ import annotations

from torch import Tensor, nn


class Matmul(nn.Module):
    """`a @ b` as a module, so that attention's matmuls can be found and quantized like Linear."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a @ b
