"""A user's leaf layer that a group runs member by member (dse.train.stacked.PerMemberLayer: a layer
of its own with weights, here calling a GEMM function dse does not convert) gets each member's input,
own weights and output gradient at the address alignment they have alone, so its GEMMs sum as alone.

Member g's slice of the folded input lies g x its size into it, its weight g x the weight's size into
the stacked weight, its output's gradient g x its size into the group's gradient; MKL's sgemm on an
AMD EPYC sums an (m, k) @ (n, k)^T product of 9 or 10 columns otherwise where its first operand starts
off a 16-byte boundary. Before the fix member 1 (seed 55) differed from alone (final losses grouped
against alone, 2 epochs of 114 digits, batch 50, one thread): own_affine int8 2.2553606033325195
against 2.255483388900757, own_einsum int8 2.2564945220947266 against 2.255964517593384 (fp32: the
same final loss, other figures of the result differ). Ablations, each part of the fix left out alone:
without the inputs' alignment own_affine int8 and own_einsum fp32 and int8 differ; without the
weights' own_affine9 fp32 (2.2258785565694175 against 2.2258784770965576); without the gradient's
own_affine_in_wide int8 (2.2672125498453775 against 2.2666166623433432). Member 2 lies 16 bytes past
64 in each: it never differed."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.group_runs import assert_group_trains_as_alone, short_digits

from dse.train import TrainConfig

LEAF_MODELS = str(Path(__file__).resolve().parent.parent / "support" / "leaf_models.py")


@pytest.mark.parametrize(("model", "number_format"), [
    ("own_affine", "int8"),  # the input's alignment
    ("own_einsum", "fp32"),  # the input's alignment, an einsum
    ("own_affine9", "fp32"),  # the weight's alignment
    ("own_affine_in_wide", "int8"),  # the output gradient's alignment
])
@pytest.mark.filterwarnings("ignore::dse.train.layers.UnconvertedGemmWarning")
def test_a_users_leaf_layer_run_member_by_member_trains_each_member_as_alone(model: str,
                                                                            number_format: str) -> None:
    data = short_digits()
    base = TrainConfig(model=f"{LEAF_MODELS}:{model}", dataset="digits", epochs=2, batch_size=50,
                       optimizer="sgd", format=number_format, threads=1,
                       rounding="nearest" if number_format == "fp32" else "pseudo_stochastic")
    configs = [base.replace(seed=3, lr=0.03), base.replace(seed=55, lr=0.05), base.replace(seed=7, lr=0.02)]
    assert_group_trains_as_alone(configs, data)


def test_a_per_member_layers_buffers_updated_in_place_stay_the_members_own_when_aligned() -> None:
    """A BatchNorm1d of 37 features: member 1's weight and running statistics lie 148 bytes into the
    stacked ones, so each member runs on aligned copies, and what BatchNorm writes into its running
    statistics in place is written back into the group's (without that, every member's validation and
    test figures differed from alone)."""
    data = short_digits()
    base = TrainConfig(model=f"{LEAF_MODELS}:norm37", dataset="digits", epochs=2, batch_size=50,
                       optimizer="sgd", format="int8", threads=1, rounding="pseudo_stochastic")
    configs = [base.replace(seed=3, lr=0.03), base.replace(seed=55, lr=0.05)]
    assert_group_trains_as_alone(configs, data)


def test_a_per_member_layers_output_modified_in_place_gives_each_member_its_own_results() -> None:
    """The aligning join of a layer's members' outputs hands on a tensor of its own, not a view (a
    custom Function's view output may not be modified in place: a ReLU(inplace=True) after
    `BatchInnerScale`'s batch-innermost output raised there)."""
    import copy

    import torch
    from support.leaf_models import BatchInnerScale
    from torch import nn

    from dse.train.layers import QuantSwitch
    from dse.train.stacked import stack_models

    members = []
    for seed in range(2):
        torch.manual_seed(seed)
        members.append(nn.Sequential(nn.Linear(64, 40), nn.Tanh(), BatchInnerScale(40), nn.ReLU(inplace=True),
                                     nn.Linear(40, 10)))
    x = torch.randn(2, 50, 64, generator=torch.Generator().manual_seed(0))
    group = stack_models([copy.deepcopy(m) for m in members], None, QuantSwitch(), None, x[0])
    together = group(x)
    together.sum().backward()
    stacked_weight = group.net[2].weight
    assert stacked_weight.grad is not None
    for g, member in enumerate(members):
        alone = member(x[g].clone())
        alone.sum().backward()
        assert torch.equal(together[g], alone), g
        assert torch.equal(stacked_weight.grad[g], member[2].weight.grad), g


@pytest.mark.parametrize("layer", ["reassigned", "set from None", "set from None, no weight"])
def test_a_per_member_layer_that_reassigns_a_buffer_keeps_each_members_own(layer: str) -> None:
    """`self.average = 0.9 * self.average + ...` in a layer's forward: each member's new buffer is
    kept in its part of the group's. Before, the next member's swap dropped it, and the group's
    buffer never changed (every member's second output and final buffer differed from alone). A
    buffer registered as None and set by the first training forward (`LazyAverage`): before, every
    member read and kept the last member's tensor (with a weight), or the layer ran once over the
    group's whole batch (without one: the buffer was the group's mean)."""
    import copy

    import torch
    from support.leaf_models import LazyAverage, ReassignedAverage
    from torch import nn

    from dse.train.layers import QuantSwitch
    from dse.train.stacked import stack_models

    layers = {"reassigned": lambda: ReassignedAverage(37), "set from None": lambda: LazyAverage(37),
              "set from None, no weight": lambda: LazyAverage(37, weighted=False)}
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(nn.Sequential(nn.Linear(64, 37), nn.Tanh(), layers[layer](), nn.Linear(37, 10)))
    x = torch.randn(3, 50, 64, generator=torch.Generator().manual_seed(0))
    group = stack_models([copy.deepcopy(m) for m in members], None, QuantSwitch(), None, x[0])
    for training in (True, True, False):
        group.train(training)
        together = group(x)
        together.sum().backward()
        for g, member in enumerate(members):
            member.train(training)
            alone = member(x[g].clone())
            alone.sum().backward()
            assert torch.equal(together[g], alone), g
            assert torch.equal(group.net[2].average[g], member[2].average), g
            for name, parameter in member[2].named_parameters():
                assert torch.equal(getattr(group.net[2], name).grad[g], parameter.grad), (name, g)


@pytest.mark.parametrize(("members", "rows"), [(2, 7), (3, 50)])
def test_a_users_leaf_layer_hands_its_input_the_gradient_in_the_layout_it_has_alone(members: int,
                                                                                  rows: int) -> None:
    """A torch.addmm layer (`OwnAffine`) after a layer whose output is batch-innermost
    (`BatchInnerScale`): alone addmm's backward hands that input a batch-innermost gradient, and the
    scale's weight gradient sums it over the batch in that order. Before, the group joined the
    members' input gradients contiguous (unbind's stack, the aligning copy's CopySlices), and the
    scale's weight and the first Linear's bias got other gradients than alone (fp32, every member, at
    G = 2 and 3, batch 7, 13 and 50)."""
    import copy

    import torch
    from support.leaf_models import BatchInnerScale, OwnAffine
    from torch import nn

    from dse.train.layers import QuantSwitch
    from dse.train.stacked import stack_models

    nets = []
    for seed in range(members):
        torch.manual_seed(seed)
        nets.append(nn.Sequential(nn.Linear(64, 37), nn.Tanh(), BatchInnerScale(37), OwnAffine(37, 10),
                                  nn.Tanh(), nn.Linear(10, 10)))
    x = torch.randn(members, rows, 64, generator=torch.Generator().manual_seed(1))
    group = stack_models([copy.deepcopy(net) for net in nets], None, QuantSwitch(), None, x[0])
    weights = torch.linspace(-1, 1, 10)
    (group(x) * weights).sum().backward()
    stacked = dict(group.net.named_parameters())
    for g, net in enumerate(nets):
        (net(x[g].clone()) * weights).sum().backward()
        for name, parameter in net.named_parameters():
            assert parameter.grad is not None
            assert torch.equal(stacked[name].grad[g], parameter.grad), (name, g)
