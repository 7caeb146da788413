"""A user's layer's Python attributes (not tensors: a step counter, a running float, a list its
forward appends to) are each trial's own in a group, as alone. A layer the group runs member by member
(dse.train.stacked.PerMemberLayer) calls each member's own copy of it; a module the group runs once for
all its members (a user's network, a weightless layer) that its forward leaves with another attribute
than each member's alone trains one by one, with a line saying so; a look-ahead forward (finding the
GEMMs called as functions) leaves them as they were. Grouped results are compared with runs alone on
fresh models and tensors."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from support.group_runs import (
    assert_group_trains_as_alone,
    lines_of_a_stacking_group,
    short_digits,
    train_group_saying,
)
from support.leaf_models import (
    DequeScaled,
    NumpyScaled,
    PeakScaled,
    TrackerScaled,
    WarmedUpScale,
    counted_steps,
    history_scaled,
    peak_scaled,
)

from dse.train import TrainConfig, train
from dse.train.functional import find_gemms
from dse.train.grouped import GroupSplitWarning, group_reason
from dse.train.layers import QuantSwitch
from dse.train.stacked import stack_models

LEAF_MODELS = str(Path(__file__).resolve().parent.parent / "support" / "leaf_models.py")


@pytest.mark.parametrize("layer", ["counter", "float and list"])
def test_a_layer_run_member_by_member_keeps_each_members_python_attributes(layer: str) -> None:
    """Each member's layer counts its own forwards and keeps its own running peak and list. Before,
    the group called the first member's layer for every member: its counter went up G times a
    forward and the members shared one peak (the largest of the group's)."""
    members = 3
    make = (lambda: WarmedUpScale(7, 4)) if layer == "counter" else (lambda: PeakScaled(7))
    torch.manual_seed(0)
    nets = [make() for _ in range(members)]
    alone = [copy.deepcopy(net) for net in nets]
    group = stack_models([copy.deepcopy(net) for net in nets], None, QuantSwitch(), None)
    xs = [torch.randn(members, 5, 7) * (step + 1) for step in range(2)]  # two forwards
    for x in xs:
        out = group(x)
        for g, net in enumerate(alone):
            assert torch.equal(out[g], net(x[g].clone())), g
    per_member = group.net.__dict__["member_layers"]
    for own, net in zip(per_member, alone, strict=True):
        assert {k: getattr(own, k) for k in ("steps", "peak", "seen") if hasattr(net, k)} == \
            {k: getattr(net, k) for k in ("steps", "peak", "seen") if hasattr(net, k)}


@pytest.mark.parametrize("model", ["warmed_up_scale", "peak_scaled"])
@pytest.mark.parametrize("batch_size", [13, 50])
def test_a_layer_keeping_python_state_in_its_forward_trains_grouped_as_alone(
        model: str, batch_size: int) -> None:
    """leaf_models' warmed_up_scale (a step counter) and peak_scaled (a running peak and a list).
    Before, peak_scaled's members shared one peak: 2 of 6 runs differed (seed 11, batch 13:
    2.1204405890570746 grouped against 2.114673283365038 alone); warmed_up_scale trained one by one,
    its counter counted G times a forward (the check said "a member's output is not its own")."""
    base = TrainConfig(model=f"{LEAF_MODELS}:{model}", dataset="digits", epochs=2, batch_size=batch_size,
                       optimizer="sgd", format="fp32", threads=1)
    configs = [base.replace(seed=seed, lr=lr) for seed, lr in ((11, 0.03), (12, 0.05), (13, 0.02))]
    data = short_digits()
    assert group_reason(configs[0], data=data, members=range(2, 4)) is None
    assert_group_trains_as_alone(configs, data)


def test_a_look_ahead_forward_leaves_a_layers_python_attributes_as_they_were() -> None:
    """Finding the GEMMs called as functions runs one forward (dse.train.memory.state_kept): the
    layer's counter, peak and list are as before it. Before, alone a trial's counter started training
    at 1, and in a group only the first member's did."""
    net = peak_scaled((64,), 10)
    warm = WarmedUpScale(5, 4)
    before = (net[1].peak, list(net[1].seen), warm.steps)
    find_gemms(net, torch.randn(2, 64) * 100)
    find_gemms(warm, torch.randn(2, 5))
    assert (net[1].peak, net[1].seen, warm.steps) == before


def test_a_look_ahead_forward_gives_back_what_a_forward_changes_in_place() -> None:
    """A deque, a numpy array and a helper object the forward changes in place are as before it, the
    same objects. Before, state_kept kept only lists', dicts', sets' and tensors' contents."""
    net, arrays, tracked = DequeScaled(64, 10), NumpyScaled(64, 10), TrackerScaled(64, 10)
    recent, running, tracker = net.recent, arrays.running, tracked.tracker
    for model in (net, arrays, tracked):
        find_gemms(model, torch.randn(2, 64))
    assert net.recent is recent and list(recent) == []
    assert arrays.running is running and np.array_equal(running, np.zeros(37))
    assert tracked.tracker is tracker and tracker.value == 0.0


def test_a_network_run_once_that_keeps_state_from_its_batch_trains_one_by_one_and_says_so() -> None:
    """leaf_models' history_scaled (a network with no weights of its own, run once for a group, which
    appends its batch's hidden mean to a list and scales by the list's mean): the group's list would
    hold the group's means. Before, the check passed (the first forward does not read the list) and
    6 of 6 runs differed (batch 13 and 50, seeds 11-13: seed 12 at batch 13 1.9349457555347018 grouped
    against 1.9479853179719713 alone)."""
    base = TrainConfig(model=f"{LEAF_MODELS}:history_scaled", dataset="digits", epochs=2, batch_size=13,
                       optimizer="sgd", format="fp32", threads=1)
    data = short_digits()
    reason = group_reason(base, history_scaled((64,), 10), data, range(2, 4))
    assert reason is not None and "HistoryScaled (the model) writes means in its forward" in reason
    assert_group_trains_as_alone([base.replace(seed=seed) for seed in (11, 12, 13)], data)


def test_a_network_run_once_that_counts_its_forwards_stacks_and_trains_as_alone() -> None:
    """leaf_models' counted_steps: its counter is the same in a group as alone (one forward a step
    either way), so it stacks, and its group trains as one (the counter is written from the first
    forward on: StackedModel's guard lets it be)."""
    base = TrainConfig(model=f"{LEAF_MODELS}:counted_steps", dataset="digits", epochs=2, batch_size=13,
                       optimizer="sgd", format="fp32", threads=1)
    data = short_digits()
    assert group_reason(base, counted_steps((64,), 10), data, range(2, 4)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", GroupSplitWarning)
        assert_group_trains_as_alone([base.replace(seed=11, lr=0.03), base.replace(seed=12, lr=0.05)], data)


@pytest.mark.parametrize(("model", "cause"), [
    ("tied_head", "leaf.weight and head.weight are one tensor (tied weights)"),
    ("tied_scale", "its forward takes leaf.bias, a tensor of a layer the group runs member by member"),
    ("tied_penalty", "its forward takes leaf.weight, a tensor of a layer the group runs member by member"),
    ("tied_small_penalty", "its forward takes leaf.weight, a tensor of a layer the group runs"),
])
def test_a_parameter_of_a_layer_run_member_by_member_taken_by_another_module_trains_one_by_one(
        model: str, cause: str) -> None:
    """leaf_models' TiedToLeaf: the leaf's weight tied to the head's, its bias multiplied in by the
    network, its weight's mean added to the output (times 1e-6: within the forward check's tolerance).
    The network's forward, run once for the group, takes the stacked tensor of every member. Before,
    the scaled and penalised forms trained one by one under another cause ("its forward fails on a
    folded batch", "a member's output is not its own"), and the small penalty stacked: 4 of 6 runs
    differed (fp32, batch 13 and 50, seeds 11-13; seed 11 at batch 13 2.172271251678467 grouped
    against 2.1722711986965604 alone)."""
    base = TrainConfig(model=f"{LEAF_MODELS}:{model}", dataset="digits", epochs=2, batch_size=13,
                       optimizer="sgd", format="fp32", threads=1)
    data = short_digits()
    reason = group_reason(base, data=data, members=range(2, 4))
    assert reason is not None and cause in reason
    assert_group_trains_as_alone([base.replace(seed=seed, lr=lr) for seed, lr in ((11, 0.03), (12, 0.05))],
                                 data)


@pytest.mark.parametrize(("model", "attribute"), [
    ("deque_scaled", "DequeScaled (the model) writes recent"),
    ("numpy_scaled", "NumpyScaled (the model) writes running"),
    ("input_ema", "InputEma (the model) writes ema"),
    ("tracker_scaled", "TrackerScaled (the model) writes tracker"),
])
def test_a_network_run_once_that_keeps_its_batches_statistics_in_place_or_from_its_input_trains_one_by_one(
        model: str, attribute: str) -> None:
    """leaf_models' deque_scaled (a deque it appends to), numpy_scaled (a numpy array it updates in
    place), tracker_scaled (a helper object's running float) and input_ema (a float from its raw
    input's mean). Before, the check saw no in-place change, and both of its members took the same two
    samples (a statistic of the raw input was the same for each): deque_scaled, input_ema and
    tracker_scaled stacked and 3 of 3 runs of each differed (fp32, batch 13, seeds 11-13), numpy_scaled
    trained one by one under another cause (its output)."""
    base = TrainConfig(model=f"{LEAF_MODELS}:{model}", dataset="digits", epochs=2, batch_size=13,
                       optimizer="sgd", format="fp32", threads=1)
    data = short_digits()
    reason = group_reason(base, data=data, members=range(2, 4))
    assert reason is not None and attribute in reason
    assert_group_trains_as_alone([base.replace(seed=seed, lr=lr) for seed, lr in ((11, 0.03), (12, 0.05))],
                                 data)


def test_a_network_run_once_that_writes_an_attribute_from_its_second_step_on_trains_one_by_one_from_the_start(
        ) -> None:
    """leaf_models' late_ema: an EMA of its hidden means, a float it updates from its second training
    forward on, which the one-forward check cannot see. The group finds it at its second forward,
    throws its work away and trains its trials one by one from the start, each as alone, with one line
    naming the attribute, the forward and what it threw away. Before, 3 of 3 runs differed silently
    (fp32, batch 13, seeds 11-13); then the line did not say that the group's work was thrown away."""
    base = TrainConfig(model=f"{LEAF_MODELS}:late_ema", dataset="digits", epochs=2, batch_size=13,
                       optimizer="sgd", format="fp32", threads=1)
    data = short_digits()
    configs = [base.replace(seed=seed, lr=lr) for seed, lr in ((11, 0.03), (12, 0.05))]
    assert group_reason(base, data=data, members=range(2, 4)) is None
    together, lines = train_group_saying(configs, data)
    assert len(lines) == 1
    assert "LateEma (the model) writes ema in a later forward than its first (forward 2)" in lines[0]
    assert ("the group's training so far was thrown away (every member's steps until then) and its 2 trials "
            "trained one by one from the start") in lines[0]
    assert "\n" not in lines[0]
    for config, grouped in zip(configs, together, strict=True):
        alone = train(config, data).to_dict()
        assert repr({**grouped.to_dict(), "wall_time_s": 0}) == repr({**alone, "wall_time_s": 0})


def _configs(factory: str) -> list[TrainConfig]:
    return [TrainConfig(model=f"{LEAF_MODELS}:{factory}", dataset="digits", epochs=2, batch_size=50,
                        seed=seed) for seed in (0, 1)]


@pytest.mark.parametrize("factory", ["python_random_seeded_alike", "torch_generator_seeded_alike"])
def test_a_network_drawing_from_its_own_generator_seeded_alike_trains_grouped_as_alone(factory: str) -> None:
    """One number a training forward from a random.Random or torch.Generator of its own, seeded alike in
    every trial: a group draws it once for all its members, as each draws it alone. Before, the
    forward check refused the group ("a member's output is not its own"): its look-ahead forward
    (finding the GEMMs called as functions) had advanced the first member's generator."""
    configs, data = _configs(factory), short_digits()
    assert group_reason(configs[0], data=data) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", GroupSplitWarning)
        assert_group_trains_as_alone(configs, data)


@pytest.mark.parametrize("factory, attribute", [("python_random_seeded_per_trial", "rng"),
                                                ("torch_generator_seeded_per_trial", "rng"),
                                                ("drawn_temperature", "temperature")])
def test_a_network_run_once_holding_data_drawn_per_trial_trains_one_by_one_and_says_so(
        factory: str, attribute: str) -> None:
    """A generator seeded from each trial's seed, or a float drawn at construction: copies of one
    network agree, so the forward check passes, and a group would give every member the first's.
    Before, drawn_temperature's second member trained with the first's temperature (its result
    differed from alone)."""
    configs, data = _configs(factory), short_digits()
    with pytest.warns(GroupSplitWarning, match=f"holds {attribute}, which differs between the group"):
        assert_group_trains_as_alone(configs, data)


def test_a_network_drawing_noise_of_its_batchs_shape_from_its_own_generator_is_refused_naming_it() -> None:
    """Before, refused as "a member's output is not its own" (the look-ahead's draw, not the batch's)."""
    reason = group_reason(_configs("generator_noise")[0], data=short_digits())
    assert reason is not None and "writes noise in its forward" in reason


def test_a_network_run_once_changing_a_tensor_nested_in_an_attribute_trains_one_by_one_and_says_so() -> None:
    """leaf_models' nested_tensor_ema: a running mean of its batches, a tensor in a list inside a dict,
    updated in place from its third training forward on and never read into Python. Before, the checks
    copied an attribute one level deep (the dict's list was the same object before and after), saw no
    change, and the group shared one running mean: both trials differed silently (fp32, batch 13, seed
    11 1.9891958634058635 grouped against 1.9853385819329157 alone)."""
    base = TrainConfig(model=f"{LEAF_MODELS}:nested_tensor_ema", dataset="digits", epochs=2, batch_size=13,
                       optimizer="sgd", format="fp32", threads=1)
    lines = lines_of_a_stacking_group([base.replace(seed=seed) for seed in (11, 12)], short_digits())
    assert len(lines) == 1 and "writes stats in a later forward than its first (forward 3)" in lines[0]


def test_a_look_ahead_forward_gives_back_a_tensor_nested_in_an_attribute() -> None:
    model = build_leaf("nested_tensor_ema")
    model.steps = 2  # (the next training forward updates the nested running mean in place)
    before = model.stats["means"][0].clone()
    find_gemms(model, torch.randn(3, 64))
    assert model.steps == 2 and torch.equal(model.stats["means"][0], before)


def test_a_network_holding_cyclic_attributes_trains_grouped_as_alone() -> None:
    """leaf_models' cyclic_counter counts its forwards in a helper object holding itself and in a dict
    holding itself. Before, comparing the group's attributes with a member's alone recursed without end
    (RecursionError from group_reason)."""
    base = TrainConfig(model=f"{LEAF_MODELS}:cyclic_counter", dataset="digits", epochs=2, batch_size=13,
                       optimizer="sgd", format="fp32", threads=1)
    lines = lines_of_a_stacking_group([base.replace(seed=seed) for seed in (11, 12)], short_digits())
    assert lines == []


def build_leaf(name: str) -> torch.nn.Module:
    from support import leaf_models

    return getattr(leaf_models, name)((64,), 10)


@pytest.mark.parametrize("factory, said", [
    ("drawn_temperature", "holds temperature, which differs between the group's trials"),
    ("constant_then_batch_ema", "reads a value of the group's tensors into Python (torch.Tensor.__float__"),
    ("count_read_int", "reads a value of the group's tensors into Python (torch.Tensor.__int__"),
])
def test_a_niti_group_checks_its_networks_state_as_the_other_methods_groups_do(
        factory: str, said: str) -> None:
    """NITI's stacked network runs a user's network once for all its members as the other methods'
    does, and the same checks drop it: its members' attributes as it stacks them (`attributes_apart`)
    and the shared-state guard over every forward. Before, NITI ran neither, and all three differed
    silently (int8 NITI, batch 13, seed 12: drawn_temperature 1.249616199069553 grouped against
    1.269740151034461 alone, constant_then_batch_ema 1.0571146607398987 against 1.0621780024634466,
    count_read_int 0.9724810189670987 against 1.013699346118503)."""
    base = TrainConfig(model=f"{LEAF_MODELS}:{factory}", dataset="digits", epochs=2, batch_size=13,
                       optimizer="niti", format="int8", threads=1)
    lines = lines_of_a_stacking_group([base.replace(seed=seed) for seed in (11, 12)], short_digits())
    assert len(lines) == 1 and said in lines[0]


def test_a_network_holding_a_layer_outside_its_module_tree_is_refused_a_group_naming_it() -> None:
    """leaf_models' listed_layers holds a residual Linear in a Python list (not nn.ModuleList): outside
    the module tree, so the group's stacking does not reach it, and the forward check's second member
    (its tree's parameters changed) shared the first's too. Before, the group ran the first trial's
    Linear for every member, silently (fp32, batch 13, seed 12 1.9440849357181125 grouped against
    1.9453133742014568 alone)."""
    base = TrainConfig(model=f"{LEAF_MODELS}:listed_layers", dataset="digits", epochs=2, batch_size=13,
                       optimizer="sgd", format="fp32", threads=1)
    data = short_digits()
    reason = group_reason(base, data=data, members=range(2, 4))
    assert reason is not None and "holds a Linear in blocks[] outside its module tree" in reason
    assert_group_trains_as_alone([base.replace(seed=seed) for seed in (11, 12)], data)


class _CountingScale(torch.nn.Module):
    """A user's weightless layer that counts its training forwards in a Python int."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        return x * (1.0 + 1e-3 * self.steps)


class _HoldingOutside(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(6, 5)
        self.norms = [torch.nn.BatchNorm1d(5)]
        self.__dict__["scale"] = _CountingScale()  # (a plain attribute: not registered)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(self.norms[0](self.a(x)))


def test_a_look_ahead_forward_gives_back_the_state_of_modules_held_outside_the_module_tree() -> None:
    """A BatchNorm in a Python list and a user's counting layer in a plain attribute: before, state_kept
    took the module tree's modules only, and a look-ahead forward left the BatchNorm's running mean and
    batch count advanced and the counter at 1."""
    model = _HoldingOutside()
    find_gemms(model, torch.randn(4, 6))
    norm = model.norms[0]
    assert model.scale.steps == 0 and int(norm.num_batches_tracked) == 0
    assert torch.equal(norm.running_mean, torch.zeros(5)) and torch.equal(norm.running_var, torch.ones(5))


class _ListedActivation(torch.nn.Module):
    """A Linear and an activation held in a Python list: torch's weightless layer, or the user's own."""

    def __init__(self, own: bool) -> None:
        super().__init__()
        self.a = torch.nn.Linear(6, 5)
        self.acts = [_CountingScale() if own else torch.nn.ReLU()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.acts[0](self.a(x))


def test_torchs_weightless_layer_outside_the_module_tree_stacks_and_a_users_own_is_refused() -> None:
    from dse.train.stacked import stack_reason

    example = torch.randn(4, 6)
    assert stack_reason(_ListedActivation(own=False), example) is None
    reason = stack_reason(_ListedActivation(own=True), example)
    assert reason is not None and "holds a _CountingScale in acts[] outside its module tree" in reason
