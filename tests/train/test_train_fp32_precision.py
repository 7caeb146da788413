"""A run's fp32 arithmetic is IEEE fp32 whatever precision the caller set (dse/train/fp32.py): torch runs
cuDNN convolutions in TF32 by default, and `set_float32_matmul_precision("high"/"medium")` or the
per-backend `fp32_precision` settings run matmuls in TF32 (cuBLAS) or through oneDNN's bf16 math
mode (on the CPU). Each case runs in a fresh process: torch's precision settings start as a user's
process starts them, and none of them leaks into the other tests."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

_READ = """
import json
import torch
from torch import nn
from dse.train import TrainConfig, train
from dse.train.fp32 import LEVELS, precision
from support.tiny_datasets import digits

def legacy(read):
    try:
        return read()
    except RuntimeError:
        return "refused"  # torch refuses a legacy read after a mix of the two APIs

def convolution_tf32():  # what torch's convolution hands cuDNN (`allowTF32CuDNN(CONV)`), traced on any device
    convolution = lambda x: torch.ops.aten.convolution.default(x, x, None, [1], [0], [1], False, [0], 1)
    traced = torch.jit.trace(convolution, torch.ones(1, 1, 3)).inlined_graph
    (node,) = [node for node in traced.nodes() if node.kind() == "aten::_convolution"]
    return list(node.inputs())[-1].toIValue()

def settings():
    levels = {"/".join(level): precision(level) for level in [("generic", "all"), *LEVELS]}
    return {**levels, "cuDNN convolution's allow_tf32": convolution_tf32(),
            "float32_matmul_precision": legacy(torch.get_float32_matmul_precision),
            "cuda.matmul.allow_tf32": legacy(lambda: torch.backends.cuda.matmul.allow_tf32),
            "cudnn.allow_tf32": legacy(lambda: torch.backends.cudnn.allow_tf32)}

def followed():  # what each level reads under two generic settings: which follow the generic one
    generic = precision(("generic", "all"))
    reads = {}
    for probe in ("ieee", "tf32"):
        torch.backends.fp32_precision = probe
        reads[probe] = {"/".join(level): precision(level) for level in LEVELS}
    torch.backends.fp32_precision = generic
    return reads

seen = []

class Watched(nn.Module):
    def __init__(self, width, classes):
        super().__init__()
        self.layer = nn.Linear(width, classes)

    def forward(self, x):
        seen.append(settings())
        return self.layer(x)

def run(**fields):
    config = TrainConfig(dataset="digits", epochs=1, batch_size=64, **fields)
    return train(config, dataset=digits(), model=lambda shape, classes: Watched(shape[0], classes))
"""


def _in_a_process(code: str) -> dict[str, Any]:
    """Run `code` (after `_READ`) in a fresh Python process; its last line of output is a JSON object."""
    done = subprocess.run([sys.executable, "-c", _READ + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300, env=_environment())
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def _environment() -> dict[str, str]:
    import os
    from pathlib import Path

    tests = Path(__file__).resolve().parents[1]
    paths = [str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in paths if path)}


CALLERS = {
    "torch's defaults (cuDNN TF32 on)": "",
    "legacy high": 'torch.set_float32_matmul_precision("high")',
    "legacy medium": 'torch.set_float32_matmul_precision("medium")',
    "legacy cuBLAS and cuDNN flags": "torch.backends.cuda.matmul.allow_tf32 = True\n"
                                     "torch.backends.cudnn.allow_tf32 = False",
    "new cuda matmul tf32": 'torch.backends.cuda.matmul.fp32_precision = "tf32"',
    "new conv tf32, oneDNN bf16": 'torch.backends.cudnn.conv.fp32_precision = "tf32"\n'
                                  'torch.backends.mkldnn.matmul.fp32_precision = "bf16"',
    "new generic tf32": 'torch.backends.fp32_precision = "tf32"',
}
"""What a caller may have set before calling train, with either of torch's two APIs."""

IEEE = {"cuda/all": "ieee", "mkldnn/all": "ieee", "cuda/matmul": "ieee", "cuda/conv": "ieee",
        "cuda/rnn": "ieee", "mkldnn/matmul": "ieee", "mkldnn/conv": "ieee", "mkldnn/rnn": "ieee",
        "generic/all": "ieee", "cuDNN convolution's allow_tf32": False, "float32_matmul_precision": "highest",
        "cuda.matmul.allow_tf32": False}
"""Every level of torch's precision tree, and the legacy matmul flags, as a run reads them."""


@pytest.mark.parametrize("caller", list(CALLERS))
def test_a_run_computes_fp32_in_ieee_and_gives_the_callers_precision_back(caller: str) -> None:
    """Inside the run every level of torch's precision tree reads IEEE and the legacy matmul flags read
    off (readable: the two APIs agree); the legacy cuDNN flag, left alone, reads off where the caller
    turned it off and is refused where it is on (torch refuses it where it disagrees with the tree).
    Afterwards every setting reads as the caller left it (a legacy flag the caller made unreadable
    included), and a level that followed the generic one follows it again."""
    out = _in_a_process(CALLERS[caller] + textwrap.dedent("""
        before = settings(), followed()
        run()
        print(json.dumps({"before": before, "inside": seen, "after": [settings(), followed()]}))
    """))
    cudnn = False if out["before"][0]["cudnn.allow_tf32"] is False else "refused"
    assert out["inside"] and all(inside == {**IEEE, "cudnn.allow_tf32": cudnn} for inside in out["inside"])
    assert out["after"] == out["before"]
    assert {**IEEE, "cudnn.allow_tf32": cudnn} != out["before"][0]  # the caller's setting is not the run's


def test_a_callers_medium_matmul_precision_trains_bit_for_bit_as_highest() -> None:
    """On a CPU with bf16 instructions "medium" sends fp32 matmuls to oneDNN's bf16 math mode, which
    changes a plain product's bits here; a run under it gives the very numbers of a run under
    "highest"."""
    out = _in_a_process("""
        a, b = torch.randn(64, 300), torch.randn(300, 50)
        exact = a @ b
        torch.set_float32_matmul_precision("medium")
        changes = bool((a @ b != exact).any())
        medium = run(format="fp8_e4m3", weights="fp32")
        torch.set_float32_matmul_precision("highest")
        highest = run(format="fp8_e4m3", weights="fp32")
        print(json.dumps({"changes": changes, "medium": [medium.loss_curve, medium.test_accuracy],
                          "highest": [highest.loss_curve, highest.test_accuracy]}))
    """)
    if not out["changes"]:
        pytest.skip("\"medium\" does not change an fp32 matmul on this CPU")
    assert out["medium"] == out["highest"]


def test_a_precision_set_by_the_runs_own_code_leaves_the_legacy_api_readable() -> None:
    """A user's model may call `set_float32_matmul_precision` during the run; afterwards the legacy
    matmul precision reads the caller's value again, not one that disagrees with the tree (which
    torch refuses to read)."""
    out = _in_a_process("""
        from dse.train.fp32 import ieee_fp32
        before = settings(), followed()
        with ieee_fp32():
            torch.set_float32_matmul_precision("high")
        print(json.dumps({"before": before, "after": [settings(), followed()]}))
    """)
    assert out["after"] == out["before"]


def test_a_torch_without_the_precision_tree_runs_in_ieee_through_the_legacy_flags() -> None:
    """pyproject admits torch 2.2, whose only precision settings are the legacy ones (the tree came in
    2.9): there a run sets the matmul precision to "highest" and cuDNN's TF32 flag off, and writes the
    caller's values back afterwards."""
    out = _in_a_process("""
        import dse.train.fp32
        dse.train.fp32.has_precision_tree = lambda: False  # as torch before 2.9
        def reads():
            return {"matmul": torch.get_float32_matmul_precision(),
                    "cudnn": torch.backends.cudnn.allow_tf32, "convolution": convolution_tf32()}
        torch.set_float32_matmul_precision("medium")
        before = reads()
        class Legacy(nn.Module):
            def __init__(self, width, classes):
                super().__init__()
                self.layer = nn.Linear(width, classes)
            def forward(self, x):
                seen.append(reads())
                return self.layer(x)
        train(TrainConfig(dataset="digits", epochs=1, batch_size=64), dataset=digits(),
              model=lambda shape, classes: Legacy(shape[0], classes))
        print(json.dumps({"before": before, "inside": seen[0], "after": reads()}))
    """)
    assert out["before"] == {"matmul": "medium", "cudnn": True, "convolution": True}
    assert out["inside"] == {"matmul": "highest", "cudnn": False, "convolution": False}
    assert out["after"] == out["before"]
