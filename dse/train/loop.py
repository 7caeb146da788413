"""One proxy training run: data, model, the method's setup (quantized layers and optimizer), the loop.

`train(config)` is what `dse train` and every sweep trial call. It is deterministic for a seed: the
model's initialisation, the batch order and every stochastic rounding draw come from generators
seeded by `config.seed`, and the run uses `config.threads` torch threads.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dse.data import Dataset, load_dataset, with_validation
from dse.errors import InputError
from dse.models.proxies import ModelFactory, build_model
from dse.train.config import TrainConfig, TrainingSetup, TrainResult, field_value
from dse.train.denormals import denormals_flushed
from dse.train.fp32 import ieee_fp32
from dse.train.layers import Gemm, UnconvertedGemmWarning, quantize_model, set_quantization
from dse.train.optim import check_optimizer, quantized_optimizer
from dse.train.policy import QuantPolicy
from dse.train.recompute import replaying
from dse.train.schedule import lr_factor
from dse.train.tally import EpochTally, members_finite, training_state
from dse.usercode import describe, is_ref, load_function

EVAL_BATCH = 1024
EXAMPLE_SAMPLES = 2
"""Training samples one forward runs on to find a model's functional GEMMs before training."""
Progress = Callable[[int, float, float, float], None]
"""Called after each epoch with (epoch, mean training loss, validation accuracy, test accuracy)."""
GemmReport = Callable[[list[Gemm], list[str]], None]
"""Called once, before training, with the GEMMs quantize_model converted (a live QuantizedGemms: a GEMM
first run during training joins it then) and the GEMMs it could not (one line each)."""


def check_batch_size(batch_size: int, training_samples: int | None, dataset: str) -> None:
    """A batch no larger than the training set (an epoch would otherwise be one short batch)."""
    if training_samples is not None and batch_size > training_samples:
        raise InputError(f"batch_size {batch_size} is larger than the training set of {dataset!r} "
                         f"({training_samples} samples after the validation split)")


def check_field(name: str, value: Any) -> Any:
    """`field_value` (what a TrainConfig field's value means, normalised), plus what the value needs of
    this machine: a user's model or dataset (`file.py:function`) loads, a CUDA device exists. One
    line per problem and no location: `check_config`, the sweep file's validator and the CLI each
    say where."""
    value = field_value(name, value)
    if name in ("model", "dataset") and value is not None and is_ref(value):
        load_function(value, name)  # the file or module and the function in it exist
    if name == "device" and value.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {value!r} asked for, but torch sees no CUDA device")
    return value


def check_config(config: TrainConfig, model_given: bool = False) -> None:
    """Reject what cannot run, before any data is loaded (one line each). `model_given`: the model comes
    as a factory, not from config.model."""
    for name in ("model", "dataset", "device"):  # TrainConfig checked the rest when it was made
        if not (model_given and name == "model"):
            check_field(name, getattr(config, name))
    if config.optimizer == "niti":
        from dse.train.niti import check_niti

        check_niti(config)  # the formats are one integer width, niti_mu is in range, the copy fits
        if config.lr_schedule != "constant" or config.lr_warmup_epochs:
            raise InputError("optimizer 'niti' has no learning rate: its update bitwidth niti_mu follows "
                             "the paper's step schedule, so lr_schedule and lr_warmup_epochs do not apply")
        if config.accumulation is not None:
            raise InputError(f"accumulation {config.accumulation!r} does not apply to optimizer 'niti', "
                             "which accumulates exactly in int32")
        if config.layers:
            raise InputError("layers (per-layer formats) do not apply to optimizer 'niti', which trains "
                             "every layer in one integer width")
    else:
        policy = QuantPolicy.from_config(config)  # the formats' combinations (scaled accumulator, ...)
        check_optimizer(config.optimizer, policy, config.weight_decay)  # weight decay, LNS-Madam's copy


def prepare(model: nn.Module, config: TrainConfig, generator: torch.Generator,
            example_input: Tensor | None = None, on_gemms: GemmReport | None = None) -> TrainingSetup:
    """The method of `config` applied to `model`: quantized layers, loss, optimizer, epoch hook.

    `example_input` (a few training samples) lets quantize_model find the GEMMs the forward calls as
    functions; `on_gemms` receives the GEMMs it converted and its warnings about those it could not.
    """
    if config.optimizer == "niti":
        from dse.train.niti import niti_setup

        return niti_setup(model, config, generator)
    policy = QuantPolicy.from_config(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnconvertedGemmWarning)
        gemms = quantize_model(model, policy, generator, example_input)
    unconverted = [str(w.message) for w in caught if issubclass(w.category, UnconvertedGemmWarning)]
    for w in caught:
        if not issubclass(w.category, UnconvertedGemmWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if on_gemms is not None:
        on_gemms(gemms, unconverted)
    else:
        for message in unconverted:
            warnings.warn(message, UnconvertedGemmWarning, stacklevel=2)
    warmup = config.warmup_epochs
    if warmup:
        set_quantization(model, False)
    optimizer, step_quantizer = quantized_optimizer(
        config.optimizer, model, policy, config.lr, config.momentum, config.weight_decay, generator=generator,
        p_scale=config.p_scale, g_bound=config.g_bound)
    base_lrs = [group["lr"] for group in optimizer.param_groups]

    def on_epoch_start(epoch: int) -> None:
        factor = lr_factor(config, epoch)
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base * factor
        if warmup and epoch == warmup:
            set_quantization(model, True)
            step_quantizer.quantize_weights()  # the fp32 warm-up weights move into their storage format

    return TrainingSetup(model, _cross_entropy, optimizer, on_epoch_start)


def _cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch: int = EVAL_BATCH) -> float:
    """Accuracy on (x, y): per sample for classification, per token for sequence tasks."""
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for start in range(0, len(x), batch):
        logits = model(x[start:start + batch])
        correct += (logits.argmax(-1) == y[start:start + batch]).sum()
    model.train()
    return int(correct) / y.numel()  # (one read back, not one per batch)


@contextlib.contextmanager
def _run_settings(threads: int) -> Iterator[None]:
    """The run's thread count, denormals flushed on every thread it computes on (they appear as
    training goes on and slow the CPU down; dse/train/denormals.py), and cuDNN restricted to
    deterministic algorithms with no autotuning (some convolution backward algorithms add with
    atomics, in an order that changes from run to run), and fp32 matmuls, convolutions and RNNs in
    IEEE fp32 on CUDA and oneDNN (torch runs cuDNN convolutions in TF32 by default, and a caller's
    `set_float32_matmul_precision("high"/"medium")` would run matmuls in TF32 or bf16:
    dse/train/fp32.py); the caller's settings come back afterwards, as a library call should leave
    them."""
    cudnn = torch.backends.cudnn
    previous = torch.get_num_threads(), cudnn.deterministic, cudnn.benchmark
    torch.set_num_threads(threads)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        with denormals_flushed(threads), ieee_fp32():
            yield
    finally:
        torch.set_num_threads(previous[0])
        cudnn.deterministic, cudnn.benchmark = previous[1], previous[2]


def train(config: TrainConfig, dataset: Dataset | None = None, progress: Progress | None = None,
          model: ModelFactory | None = None, on_gemms: GemmReport | None = None) -> TrainResult:
    """Train the config's model and measure it; a loss that turns NaN or inf ends the run as diverged.

    `model`: a factory (sample shape, number of classes) -> nn.Module used instead of config.model; the
    result's config names it as `module:function`. `on_gemms` receives the GEMMs quantized (by name,
    with their formats) and those left in fp32.
    """
    check_config(config, model_given=model is not None)
    with _run_settings(config.threads):
        result = _train(config, dataset, progress, model, on_gemms)
    if model is not None:
        result.config["model"] = describe(model)  # what trained: the factory, not config.model
    return result


def _train(config: TrainConfig, dataset: Dataset | None, progress: Progress | None,
           factory: ModelFactory | None = None, on_gemms: GemmReport | None = None) -> TrainResult:
    data = with_validation(dataset if dataset is not None else load_dataset(config.dataset, config.data_dir))
    check_batch_size(config.batch_size, len(data.x_train), config.dataset)
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    order = torch.Generator().manual_seed(config.seed + 1)
    model = build_model(factory if factory is not None else config.model, data).to(device)
    params = sum(p.numel() for p in model.parameters())
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    setup = prepare(model, config, generator, x_train[:EXAMPLE_SAMPLES], on_gemms)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    assert data.x_val is not None and data.y_val is not None
    x_val, y_val = data.x_val.to(device), data.y_val.to(device)
    started = time.perf_counter()
    losses: list[float] = []
    accuracies: list[float] = []
    val_accuracies: list[float] = []
    iterations: list[int] = []
    diverged = False
    setup.model.train()
    with replaying([generator], setup.model):  # a recomputation draws what its forward drew
        for epoch in range(config.epochs):
            if setup.on_epoch_start is not None:
                setup.on_epoch_start(epoch)
            permutation = torch.randperm(len(x_train), generator=order).to(device)
            tally = EpochTally(training_state(setup.model), 1, [0], stacked=False, generators=[generator])
            for start in range(0, len(permutation), config.batch_size):
                index = permutation[start:start + config.batch_size]
                loss = setup.loss_fn(setup.model(x_train[index]), y_train[index])
                if tally.add(loss):
                    break
                loss.backward()
                setup.optimizer.step()
                setup.optimizer.zero_grad(set_to_none=True)
            epoch_losses = tally.close()
            diverged = epoch_losses.diverged[0] or not members_finite(list(setup.model.parameters()))[0]
            losses.append(math.nan if diverged else epoch_losses.mean(0))
            iterations.append(epoch_losses.batches[0])
            val_accuracies.append(evaluate(setup.model, x_val, y_val, setup.eval_batch or EVAL_BATCH))
            accuracies.append(evaluate(setup.model, x_test, y_test, setup.eval_batch or EVAL_BATCH))
            if progress is not None:
                progress(epoch, losses[-1], val_accuracies[-1], accuracies[-1])
            if diverged:
                break
    return TrainResult(
        test_accuracy=accuracies[-1] if accuracies else math.nan,
        final_loss=losses[-1] if losses else math.nan,
        diverged=diverged,
        epochs_run=len(losses),
        wall_time_s=time.perf_counter() - started,
        params=params,
        val_accuracy=val_accuracies[-1] if val_accuracies else math.nan,
        loss_curve=losses,
        accuracy_curve=accuracies,
        val_accuracy_curve=val_accuracies,
        epoch_iterations=iterations,
        config=config.to_dict(),
    )
