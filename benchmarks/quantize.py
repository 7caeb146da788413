"""Quantize speed: dse number formats side by side with peers and a preallocated copy.

For each family (fp, int/fixed, p3109, posit, lns, block: MX and NVFP4) this quantizes float32
`randn(N)` with every dse spec and with the peer libraries that implement the same format, on the
CPU, once with one torch thread and once with torch's default thread count. It prints elements/s
(median of --repeat runs on the same input, after one warm-up run), the dse/peer speed ratio, the
slowdown against `copy_` into a preallocated tensor (the memory bound), and how many in-range
outputs of each peer differ from dse's (only where the semantics match; a fast but wrong peer is
visible that way).

Peers are optional: install them into a separate venv (see benchmarks/requirements.txt) and run

    .venv-bench/bin/python benchmarks/quantize.py                 # text tables
    .venv-bench/bin/python benchmarks/quantize.py --markdown      # + the Markdown table for the README

    .venv/bin/python benchmarks/quantize.py --small               # per-call cost on small tensors

A peer that fails to import is listed as unavailable with a one-line reason. qtorch and
qtorch-plus JIT-compile C++ extensions of the same name (quant_cpu); each gets its own
TORCH_EXTENSIONS_DIR (under the venv). If the second one cannot be loaded next to the first, it is
measured in a child process (forced with --isolate qtorch-plus), and the output says so.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    import dse.formats as formats

    DSE_ERROR = ""
except Exception as _error:  # noqa: BLE001  (report it, and still measure copy_ and the peers)
    formats = None  # type: ignore[assignment]
    DSE_ERROR = f"{type(_error).__name__}: {_error}"

Fn = Callable[[torch.Tensor], torch.Tensor]
FAMILIES = ("fp", "int", "p3109", "posit", "lns", "block")
COPY_TARGET = {"posit": 20.0}  # allowed slowdown against copy_; every other family: 10x
DEFAULT_COPY_TARGET = 10.0
DEFAULT_THREADS = torch.get_num_threads()


# --- peers ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def quiet() -> Any:
    """Silence a noisy import at the file-descriptor level (JIT build logs, CUDA-library warnings)."""
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+") as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = os.dup(1), os.dup(2)
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _extensions_dir(lib: str) -> str:
    base = os.environ.get("QUANTIZE_BENCH_EXTENSIONS_DIR") or str(Path(sys.prefix) / "torch_extensions")
    return str(Path(base) / lib)


def _jit_import(lib: str, module: str, other: str) -> Any:
    """Import a qtorch-style package whose first import JIT-builds `quant_cpu`, in its own build dir.

    When `other` (the clashing package) is already loaded, torch renames this build quant_cpu_v1;
    that build gets a directory of its own too, so neither order rebuilds the other's cache.
    """
    after = f"-after-{other.split('.')[0]}" if other in sys.modules else ""
    os.environ["TORCH_EXTENSIONS_DIR"] = _extensions_dir(lib + after)
    # torch's JIT looks for ninja on PATH; the venv's bin holds the pip-installed one.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    import importlib

    return importlib.import_module(module)


def _load_torchao() -> Any:
    from torchao.prototype import custom_fp_utils
    from torchao.prototype.mx_formats.mx_tensor import MXTensor
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    return {"MXTensor": MXTensor, "floatx": custom_fp_utils, "NVFP4Tensor": NVFP4Tensor,
            "per_tensor_amax_to_scale": per_tensor_amax_to_scale}


def _load_gfloat() -> Any:
    import gfloat
    import gfloat.formats
    import gfloat.types

    return gfloat


def _load_brevitas() -> Any:
    import brevitas.nn
    import brevitas.quant
    from brevitas.inject.enum import StatsOp

    return {"nn": brevitas.nn, "quant": brevitas.quant, "StatsOp": StatsOp}


LOADERS: dict[str, Callable[[], Any]] = {
    "torch": lambda: torch,
    "numpy": lambda: np,
    "ml_dtypes": lambda: __import__("ml_dtypes"),
    "qtorch": lambda: _jit_import("qtorch", "qtorch.quant", "qtorch_plus.quant"),
    "qtorch-plus": lambda: _jit_import("qtorch_plus", "qtorch_plus.quant", "qtorch.quant"),
    "torchao": _load_torchao,
    "gfloat": _load_gfloat,
    "brevitas": _load_brevitas,
    "universal-dtypes": lambda: __import__("universal_dtypes"),
}
CLASHES = {"qtorch-plus": "qtorch", "qtorch": "qtorch-plus"}  # both build an extension named quant_cpu
# single-threaded whatever torch's thread count
NUMPY_LIBS = {"numpy", "ml_dtypes", "universal-dtypes", "gfloat"}


class Libraries:
    def __init__(self, isolate: set[str]) -> None:
        self.modules: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.isolated: dict[str, str] = {}  # lib -> why it runs in a child process
        self.load_seconds: dict[str, float] = {}
        self.forced = isolate

    def get(self, lib: str) -> Any | None:
        if lib in self.modules or lib in self.errors or lib in self.isolated:
            return self.modules.get(lib)
        if lib in self.forced:
            self.isolated[lib] = "asked for with --isolate"
            return None
        start = time.perf_counter()
        try:
            with quiet():
                self.modules[lib] = LOADERS[lib]()
        except Exception as error:  # noqa: BLE001  (any import failure makes the peer unavailable)
            reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
            other = CLASHES.get(lib)
            if other in self.modules:
                self.isolated[lib] = f"it does not load next to {other} ({reason})"
            else:
                self.errors[lib] = reason
            return None
        self.load_seconds[lib] = time.perf_counter() - start
        return self.modules[lib]


def _np_roundtrip(dtype: Any) -> Fn:
    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(x.numpy().astype(dtype).astype(np.float32))
    return run


def _torch_cast(dtype: torch.dtype) -> Fn:
    return lambda x: x.to(dtype).float()


def _qtorch_float(e: int, m: int) -> Callable[[Any], Fn]:
    return lambda q: lambda x: q.float_quantize(x, e, m, "nearest")


def _floatx(e: int, m: int) -> Callable[[Any], Fn]:
    def make(ao: Any) -> Fn:
        fx = ao["floatx"]
        return lambda x: fx._floatx_unpacked_to_f32(fx._f32_to_floatx_unpacked(x, e, m), e, m)
    return make


def _mx_torchao(dtype: torch.dtype) -> Callable[[Any], Fn]:
    def make(ao: Any) -> Fn:
        return lambda x: ao["MXTensor"].to_mx(x, dtype, 32).dequantize(torch.float32)
    return make


def _nvfp4_torchao(two_level: bool) -> Callable[[Any], Fn]:
    """torchao's NVFP4Tensor (rows of 64, blocks of 16 along them), quantize + dequantize; two-level
    with `per_tensor_amax_to_scale(max|x|)`, as dse's nvfp4."""
    def make(ao: Any) -> Fn:
        def run(x: torch.Tensor) -> torch.Tensor:
            rows = x.view(-1, 64)
            scale = ao["per_tensor_amax_to_scale"](rows.abs().amax()) if two_level else None
            quantized = ao["NVFP4Tensor"].to_nvfp4(rows, per_tensor_scale=scale)
            return quantized.dequantize(torch.float32).view(x.shape)
        return run
    return make


def _gfloat_round(format_info: str, *args: Any, sat: bool = False) -> Callable[[Any], Fn]:
    """gfloat.round_ndarray (numpy, float64) onto gfloat.formats.<format_info>(*args), ties to even."""
    def make(gf: Any) -> Fn:
        info = getattr(gf.formats, format_info)
        info = info(*args) if args else info
        mode = gf.RoundMode.TiesToEven

        def run(x: torch.Tensor) -> torch.Tensor:
            rounded = gf.round_ndarray(info, x.numpy().astype(np.float64), mode, sat)
            return torch.from_numpy(rounded.astype(np.float32))
        return run
    return make


def _brevitas(quant_name: str, *, absmax: bool = False, mx: bool = False) -> Callable[[Any], Fn]:
    """A QuantIdentity. absmax: the per-tensor scale comes from max|x| of every call (train mode)."""
    def make(bv: Any) -> Fn:
        quant = getattr(bv["quant"], quant_name)
        kwargs: dict[str, Any] = {"return_quant_tensor": False}
        if absmax:
            quant = type(f"{quant_name}AbsMax", (quant,),
                         {"scaling_stats_op": bv["StatsOp"].MAX, "collect_stats_steps": 10**9})
        if mx:
            kwargs["group_dim"] = 1
        module = bv["nn"].QuantIdentity(act_quant=quant, **kwargs)
        module.train(absmax)

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return module(x.view(-1, 32) if mx else x).reshape(x.shape)
        return run
    return make


def _qtorch_plus_posit(n: int, es: int) -> Callable[[Any], Fn]:
    return lambda q: lambda x: q.posit_quantize(x, n, es, rounding="nearest")


def _fake_quant(fmt_spec: str, pow2: bool) -> Callable[[Any], Fn]:
    """torch.fake_quantize_per_tensor_affine with dse's scale rule, scale computation included."""
    def make(_torch: Any) -> Fn:
        qmax = float(formats.get(fmt_spec).max) if formats is not None else 127.0
        zero = torch.zeros((), dtype=torch.int32)

        def run(x: torch.Tensor) -> torch.Tensor:
            scale = x.abs().amax() / qmax
            if pow2:
                scale = torch.exp2(torch.ceil(torch.log2(scale)))
            return torch.fake_quantize_per_tensor_affine(x, scale, zero, -int(qmax) - 1, int(qmax))
        return run
    return make


def _fixed_fake_quant(scale: float, qmin: int, qmax: int) -> Callable[[Any], Fn]:
    return lambda _torch: lambda x: torch.fake_quantize_per_tensor_affine(x, scale, 0, qmin, qmax)


@dataclass
class Peer:
    lib: str
    label: str
    make: Callable[[Any], Fn]
    compare: bool = True  # same semantics as the dse spec on in-range inputs
    note: str = ""


@dataclass
class Case:
    family: str
    spec: str
    peers: list[Peer] = field(default_factory=list)


def cases() -> list[Case]:
    np_ = _np_roundtrip
    ml = lambda name: lambda m: np_(getattr(m, name))  # noqa: E731
    ud = lambda name: lambda u: np_(getattr(u, name))  # noqa: E731
    qf = _qtorch_float
    ties = "qtorch rounds ties away from zero"
    return [
        Case("fp", "fp8_e4m3", [
            Peer("torch", ".to(float8_e4m3fn)", lambda _: _torch_cast(torch.float8_e4m3fn)),
            Peer("ml_dtypes", "float8_e4m3fn", ml("float8_e4m3fn")),
            Peer("qtorch", "float_quantize(4,3)", qf(4, 3), note=ties),
            Peer("torchao", "floatx(4,3)", _floatx(4, 3)),
            Peer("gfloat", "round_ndarray(ocp_e4m3)", _gfloat_round("format_info_ocp_e4m3", sat=True)),
            Peer("brevitas", "Fp8e4m3OCPActPerTensorFloat", _brevitas("Fp8e4m3OCPActPerTensorFloat"),
                 compare=False, note="per-tensor scaled (eval)"),
        ]),
        Case("fp", "fp8_e5m2", [
            Peer("torch", ".to(float8_e5m2)", lambda _: _torch_cast(torch.float8_e5m2)),
            Peer("ml_dtypes", "float8_e5m2", ml("float8_e5m2")),
            Peer("qtorch", "float_quantize(5,2)", qf(5, 2), note=ties),
            Peer("torchao", "floatx(5,2)", _floatx(5, 2)),
        ]),
        Case("fp", "bf16", [
            Peer("torch", ".to(bfloat16)", lambda _: _torch_cast(torch.bfloat16)),
            Peer("ml_dtypes", "bfloat16", ml("bfloat16")),
            Peer("qtorch", "float_quantize(8,7)", qf(8, 7), note=ties),
        ]),
        Case("fp", "fp16", [
            Peer("torch", ".to(float16)", lambda _: _torch_cast(torch.float16)),
            Peer("numpy", "astype(float16)", lambda _: np_(np.float16)),
            Peer("qtorch", "float_quantize(5,10)", qf(5, 10), note=ties),
        ]),
        Case("fp", "fp6_e2m3", [
            Peer("ml_dtypes", "float6_e2m3fn", ml("float6_e2m3fn")),
            Peer("qtorch", "float_quantize(2,3)", qf(2, 3), note=ties),
            Peer("torchao", "floatx(2,3)", _floatx(2, 3)),
        ]),
        Case("fp", "fp4_e2m1", [
            Peer("ml_dtypes", "float4_e2m1fn", ml("float4_e2m1fn")),
            Peer("qtorch", "float_quantize(2,1)", qf(2, 1), note=ties),
            Peer("torchao", "floatx(2,1)", _floatx(2, 1)),
        ]),
        Case("fp", "fp(e=5,m=2)", [
            Peer("torch", ".to(float8_e5m2)", lambda _: _torch_cast(torch.float8_e5m2)),
            Peer("qtorch", "float_quantize(5,2)", qf(5, 2), note=ties),
        ]),
        Case("int", "int8", [
            Peer("torch", "fake_quantize_per_tensor_affine", _fake_quant("int8", pow2=False)),
            Peer("brevitas", "Int8ActPerTensorFloat (max stats)",
                 _brevitas("Int8ActPerTensorFloat", absmax=True), compare=False,
                 note="own scale convention"),
        ]),
        Case("int", "fixed(8,4)", [
            Peer("torch", "fake_quantize(1/16)", _fixed_fake_quant(1 / 16, -128, 127)),
            Peer("qtorch", "fixed_point_quantize(8,4)",
                 lambda q: lambda x: q.fixed_point_quantize(x, 8, 4, rounding="nearest"),
                 note="qtorch double-rounds in float32"),
            Peer("universal-dtypes", "fixpnt8", ud("fixpnt8")),
        ]),
        Case("int", "int8(pow2=1)", [
            Peer("torch", "fake_quantize, pow2 scale", _fake_quant("int8(pow2=1)", pow2=True)),
        ]),
        Case("posit", "posit(8,0)", [
            Peer("qtorch-plus", "posit_quantize(8,0)", _qtorch_plus_posit(8, 0)),
            Peer("universal-dtypes", "posit8e0", ud("posit8e0")),
        ]),
        Case("posit", "posit8", [
            Peer("qtorch-plus", "posit_quantize(8,2)", _qtorch_plus_posit(8, 2)),
            Peer("universal-dtypes", "posit8", ud("posit8")),
        ]),
        Case("posit", "posit(16,1)", [
            Peer("qtorch-plus", "posit_quantize(16,1)", _qtorch_plus_posit(16, 1)),
            Peer("universal-dtypes", "posit16e1", ud("posit16e1")),
        ]),
        Case("posit", "posit16", [
            Peer("qtorch-plus", "posit_quantize(16,2)", _qtorch_plus_posit(16, 2)),
            Peer("universal-dtypes", "posit16", ud("posit16")),
        ]),
        # qtorch-plus handles nsize <= 16 only: posit_quantize(x, 32, 2) calls exit(1) in its C++.
        Case("posit", "posit32", [
            Peer("universal-dtypes", "posit32", ud("posit32")),
        ]),
        # dse's LNS scales per tensor by default; universal's lns16 is the unscaled lns(16,gamma=256).
        Case("lns", "lns8", []),
        Case("lns", "lns(16,gamma=256)", []),
        Case("lns", "lns(16,gamma=256,scale=none)", [
            Peer("universal-dtypes", "lns16 = lns<16,8>", ud("lns16")),
        ]),
        Case("p3109", "p3109(8,3)", [
            Peer("gfloat", "round_ndarray(p3109(8,3))", _gfloat_round("format_info_p3109", 8, 3)),
        ]),
        Case("p3109", "p3109(8,4)", [
            Peer("gfloat", "round_ndarray(p3109(8,4))", _gfloat_round("format_info_p3109", 8, 4)),
        ]),
        Case("block", "mxfp8_e4m3", [
            Peer("torchao", "MXTensor.to_mx+dequantize", _mx_torchao(torch.float8_e4m3fn)),
            Peer("brevitas", "MXFloat8e4m3Act", _brevitas("MXFloat8e4m3Act", mx=True)),
        ]),
        Case("block", "mxfp4", [
            Peer("torchao", "MXTensor.to_mx+dequantize", _mx_torchao(torch.float4_e2m1fn_x2)),
        ]),
        Case("block", "mxfp4(block=16)", []),
        Case("block", "nvfp4", [
            Peer("torchao", "NVFP4Tensor two-level", _nvfp4_torchao(two_level=True)),
        ]),
        Case("block", "nvfp4(tensor_scale=none)", [
            Peer("torchao", "NVFP4Tensor one-level", _nvfp4_torchao(two_level=False)),
        ]),
        Case("block", "block(fp6_e2m3,size=16,scale=ue5m3)", []),
        Case("block", "mxint8", [
            Peer("brevitas", "MXInt8Act", _brevitas("MXInt8Act", mx=True),
                 note="brevitas' MXInt8 scale/clamp rule is not OCP's (dse follows OCP and gfloat)"),
        ]),
    ]


# --- measurement ------------------------------------------------------------------------------------

@dataclass
class Row:
    family: str
    spec: str
    impl: str  # "dse", "copy_" or the peer's lib
    label: str
    size: int
    threads: str
    rate: float | None = None  # elements/s
    runs: int = 0
    mismatches: int | None = None  # in-range outputs that differ from dse's
    compared: int | None = None
    note: str = ""
    child: bool = False
    copy_rate: float | None = None  # dse rows: copy_ measured in the same rounds
    others: float | None = None  # copy_ rows: CPU share other processes used during the block


def in_range(fmt: Any, x: torch.Tensor) -> torch.Tensor:
    """Inputs where unscaled formats neither overflow nor underflow (scaled formats: everything finite)."""
    if fmt.scaling.kind != "none":
        return torch.isfinite(x)
    mag = x.abs()
    return (mag <= fmt.max) & ((mag >= fmt.min_positive) | (mag == 0))


def count_mismatches(ref: torch.Tensor, out: torch.Tensor, mask: torch.Tensor) -> int:
    a = ref.float().reshape(-1)[mask]
    b = out.float().reshape(-1)[mask]
    return int(((a != b) & ~(torch.isnan(a) & torch.isnan(b))).sum())


def set_threads(threads: str) -> None:
    torch.set_num_threads(DEFAULT_THREADS if threads == "default" else int(threads))


class Timed:
    """One implementation in a round-robin measurement: a row, its callable and its samples."""

    def __init__(self, row: Row, fn: Fn) -> None:
        self.row, self.fn = row, fn
        self.samples: list[float] = []
        self.warm = 0.0

    def run(self, x: torch.Tensor) -> None:
        start = time.perf_counter()
        self.fn(x)
        self.samples.append(time.perf_counter() - start)

    def finish(self, size: int) -> None:
        seconds = statistics.median(self.samples) if self.samples else self.warm
        self.row.rate = size / seconds if seconds > 0 else None
        self.row.runs = len(self.samples) or 1


def round_robin(timed: list[Timed], x: torch.Tensor, repeat: int, budget: float) -> None:
    """Time every implementation `repeat` times, interleaved (one run of each per round), so that load
    from other processes and clock drift hit all of them alike. An implementation drops out once its
    runs add up to `budget` seconds; one whose warm-up run alone took longer reports that run."""
    active = [t for t in timed if t.warm <= budget]
    for _ in range(repeat):
        for t in active:
            t.run(x)
        active = [t for t in active if sum(t.samples) < budget]
        if not active:
            break
    for t in timed:
        t.finish(x.numel())


class CpuMeter:
    """Share of the machine's CPU time that other processes used while a block was measured."""

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        try:
            fields = [float(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0.0)) / tick
        own = sum(os.times()[:4])
        return busy, own, time.monotonic()

    def others(self) -> float | None:
        end = self._read()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return None
        busy, own, wall = (e - s for e, s in zip(end, self.start, strict=True))
        return max(0.0, (busy - own) / (wall * (os.cpu_count() or 1)))


def wait_for_idle(limit: float, share: float = 0.2) -> float | None:
    """Wait up to `limit` seconds for a 2-second window in which other processes use < `share` of the
    CPUs; returns the last window's share (None where /proc/stat is unreadable)."""
    deadline = time.monotonic() + limit
    while True:
        meter = CpuMeter()
        time.sleep(2.0)
        others = meter.others()
        if others is None or others < share or time.monotonic() >= deadline:
            return others


def dse_callable(case: Case, x: torch.Tensor, threads: str) -> tuple[Row, Any]:
    """dse's row and format for one spec, or a row that says why it is unavailable."""
    row = Row(case.family, case.spec, "dse", case.spec, x.numel(), threads)
    if formats is None:
        row.note = "unavailable (import dse.formats failed)"
        return row, None
    try:
        fmt = formats.get(case.spec)
        row.label = fmt.spec
        return row, fmt
    except Exception as error:  # noqa: BLE001
        row.note = f"failed: {type(error).__name__}: {first_line(error)}"
        return row, None


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:160] if text else ""


def warm_up(t: Timed, x: torch.Tensor) -> torch.Tensor | None:
    """The first (untimed for the median) run; its output is what the agreement check compares."""
    try:
        start = time.perf_counter()
        out = t.fn(x)
        t.warm = time.perf_counter() - start
        return out
    except Exception as error:  # noqa: BLE001
        t.row.note = f"failed: {type(error).__name__}: {first_line(error)}"
        return None


def run_benchmark(args: argparse.Namespace, libs: Libraries, only_libs: set[str] | None) -> list[Row]:
    rows: list[Row] = []
    selected = [c for c in cases() if c.family in args.families]
    numpy_cache: dict[tuple[str, str, int], Row] = {}
    for threads in args.threads:
        set_threads(threads)
        for size in args.sizes:
            if args.wait_idle > 0:
                wait_for_idle(args.wait_idle)
            meter = CpuMeter()
            x = torch.randn(size, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float32)
            prealloc = torch.empty_like(x)
            copy_samples: list[float] = []
            for case in selected:
                dse_row, fmt = dse_callable(case, x, threads)
                timed: list[Timed] = []
                reference = None
                if fmt is not None:
                    dse_t = Timed(dse_row, lambda t, f=fmt: f.quantize(t, "nearest"))
                    out = warm_up(dse_t, x)
                    if out is not None:
                        reference = (out, in_range(fmt, x))
                        if only_libs is None:
                            timed.append(dse_t)
                if only_libs is None:
                    rows.append(dse_row)
                    copy_t = Timed(Row(case.family, case.spec, "copy_", "copy_", size, threads),
                                   prealloc.copy_)
                    warm_up(copy_t, x)
                    timed.append(copy_t)
                for peer in case.peers:
                    if only_libs is not None and peer.lib not in only_libs:
                        continue
                    module = libs.get(peer.lib)
                    if module is None:
                        continue
                    cache_key = (case.spec, peer.label, size)
                    if peer.lib in NUMPY_LIBS and cache_key in numpy_cache:
                        rows.append(Row(**{**asdict(numpy_cache[cache_key]), "threads": threads}))
                        continue
                    row = Row(case.family, case.spec, peer.lib, peer.label, size, threads, note=peer.note)
                    rows.append(row)
                    try:
                        peer_t = Timed(row, peer.make(module))
                    except Exception as error:  # noqa: BLE001
                        row.note = f"failed: {type(error).__name__}: {first_line(error)}"
                        continue
                    out = warm_up(peer_t, x)
                    if out is None:
                        continue
                    if peer.compare and reference is not None:
                        row.mismatches = count_mismatches(reference[0], out, reference[1])
                        row.compared = int(reference[1].sum())
                    del out
                    timed.append(peer_t)
                    if peer.lib in NUMPY_LIBS:
                        numpy_cache[cache_key] = row
                reference = None
                round_robin(timed, x, args.repeat, args.max_seconds)
                if only_libs is None:
                    dse_row.copy_rate = copy_t.row.rate
                    copy_samples.extend(copy_t.samples)
            if only_libs is None:
                copy = Row("-", "-", "copy_", "copy_ into a preallocated tensor", size, threads,
                           size / statistics.median(copy_samples) if copy_samples else None,
                           len(copy_samples))
                copy.others = meter.others()
                rows.append(copy)
            del x, prealloc
    return rows


def run_isolated(lib: str, args: argparse.Namespace) -> tuple[list[Row], str]:
    """Measure one peer library in a child process; returns its rows and a failure reason ('' if none)."""
    command = [sys.executable, os.path.abspath(__file__), "--child-libs", lib, "--json",
               "--sizes", ",".join(str(s) for s in args.sizes), "--threads", ",".join(args.threads),
               "--repeat", str(args.repeat), "--families", ",".join(args.families),
               "--max-seconds", str(args.max_seconds), "--seed", str(args.seed),
               "--wait-idle", str(args.wait_idle)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("JSON "):
            data = json.loads(line[5:])
            rows = [Row(**{**r, "child": True}) for r in data["rows"]]
            error = data["errors"].get(lib, "")
            return rows, error
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return [], f"child process failed (exit {done.returncode}): {tail}"


# --- reporting --------------------------------------------------------------------------------------

def si(rate: float | None) -> str:
    if rate is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if rate >= scale:
            return f"{rate / scale:.3g} {unit}"
    return f"{rate:.3g}"


def times(ratio: float) -> str:
    return f"{ratio:.1f}" if ratio < 10 else f"{ratio:.0f}"


def size_name(size: int) -> str:
    exponent = math.log10(size)
    return f"1e{int(exponent)}" if exponent.is_integer() else f"{size:,}"


def threads_name(threads: str) -> str:
    return f"default ({DEFAULT_THREADS})" if threads == "default" else threads


@dataclass
class Ratios:
    best_peer: Row | None
    vs_peer: float | None  # dse rate / best peer rate (>= 1 meets the target)
    same_spec: bool  # the best peer implements this very spec (else: the family's fastest peer)
    vs_copy: float | None  # copy rate / dse rate (slowdown against the memory bound)


def ratios(rows: list[Row], dse_row: Row) -> Ratios:
    def fastest(candidates: list[Row]) -> Row | None:
        timed = [r for r in candidates if r.rate]
        return max(timed, key=lambda r: r.rate or 0.0) if timed else None

    here = [r for r in rows if r.size == dse_row.size and r.threads == dse_row.threads]
    peers = [r for r in here if r.impl not in ("dse", "copy_") and r.family == dse_row.family]
    best = fastest([r for r in peers if r.spec == dse_row.spec])
    same = best is not None
    if best is None:
        best = fastest(peers)
    vs_peer = dse_row.rate / best.rate if best and best.rate and dse_row.rate else None
    vs_copy = dse_row.copy_rate / dse_row.rate if dse_row.copy_rate and dse_row.rate else None
    return Ratios(best, vs_peer, same, vs_copy)


def mismatch_text(row: Row) -> str:
    if row.mismatches is None:
        return "n/a" if row.rate else ""
    return f"{row.mismatches}/{row.compared}"


def print_text(rows: list[Row], args: argparse.Namespace) -> None:
    for threads in args.threads:
        for size in args.sizes:
            here = [r for r in rows if r.size == size and r.threads == threads]
            copy = next((r for r in here if r.impl == "copy_"), None)
            others = f"{copy.others:.0%}" if copy and copy.others is not None else "?"
            print(f"\n== torch threads {threads_name(threads)}, n = {size_name(size)}: copy_ into a "
                  f"preallocated tensor {si(copy.rate if copy else None)} elem/s; other processes used "
                  f"{others} of the CPUs meanwhile ==")
            print(f"{'family':6} {'implementation':44} {'elem/s':>9} {'vs peer':>8} {'x copy':>7}  "
                  f"{'mismatch':>15}  note")
            for row in here:
                if row.impl == "copy_":
                    continue
                if row.impl == "dse":
                    r = ratios(rows, row)
                    peer = "-" if r.vs_peer is None else f"{r.vs_peer:.2f}" + ("" if r.same_spec else "*")
                    copy_x = "-" if r.vs_copy is None else times(r.vs_copy)
                    print(f"{row.family:6} {'dse ' + row.spec:44} {si(row.rate):>9} {peer:>8} {copy_x:>7}  "
                          f"{'':>15}  {row.note}")
                else:
                    label = f"  {row.impl} {row.label}"
                    note = "; ".join(n for n in (row.note, "child process" if row.child else "") if n)
                    print(f"{'':6} {label[:44]:44} {si(row.rate):>9} {'':>8} {'':>7}  "
                          f"{mismatch_text(row):>15}  {note}")
    print("\nvs peer: dse elem/s / the fastest peer's for the same spec (* none: the family's fastest peer)."
          "\nx copy: how many times slower than copy_ into a preallocated tensor, timed in the same rounds."
          "\nmismatch: in-range outputs that differ from dse's / in-range outputs (n/a: other semantics)."
          "\nAll implementations of a spec are timed round-robin; numpy-based peers are single-threaded"
          " and measured once per size.")


def misses(rows: list[Row], args: argparse.Namespace) -> list[str]:
    out = []
    for row in rows:
        if row.impl != "dse" or not row.rate:
            continue
        r = ratios(rows, row)
        limit = COPY_TARGET.get(row.family, DEFAULT_COPY_TARGET)
        problems = []
        if r.vs_peer is not None and r.vs_peer < 1 and r.best_peer is not None:
            problems.append(f"{1 / r.vs_peer:.2f}x slower than {r.best_peer.impl} {r.best_peer.label}"
                            + ("" if r.same_spec else f" ({r.best_peer.spec})"))
        if r.vs_copy is not None and r.vs_copy > limit:
            problems.append(f"{r.vs_copy:.1f}x slower than copy_ (target {limit:g}x)")
        if problems:
            out.append(f"{row.spec} @ {size_name(row.size)}, threads {threads_name(row.threads)}: "
                       + "; ".join(problems))
    return out


def print_markdown(rows: list[Row], args: argparse.Namespace) -> None:
    columns = [(t, s) for t in args.threads for s in args.sizes]
    head = [f"{size_name(s)}, {'1 thr' if t == '1' else ('dflt' if t == 'default' else t + ' thr')}"
            for t, s in columns]
    print("| family | implementation | " + " | ".join(head) + " | mismatches |")
    print("|---|---|" + "---|" * len(columns) + "---|")

    def cell(row: Row | None) -> str:
        if row is None or not row.rate:
            return "–"
        if row.impl != "dse":
            return si(row.rate)
        r = ratios(rows, row)
        parts = []
        if r.vs_peer is not None:
            parts.append(f"{r.vs_peer:.2f}×{'' if r.same_spec else '*'} peer")
        if r.vs_copy is not None:
            parts.append(f"{times(r.vs_copy)}× copy")
        return f"**{si(row.rate)}** ({', '.join(parts)})" if parts else f"**{si(row.rate)}**"

    def find(impl: str, spec: str, label: str, t: str, s: int) -> Row | None:
        want = (impl, spec, label, t, s)
        return next((r for r in rows if (r.impl, r.spec, r.label, r.threads, r.size) == want), None)

    copies = [find("copy_", "-", "copy_ into a preallocated tensor", t, s) for t, s in columns]
    print("| – | `copy_` into a preallocated tensor | "
          + " | ".join(si(c.rate) if c else "–" for c in copies) + " | |")
    seen: list[tuple[str, str, str, str]] = []
    for row in rows:
        ident = (row.impl, row.spec, row.label, row.family)
        if row.impl == "copy_" or ident in seen:
            continue
        seen.append(ident)
        found = [find(row.impl, row.spec, row.label, t, s) for t, s in columns]
        if row.impl == "dse":
            name = f"dse `{row.spec}`"
        else:
            name = f"↳ {row.impl} `{row.label}`" + (" (child process)" if row.child else "")
        checked = [r for r in found if r is not None and r.mismatches is not None]
        mism = mismatch_text(checked[-1]) if checked else ("n/a" if row.impl != "dse" else "")
        print(f"| {row.family} | {name} | " + " | ".join(cell(r) for r in found) + f" | {mism} |")
    shares = [f"{c.others:.0%}" if c is not None and c.others is not None else "?" for c in copies]
    print(f"\nCPU share that other processes used while each column was measured: {', '.join(shares)}.")


# --- small tensors: per-call overhead ---------------------------------------------------------------

SMALL_SPECS: tuple[str, ...] = (
    "int8", "int8(pow2=1)", "fixed(8,4)", "fp8_e4m3", "fp8_e4m3(scale=tensor,pow2=1)", "fp8_e5m2",
    "bf16", "fp4_e2m1", "lns8", "lns(16,gamma=256)", "posit8", "posit(16,1)", "posit16",
    "mxfp8_e4m3", "mxfp4", "mxint8", "nvfp4", "p3109(8,4)",
)
SMALL_ROUNDINGS: tuple[str, ...] = ("nearest", "stochastic")
# Targets for one call, in units of the reference chain measured alongside (x * 2 -> round_ -> mul_):
# FP/INT/LNS nearest within 3 chains and stochastic within 6; posit and MX twice that.
SMALL_TARGET = {"nearest": 3.0, "stochastic": 6.0}
SMALL_TARGET_FACTOR = {"posit": 2.0, "block": 2.0}


def reference_chain(x: torch.Tensor) -> torch.Tensor:
    """Three eager torch operations on x: the unit that small-tensor costs are quoted in."""
    y = x * 2
    y.round_()
    return y.mul_(0.5)


def small_shape(size: int) -> tuple[int, ...]:
    """Rows of 128 (a layer's activations or weights) where size allows, else one dimension."""
    return (size // 128, 128) if size % 128 == 0 else (size,)


def per_call_seconds(fns: list[Callable[[], Any]], calls: int, rounds: int) -> list[float]:
    """Seconds per call of each function: `calls` calls in a row, round-robin over the functions for
    `rounds` rounds; the fastest round counts (load from other processes only ever adds time)."""
    best = [math.inf] * len(fns)
    for fn in fns:
        for _ in range(max(calls // 10, 3)):
            fn()
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[i] = min(best[i], (time.perf_counter() - start) / calls)
    return best


def run_small(args: argparse.Namespace) -> int:
    """Per-call time of quantize on small float32 CPU tensors, next to the reference chain."""
    if formats is None:
        print(f"dse unavailable: import dse.formats: {DSE_ERROR}")
        return 1
    specs = args.small_specs.split(";") if args.small_specs else list(SMALL_SPECS)
    print(f"dse quantize, small tensors, {time.strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs; python {sys.version.split()[0]}")
    given = sys.argv[1:]
    print("command: " + " ".join(["python", "benchmarks/quantize.py", *given]))
    print(f"µs per call (fastest of {args.rounds} rounds of {args.calls} calls, round-robin with the chain); "
          "ratio = dse / chain (x*2 -> round_ -> mul_) measured alongside")
    missed: list[str] = []
    for threads in args.threads:
        set_threads(threads)
        for size in args.small_sizes:
            x = torch.randn(small_shape(size), generator=torch.Generator().manual_seed(args.seed))
            meter = CpuMeter()
            print(f"\n{size_name(size)} elements {tuple(x.shape)}, torch threads {threads_name(threads)}")
            header = f"  {'spec':34s}" + "".join(f"{r + ' µs':>16s}{'ratio':>8s}" for r in SMALL_ROUNDINGS)
            print(header)
            for spec in specs:
                fmt = formats.get(spec)
                generator = torch.Generator().manual_seed(args.seed)
                chain = functools.partial(reference_chain, x)
                fns: list[Callable[[], Any]] = [chain]
                for rounding in SMALL_ROUNDINGS:
                    fns.append(functools.partial(fmt.quantize, x, rounding, generator))
                    fns.append(chain)
                times_s = per_call_seconds(fns, args.calls, args.rounds)
                cells = []
                for k, rounding in enumerate(SMALL_ROUNDINGS):
                    ratio = times_s[2 * k + 1] / min(times_s[2 * k], times_s[2 * k + 2])
                    cells.append(f"{times_s[2 * k + 1] * 1e6:16.1f}{ratio:7.1f}x")
                    target = SMALL_TARGET[rounding] * SMALL_TARGET_FACTOR.get(fmt.family, 1.0)
                    if ratio > target:
                        missed.append(f"{spec} {rounding} @ {size_name(size)}, {threads_name(threads)}: "
                                      f"{ratio:.1f}x the chain (target {target:g}x)")
                print(f"  {spec:34s}" + "".join(cells) + f"   (chain {min(times_s[::2]) * 1e6:.1f} µs)")
            others = meter.others()
            if others is not None:
                print(f"  other processes used {others:.0%} of the CPUs meanwhile")
    print(f"\nTargets (nearest within {SMALL_TARGET['nearest']:g} chains, stochastic within "
          f"{SMALL_TARGET['stochastic']:g}; posit and MX twice that):")
    print("\n".join("  MISS " + m for m in missed) if missed else "  all met")
    return 0


# --- main -------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e6,1e7", help="comma-separated element counts (default 1e6,1e7)")
    parser.add_argument("--threads", default="1,default",
                        help="torch thread counts; default = torch's own (default 1,default)")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per measurement; the median counts")
    parser.add_argument("--max-seconds", type=float, default=3.0,
                        help="stop repeating a measurement after this many seconds (default 3)")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"subset of {','.join(FAMILIES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to SECONDS before each block for other processes to go idle")
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table for the README")
    parser.add_argument("--isolate", default="", help="peer libraries to measure in a child process")
    parser.add_argument("--small", action="store_true",
                        help="measure the per-call cost on small tensors instead (see --small-sizes)")
    parser.add_argument("--small-sizes", default="1e3,8192,1e5",
                        help="element counts for --small (default 1e3,8192,1e5; 8192 = 64x128)")
    parser.add_argument("--small-specs", default="", help="';'-separated specs for --small (default: a set)")
    parser.add_argument("--calls", type=int, default=20, help="calls per timed round for --small")
    parser.add_argument("--rounds", type=int, default=40,
                        help="timed rounds per measurement for --small; the fastest counts")
    parser.add_argument("--child-libs", default="", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = [int(float(s)) for s in args.sizes.split(",") if s]
    args.small_sizes = [int(float(s)) for s in args.small_sizes.split(",") if s]
    args.threads = [t.strip() for t in args.threads.split(",") if t.strip()]
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    for family in args.families:
        if family not in FAMILIES:
            parser.error(f"unknown family {family!r}: expected some of {','.join(FAMILIES)}")
    for threads in args.threads:
        if threads != "default" and not threads.isdigit():
            parser.error(f"--threads takes integers or 'default', got {threads!r}")
    if any(s % 64 for s in args.sizes):
        parser.error("sizes must be multiples of 64 (MX blocks, torchao's NVFP4 rows)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.small:
        return run_small(args)
    isolate = {s.strip() for s in args.isolate.split(",") if s.strip()}
    libs = Libraries(isolate)
    if args.child_libs:
        only = {s.strip() for s in args.child_libs.split(",") if s.strip()}
        rows = run_benchmark(args, libs, only)
        print("JSON " + json.dumps({"rows": [asdict(r) for r in rows], "errors": libs.errors}))
        return 0
    started = time.strftime("%Y-%m-%d %H:%M")
    rows = run_benchmark(args, libs, None)
    for lib, why in list(libs.isolated.items()):
        child_rows, error = run_isolated(lib, args)
        if error:
            libs.errors[lib] = f"{error} (in a child process: {why})"
            continue
        rows.extend(child_rows)
    order = {c.spec: n for n, c in enumerate(cases())}
    rows.sort(key=lambda r: (args.threads.index(r.threads), args.sizes.index(r.size),
                             order.get(r.spec, -1), r.impl != "dse"))

    print(f"dse quantize benchmark, {started}; torch {torch.__version__}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs, torch default threads {DEFAULT_THREADS}; python {sys.version.split()[0]}")
    given = argv if argv is not None else sys.argv[1:]
    print("command: " + " ".join(["python", "benchmarks/quantize.py", *given]))
    loaded = ", ".join(f"{lib} ({libs.load_seconds[lib]:.1f} s to load)"
                       for lib in libs.modules if lib not in ("torch", "numpy"))
    print(f"peers loaded: {loaded or 'none'}")
    for lib, why in libs.isolated.items():
        if lib not in libs.errors:
            print(f"peer {lib} was measured in a child process: {why}")
    for lib, reason in libs.errors.items():
        print(f"peer unavailable: {lib}: {reason}")
    if DSE_ERROR:
        print(f"dse unavailable: import dse.formats: {DSE_ERROR}")
    print_text(rows, args)
    found = misses(rows, args)
    print("\nTargets (each dse spec at least as fast as its fastest peer, and within "
          f"{DEFAULT_COPY_TARGET:g}x of copy_, {COPY_TARGET['posit']:g}x for posit):")
    print("\n".join("  MISS " + m for m in found) if found else "  all met")
    if args.markdown:
        print()
        print_markdown(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
