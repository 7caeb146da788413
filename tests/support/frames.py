"""Synthetic sweep results in the shape `dse.sweep.store.load_trials` returns, for the report tests."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from dse.sweep.store import TRIAL_COLUMNS, UNITS, PlanRow, SweepStore, TrialRow, master_weights_text

UNIT_SHARES = (0.4, 0.1, 0.2, 0.1, 0.2)


def trial_row(task: str, label: str, seed: int, accuracy: float, energy_mj: dict[str, float],
              status: str = "ok", memory_mib: dict[str, float] | None = None,
              val_accuracy: float | None = None, tuning: dict[str, Any] | None = None,
              **config: Any) -> dict[str, Any]:
    """One trial; `energy_mj` per workload is split over the units by UNIT_SHARES. The validation
    accuracy is the test accuracy unless given; `tuning` is the trial's tuning point."""
    fmt = config.pop("format", "fp32")
    row: dict[str, Any] = {
        "trial_id": f"{task}-{label}-{seed}", "task": task, "label": label, "model": task.split("-")[0],
        "dataset": task.split("-")[-1], "weights": config.pop("weights", fmt),
        "activations": config.pop("activations", fmt), "gradients": config.pop("gradients", fmt),
        "weight_grads": config.pop("weight_grads", None), "optimizer": config.pop("optimizer", "sgd"),
        "master_weights": config.pop("master_weights", True), "warmup_epochs": config.pop("warmup_epochs", 0),
        "seed": seed, "status": status, "diverged": status == "diverged",
        "error": "RuntimeError: boom" if status == "error" else "",
        "val_accuracy": math.nan if status == "error" else accuracy if val_accuracy is None else val_accuracy,
        "test_accuracy": math.nan if status == "error" else accuracy,
        "final_loss": math.nan if status == "error" else 1.0 - accuracy, "wall_time_s": 1.5 + seed,
    }
    assert not config, config
    row["configuration"] = f"{task}/{label}"
    row["tuning"] = json.dumps(tuning or {}, sort_keys=True)
    for name, value in (tuning or {}).items():
        row[f"tuned:{name}"] = value
    for workload, energy in energy_mj.items():
        row[f"energy_mj:{workload}"] = energy
        for unit, share in zip(UNITS, UNIT_SHARES, strict=True):
            row[f"energy_mj:{workload}:{unit}"] = energy * share
        row[f"memory_mib:{workload}"] = (memory_mib or {}).get(workload, energy * 10.0)
    row["config"] = json.dumps({"label": label, "seed": seed})
    return row


def trials_frame(rows: list[dict[str, Any]], workloads: list[str], memory_objective: bool = False,
                 name: str = "synthetic") -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame.attrs["sweep"] = {"name": name, "workloads": list(workloads), "memory_objective": memory_objective,
                            "output": "results/synthetic"}
    return frame


def example_trials(workloads: tuple[str, ...] = ("proxy", "resnet50")) -> pd.DataFrame:
    """Two tasks, two workloads, three seeds; a diverged seed, an all-error config, LaTeX-hostile specs."""
    configs = [  # label, format, optimizer, accuracies per seed, energy per workload
        ("fp32 sgd", "fp32", "sgd", (0.95, 0.96, 0.94), {"proxy": 4.0, "resnet50": 900.0}),
        ("lns8 madam", "lns(8,gamma=8)", "lns-madam", (0.93, 0.94, 0.95), {"proxy": 1.0, "resnet50": 250.0}),
        ("int8 niti", "int8", "niti", (0.90, 0.91, 0.89), {"proxy": 1.2, "resnet50": 200.0}),
        ("fp8_e4m3 adam", "fp8_e4m3", "adam", (0.92, 0.10, 0.93), {"proxy": 1.5, "resnet50": 300.0}),
        ("posit8 & 50%", "posit(8,1)", "sgd", (0.50, 0.52, 0.48), {"proxy": 5.0, "resnet50": 950.0}),
        ("broken", "posit(16,1)", "sgd", (0.0, 0.0, 0.0), {"proxy": 0.5, "resnet50": 100.0}),
    ]
    rows = []
    for task in ("mlp-digits", "cnn-m1d"):
        for label, fmt, optimizer, accuracies, energy in configs:
            for seed, accuracy in enumerate(accuracies):
                status = "error" if label == "broken" else "diverged" if accuracy < 0.2 else "ok"
                shift = 0.0 if task == "mlp-digits" else -0.05
                rows.append(trial_row(task, label, seed, accuracy + shift, {w: energy[w] for w in workloads},
                                      status=status, format=fmt, optimizer=optimizer))
    return trials_frame(rows, list(workloads))


def store_trials(directory: Path, trials: pd.DataFrame, priced_runs: bool = False) -> None:
    """Write `trials` (this module's shape) into a sweep store the way the sweep runner does; with
    `priced_runs`, each energy row prices its batches too (10 per epoch, every one a full iteration), so
    that each trial that did not raise has a run mean, its iteration's energy."""
    workloads = trials.attrs["sweep"]["workloads"]
    with SweepStore(directory) as store:
        plan = [PlanRow(row["trial_id"], row["task"], row["label"], f"{row['task']}/{row['label']}",
                        row["configuration"], json.loads(row["tuning"])) for _, row in trials.iterrows()]
        energies = {}
        for _, row in trials.iterrows():
            for workload in workloads:
                energies[(f"{row['task']}/{row['label']}", workload)] = {
                    "total_mj": row[f"energy_mj:{workload}"], "memory_mib": row[f"memory_mib:{workload}"],
                    **{f"{unit}_mj": row[f"energy_mj:{workload}:{unit}"] for unit in UNITS}}
                if priced_runs:
                    total = row[f"energy_mj:{workload}"]
                    energies[(f"{row['task']}/{row['label']}", workload)].update(
                        last_iteration_mj=total, forward_mj=total / 3, last_forward_mj=total / 3,
                        epoch_batches=10)
        store.start({"name": "synthetic", "workloads": workloads, "memory_objective": False}, plan, energies)
        for _, row in trials.iterrows():
            values = {column: row[column] for column in TRIAL_COLUMNS}
            for name in ("val_accuracy", "test_accuracy", "final_loss"):
                values[name] = None if math.isnan(values[name]) else float(values[name])
            values.update(weight_grads=row["gradients"],
                          master_weights=master_weights_text(row["master_weights"]),
                          diverged=int(row["diverged"]), seed=int(row["seed"]),
                          warmup_epochs=int(row["warmup_epochs"]), config=row["config"],
                          result="{}" if row["status"] == "error" else json.dumps(
                              {"epochs_run": 2, "epoch_iterations": [10, 10]}))
            store.record(TrialRow(values))
