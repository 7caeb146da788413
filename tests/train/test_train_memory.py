"""Memory of grouped training (dse/train/memory.py): a group of G takes at most G times one trial's
training memory plus a constant, the estimate of one trial's memory is not below what it takes, and
a group that would not fit its device trains split, says so, and gives every member the same result."""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable
from typing import Any

import pytest
from support.benchmark_scripts import load_benchmark
from torch import Tensor

from dse.data import load_dataset
from dse.models.proxies import build_model
from dse.train import TrainConfig, train
from dse.train.grouped import GroupSplitWarning, train_group, trial_training_bytes
from dse.train.memory import MEMORY_FRACTION, describe_bytes, members_that_fit

MiB = 2**20


pytestmark = pytest.mark.usefixtures("one_thread")


def _subset(name: str, train: int = 192) -> Any:
    data = load_dataset(name)
    return dataclasses.replace(data, x_train=data.x_train[:train], y_train=data.y_train[:train],
                               x_val=data.x_val[:100], y_val=data.y_val[:100], x_test=data.x_test[:100],
                               y_test=data.y_test[:100])


_peak_bytes: Callable[[Callable[[], object]], int] = load_benchmark("state_kept",
                                                                   keep_registered=False).peak_bytes
"""The most CPU memory torch held at once while a run ran (benchmarks/state_kept.py)."""


@pytest.mark.parametrize("model, dataset", [("resnet", "mnist1d")])  # conv, BatchNorm, pooling, Linear
def test_a_group_takes_at_most_g_times_one_trials_memory_plus_a_constant(model: str, dataset: str) -> None:
    data = _subset(dataset, train=64)
    config = TrainConfig(model=model, dataset=dataset, epochs=1, batch_size=64, format="int8",
                         optimizer="adam")
    alone = _peak_bytes(lambda: train(config, data))
    group = _peak_bytes(lambda: train_group([config.replace(seed=seed) for seed in range(4)], data))
    assert 3 * alone < group <= 4 * alone + 1 * MiB
    estimate = trial_training_bytes(config, build_model(model, data), data.x_train[:2])
    assert alone <= estimate  # splitting by the estimate never overfills a device


def test_a_group_that_would_not_fit_trains_split_says_so_and_gives_the_same_results() -> None:
    data = _subset("digits")
    base = TrainConfig(model="cnn", dataset="digits", epochs=1, batch_size=64, format="int8")
    configs = [base.replace(seed=seed) for seed in range(3)]
    trial = trial_training_bytes(base, build_model("cnn", data), data.x_train[:2])
    room = int(2.5 * trial / MEMORY_FRACTION)  # two members fit, three do not
    assert members_that_fit(trial, room) == 2
    with pytest.warns(GroupSplitWarning, match="groups of 3 split into groups of 2 to fit cpu"):
        split = train_group(configs, data, available_bytes=room)
    whole = train_group(configs, data)
    alone = [train(config, data) for config in configs]
    for parts in zip(split, whole, alone, strict=True):
        texts = {repr({**r.to_dict(), "wall_time_s": 0}) for r in parts}
        assert len(texts) == 1
    assert members_that_fit(10 * trial, room) == 1  # too large even alone: trained alone, as ungrouped


def test_memory_is_described_in_binary_units() -> None:
    assert [describe_bytes(n) for n in (512, 1536, 5 * MiB, 3 * 2**30)] == ["512 B", "1.5 KiB", "5.0 MiB",
                                                                           "3.0 GiB"]


def test_a_groups_probes_stay_within_its_planned_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """At 2 threads a group probes its products (dse/train/batched_sums.py): each probe holds random
    operands of a product's layout, the batched output and one member's output beside the run's
    tensors, memory the estimate does not count apart. The probes run when a layout is first met and
    free what they hold before the run goes on, away from its peak: the group's peak is the peak of
    the same group with the probes' answers replayed (nothing probed), within G times the estimate.
    (A transformer group of 32 at 2 threads, 22 probes: 570.5 MiB either way, 1027.1 MiB planned.)"""
    from dse.train import batched_sums

    data = _subset("sort", train=64)
    config = TrainConfig(model="transformer", dataset="sort", epochs=1, batch_size=64, format="int8",
                         threads=2)
    configs = [config.replace(seed=seed) for seed in range(4)]
    answers: list[bool] = []
    probe = batched_sums._probe

    def recorded(*args: Any) -> bool:
        answers.append(probe(*args))
        return answers[-1]

    monkeypatch.setattr(batched_sums, "_DECIDED", {})
    monkeypatch.setattr(batched_sums, "_probe", recorded)
    probed = _peak_bytes(lambda: train_group(configs, data))
    replay = iter(list(answers))
    monkeypatch.setattr(batched_sums, "_DECIDED", {})
    monkeypatch.setattr(batched_sums, "_probe", lambda *args: next(replay))
    replayed = _peak_bytes(lambda: train_group(configs, data))
    assert answers and next(replay, None) is None  # it probed, and the replay met the same layouts
    assert probed <= replayed
    assert probed <= 4 * trial_training_bytes(config, build_model("transformer", data), data.x_train[:2])


@pytest.mark.parametrize("optimizer", ["sgd", "niti"])
def test_a_finished_trial_or_group_leaves_no_tensor_to_the_cyclic_collector(optimizer: str) -> None:
    """What a trial or a group held is freed when it returns, not whenever Python's cyclic collector
    next runs: a group's peak is measured and planned as if nothing of an earlier run remained. Before,
    every look-ahead's recorder (dse/train/functional.py's FunctionalGemms) and its mode referred to
    each other, and the cycle held the model it looked at: a transformer group of 4 left 456 KiB of
    tensors, freed at a moment that depended on how many Python objects the process had made, so that
    the same group's measured peak moved by 25 KB with the tests run before it. NITI's conversion was a
    closure that called itself (a cycle through its cell), which held the converted layers and their
    weights."""
    data = _subset("digits", train=64)
    config = TrainConfig(model="mlp", dataset="digits", epochs=1, batch_size=64, format="int8",
                         optimizer=optimizer)
    import torch._dynamo  # noqa: F401  (imported at a process's first optimizer, its frames in a cycle
    # that holds that run's model: once a process, not a run's)
    gc.collect()
    gc.disable()
    try:
        train(config, data)
        train_group([config.replace(seed=seed) for seed in range(2)], data)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [tuple(o.shape) for o in gc.garbage if isinstance(o, Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        gc.collect()
    assert left == []
