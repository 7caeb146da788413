"""A function whose backward sums a sample's terms inside torch (var, std, var_mean, std_mean: the
input's mean; repeat, tile, repeat_interleave: the copies' gradients; F.normalize: its norm's
broadcast; F.rms_norm and F.cosine_similarity, forward too) gives each member its values and gradient
alone: over an axis outside the samples in memory that sum's order depends on how many
samples the call holds, G x B where alone B, and torch sums in C++, where no mode sees it
(dse.train.member_kernels.INNER_SUM_FUNCTIONS, run member by member by MemberKernelMode through
`_OwnBackwards`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support.benchmark_scripts import load_benchmark
from support.group_gemms import torch_threads
from support.group_runs import assert_group_trains_as_alone, short_digits
from torch import Tensor

from dse.data import load_dataset
from dse.train import TrainConfig, member_kernels, train
from dse.train.grouped import train_group
from dse.train.member_kernels import MemberKernelMode, cat_as_alone

peak_bytes: Callable[[Callable[[], object]], int] = load_benchmark("state_kept",
                                                                   keep_registered=False).peak_bytes
"""The most CPU memory torch held at once while a run ran (benchmarks/state_kept.py)."""
LEAF_MODELS = str(Path(__file__).resolve().parent.parent / "support" / "leaf_models.py")
INNER_SUMS: dict[str, Callable[[Tensor], Tensor]] = {
    "t.var(1)": lambda t: t.var(1),
    "t.var(1, unbiased=False)": lambda t: t.var(1, unbiased=False),
    "torch.var(input=, dim=, correction=0)": lambda t: torch.var(input=t, dim=1, correction=0),
    "t.var(dim=[1], keepdim=True)": lambda t: t.var(dim=[1], keepdim=True),
    "t.std(1, keepdim=True)": lambda t: t.std(1, keepdim=True),
    "torch.std(t, 1, True, True)": lambda t: torch.std(t, 1, True, True),
    "torch.std_mean(t, 1)": lambda t: torch.mul(*torch.std_mean(t, 1)),
    "torch.var_mean(dim=1, keepdim=True)": lambda t: torch.sub(*torch.var_mean(t, dim=1, keepdim=True)),
    "column.repeat(1, 36)": lambda t: t[:, :1].repeat(1, 36) * t[:, :36],
    "column.repeat((1, 36))": lambda t: t[:, :1].repeat((1, 36)) * t[:, :36],
    "mean.repeat(1, C)": lambda t: t.mean(1, keepdim=True).repeat(1, t.shape[1]) * t,
    "column.tile((1, 36))": lambda t: t[:, :1].tile((1, 36)) * t[:, :36],
    "torch.tile(column, (36,))": lambda t: torch.tile(t[:, :1], (36,)) * t[:, :36],
    "column.repeat_interleave(36, dim=1)": lambda t: t[:, :1].repeat_interleave(36, dim=1) * t[:, :36],
    "torch.repeat_interleave(input=, repeats=, dim=)":
        lambda t: torch.repeat_interleave(input=t[:, :1], repeats=36, dim=1) * t[:, :36],
    "var repeated along C": lambda t: t.var(1, keepdim=True).repeat(1, t.shape[1]) + t,
    "F.normalize(t, dim=1)": lambda t: F.normalize(t, dim=1),
    "F.normalize(input=, p=1.0, dim=1)": lambda t: F.normalize(input=t, p=1.0, dim=1),
    "F.normalize(t, 3.0, 1, 1e-6)": lambda t: F.normalize(t, 3.0, 1, 1e-6),
    "F.rms_norm(t, (C,))": lambda t: F.rms_norm(t, (t.shape[1],)),
    "F.cosine_similarity(t, u, dim=1)": lambda t: F.cosine_similarity(t, t * 0.5 + 1.0, dim=1),
    "torch.einsum('bc->b', t)": lambda t: torch.einsum("bc->b", t),
    "torch.einsum('bc->cb', [t]).t()": lambda t: torch.einsum("b c -> c b", [t]).t() + 1.0,
    "F.instance_norm(t[None])": lambda t: F.instance_norm(t.unsqueeze(0)).squeeze(0),
    "normalized over its std": lambda t: F.normalize(t, dim=1) / t.std(1, keepdim=True).add(0.5),
    "normalized plus its variance":
        lambda t: F.normalize(t, dim=1) + 0.5 * t.var(1, keepdim=True).repeat(1, t.shape[1]),
}
"""Calls over a tracked (G*B, C) tensor, the members' samples on its first axis, that sum over C in
their backward; `column`: its first channel, (G*B, 1), whose copies' gradients are summed."""


def _members_and_alone(op: Callable[[Tensor], Tensor], members: int, rows: int, channels: int,
                       input_batch_innermost: bool, gradient_batch_innermost: bool, seed: int
                       ) -> tuple[tuple[Tensor, Tensor], list[tuple[Tensor, Tensor]]]:
    """(the group's values and input gradient under the mode, each member's alone on fresh tensors)."""
    generator = torch.Generator().manual_seed(seed)
    if input_batch_innermost:  # the members' (B, C) views of (C, B) tensors joined batch-innermost
        parts = [torch.randn(channels, rows, generator=generator).t() for _ in range(members)]
        folded = torch.cat([p.t() for p in parts], 1).t().requires_grad_()
    else:
        parts = [torch.randn(rows, channels, generator=generator) for _ in range(members)]
        folded = torch.cat(parts).requires_grad_()
    with MemberKernelMode(members, rows):
        together = op(folded)
    shape = (rows, *together.shape[1:])
    if gradient_batch_innermost and together.dim() > 1:
        dys = [torch.randn(*shape[1:], rows, generator=generator).movedim(-1, 0) for _ in parts]
        joined = torch.cat([dy.movedim(0, -1) for dy in dys], -1).movedim(-1, 0)
    else:
        dys = [torch.randn(shape, generator=generator) for _ in parts]
        joined = torch.cat(dys)
    (gradient,) = torch.autograd.grad(together, folded, joined)
    alone = []
    for part, dy in zip(parts, dys, strict=True):
        own = part.clone(memory_format=torch.preserve_format).requires_grad_()  # fresh, laid out as alone
        value = op(own)
        alone.append((value, *torch.autograd.grad(value, own, dy.clone(memory_format=torch.preserve_format))))
    return (together, gradient), alone


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("members", "rows", "channels"), [(2, 7, 37), (3, 14, 40), (2, 50, 40), (3, 50, 37)])
@pytest.mark.parametrize(("input_batch_innermost", "gradient_batch_innermost"),
                         [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("spelling", sorted(INNER_SUMS))
def test_a_function_summing_inside_torch_gives_each_member_its_values_and_gradient_alone(
        spelling: str, input_batch_innermost: bool, gradient_batch_innermost: bool, members: int, rows: int,
        channels: int, threads: int) -> None:
    """Values and input gradient bit for bit, the gradient in the layout the members' own join as
    alone (`cat_as_alone`): the layer before sums it in that layout's order. Before, under the mode,
    25-26 of 30 member blocks' gradients differed (G 2-3, B 7/14/50, C 37/40, one thread): var and
    std with the input batch-innermost, repeat, tile, repeat_interleave and F.normalize with the
    output's gradient batch-innermost, rms_norm and cosine_similarity either way (their values in
    22-25) (benchmarks/member_inner_sums.py --ablate)."""
    with torch_threads(threads):
        (together, gradient), alone = _members_and_alone(
            INNER_SUMS[spelling], members, rows, channels, input_batch_innermost, gradient_batch_innermost,
            seed=members * rows + channels)
    for g, (value, own_gradient) in enumerate(alone):
        assert torch.equal(together[g * rows:(g + 1) * rows], value), g
        assert torch.equal(gradient[g * rows:(g + 1) * rows], own_gradient), g
    own_strides = alone[0][1].stride()
    if torch.empty_like(alone[0][1]).stride() == own_strides:  # dense: joined in the members' layout
        assert gradient.stride() == cat_as_alone([own_gradient for _, own_gradient in alone]).stride()
    else:  # an expanded gradient (a sum's backward), as each member's alone
        assert gradient.stride() == own_strides


@pytest.mark.parametrize("spelling", ["t.var(1)", "t.std(1, keepdim=True)", "torch.std_mean(t, 1)",
                                      "column.repeat(1, 36)", "column.tile((1, 36))",
                                      "column.repeat_interleave(36, dim=1)", "F.normalize(t, dim=1)",
                                      "F.rms_norm(t, (C,))", "F.cosine_similarity(t, u, dim=1)",
                                      "torch.einsum('bc->b', t)", "F.instance_norm(t[None])"])
def test_without_own_backwards_a_function_summing_inside_torch_gives_members_other_bits(
        spelling: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ablation: the mode without INNER_SUM_FUNCTIONS (the group's call as it is) gives some
    member's values or gradient other bits than alone on the shapes the test above checks, so that test
    can fail (a one-operand einsum's values, the others' gradients)."""
    monkeypatch.setattr(member_kernels, "INNER_SUM_FUNCTIONS", frozenset())
    differing = 0
    with torch_threads(1):
        for members, rows, channels in [(2, 7, 37), (3, 14, 40), (2, 50, 40), (3, 50, 37)]:
            (together, gradient), alone = _members_and_alone(INNER_SUMS[spelling], members, rows, channels,
                                                             True, True, seed=members * rows + channels)
            differing += sum(not torch.equal(gradient[g * rows:(g + 1) * rows], own)
                             or not torch.equal(together[g * rows:(g + 1) * rows], value)
                             for g, (value, own) in enumerate(alone))
    assert differing > 0


@pytest.mark.parametrize("spelling", ["normalized over its std", "normalized plus its variance"])
def test_without_a_term_per_edge_an_input_used_again_after_normalize_gets_other_gradients(
        spelling: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ablation of `_OwnBackwards`'s terms per edge: F.normalize uses its input twice (divided by
    its norm), and handed on as one summed term its gradient adds to the input's later use's (std, var)
    in another order than alone: every member block differs (3 of 3, G 3, B 7, C 40), where the test
    above finds none with a term per edge."""
    monkeypatch.setattr(member_kernels, "_edges_into", lambda outputs, leaf: [])
    differing = 0
    with torch_threads(1):
        for members, rows, channels in [(3, 7, 40), (2, 50, 37)]:
            (_, gradient), alone = _members_and_alone(INNER_SUMS[spelling], members, rows, channels,
                                                      True, True, seed=members * rows + channels)
            differing += sum(not torch.equal(gradient[g * rows:(g + 1) * rows], own)
                             for g, (_, own) in enumerate(alone))
    assert differing > 0


@pytest.mark.parametrize("threads", [1, 2])
def test_a_function_summing_inside_torch_without_a_gradient_gives_each_member_its_values_alone(
        threads: int) -> None:
    """Under no_grad (an evaluation) the values are each member's own too, and untracked calls over a
    batch-outermost input run once: the mode does nothing for them."""
    members, rows, channels = 3, 7, 37
    generator = torch.Generator().manual_seed(3)
    parts = [torch.randn(channels, rows, generator=generator) for _ in range(members)]
    folded = torch.cat(parts, 1).t()
    mode = MemberKernelMode(members, rows)
    with torch_threads(threads), torch.no_grad():
        for op in INNER_SUMS.values():
            with mode:
                together = op(folded)
            for g, part in enumerate(parts):
                assert torch.equal(together[g * rows:(g + 1) * rows], op(part.clone().t())), g
        plain = MemberKernelMode(members, rows)
        with plain:
            torch.randn(members * rows, channels).var(1)
    assert not plain.seen


def test_a_function_summing_over_the_members_samples_runs_as_it_is() -> None:
    """A call that reduces across the samples' axis (var over the batch, over every axis) is not split:
    alone each member's batch statistics are its own, which a group cannot give by splitting (grouped
    training trains such a network one by one, its forward depending on the batch)."""
    mode = MemberKernelMode(3, 5)
    x = torch.randn(6, 15).t().requires_grad_()
    with mode:
        x.var(0), x.std(), torch.var_mean(x, (0, 1)), x.var(False)
    assert not mode.seen


def test_a_split_functions_members_outputs_are_joined_in_their_layout_alone() -> None:
    """A function run member by member (POSITION_DEPENDENT_FUNCTIONS: pow) on a batch-innermost input
    joins the members' outputs batch-innermost, as alone, not contiguous: a mean over C after it summed
    in another order than alone. Before, `t * t.pow(2).mean(1, keepdim=True).add(1e-6).rsqrt()` gave 28
    of 30 member blocks other values than alone under the mode (20 without it; G 2-3, B 7/14/50, C
    37/40, one thread)."""
    def rms(t: Tensor) -> Tensor:
        return t * t.pow(2).mean(1, keepdim=True).add(1e-6).rsqrt()

    with torch_threads(1):
        for members, rows, channels in [(2, 7, 37), (3, 14, 40), (2, 50, 40)]:
            (together, gradient), alone = _members_and_alone(rms, members, rows, channels, True, True,
                                                             seed=rows)
            for g, (value, own_gradient) in enumerate(alone):
                assert torch.equal(together[g * rows:(g + 1) * rows], value), g
                assert torch.equal(gradient[g * rows:(g + 1) * rows], own_gradient), g


@pytest.mark.parametrize(("batch_size", "fmt"), [(7, "fp32"), (50, "fp32"), (7, "int8")])
def test_a_batch_innermost_output_standardized_by_its_own_statistics_trains_as_alone(
        batch_size: int, fmt: str) -> None:
    """leaf_models' batch_inner_statistics (a layer with a weight of its own returning a batch-innermost
    (B, C) view; F.normalize over C plus its variance repeated along C, over its std): before, at
    batch 7 in fp32 every member differed (seed 11's final loss 1.8393009480308085 grouped against
    1.839300934006186 alone), and with F.normalize's gradient handed on as one term, not a term per
    edge, too."""
    base = TrainConfig(model=f"{LEAF_MODELS}:batch_inner_statistics", dataset="digits", epochs=2,
                       batch_size=batch_size, optimizer="sgd", format=fmt, threads=1)
    configs = [base.replace(seed=seed, lr=lr) for seed, lr in ((11, 0.03), (12, 0.05), (13, 0.02))]
    assert_group_trains_as_alone(configs, short_digits())


def test_a_users_layer_using_its_input_twice_inside_torch_trains_as_alone() -> None:
    """leaf_models' normed_residual: torch's RMSNorm layer (run member by member in a group, having a
    weight of its own) on an input that a residual adds again. F.rms_norm uses its input twice inside
    C++; a member's two gradient terms were summed in its slice before reaching the input, where alone
    the residual's term is added between them: every member differed (fp32, batch 7)."""
    base = TrainConfig(model=f"{LEAF_MODELS}:normed_residual", dataset="digits", epochs=2, batch_size=7,
                       optimizer="sgd", format="fp32", threads=1)
    configs = [base.replace(seed=seed, lr=lr) for seed, lr in ((11, 0.03), (12, 0.05), (13, 0.02))]
    assert_group_trains_as_alone(configs, short_digits())


def test_a_group_of_a_network_of_them_takes_at_most_g_times_one_trials_memory_plus_a_constant() -> None:
    """leaf_models' batch_inner_statistics, batch 1024, fp32, a group of 4: the members' graphs are
    built again in the backward, not kept from the forward, where they held each member's outputs
    and inputs laid out as alone beside the group's: 8.25 MiB against 1.37 MiB alone (6.0x; 5.51 MiB,
    4.0x, without INNER_SUM_FUNCTIONS)."""
    data = load_dataset("digits")
    data = dataclasses.replace(data, x_train=data.x_train[:1024], y_train=data.y_train[:1024],
                               x_val=data.x_val[:100], y_val=data.y_val[:100], x_test=data.x_test[:100],
                               y_test=data.y_test[:100])
    config = TrainConfig(model=f"{LEAF_MODELS}:batch_inner_statistics", dataset="digits", epochs=1,
                         batch_size=1024, format="fp32", optimizer="sgd", threads=1)
    alone = peak_bytes(lambda: train(config, data))
    group = peak_bytes(lambda: train_group([config.replace(seed=seed) for seed in range(4)], data))
    assert group <= 4 * alone + 2**20


def test_an_inputs_gradient_terms_that_do_not_all_come_are_handed_on_summed_with_a_warning(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Should a term per edge not come (here: no node hook keeps it), the input gets the terms' sum,
    whose last bits a later use of the input may add in another order than alone: said, not silent."""
    monkeypatch.setattr(member_kernels, "_keeper", lambda held, term, index: lambda inputs, outputs: None)
    with torch_threads(1), pytest.warns(member_kernels.SummedTermsWarning, match="normalize"):
        (_, gradient), alone = _members_and_alone(INNER_SUMS["normalized over its std"], 3, 7, 40, True, True,
                                                  seed=1)
    assert gradient.shape == (21, 40)
