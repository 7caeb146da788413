"""The check the member-kernel and checkpointing tests share: a group of users' networks, stacked,
gives each member the output and gradients it gets alone, bit for bit."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from dse.train.layers import QuantSwitch
from dse.train.stacked import stack_models


def assert_each_member_as_alone(nets: list[nn.Module], rows: int, threads: int,
                                weight: Tensor | None = None) -> None:
    """Stack `nets` (64 input features), run the group's forward and backward (loss: the output's
    sum, weighted by `weight` along its last axis) on `rows` samples a member at `threads` threads,
    then each net alone on its own samples: each member's output, input gradient and parameter
    gradients equal alone's, and no torch-function mode is left on the stack."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        group = stack_models([copy.deepcopy(m) for m in nets], None, QuantSwitch(), None, torch.randn(4, 64))
        x = torch.randn(len(nets), rows, 64, generator=torch.Generator().manual_seed(0)) * 3
        folded = x.clone().requires_grad_()
        together = group(folded)
        (together if weight is None else together * weight).sum().backward()
        assert torch._C._len_torch_function_stack() == 0
        assert folded.grad is not None
        stacked = dict(group.net.named_parameters())
        for g, member in enumerate(nets):
            own = x[g].clone().requires_grad_()
            alone = member(own)
            (alone if weight is None else alone * weight).sum().backward()
            assert torch.equal(together[g], alone), g
            assert torch.equal(folded.grad[g], own.grad), g
            for name, p in member.named_parameters():
                grad = stacked[name].grad
                assert (p.grad is None) == (grad is None), (g, name)
                assert p.grad is None or torch.equal(grad[g], p.grad), (g, name)
    finally:
        torch.set_num_threads(previous)
