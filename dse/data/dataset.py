"""The Dataset record, the stratified split and the on-disk array cache shared by the loaders."""

from __future__ import annotations

import math
import os
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

Task = Literal["classification", "sequence"]


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test tensors held in memory (eq=False: tensors have no single truth value)."""

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
    """Write an .npz atomically (temp file + os.replace); False if the cache dir is not writable.

    A cache is an optimisation, so a read-only or full disk only costs regenerating next time.
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:  # open() honours the umask, unlike tempfile's private 0600 files
            np.savez(f, **arrays)
        os.replace(tmp, path)
        return True
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the folder itself is unusable: there is no temp file to remove
            pass
        return False
