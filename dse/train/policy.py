"""Which number format each tensor class of a training run uses, and how it is rounded and scaled.

A `QuantPolicy` names one `TensorQuant` per tensor class, by the tensor-class names of
dse/precision.py: the two forward GEMM operands (weights, activations), the gradients (the errors
flowing back, the backward-data operand), the weight gradients (the backward-weight result), the
stored copy of the weights (master_weights) and the optimizer state; plus the accumulator of
the GEMMs' partial sums and its chunk length. `QuantPolicy.from_config`
turns a `TrainConfig`'s spec strings into that policy and applies the training scaling defaults
(docs/training.md, "Quantization policy").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict, cast

import torch
from torch import Tensor

from dse.errors import InputError
from dse.formats import NumberFormat, Scaling, check_rounding, get
from dse.formats.base import MemberGenerators, constant, power_of_two
from dse.formats.fast import host_shortcuts
from dse.precision import (
    ACTIVATIONS,
    FULL_PRECISION_LAYER_NAMES,
    GRADIENTS,
    MASTER_WEIGHTS,
    OPTIMIZER_STATE,
    WEIGHT_GRADS,
    WEIGHTS,
    LayerRule,
    TensorFormats,
    states_scale,
)
from dse.train.config import TrainConfig

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

LU_SCALE_OFFSET_LOG2 = 2
"""sigma in Lu et al.'s posit layer scale S = 2^(round(mean log2|x|) + sigma) (Lu et al., "Training Deep
Neural Networks Using Posit Number System", SOCC 2019, arXiv:1909.03831, layer-wise scaling). The
paper gives no formula or code: this form and sigma = 2 are a reconstruction, unverified."""

_PER_TENSOR_POW2 = Scaling(kind="tensor", pow2=True)


def with_scaling(fmt: NumberFormat, scaling: Scaling) -> NumberFormat:
    """`fmt` with another scaling policy."""
    # every format family is a frozen dataclass with a `scaling` field (NumberFormat's contract)
    changed = dataclasses.replace(cast("DataclassInstance", fmt), scaling=scaling)
    assert isinstance(changed, NumberFormat)
    return changed


@dataclass(frozen=True)
class TensorQuant:
    """How one tensor class is quantized: a format (None = fp32, untouched) and a rounding mode.

    `layer_scale` divides the tensor by Lu et al.'s power-of-two layer-wise scale before rounding
    onto the (unscaled) grid and multiplies it back: the bulk of the log-magnitudes then sits in a
    posit's most precise region.
    """

    format: NumberFormat | None
    rounding: str = "nearest"
    layer_scale: bool = False

    def __post_init__(self) -> None:
        check_rounding(self.rounding)
        fmt = self.format
        if self.layer_scale and fmt is not None and fmt.scaling.kind != "none":
            raise InputError(f"layer-wise scaling needs a format without its own scaling, got {fmt.spec!r}")

    @property
    def enabled(self) -> bool:
        return self.format is not None

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x quantized (a new tensor), or x itself when the format is None."""
        fmt = self.format
        if fmt is None:
            return x
        if self.layer_scale:  # the format has no scaling of its own: x / scale rounds onto its grid
            scale: float | Tensor = lu_layer_scale(x, fmt) if host_shortcuts(x.device) else \
                lu_layer_scale_on_device(x, fmt)
            return fmt.quantize(x / scale, self.rounding, generator).mul_(scale)
        return fmt.quantize(x, self.rounding, generator)

    def members(self, x: Tensor, generator: MemberGenerators | torch.Generator | None = None) -> Tensor:
        """Each x[g] of a stacked tensor quantized as `__call__` quantizes it alone (grouped training):
        scales per member (`NumberFormat.quantize_members`), a layer scale per member."""
        fmt = self.format
        if fmt is None:
            return x
        if self.layer_scale:
            if host_shortcuts(x.device):
                scale = torch.tensor([lu_layer_scale(member, fmt) for member in x], dtype=x.dtype)
            else:
                scale = torch.stack([lu_layer_scale_on_device(member, fmt) for member in x])
            scale = scale.reshape(-1, *[1] * (x.dim() - 1))
            return fmt.quantize_members(x / scale, self.rounding, generator).mul_(scale)
        return fmt.quantize_members(x, self.rounding, generator)


def lu_layer_scale(x: Tensor, fmt: NumberFormat) -> float:
    """Lu et al.'s layer-wise power-of-two scale: 2^(round(mean log2|x|) + sigma).

    The mean runs over the non-zero finite entries with |x| clipped to the format's
    [min_positive, max] (zeros, e.g. after a ReLU, would drag the centre to min_positive); 1 when
    there are none.
    """
    magnitude = x.detach().abs()
    usable = (magnitude > 0) & torch.isfinite(magnitude)
    count = int(usable.sum())
    if count == 0:
        return 1.0
    logs = magnitude.clamp(fmt.min_positive, fmt.max).log2_().masked_fill_(~usable, 0.0)
    centre = round(float(logs.sum(dtype=torch.float64)) / count)
    return math.ldexp(1.0, centre + LU_SCALE_OFFSET_LOG2)


def lu_layer_scale_on_device(x: Tensor, fmt: NumberFormat) -> Tensor:
    """`lu_layer_scale` as a 0-dim tensor of x's dtype, the same value, computed where x lies with
    nothing read back to the host (on a GPU a read-back stalls every launched kernel)."""
    magnitude = x.detach().abs()
    usable = (magnitude > 0) & torch.isfinite(magnitude)
    count = usable.sum()
    logs = magnitude.clamp(fmt.min_positive, fmt.max).log2_().masked_fill_(~usable, 0.0)
    centre = torch.round(logs.sum(dtype=torch.float64) / count)  # (NaN where count is 0: not used)
    scale = power_of_two(centre.nan_to_num_(0.0).to(torch.int64) + LU_SCALE_OFFSET_LOG2)
    return torch.where(count > 0, scale, constant(1.0, torch.float64, x.device)).to(x.dtype)


@dataclass(frozen=True)
class QuantPolicy:
    """Formats of every tensor class of a quantized training run (None formats are fp32)."""

    weights: TensorQuant
    activations: TensorQuant
    gradients: TensorQuant
    weight_grads: TensorQuant
    optimizer_state: TensorQuant
    """Momentum buffers, Adam's moments, Madam's second moment."""
    master_weights: TensorQuant
    """Format and rounding the weights live in after each update: the master copy's format, the weight
    format when the config's master_weights is False, None (fp32) for an fp32 copy."""
    master_copy: bool | str = True
    """The config's master_weights setting (True: an fp32 copy, False: none, a spec: that format)."""
    full_precision_layers: tuple[str, ...] = ()
    accumulation: TensorQuant = TensorQuant(None)
    """Format and rounding of every quantized GEMM's running partial sum (None: fp32, torch's own);
    `from_config` rounds to nearest, as accumulators do."""
    accumulation_chunk: int = 16
    """Reduction indices whose products are summed in fp32 before each rounding into `accumulation`."""
    formats: TensorFormats | None = None
    """The spec strings the GEMM quantizers came from (None: built by hand, not from a config)."""
    layers: tuple[LayerRule, ...] = ()
    """Per-layer rules (dse/precision.py), applied by quantize_model through `for_layer`."""
    rounding: str = "nearest"
    layer_scaling: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.accumulation_chunk, bool) or not isinstance(self.accumulation_chunk, int) \
                or self.accumulation_chunk < 1:
            raise InputError(f"config accumulation_chunk must be an integer >= 1, "
                             f"got {self.accumulation_chunk!r}")
        fmt = self.accumulation.format
        if fmt is not None and fmt.scaling.kind != "none":
            raise InputError(f"config accumulation: {fmt.spec!r} has scale={fmt.scaling.kind}, but an "
                             f"accumulator holds unscaled sums: use an unscaled format (fp16, bf16, "
                             f"fixed(24,12), or scale=none)")
        if self.accumulation.layer_scale:
            raise InputError("config accumulation: an accumulator holds unscaled sums, so it takes no "
                             "layer scale")
        unknown = [name for name in self.full_precision_layers if name not in FULL_PRECISION_LAYER_NAMES]
        if unknown:
            raise InputError(f"unknown full_precision_layers entry {unknown[0]!r}: expected any of "
                             f"{', '.join(FULL_PRECISION_LAYER_NAMES)}")

    @classmethod
    def fp32(cls) -> QuantPolicy:
        """Nothing quantized."""
        none = TensorQuant(None)
        return cls(none, none, none, none, none, none)

    @property
    def quantizes_gemms(self) -> bool:
        return any(q.enabled for q in (self.weights, self.activations, self.gradients, self.weight_grads,
                                       self.accumulation))

    @classmethod
    def from_config(cls, config: TrainConfig) -> QuantPolicy:
        """Resolve a config's spec strings into formats, with the training scaling defaults.

        The tensor classes come from `TrainConfig.tensor_formats` (dse/precision.py: `format` fills
        weights, activations and gradients; `gradients` fills weight gradients unless `weight_grads`
        is given); the optimizer state defaults to fp32. A spec that states `scale=` is used exactly
        as written. Otherwise formats with their own scaling (int, lns, block formats) keep it, and
        formats without (fp, fixed, posit) get: Lu et al.'s layer-wise scale for every posit tensor
        class when `layer_scaling` is on, and a per-tensor power-of-two scale for fp/fixed errors
        and weight gradients (dynamic loss scaling per tensor), so small gradients do not underflow.
        `accumulation` is used exactly as written (an unscaled grid; a scaled spec is an error),
        rounded to nearest. `config.layers` and `full_precision_layers` give layers other formats
        (`for_layer`).
        """
        formats = config.tensor_formats()  # (a TrainConfig's fields are checked when it is made)
        gemm = _gemm_quants(formats, config.rounding, config.layer_scaling)
        for rule in config.layers:  # every rule's formats are valid before any model is built
            _gemm_quants(rule.over(formats), config.rounding, config.layer_scaling)
        return cls(
            **gemm,
            optimizer_state=TensorQuant(_resolve(OPTIMIZER_STATE, formats.optimizer_state),
                                        config.update_rounding),
            master_weights=_master_weights(config, gemm["weights"]),
            master_copy=config.master_weights,
            full_precision_layers=tuple(config.full_precision_layers),
            accumulation=TensorQuant(_resolve("accumulation", config.accumulation), "nearest"),
            accumulation_chunk=config.accumulation_chunk,
            formats=formats,
            layers=tuple(config.layers),
            rounding=config.rounding,
            layer_scaling=config.layer_scaling,
        )

    def for_layer(self, formats: TensorFormats) -> QuantPolicy:
        """This policy with a layer's own GEMM formats (a per-layer rule's, resolved over the trial's)."""
        if formats == self.formats:
            return self
        gemm = _gemm_quants(formats, self.rounding, self.layer_scaling)
        master = (dataclasses.replace(gemm["weights"], rounding=self.master_weights.rounding)
                  if self.master_copy is False else self.master_weights)  # a master copy's format is one
        return dataclasses.replace(self, **gemm, master_weights=master, formats=formats)


_GRADIENT_CLASSES: frozenset[str] = frozenset((GRADIENTS, WEIGHT_GRADS))
"""The GEMM tensor classes that get the gradient scaling defaults."""


class GemmQuants(TypedDict):
    """The quantizers of the four GEMM tensor classes (dse/precision.py's GEMM_TENSOR_CLASSES)."""

    weights: TensorQuant
    activations: TensorQuant
    gradients: TensorQuant
    weight_grads: TensorQuant


def _gemm_quants(formats: TensorFormats, rounding: str, layer_scaling: bool) -> GemmQuants:
    """The four GEMM operand quantizers of `formats`, with the training scaling defaults."""
    def quant(tensor_class: str) -> TensorQuant:
        return _training_quant(tensor_class, getattr(formats, tensor_class), rounding,
                               tensor_class in _GRADIENT_CLASSES, layer_scaling)

    return GemmQuants(weights=quant(WEIGHTS), activations=quant(ACTIVATIONS), gradients=quant(GRADIENTS),
                      weight_grads=quant(WEIGHT_GRADS))


def _training_quant(name: str, spec: str, rounding: str, gradient: bool, layer_scaling: bool) -> TensorQuant:
    """One tensor class's quantizer with the training scaling defaults (`from_config`)."""
    fmt = _resolve(name, spec)
    if fmt is None or states_scale(spec) or fmt.scaling.kind != "none":
        return TensorQuant(fmt, rounding)
    if fmt.family == "posit":
        return TensorQuant(fmt, rounding, layer_scale=layer_scaling)
    if gradient and fmt.family in ("fp", "fixed"):
        return TensorQuant(with_scaling(fmt, _PER_TENSOR_POW2), rounding)
    return TensorQuant(fmt, rounding)


def _master_weights(config: TrainConfig, weights: TensorQuant) -> TensorQuant:
    """Where the weights live between updates: an fp32 copy (True), the weight format (False), or a
    master copy in its own format, rounded with update_rounding and scaled as weights are."""
    master = config.master_weights
    if master is True:
        return TensorQuant(None)
    if master is False:
        return dataclasses.replace(weights, rounding=config.update_rounding)
    return _training_quant(MASTER_WEIGHTS, master, config.update_rounding, False, config.layer_scaling)


def _resolve(name: str, spec: str | None) -> NumberFormat | None:
    """The format a config field names; None for absent or fp32 (float32 tensors pass fp32 unchanged)."""
    if spec is None:
        return None
    try:
        fmt = get(spec)
    except ValueError as error:
        raise InputError(f"config {name}: {error}") from None
    if fmt.spec == "fp32":
        return None
    return fmt
