"""Offline datasets: shapes, determinism, stratified splits, the MNIST-1D generator, file loaders."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.file_datasets import idx_bytes, write_cifar, write_mnist

from dse.data import DATASETS, Dataset, load_dataset, with_validation
from dse.data import mnist1d as m1d
from dse.data.dataset import VALIDATION_FRACTION, stratified_split
from dse.data.files import load_cifar10, load_mnist
from dse.errors import InputError

# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module, so MNIST-1D is generated once by load_dataset."""
    return tmp_path_factory.mktemp("dse-cache")


@pytest.fixture(scope="module")
def mnist1d_fresh() -> dict[str, np.ndarray]:
    """MNIST-1D regenerated from scratch with the published arguments (independent of any cache)."""
    return m1d.make_dataset()


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# --- built-in datasets -----------------------------------------------------------------------------

BUILTIN = {  # name: (train, validation, test, sample shape, classes or vocabulary, task)
    "digits": (1293, 144, 360, (64,), 10, "classification"),
    "mnist1d": (3600, 400, 1000, (40,), 10, "classification"),
    "mnist5k": (3600, 400, 1000, (784,), 10, "classification"),
    "sort": (18_000, 2_000, 2_000, (24,), 64, "sequence"),
    "sort-easy": (18_000, 2_000, 2_000, (10,), 10, "sequence"),
}


def test_every_builtin_dataset_is_listed() -> None:
    assert set(BUILTIN) | {"mnist", "cifar10"} == set(DATASETS)


@pytest.mark.parametrize("name", list(BUILTIN))
def test_builtin_shapes_dtypes_and_classes(name: str, cache_dir: Path) -> None:
    n_train, n_val, n_test, shape, classes, task = BUILTIN[name]
    data = load_dataset(name, cache_dir=cache_dir)
    assert data.name == name and data.task == task and data.num_classes == classes
    assert data.sample_shape == shape
    assert data.x_val is not None and data.y_val is not None
    target_shape = shape if task == "sequence" else ()
    expected_x = torch.int64 if task == "sequence" else torch.float32
    for x, y, n in ((data.x_train, data.y_train, n_train), (data.x_val, data.y_val, n_val),
                    (data.x_test, data.y_test, n_test)):
        assert x.shape == (n, *shape) and y.shape == (n, *target_shape)
        assert x.dtype == expected_x and y.dtype == torch.int64
        assert int(y.min()) >= 0 and int(y.max()) < classes
        if task == "classification":
            assert set(y.tolist()) == set(range(classes))
            assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_image_pixels_are_scaled_to_unit_range(name: str, cache_dir: Path) -> None:
    data = load_dataset(name, cache_dir=cache_dir)
    x = torch.cat([data.x_train, data.x_test])
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    levels = 16 if name == "digits" else 255  # digits pixels are 0..16, MNIST 0..255
    assert torch.allclose(x * levels, torch.round(x * levels), atol=1e-4)


@pytest.mark.parametrize("name", ["sort", "sort-easy"])
def test_sort_targets_are_the_sorted_tokens(name: str) -> None:
    data = load_dataset(name)
    for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
        assert torch.equal(y, torch.sort(x, dim=1).values)
    assert not torch.equal(data.x_train, data.y_train)  # the inputs are not already sorted
    assert set(torch.unique(data.x_train).tolist()) == set(range(data.num_classes))


@pytest.mark.parametrize("name", list(BUILTIN))
def test_same_name_gives_identical_tensors_whatever_the_global_rng(name: str, cache_dir: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(1)
    first = load_dataset(name, cache_dir=cache_dir)
    torch.manual_seed(2)
    np.random.seed(2)
    torch.rand(10)
    second = load_dataset(name, cache_dir=cache_dir)
    for field in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(first, field), getattr(second, field))
        assert getattr(first, field) is not getattr(second, field)  # fresh tensors: callers may mutate


def test_loaded_tensors_are_independent_copies(cache_dir: Path) -> None:
    first = load_dataset("mnist5k", cache_dir=cache_dir)
    first.x_train.zero_()
    assert float(load_dataset("mnist5k", cache_dir=cache_dir).x_train.sum()) > 0


# --- validation split ------------------------------------------------------------------------------

def _rows(x: torch.Tensor) -> list[tuple[float, ...]]:
    return sorted(map(tuple, x.reshape(len(x), -1).tolist()))


@pytest.mark.parametrize("name", list(BUILTIN))
def test_validation_is_carved_from_training_data_stratified(name: str, cache_dir: Path) -> None:
    raw = load_dataset(name, cache_dir=cache_dir)
    assert raw.x_val is not None and raw.y_val is not None
    assert len(raw.x_val) == int(np.ceil((len(raw.x_train) + len(raw.x_val)) * VALIDATION_FRACTION))
    if raw.task == "classification":
        train = np.bincount(raw.y_train.numpy(), minlength=raw.num_classes)
        val = np.bincount(raw.y_val.numpy(), minlength=raw.num_classes)
        assert np.all(np.abs(val - (train + val) * VALIDATION_FRACTION) < 1.0)
    test_rows = set(_rows(raw.x_test)) if name != "sort-easy" else set()  # sort-easy repeats sequences
    assert not test_rows & set(_rows(raw.x_val))  # never a test sample


def test_validation_split_is_fixed_by_the_dataset_not_the_run() -> None:
    x = torch.arange(200, dtype=torch.float32).reshape(100, 2)
    y = torch.arange(100) % 4
    data = Dataset("toy", x, y, x[:8], y[:8], num_classes=4, task="classification")
    torch.manual_seed(1)
    np.random.seed(1)
    first = with_validation(data)
    torch.manual_seed(2)
    np.random.seed(2)
    second = with_validation(data)
    assert first.x_val is not None and second.x_val is not None
    assert torch.equal(first.x_val, second.x_val) and torch.equal(first.x_train, second.x_train)
    assert with_validation(first) is first  # a dataset that has one keeps it
    assert _rows(torch.cat([first.x_train, first.x_val])) == _rows(x)  # a partition of the training data
    assert torch.equal(first.x_test, data.x_test)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_file_datasets_carry_a_validation_split(tmp_path: Path, name: str) -> None:
    if name == "mnist":
        write_mnist(tmp_path, n_train=40)
        raw = load_mnist(tmp_path)
    else:
        write_cifar(tmp_path)
        raw = load_cifar10(tmp_path)
    data = load_dataset(name, data_dir=tmp_path)
    assert data.x_val is not None and len(data.x_val) == int(np.ceil(len(raw.x_train) * VALIDATION_FRACTION))
    assert _rows(torch.cat([data.x_train, data.x_val])) == _rows(raw.x_train)
    assert torch.equal(data.x_test, raw.x_test)


# --- stratified split ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_builtin_split_is_stratified(name: str, cache_dir: Path) -> None:
    data = load_dataset(name, cache_dir=cache_dir)
    assert data.y_val is not None
    train = np.bincount(data.y_train.numpy(), minlength=10) + np.bincount(data.y_val.numpy(), minlength=10)
    test = np.bincount(data.y_test.numpy(), minlength=10)
    total = train + test
    assert np.all(np.abs(test - total * 0.2) < 1.0)
    if name == "mnist5k":  # 500 per class in the file
        assert total.tolist() == [500] * 10 and test.tolist() == [100] * 10


@settings(max_examples=60, deadline=None)
@given(labels=st.lists(st.integers(0, 5), min_size=2, max_size=200),
       fraction=st.floats(0.05, 0.95), seed=st.integers(0, 2**31))
def test_stratified_split_properties(labels: list[int], fraction: float, seed: int) -> None:
    y = np.asarray(labels)
    train, test = stratified_split(y, fraction, seed)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(y)))  # a partition
    assert len(test) == int(np.ceil(round(len(y) * fraction, 9)))
    for cls in np.unique(y):
        n_cls, n_test = int((y == cls).sum()), int((y[test] == cls).sum())
        assert abs(n_test - n_cls * len(test) / len(y)) < 1.0
    again_train, again_test = stratified_split(y, fraction, seed)
    assert np.array_equal(train, again_train) and np.array_equal(test, again_test)


def test_stratified_split_depends_on_seed() -> None:
    y = np.repeat(np.arange(10), 50)
    assert not np.array_equal(stratified_split(y, 0.2, 0)[1], stratified_split(y, 0.2, 1)[1])


# --- MNIST-1D generator ----------------------------------------------------------------------------

def test_mnist1d_matches_the_published_dataset(mnist1d_fresh: dict[str, np.ndarray]) -> None:
    # First values of rows 0, 1 and 19 of the published mnist1d_data.pkl ('x'), as converted to JSON in
    # github.com/mdcfrancis/gomnist1d (data/mnist1d.json).
    published = {0: [-0.3320056673693902, -0.4719103656557236, -0.778697076293495, -1.0097408265367047],
                 1: [1.9654808817629648, 2.300212537472408, 2.213392782800504, 1.9891737610617297],
                 19: [-0.8256802556641598, 0.05011685845787131, 1.5301581419814818, 0.3894255027981202]}
    for row, values in published.items():
        np.testing.assert_allclose(mnist1d_fresh["x"][row, :4], values, rtol=0, atol=1e-12)


def test_mnist1d_generator_properties(mnist1d_fresh: dict[str, np.ndarray]) -> None:
    x = np.concatenate([mnist1d_fresh["x"], mnist1d_fresh["x_test"]])
    y = np.concatenate([mnist1d_fresh["y"], mnist1d_fresh["y_test"]])
    assert x.shape == (5000, 40) and x.dtype == np.float64
    assert np.bincount(y).tolist() == [500] * 10  # 500 per class, then shuffled
    assert len(set(mnist1d_fresh["y"][:50].tolist())) > 5  # shuffled, not sorted by class
    assert abs(x.mean()) < 1e-9 and abs(x.std() - 1) < 1e-9  # standardised as a whole
    assert len(np.unique(x.round(6), axis=0)) == 5000  # every sample distinct


def test_mnist1d_generator_is_deterministic_and_leaves_global_rng_alone() -> None:
    args = m1d.Mnist1dArgs(num_samples=200)
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    first = m1d.make_dataset(args)
    assert np.array_equal(np.random.get_state()[1], before)
    np.random.rand(3)
    second = m1d.make_dataset(args)
    for key in first:
        assert np.array_equal(first[key], second[key])
    other = m1d.make_dataset(m1d.Mnist1dArgs(num_samples=200, seed=43))
    assert not np.array_equal(first["x"], other["x"])


def test_mnist1d_cache_equals_regeneration(cache_dir: Path, mnist1d_fresh: dict[str, np.ndarray],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    data = load_dataset("mnist1d", cache_dir=cache_dir)
    files = list(cache_dir.glob("mnist1d*.npz"))
    assert len(files) == 1
    with np.load(files[0]) as cached:
        for key in ("x", "y", "x_test", "y_test"):
            assert np.array_equal(cached[key], mnist1d_fresh[key])
    assert data.x_val is not None
    train_and_val = torch.cat([data.x_train, data.x_val])
    fresh = torch.from_numpy(mnist1d_fresh["x"].astype(np.float32))
    assert torch.equal(train_and_val.sort(dim=0).values, fresh.sort(dim=0).values)
    assert torch.equal(data.y_test, torch.from_numpy(mnist1d_fresh["y_test"]))

    def no_generation(*args: object) -> None:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(m1d, "make_dataset", no_generation)
    assert torch.equal(load_dataset("mnist1d", cache_dir=cache_dir).x_test, data.x_test)


# --- cache behaviour -------------------------------------------------------------------------------

def test_cache_is_written_atomically_and_corruption_is_repaired(tmp_path: Path) -> None:
    clean = load_dataset("mnist5k", cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # no temp files left behind
    files[0].write_bytes(b"not an npz file")
    repaired = load_dataset("mnist5k", cache_dir=tmp_path)
    assert torch.equal(repaired.x_train, clean.x_train)
    assert files[0].read_bytes()[:2] == b"PK"  # rewritten as a zip (.npz)


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSE_CACHE_DIR", str(tmp_path / "env-cache"))
    load_dataset("mnist5k")
    assert len(list((tmp_path / "env-cache").glob("*.npz"))) == 1


def test_unwritable_cache_still_loads(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    data = load_dataset("mnist5k", cache_dir=blocker / "cache")
    assert data.x_train.shape == (3600, 784)


# --- errors ----------------------------------------------------------------------------------------

def test_unknown_dataset_names_valid_ones_and_suggests() -> None:
    with pytest.raises(InputError) as exc:
        load_dataset("mnist-1d")
    message = _one_line(exc)
    assert "'mnist-1d'" in message and "did you mean 'mnist1d'" in message
    assert all(name in message for name in DATASETS)
    with pytest.raises(InputError) as exc:
        load_dataset("imagenet")
    assert "did you mean" not in _one_line(exc)


@pytest.mark.parametrize("name, expected",
                         [("mnist", "train-images-idx3-ubyte"), ("cifar10", "data_batch_1")])
def test_file_datasets_need_data_dir(name: str, expected: str, tmp_path: Path) -> None:
    with pytest.raises(InputError) as exc:
        load_dataset(name)
    message = _one_line(exc)
    assert "data_dir" in message and expected in message
    with pytest.raises(InputError) as exc:
        load_dataset(name, data_dir=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in _one_line(exc)
    with pytest.raises(InputError) as exc:
        load_dataset(name, data_dir=tmp_path)  # exists but empty
    message = _one_line(exc)
    assert str(tmp_path) in message and expected in message


# --- MNIST IDX files -------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_loader(tmp_path: Path, gz: bool) -> None:
    arrays = write_mnist(tmp_path, gz=gz)
    data = load_mnist(tmp_path)
    assert data.sample_shape == (784,) and data.num_classes == 10 and data.task == "classification"
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    expected = arrays["train-images-idx3-ubyte"].reshape(6, 784) / 255.0
    np.testing.assert_allclose(data.x_train.numpy(), expected, rtol=1e-6)
    assert data.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert data.x_test.shape == (4, 784) and data.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_mnist_torchvision_layout(tmp_path: Path) -> None:
    write_mnist(tmp_path / "MNIST" / "raw", gz=True)
    assert load_mnist(tmp_path).x_train.shape == (6, 784)


@pytest.mark.parametrize("damage, expected", [
    (lambda raw: b"\x00\x00\x09\x07" + raw[4:], "dimensions"),   # header claims 7 dims
    (lambda raw: b"\x12\x34" + raw[2:], "magic"),                # not an IDX file
    (lambda raw: raw[:-5], "data bytes"),                        # truncated payload
])
def test_corrupt_idx_names_the_file(tmp_path: Path, damage: object, expected: str) -> None:
    write_mnist(tmp_path)
    target = tmp_path / "t10k-images-idx3-ubyte"
    target.write_bytes(damage(target.read_bytes()))  # type: ignore[operator]
    with pytest.raises(InputError) as exc:
        load_dataset("mnist", data_dir=tmp_path)
    message = _one_line(exc)
    assert str(target) in message and expected in message


def test_corrupt_gzip_and_label_mismatch(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=True)
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(InputError) as exc:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(bad) in _one_line(exc)
    other = tmp_path / "other"
    write_mnist(other)
    (other / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5)))  # 6 images, 5 labels
    with pytest.raises(InputError) as exc:
        load_dataset("mnist", data_dir=other)
    assert "6 images" in _one_line(exc) and "5 labels" in str(exc.value)


# --- CIFAR-10 python batches -----------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_loader(tmp_path: Path, protocol: int) -> None:
    batches = write_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    data = load_cifar10(tmp_path)
    assert data.x_train.shape == (15, 3, 32, 32) and data.x_test.shape == (3, 3, 32, 32)
    assert data.num_classes == 10 and data.x_train.dtype == torch.float32
    labels = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert data.y_train.tolist() == labels
    # CIFAR rows are 1024 red, then 1024 green, then 1024 blue values, each row-major 32 x 32.
    raw = batches["data_batch_2"][b"data"]
    sample, channel, row, col = 1, 2, 5, 7
    assert data.x_train[3 + sample, channel, row, col].item() == pytest.approx(
        raw[sample, channel * 1024 + row * 32 + col] / 255.0)
    assert data.y_test.tolist() == batches["test_batch"][b"labels"]
    assert torch.equal(load_cifar10(tmp_path / "cifar-10-batches-py").x_test, data.x_test)


def test_cifar10_missing_and_corrupt_batches(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(InputError) as exc:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "test_batch" in _one_line(exc) and str(tmp_path) in str(exc.value)
    (tmp_path / "test_batch").write_bytes(b"\x80\x04 not a pickle")
    with pytest.raises(InputError) as exc:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(tmp_path / "test_batch") in _one_line(exc)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8),
                                                        b"labels": [0, 1]}))
    with pytest.raises(InputError) as exc:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "3072" in _one_line(exc)


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar10_refuses_pickles_that_run_code(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": _Exploit(), b"labels": []}))
    with pytest.raises(InputError) as exc:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "data_batch_3" in _one_line(exc) and "not allowed" in str(exc.value)
