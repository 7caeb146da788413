"""Position-dependent elementwise kernels on a folded batch: each member's rows get the bits its
own tensor gets alone (dse/train/member_kernels.py, benchmarks/stacked_kernels.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from dse.train.member_kernels import MemberKernelMode, member_kernel

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu, "sigmoid": torch.sigmoid, "method sigmoid": Tensor.sigmoid,
    "gelu tanh": lambda x: F.gelu(x, approximate="tanh"), "softplus": F.softplus, "mish": F.mish,
    "elu": F.elu, "selu": F.selu, "2 ** x": lambda x: 2 ** x, "pow(2, x)": lambda x: torch.pow(2.0, x),
    "exp2": torch.exp2, "x.pow(x)": lambda x: x.abs().pow(x),
    "silu in place": lambda x: F.silu(x * 1, inplace=True),
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("members, rows, width", [(8, 50, 37), (4, 300, 37), (3, 1000, 41)],
                         ids=["below-grain", "group-above-grain", "member-above-grain"])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_a_folded_batchs_activation_and_its_gradient_are_each_members_alone(
        name: str, members: int, rows: int, width: int, threads: int) -> None:
    """Without the mode, a member's last rows * width mod 32 elements take the scalar tail alone but
    the vector kernel in the group (and the threads split the group elsewhere): at these sizes the
    whole call differs from alone in the last bit for every function here (measured, torch 2.13)."""
    op = ACTIVATIONS[name]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(members * rows, width, generator=torch.Generator().manual_seed(0)) * 3
        x.requires_grad_()
        weight = torch.linspace(-1, 1, width)
        with MemberKernelMode(members):
            folded = op(x)
        (folded * weight).sum().backward()
        assert x.grad is not None
        for g, block in enumerate(x.detach().chunk(members)):
            alone_x = block.clone().requires_grad_()
            alone = op(alone_x)
            (alone * weight).sum().backward()
            assert torch.equal(folded[g * rows:(g + 1) * rows], alone), g
            assert torch.equal(x.grad[g * rows:(g + 1) * rows], alone_x.grad), g
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("members, each", [(16, 1000), (3, 33001), (4, 4096)])
def test_member_kernel_gives_each_members_block_its_bits_alone(members: int, each: int, threads: int) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.rand(members, each, generator=torch.Generator().manual_seed(1)) * 20 - 10
        stacked = member_kernel(lambda t: torch.pow(2.0, t), x, members)
        for g in range(members):
            assert torch.equal(stacked[g], torch.pow(2.0, x[g].clone()))
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m, k, n", [(64, 1536, 64), (256, 1536, 64), (64, 64, 1536), (3, 5, 4)])
def test_a_stacked_gemm_gives_each_member_its_own_mm_on_any_thread_count(m: int, k: int, n: int,
                                                                        threads: int) -> None:
    """At 2 threads torch splits a member's mm among the threads but a bmm by its entries: with a
    long reduction (a weight gradient's K = batch rows, 1536 for the transformer proxy) their sums
    differ in the last bit, so a stacked GEMM then runs member by member (`member_gemm`)."""
    from dse.train.stacked import member_gemm

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        source = torch.Generator().manual_seed(0)
        a, b = torch.randn(3, m, k, generator=source), torch.randn(3, k, n, generator=source)
        bias = torch.randn(3, n, generator=source)
        product, affine = member_gemm(a, b), member_gemm(a, b, bias)
        for g in range(3):
            assert torch.equal(product[g], a[g] @ b[g])
            assert torch.equal(affine[g], torch.addmm(bias[g], a[g], b[g]))
    finally:
        torch.set_num_threads(previous)
