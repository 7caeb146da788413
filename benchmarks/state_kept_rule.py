"""What `state_kept`'s own work (dse/train/memory.py: take every module's buffers, parameters and
attributes, give them back) costs a look-ahead forward now against the same at a git revision (that
revision's memory.py and attributes.py, loaded from its source), side by side in one process,
interleaved, one thread, thread CPU time: a block with no forward inside, so only the taking and giving
back is timed (now: attributes copied at any depth, and modules held outside the module tree found and
kept too).

    PYTHONPATH=$PWD python benchmarks/state_kept_rule.py
    PYTHONPATH=$PWD python benchmarks/state_kept_rule.py --baseline 80ed936 --rounds 9 --repeats 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from dse.data import load_dataset
from dse.models.proxies import build_model
from dse.train import memory

MODELS = (("mlp", "digits"), ("cnn", "digits"), ("resnet", "digits"), ("transformer", "sort"),
          ("tests/support/user_models.py:encoder", "digits"),
          ("tests/support/leaf_models.py:cyclic_counter", "digits"))


def baseline_memory(revision: str) -> types.ModuleType:
    """dse/train/memory.py at `revision`, importing that revision's dse/train/attributes.py."""
    def load(path: str, name: str, replace: tuple[str, str] | None = None) -> types.ModuleType:
        source = subprocess.run(["git", "show", f"{revision}:{path}"], check=True, capture_output=True,
                                text=True).stdout
        if replace is not None:
            source = source.replace(*replace)
        module = types.ModuleType(name)
        sys.modules[name] = module
        exec(compile(source, name, "exec"), vars(module))
        return module

    load("dse/train/attributes.py", "baseline_attributes")
    return load("dse/train/memory.py", "baseline_memory",
                ("from dse.train.attributes import", "from baseline_attributes import"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="80ed936")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rules = {"before": baseline_memory(args.baseline).state_kept, "now": memory.state_kept}
    print(f"load average {os.getloadavg()[0]:.1f} (1 min), baseline {args.baseline}, one thread, thread "
          f"CPU time, median of {args.rounds} interleaved rounds of {args.repeats}")
    print("| model | before (us) | now (us) | now / before |")
    print("|---|---|---|---|")
    for spec, dataset in MODELS:
        torch.manual_seed(0)
        path, _, name = spec.rpartition(":")
        model = build_model(f"{Path(path).resolve()}:{name}" if path else spec, load_dataset(dataset))
        times: dict[str, list[float]] = {kind: [] for kind in rules}
        for _ in range(args.rounds):
            for kind, kept in rules.items():
                start = time.thread_time()
                for _ in range(args.repeats):
                    with kept(model):
                        pass
                times[kind].append((time.thread_time() - start) / args.repeats * 1e6)
        before, now = (statistics.median(times[kind]) for kind in rules)
        print(f"| {name or spec} | {before:.0f} | {now:.0f} | {now / before:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
