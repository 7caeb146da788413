"""Position-dependent elementwise kernels on a folded batch: each member's rows get the bits its
own tensor gets alone (dse/train/member_kernels.py, benchmarks/stacked_kernels.py)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dse.data import load_dataset
from dse.models.proxies import build_model
from dse.train.layers import QuantSwitch
from dse.train.member_kernels import MemberKernelMode, member_kernel
from dse.train.stacked import stack_models

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


class _SigmoidSometimes(nn.Module):
    """sigmoid where `when(self, x)`, else ReLU: a first forward may call none of the mode's functions."""

    def __init__(self, when: Callable[[nn.Module, Tensor], bool]) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 37), nn.Linear(37, 10)
        self.when = when

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        return self.b(torch.sigmoid(h) if self.when(self, x) else torch.relu(h))


@pytest.mark.parametrize("when, passes", [
    (lambda module, x: not module.training, [(True, 1.0)] + [(False, 1.0)] * 4),
    (lambda module, x: bool(x.abs().max() > 5), [(True, 1.0)] + [(True, 10.0)] * 4),
], ids=["eval-mode-branch", "input-dependent-branch"])
def test_a_function_a_users_network_calls_only_on_a_later_forward_runs_member_by_member(
        when: Callable[[nn.Module, Tensor], bool], passes: list[tuple[bool, float]]) -> None:
    """A first forward that calls none of the functions says nothing of the next: with 50 rows of
    37 features a member's sigmoid has a scalar tail alone, so a batched call differs (it did
    when the mode switched itself off after a first forward without them)."""
    torch.manual_seed(0)
    members = [_SigmoidSometimes(when) for _ in range(2)]
    stacked = stack_models([copy.deepcopy(m) for m in members], None, QuantSwitch(), None, torch.randn(4, 64))
    source = torch.Generator().manual_seed(1)
    for training, scale in passes:
        x = torch.randn(2, 50, 64, generator=source) * scale
        for model in (stacked, *members):
            model.train(training)
        with torch.no_grad():
            together = stacked(x)
            for g, member in enumerate(members):
                assert torch.equal(together[g], member(x[g])), (training, scale, g)


@pytest.mark.parametrize("model, dataset", [("mlp", "mnist1d"), ("cnn", "digits"), ("resnet", "digits"),
                                            ("transformer", "sort")])
@pytest.mark.parametrize("spec", ["fp32", "int8", "lns8", "posit8", "mxfp4"])
def test_the_built_in_proxies_call_none_of_the_functions_so_run_without_the_mode(
        model: str, dataset: str, spec: str) -> None:
    """`may_call_position_dependent` lets a network of our own layers run without the mode (it
    costs about a microsecond per torch call); that holds only while no proxy, in train or eval
    mode and under any format's quantizers, calls one of the functions."""
    from dse.formats.base import MemberGenerators
    from dse.train.config import TrainConfig
    from dse.train.policy import QuantPolicy

    data = load_dataset(dataset)
    torch.manual_seed(0)
    networks = [build_model(model, data) for _ in range(2)]
    policy = None if spec == "fp32" else QuantPolicy.from_config(TrainConfig(model=model, dataset=dataset,
                                                                             format=spec))
    generators = MemberGenerators([torch.Generator().manual_seed(g) for g in range(2)])
    stacked = stack_models(networks, policy, QuantSwitch(), generators, data.x_train[:4])
    assert not stacked.position_dependent_kernels
    x = data.x_train[:2 * 20].reshape(2, 20, *data.x_train.shape[1:])
    for training in (True, False):
        stacked.train(training)
        mode = MemberKernelMode(2)
        with mode:
            stacked.net(x.flatten(0, 1)).sum().backward()
        assert not mode.seen, training
