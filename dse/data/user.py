"""A user's dataset: a function (`file.py:function`) that returns the splits as tensors or arrays.

The function takes no arguments and returns one of
- a `Dataset`;
- a tuple `(x_train, y_train, x_test, y_test)` or `(x_train, y_train, x_val, y_val, x_test, y_test)`;
- a dict with those keys, optionally `num_classes` and `task`.
Features are float (classification) or integer tokens with per-token integer targets (sequence task,
y of shape (N, T)). Without a validation split, training carves one out of the training data as for
the built-in datasets (stratified, with the same fixed seed). `num_classes` defaults to the largest
label + 1. The function runs with torch's, numpy's and Python's global generators seeded (and restored
afterwards), so one that draws from them still gives the same data in every process.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch

from dse.data.dataset import Dataset
from dse.errors import InputError
from dse.usercode import call

_SPLITS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")


def _as_tensor(value: Any, name: str, where: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{where}: {name} is a {type(value).__name__}, expected a tensor or numpy array")
    return value.detach().cpu()


def _splits(returned: Any, where: str) -> dict[str, Any]:
    if isinstance(returned, dict):
        unknown = set(returned) - {*_SPLITS, "num_classes", "task"}
        if unknown:
            raise InputError(f"{where}: unknown key {sorted(unknown)[0]!r} in the returned dict "
                             f"(expected {', '.join(_SPLITS)}, num_classes, task)")
        return dict(returned)
    if isinstance(returned, (tuple, list)) and len(returned) in (4, 6):
        names = _SPLITS if len(returned) == 6 else ("x_train", "y_train", "x_test", "y_test")
        return dict(zip(names, returned, strict=True))
    raise InputError(f"{where}: returned a {type(returned).__name__}; expected a dse Dataset, a tuple "
                     "(x_train, y_train, [x_val, y_val,] x_test, y_test) or a dict of those")


@contextlib.contextmanager
def _fixed_global_rngs(seed: int) -> Iterator[None]:
    """torch's, numpy's and Python's global generators seeded for the call and restored after it: a
    dataset function that draws from them gives the same data in every process that loads it."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


DATASET_SEED = 0
"""Seed of the global generators while a user's dataset function runs."""


def user_dataset(value: str) -> Dataset:
    """The dataset the user's function `value` returns, checked and converted."""
    where = f"dataset {value!r}"
    with _fixed_global_rngs(DATASET_SEED):
        returned = call(value, "dataset")
    if isinstance(returned, Dataset):
        return returned
    parts = _splits(returned, where)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        if parts.get(name) is None:
            raise InputError(f"{where}: {name} is missing")
    if (parts.get("x_val") is None) != (parts.get("y_val") is None):
        raise InputError(f"{where}: give both x_val and y_val, or neither")
    tensors = {name: _as_tensor(parts[name], name, where) for name in _SPLITS if parts.get(name) is not None}
    sequence = tensors["y_train"].dim() == 2
    task = parts.get("task") or ("sequence" if sequence else "classification")
    if task not in ("classification", "sequence"):
        raise InputError(f"{where}: task must be 'classification' or 'sequence', got {task!r}")
    for split in ("train", "val", "test"):
        x, y = tensors.get(f"x_{split}"), tensors.get(f"y_{split}")
        if x is None or y is None:
            continue
        if len(x) == 0 or len(x) != len(y):
            raise InputError(f"{where}: x_{split} has {len(x)} samples and y_{split} {len(y)}; they must "
                             "match and not be empty")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise InputError(f"{where}: y_{split} holds {y.dtype} values; labels are integers")
        if x.shape[1:] != tensors["x_train"].shape[1:]:
            raise InputError(f"{where}: x_{split} samples have shape {tuple(x.shape[1:])}, x_train "
                             f"{tuple(tensors['x_train'].shape[1:])}")
    labels = [tensors[n] for n in ("y_train", "y_val", "y_test") if n in tensors]
    smallest = min(int(y.min()) for y in labels)
    if smallest < 0:
        raise InputError(f"{where}: labels must be >= 0, found {smallest}")
    largest = max(int(y.max()) for y in labels)
    num_classes = parts.get("num_classes", largest + 1)
    if not isinstance(num_classes, int) or num_classes <= largest:
        raise InputError(f"{where}: num_classes {num_classes!r} must be an integer above the largest "
                         f"label {largest}")
    x_dtype = torch.int64 if task == "sequence" else torch.float32
    for name in tensors:
        tensors[name] = tensors[name].to(x_dtype if name.startswith("x_") else torch.int64).contiguous()
    kind: Literal["classification", "sequence"] = "sequence" if task == "sequence" else "classification"
    return Dataset(value, tensors["x_train"], tensors["y_train"], tensors["x_test"], tensors["y_test"],
                   num_classes, kind, x_val=tensors.get("x_val"), y_val=tensors.get("y_val"))
