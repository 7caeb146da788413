"""End-to-end audit of grouped sweeps as users run them: draw random valid sweep files
(tests/support/random_sweeps.py), run each with `dse sweep` (grouped, its drawn group size, workers and
threads) and with `dse sweep --group-size 1`, and require the two stores to hold the same rows bit for
bit (every trial column and result but its times, the plan, the energy rows); train a few of the
trials with `dse train --json` and require its result to be the stored one; in some draws kill the
grouped sweep (SIGKILL or Ctrl-C) at a random moment, resume it with the other worker count, and
require every trial stored exactly once and equal to the fresh store. Prints one line per draw and
every mismatch; exits 1 if any.

    nice -n 5 python benchmarks/sweep_audit.py --draws 20 --seed 0
    nice -n 5 python benchmarks/sweep_audit.py --draws 200 --seed 1 --minutes 40 --kill 0.3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.random_sweeps import (  # noqa: E402
    draw_sweep,
    json_safe,
    snapshot_differences,
    store_snapshot,
    stored_results,
    train_arguments,
    write_file_datasets,
)

ENV = {**os.environ,
       "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
"""tests/ on the path: some draws name a network as a module (`support.audit_networks:odd_conv`)."""


def dse(*arguments: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dse.cli", *arguments], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=timeout)


def killed_and_resumed(config: Path, output: Path, rng: random.Random, workers: int
                       ) -> tuple[str, list[str]]:
    """Start the sweep, kill it (SIGKILL or SIGINT, to its process group as a terminal's Ctrl-C) once
    some time has passed, resume it with `workers`; (what was done, problems)."""
    how = rng.choice(["SIGKILL", "SIGINT"])
    delay = rng.uniform(2.0, 12.0)
    command = [sys.executable, "-m", "dse.cli", "sweep", str(config), "-q", "-o", str(output)]
    process = subprocess.Popen(command, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        process.wait(timeout=delay)
        killed = False
    except subprocess.TimeoutExpired:
        if how == "SIGKILL":
            process.kill()
        else:
            os.killpg(process.pid, signal.SIGINT)
        killed = True
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        return how, [f"the sweep did not stop within 120 s of {how}"]
    problems = []
    if killed and how == "SIGINT" and (process.returncode != 130 or "Traceback" in stderr):
        problems.append(f"Ctrl-C: exit {process.returncode} (expected 130), {stderr[-400:]}")
    done = f"{how} after {delay:.1f} s" if killed else f"finished before {how} at {delay:.1f} s"
    resumed = dse("sweep", str(config), "-q", "-o", str(output), "--workers", str(workers))
    if resumed.returncode != 0:
        problems.append(f"resume exit {resumed.returncode}: {resumed.stderr[-400:]}")
    return done, problems


def onnx_workload(folder: Path) -> list[str]:
    """A small network exported to ONNX in `folder` (a user's energy workload), where the onnx extra is
    installed; else none."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        return []
    import warnings

    import torch

    network = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                  torch.nn.Linear(4 * 6 * 6, 10))
    path = folder / "user_net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(network, (torch.randn(2, 1, 8, 8),), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    return [str(path)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=float("inf"))
    parser.add_argument("--alone", type=int, default=1, help="trials per draw also trained with `dse train`")
    parser.add_argument("--kill", type=float, default=0.25, help="share of draws killed and resumed")
    parser.add_argument("--models", default="", help="only draws of these models (comma-separated)")
    parser.add_argument("--keep", action="store_true", help="keep each draw's folder")
    parser.add_argument("--threads", default="1,2", help="executor thread counts to draw (comma-separated)")
    args = parser.parse_args()
    # Started in the background of a non-interactive shell (`... &`), this process and every sweep it
    # starts would inherit SIGINT ignored, and the Ctrl-C check would see sweeps that go on (exit 0)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    rng = random.Random(args.seed)
    start = time.monotonic()
    shared = Path(tempfile.mkdtemp(prefix=f"sweep-audit-{args.seed}-files-"))
    data_dir = write_file_datasets(shared)
    extra_workloads = ["digits-cnn", "resnet18", f"{ROOT}/tests/support/user_models.py:gated",
                       *onnx_workload(shared)]
    threads = tuple(int(t) for t in args.threads.split(","))
    counts = {"draws": 0, "refused": 0, "trials": 0, "alone": 0, "killed": 0, "mismatched": 0}
    for i in range(args.draws):
        if time.monotonic() - start > args.minutes * 60:
            break
        folder = Path(tempfile.mkdtemp(prefix=f"sweep-audit-{args.seed}-{i}-"))
        drawn = draw_sweep(rng, folder / "grouped", data_dir=data_dir, extra_workloads=extra_workloads,
                           threads=threads)
        if args.models and drawn.description.split(": ")[1].split(" on ")[0] not in args.models.split(","):
            shutil.rmtree(folder)
            continue
        kill = rng.random() < args.kill
        config = folder / "sweep.yaml"
        config.write_text(drawn.text)
        began = time.monotonic()
        grouped = dse("sweep", str(config), "-q")
        if grouped.returncode == 2:  # a drawn combination the product refuses before training
            counts["refused"] += 1
            print(f"{i:4d} refused ({grouped.stderr.strip()[:160]}): {drawn.description}", flush=True)
            shutil.rmtree(folder)
            continue
        problems: list[str] = []
        if grouped.returncode != 0:
            problems.append(f"grouped sweep exit {grouped.returncode}: {grouped.stderr[-600:]}")
        alone = dse("sweep", str(config), "-q", "--group-size", "1", "-o", str(folder / "alone"))
        if alone.returncode != 0:
            problems.append(f"ungrouped sweep exit {alone.returncode}: {alone.stderr[-600:]}")
        if not problems:
            fresh = store_snapshot(folder / "grouped")
            problems += snapshot_differences(fresh, store_snapshot(folder / "alone"))
            stored = stored_results(folder / "grouped")
            counts["trials"] += len(stored)
            errors = [r for _, r, status in stored.values() if status == "error"]
            if errors:
                problems.append(f"trials raised: {errors[:2]}")
            for trial in rng.sample(sorted(stored), min(args.alone, len(stored))):
                config_dict, result, _ = stored[trial]
                ran = dse("train", "--json", *train_arguments(config_dict))
                counts["alone"] += 1
                if ran.returncode != 0:
                    problems.append(f"dse train {trial} exit {ran.returncode}: {ran.stderr[-400:]}")
                    continue
                together, by_itself = json_safe(result), json.loads(ran.stdout)
                by_itself.pop("wall_time_s", None)
                together.pop("wall_time_s", None)
                if by_itself.pop("config") != json_safe(config_dict):
                    problems.append(f"dse train {trial} trained another config than the stored one")
                if together != by_itself:
                    problems.append(f"dse train {trial}: {by_itself} != stored {together}")
            if kill:
                counts["killed"] += 1
                done, trouble = killed_and_resumed(config, folder / "resumed", rng, 3 - drawn.workers)
                problems += [f"resumed ({done}): {line}" for line in trouble]
                if not trouble:
                    problems += [f"resumed ({done}): {line}" for line in
                                 snapshot_differences(fresh, store_snapshot(folder / "resumed"))]
        counts["draws"] += 1
        counts["mismatched"] += bool(problems)
        status = "MISMATCH" if problems else "ok"
        print(f"{i:4d} {status} {time.monotonic() - began:5.1f}s: {drawn.description}", flush=True)
        for line in problems:
            print(f"       {line[:2000]}", flush=True)
        if problems:
            print(f"       kept in {folder}", flush=True)
        elif not args.keep:
            shutil.rmtree(folder)
    shutil.rmtree(shared)
    print(json.dumps(counts), f"in {time.monotonic() - start:.0f} s")
    return 1 if counts["mismatched"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
