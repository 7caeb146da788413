"""What a grouped step does beyond its members' own arithmetic (dse/train/grouped.py, stacked.py): a
group whose members differ only in their seed steps its optimizer over the stacked parameters
themselves, no slice of them made per step, and each member still equals its run alone bit for bit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dse.data import load_dataset
from dse.models.proxies import build_model
from dse.train import TrainConfig
from dse.train.grouped import _quantized_setup
from dse.train.loop import EXAMPLE_SAMPLES, _run_settings

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = TrainConfig(model="mlp", dataset="digits", epochs=1, batch_size=64)
ONE_RUN_CASES: list[dict[str, Any]] = [
    {"momentum": 0.9, "weight_decay": 1e-3},  # fp32 SGD with momentum and weight decay
    {"format": "int8", "optimizer": "adam", "optimizer_state": "bf16", "master_weights": "fixed(16,8)"},
]


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _group(configs: list[TrainConfig]) -> Any:
    data = load_dataset("digits")
    models = []
    for config in configs:
        torch.manual_seed(config.seed)
        models.append(build_model(config.model, data))
    setup = _quantized_setup(models, configs, [torch.Generator().manual_seed(c.seed) for c in configs],
                             data.x_train[:EXAMPLE_SAMPLES])
    return setup, data


@pytest.mark.parametrize("fields", ONE_RUN_CASES, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_a_group_of_one_run_steps_the_stacked_parameters_with_no_slice_per_step(
        fields: dict[str, Any]) -> None:
    configs = [BASE.replace(seed=seed, **fields) for seed in range(3)]
    with _run_settings(1):
        setup, data = _group(configs)
        setup.on_epoch_start(0)
        index = torch.arange(BASE.batch_size).expand(len(configs), -1)
        stacked = list(setup.model.parameters())
        for _ in range(2):  # the optimizer's state exists from its first step on
            setup.member_losses(setup.model(data.x_train[index]), data.y_train[index])[1].backward()
            with _Ops() as ops:
                setup.step()
            setup.zero_grad()
    optimizer = setup.step.__self__
    assert len(optimizer.runs) == 1
    stepped = [p for group in optimizer.runs[0][2].param_groups for p in group["params"]]
    assert [id(p) for p in stepped] == [id(p) for p in stacked]
    assert not [name for name in ops.names if "slice" in name], ops.names


def test_a_group_of_several_runs_still_steps_each_run_on_its_members_slices() -> None:
    configs = [BASE.replace(seed=0), BASE.replace(seed=1, lr=0.1), BASE.replace(seed=2, lr=0.1)]
    setup, _ = _group(configs)
    optimizer = setup.step.__self__
    assert [(start, stop) for start, stop, _, _ in optimizer.runs] == [(0, 1), (1, 3)]
    for start, stop, _, views in optimizer.runs:
        for view, p in zip(views, setup.model.parameters(), strict=True):
            assert view.shape[0] == stop - start and view.data_ptr() == p[start].data_ptr()


@pytest.mark.parametrize("fields", ONE_RUN_CASES, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_a_group_of_one_run_equals_each_member_alone_bit_for_bit(
        fields: dict[str, Any], digits: Any, stacked_same_as_alone: Callable[..., Any]) -> None:
    results = stacked_same_as_alone([BASE.replace(seed=seed, **fields) for seed in range(3)], digits)
    assert len({r["final_loss"] for r in results}) == 3  # the members are distinct runs
