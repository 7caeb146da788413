"""Training flushes denormals (dse.train.loop); block-scaled gradients with a non-nearest rounding
must train there: an E8M0 block scale of 2^-127 (a weight-gradient row of zeros) is a float32
subnormal that the CPU reads as 0, and dividing a zero block by it made the first batch NaN."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
from torch import nn

from dse.train import TrainConfig, train


@pytest.mark.parametrize(("gradients", "rounding"),
                         [("mxfp8_e4m3", "stochastic"), ("mxint8", "stochastic(8)"), ("nvfp4", "stochastic")])
def test_block_scaled_gradients_with_stochastic_rounding_train_where_denormals_are_flushed(
        gradients: str, rounding: str) -> None:
    result = train(TrainConfig(model="mlp", dataset="digits", format="mxfp8_e4m3", gradients=gradients,
                               rounding=rounding, epochs=2, seed=0))
    assert not result.diverged
    assert result.epochs_run == 2 and all(math.isfinite(loss) for loss in result.loss_curve)
    assert result.test_accuracy > 0.5


# --- every thread a run computes on flushes, and each thread's setting comes back (dse/train/denormals.py)

_UNFLUSHED = """
import json, warnings
import torch
from torch import nn

def unflushed():  # how many of 2^20 subnormals a parallel multiply leaves (every thread takes a share)
    x = torch.full((1 << 20,), 0x000AE398, dtype=torch.int32).view(torch.float32)  # 1e-39, as bits
    return int(torch.count_nonzero(x.mul(1.0)))

def parallel_operation_first():  # torch's workers start before anything flushes: they never do
    torch.set_num_threads(2)
    assert unflushed() == 1 << 20
"""


def _in_a_process(code: str) -> dict[str, Any]:
    """Run `code` (after `_UNFLUSHED`) in a fresh Python process: thread pools and floating-point
    controls start as a user's process starts; its last line of output is a JSON object."""
    done = subprocess.run([sys.executable, "-c", _UNFLUSHED + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_at_two_threads_a_group_member_quantizes_as_alone_where_a_parallel_operation_ran_first() -> None:
    """The history that failed: torch's worker started (unflushed) before training flushed. A stack of
    4 members of an NVFP4-like format crosses torch's parallel grain (the worker takes members 2 and
    3) where a member alone does not: the tiny member's subnormals were flushed alone (on the calling
    thread) and kept in the stack, 22,980 elements differing before the run flushed every thread.
    scikit-learn, loaded first, brings a libgomp of its own: the team is torch's all the same."""
    out = _in_a_process("""
        import sklearn.datasets
        from dse.formats import get
        from dse.train.loop import _run_settings
        parallel_operation_first()
        warnings.simplefilter("error")
        fmt = get("block(fp6_e2m3,size=32,scale=e4m3,tensor_scale=fp32)")
        x = torch.randn(4, 64, 512, generator=torch.Generator().manual_seed(0))
        x[3] *= 1e-38  # a member of subnormals and tiny normals
        with _run_settings(2):
            inside = unflushed()
            together = fmt.quantize_members(x)
            alone = torch.stack([fmt.quantize(x[g]) for g in range(4)])
        subnormal = int(((x[3] != 0) & (x[3].abs() < 2**-126)).sum())
        differ = int((together.view(torch.int32) != alone.view(torch.int32)).sum())
        libgomps = len({line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line})
        print(json.dumps({"inside": inside, "subnormal_inputs": subnormal, "differ": differ,
                          "libgomps": libgomps}))
    """)
    assert out["subnormal_inputs"] > 1000  # the case meets subnormals
    assert out["libgomps"] == 2
    assert out["inside"] == 0 and out["differ"] == 0


@pytest.mark.parametrize("history", ["none", "unflushed", "parallel operation first"])
@pytest.mark.parametrize("threads", [2, 4])
def test_train_flushes_on_every_thread_and_leaves_each_threads_setting_as_it_was(history: str,
                                                                                 threads: int) -> None:
    """During a real run at 2 threads and at 4 (a larger team than the process had: the threads it
    adds start from the caller's setting) no thread keeps a subnormal; afterwards every thread is as
    before: all unflushed where the process never flushed (before, a worker the run created stayed
    flushed), the caller flushing and its old worker not where the caller flushed after a parallel
    operation. History "none": the run is the process's first parallel operation (its workers start
    inside it); "unflushed": workers started before, nothing flushed."""
    out = _in_a_process(f"""
        from dse.train import TrainConfig, train
        threads, history = {threads}, {history!r}
        if history == "parallel operation first":
            parallel_operation_first()
            torch.set_flush_denormal(True)
        before = 1 << 20 if history == "none" else unflushed()  # (a fresh process: as the first test finds)
        seen = []

        class Watched(nn.Module):
            def __init__(self, width, classes):
                super().__init__()
                self.layer = nn.Linear(width, classes)

            def forward(self, x):
                seen.append(unflushed())
                return self.layer(x)

        train(TrainConfig(dataset="digits", epochs=1, batch_size=256, threads=threads),
              model=lambda shape, classes: Watched(shape[0], classes))
        print(json.dumps({{"before": before, "seen": sorted(set(seen)), "after": unflushed()}}))
    """)
    assert out["seen"] == [0]
    assert out["before"] == (1 << 19 if history == "parallel operation first" else 1 << 20)
    assert out["after"] == out["before"]


_NO_TEAM = {
    "no GNU OpenMP": "denormals._gnu_openmp_team = lambda: None",
    # torch's libgomp replaced on disk while mapped: /proc/self/maps reads "<path> (deleted)", which
    # does not open (train raised OSError before)
    "libgomp not openable": "denormals.ctypes.CDLL = lambda path, *a: (_ for _ in ()).throw(OSError(path))",
}


@pytest.mark.parametrize("history", ["fresh", "parallel operation first"])
@pytest.mark.parametrize("no_team", list(_NO_TEAM))
def test_where_no_team_can_be_started_a_probe_warns_once_where_threads_keep_denormals(history: str,
                                                                                      no_team: str) -> None:
    """Without the GNU OpenMP team (another OpenMP runtime, no OpenMP, a libgomp that cannot be
    opened): where torch's worker started unflushed the run cannot flush it, and one warning says so,
    not one per run; where flushing came before the first parallel operation (a fresh process) every
    thread flushes and nothing is said. Never an error."""
    out = _in_a_process(f"""
        from dse.train import denormals
        from dse.train.loop import _run_settings
        {_NO_TEAM[no_team]}
        if {history!r} != "fresh":
            parallel_operation_first()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with _run_settings(2):
                inside = unflushed()
            with _run_settings(2):
                pass
        caught = [(w.category.__name__, str(w.message)) for w in caught]
        print(json.dumps({{"inside": inside, "caught": caught}}))
    """)
    if history == "fresh":
        assert out["inside"] == 0 and out["caught"] == []
    else:
        assert out["inside"] == 1 << 19
        assert len(out["caught"]) == 1 and out["caught"][0][0] == "UnflushedThreadsWarning"
        assert "65536 of 131072 subnormals stayed at 2 threads (OpenMP)" in out["caught"][0][1]


def test_at_one_thread_no_team_starts_and_nothing_is_probed(monkeypatch: pytest.MonkeyPatch) -> None:
    """One thread costs what it cost before: the calling thread's setting, flushed for the run and
    back afterwards, and no OpenMP team or parallel probe."""
    from dse.train import denormals

    def forbidden(*args: object) -> None:
        raise AssertionError("called at one thread")

    monkeypatch.setattr(denormals, "_gnu_openmp_team", forbidden)
    monkeypatch.setattr(denormals, "_check_all_flush", forbidden)
    seen: list[bool] = []
    for caller in (False, True):
        torch.set_flush_denormal(caller)
        try:
            result = train(TrainConfig(model="mlp", dataset="digits", epochs=1, batch_size=256, threads=1),
                           model=lambda shape, classes: _Flushing(shape[0], classes, seen))
            assert not result.diverged
            assert denormals.flushes_denormals() == caller
        finally:
            torch.set_flush_denormal(False)
    assert seen and all(seen)


class _Flushing(nn.Module):
    """A linear layer that records whether the calling thread flushes denormals in each forward."""

    def __init__(self, width: int, classes: int, seen: list[bool]) -> None:
        super().__init__()
        self.layer = nn.Linear(width, classes)
        self.seen = seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from dse.train.denormals import flushes_denormals

        self.seen.append(flushes_denormals())
        return self.layer(x)
