"""A/B of quantize speed between checkouts of dse, in one process, round-robin with copy_.

Each checkout (a directory holding `dse/`, e.g. a `git worktree add /tmp/old <commit>`) is imported
under its own module name, so every version and a `copy_` into a preallocated tensor are timed in
the same rounds on the same input: load from other processes then slows them alike, and only the
side-by-side ratios are read. On a loaded machine `--clock cpu` times the process's own CPU time
(time.process_time, `--calls` calls per timing for its resolution), which other processes slow less
than the wall clock.

    git worktree add /tmp/old 6d2b046
    nice -n 5 .venv/bin/python benchmarks/quantize_ab.py old=/tmp/old new=. --specs "fixed(8,4);int8;fp8_e4m3"
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch


def load_formats(path: str, alias: str, specs: list[str]) -> dict[str, Any]:
    """The format objects of `specs` from the dse checkout at `path`; its modules renamed to `alias`."""
    for name in [m for m in sys.modules if m == "dse" or m.startswith("dse.")]:
        del sys.modules[name]
    sys.path.insert(0, path)
    try:
        formats = importlib.import_module("dse.formats")
        loaded = {spec: formats.get(spec) for spec in specs}
    finally:
        sys.path.remove(path)
    for name in [m for m in sys.modules if m == "dse" or m.startswith("dse.")]:
        sys.modules[alias + name[3:]] = sys.modules.pop(name)
    return loaded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="+", metavar="LABEL=PATH")
    parser.add_argument("--specs", default="fixed(8,4);int8;fp8_e4m3", help="';'-separated specs")
    parser.add_argument("--sizes", default="1e6,1e7")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: time.perf_counter; cpu: time.process_time (this process's CPU time)")
    parser.add_argument("--calls", type=int, default=1, help="calls per timing (the time is their mean)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = [s for s in args.specs.split(";") if s]
    versions = {}
    for item in args.checkouts:
        label, _, path = item.partition("=")
        versions[label] = load_formats(path, f"dse_ab_{label}", specs)
    for size in (int(float(s)) for s in args.sizes.split(",")):
        x = torch.randn(size, generator=torch.Generator().manual_seed(0))
        destination = torch.empty_like(x)
        fns: dict[str, Callable[[], Any]] = {"copy_": lambda x=x, out=destination: out.copy_(x)}
        for label, formats in versions.items():
            for spec, fmt in formats.items():
                fns[f"{label} {spec}"] = lambda fmt=fmt, x=x: fmt.quantize(x)
        for fn in fns.values():  # warm-up: plans, tables, first-touch pages
            fn()
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                start = clock()
                for _ in range(args.calls):
                    fn()
                times[name].append((clock() - start) / args.calls)
        copy, fastest_copy = statistics.median(times["copy_"]), min(times["copy_"])
        print(f"n = {size:.0e}, {args.threads} thread(s), {args.clock} clock: copy_ {copy * 1e3:.2f} ms "
              f"(median of {args.rounds}, fastest {fastest_copy * 1e3:.2f} ms)")
        for name in fns:
            if name != "copy_":
                median = statistics.median(times[name])
                print(f"  {name:32s} {median * 1e3:9.2f} ms {size / median / 1e6:8.1f} M/s "
                      f"{median / copy:6.2f}x copy (fastest round {min(times[name]) / fastest_copy:.2f}x "
                      "fastest copy_)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
