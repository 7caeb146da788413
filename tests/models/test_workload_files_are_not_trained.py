"""A network file dse reads only for its GEMM shapes (an ONNX file, a YAML or CSV list of layer shapes)
is priced, never trained: named as the model to train, by `dse train` or a sweep's task, it is refused
with one line that says so and what to give instead, not called an unknown built-in model."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from dse.cli import app
from dse.models.workloads import get_workload

runner = CliRunner()


def _onnx_file(path: Path) -> Path:
    pytest.importorskip("onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        network = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        torch.onnx.export(network, (torch.zeros(1, 64),), str(path), dynamo=False, input_names=["x"])
    return path


def _train(path: Path) -> list[str]:
    return ["train", "--model", str(path), "--dataset", "digits", "--epochs", "1"]


def _refused(result: object, path: Path) -> None:
    assert result.exit_code == 2, result.output  # type: ignore[attr-defined]
    lines = result.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output  # type: ignore[attr-defined]
    assert str(path) in lines[0] and "cannot train" in lines[0] and "file.py:function" in lines[0], lines[0]


def test_an_onnx_network_is_priced_but_refused_as_a_model_to_train(tmp_path: Path) -> None:
    path = _onnx_file(tmp_path / "net.onnx")
    assert len(get_workload(str(path)).layers) == 2  # the file is a network dse prices
    _refused(runner.invoke(app, _train(path)), path)
    sweep = tmp_path / "onnx.yaml"
    sweep.write_text(f"name: onnx\ntask: {{model: {path}, dataset: digits, epochs: 1, batch_size: 32}}\n"
                     f"trials: [{{format: fp32}}]\noutput: {tmp_path / 'out'}\n")
    _refused(runner.invoke(app, ["sweep", str(sweep)]), path)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["layers.yaml", "layers.csv"])
def test_a_list_of_layer_shapes_is_refused_as_a_model_to_train(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    _refused(runner.invoke(app, _train(path)), path)
