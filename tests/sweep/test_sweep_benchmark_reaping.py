"""benchmarks/sweep.py waits for the processes a sweep left (its orphans, to count their CPU seconds) for
a bounded time: a process that never ends cannot hang the benchmark, and the processes still running
when the wait gives up are named."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "sweep.py"

SCRIPT = textwrap.dedent("""
    import importlib.util, json, subprocess, sys, time
    spec = importlib.util.spec_from_file_location("sweep_benchmark", sys.argv[1])
    bench = importlib.util.module_from_spec(spec)
    sys.modules["sweep_benchmark"] = bench
    spec.loader.exec_module(bench)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], **quiet)
    quick = subprocess.Popen([sys.executable, "-c", "pass"], **quiet)
    started = time.monotonic()
    left = bench._reap_orphans(timeout_s=1.0)
    waited = time.monotonic() - started
    child.kill()
    child.wait()
    print(json.dumps({"left": left, "waited_s": waited, "child": child.pid, "quick": quick.pid}))
""")


def test_reaping_a_sweeps_orphans_gives_up_after_its_bound_and_names_the_processes_left() -> None:
    # (in a process of its own: the reaping waits for any child of the process that runs it)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(BENCHMARK)], capture_output=True, text=True,
                          timeout=50)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert 1.0 <= result["waited_s"] < 30.0
    assert [line.split(":")[0] for line in result["left"]] == [str(result["child"])]
    assert "time.sleep(60)" in result["left"][0]
