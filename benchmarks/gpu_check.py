"""The GPU check, prepared to run in one call on a machine with a CUDA device (about 8 minutes on an
H100), writing its tables under one folder:

    python benchmarks/gpu_check.py --out "$OUT"                  # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/check   # the same steps, tiny, on CPU

Three steps, most important first, each in its own time limit so that one slow step cannot eat the
others' time (a step past its limit is cut and says so; what it wrote so far stays):
1. `grouped.md`: trials per second of the MNIST-1D MLP and CNN, one trial at a time and in groups of
   G = 1, 2, 4, 8, 16, 32, with the speed-up (benchmarks/grouped.py on the device; issue 16 asks for
   at least 10x at G = 32).
2. `syncs.md`: host synchronisations per training step, alone and grouped, counted by torch's own
   CUDA sync debug mode (`torch.cuda.set_sync_debug_mode`) as the difference between an epoch of 2k
   batches and one of k: 0 on the device path. On the CPU the same count comes from the device path
   emulated on CPU tensors (`dse.formats.fast.device_path`, tests/support/host_syncs.py).
3. `cuda_tests.txt`: the tests that need a GPU (tests/test_cuda.py: every format bit for bit against
   the CPU path, every proxy trained reproducibly; the grouped-equals-alone checks on CUDA), which CI
   skips.
`device.txt` names the machine and the versions.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GPU_TESTS = ["tests/test_cuda.py", "tests/train/test_train_grouped.py",
             "tests/train/test_train_grouped_threads.py",
             "tests/train/test_train_grouped_methods.py", "tests/train/test_train_functional.py"]
SYNC_METHODS: list[dict[str, object]] = [
    {"format": "int8"}, {"format": "fp8_e4m3", "rounding": "stochastic"}, {"format": "mxfp8_e4m3"},
    {"format": "nvfp4"}, {"format": "lns8", "optimizer": "lns-madam", "master_weights": False},
    {"format": "fp8_e4m3", "optimizer": "adam", "gradients": "fp8_e5m2"},
    {"format": "posit(16,1)", "layer_scaling": True},
    {"format": "int8", "optimizer": "niti"},  # the known exception: its exponents live on the host
]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What each step runs: the full check, or `--quick`'s tiny one (a test runs it on the CPU)."""

    sizes: str = "1,2,4,8,16,32"
    formats: str = "fp32,int8,fp8_e4m3,mxfp8_e4m3,lns8"
    epochs: int = 2
    rounds: int = 2
    train_samples: int | None = None
    sync_batches: int = 4
    sync_methods: int = len(SYNC_METHODS)
    grouped_limit_s: int = 270
    tests_limit_s: int = 210
    tests: tuple[str, ...] = tuple(GPU_TESTS)


QUICK = Plan(sizes="1,2", formats="int8", epochs=1, rounds=1, train_samples=200, sync_batches=2,
             sync_methods=2, grouped_limit_s=300, tests_limit_s=300, tests=("tests/test_cuda.py",))


def run_step(name: str, command: list[str], limit_s: int, out: Path) -> str:
    """Run one step as a subprocess within its limit, its output into out; a line saying how it went."""
    started = time.perf_counter()
    with out.open("w") as log:
        try:
            code = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=limit_s,
                                  check=False).returncode
            how = f"exit {code}"
        except subprocess.TimeoutExpired:
            how = f"cut at its limit of {limit_s} s"
    return f"{name}: {how} after {time.perf_counter() - started:.0f} s -> {out.name}"


@contextmanager
def counting_syncs(device: str) -> Iterator[list[str]]:
    """The host synchronisations inside the block, one entry each: torch's CUDA sync debug mode on a
    GPU; on the CPU, the device path emulated on CPU tensors and counted by tests/support/host_syncs."""
    seen: list[str] = []
    if device.startswith("cuda"):
        import torch

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield seen
            finally:
                torch.cuda.set_sync_debug_mode("default")
        seen += [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from support.host_syncs import HostSyncs

    from dse.formats.fast import device_path

    with device_path(), HostSyncs() as syncs:
        yield seen
    seen += [f"{what} at {where}" for what, where in syncs.syncs]


def sync_table(device: str, plan: Plan) -> list[str]:
    """Host synchronisations per training step of the MNIST-1D MLP, alone and in a group of 2."""
    import torch

    from dse.data import load_dataset, with_validation
    from dse.train.config import TrainConfig
    from dse.train.grouped import train_group
    from dse.train.loop import train

    torch.set_num_threads(1)
    data = with_validation(load_dataset("mnist1d"))
    batch = 32

    def trained(samples: int) -> Callable[[TrainConfig, bool], None]:
        part = dataclasses.replace(data, x_train=data.x_train[:samples], y_train=data.y_train[:samples])

        def run(config: TrainConfig, grouped: bool) -> None:
            if grouped:
                train_group([config.replace(seed=0), config.replace(seed=1, lr=0.05)], part)
            else:
                train(config, part)
        return run

    k = plan.sync_batches
    short, long = trained(k * batch), trained(2 * k * batch)
    lines = [f"Host synchronisations per training step on {device} (MNIST-1D MLP, batch {batch}; an epoch of "
             f"{2 * k} batches against one of {k}; the second column counts the whole epoch of {k})", "",
             "| method | alone per step | alone epoch | grouped (G = 2) per step | grouped epoch |",
             "|---|---|---|---|---|"]
    for fields in SYNC_METHODS[:plan.sync_methods]:
        config = TrainConfig(model="mlp", dataset="mnist1d", epochs=1, batch_size=batch, device=device,
                             **fields)  # type: ignore[arg-type]
        cells = []
        for grouped in (False, True):
            with counting_syncs(device):  # first-call costs: caches built once per format and device
                short(config, grouped)
            with counting_syncs(device) as few:
                short(config, grouped)
            with counting_syncs(device) as more:
                long(config, grouped)
            cells += [f"{(len(more) - len(few)) / k:g}", str(len(few))]
        method = ", ".join(f"{key}={value}" for key, value in fields.items())
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu, with --quick, to test it")
    parser.add_argument("--quick", action="store_true", help="tiny settings: a minute on the CPU")
    parser.add_argument("--out", type=Path, required=True, help="folder for the tables (created)")
    parser.add_argument("--steps", default="grouped,syncs,tests", help="which steps (default all three)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    import torch

    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    (out / "device.txt").write_text(f"{device_name}\ntorch {torch.__version__}, CUDA {torch.version.cuda}\n")
    python = sys.executable
    steps = set(args.steps.split(","))
    summary = []
    if "grouped" in steps:
        command = [python, "benchmarks/grouped.py", "--device", args.device, "--datasets", "mnist1d",
                   "--models", "mlp,cnn", "--sizes", plan.sizes, "--formats", plan.formats, "--epochs",
                   str(plan.epochs), "--rounds", str(plan.rounds), "--out", str(out / "grouped.md")]
        if plan.train_samples:
            command += ["--train-samples", str(plan.train_samples)]
        summary.append(run_step("grouped speed", command, plan.grouped_limit_s, out / "grouped.log"))
    if "syncs" in steps:
        started = time.perf_counter()
        (out / "syncs.md").write_text("\n".join(sync_table(args.device, plan)) + "\n")
        summary.append(f"syncs: {time.perf_counter() - started:.0f} s -> syncs.md")
    if "tests" in steps:
        # only the tests that need a GPU (each names cuda): the files' CPU tests ran in CI
        summary.append(run_step("GPU tests", [python, "-m", "pytest", "-q", "-p", "no:randomly", "-rs",
                                              "--durations=5", "-k", "cuda", *plan.tests],
                                plan.tests_limit_s, out / "cuda_tests.txt"))
    (out / "summary.txt").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    for name in ("grouped.md", "syncs.md"):
        if (out / name).exists():
            print(f"\n{name}:\n{(out / name).read_text()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
