"""Small slices of the built-in datasets, as users' dataset functions (`dataset: file.py:function`), so
an end-to-end sweep or `dse train` of them runs in seconds: the first 192 training samples and 96 of the
validation and test splits each, under the built-in's name (so the built-in proxies take their layout and
widths for it)."""

from __future__ import annotations

import dataclasses

from dse.data import Dataset, load_dataset, with_validation

TRAIN_SAMPLES = 192
HELD_OUT_SAMPLES = 96


def _slice(name: str) -> Dataset:
    data = with_validation(load_dataset(name))
    assert data.x_val is not None and data.y_val is not None
    return dataclasses.replace(
        data, x_train=data.x_train[:TRAIN_SAMPLES], y_train=data.y_train[:TRAIN_SAMPLES],
        x_val=data.x_val[:HELD_OUT_SAMPLES], y_val=data.y_val[:HELD_OUT_SAMPLES],
        x_test=data.x_test[:HELD_OUT_SAMPLES], y_test=data.y_test[:HELD_OUT_SAMPLES])


def digits() -> Dataset:
    return _slice("digits")


def mnist1d() -> Dataset:
    return _slice("mnist1d")


def sort() -> Dataset:
    return _slice("sort-easy")
