"""Users' networks whose forward depends on its batch's size (len(x), x.shape[0]), for the tests of
`dse.train.batch_dependence`: a group runs them on its folded G x B rows, alone they see B. Each
takes digits' 64 features (`model: file.py:factory`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SizeSwitch(nn.Module):
    """SiLU as one call at `threshold` rows or more, as sigmoid times its input below (two paths
    that agree to rounding); `eval_only`: only in evaluation mode, plain SiLU in training."""

    def __init__(self, width: int, classes: int, threshold: int, eval_only: bool = False) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(width, 37), nn.Linear(37, classes)
        self.threshold, self.eval_only = threshold, eval_only

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        if self.eval_only and self.training:
            return self.head(F.silu(h))
        return self.head(F.silu(h) if len(h) >= self.threshold else h * torch.sigmoid(h))


def silu_switch(shape: tuple[int, ...], classes: int) -> nn.Module:
    """Other paths at 10 rows or more: at a batch of 7, a group of 2 folds 14."""
    return SizeSwitch(shape[0], classes, 10)


def last_batch_switch(shape: tuple[int, ...], classes: int) -> nn.Module:
    """Other paths at 20 rows or more: at a batch of 64 on digits' 1293 training samples only the
    epoch's last batch, 13 rows, takes another path alone than in a group (26)."""
    return SizeSwitch(shape[0], classes, 20)


def eval_switch(shape: tuple[int, ...], classes: int) -> nn.Module:
    """Other paths at 200 rows or more, in evaluation mode only: digits' 144 validation samples alone,
    288 in a group."""
    return SizeSwitch(shape[0], classes, 200, eval_only=True)


class _Head(nn.Module):
    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(width, 37), nn.Linear(37, classes)


class SizeScalar(_Head):
    """A factor that depends on the batch's size."""

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        return self.head(h * (2.0 if len(h) > 8 else 3.0))


def size_scalar(shape: tuple[int, ...], classes: int) -> nn.Module:
    return SizeScalar(shape[0], classes)


class PerRow(_Head):
    """A Python loop over the batch's rows: as many calls as rows."""

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        return self.head(torch.stack([torch.tanh(row) for row in h]))


def per_row(shape: tuple[int, ...], classes: int) -> nn.Module:
    return PerRow(shape[0], classes)


class DividedBySize(_Head):
    """Divided by the batch's size: the same calls (a size scaled by G), other values."""

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        return self.head(h / x.size(0))


def divided_by_size(shape: tuple[int, ...], classes: int) -> nn.Module:
    return DividedBySize(shape[0], classes)


class RowPositions(_Head):
    """Adds each row's position in the batch: a group's second member sees positions B.. 2B-1."""

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        return self.head(h + 0.01 * torch.arange(x.shape[0], dtype=h.dtype)[:, None])


def row_positions(shape: tuple[int, ...], classes: int) -> nn.Module:
    return RowPositions(shape[0], classes)


class Normed(nn.Module):
    """BatchNorm (running statistics move in training), a Python counter of forwards and a draw from
    each global generator (torch's, Python's, numpy's): what the check must leave as it found it."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.a, self.norm, self.head = nn.Linear(width, 37), nn.BatchNorm1d(37), nn.Linear(37, classes)
        self.forwards = 0

    def forward(self, x: Tensor) -> Tensor:
        import random

        import numpy as np

        self.forwards += 1
        noise = torch.rand(()) * 0 + random.random() * 0 + float(np.random.rand()) * 0
        return self.head(torch.relu(self.norm(self.a(x)))) + noise


class IntFactor(_Head):
    """An int factor chosen by the batch's size: 1 below 10 rows, 2 from there (at 7 rows a group of 2
    passes 2, twice the 1 alone: a size's scaling, by chance)."""

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        return self.head(h * (1 if x.shape[0] < 10 else 2))


def int_factor(shape: tuple[int, ...], classes: int) -> nn.Module:
    return IntFactor(shape[0], classes)
