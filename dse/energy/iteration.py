"""Energy of one training iteration: every GEMM of every layer, output conversions, the optimizer's
update and the memory traffic of each tensor class at its own width, as a long-form DataFrame.

Per layer three GEMMs run: forward (activation x weight -> activation), backward-data
(gradient x weight -> input gradient; skipped for the first layer) and backward-weight
(activation x gradient -> weight gradient). Each GEMM's datapath is chosen from its two operand
formats; its per-output work is amortised over its own reduction length. Then the optimizer updates
every parameter (SGD with momentum, Adam, Madam, which for LNS weights is an integer add to the log
code and keeps no master copy, or NITI's integer update of its integer weights).

Memory: every GEMM reads its operands from DRAM once and writes its output once (compulsory traffic,
as if tiles fit on chip), passing through the SRAM buffer; inside the array each operand read from the
buffer serves `operand_reuse` MACs, and every MAC latches its two operands in pipeline registers
(level "register", as operands move through a systolic or broadcast array). The optimizer streams
weights, gradients and states from DRAM.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import pandas as pd

from dse.energy.components import Components
from dse.energy.datapaths import (
    FP32,
    Accumulator,
    EnergyFormat,
    Operand,
    Rounding,
    UnitEnergy,
    conversion_energy,
    datapath_for,
    operand,
)
from dse.energy.model import EnergyModel
from dse.energy.units import PASSES, UNITS
from dse.errors import InputError
from dse.models.workloads import Workload, get_workload
from dse.precision import (
    ACTIVATIONS,
    GRADIENTS,
    MASTER_WEIGHTS,
    OPTIMIZER_STATE,
    WEIGHT_GRADS,
    WEIGHTS,
    TensorFormats,
)

OPTIMIZERS = ("sgd", "adam", "madam", "niti")
"""The updates the model prices; TRAIN_OPTIMIZERS maps every optimizer `dse train` accepts onto one."""
TRAIN_OPTIMIZERS: dict[str, str] = {"sgd": "sgd", "adam": "adam", "adamw": "adam", "madam": "madam",
                                    "lns-madam": "madam", "niti": "niti"}
"""AdamW's decoupled decay costs what Adam's does."""
IN_PLACE_OPTIMIZERS = ("niti",)
"""Updates that keep no float master copy: NITI subtracts its integer update from the integer weights
themselves, or from a wider integer accumulator when the trial names one as master_weights (int16),
and keeps no optimizer state (dse/train/niti/optim.py, after the reference's 2021 'vanilla SGD')."""
INTEGER_TABLE_OPTIMIZERS = ("niti",)
"""Updates that train only integer layers: a GEMM's weights and an embedding table (NitiEmbedding, in
the weights' format and updated like them), and leave every other parameter (biases, norms, free
position tables) as initialised (dse/train/niti/method.py, niti_setup)."""


@dataclass(frozen=True)
class Parameters:
    """A workload's parameters as one update treats them, each {name: count}: what is stored in the
    weights' format (plus a master copy), what in fp32, and which of each the optimizer updates. A frozen
    parameter (requires_grad=False) is stored and never updated, as torch's optimizers skip it."""

    in_weight_format: dict[str, int]
    in_fp32: dict[str, int]
    updated_in_weight_format: dict[str, int]
    updated_in_fp32: dict[str, int]
    frozen_in_weight_format: dict[str, int] = dataclasses.field(default_factory=dict)
    """The GEMM weights stored in the weights' format that the optimizer does not update (frozen)."""

    @classmethod
    def of(cls, workload: Workload, optimizer: str) -> Parameters:
        weights = {layer.name: layer.params for layer in workload.layers if layer.b_is_weight}
        trained = {layer.name: layer.params for layer in workload.layers if layer.trained_params}
        frozen = {name: count for name, count in weights.items() if count and name not in trained}
        extra = workload.extra_params
        live = {name: count for name, count in extra.items() if name not in workload.frozen}
        if optimizer in INTEGER_TABLE_OPTIMIZERS:
            tables = {name: extra[name] for name in workload.embeddings}
            return cls({**weights, **tables}, {n: c for n, c in extra.items() if n not in tables},
                       {**trained, **{n: c for n, c in tables.items() if n in live}}, {}, frozen)
        return cls(weights, dict(extra), trained, live, frozen)
COLUMNS = ("layer", "pass", "unit", "tensor", "level", "energy_pj")

STATE_TENSORS: dict[str, int] = {"sgd": 1, "adam": 2, "madam": 1, "niti": 0}
"""Optimizer state tensors per parameter, per update optimizer."""


FormatArg = str | EnergyFormat
"""A format as a spec string or a format object."""


def _spec(value: FormatArg | None) -> str | None:
    """A format given as a spec string or a format object, as its spec."""
    if value is None or isinstance(value, str):
        return value
    spec = getattr(value, "spec", None)
    if not isinstance(spec, str):
        raise InputError(f"a format is a spec string or a dse format, got {value!r}")
    return spec


def _format(value: FormatArg) -> Operand:
    if isinstance(value, str):
        if value.strip().lower() == "fp32":
            return FP32
        from dse.formats import get

        return operand(get(value))
    return operand(value)


@dataclass(frozen=True)
class TrainingFormats:
    """How an iteration trains: the format of each tensor class (`tensors`, the vocabulary training
    and sweeps share, dse/precision.py), the optimizer, the master copy and the roundings."""

    tensors: TensorFormats
    optimizer: str | None = None
    """sgd, adam or madam; None: Madam for LNS weights, else the workload's optimizer."""
    master_weights: FormatArg | None = "auto"
    """Master copy of the weights: 'auto' keeps an fp32 master unless Madam updates LNS weights in place
    (none is kept when the weights are already in the master format)."""
    rounding: str | Rounding = "nearest"
    """Rounding of every value written into the weight, activation and gradient formats."""
    update_rounding: str | Rounding = "nearest"
    """Rounding of the updated weights when no master copy is kept (they are written in their format)."""
    layer_scaled: frozenset[str] = frozenset()
    """Tensor classes quantized with Lu et al.'s layer-wise power-of-two scale (`layer_scale_pj`)."""

    @classmethod
    def of(cls, format: FormatArg | None = None, *, weights: FormatArg | None = None,
           activations: FormatArg | None = None, gradients: FormatArg | None = None,
           weight_grads: FormatArg | None = None, optimizer_state: FormatArg | None = None,
           **options: Any) -> TrainingFormats:
        """Formats as a TrainConfig names them (spec strings or format objects); `format` is the
        shorthand, resolved by `TensorFormats.resolve` as training resolves it."""
        fields: dict[str, FormatArg | None] = {
            "format": format, "weights": weights, "activations": activations, "gradients": gradients,
            "weight_grads": weight_grads, "optimizer_state": optimizer_state}
        return cls(TensorFormats.resolve({name: _spec(value) for name, value in fields.items()}), **options)


    def resolve(self, workload: Workload) -> ResolvedFormats:
        tensors = self.tensors
        weight = _format(tensors.weights)
        chosen = self.optimizer or weight.hardware.in_place_optimizer or workload.optimizer
        optimizer = TRAIN_OPTIMIZERS.get(str(chosen).strip().lower())
        if optimizer is None:
            raise InputError(f"unknown optimizer {chosen!r} (known: {', '.join(TRAIN_OPTIMIZERS)})")
        if isinstance(self.master_weights, str) and self.master_weights == "auto":
            in_place = optimizer == weight.hardware.in_place_optimizer or optimizer in IN_PLACE_OPTIMIZERS
            master = None if in_place else FP32
        else:
            master = None if self.master_weights is None else _format(self.master_weights)
        if master is not None and master.key == weight.key:
            master = None  # the weights already are the master copy
        return ResolvedFormats(weight, _format(tensors.activations), _format(tensors.gradients),
                               _format(tensors.weight_grads), optimizer, master,
                               _format(tensors.optimizer_state), Rounding.parse(self.rounding),
                               Rounding.parse(self.update_rounding), frozenset(self.layer_scaled))


@dataclass(frozen=True)
class ResolvedFormats:
    """Each tensor class's operand format (fields named as dse/precision.py's tensor classes)."""

    weights: Operand
    activations: Operand
    gradients: Operand
    weight_grads: Operand
    optimizer: str
    master_weights: Operand | None
    """None: no copy, the weights are stored in their own format."""
    optimizer_state: Operand
    rounding: Rounding = Rounding()
    update_rounding: Rounding = Rounding()
    layer_scaled: frozenset[str] = frozenset()
    """Tensor classes quantized with Lu et al.'s layer-wise scale."""

    def unquantized(self) -> ResolvedFormats:
        """The formats of the parameters that are no GEMM's weight (biases, norms, embeddings): training
        keeps them, and their gradients, in fp32 (dse/train quantizes GEMM operands only), with no
        separate master copy; their optimizer state is quantized like every other's."""
        return dataclasses.replace(self, weights=FP32, weight_grads=FP32, master_weights=None,
                                   layer_scaled=frozenset())

    def state_bits(self, workload: Workload) -> float:
        """Bits of training state the workload's parameters hold between steps: each GEMM weight in its
        format plus its master copy, every other parameter in fp32 (`Parameters`), and the optimizer
        state tensors of every parameter it updates."""
        p = Parameters.of(workload, self.optimizer)
        states = STATE_TENSORS[self.optimizer] * self.optimizer_state.storage_bits
        master = 0.0 if self.master_weights is None else self.master_weights.storage_bits
        updated = sum(p.updated_in_weight_format.values()) + sum(p.updated_in_fp32.values())
        return (sum(p.in_weight_format.values()) * (self.weights.storage_bits + master)
                + sum(p.in_fp32.values()) * FP32.storage_bits + updated * states)

    @property
    def rounded_after_step(self) -> Operand | None:
        """The format training rounds every stored GEMM weight into after each step, a frozen one too
        (dse/train/optim.py, StepQuantizer): the master copy's, else the weights' own. None where it
        rounds none: an fp32 copy (the next forward quantizes from it), NITI's integers and Madam on
        LNS storage, weights or copy (updated in place, on their grid: LNS-Madam)."""
        stored = self.master_weights or self.weights
        if self.optimizer in IN_PLACE_OPTIMIZERS or stored.hardware.in_place_optimizer == self.optimizer:
            return None
        return None if stored.key == FP32.key else stored

    @property
    def update_arithmetic(self) -> Operand:
        """The format the optimizer computes in: the master copy's, else the weights' own for an update
        in place (NITI's integers), else the optimizer state's."""
        if self.master_weights is not None:
            return self.master_weights
        return self.weights if self.optimizer in IN_PLACE_OPTIMIZERS else self.optimizer_state

    def describe(self) -> str:
        parts = [f"W={self.weights.spec}", f"A={self.activations.spec}", f"G={self.gradients.spec}",
                 f"dW={self.weight_grads.spec}", f"opt={self.optimizer}",
                 f"master={self.master_weights.spec if self.master_weights else 'none'}",
                 f"state={self.optimizer_state.spec}"]
        if self.rounding != Rounding():
            parts.append(f"rounding={_rounding_name(self.rounding)}")
        if self.layer_scaled:
            parts.append(f"layer_scaled={','.join(sorted(self.layer_scaled))}")
        return " ".join(parts)


def _rounding_name(rounding: Rounding) -> str:
    if rounding.random_bits is not None:
        return f"{rounding.mode}({rounding.random_bits})"
    return rounding.mode


# --- the GEMMs of a layer ------------------------------------------------------------------------

class Array(Enum):
    """A layer's three arrays, as a workload sizes them (GemmLayer.a_elems, b_elems, out_elems)."""

    A = "a"
    B = "b"
    OUT = "out"


@dataclass(frozen=True, kw_only=True)
class Use:
    """A tensor one GEMM reads or writes: its format, its tensor class and which layer array it is."""

    fmt: Operand
    tensor: str
    array: Array
    requantized: bool = False
    """Whether this GEMM quantizes the tensor again, from its unquantized values, when its format is
    block-scaled. Training quantizes a block-scaled operand once per GEMM that uses it, with the blocks
    along that GEMM's reduction axis (dse/train/layers.py, as microsoft/microxcaling's mx/linear.py
    does), so every GEMM runs on the block datapath and each use after a tensor's first costs one more
    quantization; other formats are quantized once and reused."""
    quantized: bool = False
    """Whether training quantizes the tensor for this GEMM (dse/train/layers.py, QuantGemm): the forward's
    two operands, the backward's incoming error and a weight's gradient. Where its class has Lu et al.'s
    layer scale, that is where the scale is computed, and priced (`layer_scale_pj`)."""
    once_per_backward: bool = False
    """The incoming error: quantized once, before the backward's GEMMs, for both of them (its layer
    scale is priced with the first that runs)."""


@dataclass(frozen=True, kw_only=True)
class Pass:
    """One of a layer's GEMMs: out = a x b."""

    name: str
    a: Use
    b: Use
    out: Use


def layer_passes(f: ResolvedFormats, b_is_weight: bool) -> list[Pass]:
    """The three GEMMs of a layer whose second operand is a weight (else a second activation). Each
    tensor's first rounding is priced where it is made (a GEMM's output, the weight update); the
    backward GEMMs quantize a block-scaled b, x and dy again along their own reduction axes. A layer
    scale is priced where training computes it (`Use.quantized`): on the forward's operands (the
    network's input among them, while the logits are never quantized), the incoming error and a
    weight's gradient."""
    b_fmt, b_tensor = (f.weights, WEIGHTS) if b_is_weight else (f.activations, ACTIVATIONS)
    dw_fmt, dw_tensor = (f.weight_grads, WEIGHT_GRADS) if b_is_weight else (f.gradients, GRADIENTS)
    act, grad = f.activations, f.gradients
    return [
        Pass(name="forward", a=Use(fmt=act, tensor=ACTIVATIONS, array=Array.A, quantized=True),
             b=Use(fmt=b_fmt, tensor=b_tensor, array=Array.B, quantized=True),
             out=Use(fmt=act, tensor=ACTIVATIONS, array=Array.OUT)),
        Pass(name="backward_data",
             a=Use(fmt=grad, tensor=GRADIENTS, array=Array.OUT, quantized=True, once_per_backward=True),
             b=Use(fmt=b_fmt, tensor=b_tensor, array=Array.B, requantized=True),
             out=Use(fmt=grad, tensor=GRADIENTS, array=Array.A)),
        Pass(name="backward_weight", a=Use(fmt=act, tensor=ACTIVATIONS, array=Array.A, requantized=True),
             b=Use(fmt=grad, tensor=GRADIENTS, array=Array.OUT, requantized=True, quantized=True,
                   once_per_backward=True),
             out=Use(fmt=dw_fmt, tensor=dw_tensor, array=Array.B, quantized=b_is_weight)),
    ]


FP32_EXPONENT_BITS = 8
FP32_MAGNITUDE_BITS = 31
FP64 = (11, 52)
"""(exponent, mantissa) bits of the float64 the scale's mean is divided in."""
LOG2_CORRECTION_ENTRIES = 32
"""Entries of the table that corrects Mitchell's log2(1 + m) ~ m, indexed by the mantissa's top 5 bits.
Mitchell's alone gives another scale than training's exact log2 in 5.5 % of the layer scales of two
mnist1d MLP runs (posit(8,1) and posit(16,1), layer_scaling, 2 epochs: 97 of 1,776); corrected by a
16-entry table in 2, by this one in none."""
LOG2_CORRECTION_BITS = 9
"""Bits of a correction (log2(1 + m) - m < 0.087, in steps of 2^-12)."""


def layer_scale_pj(c: Components, elements: np.ndarray) -> np.ndarray:
    """pJ of quantizing tensors of `elements` fp32 values each with Lu et al.'s layer-wise power-of-two
    scale (Lu et al., "Training Deep Neural Networks Using Posit Number System", SOCC 2019), as
    dse/train/policy.py computes it: 2^(round(mean log2|x|) + offset) over the non-zero finite values,
    clamped to the format's range, then x / scale rounded and multiplied back by the scale.

    Per value: two comparisons of the exponent field (zero, inf/NaN; subnormals are flushed), two of
    the magnitude (the clamp), log2|x| as fixed point (the exponent, and the mantissa as its fraction:
    Mitchell's log2(1 + m) ~ m, J. N. Mitchell, IRE Trans. Electronic Computers EC-11(4), 1962, plus a
    correction read from a small table and added, so that the rounded mean is training's:
    LOG2_CORRECTION_ENTRIES), an add into the tensor's running sum (wide enough for every value of the
    tensor) and the count, and two exponent adds (x / scale, and the product by it). Per tensor: one
    float64 divide (the mean); the rounding and the offset are a few gates. Every op is a component of
    the model (adder, comparator, incrementer, table, fp multiplier, divide as `divide_multiplies`
    multiplies)."""
    counted = np.maximum(np.ceil(np.log2(np.maximum(elements, 2.0))), 1.0)
    per_value = (2 * c.comparator(FP32_EXPONENT_BITS) + 2 * c.comparator(FP32_MAGNITUDE_BITS)
                 + 2 * c.adder(FP32_EXPONENT_BITS)
                 + c.lut(LOG2_CORRECTION_ENTRIES, LOG2_CORRECTION_BITS) + c.adder(FP32_MAGNITUDE_BITS))
    growing = (c.adder_per_bit * (FP32_MAGNITUDE_BITS + counted) + c.adder_offset
               + np.array([c.incrementer(float(bits)) for bits in counted]))
    per_tensor = c.weights.divide_multiplies * c.fp_mul(*FP64)
    return elements * (per_value + growing) + per_tensor


class _Tally:
    """Collects rows as column arrays (one array per pass and unit, over the layers)."""

    def __init__(self, model: EnergyModel) -> None:
        self.model = model
        self.columns: dict[str, list[np.ndarray]] = {name: [] for name in COLUMNS}

    def conversion(self, src: Operand | Accumulator, dst: Operand, rounding: Rounding | None = None) -> float:
        return conversion_energy(src, dst, self.model.components, self.model.datapath, rounding)

    def add(self, layers: np.ndarray, pass_name: str, unit: str, energy: np.ndarray, tensor: str = "",
            level: str = "") -> None:
        count = len(layers)
        for name, value in (("layer", layers), ("pass", pass_name), ("unit", unit), ("tensor", tensor),
                            ("level", level), ("energy_pj", energy)):
            column = value if isinstance(value, np.ndarray) else np.full(count, value, object)
            self.columns[name].append(column)

    def memory(self, layers: np.ndarray, pass_name: str, tensor: str, dram_bits: np.ndarray,
               sram_bits: np.ndarray | None = None) -> None:
        self.add(layers, pass_name, "memory", dram_bits * self.model.dram_pj_per_bit, tensor, "dram")
        if sram_bits is not None:
            self.add(layers, pass_name, "memory", sram_bits * self.model.sram_pj_per_bit, tensor, "sram")

    def gemm(self, names: np.ndarray, sizes: dict[Array, np.ndarray], macs: np.ndarray, p: Pass,
             rounding: Rounding, scaled: frozenset[str] = frozenset(),
             error_scaled: np.ndarray | None = None) -> None:
        """The GEMM's rows; `scaled`: the tensor classes quantized with a layer scale, priced where
        training computes it (`Use.quantized`); `error_scaled`: the rows whose incoming error an earlier
        GEMM of their backward scaled already."""
        dp = datapath_for(p.a.fmt, p.b.fmt, self.model.components, self.model.datapath)
        pp, pg, po = dp.per_product, dp.per_group, dp.per_output
        outputs = sizes[p.out.array]
        reduction = macs / np.maximum(outputs, 1.0)
        groups = outputs * np.ceil(reduction / dp.group_size - 1e-9)
        to_output = self.conversion(dp.accumulator, p.out.fmt, rounding)
        conversion = (macs * pp.conversion_pj + groups * pg.conversion_pj
                      + outputs * (po.conversion_pj + to_output))
        conversion = conversion + sizes[p.a.array] * dp.a_convert_pj + sizes[p.b.array] * dp.b_convert_pj
        for use in (p.a, p.b):
            if use.requantized and use.fmt.block_size:  # quantized again along this GEMM's reduction axis
                conversion = conversion + sizes[use.array] * self.conversion(FP32, use.fmt, rounding)
        for use in (p.a, p.b, p.out):
            if use.quantized and use.tensor in scaled:
                scale_pj = layer_scale_pj(self.model.components, sizes[use.array])
                if use.once_per_backward and error_scaled is not None:
                    scale_pj = np.where(error_scaled, 0.0, scale_pj)
                conversion = conversion + scale_pj
        self.add(names, p.name, "multiply",
                 macs * pp.multiply_pj + groups * pg.multiply_pj + outputs * po.multiply_pj)
        self.add(names, p.name, "conversion", conversion)
        self.add(names, p.name, "accumulation",
                 macs * pp.accumulation_pj + groups * pg.accumulation_pj + outputs * po.accumulation_pj)
        memory = self.model.memory
        latch_pj = self.model.components.register(1) if memory.operand_registers else 0.0
        for use in (p.a, p.b):
            moved = sizes[use.array] * use.fmt.storage_bits
            read = macs * (use.fmt.storage_bits / memory.operand_reuse)
            self.memory(names, p.name, use.tensor, moved, moved + read)
            latched = macs * (use.fmt.storage_bits * latch_pj)
            self.add(names, p.name, "memory", latched, use.tensor, "register")
        written = outputs * p.out.fmt.storage_bits
        self.memory(names, p.name, p.out.tensor, written, written)

    def update(self, names: np.ndarray, params: np.ndarray, f: ResolvedFormats) -> None:
        c = self.model.components
        arith = f.update_arithmetic
        mul, add = arith.hardware.update_units(c, arith)
        w = c.weights
        if f.optimizer == "sgd":  # v = mu v + g + wd w ; w -= lr v
            per_param = 3 * mul + 3 * add
        elif f.optimizer == "niti":  # the gradient's range (its largest magnitude), w = clip(w - update)
            per_param = c.comparator(32) + add + 2 * c.comparator(arith.bits)
        elif f.optimizer == "adam":  # moments, bias corrections, sqrt, divide, decoupled decay
            per_param = (9 + w.divide_multiplies + w.sqrt_multiplies) * mul + 5 * add
        else:  # Madam: EMA of g^2, then log-domain normalise, clip, round, add to the log weight
            s_mul, s_add = f.optimizer_state.hardware.update_units(c, f.optimizer_state)
            log_bits = f.optimizer_state.bits - 1
            per_param = (4 * s_mul + s_add + 3 * c.adder(log_bits) + c.lut(16, 5)
                         + 2 * c.comparator(5) + c.incrementer(5))
            if f.master_weights is None and f.weights.hardware.in_place_optimizer == f.optimizer:
                per_param += c.adder(f.weights.bits - 1) + 2 * c.comparator(f.weights.bits - 1)
            else:  # a multiply on the master copy (or on fp32 weights that are their own master)
                per_param += mul + 2 * c.comparator((f.master_weights or f.weights).bits)
        self.add(names, "update", "update", params * per_param)
        conversion = self.conversion(f.weight_grads, arith)
        if f.master_weights is not None:  # the updated master copy is rounded into the weight format
            conversion += self.conversion(f.master_weights, f.weights, f.rounding)
        else:  # the update is computed in `arith` and rounded straight into the weight format
            conversion += self.conversion(arith, f.weights, f.update_rounding)
        self.add(names, "update", "conversion", params * conversion)
        # after each step training rounds the stored weights into their format: the master copy's, else
        # the weights' own (an fp32 copy is not rounded; the next forward quantizes the weights from it)
        stored = WEIGHTS if f.master_weights is None else MASTER_WEIGHTS
        if stored in f.layer_scaled and (f.master_weights or f.weights).key != FP32.key:
            self.add(names, "update", "conversion", layer_scale_pj(self.model.components, params))
        self.memory(names, "update", WEIGHT_GRADS, params * f.weight_grads.storage_bits)
        states = STATE_TENSORS[f.optimizer]
        self.memory(names, "update", OPTIMIZER_STATE, params * (2 * states * f.optimizer_state.storage_bits))
        if f.master_weights is not None:
            self.memory(names, "update", MASTER_WEIGHTS, params * (2 * f.master_weights.storage_bits))
            self.memory(names, "update", WEIGHTS, params * f.weights.storage_bits)
        else:
            self.memory(names, "update", WEIGHTS, params * (2 * f.weights.storage_bits))

    def rounded_frozen(self, names: np.ndarray, params: np.ndarray, f: ResolvedFormats,
                       stored: Operand) -> None:
        """Frozen weights rounded again after each step, as training rounds every stored weight
        (`rounded_after_step`): from fp32, as training holds them, with the update's rounding and the
        stored class's layer scale; each read and written once."""
        self.add(names, "update", "conversion", params * self.conversion(FP32, stored, f.update_rounding))
        tensor = WEIGHTS if f.master_weights is None else MASTER_WEIGHTS
        if tensor in f.layer_scaled:
            self.add(names, "update", "conversion", layer_scale_pj(self.model.components, params))
        self.memory(names, "update", tensor, params * (2 * stored.storage_bits))

    def frame(self) -> pd.DataFrame:
        data = {name: np.concatenate(parts) if parts else np.array([], object)
                for name, parts in self.columns.items()}
        keep = data["energy_pj"] != 0
        return pd.DataFrame({name: values[keep] for name, values in data.items()})


def iteration_energy(workload: str | Workload, formats: TrainingFormats | FormatArg, model: EnergyModel,
                     batch_size: int | None = None) -> pd.DataFrame:
    """Long-form breakdown of one training iteration: one row per (layer, pass, unit, tensor, level).

    `formats` is a TrainingFormats or a single format (used for weights, activations and gradients).
    `df.attrs` holds the totals that do not fit the rows: MACs, batch size, formats, node.
    """
    wl = get_workload(workload)
    batch = wl.batch_size if batch_size is None else int(batch_size)
    if batch < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    spec = formats if isinstance(formats, TrainingFormats) else TrainingFormats.of(formats)
    f = spec.resolve(wl)
    tally = _Tally(model)
    layers = wl.layers
    names = np.array([layer.name for layer in layers], dtype=object)
    is_weight = np.array([layer.b_is_weight for layer in layers], dtype=bool)
    needs_dx = np.array([layer.needs_input_grad for layer in layers], dtype=bool)
    needs_db = np.array([layer.needs_weight_grad for layer in layers], dtype=bool)
    recomputed = np.array([layer.recomputed for layer in layers], dtype=bool)
    macs = np.array([layer.macs_per_sample for layer in layers], dtype=float) * batch
    sizes = {
        Array.A: np.array([layer.a_elems for layer in layers], dtype=float) * batch,
        Array.B: np.array([layer.b_elems for layer in layers], dtype=float) * np.where(is_weight, 1, batch),
        Array.OUT: np.array([layer.out_elems for layer in layers], dtype=float) * batch,
    }
    total_macs = 0.0
    error_scaled = np.zeros(len(layers), dtype=bool)
    for variant in (True, False):
        passes = layer_passes(f, variant)
        # a checkpointed layer's forward, run again in the backward as the forward ran it
        for p in (passes[0], dataclasses.replace(passes[0], name="recompute"), *passes[1:]):
            rows = is_weight == variant
            if p.name == "backward_data":
                rows = rows & needs_dx
            elif p.name == "backward_weight":
                rows = rows & needs_db
            elif p.name == "recompute":
                rows = rows & recomputed
            if rows.any():
                tally.gemm(names[rows], {k: v[rows] for k, v in sizes.items()}, macs[rows], p, f.rounding,
                           f.layer_scaled, error_scaled[rows])
                total_macs += float(macs[rows].sum())
                if p.name.startswith("backward"):
                    error_scaled |= rows
    # a layer whose backward runs no GEMM but its bias trains (a frozen first layer): training still
    # quantizes the incoming error, once, for the bias's gradient (its layer scale where it has one)
    bias_only = is_weight & ~needs_dx & ~needs_db & np.array([layer.needs_bias_grad for layer in layers],
                                                             dtype=bool)
    if bias_only.any() and GRADIENTS in f.layer_scaled:
        tally.add(names[bias_only], "backward_weight", "conversion",
                  layer_scale_pj(model.components, sizes[Array.OUT][bias_only]))
    parameters = Parameters.of(wl, f.optimizer)
    for updated, kept_in in ((parameters.updated_in_weight_format, f), (parameters.updated_in_fp32,
                                                                        f.unquantized())):
        if updated:
            tally.update(np.array(list(updated), dtype=object), np.array(list(updated.values()), dtype=float),
                         kept_in)
    frozen, stored = parameters.frozen_in_weight_format, f.rounded_after_step
    if frozen and stored is not None:
        tally.rounded_frozen(np.array(list(frozen), dtype=object),
                             np.array(list(frozen.values()), dtype=float), f, stored)
    frame = in_scope(tally.frame(), model.scope)
    frame.attrs.update(workload=wl.name, batch_size=batch, macs=total_macs, formats=f.describe(),
                       node_nm=model.node_nm, params=wl.params, scope=model.scope)
    return frame


GEMM_UNITS = ("multiply", "conversion", "accumulation")


def in_scope(frame: pd.DataFrame, scope: str) -> pd.DataFrame:
    """The rows a scope counts: 'datapath' the GEMMs' MAC units; 'pe' adds the optimizer's arithmetic,
    the operand registers and the on-chip buffer; 'system' adds DRAM."""
    if scope == "system":
        return frame
    if scope == "pe":
        return frame[frame["level"] != "dram"].reset_index(drop=True)
    if scope == "datapath":
        keep = (frame["pass"] != "update") & frame["unit"].isin(GEMM_UNITS)
        return frame[keep].reset_index(drop=True)
    raise InputError(f"unknown scope {scope!r} (known: datapath, pe, system)")


def training_area_um2(formats: TrainingFormats | FormatArg, model: EnergyModel,
                      workload: str | Workload = "resnet50") -> dict[str, float]:
    """Area (um^2, at the model's node) of the hardware a training run needs: `datapath` sums one
    dot-product unit per distinct pair of operands of a weight layer's three GEMMs; `pe` adds the operand
    registers of every lane and the optimizer's update unit (a multiplier and an adder in its
    arithmetic format). NaN where the node has no published area scaling."""
    if model.area is None:
        return {"datapath": float("nan"), "pe": float("nan")}
    spec = formats if isinstance(formats, TrainingFormats) else TrainingFormats.of(formats)
    f = spec.resolve(get_workload(workload))
    area = model.area
    datapath = registers = 0.0
    seen: set[tuple[Any, Any]] = set()
    for p in layer_passes(f, b_is_weight=True):
        a, b = p.a.fmt, p.b.fmt
        key = (a.key, b.key)
        if key in seen:
            continue
        seen.add(key)
        dp = datapath_for(a, b, area, model.datapath)
        datapath += dp.unit_total
        registers += dp.group_size * area.register(a.storage_bits + b.storage_bits)
    arith = f.update_arithmetic
    mul, add = arith.hardware.update_units(area, arith)
    return {"datapath": datapath, "pe": datapath + registers + mul + add}


def summarize(frame: pd.DataFrame, by: str | list[str] = "unit") -> pd.DataFrame:
    """Energy summed by one or more columns (e.g. 'pass', 'unit', 'layer', ['pass', 'unit'])."""
    keys = [by] if isinstance(by, str) else list(by)
    out = frame.groupby(keys, sort=False)["energy_pj"].sum().reset_index()
    out.attrs.update(frame.attrs)
    return out


def unit_totals(frame: pd.DataFrame) -> dict[str, float]:
    """pJ per unit (multiply, conversion, accumulation, update, memory), zeros included."""
    sums = frame.groupby("unit")["energy_pj"].sum()
    return {unit: float(sums.get(unit, 0.0)) for unit in UNITS}


def per_mac(frame: pd.DataFrame) -> UnitEnergy:
    """GEMM compute energy per MAC, averaged over the workload (output conversions included)."""
    gemm = frame[frame["pass"] != "update"]
    sums = gemm.groupby("unit")["energy_pj"].sum()
    macs = frame.attrs["macs"]
    return UnitEnergy(float(sums.get("multiply", 0.0)) / macs, float(sums.get("conversion", 0.0)) / macs,
                      float(sums.get("accumulation", 0.0)) / macs)


def pass_unit_table(frame: pd.DataFrame) -> pd.DataFrame:
    """pJ by pass (rows, plus 'total') and unit (columns, plus 'total')."""
    table = frame.pivot_table(index="pass", columns="unit", values="energy_pj", aggfunc="sum", fill_value=0.0)
    table = table.reindex(index=[p for p in PASSES if p in table.index], columns=list(UNITS), fill_value=0.0)
    table["total"] = table.sum(axis=1)
    table.loc["total"] = table.sum(axis=0)
    return table


def top_layers(frame: pd.DataFrame, count: int = 10) -> pd.DataFrame:
    """The `count` layers (or parameter tensors) with the most energy, with their share of the total."""
    sums = frame.groupby("layer", sort=False)["energy_pj"].sum().sort_values(ascending=False)
    out = sums.head(count).reset_index()
    out["share"] = out["energy_pj"] / frame["energy_pj"].sum()
    return out
