"""A layer a group runs member by member (dse.train.stacked.PerMemberLayer) that writes its own
state in its forward keeps each member's as alone: a parameter it modifies in place (a max-norm
clamp under no_grad, or through `.data`), a buffer registered as None and set later (also
tests/train/test_train_grouped_align_leaf.py). Grouped results are compared with runs alone on fresh
models and tensors."""

from __future__ import annotations

import copy
import json
import sqlite3
from pathlib import Path

import pytest
import torch
from support.group_runs import assert_group_trains_as_alone, short_digits
from torch import nn

from dse.sweep import parse_config, run_sweep
from dse.sweep.executors import InlineExecutor
from dse.sweep.store import STORE_FILE
from dse.train import TrainConfig, train
from dse.train.grouped import GroupSplitWarning, group_reason, train_group
from dse.train.layers import QuantSwitch
from dse.train.stacked import stack_models

LEAF_MODELS = str(Path(__file__).resolve().parent.parent / "support" / "leaf_models.py")


@pytest.mark.parametrize(("model", "number_format", "optimizer", "master_weights"), [
    ("max_norm_affine", "fp32", "sgd", "true"),
    ("max_norm_affine", "int8", "adam", "bf16"),  # an optimizer with a master copy in a format
    ("max_norm_affine", "lns8", "lns-madam", "true"),  # an optimizer that keeps its own codes
    ("clamped_affine", "fp32", "sgd", "true"),  # written through .data
    ("clamped_affine", "int8", "adamw", "bf16"),
    ("shared_clamped_affine", "fp32", "sgd", "true"),  # one layer called twice in a forward
])
@pytest.mark.filterwarnings("ignore::dse.train.layers.UnconvertedGemmWarning")
def test_a_layer_that_writes_its_parameters_in_its_forward_trains_grouped_as_alone(
        model: str, number_format: str, optimizer: str, master_weights: str) -> None:
    """Before, a max-norm clamp under no_grad failed in a group (the members' parameters were unbind
    views), so the trials trained one by one ("its forward fails in a group (RuntimeError: Output 0 of
    Unbind is a view and its base or another view of its base has been modified inplace..."); a
    clamp through `.data` was lost for every member (member 1's weight lies off 64 bytes, so the
    group's weights went to the layer as an aligned copy): seed 3's final loss 2.2843469778696694
    grouped against 2.2843477725982666 alone, fp32."""
    base = TrainConfig(model=f"{LEAF_MODELS}:{model}", dataset="digits", epochs=2, batch_size=50,
                       optimizer=optimizer, format=number_format, threads=1, master_weights=master_weights,
                       rounding="nearest" if number_format == "fp32" else "pseudo_stochastic")
    configs = [base.replace(seed=3, lr=0.03), base.replace(seed=55, lr=0.05)]
    assert group_reason(configs[0]) is None
    assert_group_trains_as_alone(configs, short_digits())


@pytest.mark.filterwarnings("ignore::dse.train.layers.UnconvertedGemmWarning")
def test_a_sweep_groups_a_layer_that_writes_its_parameters_and_stores_what_alone_stores(
        tmp_path: Path) -> None:
    """Through the sweep: no line (the trials group) and the stored results of `group_size: 1`."""
    def sweep(out: Path, group_size: int) -> dict[str, str]:
        text = f"""\
name: writes
seeds: [0, 1]
task: {{model: "{LEAF_MODELS}:max_norm_affine", dataset: digits, epochs: 1}}
energy: {{workloads: [proxy]}}
trials:
  - {{format: [fp32, int8], optimizer: sgd}}
executor: {{group_size: {group_size}}}
output: {out}
"""
        summary = run_sweep(parse_config(text, "s.yaml"), executor=InlineExecutor(), reports=False)
        assert [note for note in summary.notes if "stays fp32" not in note] == []  # (torch.addmm's does)
        with sqlite3.connect(out / STORE_FILE) as connection:
            rows = connection.execute("SELECT trial_id, final_loss, test_accuracy, result FROM trials")
            rows = rows.fetchall()
        stored = {}
        for trial, loss, accuracy, result in rows:
            extra = json.loads(result)
            extra.pop("wall_time_s")
            stored[trial] = repr((loss, accuracy, extra))
        return stored

    assert sweep(tmp_path / "grouped", 2) == sweep(tmp_path / "alone", 1)


def test_an_embedding_with_max_norm_renormalises_each_members_rows_in_a_group_as_alone() -> None:
    """torch's Embedding(max_norm=...) renormalises the rows it looks up in place in its forward:
    before, a group of them failed (unbind's views)."""
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(nn.Sequential(nn.Embedding(20, 7, max_norm=1.0), nn.Flatten(), nn.Linear(35, 4)))
    tokens = torch.randint(0, 20, (3, 6, 5), generator=torch.Generator().manual_seed(0))
    group = stack_models([copy.deepcopy(m) for m in members], None, QuantSwitch(), None, tokens[0])
    for _ in range(2):
        together = group(tokens)
        together.sum().backward()
        for g, member in enumerate(members):
            alone = member(tokens[g].clone())
            alone.sum().backward()
            assert torch.equal(together[g], alone), g
            assert torch.equal(group.net[0].weight[g], member[0].weight), g
            assert torch.equal(group.net[0].weight.grad[g], member[0].weight.grad), g


@pytest.mark.parametrize(("model", "number_format"), [("lazy_average", "int8"),
                                                      ("lazy_average_unweighted", "fp32")])
def test_a_group_with_a_buffer_set_in_the_forward_trains_each_member_as_alone(model: str,
                                                                             number_format: str) -> None:
    """Before: train_group failed (KeyError '2.average': the memory estimate's look-ahead forward set
    the buffer and its restore looked it up by name), and the functional-GEMM look-ahead left member
    0's buffer set, the others' None."""
    base = TrainConfig(model=f"{LEAF_MODELS}:{model}", dataset="digits", epochs=2, batch_size=50,
                       optimizer="sgd", format=number_format, threads=1,
                       rounding="nearest" if number_format == "fp32" else "pseudo_stochastic")
    configs = [base.replace(seed=3, lr=0.03), base.replace(seed=55, lr=0.05)]
    assert_group_trains_as_alone(configs, short_digits())



@pytest.mark.filterwarnings("ignore::dse.train.layers.UnconvertedGemmWarning")
def test_a_shared_layer_whose_second_call_writes_a_saved_parameter_fails_in_a_group_as_alone() -> None:
    """A max-norm layer called twice in one forward (weight sharing) renorms, under no_grad, the
    weight its first call saved for the backward: alone, the backward raises (the weight's version
    moved on). A group must not train it to a result no run alone gives; before, it did (each call
    took fresh copies of its own, so the first call's saved copy was never written)."""
    base = TrainConfig(model=f"{LEAF_MODELS}:shared_max_norm_affine", dataset="digits", epochs=1,
                       batch_size=50, optimizer="sgd", format="fp32", threads=1)
    configs = [base.replace(seed=3), base.replace(seed=55)]
    data = short_digits()
    for config in configs:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            train(config, data)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        train_group(configs, data)


def test_a_buffer_set_from_none_in_some_members_only_trains_them_one_by_one_as_alone() -> None:
    """A layer that sets a buffer registered as None for some members and not others (by their own
    data: seed 1's first batch sets it, seed 3's first epoch never does; the check forwards' samples
    set it in no member) cannot keep it as one stacked buffer: the group's trials train one by one,
    each as alone, and say so. Before, train_group raised ValueError in its first step."""
    base = TrainConfig(model=f"{LEAF_MODELS}:mean_gated_average", dataset="digits", epochs=1,
                       batch_size=50, optimizer="sgd", format="fp32", threads=1)
    configs = [base.replace(seed=3), base.replace(seed=1)]
    assert group_reason(configs[0]) is None
    with pytest.warns(GroupSplitWarning, match="sets buffer 'average'.*trained one by one"):
        assert_group_trains_as_alone(configs, short_digits())


@pytest.mark.filterwarnings("ignore::dse.train.layers.UnconvertedGemmWarning")
def test_the_look_ahead_forwards_leave_a_layers_written_parameters_as_they_were() -> None:
    """The forwards that find functional GEMMs (every trial, alone or grouped) and estimate memory
    leave the model as it was: before, a layer that clamps its weight in its forward came out of
    them clamped (a step's write before the first step)."""
    from support.leaf_models import clamped_affine

    from dse.train.functional import find_gemms
    from dse.train.memory import activation_bytes_per_sample

    torch.manual_seed(0)
    model = clamped_affine((64,), 10)
    with torch.no_grad():
        model.leaf.weight.mul_(3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    example = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    find_gemms(model, example[:2])
    activation_bytes_per_sample(model, example)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
