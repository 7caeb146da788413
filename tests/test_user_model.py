"""A user's own model and dataset (`file.py:function`, `package.module:function`, a factory in Python):
training, sweeps (paths, identity by source hash, process pool, Ray), and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

from dse.cli import app
from dse.data import load_dataset
from dse.errors import InputError
from dse.sweep import expand, load_trials, parse_config, run_sweep
from dse.sweep.executors import TrialJob, execute_trial
from dse.train.config import TrainConfig
from dse.train.loop import train
from dse.usercode import absolute, parse_ref

MODEL_FILE = '''
import torch
from torch import nn


def tiny(sample_shape, num_classes):
    """A 64-32-classes MLP whose width follows the dataset."""
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(sample_shape).prod()), 32), nn.ReLU(),
                         nn.Linear(32, num_classes))


def functional(sample_shape, num_classes):
    return Functional(int(torch.tensor(sample_shape).prod()), num_classes)


class Functional(nn.Module):
    """GEMMs written as F.linear and @ in forward, as users do."""

    def __init__(self, d_in, classes):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(16, d_in) * 0.1)
        self.w2 = nn.Parameter(torch.randn(16, classes) * 0.1)

    def forward(self, x):
        return torch.relu(nn.functional.linear(x.flatten(1), self.w1)) @ self.w2


def raises(sample_shape, num_classes):
    raise RuntimeError("no GPU here")


def not_a_module(sample_shape, num_classes):
    return [1, 2]


def wrong_output(sample_shape, num_classes):
    return nn.Linear(64, num_classes + 1)


def wrong_input(sample_shape, num_classes):
    return nn.Linear(7, num_classes)


class _IntegerLogits(nn.Linear):
    def forward(self, x):
        return super().forward(x).round().long()


def integer_logits(sample_shape, num_classes):
    return _IntegerLogits(64, num_classes)


def frozen(sample_shape, num_classes):
    return nn.Linear(64, num_classes).requires_grad_(False)


class _FailsInTraining(nn.Linear):
    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            raise RuntimeError("a shape this network does not expect")
        return super().forward(x)


def fails_in_training(sample_shape, num_classes):
    return _FailsInTraining(64, num_classes)


NOT_CALLABLE = 3
'''

DATA_FILE = '''
import numpy as np
import torch


def _blobs(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 8)).astype(np.float32) + 2.0 * np.eye(3, 8, dtype=np.float32)[y]
    return x, y


def four():
    x, y = _blobs(300, 0)
    xt, yt = _blobs(90, 1)
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(xt), torch.from_numpy(yt)


def six():
    x, y = _blobs(300, 0)
    xv, yv = _blobs(60, 2)
    xt, yt = _blobs(90, 1)
    return x, y, xv, yv, xt, yt


def as_dict():
    x, y = _blobs(300, 0)
    xt, yt = _blobs(90, 1)
    return {"x_train": x, "y_train": y, "x_test": xt, "y_test": yt, "num_classes": 5}


def float_labels():
    x, y = _blobs(30, 0)
    return x, y.astype(np.float32), x, y


def mismatched():
    x, y = _blobs(30, 0)
    return x, y[:-1], x, y


def a_string():
    return "data"


def global_random():
    x = torch.randn(40, 4) + torch.from_numpy(np.random.rand(40, 4)).float()
    y = torch.arange(40) % 2
    return x[:30], y[:30], x[30:], y[30:]
'''


@pytest.fixture()
def nets(tmp_path: Path) -> Path:
    folder = tmp_path / "nets"
    folder.mkdir()
    (folder / "model.py").write_text(MODEL_FILE)
    (folder / "data.py").write_text(DATA_FILE)
    return folder


def _config(model: str, dataset: str = "digits", **fields: object) -> TrainConfig:
    return TrainConfig(model=model, dataset=dataset, epochs=1, batch_size=64, **fields)  # type: ignore[arg-type]


# --- references ------------------------------------------------------------------------------------

@given(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True),
       st.from_regex(r"[a-z][a-z0-9_/]{0,12}", fullmatch=True))
def test_a_reference_is_a_py_file_or_dotted_module_and_a_function(function: str, path: str) -> None:
    import keyword

    ref = parse_ref(f"{path}.py:{function}")
    assert (ref is not None) == (not keyword.iskeyword(function))
    if ref is not None:
        assert (ref.module, ref.function, ref.is_file) == (f"{path}.py", function, True)


@pytest.mark.parametrize("value", ["mlp", "digits", "resnet", "lns(8,gamma=8)", "a.py:", "a.py:1x",
                                   "C:\\nets\\model", "a b:c", "pkg.:f", "llama(blocks=2)"])
def test_built_in_names_and_other_strings_are_not_references(value: str) -> None:
    assert parse_ref(value) is None


def test_relative_files_resolve_against_the_given_folder(tmp_path: Path) -> None:
    assert absolute("m.py:f", tmp_path) == f"{tmp_path.resolve() / 'm.py'}:f"
    assert absolute("/abs/m.py:f", tmp_path) == "/abs/m.py:f"
    assert absolute("pkg.mod:f", tmp_path) == "pkg.mod:f"
    assert absolute("mlp", tmp_path) == "mlp"


# --- training --------------------------------------------------------------------------------------

def test_a_model_file_trains_like_a_built_in_and_repeats_for_a_seed(nets: Path) -> None:
    config = _config(f"{nets}/model.py:tiny")
    first, second = train(config), train(config)
    assert first.test_accuracy > 0.5  # one epoch of a 64-32-10 MLP on digits is far above chance (0.1)
    assert first.test_accuracy == second.test_accuracy and first.loss_curve == second.loss_curve
    assert first.params == 64 * 32 + 32 + 32 * 10 + 10
    assert first.config["model"] == config.model


def test_the_factory_is_called_after_the_seed_is_set(nets: Path) -> None:
    results = [train(_config(f"{nets}/model.py:tiny", seed=seed)) for seed in (0, 0, 1)]
    assert results[0].loss_curve == results[1].loss_curve != results[2].loss_curve


def test_train_takes_a_factory_directly(nets: Path) -> None:
    calls: list[tuple[tuple[int, ...], int]] = []

    def factory(shape: tuple[int, ...], classes: int) -> nn.Module:
        calls.append((shape, classes))
        return nn.Sequential(nn.Linear(shape[0], classes))

    result = train(TrainConfig(epochs=1), model=factory)  # config.model (mlp) is not used
    assert calls[0] == ((64,), 10) and result.test_accuracy > 0.5
    assert result.config["model"].endswith("factory")


def test_functional_gemms_in_a_users_forward_train(nets: Path) -> None:
    result = train(_config(f"{nets}/model.py:functional").replace(epochs=3))
    assert not result.diverged and result.test_accuracy > 0.5


def test_a_package_module_reference(nets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = nets / "mynets"
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copy(nets / "model.py", package / "models.py")
    monkeypatch.syspath_prepend(str(nets))
    result = train(_config("mynets.models:tiny"))
    assert result.params == 64 * 32 + 32 + 32 * 10 + 10


@pytest.mark.parametrize("function, classes, val", [("four", 3, None), ("six", 3, 60), ("as_dict", 5, None)])
def test_a_dataset_function_in_each_form(nets: Path, function: str, classes: int, val: int | None) -> None:
    data = load_dataset(f"{nets}/data.py:{function}")
    assert data.num_classes == classes and data.task == "classification" and data.sample_shape == (8,)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    if val is None:  # carved from the 300 training samples as for the built-ins: 10 %, every class
        assert len(data.x_val) == 30 and len(data.x_train) == 270
        assert set(data.y_val.tolist()) == {0, 1, 2}
    else:
        assert len(data.x_val) == val and len(data.x_train) == 300
    result = train(_config(f"{nets}/model.py:tiny", f"{nets}/data.py:{function}", lr=0.1))
    assert result.test_accuracy > 0.6  # three well-separated blobs


def test_a_dataset_function_may_return_a_dse_dataset(nets: Path) -> None:
    (nets / "wrap.py").write_text("from dse.data import load_dataset\n\n"
                                  "def d():\n    return load_dataset('digits')\n")
    assert load_dataset(f"{nets}/wrap.py:d").x_train.shape == load_dataset("digits").x_train.shape


def test_a_dataset_function_drawing_from_global_generators_repeats(nets: Path) -> None:
    torch.manual_seed(123)
    np.random.seed(123)
    expected_torch, expected_numpy = torch.rand(1), np.random.rand()
    torch.manual_seed(123)
    np.random.seed(123)
    first = load_dataset(f"{nets}/data.py:global_random")
    second = load_dataset(f"{nets}/data.py:global_random")
    assert torch.equal(first.x_train, second.x_train) and torch.equal(first.x_test, second.x_test)
    assert torch.rand(1) == expected_torch and np.random.rand() == expected_numpy  # the caller's state stays


# --- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, message", [
    ("missing.py:tiny", "file '{nets}/missing.py' not found"),
    ("model.py:nope", "no function 'nope' in"),
    ("model.py:NOT_CALLABLE", "'NOT_CALLABLE' in model.py is 'int' object, not a function"),
    ("model.py:raises", "raised RuntimeError: no GPU here"),
    ("model.py:not_a_module", "returned 'list' object, not a torch.nn.Module"),
    ("model.py:wrong_output", "returns shape (2, 11) for 2 samples of dataset 'digits'; it needs (2, 10)"),
    ("model.py:wrong_input", "does not accept samples of dataset 'digits' (shape (64,))"),
    # a traceback before: cross_entropy's NotImplementedError for int64 ('log_softmax_lastdim_kernel_impl')
    ("model.py:integer_logits", "returns torch.int64 logits for samples of dataset 'digits'; they must be "
                                "floating point"),
    # a traceback before (backward: 'element 0 of tensors does not require grad'); a network with no
    # parameter at all: 'optimizer got an empty parameter list', naming no network
    ("model.py:frozen", "'model.py:frozen' has no parameter to train"),
    # a traceback before (a RuntimeError of the network's, raised in its training forward)
    ("model.py:fails_in_training", "raised RuntimeError while training: a shape this network does not expect "
                                   "(--verbose shows the traceback)"),
    ("nosuch.module:f", "module 'nosuch.module' not found"),
])
def test_a_bad_model_is_one_line_and_exit_2(nets: Path, model: str, message: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(nets)
    result = CliRunner().invoke(app, ["train", "--model", model, "--epochs", "1"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: model ") and result.stderr.count("\n") == 1
    assert message.format(nets=nets.resolve()) in result.stderr.replace("\n", "")
    assert sorted(p.name for p in nets.iterdir() if p.name != "__pycache__") == ["data.py", "model.py"]


@pytest.mark.parametrize("function, message", [
    ("float_labels", "y_train holds torch.float32 values; labels are integers"),
    ("mismatched", "x_train has 30 samples and y_train 29"),
    ("a_string", "returned a str; expected a dse Dataset"),
])
def test_a_bad_dataset_function_is_one_line(nets: Path, function: str, message: str) -> None:
    with pytest.raises(InputError, match=r"^dataset '.*data.py:" + function + "': ") as error:
        load_dataset(f"{nets}/data.py:{function}")
    assert message in str(error.value) and "\n" not in str(error.value)


# --- sweeps ----------------------------------------------------------------------------------------

SWEEP = """\
name: mine
task: {{model: model.py:tiny, dataset: {dataset}, epochs: 1, batch_size: 64, lr: 0.1}}
energy: {{workloads: [proxy]}}
trials:
  - {{format: [fp32, int8]}}
executor: {{backend: {backend}, workers: 1}}
output: {output}
"""


def _sweep(folder: Path, output: Path, dataset: str = "data.py:four", backend: str = "local") -> Path:
    path = folder / "sweep.yaml"
    path.write_text(SWEEP.format(dataset=dataset, output=output, backend=backend))
    return path


def test_sweep_paths_resolve_against_the_sweep_files_folder(nets: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not the sweep file's folder
    sweep = parse_config(_sweep(nets, tmp_path / "out").read_text(), str(nets / "sweep.yaml"))
    task = sweep.tasks[0]
    assert task.name == "tiny/four"
    assert task.defaults["model"] == f"{nets.resolve()}/model.py:tiny"
    assert task.defaults["dataset"] == f"{nets.resolve()}/data.py:four"


def test_trial_identity_follows_the_files_content_not_its_place(nets: Path, tmp_path: Path) -> None:
    def ids(folder: Path) -> list[str]:
        path = _sweep(folder, tmp_path / "out")
        return [t.trial_id for t in expand(parse_config(path.read_text(), str(path)))]

    before = ids(nets)
    moved = shutil.copytree(nets, tmp_path / "elsewhere")
    assert ids(moved) == before
    with (nets / "model.py").open("a") as handle:
        handle.write("\n# an edit\n")
    assert set(ids(nets)).isdisjoint(before)


def test_a_sweep_reruns_the_trials_of_an_edited_model_file(nets: Path, tmp_path: Path) -> None:
    path = _sweep(nets, tmp_path / "out")
    first = run_sweep(parse_config(path.read_text(), str(path)), reports=False)
    assert (first.ran, first.ok) == (2, 2)
    again = run_sweep(parse_config(path.read_text(), str(path)), reports=False)
    assert again.ran == 0
    with (nets / "model.py").open("a") as handle:
        handle.write("\n# an edit\n")
    edited = run_sweep(parse_config(path.read_text(), str(path)), reports=False)
    assert edited.ran == 2
    frame = load_trials(tmp_path / "out")
    assert (frame["status"] == "ok").all() and frame["test_accuracy"].min() > 0.6
    assert frame["energy_mj:proxy"].gt(0).all()  # the user's model is priced as traced


def test_a_worker_runs_the_shipped_code_without_the_file(nets: Path, tmp_path: Path) -> None:
    config = _config(f"{tmp_path}/gone/model.py:tiny", f"{tmp_path}/gone/data.py:four").to_dict()
    sources = {f"{tmp_path}/gone/model.py": MODEL_FILE, f"{tmp_path}/gone/data.py": DATA_FILE}
    outcome = execute_trial(TrialJob("t", config, sources=sources))
    assert outcome.error == "" and outcome.result is not None and outcome.result["test_accuracy"] > 0.5


def test_a_bad_model_in_a_sweep_writes_nothing(nets: Path, tmp_path: Path) -> None:
    path = _sweep(nets, tmp_path / "out", dataset="digits")
    path.write_text(path.read_text().replace("model.py:tiny", "model.py:wrong_output"))
    result = CliRunner().invoke(app, ["sweep", str(path)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "sweep.yaml:2: task: model " in result.stderr and "needs (2, 10)" in result.stderr
    assert not (tmp_path / "out").exists()
    path.write_text(path.read_text().replace("model.py:wrong_output", "model.py:absent"))
    result = CliRunner().invoke(app, ["sweep", str(path)])
    assert result.exit_code == 2 and "task.model: model" in result.stderr
    assert "no function 'absent'" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_a_user_model_sweep_runs_on_each_backend(nets: Path, tmp_path: Path, backend: str) -> None:
    if backend == "ray":
        pytest.importorskip("ray")
    path = _sweep(nets, tmp_path / backend, dataset="digits", backend=backend)
    result = CliRunner().invoke(app, ["sweep", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    frame = load_trials(tmp_path / backend)
    assert list(frame["status"]) == ["ok", "ok"]
    row = frame.iloc[0]
    again = train(TrainConfig.from_dict(json.loads(row["config"])))  # same code, same seed, same result
    assert again.test_accuracy == row["test_accuracy"]


def test_example_model_builds_for_flat_and_image_samples() -> None:
    root = Path(__file__).resolve().parents[1] / "examples" / "own_model"
    from dse.usercode import load_function

    factory = load_function(f"{root}/model.py:small_resnet", "model")
    flat, image = factory((784,), 10), factory((1, 28, 28), 10)
    x = torch.from_numpy(np.zeros((2, 784), dtype=np.float32))
    assert flat(x).shape == image(x.reshape(2, 1, 28, 28)).shape == (2, 10)
    assert textwrap.dedent(factory.__doc__ or "").strip()
