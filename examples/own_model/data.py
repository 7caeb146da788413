"""A user's own dataset for dse: sklearn's 8x8 digits as images, split 80/20 by class.

dse calls `digit_images()` with no arguments. It may return a dse Dataset, a tuple
(x_train, y_train, x_test, y_test) - or with x_val, y_val before the test pair - or a dict of those
(optionally with num_classes and task). Without a validation split, dse carves one out of the training
data as it does for its own datasets.
"""

from __future__ import annotations

import numpy as np
import torch


def digit_images() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8)
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.2, random_state=0,
                                                        stratify=digits.target)
    return (torch.from_numpy(x_train), torch.from_numpy(y_train), torch.from_numpy(x_test),
            torch.from_numpy(y_test))
