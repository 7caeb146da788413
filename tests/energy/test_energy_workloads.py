"""Workload shapes: MAC counts against independent formulas and published totals."""

from __future__ import annotations

import pytest

from dse.errors import InputError
from dse.models.workloads import (
    _REGISTRY,
    GemmLayer,
    Workload,
    attention,
    conv2d,
    get_workload,
    linear,
    register_workload,
    workload_names,
)


def test_conv_layer_macs_match_the_direct_formula() -> None:
    layer, h, w = conv2d("c", c_in=64, c_out=128, kernel=3, h=56, w=56, stride=2)
    assert (h, w) == (28, 28)
    assert layer.macs_per_sample == 128 * 28 * 28 * 64 * 3 * 3
    assert layer.params == 128 * 64 * 3 * 3
    assert layer.a_elems == 64 * 56 * 56  # the real input, not its im2col view
    grouped, _, _ = conv2d("g", c_in=64, c_out=64, kernel=3, h=8, w=8, groups=64)  # depthwise
    assert grouped.macs_per_sample == 64 * 8 * 8 * 3 * 3
    assert grouped.params == 64 * 3 * 3


def test_linear_and_attention_macs() -> None:
    assert linear("fc", 768, 3072, tokens=128).macs_per_sample == 128 * 768 * 3072
    scores, context = attention("a", seq=128, heads=12, d_head=64)
    assert scores.macs_per_sample == context.macs_per_sample == 12 * 128 * 128 * 64
    assert scores.params == 0


@pytest.mark.parametrize(("name", "gmacs", "params_m"), [
    ("resnet50", 4.09, 25.5),   # torchvision: 4.09 GFLOPs (multiply-adds), 25.6 M parameters
    ("resnet18", 1.81, 11.7),   # torchvision: 1.81, 11.7 M
    ("bert-base", 11.2, 109.4), # 2 x 11.2 GFLOPs at sequence 128; 110 M parameters
])
def test_published_totals(name: str, gmacs: float, params_m: float) -> None:
    workload = get_workload(name)
    assert workload.forward_macs() / 1e9 == pytest.approx(gmacs, rel=0.02)
    assert workload.params / 1e6 == pytest.approx(params_m, rel=0.02)


def test_gpt2_small_parameters() -> None:
    assert get_workload("gpt2-small").params / 1e6 == pytest.approx(124, rel=0.01)


def test_proxies_and_registration() -> None:
    assert {"digits-mlp", "m1d-cnn", "sort-transformer"} <= set(workload_names(proxy=True))
    assert get_workload("digits-mlp").forward_macs() == 64 * 128 + 128 * 10
    assert get_workload("m1d-cnn").params == 125 + 1875 + 1875 + 1250 + 3 * 25 + 10  # weights, biases

    def tiny() -> Workload:
        layer = GemmLayer("fc", 1, 4, 2, needs_input_grad=False)
        return Workload("tiny-test", (layer,), batch_size=3, proxy=True)

    register_workload("tiny-test", tiny)
    try:
        assert get_workload("TINY-test").forward_macs(3) == 24
        with pytest.raises(ValueError, match="already registered"):
            register_workload("tiny-test", tiny)
        register_workload("tiny-test", tiny, replace=True)
    finally:
        _REGISTRY.pop("tiny-test")  # leave the registry as the other tests expect it
    with pytest.raises(InputError, match="unknown workload 'nope'"):
        get_workload("nope")
