"""A stacked group (dse/train/stacked.py) copies after it trained: `copy.deepcopy`, pickle and
torch.save give a group of its weights, buffers and each member's Python attributes that trains on
as the original does and apart from it. A layer run member by member (`PerMemberLayer`) keeps the
member's slices of the stacked tensors after a forward (views in autograd's graph), which deepcopy
could not copy."""

from __future__ import annotations

import copy
import gc
import io
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from dse.data import load_dataset
from dse.models.proxies import build_model
from dse.train.config import TrainConfig
from dse.train.layers import QuantSwitch
from dse.train.policy import QuantPolicy
from dse.train.stacked import StackedModel, stack_models

LEAF_MODELS = str(Path(__file__).resolve().parent.parent / "support" / "leaf_models.py")


def _torch_saved(model: StackedModel) -> StackedModel:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded: StackedModel = torch.load(buffer, weights_only=False)
    return loaded


COPIES: dict[str, Callable[[StackedModel], StackedModel]] = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda model: pickle.loads(pickle.dumps(model)),
    "torch.save": _torch_saved,
}


def _member_attributes(model: nn.Module) -> list[dict[str, object]]:
    """Each member's own Python attributes of each layer the group runs member by member."""
    return [{k: v for k, v in vars(layer).items() if not k.startswith("_") and k != "training"}
            for module in model.modules() if "member_layers" in vars(module)
            for layer in vars(module)["member_layers"]]


def _step(model: StackedModel, x: torch.Tensor) -> torch.Tensor:
    """One SGD step of every member on x; the loss per member."""
    model.zero_grad()
    loss = model(x).square().mean(dim=tuple(range(1, 3)))
    loss.sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    return loss.detach()


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("model", [f"{LEAF_MODELS}:peak_scaled", f"{LEAF_MODELS}:clamped_affine", "resnet"])
def test_a_group_copied_after_a_step_trains_on_as_the_original_and_apart_from_it(model: str,
                                                                               how: str) -> None:
    """peak_scaled (a user's leaf layer with a running peak and a list), clamped_affine (a user's layer
    that clamps its weight in its forward: each member's parameters as copies), resnet (BatchNorm).
    Before, deepcopy raised after a forward ("Only Tensors created explicitly by the user (graph
    leaves) support the deepcopy protocol")."""
    data = load_dataset("digits")
    torch.manual_seed(0)
    members = [build_model(model, data) for _ in range(2)]
    shape = (2, 10, *data.x_train.shape[1:])
    xs = [data.x_train[start:start + 20].reshape(shape).clone() for start in (0, 20, 40)]
    group = stack_models(members, None, QuantSwitch(), None, xs[0][0])
    group.train()
    _step(group, xs[0])
    copied = COPIES[how](group)
    assert _member_attributes(copied) == _member_attributes(group)
    assert all(torch.equal(a, b) for a, b in zip(copied.state_dict().values(), group.state_dict().values(),
                                                 strict=True))
    for x in xs[1:]:
        assert torch.equal(_step(copied, x.clone()), _step(group, x.clone()))
    assert _member_attributes(copied) == _member_attributes(group)
    weights = [p.detach().clone() for p in group.parameters()]
    _step(copied, xs[0].clone())
    assert all(torch.equal(p, w) for p, w in zip(group.parameters(), weights, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(copied.parameters(), group.parameters(), strict=True))


USER_MODELS = str(Path(__file__).resolve().parent.parent / "support" / "user_models.py")


@pytest.mark.parametrize("how, spec", [*((how, "fp32") for how in COPIES), ("deepcopy", "int8")])
@pytest.mark.parametrize("stepped", [False, True])
def test_a_group_with_functional_gemms_copied_trains_as_the_original_after_the_original_is_gone(
        how: str, spec: str, stepped: bool) -> None:
    """encoder's GEMMs are function calls (F.linear, matmul), run under a torch-function mode that
    refers weakly to their record (dse/train/functional.py: FunctionalGemms), which finds a GEMM's
    operands and names by the ids of the model's modules and tensors. Before, pickle and torch.save
    raised ("cannot pickle 'weakref.ReferenceType' object"), and a deepcopy's forward failed (the
    copy's stacked tensors, of other ids, taken for constants and stacked again), and its mode ran the
    original's record, failing once the original was gone. (A quantized group deep-copies; its
    quantizers, closures, do not pickle.)"""
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = f"{USER_MODELS}:encoder"
    members = [build_model(model, data) for _ in range(2)]
    policy = None if spec == "fp32" else QuantPolicy.from_config(TrainConfig(model=model, dataset="digits",
                                                                             format=spec))
    xs = [data.x_train[start:start + 20].reshape(2, 10, -1).clone() for start in (0, 20, 40)]
    group = stack_models(members, policy, QuantSwitch(), None, xs[0][0])
    group.train()
    if stepped:
        _step(group, xs[0])
    copied = COPIES[how](group)
    losses = [_step(group, x.clone()) for x in xs[1:]]
    del group
    gc.collect()
    assert all(torch.equal(_step(copied, x.clone()), loss) for x, loss in zip(xs[1:], losses, strict=True))
