"""Networks that checkpoint a block of their forward (torch.utils.checkpoint), in both of its forms and
through checkpoint_sequential, always or only while training (as most networks do). The factory takes
the sample shape and the class count (digits: 64 features), as `model: support.checkpointed:factory`."""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential


class Checkpointed(nn.Module):
    """stem -> [block of two Linear layers, checkpointed] -> head."""

    def __init__(self, form: str, classes: int) -> None:
        super().__init__()
        self.form = form
        self.stem = nn.Linear(64, 32)
        self.block = nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 32), nn.Tanh())
        self.head = nn.Linear(32, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.stem(x.reshape(len(x), -1)))
        if self.form == "training_only" and not self.training:
            h = self.block(h)
        elif self.form == "sequential":
            h = checkpoint_sequential(self.block, 2, h, use_reentrant=False)
        else:
            h = checkpoint(self.block, h, use_reentrant=self.form == "reentrant")
        return self.head(h)


def _network(form: str, shape: tuple[int, ...], classes: int) -> nn.Module:
    return Checkpointed(form, classes)


non_reentrant = functools.partial(_network, "non_reentrant")
reentrant = functools.partial(_network, "reentrant")
sequential = functools.partial(_network, "sequential")
training_only = functools.partial(_network, "training_only")
