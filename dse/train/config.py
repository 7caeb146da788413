"""What one training run is asked to do (TrainConfig) and what it reports (TrainResult).

Both are plain data so that the sweep engine can hash, store and ship them between processes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dse.precision import FORMAT_FIELDS, LayerRule, TensorFormats, layer_rules

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw", "madam", "lns-madam", "niti")
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine", "step")
TENSOR_FORMAT_FIELDS: tuple[str, ...] = FORMAT_FIELDS
"""The fields that give a tensor class its number format (spec strings)."""
SPEC_FIELDS: tuple[str, ...] = (*TENSOR_FORMAT_FIELDS, "accumulation")
"""Every field that holds a format spec."""


@dataclass(frozen=True)
class TrainConfig:
    """One proxy training run. Format fields are spec strings; None means full precision (fp32).

    `format` is shorthand for weights, activations and gradients at once; the specific fields
    override it. `gradients` covers the errors (activation gradients) and, unless `weight_grads`
    is given, the weight gradients too.
    """

    model: str = "mlp"
    """A built-in proxy (mlp, cnn, resnet, transformer) or a user's model as `file.py:function` or
    `package.module:function` (models.proxies.ModelFactory)."""
    dataset: str = "digits"
    """A built-in dataset or a user's function as `file.py:function` (dse.data.user)."""
    format: str | None = None
    """Format of weights, activations and gradients (default fp32)."""
    weights: str | None = None
    """Weight format (overrides format)."""
    activations: str | None = None
    """Activation format (overrides format)."""
    gradients: str | None = None
    """Gradient format (overrides format)."""
    weight_grads: str | None = None
    """Weight-gradient format (default: gradients)."""
    optimizer_state: str | None = None
    """Optimizer-state format (default fp32)."""
    rounding: str = "nearest"
    """Rounding of weights, activations and gradients on their way into a GEMM."""
    accumulation: str | None = None
    """Format of the GEMMs' partial sums (None: fp32, i.e. torch's own accumulation)."""
    accumulation_chunk: int = 16
    """Products summed in fp32 before each rounding of the running sum into `accumulation`."""
    update_rounding: str = "stochastic"
    """Rounding of the stored weights onto their grid after each update (a master copy in a format,
    or the weights in their own format)."""
    optimizer: str = "sgd"
    """The training method (docs/training.md)."""
    lr: float | None = None
    """Learning rate; None (not given) picks the optimizer's default (docs/training.md)."""
    lr_schedule: str = "constant"
    """How the learning rate moves over the epochs: constant, cosine (to 0 at the last epoch) or step
    (times lr_gamma every lr_step_epochs); set at the start of each epoch."""
    lr_warmup_epochs: int = 0
    """Epochs of linear learning-rate warm-up (lr * (e + 1) / n in epoch e) before the schedule."""
    lr_step_epochs: int = 10
    """step schedule: epochs between two decays."""
    lr_gamma: float = 0.1
    """step schedule: factor of each decay."""
    momentum: float = 0.9
    """SGD momentum (sgd only), below 1."""
    weight_decay: float = 0.0
    """Weight decay (sgd, adam, adamw)."""
    p_scale: float = 3.0
    """Madam / LNS-Madam: weights are bounded by p_scale x the RMS of their initial values
    (jxbz/madam, jiaweizzhao/lns-madam-optimizer: 3)."""
    g_bound: float = 10.0
    """Madam / LNS-Madam: bound on the normalised gradient g* (the references: 10)."""
    master_weights: bool | str = True
    """Where the optimizer keeps the weights: True an fp32 copy, False the weight format itself, or
    a format spec for a copy of its own (e.g. 'lns(16,gamma=2048)', 'posit(16,2)', 'int16' for NITI).
    The GEMMs always see the weights quantized to `weights`."""
    warmup_epochs: int = 0
    """Epochs trained in fp32 before quantization is switched on (Lu et al.'s posit recipe)."""
    layer_scaling: bool = False
    """Lu et al.'s layer-wise power-of-two scaling factors (posit training)."""
    full_precision_layers: tuple[str, ...] = ()
    """Layers kept in fp32: any of 'first', 'last'. Papers keep both for deep networks; the proxies
    are two to four GEMMs deep, so by default every GEMM is quantized."""
    layers: tuple[LayerRule, ...] = ()
    """Per-layer formats: ordered rules `{match: glob or type:Class, format/weights/...: spec}`, the
    first match wins, unmatched layers take the fields above (dse/precision.py). Dicts are accepted."""
    niti_mu: int = 5
    """NITI: bits of the integer weight update (its learning rate), halved on the paper's schedule."""
    epochs: int = 10
    """Training epochs."""
    batch_size: int = 64
    """Training batch size, at most the training set."""
    seed: int = 0
    """Seed of the initialisation, the batch order and every stochastic rounding draw."""
    threads: int = 1
    """torch threads of the run."""
    device: str = "cpu"
    """Where the run trains."""
    data_dir: str | None = None
    """Folder of a file dataset (mnist, cifar10)."""

    def __post_init__(self) -> None:
        if not isinstance(self.layers, tuple) or not all(isinstance(rule, LayerRule) for rule in self.layers):
            object.__setattr__(self, "layers", layer_rules(self.layers))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def tensor_formats(self) -> TensorFormats:
        """The trial's format of each tensor class, shorthand resolved (fp32 where none is given)."""
        return TensorFormats.resolve({name: getattr(self, name) for name in TENSOR_FORMAT_FIELDS})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["full_precision_layers"] = list(self.full_precision_layers)
        out["layers"] = [rule.to_dict() for rule in self.layers]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        if "full_precision_layers" in data:
            data["full_precision_layers"] = tuple(data["full_precision_layers"])
        return cls(**data)


@dataclass
class TrainResult:
    """What a run measured. A diverged run stops early and says so; it is a result, not an error.

    Accuracies are on the dataset's test split (reported) and its validation split (carved from the
    training data; what tuning chooses by)."""

    test_accuracy: float
    final_loss: float
    diverged: bool
    epochs_run: int
    wall_time_s: float
    params: int
    val_accuracy: float = math.nan
    """Validation accuracy after the last epoch."""
    loss_curve: list[float] = field(default_factory=list)
    """Mean training loss per epoch."""
    accuracy_curve: list[float] = field(default_factory=list)
    """Test accuracy after each epoch."""
    val_accuracy_curve: list[float] = field(default_factory=list)
    """Validation accuracy after each epoch."""
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainingSetup:
    """Everything a training method contributes to the shared loop."""

    model: nn.Module
    loss_fn: Any
    """Callable (logits, targets) -> scalar loss tensor."""
    optimizer: torch.optim.Optimizer
    on_epoch_start: Any = None
    """Optional callable(epoch: int) run before each epoch (warm-up switch, learning-rate schedule)."""
    eval_batch: int | None = None
    """Batch size of evaluation when the method's outputs depend on it (NITI's per-tensor exponents
    span the batch); None: the loop's EVAL_BATCH."""
