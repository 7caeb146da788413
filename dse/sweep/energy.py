"""Energy per training iteration, training-state memory and datapath area of a trial, per workload and
energy point; and the energy of the run it trained, composed from those per-iteration figures.

A trial is priced as it trained: its formats (per layer), optimizer, master copy (fp32, none, or a
format), the rounding of its GEMM operands and of its in-place weight updates, and its accumulation
format and chunk (the accumulator and vector length K of the dot-product unit). Never its seed, so it is
computed once per distinct configuration (`energy_key`), at every point of the energy axes. Each layer
is costed in the formats it trained in: its `layers` rule's, fp32 for `full_precision_layers` (the first
and/or last weight layer, in registration order as training picks them), else the trial's
(`layer_formats`, the same resolution training uses). The workload `proxy` is the trial's own model
traced at its batch size, as is a user's model named as a workload (`file.py:function`, traced on the
trial's dataset); any other name is a `models.workloads` shape or a user's file (ONNX, YAML, CSV) at its
own batch size.

A run's iterations need not all cost the same: a warm-up trains its first epochs in fp32 before the
trial's formats start (`warmup_config`), a diverged run stops at the batch its loss turned NaN, and
trials that differ in epochs or batch size train different numbers of iterations. dse.sweep.run_energy
sums each iteration in the formats it ran in, from the iterations each epoch trained
(TrainResult.epoch_iterations); the energy model itself only ever prices one iteration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dse.energy import TrainingFormats, Workload, build_model, get_workload, iteration_energy, unit_totals
from dse.energy.iteration import TRAIN_OPTIMIZERS, UNITS, training_area_um2
from dse.energy.model import EnergyModel
from dse.precision import (
    ACTIVATIONS,
    GRADIENTS,
    MASTER_WEIGHTS,
    SHORTHAND,
    WEIGHT_GRADS,
    WEIGHTS,
    Layer,
    LayerRule,
    TensorFormats,
    full_precision_rules,
    resolve_layers,
)
from dse.sweep.config import PROXY_WORKLOAD, EnergyConfig, EnergyPoint
from dse.sweep.run_energy import BatchEnergies, epoch_batches, has_warmup, last_batch_rows
from dse.sweep.trials import FP32, canonical_rules, resolved_formats, stable_hash
from dse.train.config import TrainConfig
from dse.usercode import identity as code_identity
from dse.usercode import is_ref

if TYPE_CHECKING:
    import pandas as pd

    from dse.models.trace import LeftFp32

ENERGY_OPTIMIZERS: dict[str, str] = TRAIN_OPTIMIZERS
"""Training optimizer -> the energy model's update (AdamW as Adam, LNS-Madam as Madam)."""
PJ_PER_MJ = 1e9
BITS_PER_MIB = 8 * 2**20


@dataclass(frozen=True)
class WorkloadEnergy:
    """One iteration of one workload: total and per-unit energy (mJ) and training-state memory (MiB)."""

    total_mj: float
    multiply_mj: float
    conversion_mj: float
    accumulation_mj: float
    update_mj: float
    memory_mj: float
    memory_mib: float
    """Weights, master copy and optimizer state, each at its own width (ResolvedFormats.state_bits)."""
    area_um2: float
    """Area of the dot-product units the trial's GEMMs ran on, at the point's node (NaN if unpublished)."""
    last_iteration_mj: float
    """One iteration of an epoch's last batch at its own rows (`total_mj` where the batch size divides
    the training set); a workload at its own batch size takes the same share of it."""
    forward_mj: float
    """The forward pass alone of one iteration (what a batch whose loss is not finite runs)."""
    last_forward_mj: float
    """The forward pass alone of an epoch's last batch."""
    epoch_batches: int
    """Batches in one epoch of the trial's training set."""

    def as_row(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def batches(self) -> BatchEnergies:
        return BatchEnergies(self.total_mj, self.last_iteration_mj, self.forward_mj, self.last_forward_mj,
                             self.epoch_batches)


def master_format(config: TrainConfig) -> str | None:
    """The master copy's format for the energy model: fp32, the copy's own spec, or None (no copy).
    NITI keeps no float copy whatever master_weights says; a spec there is its integer accumulator."""
    if isinstance(config.master_weights, str):
        return config.master_weights
    return FP32 if config.master_weights and config.optimizer != "niti" else None


def energy_view(config: TrainConfig) -> dict[str, Any]:
    """The settings an energy estimate depends on."""
    view = {"model": code_identity(config.model, "model"),
            "dataset": code_identity(config.dataset, "dataset"), "data_dir": config.data_dir,
            "batch_size": config.batch_size, "formats": resolved_formats(config),
            "optimizer": ENERGY_OPTIMIZERS[config.optimizer], "master_weights": config.master_weights,
            "full_precision_layers": sorted(config.full_precision_layers), "rounding": config.rounding,
            "update_rounding": config.update_rounding, "accumulation": config.accumulation,
            "accumulation_chunk": config.accumulation_chunk if config.accumulation is not None else None}
    if config.layers:  # only then, so that the energy keys of configurations without rules stay
        view["layers"] = canonical_rules(config)
    if config.layer_scaling:  # (likewise)
        view["layer_scaling"] = True
    return view


def energy_key(config: TrainConfig, settings: EnergyConfig) -> str:
    """Same key, same energy: the trial's energy view plus the energy model's settings."""
    return stable_hash({"view": energy_view(config), "settings": settings.describe()})


def layer_scaled(config: TrainConfig, tensors: TensorFormats) -> frozenset[str]:
    """The tensor classes training quantizes with Lu et al.'s layer-wise scale in layers of formats
    `tensors`: those QuantPolicy gives a layer scale (posit classes without a scale of their own, when
    `layer_scaling` is on), the master copy only where one is kept in its own format."""
    if not config.layer_scaling:
        return frozenset()
    from dse.train.policy import QuantPolicy

    policy = QuantPolicy.from_config(config).for_layer(tensors)
    classes = [WEIGHTS, ACTIVATIONS, GRADIENTS, WEIGHT_GRADS]
    if isinstance(config.master_weights, str):
        classes.append(MASTER_WEIGHTS)
    return frozenset(name for name in classes if getattr(policy, name).layer_scale)


KIND_TYPES: dict[str, tuple[str, ...]] = {"linear": ("Linear",), "conv": ("Conv2d", "Conv1d"),
                                          "attention": ("Matmul", "MultiheadAttention")}
"""Module classes a workload layer answers to in `type:` rules when no model tells (built-in workloads)."""


def layer_formats(workload: Workload, config: TrainConfig, trained: Sequence[Layer] | None = None,
                  fp32_layers: frozenset[str] = frozenset()) -> dict[str, TensorFormats]:
    """Each workload layer's formats as the trial trained it: `layers` rules and full_precision_layers
    over the trial's formats (dse/precision.py). `trained` (the trial's own model's GEMM layers as
    training sees them, `model_layers`) gives the module classes `type:` rules match (else the layer's
    kind does) and the first/last weight layer, in registration order as training picks them (else, or
    where the workload has no layer of that name, the workload's order). `fp32_layers` names the layers
    training cannot quantize (an nn.GRU's GEMMs): fp32, and out of the rules, as training leaves them.
    A rule that matches no layer of this workload is not an error here (it names the trial's model,
    which training checks)."""
    types = {layer.name: layer.types for layer in trained or ()}
    base = config.tensor_formats()
    layers = [Layer(layer.name, (), types.get(layer.name.split("#")[0], KIND_TYPES.get(layer.kind, ())),
                    layer.b_is_weight) for layer in workload.layers if layer.name not in fp32_layers]
    fp32 = LayerRule("*", ((SHORTHAND, FP32),)).over(base)
    first_last: list[LayerRule] = []
    for which in config.full_precision_layers:  # where this workload names training's choice otherwise
        # (a tied weight's GEMM is traced under its parameter's name), as the workload orders its layers
        chosen = [rule for rule in full_precision_rules(trained or (), (which,))
                  if any(rule.matches(layer) for layer in layers)]
        first_last += chosen or full_precision_rules(layers, (which,))
    return {**dict.fromkeys(fp32_layers, fp32),
            **resolve_layers(layers, (*first_last, *config.layers), base, require_match=False)}


def left_fp32() -> LeftFp32:
    """What training leaves in fp32 whatever a trial's formats, for the tracer: the modules quantize_model
    cannot convert (dse.train.layers.UNCONVERTIBLE_TYPES: nn.GRU, nn.ConvTranspose2d, ...) and the GEMM
    functions it does not convert (dse.train.functional.UNHANDLED_FUNCTIONS: torch.einsum,
    F.conv_transpose2d, ...): one rule, whatever either is named."""
    from dse.models.trace import LeftFp32
    from dse.train.functional import UNHANDLED_FUNCTIONS
    from dse.train.layers import UNCONVERTIBLE_TYPES

    return LeftFp32(frozenset(UNHANDLED_FUNCTIONS), UNCONVERTIBLE_TYPES)


@dataclass(frozen=True)
class Part:
    """Layers of a workload priced alike: their formats, and whether training left them fp32 (then with
    torch's fp32 sums, whatever accumulation the trial names)."""

    workload: Workload
    tensors: TensorFormats
    left_fp32: bool


def _parts(workload: Workload, config: TrainConfig, trained: Sequence[Layer] | None) -> list[Part]:
    """The workload split into groups of layers with the same formats (the layers training left fp32 a
    group of their own); the trial's own group keeps the parameters outside GEMM layers (embeddings,
    norms)."""
    trial = config.tensor_formats()
    left = frozenset(workload.fp32_layers)
    formats = layer_formats(workload, config, trained, left)
    groups: dict[tuple[TensorFormats, bool], list[Any]] = {(trial, False): []}
    for layer in workload.layers:
        groups.setdefault((formats[layer.name], layer.name in left), []).append(layer)
    parts = []
    for (group, fp32), layers in groups.items():
        own = dataclasses.replace(workload, layers=tuple(layers), fp32_layers=())
        if (group, fp32) == (trial, False) and (layers or workload.extra_params):
            parts.append(Part(own, group, fp32))
        elif layers:  # (no extra parameters: none is an embedding table or frozen here)
            parts.append(Part(dataclasses.replace(own, extra_params={}, embeddings=(), frozen=()), group,
                              fp32))
    return parts


class EnergyEstimator:
    """Builds one energy model per energy point and caches traced proxies and estimates."""

    def __init__(self, settings: EnergyConfig,
                 train_rows: Mapping[tuple[str, str | None], int] | None = None) -> None:
        """`train_rows`: samples in one epoch per (dataset, data_dir), where the caller counted them (a
        sweep's check of its tasks); any other dataset is loaded to count them (`train_rows`)."""
        self.settings = settings
        self.models = {point.name: build_model(point.node, point.datapath, settings.memory, settings.table,
                                               scope=point.scope, node_scaling=point.node_scaling)
                       for point in settings.points}
        self._proxies: dict[tuple[Any, ...], Workload] = {}
        self._trained: dict[int, tuple[Layer, ...]] = {}
        """id of a traced workload -> its model's GEMM layers as training sees them (`layer_formats`)."""
        self._train_rows: dict[tuple[str, str | None], int] = dict(train_rows or {})

    def proxy(self, config: TrainConfig, model: str | None = None) -> Workload:
        """The trial's own model (or `model`, a user's `file.py:function`) traced on the trial's dataset
        at its batch size (cached per model, dataset and batch size); `_trained` keeps its GEMM layers as
        training sees them, for per-layer `type:` rules and first/last."""
        model = model or config.model
        key = (model, config.dataset, config.data_dir, config.batch_size)
        if key not in self._proxies:
            import torch

            from dse.data import load_dataset
            from dse.models.proxies import build_model as build_proxy
            from dse.models.proxies import trace_workload
            from dse.train.functional import model_layers

            dataset = load_dataset(config.dataset, config.data_dir)
            with torch.random.fork_rng(devices=[]):  # as the trial builds it, leaving the caller's RNG be
                torch.manual_seed(config.seed)
                network = build_proxy(model, dataset)
            self._proxies[key] = trace_workload(network, dataset, f"{config.model}/{config.dataset}",
                                                config.batch_size, "sgd", left_fp32())
            self._trained[id(self._proxies[key])] = tuple(model_layers(network, dataset.x_train[:2]))
        return self._proxies[key]

    def workload(self, name: str, config: TrainConfig) -> tuple[Workload, int | None]:
        """The named workload for this trial and the batch it is priced at (None: the workload's own)."""
        if name == PROXY_WORKLOAD:
            return self.proxy(config), config.batch_size
        source = self.settings.sources.get(name)
        if source is not None and is_ref(source):
            return self.proxy(config, source), config.batch_size
        return get_workload(source or name), None

    def estimate(self, config: TrainConfig) -> dict[str, WorkloadEnergy]:
        """Energy, memory and area of one iteration per result column (energy point x workload); the
        caller keeps one estimate per energy_key: configurations that share it get the same numbers."""
        return {point.column(name): self._one(name, config, point)
                for point in self.settings.points for name in self.settings.workloads}

    def trained_model(self, config: TrainConfig, point: EnergyPoint) -> EnergyModel:
        """The point's model with the trial's own accumulation, if it trained with one: its format is the
        accumulator and its chunk the vector length of the dot-product unit."""
        model = self.models[point.name]
        if config.accumulation is None:
            return model
        return model.with_datapath(accumulator=config.accumulation, vector_length=config.accumulation_chunk)

    def train_rows(self, config: TrainConfig) -> int:
        """Samples in one epoch of the trial's training set (after its validation split)."""
        key = (config.dataset, config.data_dir)
        if key not in self._train_rows:
            from dse.data import load_dataset

            self._train_rows[key] = len(load_dataset(config.dataset, config.data_dir).x_train)
        return self._train_rows[key]

    def _one(self, name: str, config: TrainConfig, point: EnergyPoint) -> WorkloadEnergy:
        workload, batch = self.workload(name, config)
        full = workload.batch_size if batch is None else batch
        rows = self.train_rows(config)
        last = last_batch_rows(rows, config.batch_size)
        # a workload at its own batch size stands for the trial's batch: its last batch is the same share
        last_batch = full if last == config.batch_size else max(1, round(full * last / config.batch_size))
        whole = self._iteration(workload, config, point, full)
        short = whole if last_batch == full else self._iteration(workload, config, point, last_batch)
        mj = {unit: pj / PJ_PER_MJ for unit, pj in whole.units_pj.items()}
        return WorkloadEnergy(total_mj=sum(mj.values()), multiply_mj=mj["multiply"],
                              conversion_mj=mj["conversion"], accumulation_mj=mj["accumulation"],
                              update_mj=mj["update"], memory_mj=mj["memory"],
                              memory_mib=whole.memory_bits / BITS_PER_MIB, area_um2=whole.area_um2,
                              last_iteration_mj=sum(pj / PJ_PER_MJ for pj in short.units_pj.values()),
                              forward_mj=whole.forward_pj / PJ_PER_MJ,
                              last_forward_mj=short.forward_pj / PJ_PER_MJ,
                              epoch_batches=epoch_batches(rows, config.batch_size))

    def iteration_frames(self, workload: Workload, config: TrainConfig, point: EnergyPoint,
                         batch: int) -> list[tuple[Part, TrainingFormats, pd.DataFrame]]:
        """One iteration of `workload` at `batch` rows, each part of its layers in its own formats, as
        the energy model's long-form frames (dse.energy.iteration_energy), one per part."""
        trained = self._trained.get(id(workload))
        optimizer = ENERGY_OPTIMIZERS[config.optimizer]
        # NITI rounds every integer it narrows pseudo-stochastically (PstoShift), whatever the trial says
        rounding = (config.rounding, config.update_rounding)
        if optimizer == "niti":
            rounding = ("pseudo_stochastic", "pseudo_stochastic")
        frames = []
        for part in _parts(workload, config, trained):
            tensors = part.tensors
            part_formats = TrainingFormats(  # a layer a rule keeps all fp32 has no master copy either
                tensors.canonical(), optimizer=optimizer,
                master_weights=master_format(config) if tensors.quantizes_gemms else None,
                rounding=rounding[0], update_rounding=rounding[1], layer_scaled=layer_scaled(config, tensors))
            model = self.models[point.name] if part.left_fp32 else self.trained_model(config, point)
            frames.append((part, part_formats, iteration_energy(part.workload, part_formats, model, batch)))
        return frames

    def _iteration(self, workload: Workload, config: TrainConfig, point: EnergyPoint,
                   batch: int) -> _Iteration:
        """One iteration of `workload` at `batch` rows, each part of its layers in its own formats."""
        area = 0.0
        units = dict.fromkeys(UNITS, 0.0)
        forward_pj = 0.0
        memory_bits = 0.0
        for part, part_formats, frame in self.iteration_frames(workload, config, point, batch):
            for unit, pj in unit_totals(frame).items():
                units[unit] += pj
            forward_pj += float(frame.loc[frame["pass"] == "forward", "energy_pj"].sum())
            memory_bits += part_formats.resolve(part.workload).state_bits(part.workload)
            if part.workload.layers:  # a part of parameters only (biases, norms) runs no GEMM
                model = self.models[point.name] if part.left_fp32 else self.trained_model(config, point)
                area += training_area_um2(part_formats, model, part.workload)["datapath"]
        return _Iteration(units, forward_pj, memory_bits, area)


@dataclass(frozen=True)
class _Iteration:
    """One iteration's pJ per unit and of its forward pass, its training state (bits) and datapath area."""

    units_pj: dict[str, float]
    forward_pj: float
    memory_bits: float
    area_um2: float


def warmup_config(config: TrainConfig) -> TrainConfig | None:
    """The configuration the trial's warm-up epochs trained in (None: it has no warm-up): every tensor,
    the stored weights and the optimizer state in fp32, no rounding, no accumulation format, as
    `set_quantization(model, False)` runs them (the same optimizer; fp32 weights are their own master
    copy). NITI has no fp32 warm-up: its integer network trains from the first epoch."""
    if not has_warmup(config.warmup_epochs, config.optimizer):
        return None
    return config.replace(format=None, weights=None, activations=None, gradients=None, weight_grads=None,
                          optimizer_state=None, master_weights=False, rounding="nearest",
                          update_rounding="nearest", accumulation=None, layers=(), full_precision_layers=(),
                          warmup_epochs=0)


def warmup_energy_key(config: TrainConfig, settings: EnergyConfig) -> str:
    """The energy key of the trial's warm-up configuration; empty where it has none."""
    warmup = warmup_config(config)
    return energy_key(warmup, settings) if warmup is not None else ""
