"""Energy per training iteration, training-state memory and datapath area of a trial, per workload and
energy point.

A trial is priced as it trained: its formats, optimizer, master copy (fp32, none, or a format), the
rounding of its GEMM operands and of its in-place weight updates, its accumulation format and chunk
(the accumulator and vector length of the dot-product unit), and the layers it keeps in fp32. Never its
seed, so the energy is computed once per distinct configuration (`energy_key`). Layers kept in full
precision (`full_precision_layers`: the first and/or last weight layer) are costed in fp32, the others in
the trial's formats. The workload `proxy` is the trial's own model traced at its batch size; any other
name is a `models.workloads` shape at that workload's own batch size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dse.energy import TrainingFormats, Workload, build_model, get_workload, iteration_energy, unit_totals
from dse.energy.iteration import STATE_TENSORS, TRAIN_OPTIMIZERS, UNITS, training_area_um2
from dse.energy.model import EnergyModel
from dse.sweep.config import PROXY_WORKLOAD, EnergyConfig, EnergyPoint
from dse.sweep.trials import FP32, resolved_formats, stable_hash
from dse.train.config import TrainConfig

ENERGY_OPTIMIZERS: dict[str, str] = TRAIN_OPTIMIZERS
"""Training optimizer -> the energy model's update (NITI's integer update is costed as SGD)."""
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
    """Weights, master copy and optimizer state, each at its own width."""
    area_um2: float
    """Area of the dot-product units the trial's GEMMs ran on, at the point's node (NaN if unpublished)."""

    def as_row(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def master_format(master_weights: bool | str) -> str | None:
    """The master copy's format for the energy model: fp32, the copy's own spec, or None (no copy)."""
    if isinstance(master_weights, str):
        return master_weights
    return FP32 if master_weights else None


def energy_view(config: TrainConfig) -> dict[str, Any]:
    """The settings an energy estimate depends on."""
    return {"model": config.model, "dataset": config.dataset, "data_dir": config.data_dir,
            "batch_size": config.batch_size, "formats": resolved_formats(config),
            "optimizer": ENERGY_OPTIMIZERS[config.optimizer], "master_weights": config.master_weights,
            "full_precision_layers": sorted(config.full_precision_layers), "rounding": config.rounding,
            "update_rounding": config.update_rounding, "accumulation": config.accumulation,
            "accumulation_chunk": config.accumulation_chunk if config.accumulation is not None else None}


def energy_key(config: TrainConfig, settings: EnergyConfig) -> str:
    """Same key, same energy: the trial's energy view plus the energy model's settings."""
    return stable_hash({"view": energy_view(config), "settings": settings.describe()})


def _split(workload: Workload, keep: tuple[str, ...]) -> tuple[Workload | None, Workload | None]:
    """(the layers in the trial's formats, the layers kept in fp32): first/last = first/last weight layer."""
    weight_layers = [i for i, layer in enumerate(workload.layers) if layer.b_is_weight]
    fp_indices = set()
    if weight_layers and "first" in keep:
        fp_indices.add(weight_layers[0])
    if weight_layers and "last" in keep:
        fp_indices.add(weight_layers[-1])
    quantized = tuple(layer for i, layer in enumerate(workload.layers) if i not in fp_indices)
    full = tuple(layer for i, layer in enumerate(workload.layers) if i in fp_indices)
    low = dataclasses.replace(workload, layers=quantized) if quantized or workload.extra_params else None
    high = dataclasses.replace(workload, layers=full, extra_params={}) if full else None
    return low, high


class EnergyEstimator:
    """Builds one energy model per energy point and caches traced proxies and estimates."""

    def __init__(self, settings: EnergyConfig) -> None:
        self.settings = settings
        self.models = {point.name: build_model(point.node, point.datapath, settings.memory, settings.table,
                                               scope=point.scope, node_scaling=point.node_scaling)
                       for point in settings.points}
        self._proxies: dict[tuple[Any, ...], Workload] = {}

    @property
    def model(self) -> EnergyModel:
        return self.models[self.settings.points[0].name]

    def proxy(self, config: TrainConfig) -> Workload:
        """The trial's own model as a workload (cached per model, dataset and batch size)."""
        key = (config.model, config.dataset, config.data_dir, config.batch_size)
        if key not in self._proxies:
            from dse.data import load_dataset
            from models.proxies import build_model as build_proxy
            from models.proxies import trace_workload

            dataset = load_dataset(config.dataset, config.data_dir)
            network = build_proxy(config.model, dataset)
            self._proxies[key] = trace_workload(network, dataset, f"{config.model}/{config.dataset}",
                                                config.batch_size, "sgd")
        return self._proxies[key]

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

    def _one(self, name: str, config: TrainConfig, point: EnergyPoint) -> WorkloadEnergy:
        workload = self.proxy(config) if name == PROXY_WORKLOAD else get_workload(name)
        batch = config.batch_size if name == PROXY_WORKLOAD else None
        model = self.trained_model(config, point)
        formats = resolved_formats(config)
        optimizer = ENERGY_OPTIMIZERS[config.optimizer]
        low_formats = TrainingFormats(
            weight=formats["weights"], activation=formats["activations"], gradient=formats["gradients"],
            weight_grad=formats["weight_grads"], optimizer=optimizer,
            master=master_format(config.master_weights), state=formats["optimizer_state"],
            rounding=config.rounding, update_rounding=config.update_rounding)
        high_formats = TrainingFormats.uniform(FP32, optimizer=optimizer, master=None,
                                               state=formats["optimizer_state"])
        units = dict.fromkeys(UNITS, 0.0)
        memory_bits = 0.0
        low, high = _split(workload, config.full_precision_layers)
        area = 0.0
        for part, part_formats in ((low, low_formats), (high, high_formats)):
            if part is None:
                continue
            frame = iteration_energy(part, part_formats, model, batch)
            for unit, pj in unit_totals(frame).items():
                units[unit] += pj
            resolved = part_formats.resolve(part)
            per_param = (resolved.weight.storage_bits
                         + (resolved.master.storage_bits if resolved.master is not None else 0.0)
                         + STATE_TENSORS[resolved.optimizer] * resolved.state.storage_bits)
            memory_bits += part.params * per_param
            area += training_area_um2(part_formats, model, part)["datapath"]
        mj = {unit: pj / PJ_PER_MJ for unit, pj in units.items()}
        return WorkloadEnergy(total_mj=sum(mj.values()), multiply_mj=mj["multiply"],
                              conversion_mj=mj["conversion"], accumulation_mj=mj["accumulation"],
                              update_mj=mj["update"], memory_mj=mj["memory"],
                              memory_mib=memory_bits / BITS_PER_MIB, area_um2=area)
