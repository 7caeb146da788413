"""One proxy training run: data, model, the method's setup (quantized layers and optimizer), the loop.

`train(config)` is what `dse train` and every sweep trial call. It is deterministic for a seed: the
model's initialisation, the batch order and every stochastic rounding draw come from generators
seeded by `config.seed`, and the run uses `config.threads` torch threads.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dse.data import DATASETS, Dataset, load_dataset
from dse.errors import InputError, choice
from dse.train.config import OPTIMIZERS, TrainConfig, TrainingSetup, TrainResult
from dse.train.layers import quantize_model, set_quantization
from dse.train.optim import make_optimizer
from dse.train.policy import QuantPolicy
from models.proxies import MODELS, build_model

EVAL_BATCH = 1024
Progress = Callable[[int, float, float], None]
"""Called after each epoch with (epoch, mean training loss, test accuracy)."""


def check_config(config: TrainConfig) -> None:
    """Reject what cannot run, before any data is loaded (one line each)."""
    choice("model", config.model, MODELS)
    choice("dataset", config.dataset, DATASETS)
    choice("optimizer", config.optimizer, OPTIMIZERS)
    for name in ("epochs", "batch_size", "threads"):
        if getattr(config, name) < 1:
            raise InputError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.warmup_epochs < 0:
        raise InputError(f"warmup_epochs must be >= 0, got {config.warmup_epochs}")
    if config.lr is not None and not (math.isfinite(config.lr) and config.lr > 0):
        raise InputError(f"lr must be a positive number, got {config.lr}")
    if config.device != "cpu" and not config.device.startswith("cuda"):
        raise InputError(f"device must be 'cpu' or 'cuda[:N]', got {config.device!r}")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {config.device!r} asked for, but torch sees no CUDA device")
    if config.optimizer == "niti":
        from dse.train.niti import check_niti

        check_niti(config)  # the formats are one integer width, niti_mu is in range
        if config.accumulation is not None:
            raise InputError(f"accumulation {config.accumulation!r} does not apply to optimizer 'niti', "
                             "which accumulates exactly in int32")
    else:
        QuantPolicy.from_config(config)  # raises on bad specs and roundings


def prepare(model: nn.Module, config: TrainConfig, generator: torch.Generator) -> TrainingSetup:
    """The method of `config` applied to `model`: quantized layers, loss, optimizer, epoch hook."""
    if config.optimizer == "niti":
        from dse.train.niti import niti_setup

        return niti_setup(model, config, generator)
    policy = QuantPolicy.from_config(config)
    quantize_model(model, policy, generator)
    warmup = config.warmup_epochs
    if warmup:
        set_quantization(model, False)
    optimizer = make_optimizer(config.optimizer, model, policy, config.lr, config.momentum,
                               config.weight_decay, generator=generator)

    def on_epoch_start(epoch: int) -> None:
        if warmup and epoch == warmup:
            set_quantization(model, True)
            hook = getattr(optimizer, "step_quantizer", None)
            if hook is not None:
                hook.quantize_weights()  # the fp32 warm-up weights move into their storage format

    return TrainingSetup(model, _cross_entropy, optimizer, on_epoch_start)


def _cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Accuracy on (x, y): per sample for classification, per token for sequence tasks."""
    model.eval()
    correct = 0
    for start in range(0, len(x), EVAL_BATCH):
        logits = model(x[start:start + EVAL_BATCH])
        correct += int((logits.argmax(-1) == y[start:start + EVAL_BATCH]).sum())
    model.train()
    return correct / y.numel()


def _flushing_denormals() -> bool:
    return bool(torch.tensor([1e-39], dtype=torch.float32).mul(1.0)[0] == 0)


@contextlib.contextmanager
def _run_settings(threads: int) -> Iterator[None]:
    """The run's thread count, denormals flushed (they appear as training goes on and slow the CPU
    down), and cuDNN restricted to deterministic algorithms with no autotuning (some convolution
    backward algorithms add with atomics, in an order that changes from run to run); the caller's
    settings come back afterwards, as a library call should leave them."""
    cudnn = torch.backends.cudnn
    previous = torch.get_num_threads(), _flushing_denormals(), cudnn.deterministic, cudnn.benchmark
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.set_num_threads(previous[0])
        torch.set_flush_denormal(previous[1])
        cudnn.deterministic, cudnn.benchmark = previous[2], previous[3]


def train(config: TrainConfig, dataset: Dataset | None = None,
          progress: Progress | None = None) -> TrainResult:
    """Train the config's proxy and measure it; a loss that turns NaN or inf ends the run as diverged."""
    check_config(config)
    with _run_settings(config.threads):
        return _train(config, dataset, progress)


def _train(config: TrainConfig, dataset: Dataset | None, progress: Progress | None) -> TrainResult:
    data = dataset if dataset is not None else load_dataset(config.dataset, config.data_dir)
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    order = torch.Generator().manual_seed(config.seed + 1)
    model = build_model(config.model, data).to(device)
    params = sum(p.numel() for p in model.parameters())
    setup = prepare(model, config, generator)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    started = time.perf_counter()
    losses: list[float] = []
    accuracies: list[float] = []
    diverged = False
    setup.model.train()
    for epoch in range(config.epochs):
        if setup.on_epoch_start is not None:
            setup.on_epoch_start(epoch)
        permutation = torch.randperm(len(x_train), generator=order).to(device)
        total, batches = 0.0, 0
        for start in range(0, len(permutation), config.batch_size):
            index = permutation[start:start + config.batch_size]
            loss = setup.loss_fn(setup.model(x_train[index]), y_train[index])
            value = float(loss.detach())
            if not math.isfinite(value):
                diverged = True
                break
            loss.backward()
            setup.optimizer.step()
            setup.optimizer.zero_grad(set_to_none=True)
            total, batches = total + value, batches + 1
        if not diverged and not all(torch.isfinite(p).all() for p in setup.model.parameters()):
            diverged = True
        losses.append(total / max(batches, 1) if not diverged else math.nan)
        accuracies.append(evaluate(setup.model, x_test, y_test))
        if progress is not None:
            progress(epoch, losses[-1], accuracies[-1])
        if diverged:
            break
    return TrainResult(
        test_accuracy=accuracies[-1] if accuracies else math.nan,
        final_loss=losses[-1] if losses else math.nan,
        diverged=diverged,
        epochs_run=len(losses),
        wall_time_s=time.perf_counter() - started,
        params=params,
        loss_curve=losses,
        accuracy_curve=accuracies,
        config=config.to_dict(),
    )
