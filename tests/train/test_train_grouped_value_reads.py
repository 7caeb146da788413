"""A module the group runs once for all its members (a user's network) that reads a value of the
group's tensors into Python, of any dtype (`float(h.mean())`, `int((h > 0).sum())`, `.item()`,
`.tolist()`, `len(h.nonzero())`, an `if` on a count) reads one number for the whole group, where alone
each trial reads its own; what it keeps of it the attribute checks may not see (an attribute whose
first value is the same in every member). Such a read in a later forward than the group's first drops
the group (dse.train.stacked.StackedModel's
shared-state guard, dse.train.member_kernels.MemberKernelMode.read): its trials train one by one, with
one line saying so. Grouped results are compared with runs alone on fresh models and tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.group_runs import (
    assert_group_trains_as_alone,
    lines_of_a_stacking_group,
    short_digits,
    train_group_saying,
)
from torch import Tensor, nn

from dse.train import TrainConfig
from dse.train.batch_dependence import Forward, batch_size_reason
from dse.train.grouped import group_reason
from dse.train.member_kernels import MemberKernelMode

LEAF_MODELS = str(Path(__file__).resolve().parent.parent / "support" / "leaf_models.py")


@pytest.mark.parametrize("model, said", [
    ("constant_then_batch_ema", "torch.Tensor.__float__ of a () torch.float32 tensor"),
    ("constant_then_batch_tensor_ema", "writes tensors in ema in a later forward"),
    ("constant_then_batch_tensor_list", "writes tensors in means in a later forward"),
    ("constant_then_batch_integer_tensor", "writes tensors in count in a later forward"),
])
def test_a_network_keeping_a_value_of_its_batch_where_the_checks_cannot_see_trains_one_by_one_and_says_so(
        model: str, said: str) -> None:
    """leaf_models' constant_then_batch_ema (a float set to 0.0 at its first training forward, the same
    in every member, then updated from its batch's hidden mean),
    constant_then_batch_tensor_ema (the running mean a tensor, never read into Python) and
    constant_then_batch_tensor_list (a list of tensors: a zero first, then its batches' means). Before,
    all four stacked and every run differed silently (fp32, batch 7/13/50, G 2-4, seeds 11..10+G:
    constant_then_batch_ema seed 11 at batch 13 in G 2 1.98894911342197 grouped against
    1.985089103380839 alone). constant_then_batch_integer_tensor: a count of positive units kept as an
    integer tensor; when only floating-point tensor attributes counted, it stacked and differed
    silently (seed 11 1.7453631427552965 grouped against 1.864704926808675 alone)."""
    base = TrainConfig(model=f"{LEAF_MODELS}:{model}", dataset="digits", epochs=2, batch_size=13,
                       optimizer="sgd", format="fp32", threads=1)
    lines = lines_of_a_stacking_group([base.replace(seed=seed) for seed in (11, 12)], short_digits())
    assert len(lines) == 1 and said in lines[0] and "\n" not in lines[0]


def test_a_network_appending_its_batchs_means_to_a_list_inside_a_dict_is_refused_a_group_naming_it() -> None:
    """leaf_models' nested_history: its batches' hidden means appended to a list inside a dict. The
    checks copy an attribute at any depth, so the forward check sees the group's forward append the
    group's mean where each member alone appends its own. Before, they copied one level deep: the
    look-ahead that finds the GEMMs appended to the first member's list and left it so, the group was
    dropped only as it was set up (the members' attributes differed), and every run differed silently
    before that drop was added (27 of 27 runs, fp32, batch 7/13/50, G 2-4)."""
    base = TrainConfig(model=f"{LEAF_MODELS}:nested_history", dataset="digits", epochs=2, batch_size=13,
                       optimizer="sgd", format="fp32", threads=1)
    data = short_digits()
    reason = group_reason(base, data=data, members=range(2, 4))
    assert reason is not None and "writes history in its forward from its batch" in reason
    assert_group_trains_as_alone([base.replace(seed=seed) for seed in (11, 12)], data)


def test_a_network_branching_on_a_comparison_of_its_weights_trains_one_by_one_and_says_so() -> None:
    """leaf_models' weight_peak_branch: `if self.a.weight.abs().max() > 0.25` (a bool read). Its first
    Linear's largest weight passes 0.25 at forward 4 alone for seed 12, at forward 5 for seed 11 (lr 2,
    batch 13); in a group the comparison read both members' weights and seed 11 branched at forward 4
    with seed 12, silently (final loss 3.4887881014082165 grouped against 3.038071142302619 alone)."""
    base = TrainConfig(model=f"{LEAF_MODELS}:weight_peak_branch", dataset="digits", epochs=3, batch_size=13,
                       optimizer="sgd", format="fp32", threads=1, lr=2.0)
    data = short_digits()
    configs = [base.replace(seed=seed) for seed in (11, 12)]
    assert group_reason(base, data=data, members=range(2, 3)) is None
    _, lines = train_group_saying(configs, data)
    assert len(lines) == 1 and "torch.Tensor.__bool__ of a () torch.bool tensor" in lines[0]
    assert_group_trains_as_alone(configs, data)


@pytest.mark.parametrize("model, said", [
    ("count_read_int", "torch.Tensor.__int__ of a () torch.int64 tensor"),
    ("count_read_item", "torch.Tensor.item of a () torch.int64 tensor"),
    ("count_read_tolist", "torch.Tensor.tolist of a (26,) torch.int64 tensor"),
    ("count_read_nonzero", "torch.Tensor.nonzero of a (26, 37) torch.bool tensor"),
    ("count_read_branch", "torch.Tensor.__bool__ of a () torch.int64 tensor"),
    ("count_read_through_detach", "torch.Tensor.__int__ of a () torch.int64 tensor"),
    ("count_read_through_data", "torch.Tensor.__int__ of a () torch.int64 tensor"),
])
def test_a_network_reading_a_count_of_its_batch_into_python_trains_one_by_one_and_says_so(
        model: str, said: str) -> None:
    """leaf_models' ConstantThenBatchCount: a Python int, 0 at the first training forward (the same in
    every member), then a count of its batch's positive hidden units read out of an integer tensor
    (`int()`, `.item()`, `.tolist()`, `len(.nonzero())`, an `if` on its parity). Before, the member mode
    recorded reads of floating-point and bool tensors only, and all five stacked and differed silently
    (fp32, batch 13, seeds 11 and 12: count_read_int seed 11 1.7453631824917264 grouped against
    1.864704926808675 alone, count_read_branch 1.9069008297390408 against 1.737455791897244).
    count_read_through_{detach,data}: a zero made in the forward, written with the count through an
    alias of it (`.detach()`, `.data`: no view, another tensor of the same memory), then read. Before,
    the mode knew constants by tensor, and the write took the alias off its constants but not the
    zero: both stacked and differed silently (seed 11 1.7453631824917264 grouped against
    1.864704926808675 alone)."""
    base = TrainConfig(model=f"{LEAF_MODELS}:{model}", dataset="digits", epochs=2, batch_size=13,
                       optimizer="sgd", format="fp32", threads=1)
    lines = lines_of_a_stacking_group([base.replace(seed=seed) for seed in (11, 12)], short_digits())
    assert len(lines) == 1 and said in lines[0] and "\n" not in lines[0]


def test_the_member_mode_records_the_first_read_of_a_tensor_that_may_hold_the_groups_values() -> None:
    mode = MemberKernelMode(2, 3)
    group = torch.randn(6, 4)  # (made outside the mode: the folded batch, a weight, an attribute)
    with mode:
        int(torch.arange(6).sum())  # (made in the forward from no tensor of the group's: a constant)
        positions = torch.ones(3, 3).triu().nonzero()
        assert bool(torch.equal(positions, positions)) and len(positions.tolist()) == 6
        group.sum(1) * 2.0
        sparse = torch.sparse_coo_tensor(torch.tensor([[0, 1], [1, 0]]), torch.ones(2), (2, 2))
        int(sparse.to_dense().sum())  # (a tensor with no storage to show: a constant all the same)
    assert mode.read is None
    with mode:
        counts = torch.zeros(2, dtype=torch.long)
        counts.add_((group > 0).sum(0)[:2])  # (a constant written with the group's values)
        counts.tolist()
    assert mode.read == "torch.Tensor.tolist of a (2,) torch.int64 tensor"
    mode.read = None
    with mode:
        counts = torch.zeros(2, dtype=torch.long)
        counts.detach().copy_((group > 0).sum(0)[:2])  # (written through an alias: the same memory)
        counts.tolist()
    assert mode.read == "torch.Tensor.tolist of a (2,) torch.int64 tensor"
    for read, said in [(lambda: bool(group.max() > 0), "__bool__ of a () torch.bool tensor"),
                       (lambda: int((group > 0).sum()), "__int__ of a () torch.int64 tensor"),
                       (lambda: group[group > 0], "__getitem__ of a (6, 4) torch.float32 tensor"),
                       (lambda: torch.where(group > 0), "torch.where of a (6, 4) torch.bool tensor"),
                       (lambda: 0.5 in group, "__contains__ of a (6, 4) torch.float32 tensor"),
                       (lambda: bool(torch.rand(()) > 0.5), "__bool__ of a () torch.bool tensor")]:
        mode.read = None
        mode.constants.clear()
        with mode:
            group[:, 1:] * 2  # (slicing sizes nothing by values)
            read()
        assert mode.read is not None and mode.read.endswith(said)


def test_a_layer_run_member_by_member_that_keeps_its_batches_peaks_trains_grouped_as_alone() -> None:
    """leaf_models' peak_window_scaled: a layer with a weight of its own dividing by the largest
    magnitude of its last 3 training batches, kept in a deque. Before, the batch-size check read its
    peak on 4 rows other than on 2 in the last bit (a GEMM over 4 rows runs another kernel) and took the
    divisor for a size branch ("call 8, Tensor.div, takes other arguments"): its trials trained one by
    one at batch 7 and 13. With that check off, 0 of 15 runs differed grouped (fp32, batch 7/13/50, G
    2-3, seeds 11..10+G)."""
    base = TrainConfig(model=f"{LEAF_MODELS}:peak_window_scaled", dataset="digits", epochs=2, batch_size=7,
                       optimizer="sgd", format="fp32", threads=1)
    data = short_digits()
    assert group_reason(base, data=data, members=range(2, 5)) is None
    assert_group_trains_as_alone([base.replace(seed=seed) for seed in (11, 12, 13)], data)


class _SumScaled(nn.Module):
    """Divides by its batch's summed magnitude, read into Python: G times as large on G x B rows."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        return h / float(h.detach().abs().sum())


def test_a_value_read_that_scales_with_the_batch_is_still_found_by_the_batch_size_check() -> None:
    reason = batch_size_reason(_SumScaled(), torch.randn(2, 8), [Forward(7, True)], [2])
    assert reason is not None and "Tensor.div" in reason


def test_a_causal_mask_built_in_the_forward_is_no_value_read_and_one_built_before_it_is() -> None:
    """nn.TransformerEncoder compares a mask given without `is_causal` with a causal one (a bool read):
    of a mask the forward made from constants, a value every member reads alike; of one made before
    the forward (an attribute, an argument), one the mode cannot tell from the group's."""
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1,
                                    enable_nested_tensor=False)
    x, before = torch.randn(6, 5, 8), nn.Transformer.generate_square_subsequent_mask(5)
    reads = []
    for built_inside in (True, False):
        mode = MemberKernelMode(2, 3)
        with mode:
            encoder(x, mask=nn.Transformer.generate_square_subsequent_mask(5) if built_inside else before)
        reads.append(mode.read)
    assert reads == [None, "torch.Tensor.__bool__ of a () torch.bool tensor"]
