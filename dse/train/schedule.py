"""Learning-rate schedules: the factor the base learning rate is multiplied by in each epoch.

Set once per epoch (at its start), as `TrainConfig.lr_schedule` and its fields describe; a linear
warm-up of `lr_warmup_epochs` comes first and the schedule runs over the epochs after it.
"""

from __future__ import annotations

import math

from dse.train.config import TrainConfig


def lr_factor(config: TrainConfig, epoch: int) -> float:
    """The factor of the base learning rate in `epoch` (0-based).

    Warm-up: (epoch + 1) / lr_warmup_epochs. Then, with t = epoch - lr_warmup_epochs over
    n = epochs - lr_warmup_epochs epochs: constant 1; cosine (1 + cos(pi t / n)) / 2, which starts
    at 1 and reaches 0 one epoch after the last; step lr_gamma ** (t // lr_step_epochs).
    """
    warmup = config.lr_warmup_epochs
    if epoch < warmup:
        return (epoch + 1) / warmup
    t, n = epoch - warmup, max(config.epochs - warmup, 1)
    if config.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t / n))
    if config.lr_schedule == "step":
        return config.lr_gamma ** (t // config.lr_step_epochs)
    return 1.0
