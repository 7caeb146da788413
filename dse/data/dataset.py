"""The Dataset record, the stratified splits (test and validation) and the on-disk array cache shared by
the loaders."""

from __future__ import annotations

import dataclasses
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from dse.atomic_write import write_atomically

Task = Literal["classification", "sequence"]


VALIDATION_FRACTION = 0.1
"""Share of the training data held out as the validation split."""
VALIDATION_SEED = 20_211_115
"""Seed of every validation split: fixed by the dataset, never by the run's seed."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train, validation and test tensors held in memory (eq=False: tensors have no single truth value).

    The validation split is what a sweep chooses hyperparameters on; the test split is only reported.
    A Dataset built without one (x_val None) gets it from `with_validation`.
    """

    name: str
    x_train: torch.Tensor
    """float32 features (classification) or int64 tokens (sequence); first dim = samples."""
    y_train: torch.Tensor
    """int64: (N,) classes, or (N, T) per-token targets for sequence tasks."""
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    """Classes, or the vocabulary size for sequence tasks."""
    task: Task
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def dataset_from_arrays(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                 y_test: np.ndarray, num_classes: int, task: Task = "classification") -> Dataset:
    """Wrap numpy arrays as fresh tensors (float32 features or int64 tokens, int64 targets)."""
    x_dtype = np.int64 if task == "sequence" else np.float32
    return Dataset(name,
                   torch.from_numpy(np.ascontiguousarray(x_train, dtype=x_dtype)),
                   torch.from_numpy(np.ascontiguousarray(y_train, dtype=np.int64)),
                   torch.from_numpy(np.ascontiguousarray(x_test, dtype=x_dtype)),
                   torch.from_numpy(np.ascontiguousarray(y_test, dtype=np.int64)),
                   num_classes, task)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices with every class split in the same proportion (to within one sample).

    The test set gets ceil(N * test_fraction) samples (as in sklearn), shared among the classes by
    largest remainder; the samples inside a class and the order of each side are drawn from
    `np.random.default_rng(seed)`, so the split does not depend on any global random state.
    """
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    n_test = math.ceil(round(len(labels) * test_fraction, 9))
    quota = counts * n_test / len(labels)
    per_class = np.floor(quota).astype(np.int64)
    remainder_order = np.argsort(-(quota - per_class), kind="stable")
    per_class[remainder_order[: n_test - int(per_class.sum())]] += 1
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for cls, k in zip(classes, per_class, strict=True):
        members = rng.permutation(np.flatnonzero(labels == cls))
        test.append(members[:k])
        train.append(members[k:])
    train_idx, test_idx = np.concatenate(train), np.concatenate(test)
    return rng.permutation(train_idx), rng.permutation(test_idx)


def with_validation(dataset: Dataset, fraction: float = VALIDATION_FRACTION) -> Dataset:
    """The dataset with a validation split carved from its training data, or itself if it has one.

    Classification is split stratified (every class in the same proportion); sequence tasks, whose
    targets are sequences, uniformly. The split depends only on the dataset (VALIDATION_SEED), so every
    run of every configuration sees the same validation samples and never a test sample.
    """
    if dataset.x_val is not None:
        return dataset
    labels = dataset.y_train.numpy() if dataset.task == "classification" else np.zeros(len(dataset.y_train))
    train, val = stratified_split(labels, fraction, VALIDATION_SEED)
    train_index, val_index = torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(val))
    return dataclasses.replace(dataset, x_train=dataset.x_train[train_index],
                               y_train=dataset.y_train[train_index], x_val=dataset.x_train[val_index],
                               y_val=dataset.y_train[val_index])


def default_cache_dir() -> Path:
    """`$DSE_CACHE_DIR`, else ~/.cache/dse."""
    env = os.environ.get("DSE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dse"


def load_cached(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The arrays of an .npz cache file, or None if it is missing, unreadable or lacks a key."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in keys}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def save_cached(path: Path, arrays: dict[str, np.ndarray]) -> bool:
    """Write an .npz atomically (`dse.atomic_write`); False if the cache dir is not writable.

    A cache is an optimisation, so a read-only or full disk only costs regenerating next time.
    """
    def write(temporary: Path) -> None:
        with open(temporary, "wb") as file:  # a file object: savez adds .npz to a name without it
            np.savez(file, **arrays)  # type: ignore[arg-type]  # numpy's stub reads **kwds as allow_pickle

    try:
        write_atomically(path, write)
        return True
    except OSError:
        return False
