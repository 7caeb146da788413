"""Loaders for datasets the user has on disk: MNIST as IDX files, CIFAR-10 as python batches.

Nothing is downloaded: a missing or malformed file is an InputError that names the path and what
was expected there.
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from pathlib import Path

import numpy as np

from dse.data.dataset import Dataset, dataset_from_arrays
from dse.errors import InputError

# --- MNIST (IDX) ---------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"cannot read {path} ({what}): {exc}") from exc


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """An IDX array (the MNIST file format): magic 0 0 <type> <ndim>, big-endian int32 sizes, data.

    `.gz` files are decompressed. `ndim`, if given, is checked against the header.
    """
    path = Path(path)
    raw = _read_bytes(path, "an IDX file")
    what = f"IDX file {path}"
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise InputError(f"{what}: bad magic number {raw[:4].hex() or 'none'} "
                         f"(expected 0000 + a type code 08/09/0b/0c/0d/0e + the number of dimensions)")
    dims = raw[3]
    if ndim is not None and dims != ndim:
        raise InputError(f"{what}: header says {dims} dimensions, expected {ndim}")
    header = 4 + 4 * dims
    if len(raw) < header:
        raise InputError(f"{what}: truncated header ({len(raw)} bytes, expected at least {header})")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=dims, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise InputError(f"{what}: {len(raw) - header} data bytes, expected {expected} for shape {shape}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_mnist_file(dirs: list[Path], stem: str) -> Path | None:
    dotted = stem.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
    for folder in dirs:
        for name in (stem, f"{stem}.gz", dotted, f"{dotted}.gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _require_dir(name: str, data_dir: str | Path | None, expected: str) -> Path:
    if data_dir is None:
        raise InputError(f"dataset {name!r} is read from local files: pass data_dir "
                         f"(a folder with {expected})")
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise InputError(f"dataset {name!r}: data_dir {folder} is not a folder "
                         f"(expected one with {expected})")
    return folder


def load_mnist(data_dir: str | Path | None) -> Dataset:
    """Full MNIST (60k/10k) from the four IDX files (or their .gz) in data_dir or data_dir/MNIST/raw;
    pixels / 255, flat (784,) per sample."""
    expected = "the MNIST IDX files " + ", ".join(f"{stem}[.gz]" for stem in MNIST_FILES.values())
    folder = _require_dir("mnist", data_dir, expected)
    dirs = [folder, folder / "MNIST" / "raw", folder / "mnist"]
    paths: dict[str, Path] = {}
    for key, stem in MNIST_FILES.items():
        found = _find_mnist_file(dirs, stem)
        if found is None:
            raise InputError(f"dataset 'mnist': no {stem} (or {stem}.gz) in {folder} (expected {expected})")
        paths[key] = found
    arrays = {}
    for split in ("train", "test"):
        images = read_idx(paths[f"{split}_images"], ndim=3)
        labels = read_idx(paths[f"{split}_labels"], ndim=1)
        if images.shape[0] != labels.shape[0]:
            raise InputError(f"dataset 'mnist': {paths[f'{split}_images']} holds {images.shape[0]} "
                             f"images but {paths[f'{split}_labels']} holds {labels.shape[0]} labels")
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise InputError(f"dataset 'mnist': {paths[f'{split}_labels']} has labels outside 0..9")
        arrays[f"x_{split}"] = images.reshape(images.shape[0], -1).astype(np.float32) / 255.0
        arrays[f"y_{split}"] = labels.astype(np.int64)
    return dataset_from_arrays("mnist", arrays["x_train"], arrays["y_train"], arrays["x_test"],
                               arrays["y_test"], num_classes=10)


# --- CIFAR-10 (python batches) -------------------------------------------------------------------

CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays only, so a batch file cannot run arbitrary code."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    what = "a CIFAR-10 python batch: a pickled dict with b'data' (N x 3072 uint8) and b'labels'"
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError,
            IndexError) as exc:
        raise InputError(f"cannot read {path} (expected {what}): {exc}") from exc
    if not isinstance(batch, dict):
        raise InputError(f"{path}: holds a {type(batch).__name__}, expected {what}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise InputError(f"{path}: no 'data'/'labels' keys (found {sorted(map(str, batch))}), "
                         f"expected {what}")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        n_labels = labels.shape[0] if labels.ndim else 0
        raise InputError(f"{path}: data shape {data.shape} and {n_labels} labels, "
                         f"expected (N, 3072) and N labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise InputError(f"{path}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0, labels.astype(np.int64)


def load_cifar10(data_dir: str | Path | None) -> Dataset:
    """CIFAR-10 (50k/10k) from the python batches in data_dir or data_dir/cifar-10-batches-py;
    pixels / 255, (3, 32, 32) per sample."""
    expected = f"the CIFAR-10 python batches {', '.join(CIFAR_TRAIN)}, {CIFAR_TEST}"
    folder = _require_dir("cifar10", data_dir, expected)
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    for name in (*CIFAR_TRAIN, CIFAR_TEST):
        if not (folder / name).is_file():
            raise InputError(f"dataset 'cifar10': no {name} in {folder} (expected {expected})")
    train = [_read_cifar_batch(folder / name) for name in CIFAR_TRAIN]
    x_test, y_test = _read_cifar_batch(folder / CIFAR_TEST)
    return dataset_from_arrays("cifar10", np.concatenate([x for x, _ in train]),
                               np.concatenate([y for _, y in train]), x_test, y_test, num_classes=10)
