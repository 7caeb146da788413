"""Time the energy model: one ResNet-50 training iteration for 100 format configurations.

Run: .venv/bin/python benchmarks/energy.py   (budget: 100 estimates under a second on one core;
the script prints the time as a ratio to that budget). Pin it to one core with `taskset -c 0`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dse.energy import TrainingFormats, build_model, iteration_energy, operand  # noqa: E402
from dse.formats import ZOO, get  # noqa: E402

BUDGET_S = 1.0


def configurations() -> list[tuple[str, TrainingFormats]]:
    """25 zoo formats x {uniform + default optimizer, Adam (FP formats: bf16 gradients)} x {45, 7 nm}."""
    specs = list(ZOO)[:25]
    out = []
    for node in ("45nm", "7nm"):
        for spec in specs:
            fmt = get(spec)
            out.append((node, TrainingFormats.of(fmt)))
            gradient = get("bf16") if operand(fmt).family == "fp" else fmt  # FP formats: bf16 gradients
            mixed = TrainingFormats.of(fmt, gradients=gradient, optimizer="adam")
            out.append((node, mixed))
    return out


def main() -> None:
    configs = configurations()
    start = time.perf_counter()
    models = {node: build_model(node) for node in ("45nm", "7nm")}
    totals = [iteration_energy("resnet50", formats, models[node])["energy_pj"].sum()
              for node, formats in configs]
    elapsed = time.perf_counter() - start
    print(f"resnet50 training iteration, {len(configs)} format configurations: {elapsed:.3f} s "
          f"({1e3 * elapsed / len(configs):.2f} ms each, {elapsed / BUDGET_S:.2f}x the {BUDGET_S:g} s "
          "budget); "
          f"energy {min(totals) * 1e-9:.1f}-{max(totals) * 1e-9:.1f} mJ")


if __name__ == "__main__":
    main()
