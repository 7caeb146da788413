"""Energy numbers as exact floats (float.hex), to show that a change to the energy model changes none.

Writes JSON: `dse compare` rows for every zoo format (plus block, fixed, P3109 and posit variants) at
several nodes, scopes and datapath settings, every rounding, full iteration frames and areas for mixed
formats and accumulators (errors included, as text), and the energy columns of
examples/quickstart.yaml's trials. Run it before and after the change and compare the files:

    PYTHONPATH=$PWD python benchmarks/energy_identity.py /tmp/before.json   # on the old commit
    PYTHONPATH=$PWD python benchmarks/energy_identity.py /tmp/after.json    # on the new one
    cmp /tmp/before.json /tmp/after.json

About 10 s on one core.
"""

from __future__ import annotations

import itertools
import json
import sys
from typing import Any

import pandas as pd

from dse.energy import (
    DatapathParams,
    MemoryParams,
    TrainingFormats,
    build_model,
    compare_formats,
    iteration_energy,
)
from dse.energy.iteration import training_area_um2
from dse.formats import ZOO, get
from dse.sweep.config import load_config
from dse.sweep.energy import EnergyEstimator
from dse.sweep.trials import expand

EXTRA_FORMATS = ("fixed(8,4)", "int(6)", "block(int8,size=16)", "mx(fp8_e5m2,block=16)",
                 "block(fp4_e2m1,size=16,scale=e4m3,tensor_scale=fp32)", "lns(8,gamma=2)", "posit(12,2)",
                 "p3109(6,2)")
NODES: dict[str, dict[str, Any]] = {
    "45nm": {"node": "45nm"}, "7nm": {"node": "7nm"}, "7nm_pe": {"node": "7nm", "scope": "pe"},
    "7nm_datapath": {"node": "7nm", "scope": "datapath"},
    "16nm_stillmaker": {"node": "16nm", "node_scaling": "stillmaker"},
}
DATAPATHS: dict[str, DatapathParams] = {
    "default": DatapathParams(), "K1": DatapathParams(vector_length=1),
    "K64": DatapathParams(vector_length=64),
    "align12": DatapathParams(alignment_bits=12),
    "lns_direct": DatapathParams(lns_datapath="direct", lns_mitchell_bits=1),
    "lns_mitchell": DatapathParams(lns_mitchell_bits=2, lns_conversion_length=64),
    "posit_reuse": DatapathParams(posit_decode_reuse=4.0), "lut8": DatapathParams(lns_lut_bits=8),
}
MIXED: tuple[dict[str, Any], ...] = (
    {"weights": "int8", "activations": "fp8_e4m3", "gradients": "fp8_e5m2"},
    {"format": "lns8", "optimizer": "madam", "master_weights": "lns(16,gamma=2048)"},
    {"weights": "lns8", "optimizer": "madam"},
    {"format": "int8", "optimizer": "adam", "master_weights": None},
    {"format": "mxfp4", "weight_grads": "bf16", "optimizer_state": "bf16"},
    {"format": "posit8", "optimizer": "adam"},
    {"weights": "fp8_e4m3", "activations": "int8", "gradients": "fp8_e5m2"},
    {"format": "nvfp4", "optimizer": "sgd", "master_weights": "bf16"},
)
ACCUMULATORS = (None, "int32", "fp16", "bf16", "quire", "int48")


def exact(value: Any) -> Any:
    return value.hex() if isinstance(value, float) else value


def rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{key: exact(value) for key, value in row.items()} for row in frame.to_dict("records")]


def snapshot() -> dict[str, Any]:
    out: dict[str, Any] = {}
    formats = [spec for spec in (*ZOO, *EXTRA_FORMATS) if spec != "fp32"]
    for spec in formats:
        get(spec)
    for (node, where), (name, datapath) in itertools.product(NODES.items(), DATAPATHS.items()):
        if node != "7nm" and name != "default":
            continue
        model = build_model(datapath=datapath, **where)
        for workload in ("resnet18", "bert-base") if node == "7nm" else ("resnet18",):
            out[f"compare/{node}/{name}/{workload}"] = rows(compare_formats(formats, workload, model, 8))
    model = build_model("7nm", memory=MemoryParams(operand_reuse=4.0, operand_registers=False))
    for rounding in ("nearest", "stochastic", "stochastic(4)", "pseudo_stochastic", "toward_zero"):
        frame = compare_formats(formats, "resnet18", model, 8, rounding=rounding, update_rounding=rounding)
        out[f"compare/rounding/{rounding}"] = rows(frame)
    for accumulator, (index, mixed), workload in itertools.product(ACCUMULATORS, enumerate(MIXED),
                                                                   ("resnet18", "bert-base")):
        trained = model if accumulator is None else model.with_datapath(accumulator=accumulator)
        key = f"{accumulator}/{index}/{workload}"
        try:
            spec = TrainingFormats.of(**mixed)
            out[f"frame/{key}"] = rows(iteration_energy(workload, spec, trained, 4))
            out[f"area/{key}"] = {k: exact(v) for k, v in training_area_um2(spec, trained, workload).items()}
        except ValueError as error:
            out[f"frame/{key}"] = f"error: {error}"
    sweep = load_config("examples/quickstart.yaml")
    estimator = EnergyEstimator(sweep.energy)
    for trial in expand(sweep):
        if f"quickstart/{trial.label}" not in out:
            out[f"quickstart/{trial.label}"] = {column: {k: exact(v) for k, v in energy.as_row().items()}
                                               for column, energy in estimator.estimate(trial.config).items()}
    return out


if __name__ == "__main__":
    numbers = snapshot()
    with open(sys.argv[1], "w", encoding="utf-8") as file:
        json.dump(numbers, file, indent=0, sort_keys=True)
    print(f"{len(numbers)} entries written to {sys.argv[1]}")
