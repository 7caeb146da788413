"""What `dse sweep` and `dse report` pay besides training, this checkout against a baseline revision,
side by side.

    .venv/bin/python benchmarks/fixed_costs.py --baseline 5204e9d            # ~3 min on 2 idle cores
    .venv/bin/python benchmarks/fixed_costs.py --baseline 5204e9d --repeat 5 --no-fresh

The baseline's code is exported with `git archive` into a temporary folder. Every command runs in a
fresh interpreter (`python -m dse.cli ...` with PYTHONPATH on the side's code), the two sides one
after the other, in alternating order from one repeat to the next, so that load from other processes
hits both alike. Commands, on examples/quickstart.yaml (21 trials):

- fresh sweep: `dse sweep examples/quickstart.yaml -o OUT -q` into a new folder, training included;
  and its wall seconds before training (imports, planning, the fork server), in training (from the
  plan's commit to the last trial's, both in the store) and after it (reports, exit), and the sum of
  the two that are not training
- rerun, nothing to train: the same command again
- report, files current: `dse report OUT` (the baseline rewrites every file)
- report, files anew: `dse report OUT` after the reports' stamp is removed (every file written)
- help: `dse --help`

Per command, the best of --repeat of the wall seconds and of the CPU seconds (user + system) of the
command's process and of the children it reaped (not the fork server's workers, which the fork server
reaps: a fresh sweep's CPU figure is its main process's), and the ratio of this checkout to the
baseline. On a busy machine the CPU seconds are the figures to compare (they count what the command
ran, not what it waited for).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("fresh sweep", "  before training", "  training", "  after training", "  besides training",
            "rerun, nothing to train", "report, files current", "report, files anew", "help")


def export(revision: str, into: Path) -> Path:
    """The tree of `revision` of this repository, unpacked into `into`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], check=True,
                             capture_output=True).stdout
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def timed(code: Path, arguments: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of `dse ARGUMENTS` run from the tree `code`."""
    environment = {**os.environ, "PYTHONPATH": str(code)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dse.cli", *arguments], check=True, cwd=cwd, env=environment,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def fresh_stages(output: Path, started: float, ended: float) -> dict[str, tuple[float, float]]:
    """A fresh sweep's wall seconds before, during and after its training, from its store's clock:
    the run starts training when it records its plan (meta updated_at) and ends it when it commits
    its last trial (the latest finished_at). CPU seconds are not split (NaN)."""
    import sqlite3

    with sqlite3.connect(f"file:{output / 'sweep.sqlite'}?mode=ro", uri=True) as connection:
        planned = float(connection.execute("SELECT value FROM meta WHERE key = 'updated_at'").fetchone()[0])
        trained = float(connection.execute("SELECT MAX(finished_at) FROM trials").fetchone()[0])
    nan = float("nan")
    return {"  before training": (planned - started, nan), "  training": (trained - planned, nan),
            "  after training": (ended - trained, nan),
            "  besides training": ((planned - started) + (ended - trained), nan)}


def one_round(code: Path, root: Path, name: str, fresh: bool) -> dict[str, tuple[float, float]]:
    """Every command once, for the tree `code`; `fresh`: a new output folder (else the kept one)."""
    config = code / "examples" / "quickstart.yaml"
    output = root / f"{name}-out"
    sweep = ["sweep", str(config), "-o", str(output), "-q"]
    times: dict[str, tuple[float, float]] = {}
    if fresh or not output.exists():
        shutil.rmtree(output, ignore_errors=True)
        started = time.time()
        times["fresh sweep"] = timed(code, sweep, root)
        times.update(fresh_stages(output, started, time.time()))
    times["rerun, nothing to train"] = timed(code, sweep, root)
    times["report, files current"] = timed(code, ["report", str(output)], root)
    (output / ".reports.json").unlink()
    times["report, files anew"] = timed(code, ["report", str(output)], root)
    times["help"] = timed(code, ["--help"], root)
    return times


def _timing(command: str, wall: float, cpu: float) -> str:
    """One command's timing for a round's line (a fresh sweep's stages have wall seconds only)."""
    return f"{command.strip()} {wall:.2f} s wall" + ("" if command.startswith(" ") else f" / {cpu:.2f} s CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="a git revision of this repository")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every command (default 3)")
    parser.add_argument("--no-fresh", action="store_true", help="train the quickstart once per side, "
                        "not in every round (the fresh sweep is then one run)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dse-fixed-") as tmp:
        root = Path(tmp)
        sides = {"baseline": export(args.baseline, root / "baseline"), "this checkout": ROOT}
        runs: dict[str, dict[str, list[tuple[float, float]]]] = {side: {} for side in sides}
        for round_ in range(args.repeat):
            order = list(sides) if round_ % 2 == 0 else list(sides)[::-1]
            for side in order:
                load = os.getloadavg()[0]
                times = one_round(sides[side], root, side.replace(" ", "-"), not args.no_fresh)
                for command, value in times.items():
                    runs[side].setdefault(command, []).append(value)
                print(f"round {round_ + 1}, {side} (load average before: {load:.2f}): "
                      + ", ".join(_timing(command, wall, cpu) for command, (wall, cpu) in times.items()),
                      flush=True)
        revision = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True,
                                  capture_output=True, text=True).stdout.strip()
        print(f"\nbest of {args.repeat}: baseline {args.baseline}, this checkout {revision} "
              "(its working tree); quickstart, each command in a fresh interpreter")
        print("| command | baseline wall s | this wall s | wall ratio | baseline CPU s | this CPU s "
              "| CPU ratio |")
        print("|---|---|---|---|---|---|---|")
        for command in COMMANDS:
            if command not in runs["baseline"]:
                continue
            base = [min(value[i] for value in runs["baseline"][command]) for i in range(2)]
            this = [min(value[i] for value in runs["this checkout"][command]) for i in range(2)]
            cells = [f"{base[0]:.2f}", f"{this[0]:.2f}", f"{this[0] / base[0]:.2f}x"]
            cells += ["", "", ""] if command.startswith(" ") else [f"{base[1]:.2f}", f"{this[1]:.2f}",
                                                                   f"{this[1] / base[1]:.2f}x"]
            print(f"| {command.strip() if not command.startswith(' ') else '- ' + command.strip()} | "
                  + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
