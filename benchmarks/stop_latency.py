"""How long `dse train` takes to stop after Ctrl-C, this checkout against a baseline revision, side by
side.

    python benchmarks/stop_latency.py --baseline d64afd3                  # ~5 min on 2 idle cores
    python benchmarks/stop_latency.py --baseline d64afd3 --cases start-up --instants 24 --to-s 6

The baseline's code is exported with `git archive` into a temporary folder. Every try is a fresh
`python -m dse.cli train ... -q` with PYTHONPATH on the side's code, sent SIGINT (to it alone); the two
sides alternate try by try, in alternating order, so that load from other processes hits both alike.
Cases:
- start-up: `--model mlp --dataset digits --epochs 1`, the signal at --instants instants spread evenly
  over --from-s to --to-s seconds after the start (0.2-2.4 s, an idle machine's start-up; a loaded
  one's is longer): cli.py's imports, then the command's: torch's, the dataset's, the optimizer's (a
  signal inside another library's import ends the command at once where nothing is being written,
  dse/interrupts.py); a signal before Python runs dse's first line ends it as Python does (bad);
- user's module: `--model trains_as_imported:net`, a model module that works for 20 s as it is
  imported (a user's file that trains at import time), the signal 0.3 s after its work starts.
Per try: the wall seconds from the signal to the exit, and whether the command said its one line
(`interrupted by SIGINT`) and exited 130; "bad" otherwise (a traceback, a lost signal). Per side and
case: the median and the largest seconds, and the bad tries. A stop waits for imports, which is work
the load slows: the load average is printed with each case.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fixed_costs import export  # (this folder: the script's own)

ROOT = Path(__file__).resolve().parent.parent
START_UP = ["train", "--model", "mlp", "--dataset", "digits", "--epochs", "1", "-q"]
USERS_MODULE = ["train", "--model", "trains_as_imported:net", "--dataset", "digits", "--epochs", "1", "-q"]
TRAINS_AS_IMPORTED = """\
import os, time
import torch
from torch import nn
os.write(2, b"@mark\\n")
_until = time.monotonic() + 20
_w = torch.randn(64, 64)
while time.monotonic() < _until:
    _w = torch.tanh(_w @ _w)
def net(shape, classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, classes))
"""


def stop(code: Path, arguments: list[str], folder: Path, at_s: float | None) -> tuple[float, bool, str]:
    """(seconds from SIGINT to the exit, whether it said its line and exited 130, its last line) of
    `dse ARGUMENTS` run from the tree `code` in `folder`, signalled `at_s` seconds after its start
    (None: 0.3 s after it writes @mark on stderr)."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), str(folder)])}
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "dse.cli", *arguments], cwd=folder, env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert process.stderr is not None
    seen = b""
    if at_s is None:
        while b"@mark\n" not in seen and (chunk := os.read(process.stderr.fileno(), 4096)):
            seen += chunk
        time.sleep(0.3)
    else:
        time.sleep(max(0.0, started + at_s - time.monotonic()))
    signalled = time.monotonic()
    process.send_signal(signal.SIGINT)
    seen += process.stderr.read()
    process.wait()
    seconds = time.monotonic() - signalled
    lines = seen.decode(errors="replace").replace("@mark\n", "").splitlines()
    good = process.returncode == 130 and lines == ["interrupted by SIGINT"]
    return seconds, good, f"exit {process.returncode}: {lines[-1] if lines else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="a git revision of this repository")
    parser.add_argument("--cases", default="start-up,user's module", help="which cases, comma-separated")
    parser.add_argument("--instants", type=int, default=12, help="start-up: how many signals")
    parser.add_argument("--from-s", type=float, default=0.2, help="start-up: the first signal's instant")
    parser.add_argument("--to-s", type=float, default=2.4, help="start-up: the last signal's instant")
    parser.add_argument("--repeat", type=int, default=4, help="user's module: tries per side")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dse-stop-") as tmp:
        folder = Path(tmp)
        (folder / "trains_as_imported.py").write_text(TRAINS_AS_IMPORTED)
        sides = {"baseline": export(args.baseline, folder / "baseline"), "this checkout": ROOT}
        for case in args.cases.split(","):
            if case == "start-up":
                step = (args.to_s - args.from_s) / max(args.instants - 1, 1)
                tries = [(START_UP, round(args.from_s + step * i, 2)) for i in range(args.instants)]
            else:
                tries = [(USERS_MODULE, None)] * args.repeat
            loads = [os.getloadavg()[0]]
            seconds: dict[str, list[float]] = {side: [] for side in sides}
            bad: dict[str, list[str]] = {side: [] for side in sides}
            for number, (arguments, at_s) in enumerate(tries):
                for side in (list(sides) if number % 2 == 0 else list(sides)[::-1]):
                    took, good, last = stop(sides[side], arguments, folder, at_s)
                    seconds[side].append(took)
                    if not good:
                        bad[side].append(f"{at_s if at_s is not None else 'mark'}: {last}")
                    print(f"  {case}, {side}, signal at {at_s if at_s is not None else 'mark + 0.3'} s: "
                          f"stopped {took:.2f} s later{'' if good else f' BAD ({last})'}", flush=True)
                loads.append(os.getloadavg()[0])
            print(f"{case} (load {min(loads):.1f}-{max(loads):.1f}):")
            for side in sides:
                print(f"  {side:14s} median {statistics.median(seconds[side]):.2f} s, max "
                      f"{max(seconds[side]):.2f} s, bad {len(bad[side])} of {len(tries)}", flush=True)
                for line in bad[side]:
                    print(f"    {line}")
            ratio = statistics.median(seconds["this checkout"]) / statistics.median(seconds["baseline"])
            print(f"  median, this checkout / baseline: {ratio:.2f}")


if __name__ == "__main__":
    main()
