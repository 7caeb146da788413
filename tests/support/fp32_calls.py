"""Networks whose GEMMs training leaves partly in fp32: a GEMM function quantize_model does not convert
(torch.einsum, torch.inner, torch.addmv, torch.addbmm, F.conv_transpose1d/2d/3d) over a parameter,
between quantized nn.Linear layers, and an nn.GRU. Each factory takes the sample shape and the class
count (digits: 64 features), as `model: support.fp32_calls:factory`."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CallNet(nn.Module):
    """fc (quantized) -> relu -> `call` over a parameter (fp32) -> head (quantized)."""

    def __init__(self, call: str, classes: int) -> None:
        super().__init__()
        self.call = call
        self.fc = nn.Linear(64, 32)
        shapes = {"einsum": (16, 32), "inner": (16, 32), "addmv": (32,), "addbmm": (4, 8, 16),
                  "conv_transpose1d": (1, 2, 3), "conv_transpose2d": (1, 2, 3, 3),
                  "conv_transpose3d": (1, 2, 2, 2, 2), "einsum_trace": (32, 32)}
        self.w = nn.Parameter(torch.randn(shapes[call]) / 4)
        width = {"addmv": 33, "conv_transpose1d": 2 * 34, "conv_transpose2d": 2 * 6 * 10,
                 "conv_transpose3d": 2 * 3 * 3 * 5, "einsum_trace": 32 + 1}.get(call, 16)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc(x.reshape(len(x), -1)))
        if self.call == "einsum":
            y = torch.einsum("bi,oi->bo", h, self.w)
        elif self.call == "inner":
            y = torch.inner(h, self.w)
        elif self.call == "addmv":  # one row per sample: h (B, 32) times the vector w
            y = torch.cat([h, torch.addmv(torch.zeros(len(h)), h, self.w).unsqueeze(1)], 1)
        elif self.call == "addbmm":  # the four 8-feature blocks of h, each times its own w block, summed
            y = torch.addbmm(torch.zeros(len(h), 16), h.reshape(len(h), 4, 8).transpose(0, 1), self.w)
        elif self.call == "conv_transpose1d":
            y = F.conv_transpose1d(h.reshape(len(h), 1, 32), self.w)
        elif self.call == "conv_transpose2d":
            y = F.conv_transpose2d(h.reshape(len(h), 1, 4, 8), self.w)
        elif self.call == "conv_transpose3d":
            y = F.conv_transpose3d(h.reshape(len(h), 1, 2, 2, 8)[:, :, :, :, :4], self.w)
        else:  # one-operand einsums: a sum over a weight's trace and a sum of rows (no GEMM)
            y = torch.cat([h + torch.einsum("ii->i", self.w), torch.einsum("bi->b", h).unsqueeze(1)], 1)
        return self.head(y.reshape(len(y), -1))


CALLS = ("einsum", "inner", "addmv", "addbmm", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
"""The GEMM functions training leaves fp32 that a network here calls."""


def _network(call: str, shape: tuple[int, ...], classes: int) -> nn.Module:
    return CallNet(call, classes)


einsum = functools.partial(_network, "einsum")
inner = functools.partial(_network, "inner")
addmv = functools.partial(_network, "addmv")
addbmm = functools.partial(_network, "addbmm")
conv_transpose1d = functools.partial(_network, "conv_transpose1d")
conv_transpose2d = functools.partial(_network, "conv_transpose2d")
conv_transpose3d = functools.partial(_network, "conv_transpose3d")
einsum_trace = functools.partial(_network, "einsum_trace")
