"""MNIST-1D generator, vendored so that the dataset is built offline with numpy + scipy only.

Adapted from the `mnist1d` package (mnist1d/data.py and mnist1d/transform.py),
https://github.com/greydanus/mnist1d, Copyright 2020-2024 Sam Greydanus and Peter Steinbach,
licensed under the Apache License, Version 2.0 (see MNIST1D_LICENSE next to this file).
Changes: the legacy global `np.random` stream is replaced by a private `np.random.RandomState`
seeded the same way (same numbers, no global side effect); the download/pickle code, the plotting
helpers and the unused time axis `t` are dropped; the arguments are a frozen dataclass. The random
draws happen in exactly the original order, so the default arguments (seed 42, 5000 samples)
reproduce the published `mnist1d_data.pkl`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Mnist1dArgs:
    """The published defaults of `mnist1d.data.get_dataset_args()`."""

    num_samples: int = 5000
    train_split: float = 0.8
    template_len: int = 12
    padding: tuple[int, int] = (36, 60)
    scale_coeff: float = 0.4
    max_translation: int = 48
    corr_noise_scale: float = 0.25
    iid_noise_scale: float = 2e-2
    shear_scale: float = 0.75
    shuffle_seq: bool = False
    final_seq_length: int = 40
    seed: int = 42


def templates() -> np.ndarray:
    """The 10 hand-drawn 1-D digit templates, whitened and shifted to start at 0, shape (10, 12)."""
    digits = np.asarray([
        [5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5],
        [5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5],
        [5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5],
        [5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5],
        [5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5],
        [5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5],
        [5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5],
        [5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5],
        [5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5],
        [5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5],
    ])
    digits -= digits.mean(1, keepdims=True)
    digits /= digits.std(1, keepdims=True)
    digits -= digits[:, :1]
    return digits / 6.0


def _pad(x: np.ndarray, padding: tuple[int, int], rng: np.random.RandomState) -> np.ndarray:
    low, high = padding
    p = low + int(rng.rand() * (high - low + 1))
    return np.concatenate([x, np.zeros(p)])


def _shear(x: np.ndarray, scale: float, rng: np.random.RandomState) -> np.ndarray:
    coeff = scale * (rng.rand() - 0.5)
    return x - coeff * np.linspace(-0.5, 0.5, len(x))


def _translate(x: np.ndarray, max_translation: int, rng: np.random.RandomState) -> np.ndarray:
    k = rng.choice(max_translation)
    return np.concatenate([x[-k:], x[:-k]])  # k == 0 keeps x unchanged, as in the original


def _corr_noise_like(x: np.ndarray, scale: float, rng: np.random.RandomState) -> np.ndarray:
    from scipy.ndimage import gaussian_filter  # scipy is slow to import: only when generating

    return gaussian_filter(scale * rng.randn(*x.shape), 2)


def _iid_noise_like(x: np.ndarray, scale: float, rng: np.random.RandomState) -> np.ndarray:
    return scale * rng.randn(*x.shape)


def _interpolate(x: np.ndarray, n: int) -> np.ndarray:
    scale = np.linspace(0, 1, len(x))
    from scipy.interpolate import interp1d

    return interp1d(scale, x, axis=0, kind="linear")(np.linspace(0, 1, n))


def transform(x: np.ndarray, args: Mnist1dArgs, rng: np.random.RandomState, eps: float = 1e-8) -> np.ndarray:
    """Pad, dilate, scale, translate, add correlated + iid noise, shear and subsample one template."""
    new_x = _pad(x + eps, args.padding, rng)
    new_x = _interpolate(new_x, args.template_len + args.padding[-1])
    new_x *= 1 + args.scale_coeff * (rng.rand() - 0.5)
    new_x = _translate(new_x, args.max_translation, rng)
    mask = new_x != 0
    new_x = mask * new_x + (1 - mask) * _corr_noise_like(new_x, args.corr_noise_scale, rng)
    new_x = new_x + _iid_noise_like(new_x, args.iid_noise_scale, rng)
    new_x = _shear(new_x, args.shear_scale, rng)
    return _interpolate(new_x, args.final_seq_length)


def make_dataset(args: Mnist1dArgs | None = None) -> dict[str, np.ndarray]:
    """Arrays `x` (float64, (N_train, 40)), `y` (int64), `x_test`, `y_test`; standardised as a whole."""
    args = Mnist1dArgs() if args is None else args
    rng = np.random.RandomState(args.seed)
    base = templates()
    xs, ys = [], []
    per_class = args.num_samples // len(base)
    for label, template in enumerate(base):
        for _ in range(per_class):
            xs.append(transform(template, args, rng))
            ys.append(label)
    order = rng.permutation(len(ys))
    x = np.stack(xs)[order]
    y = np.asarray(ys, dtype=np.int64)[order]
    if args.shuffle_seq:
        x = x[..., rng.permutation(args.final_seq_length)]
    x = (x - x.mean()) / x.std()
    split = int(len(y) * args.train_split)
    return {"x": x[:split], "y": y[:split], "x_test": x[split:], "y_test": y[split:]}
