"""torch.compile (inductor's CPU C++ backend) of a group's quantize against eager `quantize_members`:
the design tried for grouped training's elementwise floor (docs/training.md, "Speed of grouped
training"). Not wired into training: this measures whether it would pay.

    .venv/bin/python benchmarks/compiled_quantize.py
    .venv/bin/python benchmarks/compiled_quantize.py --formats int8,int4 --sizes 3,8,16

Per format and group size G, over the quickstart MLP's stacked tensors (weights 256x40, 256x256,
10x256; GEMM inputs and gradients 100x40, 100x256, 100x10 per member): the wall seconds of the first
calls (tracing and C++ compilation; a second run reads inductor's on-disk cache), the graphs compiled
so far (a new G may recompile), the CPU time of eager and compiled side by side (interleaved, best of
3, one thread), and bit-exactness on those tensors and on members of random float32 bit patterns of
every exponent (finite values bit for bit; NaN compared as NaN, whose payload inductor may change).

A per-tensor-scaled format compiles a fused quantize: each member's max|x|, the scale, the rounding and
the product in one graph, the rare subnormal-scale case checked eagerly on the returned max (it then
takes the eager path). Other formats compile `quantize_members` as it is, fast paths and all.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MEMBER_SHAPES = [(256, 40), (256, 256), (10, 256), (100, 40), (100, 256), (100, 10)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="int8,int4,fp8_e4m3,posit8,lns8,mxfp4")
    parser.add_argument("--sizes", default="3,8,16", help="group sizes (default 3,8,16)")
    parser.add_argument("--repeats", type=int, default=20, help="calls per timing (default 20)")
    args = parser.parse_args()

    import torch
    import torch._dynamo
    from torch import Tensor
    from torch._dynamo.utils import counters

    from dse.formats.base import NumberFormat
    from dse.formats.spec import get

    warnings.filterwarnings("ignore")
    torch._logging.set_logs(dynamo=logging.ERROR, inductor=logging.ERROR)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as training sets it
    torch._dynamo.config.cache_size_limit = 64
    generator = torch.Generator().manual_seed(0)

    def random_bits(shape: tuple[int, ...]) -> Tensor:
        codes = torch.randint(-2**31, 2**31, shape, generator=generator, dtype=torch.int64)
        return codes.to(torch.int32).view(torch.float32)

    def agree(a: Tensor, b: Tensor) -> bool:
        same_bits = a.view(torch.int32) == b.view(torch.int32)
        return bool((same_bits | (a.isnan() & b.isnan())).all())

    def cpu_seconds(quantize: Callable[[Tensor], Tensor], tensors: list[Tensor]) -> float:
        started = time.process_time()
        for _ in range(args.repeats):
            for tensor in tensors:
                quantize(tensor)
        return (time.process_time() - started) / args.repeats

    print("| format | G | first calls wall s | graphs | eager ms | compiled ms | speed-up | bit-exact |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in args.formats.split(","):
        fmt = get(spec)

        def eager(x: Tensor, fmt: NumberFormat = fmt) -> Tensor:
            return fmt.quantize_members(x)

        torch._dynamo.reset()
        counters.clear()
        if fmt.scaling.kind == "tensor":
            def fused(x: Tensor, fmt: NumberFormat = fmt) -> tuple[Tensor, Tensor]:
                rows = x.reshape(x.shape[0], -1)
                amax = torch.maximum(-rows.amin(1), rows.amax(1)).reshape([x.shape[0]] + [1] * (x.dim() - 1))
                scale = fmt.divisor_from_amax(amax)
                return fmt.round_unscaled(x / scale, "nearest", None) * scale, amax

            fused_compiled = torch.compile(fused)
            subnormal_amax = fmt._subnormal_scale_amax

            def compiled(x: Tensor, eager: Callable[[Tensor], Tensor] = eager,
                         fused_compiled: Callable[[Tensor], tuple[Tensor, Tensor]] = fused_compiled,
                         subnormal_amax: float = subnormal_amax) -> Tensor:
                out, amax = fused_compiled(x)
                if bool(((amax > 0) & (amax < subnormal_amax)).any()):
                    return eager(x)
                return out
        else:
            compiled = torch.compile(eager)
        for size in [int(size) for size in args.sizes.split(",")]:
            member_scales = 0.01 * (1 + torch.arange(size)).view(-1, 1, 1)
            tensors = [torch.randn((size, *shape), generator=generator) * member_scales
                       for shape in MEMBER_SHAPES]
            started = time.time()
            try:
                exact = all([agree(compiled(x), eager(x)) for x in tensors])
            except torch._dynamo.exc.BackendCompilerFailed as error:  # inductor cannot lower it
                reason = str(error).splitlines()[1] if "\n" in str(error) else str(error)
                print(f"| {spec} | {size} | compile failed: {reason} |||||")
                break
            first_calls_s = time.time() - started
            graphs = counters["stats"]["unique_graphs"]
            wide = random_bits((size, 256, 256))
            exact &= agree(compiled(wide), eager(wide))
            eager_s, compiled_s = [], []
            for _ in range(3):
                eager_s.append(cpu_seconds(eager, tensors))
                compiled_s.append(cpu_seconds(compiled, tensors))
            print(f"| {spec} | {size} | {first_calls_s:.1f} | {graphs} | {min(eager_s) * 1e3:.2f} | "
                  f"{min(compiled_s) * 1e3:.2f} | {min(eager_s) / min(compiled_s):.2f}x | {exact} |",
                  flush=True)


if __name__ == "__main__":
    main()
