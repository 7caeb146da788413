"""On the device path (what a GPU runs), a training step never makes the host wait, alone or grouped:
the loss, the divergence check and every quantizer stay on the device, and the host reads an epoch
back a fixed number of times however many batches it has.

Counted on CPU tensors inside `dse.formats.fast.device_path()` with the `host_syncs` fixture
(tests/support/host_syncs.py): an epoch of 2k batches makes exactly as many host synchronisations as
one of k batches (none per step), and at most PER_EPOCH more than training no epoch at all. The
device path gives the CPU path's results bit for bit, divergence included.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import pytest

from dse.data import load_dataset, with_validation
from dse.formats.fast import device_path
from dse.train import TrainConfig, train
from dse.train.grouped import train_group

pytestmark = pytest.mark.usefixtures("one_thread")

PER_EPOCH = 6
"""Host reads an epoch may make on a device: the batch order copied in, the epoch's losses and
divergence flags (one read), the weights' finiteness (one), the validation and test accuracies (one
each), and the diverging members' flags copied in when the next epoch's tally starts."""
BATCH = 32

METHODS: list[dict[str, Any]] = [
    {"format": "int8"},
    {"format": "fp8_e4m3", "rounding": "stochastic"},
    {"format": "mxfp8_e4m3"},
    {"format": "nvfp4"},
    {"format": "posit(16,1)", "layer_scaling": True},
    {"format": "fp8_e4m3", "optimizer": "adam", "gradients": "fp8_e5m2"},
    {"format": "fp8_e4m3", "optimizer": "madam"},
    {"format": "lns8", "optimizer": "lns-madam", "master_weights": False},
    {"format": "fp8_e4m3", "accumulation": "fp16"},
]


DIVERGING: list[dict[str, Any]] = [{"format": "fp16"},
                                   {"format": "fp16", "rounding": "stochastic", "momentum": 0.9}]
"""Methods in which lr 100 overflows fp16 within the first epoch."""


def _ids(value: object) -> str:
    return "-".join(str(v) for v in value.values()) if isinstance(value, dict) else str(value)


def _syncs(run: Any, host_syncs: type) -> list[tuple[str, str]]:
    with device_path(), host_syncs() as seen:
        run()
    return list(seen.syncs)


def _train_digits(digits: Any, samples: int) -> Any:
    """digits with `samples` training samples (validation carved first, so both keep it)."""
    data = with_validation(digits)
    return dataclasses.replace(data, x_train=data.x_train[:samples], y_train=data.y_train[:samples])


@pytest.mark.parametrize("fields", METHODS, ids=_ids)
@pytest.mark.parametrize("grouped", [False, True], ids=["alone", "grouped"])
def test_a_training_step_on_the_device_path_never_waits_for_the_device(
        fields: dict[str, Any], grouped: bool, digits: Any, host_syncs: type) -> None:
    config = TrainConfig(model="mlp", dataset="digits", epochs=1, batch_size=BATCH, **fields)
    configs = [config.replace(seed=seed, lr=lr) for seed, lr in ((0, 0.05), (1, 0.1))]

    def run(samples: int, epochs: int = 1) -> None:
        data = _train_digits(digits, samples)
        if grouped:
            train_group([c.replace(epochs=epochs) for c in configs], data)
        else:
            train(config.replace(epochs=epochs), data)

    _syncs(lambda: run(4 * BATCH), host_syncs)  # first-call costs (caches per format and device)
    short, long = (Counter(_syncs(lambda samples=samples: run(samples), host_syncs))
                   for samples in (4 * BATCH, 8 * BATCH))
    per_step = long - short
    assert not per_step, "syncs per step:\n" + "\n".join(f"{n} x {what} at {where}"
                                                         for (what, where), n in per_step.items())
    per_epoch = Counter(_syncs(lambda: run(4 * BATCH, epochs=2), host_syncs)) - short
    assert per_epoch.total() <= PER_EPOCH, per_epoch


def _per_step_syncs(config: TrainConfig, grouped: bool, data: Any, host_syncs: type) -> Counter[Any]:
    """The synchronisations an epoch of 6 batches makes beyond one of 2, over 4: those of one step."""
    def run(samples: int) -> None:
        part = dataclasses.replace(data, x_train=data.x_train[:samples], y_train=data.y_train[:samples])
        if grouped:
            train_group([config.replace(seed=0), config.replace(seed=1, lr=0.05)], part)
        else:
            train(config, part)

    _syncs(lambda: run(2 * BATCH), host_syncs)
    short, long = (Counter(_syncs(lambda samples=samples: run(samples), host_syncs))
                   for samples in (2 * BATCH, 6 * BATCH))
    return Counter({key: count // 4 for key, count in (long - short).items()})


@pytest.mark.parametrize("grouped", [False, True], ids=["alone", "grouped"])
def test_users_attention_models_and_the_transformer_step_without_waiting(
        grouped: bool, digits: Any, host_syncs: type, repo_root: Any) -> None:
    """Users' networks with functional GEMMs and nn.MultiheadAttention, and the transformer proxy."""
    encoder = TrainConfig(model=f"{repo_root}/tests/support/user_models.py:encoder", dataset="digits",
                          epochs=1, batch_size=BATCH, format="int8")
    assert not _per_step_syncs(encoder, grouped, with_validation(digits), host_syncs)
    transformer = TrainConfig(model="transformer", dataset="sort-easy", epochs=1, batch_size=BATCH,
                              format="fp8_e4m3", gradients="fp8_e5m2")
    assert not _per_step_syncs(transformer, grouped, with_validation(load_dataset("sort-easy")), host_syncs)


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_lns_madam_members_with_integer_and_float64_code_steps_step_without_waiting(
        rounding: str, digits: Any, host_syncs: type) -> None:
    """A group whose members' code steps differ in kind (lr 0.065: float64; the others integer) and in
    shift (1/32 and 1/128, members 0 and 3 apart sharing one) picks each kind's and each shift's
    members on the device, not from a list copied in at every step."""
    config = TrainConfig(model="mlp", dataset="digits", epochs=1, batch_size=BATCH, format="lns8",
                         optimizer="lns-madam", master_weights=False, update_rounding=rounding)
    configs = [config.replace(seed=g, lr=lr) for g, lr in enumerate((1 / 32, 0.065, 1 / 128, 1 / 32))]
    data = with_validation(digits)

    def run(samples: int) -> None:
        train_group(configs, dataclasses.replace(data, x_train=data.x_train[:samples],
                                                 y_train=data.y_train[:samples]))

    _syncs(lambda: run(2 * BATCH), host_syncs)
    short, long = (Counter(_syncs(lambda samples=samples: run(samples), host_syncs))
                   for samples in (2 * BATCH, 6 * BATCH))
    assert not long - short, long - short


NITI_SYNCS_PER_STEP = {False: 24, True: 45}
"""NITI on the digits MLP (alone, and a group of 2) reads back per step what it keeps on the host by
design: each int8 tensor's exponent is a Python int (its shift amounts come from max|x|, read back:
`range_estimate`, `host_abs_max`), as in the authors' code. Counted here so that it cannot grow
unnoticed; moving NITI's exponents onto the device is left to do (docs/benchmarks.md)."""


@pytest.mark.parametrize("grouped", [False, True], ids=["alone", "grouped"])
def test_niti_reads_back_only_its_exponents(grouped: bool, digits: Any, host_syncs: type) -> None:
    config = TrainConfig(model="mlp", dataset="digits", epochs=1, batch_size=BATCH, format="int8",
                         optimizer="niti")
    per_step = _per_step_syncs(config, grouped, with_validation(digits), host_syncs)
    assert per_step.total() <= NITI_SYNCS_PER_STEP[grouped], per_step
    assert all("/niti/" in where or "host_abs_max" in where for _, where in per_step), per_step


@pytest.mark.parametrize("grouped", [False, True], ids=["alone", "grouped"])
@pytest.mark.parametrize("fields", DIVERGING, ids=_ids)
def test_the_device_path_trains_to_the_cpu_paths_bits_divergence_included(
        fields: dict[str, Any], grouped: bool, digits: Any) -> None:
    """lr 100 overflows fp16 within the first epoch (member 1 of the group), lr 0.05 does not: the
    losses, accuracies and the diverged member's weights (its accuracy) agree to the last bit."""
    config = TrainConfig(model="mlp", dataset="digits", epochs=2, batch_size=BATCH, **fields)
    configs = [config.replace(seed=0, lr=0.05), config.replace(seed=1, lr=100.0)]
    data = _train_digits(digits, 12 * BATCH)

    def run() -> list[dict[str, Any]]:
        results = train_group(configs, data) if grouped else [train(c, data) for c in configs]
        return [{k: v for k, v in r.to_dict().items() if k != "wall_time_s"} for r in results]

    cpu = run()
    with device_path():
        device = run()
    assert cpu[1]["diverged"] and not cpu[0]["diverged"]
    assert repr(device) == repr(cpu)
