"""The GPU check, prepared to run in one call on a machine with a CUDA device (under 9 minutes on an
H100, the steps' limits added up: `Plan.planned_s`), writing its tables under one folder:

    python benchmarks/gpu_check.py --out "$OUT"                  # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/check   # the same steps, tiny, on CPU

Four steps, most important first, each a process of its own within its own time limit plus what the
steps before it left unused, so that one slow step cannot eat the others' time, and all within
`Plan.planned_s` of the parent's start (a step past its limit is cut and says so; what it wrote so far
stays):
1. `grouped.md`: trials per second of the MNIST-1D MLP and CNN, one trial at a time and in groups of
   G = 1, 2, 4, 8, 16, 32, with the speed-up (benchmarks/grouped.py on the device; issue 16 asks for
   at least 10x at G = 32).
2. `alignment.md` (and `profile.md`): whether the device's GEMMs give other bits for an operand or
   output that starts off a 256-byte boundary (the proxies' grouped GEMM layouts as mm / addmm and
   bmm / baddbmm, each operand and the output moved 4 .. 128 bytes), which of those layouts run
   batched, what dse's alignment copies cost a grouped step (against `ALIGNMENT_BYTES` set so that
   nothing is padded or copied), whether a grouped convolution gives each member's own bits, and a
   grouped step's time by phase (torch.profiler).
3. `syncs.md`: host synchronisations per training step, alone and grouped, counted by torch's own
   CUDA sync debug mode (`torch.cuda.set_sync_debug_mode`) as the difference between an epoch of 2k
   batches and one of k: 0 on the device path. On the CPU the same count comes from the device path
   emulated on CPU tensors (`dse.formats.fast.device_path`, tests/support/host_syncs.py).
4. `cuda_tests.txt`: the tests that need a GPU (tests/test_cuda.py: every format bit for bit against
   the CPU path, every proxy trained reproducibly; the grouped-equals-alone checks on CUDA), which CI
   skips.
`summary.txt` names the machine and the versions and says how each step went; `steps.log` holds the
steps' own output. Seven files in all (`OUT_FILES`): the device tool brings back at most eight.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    import torch

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
OFFSETS_BYTES = (4, 8, 16, 32, 64, 128)
"""Where the alignment step moves an operand or output: bytes past its alignment (those under
`ALIGNMENT_BYTES` of the device: 4 .. 128 on a GPU, 4 .. 32 on the CPU)."""
STARTUP_S = 10
"""The parent process's own time: importing torch, starting CUDA to name the device, the summary."""
PHASES = ("forward", "loss", "backward", "step", "zero_grad")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What each step runs: the full check, or `--quick`'s tiny one (a test runs it on the CPU)."""

    sizes: str = "1,2,4,8,16,32"
    formats: str = "fp32,int8,fp8_e4m3,mxfp8_e4m3,lns8"
    epochs: int = 2
    rounds: int = 2
    train_samples: int | None = None
    align_members: int = 32
    align_models: tuple[str, ...] = ("mlp", "cnn")
    align_formats: tuple[str, ...] = ("fp32", "int8")
    align_steps: int = 20
    align_rounds: int = 3
    align_extra_shapes: tuple[tuple[int, int, int], ...] = ((1024, 1024, 1024), (32, 8192, 32))
    sync_batches: int = 4
    sync_methods: int = len(SYNC_METHODS)
    grouped_limit_s: int = 250
    alignment_limit_s: int = 60
    syncs_limit_s: int = 50
    tests_limit_s: int = 150
    tests: tuple[str, ...] = tuple(GPU_TESTS)

    def planned_s(self) -> int:
        """The whole check's longest run: every step at its limit, and the parent's own start."""
        return (STARTUP_S + self.grouped_limit_s + self.alignment_limit_s + self.syncs_limit_s
                + self.tests_limit_s)


QUICK = Plan(sizes="1,2", formats="int8", epochs=1, rounds=1, train_samples=200, align_members=2,
             align_formats=("int8",), align_steps=2, align_rounds=1, align_extra_shapes=(), sync_batches=2,
             sync_methods=2, grouped_limit_s=300, alignment_limit_s=300, syncs_limit_s=300,
             tests_limit_s=300, tests=("tests/test_cuda.py",))


def run_step(name: str, command: list[str], limit_s: int, log: Path) -> str:
    """Run one step as a subprocess within its limit, its output appended to `log`; a line saying how
    it went. The child's Python writes unbuffered: a step killed at its limit keeps every line it
    printed (pytest's -v lines into a file are otherwise held in an 8 KiB buffer that the kill loses)."""
    started = time.perf_counter()
    with log.open("a") as out:
        out.write(f"=== {name} (limit {limit_s} s): {' '.join(command)}\n")
        out.flush()
        try:
            code = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=limit_s,
                                  check=False, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
            how = f"exit {code}"
        except subprocess.TimeoutExpired:
            how = f"cut at its limit of {limit_s} s"
    return f"{name}: {how} after {time.perf_counter() - started:.0f} s -> {log.name}"


def step_limit_s(own_s: int, later_s: int, left_s: float) -> int:
    """A step's limit: its own, plus whatever the steps before it left unused (the time left beyond
    its own and the later steps' limits), never past the check's end (`left_s` from now). A parent
    slower to start than `STARTUP_S` takes its overrun from the later steps, the least important."""
    return int(min(left_s, max(own_s, left_s - later_s)))


class Table:
    """A markdown file written line by line, each appended as it comes, so that a step cut at its
    limit keeps every row it finished (a kill in the middle of rewriting the whole file would leave it
    empty); each line printed too."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text("")

    def add(self, *lines: str) -> None:
        with self.path.open("a") as file:
            file.write("".join(f"{line}\n" for line in lines))
        print("\n".join(lines), flush=True)


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


def sync_table(device: str, plan: Plan, out: Path) -> None:
    """`syncs.md` under `out`: host synchronisations per training step of the MNIST-1D MLP, alone and in
    a group of 2."""
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
    table = Table(out / "syncs.md")
    table.add(f"Host synchronisations per training step on {device} (MNIST-1D MLP, batch {batch}; an epoch "
              f"of {2 * k} batches against one of {k}; the second column counts the whole epoch of {k})", "",
              "| method | alone per step | alone epoch | grouped (G = 2) per step | grouped epoch |",
              "|---|---|---|---|---|")
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
        table.add(f"| {method} | " + " | ".join(cells) + " |")


# --- the alignment step ---------------------------------------------------------------------------


@contextmanager
def alignment_bytes_set(kind: str, value: int) -> Iterator[None]:
    """`ALIGNMENT_BYTES[kind]` set to `value` inside the block: 4 (an fp32 element) makes every
    operand's member stride a multiple of it, so nothing is padded or copied and no GEMM falls back
    member by member for a padded output (dse/train/batched_sums.py reads the table at each call)."""
    from dse.train.batched_sums import ALIGNMENT_BYTES

    saved = ALIGNMENT_BYTES[kind]
    ALIGNMENT_BYTES[kind] = value
    try:
        yield
    finally:
        ALIGNMENT_BYTES[kind] = saved


def placed(values: torch.Tensor, strides: Sequence[int], offset_bytes: int) -> torch.Tensor:
    """`values` copied into a fresh tensor of `strides` whose address is `offset_bytes` past a multiple
    of `alignment_bytes` (a fresh storage starts at one already: 512 bytes for torch's CUDA caching
    allocator, 64 for its CPU one; measured from the address all the same)."""
    import torch

    from dse.train.batched_sums import alignment_bytes

    align = alignment_bytes(values)
    extent = 1 + sum((size - 1) * stride for size, stride in zip(values.shape, strides, strict=True))
    storage = torch.empty(extent + align // values.element_size(), dtype=values.dtype, device=values.device)
    shift = (offset_bytes - storage.data_ptr()) % align // values.element_size()
    return storage.as_strided(tuple(values.shape), tuple(strides), shift).copy_(values)


def _bits_differ(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many elements of a and b differ in their bits."""
    import torch

    return int((a.contiguous().view(torch.int32) != b.contiguous().view(torch.int32)).sum())


@dataclasses.dataclass(frozen=True)
class GemmLayout:
    """A grouped GEMM as member_gemm calls it: a (G, m, k) @ b (G, k, n) (+ bias (G, n)), strides as met."""

    site: str
    a_shape: tuple[int, ...]
    a_strides: tuple[int, ...]
    b_shape: tuple[int, ...]
    b_strides: tuple[int, ...]
    bias: bool
    batched: bool | None  # what dse decided for it on this device (None: not met in a run)

    def name(self) -> str:
        members, m, k = self.a_shape
        n = self.b_shape[2]
        flags = "".join(["a^T" if self.a_strides[1] == 1 and m > 1 else "",
                         "b^T" if self.b_strides[1] == 1 and n > 1 else ""])
        return f"{m}x{k}x{n}{' ' + flags if flags else ''}{' +bias' if self.bias else ''}"


def met_layouts() -> list[GemmLayout]:
    """The grouped GEMM layouts member_gemm met in this process, with dse's decisions: each operand in
    the strides member_gemm ran and probed it in (a decision's key holds the layouts as given, and
    `at_alone_alignment` copies an operand whose members lie off the alignment into padded ones);
    only those decided at the alignment `ALIGNMENT_BYTES` now holds (not a timing's under
    `alignment_bytes_set`)."""
    import torch

    from dse.train.batched_sums import ALIGNMENT_BYTES, at_alone_alignment, decided

    def ran(layout: tuple[Any, ...], aligned: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
        device, dtype, shape, strides, *_ = layout
        if not aligned:
            return tuple(shape), tuple(strides)
        given = torch.empty_strided(shape, strides, dtype=dtype, device=device)
        return tuple(shape), tuple(at_alone_alignment(given).stride())

    found: dict[tuple[object, ...], GemmLayout] = {}
    for key, answer in decided().items():
        site, _, layouts, aligning = cast(tuple[str, object, tuple[tuple[Any, ...], ...], int], key)
        if site not in ("bmm", "baddbmm") or any(
                align != ALIGNMENT_BYTES["cpu" if device.type == "cpu" else "other"]
                for device, *_, align in layouts):
            continue
        (a_shape, a_strides), (b_shape, b_strides) = (ran(layouts[i], i < aligning) for i in range(2))
        layout = GemmLayout(str(site), tuple(a_shape), tuple(a_strides), tuple(b_shape), tuple(b_strides),
                            site == "baddbmm", answer)
        found.setdefault((layout.site, layout.a_shape, layout.a_strides, layout.b_shape, layout.b_strides),
                         layout)
    return list(found.values())


def gemm_bits_row(layout: GemmLayout, device: str, offsets: Sequence[int]) -> str:
    """One row of the bits table: for the member's own product (mm / addmm) and the batched one (bmm /
    baddbmm), which of the operands and output moved by `offsets` bytes change any bit (against all at
    offset 0, and 0 again: the library's own run-to-run agreement), and whether the batched product
    gives each member's own (what `sums_as_members`' probe asks)."""
    import torch

    from dse.train.batched_sums import empty_at_alone_alignment

    generator = torch.Generator().manual_seed(0)
    members = layout.a_shape[0]
    a = torch.randn(layout.a_shape, generator=generator).to(device)
    b = torch.randn(layout.b_shape, generator=generator).to(device)
    bias = torch.randn((members, layout.b_shape[2]), generator=generator).to(device)
    out_shape = (members, layout.a_shape[1], layout.b_shape[2])
    out_strides = empty_at_alone_alignment(out_shape[1:], members, a).stride()  # as member_gemm's output

    def own(shift: dict[str, int]) -> torch.Tensor:
        a_g = placed(a[0], layout.a_strides[1:], shift.get("a", 0))
        b_g = placed(b[0], layout.b_strides[1:], shift.get("b", 0))
        out = placed(torch.zeros(out_shape[1:], device=device), (out_shape[2], 1), shift.get("out", 0))
        return torch.addmm(bias[0], a_g, b_g, out=out) if layout.bias else torch.mm(a_g, b_g, out=out)

    def batched(shift: dict[str, int]) -> torch.Tensor:
        a_all = placed(a, layout.a_strides, shift.get("a", 0))
        b_all = placed(b, layout.b_strides, shift.get("b", 0))
        out = placed(torch.zeros(out_shape, device=device), out_strides, shift.get("out", 0))
        return torch.baddbmm(bias.unsqueeze(1), a_all, b_all, out=out) if layout.bias \
            else torch.bmm(a_all, b_all, out=out)

    cells = []
    for product in (own, batched):
        reference = product({}).clone()
        again = _bits_differ(product({}), reference)
        moved = []
        for where in ("a", "b", "out"):
            for offset in offsets:
                differ = _bits_differ(product({where: offset}), reference)
                if differ:
                    moved.append(f"{where}+{offset}: {differ}")
        cells += ["none" if again == 0 else str(again), "none" if not moved else "; ".join(moved)]
    together = batched({})
    members_differ = sum(_bits_differ(together[g], own_at(g, a, b, bias, layout)) for g in range(members))
    decided = {None: "-", True: "batched", False: "member by member"}[layout.batched]
    return (f"| {layout.name()} | {members} | " + " | ".join(cells)
            + f" | {'yes' if members_differ == 0 else f'no ({members_differ} differ)'} | {decided} |")


def own_at(g: int, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor, layout: GemmLayout) -> torch.Tensor:
    """Member g's own product on fresh operands (offset 0) in the member's strides."""
    import torch

    a_g = placed(a[g], layout.a_strides[1:], 0)
    b_g = placed(b[g], layout.b_strides[1:], 0)
    return torch.addmm(bias[g], a_g, b_g) if layout.bias else a_g @ b_g


Clock = Callable[[Callable[..., object], tuple[object, ...]], float]
Phases = list[Callable[[Any], Any]]


@dataclasses.dataclass(frozen=True)
class ConvCase:
    """One of the CNN's convolutions for G members: inputs (G, B, C, L), weights (G, O, C, k)."""

    x: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor
    dy: torch.Tensor
    stride: tuple[int, ...]
    padding: tuple[int, ...]

    def _backward(self, dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, groups: int
                  ) -> tuple[torch.Tensor, ...]:
        import torch

        return tuple(torch.ops.aten.convolution_backward(dy, x, w, [w.shape[0]], list(self.stride),
                                                         list(self.padding), [1], False, [0], groups,
                                                         [True, True, True]))

    def each(self, fresh: bool = True) -> list[tuple[torch.Tensor, ...]]:
        """Each member's forward and gradients (input, weight, bias), on fresh tensors as alone (not
        `fresh`: on the members' slices, as timed, so that 4 G copies do not count as convolutions)."""
        import torch.nn.functional as F

        def own(t: torch.Tensor) -> torch.Tensor:
            return t.clone() if fresh else t

        results = []
        for g in range(self.x.shape[0]):
            x, w = own(self.x[g]), own(self.w[g])
            results.append((F.conv1d(x, w, own(self.b[g]), self.stride, self.padding),
                            *self._backward(own(self.dy[g]), x, w, 1)))
        return results

    def grouped(self) -> tuple[torch.Tensor, ...]:
        """The same as one grouped convolution over the members' stacked channels."""
        import torch.nn.functional as F

        members, batch = self.x.shape[:2]
        x = self.x.transpose(0, 1).reshape(batch, -1, self.x.shape[-1])
        w = self.w.reshape(-1, *self.w.shape[2:])
        dy = self.dy.transpose(0, 1).reshape(batch, -1, self.dy.shape[-1])
        return (F.conv1d(x, w, self.b.reshape(-1), self.stride, self.padding, groups=members),
                *self._backward(dy, x, w, members))

    def differences(self) -> list[int]:
        """Elements of the grouped forward and gradients whose bits differ from the members' own."""
        together = self.grouped()
        outs, channels = self.w.shape[1], self.w.shape[2]
        differ = [0, 0, 0, 0]
        for g, own in enumerate(self.each()):
            parts = (together[0][:, g * outs:(g + 1) * outs], together[1][:, g * channels:(g + 1) * channels],
                     together[2][g * outs:(g + 1) * outs], together[3][g * outs:(g + 1) * outs])
            for i, (mine, theirs) in enumerate(zip(own, parts, strict=True)):
                differ[i] += _bits_differ(mine, theirs)
        return differ

    def tf32_changes(self) -> int:
        """Elements of member 0's forward whose bits cuDNN's TF32 setting changes (flipped, and back)."""
        import torch
        import torch.nn.functional as F

        conv = torch.backends.cudnn.conv  # per operation: a run leaves the legacy flag unreadable
        saved = conv.fp32_precision
        try:
            conv.fp32_precision = "ieee" if saved == "tf32" else "tf32"
            flipped = F.conv1d(self.x[0], self.w[0], self.b[0], self.stride, self.padding)
        finally:
            conv.fp32_precision = saved
        return _bits_differ(flipped, F.conv1d(self.x[0], self.w[0], self.b[0], self.stride, self.padding))


def conv_cases(device: str, members: int) -> list[ConvCase]:
    """The MNIST-1D CNN's convolutions at batch 100, on random data for `members` members."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from dse.data import load_dataset
    from dse.models.proxies import build_model

    data = load_dataset("mnist1d")
    model = build_model("cnn", data)
    convs = [layer for layer in model.modules() if isinstance(layer, nn.Conv1d)]
    shapes: list[tuple[int, ...]] = []
    hooks = [conv.register_forward_hook(lambda _, inputs, __: shapes.append(tuple(inputs[0].shape)))
             for conv in convs]
    model(data.x_train[:100])
    for hook in hooks:
        hook.remove()
    generator = torch.Generator().manual_seed(0)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device)

    cases = []
    for conv, (batch, channels, length) in zip(convs, shapes, strict=True):
        outs = conv.out_channels
        x, w = draw(members, batch, channels, length), draw(members, outs, channels, conv.kernel_size[0])
        y_length = F.conv1d(x[0], w[0], None, conv.stride, conv.padding).shape[-1]
        cases.append(ConvCase(x, w, draw(members, outs), draw(members, batch, outs, y_length), conv.stride,
                              cast(tuple[int, ...], conv.padding)))
    return cases


def conv_row(case: ConvCase, device: str, clock: Clock) -> str:
    members, batch, channels, length = case.x.shape
    outs, kernel = case.w.shape[1], case.w.shape[3]
    cells = " | ".join("yes" if d == 0 else f"no ({d})" for d in case.differences())
    each_ms = min(clock(case.each, (False,)) for _ in range(3)) * 1e3
    grouped_ms = min(clock(case.grouped, ()) for _ in range(3)) * 1e3
    tf32 = "-"
    if device.startswith("cuda"):
        changed = case.tf32_changes()
        tf32 = "no" if changed == 0 else f"yes ({changed} of {case.dy[0].numel()})"
    return (f"| {channels}->{outs}, k {kernel}, stride {case.stride[0]}, input {batch}x{channels}x{length} "
            f"| {cells} | {each_ms:.2f} | {grouped_ms:.2f} | {tf32} |")


def run_steps(phases: Phases, steps: int = 1) -> None:
    """`steps` training steps, each its phases in order."""
    for _ in range(steps):
        value: object = None
        for phase in phases:
            value = phase(value)


def cost_row(model: str, spec: str, phases: Phases, alone: Phases, lrs_differ: Phases, kind: str,
             plan: Plan, clock: Clock) -> str:
    """A grouped step with dse's alignment against ALIGNMENT_BYTES 4, one alone, and one of a group
    whose members' learning rates differ (step 2's table)."""
    run_steps(alone, 2)
    run_steps(lrs_differ, 2)
    with alignment_bytes_set(kind, 4):
        run_steps(phases, 2)  # the unaligned layouts' probes
    versions: dict[str, tuple[Phases, Callable[[], AbstractContextManager[None]]]] = {
        "alone": (alone, nullcontext), "dse": (phases, nullcontext),
        "unaligned": (phases, lambda: alignment_bytes_set(kind, 4)), "lrs": (lrs_differ, nullcontext)}
    best: dict[str, float] = {}
    for _ in range(plan.align_rounds):  # interleaved, so that whatever else runs hits each alike
        for version, (steps, setting) in versions.items():
            with setting():
                seconds = clock(run_steps, (steps, plan.align_steps))
            best[version] = min(best.get(version, seconds), seconds)
    counts = {}
    for version, (steps, setting) in versions.items():
        with setting():
            counts[version] = aten_ops(functools.partial(run_steps, steps))
    ms = {version: seconds / plan.align_steps * 1e3 for version, seconds in best.items()}
    ops = {version: f"{total} ({copies})" for version, (total, copies) in counts.items()}
    return (f"| {model} | {spec} | {ms['alone']:.2f} | {counts['alone'][0]} | {ms['dse']:.2f} | "
            f"{ms['unaligned']:.2f} | {ms['dse'] / ms['unaligned']:.2f} | {ops['dse']} | "
            f"{ops['unaligned']} | {ms['alone'] * plan.align_members / ms['dse']:.1f}x | {ms['lrs']:.2f} | "
            f"{ops['lrs']} |")


def alignment_tables(device: str, plan: Plan, out: Path) -> None:
    """`alignment.md` and `profile.md` under `out` (module docstring, step 2)."""
    import torch

    from dse.data import load_dataset
    from dse.train.batched_sums import ALIGNMENT_BYTES
    from dse.train.config import TrainConfig
    from dse.train.loop import _run_settings
    from dse.train.optim import DEFAULT_LR

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from grouped import BATCH, make_clock, method_fields, phase_steps

    kind = "cpu" if device == "cpu" else "other"
    align = ALIGNMENT_BYTES[kind]
    offsets = [offset for offset in OFFSETS_BYTES if offset < align]
    members = plan.align_members
    data = load_dataset("mnist1d")
    clock = make_clock(device)
    table = Table(out / "alignment.md")

    def steps_of(model: str, spec: str, size: int, lrs_differ: bool = False) -> Phases:
        config = TrainConfig(model=model, dataset="mnist1d", epochs=1, batch_size=BATCH["mnist1d"],
                             device=device, **method_fields(spec))  # type: ignore[arg-type]
        lr = DEFAULT_LR[config.optimizer] if config.lr is None else config.lr
        lrs = [lr * (1 + g / size) for g in range(size)] if lrs_differ else None
        return phase_steps(config, size, data, lrs)

    with _run_settings(1):
        matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
        table.add(f"GEMM bits against operand and output addresses on {device}: fp32, as a dse run sets it "
                  f"(cuda.matmul.allow_tf32 {matmul.allow_tf32}, float32_matmul_precision "
                  f"{torch.get_float32_matmul_precision()}, "
                  f"cudnn.conv.fp32_precision {cudnn.conv.fp32_precision}, "
                  f"cudnn.deterministic {cudnn.deterministic}, cudnn.benchmark {cudnn.benchmark}); "
                  f"ALIGNMENT_BYTES {align}", "")
        groups = {(model, spec): steps_of(model, spec, members) for model in plan.align_models
                  for spec in plan.align_formats}
        for phases in groups.values():  # each GEMM layout met (and probed) as a run meets it
            run_steps(phases, 2)
        layouts = met_layouts() + [GemmLayout("bmm", (4, m, k), (m * k, k, 1), (4, k, n), (k * n, n, 1),
                                              False, None) for m, k, n in plan.align_extra_shapes]
        table.add(
            f"Each product of the MNIST-1D MLP's and CNN's grouped steps (G = {members}, batch 100; "
            "m x k x n, a^T / b^T: that operand transposed), as a member computes it alone (mm / addmm) "
            "and as the group does (bmm / baddbmm): the elements whose bits change when one operand or the "
            f"output starts {', '.join(map(str, offsets))} bytes past the alignment (against all at 0), "
            "whether a second run at 0 changes any, whether the batched product gives each member's own, "
            "and what dse decided for the layout (probed: batched only where every bit agrees).", "",
            "| product | G | mm again: differ | mm moved: differ | bmm again: differ | bmm moved: differ "
            "| bmm = each member's mm | dse runs it |", "|---|---|---|---|---|---|---|---|")
        for layout in layouts:
            table.add(guarded(functools.partial(gemm_bits_row, layout, device, offsets), layout.name()))
        table.add(
            "", f"The MNIST-1D CNN's convolutions (batch 100, G = {members}): whether one grouped "
            "convolution (groups = G over the members' stacked channels) gives each member's own bits "
            "(forward, gradient of the input, of the weight, of the bias; elements differing), ms of G "
            "convolutions one after another and of the grouped one (forward and backward; best of 3), and "
            "whether cuDNN's TF32 "
            "(torch's default, which dse leaves on) changes a member's forward bits.", "",
            "| convolution | forward same | grad input same | grad weight same | grad bias same "
            "| G convolutions ms | grouped ms | TF32 changes bits |", "|---|---|---|---|---|---|---|---|")
        for case in conv_cases(device, members):
            table.add(guarded(functools.partial(conv_row, case, device, clock),
                              f"{tuple(case.x.shape)}, {tuple(case.w.shape)}"))
        clock_name = "wall time, synchronised" if kind == "other" else "CPU time"
        table.add(
            "", f"A grouped step (G = {members}, one batch of 100, built as benchmarks/grouped.py --phases "
            f"builds it) with dse's alignment (ALIGNMENT_BYTES {align}) against ALIGNMENT_BYTES 4 (nothing "
            "padded, copied or run member by member for alignment): ms per step, best of "
            f"{plan.align_rounds} rounds of {plan.align_steps} steps, interleaved ({clock_name}); aten "
            "operations per step (about a kernel launch each on a GPU: views not counted, an empty "
            "allocation launches none, a foreach several; profile.md counts the kernels) and the copies "
            "among them. Beside it one trial alone, the per-step speed-up (alone x G / group), and the group "
            "with each member's learning rate its own (lr x (1 + g / G)), as a sweep over learning rates "
            "groups its trials (dse, ms and operations).", "",
            "| model | format | alone ms | alone ops | group ms, dse | group ms, unaligned | dse / unaligned "
            "| group ops (copies), dse | group ops (copies), unaligned | step speed-up, dse "
            "| group ms, lrs differ | group ops (copies), lrs differ |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|")
        for (model, spec), phases in groups.items():
            def row(model: str = model, spec: str = spec, phases: Phases = phases) -> str:
                return cost_row(model, spec, phases, steps_of(model, spec, 0),
                                steps_of(model, spec, members, lrs_differ=True), kind, plan, clock)
            table.add(guarded(row, f"{model} | {spec}"))
        try:
            profile_table(device, plan, {key: phases for key, phases in groups.items() if key[1] != "fp32"},
                          out / "profile.md")
        except Exception as error:  # (said after what it wrote, as a row is)
            with (out / "profile.md").open("a") as file:
                file.write(f"torch.profiler failed: {_first_line(error)}\n")


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def guarded(row: Callable[[], str], what: str) -> str:
    """`row()`, or where it fails (a library refusing a layout, say) a row that names what and why: the
    step goes on to its other rows and tables, which its one process and limit would otherwise lose."""
    try:
        return row()
    except Exception as error:
        return f"| {what} | failed: {_first_line(error)} |"


def aten_ops(run: Callable[[], None]) -> tuple[int, int]:
    """The aten operations `run` makes (views not counted: no kernel) and the copies among them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = [0, 0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                               kwargs: dict[str, Any] | None = None) -> Any:
            result = func(*args, **(kwargs or {}))
            if not _is_view(func):
                counts[0] += 1
                counts[1] += func.overloadpacket.__name__ in ("copy_", "clone", "_to_copy", "contiguous")
            return result

    with Count():
        run()
    return counts[0], counts[1]


def _is_view(func: Any) -> bool:
    schema = func._schema
    return bool(schema.returns) and all(r.alias_info is not None and not r.alias_info.is_write
                                        for r in schema.returns)


def profile_table(device: str, plan: Plan, groups: dict[tuple[str, str], list[Callable[[Any], Any]]],
                  path: Path) -> None:
    """`profile.md`: two grouped steps under torch.profiler (CPU, and CUDA on a GPU), per phase the
    host's time and the device's kernels' time, the device's busy share of the wall time (near 1:
    device-bound, so larger groups gain little; far below: launch-bound), and the operations that take
    the most host and device time.

    A device's events are its kernels, copies and fills, not the `gpu_user_annotation` spans that a
    `record_function` range also gets on the device (they span the range's kernels and the gaps
    between them: counted, the busy share passes 100% of a launch-bound step). A phase's kernels are
    those launched while its range is open on the host, from any thread: backward's run on autograd's
    device thread, outside the range's own tree of host events."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    steps = 2
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    table = Table(path)
    table.add(f"A grouped step (G = {plan.align_members}, batch 100) under torch.profiler on {device}, "
              f"{steps} steps, ms per step (the profiler's own overhead included: alignment.md has the "
              "step's time unprofiled). Per phase the host's time in it and the device time of the kernels "
              "launched in it; the device's busy share of the wall time: near 100% device-bound, far below "
              "it launch-bound (a larger group then costs little more per step).", "")
    for (model, spec), phases in groups.items():
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                value: object = None
                for name, phase in zip(PHASES, phases, strict=True):
                    with record_function(f"phase:{name}"):
                        value = phase(value)
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            ended = time.perf_counter()  # (leaving the block parses the trace: not the steps' time)
        wall_ms = (ended - started) * 1e3 / steps
        host_us, device_us, on_device = profiled_phases(prof.events())
        busy_ms = sum(event.time_range.elapsed_us() for event in on_device) / 1e3 / steps
        cells = [f"{host_us[name] / 1e3 / steps:.2f} / {device_us[name] / 1e3 / steps:.2f}"
                 for name in PHASES]
        busy = (f", device busy {busy_ms:.2f} ms ({busy_ms / wall_ms:.0%}), {len(on_device) / steps:.0f} "
                "kernels, copies and fills per step") if on_device else ""
        table.add(f"### {model}, {spec}", "", f"wall {wall_ms:.2f} ms per step (profiled){busy}", "",
                  "| " + " | ".join(f"{name}: host / device ms" for name in PHASES) + " |",
                  "|" + "---|" * len(PHASES), "| " + " | ".join(cells) + " |", "")
        averages = [event for event in prof.key_averages() if not event.key.startswith("phase:")
                    and not getattr(event, "is_user_annotation", False)]
        for title, key, host_side in (("host", "self_cpu_time_total", True),
                                      ("device", "self_device_time_total", False)):
            mine = [event for event in averages if (event.device_type == DeviceType.CPU) == host_side]
            top = [event for event in sorted(mine, key=lambda event: -getattr(event, key))[:8]
                   if getattr(event, key) > 0]
            if top:
                table.add(f"Most {title} time (self, ms per step; calls per step): " + "; ".join(
                    f"{event.key} {getattr(event, key) / 1e3 / steps:.3f} ({event.count / steps:g})"
                    for event in top), "")


def profiled_phases(events: Sequence[Any]) -> tuple[dict[str, float], dict[str, float], list[Any]]:
    """From a profile's events (`profile.events()`): each phase's host microseconds (its
    `phase:NAME` ranges on the host), the device microseconds of the kernels launched while it was
    open, from any thread, and the device's own events (kernels, copies, fills), without the
    `gpu_user_annotation` spans a range also gets on the device (`profile_table`)."""
    from torch.autograd import DeviceType

    on_host = [event for event in events if event.device_type == DeviceType.CPU]
    on_device = [event for event in events if event.device_type != DeviceType.CPU
                 and not getattr(event, "is_user_annotation", False) and not event.name.startswith("phase:")]
    ranges = [event for event in on_host if event.name.startswith("phase:")]
    host_us = dict.fromkeys(PHASES, 0.0)
    device_us = dict.fromkeys(PHASES, 0.0)
    for event in ranges:
        host_us[event.name.removeprefix("phase:")] += event.time_range.elapsed_us()
    for event in on_host:
        kernels = [kernel for kernel in event.kernels if not kernel.name.startswith("phase:")]
        if event.name.startswith("phase:") or not kernels:
            continue
        for phase_range in ranges:
            if phase_range.time_range.start <= event.time_range.start <= phase_range.time_range.end:
                device_us[phase_range.name.removeprefix("phase:")] += sum(k.duration for k in kernels)
                break
    return host_us, device_us, on_device


STEPS_INSIDE: dict[str, Callable[[str, Plan, Path], None]] = {"alignment": alignment_tables,
                                                               "syncs": sync_table}
"""The steps that run as this script in a process of their own (`--inside`), writing under `--out`."""


STEP_NAMES = ("grouped", "alignment", "syncs", "tests")
OUT_FILES = ("summary.txt", "steps.log", "grouped.md", "alignment.md", "profile.md", "syncs.md",
             "cuda_tests.txt")
"""Everything the check writes under --out: the device tool brings back at most 8 files from $OUT."""


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()  # the check's end is measured from here: the parent's start counts
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu, with --quick, to test it")
    parser.add_argument("--quick", action="store_true", help="tiny settings: a minute on the CPU")
    parser.add_argument("--out", type=Path, required=True, help="folder for the tables (created)")
    parser.add_argument("--steps", default="grouped,alignment,syncs,tests",
                        help="which steps (default all four)")
    parser.add_argument("--inside", choices=sorted(STEPS_INSIDE), default=None,
                        help=argparse.SUPPRESS)  # one step, in this process: how the check runs it
    args = parser.parse_args(argv)
    wanted = set(args.steps.split(","))
    if wanted - set(STEP_NAMES):
        parser.error(f"--steps: no step {', '.join(sorted(wanted - set(STEP_NAMES)))} (the steps: "
                     f"{', '.join(STEP_NAMES)})")
    plan = QUICK if args.quick else Plan()
    out: Path = args.out.resolve()  # (the steps run in the repository's root)
    out.mkdir(parents=True, exist_ok=True)
    if args.inside is not None:
        STEPS_INSIDE[args.inside](args.device, plan, out)
        return 0
    deadline = started + plan.planned_s()
    print(f"The GPU check: at most {plan.planned_s()} s, every step at its limit", flush=True)
    python = sys.executable
    inside = [[python, str(Path(__file__).resolve()), "--inside", step, "--device", args.device, "--out",
               str(out), *(["--quick"] if args.quick else [])] for step in ("alignment", "syncs")]
    grouped = [python, "benchmarks/grouped.py", "--device", args.device, "--datasets", "mnist1d", "--models",
               "mlp,cnn", "--sizes", plan.sizes, "--formats", plan.formats, "--epochs", str(plan.epochs),
               "--rounds", str(plan.rounds), "--out", str(out / "grouped.md"),
               *(["--train-samples", str(plan.train_samples)] if plan.train_samples else [])]
    # the GPU tests: only those that need a GPU (each names cuda; the files' CPU tests ran in CI), one
    # line a test as it ends (-v), so that a run cut at its limit still says which passed
    tests = [python, "-m", "pytest", "-v", "-p", "no:randomly", "-rs", "--durations=5", "-k", "cuda",
             *plan.tests]
    steps = [(name, command, limit_s, log) for key, name, command, limit_s, log in (
        ("grouped", "grouped speed", grouped, plan.grouped_limit_s, "steps.log"),
        ("alignment", "alignment", inside[0], plan.alignment_limit_s, "steps.log"),
        ("syncs", "syncs", inside[1], plan.syncs_limit_s, "steps.log"),
        ("tests", "GPU tests", tests, plan.tests_limit_s, "cuda_tests.txt")) if key in wanted]

    import torch

    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    for name in ("steps.log", "cuda_tests.txt"):  # (appended to by the steps)
        (out / name).unlink(missing_ok=True)
    summary = Table(out / "summary.txt")  # (written after each step: a call cut short keeps it)
    summary.add(f"{device_name}; torch {torch.__version__}, CUDA {torch.version.cuda}; parent started in "
                f"{time.monotonic() - started:.0f} s")
    for index, (name, command, own_s, log) in enumerate(steps):
        limit_s = step_limit_s(own_s, sum(step[2] for step in steps[index + 1:]), deadline - time.monotonic())
        if limit_s < 1:
            summary.add(f"{name}: not run, the check's {plan.planned_s()} s are spent")
            continue
        summary.add(run_step(name, command, limit_s, out / log))
    for name in ("grouped.md", "alignment.md", "profile.md", "syncs.md"):
        if (out / name).exists():
            print(f"\n{name}:\n{(out / name).read_text()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
