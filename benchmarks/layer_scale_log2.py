"""How often a hardware log2 gives another Lu et al. layer scale than training's exact log2
(dse/train/policy.py `lu_layer_scale`), over every layer scale of real posit training runs.

The energy model prices the layer scale's log2|x| as Mitchell's log2(1 + m) ~ m corrected by a table
indexed by the mantissa's top bits (dse/energy/iteration.py `layer_scale_pj`); this counts, for
tables of 0 (Mitchell alone), 16, 32 and 64 entries (each entry the correction at its interval's
centre, in steps of 2^-12), the scales whose rounded mean differs from training's.

    PYTHONPATH=$PWD python benchmarks/layer_scale_log2.py [--epochs 2]
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import Tensor

from dse.formats.base import NumberFormat
from dse.train import policy
from dse.train.config import TrainConfig
from dse.train.loop import train

TABLE_BITS = (0, 4, 5, 6)
"""log2 of the correction table's entries (0: Mitchell alone)."""
STEP_LOG2 = 12
"""A correction's resolution: 2^-12."""


def hardware_centre(x: Tensor, fmt: NumberFormat, table_bits: int) -> int:
    """round(mean log2|x|) over the non-zero finite values, clamped as training clamps them, with the
    table-corrected Mitchell log2."""
    magnitude = x.detach().abs()
    usable = (magnitude > 0) & torch.isfinite(magnitude)
    clamped = magnitude.clamp(fmt.min_positive, fmt.max)[usable].double()
    fraction, exponent = torch.frexp(clamped)  # clamped = fraction * 2^exponent, fraction in [0.5, 1)
    mantissa = 2 * fraction - 1
    logs = (exponent - 1).double() + mantissa
    if table_bits:
        centre = (torch.floor(mantissa * 2**table_bits) + 0.5) / 2**table_bits
        logs = logs + torch.round((torch.log2(1 + centre) - centre) * 2**STEP_LOG2) / 2**STEP_LOG2
    return round(float(logs.sum()) / int(usable.sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    exact_scale = policy.lu_layer_scale
    scales = 0
    differing = dict.fromkeys(TABLE_BITS, 0)

    def counting(x: Tensor, fmt: NumberFormat) -> float:
        nonlocal scales
        scale = exact_scale(x, fmt)
        if bool(((x != 0) & torch.isfinite(x)).any()):
            exact = round(math.log2(scale)) - policy.LU_SCALE_OFFSET_LOG2
            scales += 1
            for bits in TABLE_BITS:
                differing[bits] += hardware_centre(x, fmt, bits) != exact
        return scale

    policy.lu_layer_scale = counting  # (the host path: the CPU)
    for fmt in ("posit(16,1)", "posit(8,1)"):
        config = TrainConfig(model="mlp", dataset="mnist1d", epochs=args.epochs, batch_size=100, format=fmt,
                             optimizer="sgd", lr=0.05, layer_scaling=True, seed=0)
        train(config)
        print(f"after {fmt} (runs so far together): {scales} layer scales; differing from training's: "
              + ", ".join(f"{2**bits if bits else 0}-entry table {differing[bits]}" for bits in TABLE_BITS),
              flush=True)


if __name__ == "__main__":
    main()
