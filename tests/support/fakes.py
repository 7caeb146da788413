"""Stand-in training functions for the sweep tests: fast, deterministic, picklable (module level), and
able to fail or diverge on purpose. Each call appends one JSON line to $DSE_FAKE_LOG if set, so a test
can count which trials actually trained, across worker processes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time

from dse.train.config import TrainConfig, TrainResult


def _log(config: TrainConfig) -> None:
    path = os.environ.get("DSE_FAKE_LOG")
    if path:
        line = json.dumps({"format": config.format, "optimizer": config.optimizer, "seed": config.seed,
                           "pid": os.getpid(), "lr": config.lr}) + "\n"
        with open(path, "a", encoding="utf-8") as handle:  # one short write: atomic for O_APPEND
            handle.write(line)


def fake_accuracy(config: TrainConfig, split: int = 0) -> float:
    """A made-up but deterministic accuracy in [0.5, 1) from the configuration (split 0: test, 1:
    validation, which disagree)."""
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).digest()
    return 0.5 + digest[split] / 512.0


def fake_train(config: TrainConfig) -> TrainResult:
    """Raises for format int4, diverges for lr >= 10, else 'trains' instantly."""
    _log(config)
    if config.format == "int4":
        raise RuntimeError("int4 exploded\nsecond line of the message")
    if config.lr is not None and config.lr >= 10:
        return TrainResult(test_accuracy=0.1, final_loss=math.inf, diverged=True, epochs_run=1,
                           wall_time_s=0.01, params=10, config=config.to_dict())
    return TrainResult(test_accuracy=fake_accuracy(config), final_loss=0.25, diverged=False,
                       epochs_run=config.epochs, wall_time_s=0.01, params=10, loss_curve=[1.0, 0.25],
                       val_accuracy=fake_accuracy(config, 1), config=config.to_dict())


def slow_train(config: TrainConfig) -> TrainResult:
    """fake_train that takes 0.25 s, so a sweep can be killed in the middle."""
    time.sleep(0.25)
    return fake_train(config)


def held_train(config: TrainConfig) -> TrainResult:
    """fake_train that, for seeds above 0, waits until the file $DSE_RELEASE exists (a test holds a sweep
    in the middle of its run for as long as it needs); while it waits, the file $DSE_RELEASE.waiting.<pid>
    says this process is held (so a test knows when nothing else is running)."""
    release = os.environ.get("DSE_RELEASE")
    if config.seed > 0 and release and not os.path.exists(release):
        with open(f"{release}.waiting.{os.getpid()}", "w"):
            pass
        while not os.path.exists(release):
            time.sleep(0.02)
    return fake_train(config)


def validated_train(config: TrainConfig) -> dict[str, object]:
    """fake_train plus a validation accuracy that disagrees with the test accuracy on purpose.

    Validation peaks at lr = 0.03 and test at lr = 0.1 (with a small seed-dependent wobble), so a
    sweep that tunes lr over [0.01, 0.03, 0.1] chooses 0.03 if it follows validation, 0.1 if it
    peeks at the test set. Returned as TrainResult.to_dict() would return it.
    """
    result = fake_train(config).to_dict()
    lr = config.lr if config.lr is not None else 0.01
    wobble = 0.002 * (config.seed % 3)
    validation = {0.01: 0.80, 0.03: 0.90, 0.1: 0.85}.get(lr, 0.5) + wobble
    test = {0.01: 0.78, 0.03: 0.84, 0.1: 0.92}.get(lr, 0.5) - wobble
    return {**result, "val_accuracy": validation, "test_accuracy": test}
