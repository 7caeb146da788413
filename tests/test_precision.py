"""The tensor-class vocabulary and per-layer rules (dse/precision.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dse.errors import InputError
from dse.precision import (
    FORMAT_FIELDS,
    FP32,
    Layer,
    LayerRule,
    TensorFormats,
    layer_rules,
    read_layer_rules,
    resolve_layers,
)

SPECS = ("int8", "fp8_e4m3", "lns8", "posit8", "bf16")


@given(st.fixed_dictionaries({}, optional={name: st.sampled_from(SPECS) for name in FORMAT_FIELDS}))
def test_shorthand_fills_what_the_specific_fields_leave(fields: dict[str, str]) -> None:
    resolved = TensorFormats.resolve(fields)
    short = fields.get("format")
    for name in ("weights", "activations", "gradients"):
        assert getattr(resolved, name) == fields.get(name, short or FP32)
    # weight gradients follow the gradients field, then the shorthand
    assert resolved.weight_grads == fields.get("weight_grads", fields.get("gradients", short or FP32))
    assert resolved.optimizer_state == fields.get("optimizer_state", FP32)  # never the shorthand


def test_a_rule_resolves_over_the_trials_formats() -> None:
    trial = TensorFormats.resolve({"format": "int8", "optimizer_state": "bf16"})
    assert LayerRule.from_mapping({"match": "x", "weights": "int4"}).over(trial) == TensorFormats(
        "int4", "int8", "int8", "int8", "bf16")
    # the rule's own gradients carry to its weight gradients, not the trial's
    rule = LayerRule.from_mapping({"match": "x", "gradients": "fp8_e5m2"})
    assert rule.over(trial).weight_grads == "fp8_e5m2"
    assert LayerRule.from_mapping({"match": "x", "format": FP32}).over(trial) == TensorFormats(
        optimizer_state="bf16")


LAYERS = [Layer("stem", types=("Conv2d",)), Layer("blocks.0.attn.qkv", types=("Linear",)),
          Layer("blocks.0.attn.scores", ("blocks.0.attn",), ("Matmul",), has_weight=False),
          Layer("blocks.0.mlp", types=("MyLinear", "Linear")), Layer("head", types=("Linear",))]


def test_first_matching_rule_wins_and_unmatched_layers_take_the_trial_formats() -> None:
    trial = TensorFormats.resolve({"format": "int8"})
    rules = layer_rules([{"match": "head", "format": FP32}, {"match": "blocks.*", "weights": "int4"},
                         {"match": "*.mlp", "format": "lns8"}])
    out = resolve_layers(LAYERS, rules, trial)
    assert out["head"] == TensorFormats()
    assert out["blocks.0.attn.qkv"].weights == "int4" and out["blocks.0.attn.qkv"].activations == "int8"
    assert out["blocks.0.mlp"].weights == "int4"  # the earlier rule wins over *.mlp
    assert out["stem"] == trial


def test_type_rules_match_a_class_or_a_base_class() -> None:
    rules = layer_rules([{"match": "type:Linear", "format": "int4"},
                         {"match": "type:conv2d", "format": "lns8"}])
    out = resolve_layers(LAYERS, rules, TensorFormats())
    assert out["blocks.0.mlp"].weights == "int4"  # MyLinear is a Linear
    assert out["stem"].weights == "lns8"  # class names are case-insensitive
    assert out["blocks.0.attn.scores"] == TensorFormats()


def test_a_functional_gemm_answers_to_its_owner_module_name() -> None:
    out = resolve_layers(LAYERS, layer_rules([{"match": "blocks.0.attn", "activations": "bf16"}]),
                         TensorFormats())
    assert out["blocks.0.attn.scores"].activations == "bf16" and out["blocks.0.attn.qkv"] == TensorFormats()


def test_full_precision_shorthand_keeps_the_first_and_last_weight_layers_in_fp32() -> None:
    trial = TensorFormats.resolve({"format": "int8"})
    out = resolve_layers(LAYERS, (), trial, full_precision=("first", "last"))
    assert out["stem"] == out["head"] == TensorFormats()
    assert out["blocks.0.attn.qkv"] == trial


def test_a_rule_that_matches_no_layer_is_an_error_naming_it() -> None:
    rules = (LayerRule("hed", (("format", FP32),), "sweep.yaml:12"),)
    problem = r"^sweep.yaml:12: layer rule \{match: 'hed'\} matches no GEMM layer"
    with pytest.raises(InputError, match=problem):
        resolve_layers(LAYERS, rules, TensorFormats())


@pytest.mark.parametrize(("raw", "problem"), [
    ({"match": "a", "wieghts": "int8"}, "unknown key 'wieghts'"),
    ({"format": "int8"}, "missing key 'match'"),
    ({"match": "a"}, "gives no format"),
    ({"match": "a", "format": 8}, "a format is a spec string"),
    ("head", "expected a mapping"),
])
def test_malformed_rules_are_one_line_errors(raw: object, problem: str) -> None:
    with pytest.raises(InputError, match=problem):
        layer_rules([raw])


def test_cli_rules_come_as_yaml_json_or_a_file(tmp_path) -> None:
    expected = layer_rules([{"match": "head", "format": "fp32"}])
    assert read_layer_rules("[{match: head, format: fp32}]") == expected
    assert read_layer_rules('[{"match": "head", "format": "fp32"}]') == expected
    path = tmp_path / "rules.yaml"
    path.write_text("layers:\n  - {match: head, format: fp32}\n")
    assert read_layer_rules(str(path)) == expected
    with pytest.raises(InputError, match="no such file"):
        read_layer_rules(str(tmp_path / "missing.yaml"))


def test_the_vocabulary_has_no_torch_so_energy_can_use_it() -> None:
    import subprocess
    import sys

    code = "import sys, dse.precision; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
