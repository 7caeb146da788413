"""A user's own network for dse: a small ResNet for 28x28 grey images (MNIST 5k).

dse calls `small_resnet(sample_shape, num_classes)` after seeding torch, so the initial weights follow
the trial's seed. Every Linear and Conv2d is a GEMM that dse quantizes and prices; BatchNorm, ReLU and
pooling stay in fp32. Use it as `model: model.py:small_resnet` in a sweep file next to this one, or
`dse train --model examples/own_model/model.py:small_resnet --dataset mnist5k`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Block(nn.Module):
    """Two 3x3 convolutions with batch norm and a shortcut (a strided 1x1 convolution on a shape change)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """stem (stride 2) -> blocks of 16, 32 (stride 2) channels -> global average pool -> head."""

    def __init__(self, side: int, channels: int, classes: int) -> None:
        super().__init__()
        self.side, self.channels = side, channels
        self.stem = nn.Sequential(nn.Conv2d(channels, 16, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = Block(16, 16, 1)
        self.layer2 = Block(16, 32, 2)
        self.head = nn.Linear(32, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], self.channels, self.side, self.side)  # MNIST 5k samples are flat (784,)
        y = self.layer2(self.layer1(self.stem(x)))
        return self.head(y.mean((2, 3)))


def small_resnet(sample_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model for samples of `sample_shape` (flat square grey images or (C, H, W))."""
    if len(sample_shape) == 3:
        channels, side = sample_shape[0], sample_shape[1]
    else:
        channels, side = 1, math.isqrt(math.prod(sample_shape))
    return SmallResNet(side, channels, num_classes)
