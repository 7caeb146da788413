"""Value-density plots of number formats: how many representable values fall in each binade."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from dse.formats.base import NumberFormat
from dse.interrupts import undone_by_unwinding
from dse.report.files import write_atomically

MAX_SAMPLED_CODES = 2**16


def binade_counts(fmt: NumberFormat) -> tuple[list[int], list[float]]:
    """Positive finite values per binade [2^k, 2^(k+1)), from the codes (sampled evenly above 16 bits)."""
    step = max(1, 2**fmt.bits // MAX_SAMPLED_CODES)
    # (code i * step, not arange(0, 2^bits, step): 2^bits itself is past int64 for a 63-bit format)
    values = fmt.decode(torch.arange(0, 2**fmt.bits // step, dtype=torch.int64) * step)
    positive = values[torch.isfinite(values) & (values > 0)]
    exponents = torch.floor(torch.log2(positive)).to(torch.int64)
    binades, counts = torch.unique(exponents, return_counts=True)
    return binades.tolist(), [float(c) * step for c in counts]


def plot_value_density(fmt: NumberFormat, path: Path) -> Path:
    """Write a bar chart of values per binade; the x axis is log2 of the value. Returns the file written
    (`path`, with .png added where it names no file type)."""
    with undone_by_unwinding():  # its first import writes its font cache under a lock file: not cut short
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

    binades, counts = binade_counts(fmt)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(binades, counts, width=0.9, color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("binade: log2(value)")
    ax.set_ylabel("positive values per binade")
    decades = fmt.dynamic_range_decades
    ax.set_title(f"{fmt.spec}: {fmt.bits} bits, max {fmt.max:.4g}, "
                 f"min positive {fmt.min_positive:.4g}, {decades:.1f} decades")
    if math.isfinite(decades):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    if not path.suffix:  # matplotlib would add .png itself: return the name it writes
        path = path.with_suffix(".png")
    file_type = path.suffix[1:].lower()
    try:
        write_atomically(path, lambda temporary: fig.savefig(temporary, format=file_type, dpi=120))
    finally:
        plt.close(fig)
    return path
