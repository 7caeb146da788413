"""The sweep engine's own cost: the same 8-trial sweep with 1 and with 2 workers, and its overheads;
with --groups, grouped training against one trial at a time on the quickstart, end to end.

    .venv/bin/python benchmarks/sweep.py            # MNIST-1D MLP, 8 trials x 15 epochs: ~2 min on 2 cores
    .venv/bin/python benchmarks/sweep.py --epochs 3 --repeat 2
    .venv/bin/python benchmarks/sweep.py --groups --repeat 2            # quickstart, 21 and 84 trials
    .venv/bin/python benchmarks/sweep.py --groups --sweeps tuned --group-sizes 4,6,8,12
    .venv/bin/python benchmarks/sweep.py --dispatch-orders results/quickstart --workers 2

--dispatch-orders STORE replays the dispatch of a finished sweep's jobs (its groups as plan_groups
makes them from the sweep file the store holds, at --group-size) on --workers workers that each take
the next job when free, with each job's measured training seconds from the store (a member holds
its group's seconds over its size), for several orders: the file's, today's (longest first by
`estimated_cost`, as dse/sweep/runner.py hands the jobs out), longest first by the measured seconds,
and, for up to 8 jobs, the best of every order and the spread of the orders that are best for the
estimate. Training seconds only (no worker start, no store commit): what an order changes.

--groups runs `dse sweep` (the CLI, in a fresh interpreter: imports, planning, energy, training,
reports) on examples/quickstart.yaml (21 trials) and on the same file with 4 tuned learning rates
per configuration (84 trials), with executor.group_size 1 and each of --group-sizes alternately,
end to end and the trials' own training seconds (from the store); then times the same command
again with nothing left to train (it answers from the store: dse.sweep.receipt), the stages of
planning it in full (what a changed file or dse pays), and a rewrite of its reports.

Prints, per worker count, the sweep's wall time, the sum of the trials' own training time and the
speedup of 2 workers over 1; then the overhead per trial: starting the workers (the fork server's
imports, forks, thread budget), committing a row to the store, estimating a configuration's energy,
and everything else the 1-worker run spends beyond training. Each timed sweep runs in a fresh
interpreter, so each pays for starting its workers as `dse sweep` does. The runs alternate
(1, 2, 1, 2, ...) so that load from other processes hits both alike; the best run of each is reported.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# dse is imported inside the functions: spawned workers re-import this script as __mp_main__, and
# should pay only for what `dse sweep`'s workers pay for.


def sweep_text(output: Path, workers: int, epochs: int) -> str:
    return f"""\
name: bench
seeds: [0, 1]
task: {{model: mlp, dataset: mnist1d, epochs: {epochs}, batch_size: 100}}
energy: {{node: 7nm, workloads: [proxy, resnet50]}}
trials:
  - {{format: [fp32, int8, fp8_e4m3, posit8], optimizer: sgd}}
executor: {{backend: local, workers: {workers}}}
output: {output}
"""


def timed_sweep(root: Path, workers: int, epochs: int, run: int) -> tuple[float, float]:
    """(wall time of the sweep, sum of the trials' training time), in a fresh interpreter: every run
    pays for starting its workers (the fork server that `dse sweep` starts once per invocation)."""
    command = [sys.executable, __file__, "--child-sweep", str(root), str(workers), str(epochs), str(run)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()
    return float(output[-2]), float(output[-1])


def child_sweep(root: Path, workers: int, epochs: int, run: int) -> tuple[float, float]:
    from dse.sweep import load_trials, parse_config, run_sweep

    output = root / f"w{workers}-{run}"
    sweep = parse_config(sweep_text(output, workers, epochs), "bench.yaml")
    started = time.perf_counter()
    summary = run_sweep(sweep, reports=False)
    wall = time.perf_counter() - started
    assert summary.ran == 8 and summary.errors == 0, summary
    return wall, float(load_trials(output)["wall_time_s"].sum())


def spawn_time(workers: int) -> float:
    command = [sys.executable, __file__, "--child-spawn", str(workers)]
    return float(subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1])


def child_spawn_time(workers: int) -> float:
    """Seconds until `workers` fresh workers have imported the trainer and set their threads."""
    from dse.sweep.executors import _warm_up, worker_context

    started = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=worker_context(), initializer=_warm_up,
                             initargs=(1,)) as pool:
        list(pool.map(abs, range(workers)))
    return time.perf_counter() - started


def store_time(root: Path, rows: int = 50) -> float:
    """Seconds per committed trial row (one transaction each, synchronous=FULL)."""
    from dse.sweep import parse_config
    from dse.sweep.executors import TrialOutcome
    from dse.sweep.runner import _row, plan_sweep
    from dse.sweep.store import SweepStore

    sweep = parse_config(sweep_text(root / "store", 1, 1), "bench.yaml")
    trials, keys, energies = plan_sweep(sweep)

    result = {"test_accuracy": 0.5, "final_loss": 1.0, "diverged": False, "wall_time_s": 1.0,
              "epochs_run": 1, "params": 1, "loss_curve": [1.0], "accuracy_curve": [0.5]}
    (root / "store").mkdir()
    with SweepStore(root / "store") as store:
        store.start({"name": "bench", "workloads": ["proxy"]}, [], energies)
        started = time.perf_counter()
        for index in range(rows):
            trial = trials[index % len(trials)]
            store.record(_row(trial, TrialOutcome(f"{trial.trial_id}-{index}", result)))
        return (time.perf_counter() - started) / rows


def energy_time(epochs: int) -> float:
    """Seconds per distinct configuration to estimate its energy (proxy traced once, then resnet50)."""
    from dse.sweep import expand, parse_config
    from dse.sweep.energy import EnergyEstimator

    sweep = parse_config(sweep_text(Path("unused"), 1, epochs), "bench.yaml")
    trials = expand(sweep)
    estimator = EnergyEstimator(sweep.energy)
    estimator.estimate(trials[0].config)  # the proxy trace and first-call costs are paid by every sweep
    distinct = {t.config.replace(seed=0) for t in trials}
    started = time.perf_counter()
    fresh = EnergyEstimator(sweep.energy)
    fresh._proxies = estimator._proxies
    for config in distinct:
        fresh.estimate(config)
    return (time.perf_counter() - started) / len(distinct)


QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml"
TUNED_LRS = {"sgd": [0.025, 0.05, 0.1, 0.2], "lns-madam": [1 / 256, 1 / 128, 1 / 64, 1 / 32]}
"""Four learning rates per optimizer around each one's default (docs/training.md)."""


def quickstart_text(epochs: int | None, tuned: bool, dataset: str | None = None) -> str:
    """examples/quickstart.yaml, with its epochs (and dataset) replaced and (tuned) 4 learning rates
    per entry."""
    import yaml

    sweep = yaml.safe_load(QUICKSTART.read_text())
    if epochs is not None:
        sweep["task"]["epochs"] = epochs
    if dataset is not None:
        sweep["task"]["dataset"] = dataset
    if tuned:
        for entry in sweep["trials"]:
            entry.pop("lr", None)  # an entry's own lr (the LNS-Madam preset's) gives way to the tuned grid
            entry["tune"] = {"lr": TUNED_LRS[entry.get("optimizer", "sgd")]}
    return yaml.safe_dump(sweep, sort_keys=False)


def timed_cli(config: Path, output: Path, group_size: int) -> tuple[float, float]:
    """(wall seconds of `dse sweep config -o output --group-size N -q` in a fresh interpreter, the sum of
    its trials' training seconds from the store: a group member holds the group's time over its size)."""
    wall, training, _ = timed_cli_cpu(config, output, group_size)
    return wall, training


def _adopt_orphans() -> bool:
    """Make this process the reaper of its descendants' orphans (Linux's child subreaper): a process the
    sweep did not wait for (multiprocessing's resource tracker, a worker its fork server had not
    collected) is reparented here, not to init, so its CPU seconds reach RUSAGE_CHILDREN once
    `_reap_orphans` waits for it. False where the platform has no such thing."""
    import ctypes

    try:
        return bool(ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0)  # PR_SET_CHILD_SUBREAPER
    except (AttributeError, OSError):
        return False


REAP_TIMEOUT_S = 60.0
"""How long `_reap_orphans` waits for a sweep's orphans to end (the resource tracker ends within a second
of its last client)."""


def _reap_orphans(timeout_s: float = REAP_TIMEOUT_S) -> list[str]:
    """Wait up to `timeout_s` for every child of this process to end (after a sweep: the orphans it left,
    `_adopt_orphans`); the children still running then, as "pid: command line" (empty: none left)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return []
        if pid:
            continue
        if time.monotonic() >= deadline:
            return _children()
        time.sleep(0.01)


def _children() -> list[str]:
    """This process's children that have not ended, as "pid: command line" (Linux's /proc)."""
    me = os.getpid()
    left = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != me:  # the parent's pid (after the state)
                continue
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue  # (it ended meanwhile)
        left.append(f"{stat.parent.name}: {command.strip()}")
    return left


def timed_cli_cpu(config: Path, output: Path, group_size: int) -> tuple[float, float, float]:
    """`timed_cli`'s two figures and the CPU seconds (user + system) of the sweep's process and of every
    process it started (its workers: on a loaded machine the figure the load disturbs least), those it
    did not wait for itself included (`_adopt_orphans`: the resource tracker, 0.03-0.04 CPU s a sweep
    that RUSAGE_CHILDREN missed, 0.3 % of a 1-epoch quickstart; no worker was missed)."""
    from dse.sweep import load_trials

    cli = Path(__file__).resolve().parent.parent / "cli.py"
    command = [sys.executable, str(cli), "sweep", str(config), "-o", str(output), "-q",
               "--group-size", str(group_size)]
    adopted = _adopt_orphans()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if adopted:
        left = _reap_orphans()
        if left:
            print(f"warning: {len(left)} process(es) the sweep left still ran after {REAP_TIMEOUT_S:g} s, "
                  f"and their CPU seconds are not counted: {'; '.join(left)}", file=sys.stderr)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, float(load_trials(output)["wall_time_s"].sum()), cpu


def child_stages(config: Path, output: Path) -> list[tuple[str, float]]:
    """CPU seconds of each stage of a sweep with nothing left to train (its store is complete), in one
    single-threaded process: what it waits on a quiet machine, whatever else runs on a busy one."""
    started = time.process_time()
    from dse.report import write_reports
    from dse.sweep import load_config, load_trials
    from dse.sweep.groups import plan_groups
    from dse.sweep.runner import check_tasks, check_trials, estimate_energies, unique_runs
    from dse.sweep.trials import baseline_labels, expand

    imported = time.process_time()
    sweep = load_config(config).replace(output=output)
    samples = check_tasks(sweep)
    trials = expand(sweep)
    check_trials(sweep, trials, samples)
    baseline_labels(sweep, trials)
    checked = time.process_time()
    estimate_energies(sweep, trials, samples)
    energy = time.process_time()
    plan_groups(unique_runs(trials), sweep.executor.group_size)
    grouped = time.process_time()
    frame = load_trials(output)
    list(write_reports(frame, output, sweep.memory_objective))
    reported = time.process_time()
    return [("imports", imported - started), ("parse, expand, check", checked - imported),
            ("energy estimates", energy - checked), ("groups", grouped - energy),
            ("load store, write reports", reported - grouped)]


SWEEPS = {"quickstart": (False, 21), "tuned": (True, 84)}
"""--groups: the quickstart as it is, and with 4 tuned learning rates per configuration (tuned, trials)."""


def groups_benchmark(epochs: int | None, repeat: int, group_sizes: list[int], dataset: str | None,
                     sweeps: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="dse-bench-") as tmp:
        root = Path(tmp)
        rows = []
        for name in sweeps:
            tuned, _ = SWEEPS[name]
            config = root / f"{name}.yaml"
            config.write_text(quickstart_text(epochs, tuned, dataset))
            runs: dict[int, list[tuple[float, float, float]]] = {size: [] for size in [1, *group_sizes]}
            for run in range(repeat):
                order = list(runs) if run % 2 == 0 else list(runs)[::-1]
                for size in order:
                    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
                    wall, training, cpu = timed_cli_cpu(config, root / f"{name}-g{size}-{run}", size)
                    runs[size].append((wall, training, cpu))
                    print(f"{name}: group size {size}, run {run + 1}: {wall:.1f} s, {training:.1f} s of "
                          f"training, {cpu:.1f} CPU s (load average before: {load:.2f})", flush=True)
            rows.append((name, runs))
        print("\n`dse sweep` in a fresh interpreter, end to end, and the trials' training seconds summed "
              f"(from the store), each the best of {repeat}; "
              f"{epochs or 'the file’s'} epochs, dataset {dataset or 'mnist1d'}")
        print("| sweep | trials | group size | end to end s | speed-up | training s | speed-up "
              "| CPU s (sweep and workers) | speed-up |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, runs in rows:
            alone = [min(result[column] for result in runs[1]) for column in range(3)]
            for size, results in runs.items():
                best = [min(result[column] for result in results) for column in range(3)]
                cells = " | ".join(f"{value:.1f} | {base / value:.2f}x"
                                   for value, base in zip(best, alone, strict=True))
                print(f"| {name} | {SWEEPS[name][1]} | {size} | {cells} |")
        name = sweeps[0]
        done = root / f"{name}-g{group_sizes[0]}-0"
        config = root / f"{name}.yaml"
        again = min(timed_cli(config, done, group_sizes[0])[0] for _ in range(repeat))
        command = [sys.executable, __file__, "--child-stages", str(config), str(done)]
        stages = subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()
        print(f"\nthe {name} sweep again with nothing left to train: {again:.1f} s (from the store, "
              "no plan); the stages of a full plan of it in one process (CPU seconds):")
        for line in stages:
            print(f"  {line}")
        print(f"  writing the reports anew, imports included: {report_time(done):.2f} s")


def report_time(output: Path) -> float:
    """CPU seconds to write a finished sweep's reports (tables and plots) anew, in a fresh interpreter."""
    command = [sys.executable, __file__, "--child-reports", str(output)]
    return float(subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1])


def child_reports(output: Path) -> float:
    """CPU seconds of writing the reports into a scratch folder, from importing dse.report (scipy.stats;
    matplotlib on the first figure) to the last file, all in this process: the work a report costs
    (a sweep and `dse report` draw the figures in processes of their own: dse/report/drawing.py)."""
    from dse.sweep import load_trials

    frame = load_trials(output)
    with tempfile.TemporaryDirectory(prefix="dse-reports-") as scratch:
        started = time.process_time()
        from dse.report import write_reports

        write_reports(frame, Path(scratch))
        return time.process_time() - started


def dispatch_orders(store: Path, workers: int, group_size: int) -> None:
    """`--dispatch-orders`: the store's jobs replayed in several orders (module docstring)."""
    import itertools
    import sqlite3

    from dse.sweep import parse_config
    from dse.sweep.groups import plan_groups
    from dse.sweep.runner import unique_runs
    from dse.sweep.trials import estimated_cost, expand

    with sqlite3.connect(store / "sweep.sqlite") as db:
        text = dict(db.execute("SELECT key, value FROM meta"))["config_yaml"]
        seconds = dict(db.execute("SELECT trial_id, wall_time_s FROM trials"))
    sweep = parse_config(text, "stored.yaml")
    groups, _ = plan_groups(unique_runs(expand(sweep)), group_size, shares={})
    jobs = [(group[0].label, sum(seconds[t.trial_id] for t in group)) for group in groups]
    estimate = [sum(estimated_cost(t.config) for t in group) for group in groups]

    def makespan(order: Sequence[int], cost: Sequence[float]) -> float:
        free = [0.0] * workers
        for job in order:
            free[free.index(min(free))] += cost[job]
        return max(free)

    cost = [job_seconds for _, job_seconds in jobs]
    orders = {"file order": list(range(len(jobs))),
              "longest first by estimated_cost (today)": sorted(range(len(jobs)), key=lambda j: -estimate[j]),
              "longest first by measured seconds": sorted(range(len(jobs)), key=lambda j: -cost[j])}
    print(f"{len(jobs)} jobs, {sum(cost):.2f} s of training; over {workers} workers "
          f"{sum(cost) / workers:.2f} s")
    for label, job_seconds in jobs:
        print(f"  {label}: {job_seconds:.2f} s")
    for name, order in orders.items():
        print(f"{name}: {makespan(order, cost):.2f} s ({', '.join(jobs[j][0].split()[0] for j in order)})")
    if len(jobs) <= 8:
        every = list(itertools.permutations(range(len(jobs))))
        best = min(every, key=lambda order: makespan(order, cost))
        print(f"best of all {len(every)} orders: {makespan(best, cost):.2f} s "
              f"({', '.join(jobs[j][0].split()[0] for j in best)})")
        least = min(makespan(order, estimate) for order in every)
        for_estimate = [makespan(order, cost) for order in every if makespan(order, estimate) <= least + 1e-9]
        print(f"the {len(for_estimate)} orders best for the estimate: {min(for_estimate):.2f}-"
              f"{max(for_estimate):.2f} s, mean {statistics.mean(for_estimate):.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per trial (default 15, as the quickstart)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each worker count (default 1)")
    parser.add_argument("--groups", action="store_true", help="grouped training against one trial at a "
                        "time on the quickstart (21 trials) and with 4 tuned learning rates (84)")
    parser.add_argument("--group-sizes", default="8", help="--groups: group sizes to run against size 1 "
                        "(comma-separated; default 8)")
    parser.add_argument("--sweeps", default="quickstart,tuned",
                        help="--groups: which sweeps (quickstart, tuned)")
    parser.add_argument("--dataset", default=None, help="--groups: the quickstart's MLP on another built-in "
                        "dataset (e.g. digits: a 64-128-10 MLP, whose steps are dispatch-bound)")
    parser.add_argument("--dispatch-orders", type=Path, default=None, metavar="STORE",
                        help="replay a finished sweep's jobs in several dispatch orders (see above)")
    parser.add_argument("--workers", type=int, default=2, help="--dispatch-orders: workers (default 2)")
    parser.add_argument("--group-size", type=int, default=3,
                        help="--dispatch-orders: the sweep's group size (default 3)")
    parser.add_argument("--child-sweep", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--child-stages", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--child-spawn", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-reports", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dispatch_orders is not None:
        dispatch_orders(args.dispatch_orders, args.workers, args.group_size)
        return
    if args.child_stages:
        for stage, seconds in child_stages(Path(args.child_stages[0]), Path(args.child_stages[1])):
            print(f"{stage}: {seconds:.2f} s")
        return
    if args.child_reports:
        print(child_reports(Path(args.child_reports)))
        return
    if args.groups:
        groups_benchmark(args.epochs, args.repeat, [int(size) for size in args.group_sizes.split(",")],
                         args.dataset, args.sweeps.split(","))
        return
    args.epochs = 15 if args.epochs is None else args.epochs
    if args.child_sweep:
        root, workers, epochs, run = args.child_sweep
        print(*child_sweep(Path(root), int(workers), int(epochs), int(run)))
        return
    if args.child_spawn:
        print(child_spawn_time(args.child_spawn))
        return
    with tempfile.TemporaryDirectory(prefix="dse-bench-") as tmp:
        root = Path(tmp)
        walls: dict[int, list[float]] = {1: [], 2: []}
        trains: dict[int, list[float]] = {1: [], 2: []}
        for run in range(args.repeat):
            for workers in (1, 2):
                load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
                wall, trained = timed_sweep(root, workers, args.epochs, run)
                walls[workers].append(wall)
                trains[workers].append(trained)
                print(f"run {run + 1}: {workers} worker(s): {wall:.1f} s wall, {trained:.1f} s of training "
                      f"(load average before: {load:.2f})", flush=True)
        best = {w: min(walls[w]) for w in walls}
        print(f"\n8 trials, MNIST-1D MLP, {args.epochs} epochs each, 1 thread per trial")
        print(f"| workers | wall s (best of {args.repeat}) | training s (sum over trials) |")
        print("|---|---|---|")
        for workers in (1, 2):
            print(f"| {workers} | {best[workers]:.1f} | {statistics.median(trains[workers]):.1f} |")
        print(f"\nspeedup, 2 workers over 1: {best[1] / best[2]:.2f}x")
        one = walls[1].index(best[1])
        overhead = (best[1] - trains[1][one]) / 8
        spawn1, spawn2 = spawn_time(1), spawn_time(2)
        print(f"overhead per trial with 1 worker (wall - training) / 8: {overhead:.2f} s")
        print(f"  start 1 worker: {spawn1:.2f} s ({spawn1 / 8:.2f} s per trial of 8); 2 workers at once: "
              f"{spawn2:.2f} s")
        print(f"  store: {store_time(root) * 1e3:.1f} ms per committed trial")
        print(f"  energy: {energy_time(args.epochs) * 1e3:.1f} ms per configuration (proxy + resnet50)")


if __name__ == "__main__":
    main()
