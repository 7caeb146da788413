"""What one training run is asked to do (TrainConfig) and what it reports (TrainResult).

Both are plain data so that the sweep engine can hash, store and ship them between processes. The
module imports no torch (the format zoo, datasets and models are imported where a value is checked):
the command line builds `dse train`'s options from TrainConfig, and `dse report` pays for nothing else.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dse.errors import InputError, SettingError, choice, number_problem
from dse.precision import (
    FORMAT_FIELDS,
    FP32,
    FULL_PRECISION_LAYER_NAMES,
    LayerRule,
    TensorFormats,
    canonical_spec,
    layer_rules,
)
from dse.usercode import is_ref

if TYPE_CHECKING:
    import torch
    from torch import nn

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw", "madam", "lns-madam", "niti")
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine", "step")
TENSOR_FORMAT_FIELDS: tuple[str, ...] = FORMAT_FIELDS
"""The fields that give a tensor class its number format (spec strings)."""
SPEC_FIELDS: tuple[str, ...] = (*TENSOR_FORMAT_FIELDS, "accumulation")
"""Every field that holds a format spec."""


_AT_LEAST_ONE: tuple[str, ...] = ("epochs", "batch_size", "threads", "niti_mu", "accumulation_chunk",
                                   "lr_step_epochs")
_NON_NEGATIVE: tuple[str, ...] = ("warmup_epochs", "momentum", "weight_decay", "lr_warmup_epochs", "seed")
_POSITIVE: tuple[str, ...] = ("lr", "p_scale", "g_bound", "lr_gamma")
_NAMED: tuple[str, ...] = ("model", "dataset", "optimizer", "lr_schedule")
"""Fields whose value is one of a list of names (`_names`)."""
_ROUNDING_FIELDS: tuple[str, ...] = ("rounding", "update_rounding")
MAX_LR = 100.0
"""No optimizer here trains with a larger learning rate; a larger value is a typo (1e9 for 1e-9)."""


def _names(name: str) -> tuple[str, ...]:
    """The valid values of a `_NAMED` field (models and datasets imported here: they import torch)."""
    if name == "model":
        from dse.models.proxies import MODELS

        return MODELS
    if name == "dataset":
        from dse.data import DATASETS

        return DATASETS
    return OPTIMIZERS if name == "optimizer" else LR_SCHEDULES


def _check_not_a_workload_file(value: Any) -> None:
    """An ONNX file or a list of layer shapes named as the model to train: an InputError that says dse
    prices such a file (its GEMM shapes, no network to run) and trains a network given as code."""
    suffix = Path(value.strip()).suffix.lower() if isinstance(value, str) else ""
    if not suffix:  # (a built-in's name: nothing to import)
        return
    from dse.models.workloads import is_workload_file

    if is_workload_file(value):
        raise InputError(f"model {value!r}: dse reads only the GEMM shapes of a {suffix} file, to price it "
                         f"as an energy workload, and cannot train it: give the network's PyTorch code "
                         f"(file.py:function) as the model (docs/own-network.md)")


def field_value(name: str, value: Any) -> Any:
    """One TrainConfig field's value checked for what it means; returns it normalised (names in lower
    case, format specs canonical). Every check of a field's value is here, in one place: TrainConfig
    runs it on every field when it is made, and the sweep file's validator and the CLI run it to place
    an error at a key or a flag. Nothing is read from disk or probed (loop.check_field adds that).
    One line per problem, without a location."""
    if value is None:
        return None
    problem = number_problem(value)
    if problem is not None:
        raise InputError(f"{name} {problem}")
    if name in ("model", "dataset") and is_ref(value):
        return value.strip()
    if name in _ROUNDING_FIELDS:
        from dse.formats import check_rounding

        return check_rounding(value)
    if name == "model":
        _check_not_a_workload_file(value)
    if name in _NAMED:
        return choice(name, value, _names(name))
    if name in SPEC_FIELDS:
        return canonical_spec(value)
    if name == "full_precision_layers":
        return tuple(choice("layer", layer, FULL_PRECISION_LAYER_NAMES) for layer in value)
    if name == "layers":
        from dse.formats import get as get_format

        rules = layer_rules(value)
        for rule in rules:
            for field_name, spec in rule.formats:
                try:
                    get_format(spec)
                except ValueError as error:
                    raise InputError(f"{rule.label()}: {field_name}: {str(error).splitlines()[0]}") from None
        return rules
    if name in _AT_LEAST_ONE and value < 1:
        raise InputError(f"{name} must be >= 1, got {value}")
    if name in _NON_NEGATIVE and not value >= 0:
        raise InputError(f"{name} must be >= 0, got {value}")
    if name in _POSITIVE and not (math.isfinite(value) and value > 0):
        raise InputError(f"{name} must be a positive number, got {value}")
    if name == "lr" and value > MAX_LR:
        raise InputError(f"lr must be at most {MAX_LR:g}, got {value:g}")
    if name == "momentum" and not value < 1:
        raise InputError(f"momentum must be below 1 (a momentum of 1 or more never forgets a gradient and "
                         f"diverges), got {value:g}")
    if name == "master_weights":
        return master_copy(value)
    if name == "device":
        if value != "cpu" and not value.startswith("cuda"):
            raise InputError(f"device must be 'cpu' or 'cuda[:N]', got {value!r}")
    return value


def master_copy(value: bool | str) -> bool | str:
    """master_weights normalised: True (an fp32 copy), False (the weight format) or a canonical spec.

    The words true and false (as a command line spells them) are the booleans; the spec fp32 is True.
    """
    if isinstance(value, bool):
        return value
    word = value.strip().lower()
    if word in ("true", "false"):
        return word == "true"
    try:
        spec = canonical_spec(value)
    except ValueError as error:
        raise InputError(f"expected true, false or a format spec: {str(error).splitlines()[0]}") from None
    return True if spec == FP32 else spec


@dataclass(frozen=True)
class TrainConfig:
    """One proxy training run. Format fields are spec strings; None means full precision (fp32).

    `format` is shorthand for weights, activations and gradients at once; the specific fields
    override it. `gradients` covers the errors (activation gradients) and, unless `weight_grads`
    is given, the weight gradients too.
    """

    model: str = "mlp"
    """A built-in proxy (mlp, cnn, resnet, transformer) or a user's model as `file.py:function` or
    `package.module:function` (dse.models.proxies.ModelFactory)."""
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
    """How the learning rate moves over the epochs: constant, cosine (reaching 0 one epoch after the last)
    or step (times lr_gamma every lr_step_epochs); set at the start of each epoch."""
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
        """Every field checked and normalised by `field_value` (a SettingError names the field)."""
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            try:
                normal = field_value(item.name, value)
            except TypeError:  # a value of another type than the field's (the sweep and CLI check types)
                raise SettingError(item.name, f"config {item.name}: expected {item.type}, "
                                   f"got {value!r}") from None
            except ValueError as error:  # a spec's own message does not say which field holds it
                message = str(error).splitlines()[0]
                named = item.name in (*SPEC_FIELDS, "master_weights")
                raise SettingError(item.name, f"config {item.name}: {message}" if named else message) \
                    from None
            if normal is not value:
                object.__setattr__(self, item.name, normal)

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
    epoch_iterations: list[int] = field(default_factory=list)
    """Iterations (weight updates) trained in each epoch: every batch, or in the epoch a run diverged in,
    the batches before its loss turned NaN or inf. What a trial's run energy is priced over."""
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
