"""benchmarks/gpu_check.py, the check a session with a GPU runs in one call, runs here on the CPU with
tiny settings (`--device cpu --quick`): each step writes its table, and the device path counts no
host synchronisation per training step. The full check's steps fit the one call of the device tool."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.benchmark_scripts import load_benchmark

DEVICE_CALL_S = 540
"""The device tool's one call that runs the check (its command limit is 600 s; the session's 15
minutes of device time include the machine's start)."""
DEVICE_FILES = 8
"""The device tool brings back at most this many files from $OUT, each named in letters, digits, '.',
'_' and '-' (/work/.library/device/README.md, Limits): a ninth is left out."""


@pytest.fixture(scope="module")
def check(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the quick check on the CPU wrote, every step (the GPU tests: collected, all skipped)."""
    out = tmp_path_factory.mktemp("gpu_check") / "check"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--out",
                           str(out)], cwd=repo_root, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    return load_benchmark("gpu_check", keep_registered=False)


def test_the_gpu_check_runs_on_the_cpu_and_writes_its_tables(check: Path) -> None:
    summary = (check / "summary.txt").read_text()
    steps = ("grouped speed", "alignment", "syncs", "GPU tests")
    assert all(f"{step}: exit 0" in summary for step in steps), summary
    assert summary.startswith("CPU; torch ")
    grouped = (check / "grouped.md").read_text().splitlines()
    rows = [line for line in grouped if line.startswith("| mnist1d | int8 |")]
    assert len(rows) == 2 and all(len(row.split("|")) == 7 for row in rows)  # MLP and CNN, alone, G = 1, 2
    table = (check / "syncs.md").read_text().splitlines()
    syncs = [line.split("|") for line in table if line.startswith("| format")]
    assert len(syncs) == 2
    for row in syncs:
        alone_per_step, alone_epoch, grouped_per_step = float(row[2]), int(row[3]), float(row[4])
        assert alone_per_step == 0 and grouped_per_step == 0 and alone_epoch > 0
    assert re.search(r"\d+ skipped", (check / "cuda_tests.txt").read_text())


def test_the_gpu_check_writes_no_more_files_than_the_device_tool_brings_back(check: Path,
                                                                            gpu_check: ModuleType) -> None:
    written = sorted(path.name for path in check.rglob("*"))
    assert len(written) <= DEVICE_FILES, written
    assert set(written) <= set(gpu_check.OUT_FILES) and len(gpu_check.OUT_FILES) <= DEVICE_FILES, written
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in written)


def test_the_alignment_step_tables_every_grouped_gemm_and_convolution(check: Path) -> None:
    """Its GEMM rows are the layouts the MLP's and CNN's grouped steps met (3 Linear layers' forward,
    2 backward-data and 3 backward-weight products in the MLP; the CNN's one Linear's 3), each with
    what dse decided for it; a cost row per model; a row per convolution of the CNN; a profile each."""
    lines = (check / "alignment.md").read_text().splitlines()
    gemms = [line.split(" | ") for line in lines if line.startswith("| ") and " | 2 | " in line]
    assert len(gemms) == 8 + 3
    assert all(row[-1] in ("batched |", "member by member |") for row in gemms)
    costs = [line.split(" | ") for line in lines if line.startswith(("| mlp | int8 |", "| cnn | int8 |"))]
    assert len(costs) == 2 and all(float(row[4]) > 0 and float(row[5]) > 0 for row in costs)
    assert sum(line.startswith(("| 1->25,", "| 25->25,")) for line in lines) == 3
    assert not any("failed:" in line for line in lines)
    profile = (check / "profile.md").read_text()
    assert "### mlp, int8" in profile and "### cnn, int8" in profile
    phases = [[float(cell.split(" / ")[0]) for cell in line.strip("| ").split(" | ")]
              for line in profile.splitlines() if line.startswith("| ") and "host / device" not in line]
    # each model's forward, loss, backward, step, zero_grad: the phases' ranges found on the host
    assert len(phases) == 2 and all(len(row) == 5 and row[0] > 0 and row[2] > 0 for row in phases)


def test_a_step_cut_at_its_limit_keeps_what_it_printed_and_says_so(gpu_check: ModuleType,
                                                                   tmp_path: Path) -> None:
    log = tmp_path / "steps.log"
    sleeper = [sys.executable, "-c", "import time; print('row', 1); time.sleep(60)"]
    line = gpu_check.run_step("sleeper", sleeper, 5, log)  # (time for a loaded machine to start it)
    assert line.startswith("sleeper: cut at its limit of 5 s")
    assert "\nrow 1\n" in log.read_text()  # (a child's stdout into a file is block-buffered unless told)


def test_a_step_gets_what_the_steps_before_it_left_and_never_passes_the_checks_end(
        gpu_check: ModuleType) -> None:
    limit = gpu_check.step_limit_s
    assert limit(250, 260, 520) == 260  # the parent started in 10 s: as planned
    assert limit(60, 200, 400) == 200  # an earlier step ended 140 s early: this one may use that
    assert limit(250, 260, 500) == 250  # the parent took 30 s: the later steps lose it, not this one
    assert limit(150, 0, 100) == 100  # the last step: up to the check's end, never past it


def test_the_full_gpu_check_fits_one_call_of_the_device_tool(gpu_check: ModuleType) -> None:
    assert gpu_check.Plan().planned_s() <= DEVICE_CALL_S


@settings(max_examples=40, deadline=None)
@given(offset_elements=st.integers(0, 63), rows=st.integers(1, 9), columns=st.integers(1, 9),
       transposed=st.booleans())
def test_an_operand_placed_at_an_offset_starts_that_many_bytes_past_the_alignment(
        gpu_check: ModuleType, offset_elements: int, rows: int, columns: int, transposed: bool) -> None:
    """At a GPU's 256 bytes (set for CPU tensors, whose allocator aligns to 64 only, so that the
    shift to the offset is the address's and not the allocator's habit), in the strides asked for,
    holding the values."""
    import torch

    values = torch.randn(rows, columns)
    strides = (1, rows) if transposed else (columns, 1)
    with gpu_check.alignment_bytes_set("cpu", 256):
        moved = gpu_check.placed(values, strides, 4 * offset_elements)
    assert moved.data_ptr() % 256 == 4 * offset_elements
    assert moved.stride() == strides and torch.equal(moved, values)


def test_a_profiled_phase_counts_the_kernels_launched_in_it_and_not_its_device_span(
        gpu_check: ModuleType) -> None:
    """On a GPU (events as torch.profiler gives them there): backward's kernels are launched by
    autograd's device thread, outside the range's own tree, and count as backward's; the range's
    `gpu_user_annotation` span on the device, which covers its kernels and the gaps between them, is
    not a kernel (counted, the device would read busy 160 us more than its kernels' 80)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import Interval, Kernel

    def event(name: str, start: float, end: float, device: DeviceType = DeviceType.CPU,
              kernels: tuple[float, ...] = (), annotation: bool = False) -> SimpleNamespace:
        return SimpleNamespace(name=name, time_range=Interval(start, end), device_type=device,
                               kernels=[Kernel(f"kernel {us}", 0, us) for us in kernels],
                               is_user_annotation=annotation)

    phases = [event("phase:forward", 0, 100), event("phase:loss", 100, 120),
              event("phase:backward", 120, 300), event("phase:step", 300, 350),
              event("phase:zero_grad", 350, 360)]
    launches = [event("aten::mm", 10, 20, kernels=(30,)),  # forward, on the main thread
                event("aten::mm", 150, 160, kernels=(50,))]  # backward, on autograd's device thread
    on_device = [event("kernel 30", 40, 70, DeviceType.CUDA), event("kernel 50", 200, 250, DeviceType.CUDA),
                 event("phase:backward", 130, 290, DeviceType.CUDA, annotation=True)]
    host_us, device_us, kernels = gpu_check.profiled_phases([*phases, *launches, *on_device])
    assert host_us == {"forward": 100, "loss": 20, "backward": 180, "step": 50, "zero_grad": 10}
    assert device_us == {"forward": 30, "loss": 0, "backward": 50, "step": 0, "zero_grad": 0}
    assert sum(kernel.time_range.elapsed_us() for kernel in kernels) == 80


def test_a_step_not_named_right_is_refused_before_anything_is_written(
        gpu_check: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit) as refused:
        gpu_check.main(["--device", "cpu", "--quick", "--steps", "grouped,sync", "--out", out])
    assert refused.value.code == 2 and "no step sync" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # (a typo ran nothing and said nothing before)
