"""A network quantize_model quantized, and a group of them stacked (dse/train/stacked.py), pickle as
they deep-copy: every quantizer is a module-level callable (functools.partial or a small class), not a
lambda, so a copy through pickle (a worker's result, torch.save) trains bit for bit as the original."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dse.data import load_dataset
from dse.formats.base import MemberGenerators
from dse.models.proxies import build_model
from dse.train.config import TrainConfig
from dse.train.layers import QuantSwitch, UnconvertedGemmWarning, quantize_model
from dse.train.policy import QuantPolicy
from dse.train.stacked import stack_models

MEMBERS, ROWS, STEPS = 2, 6, 3


def _trained(model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    """The parameters and last output after STEPS steps of plain SGD on (x, y)."""
    out = x
    for _ in range(STEPS):
        out = model(x.clone())
        F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
                    p.grad = None
    return [out.detach(), *(p.detach().clone() for p in model.parameters())]


@pytest.mark.parametrize("grouped", [False, True], ids=["alone", "group"])
@pytest.mark.parametrize("model, dataset", [("mlp", "digits"), ("cnn", "digits"), ("transformer", "sort")])
@pytest.mark.parametrize("trial", [{"format": "int8", "rounding": "stochastic"},
                                   {"format": "posit(8,1)", "accumulation": "fp16", "layer_scaling": True},
                                   {"format": "mxfp8_e4m3", "rounding": "stochastic"}],
                         ids=["int8-stochastic", "posit8-accumulated", "mxfp8"])
def test_quantized_layers_train_after_a_pickle_round_trip_as_the_original(
        model: str, dataset: str, grouped: bool, trial: dict[str, object]) -> None:
    data = load_dataset(dataset)
    torch.manual_seed(0)
    nets = [build_model(model, data) for _ in range(MEMBERS if grouped else 1)]
    policy = QuantPolicy.from_config(TrainConfig(model=model, dataset=dataset, **trial))  # type: ignore[arg-type]
    generators = [torch.Generator().manual_seed(g) for g in range(len(nets))]
    rows = data.x_train[:len(nets) * ROWS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnconvertedGemmWarning)
        if grouped:
            original: nn.Module = stack_models(nets, policy, QuantSwitch(), MemberGenerators(generators),
                                               rows[:4])
            x = rows.reshape(len(nets), ROWS, *rows.shape[1:])
        else:
            original = nets[0]
            quantize_model(original, policy, generators[0], example_input=rows[:2])
            x = rows
    y = data.y_train[:len(nets) * ROWS]
    y = y.reshape(*x.shape[:x.dim() - rows.dim() + 1], *y.shape[1:])
    copied = pickle.loads(pickle.dumps(original))
    for got, want in zip(_trained(copied, x, y), _trained(original, x, y), strict=True):
        assert torch.equal(got, want)
