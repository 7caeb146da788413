"""Does an elementwise or row-wise torch kernel give a member's row of a stacked (G, n) tensor the
bits it gives the member's n elements alone? Prints, per operation, dtype, shape and thread count,
how many elements differ in the last bits.

    python benchmarks/stacked_kernels.py                  # every operation, 1 and 2 threads
    python benchmarks/stacked_kernels.py --ops gelu,exp --threads 2
    python benchmarks/stacked_kernels.py --gemms          # the GEMMs a group keeps batched
    python benchmarks/stacked_kernels.py --addresses      # does a kernel depend on its operand's address?

Why it can differ: torch's CPU elementwise loops run a vector kernel over blocks of twice the
vector width and the scalar function over the rest (`vectorized_loop` in ATen's cpu/Loops.h), and
on several threads an operation of PARALLEL_GRAIN (32768) elements or more is split among them;
where the vector and scalar functions disagree, an element's bits depend on where it sits. A grouped
run applies the operation once to the stacked tensor where a run alone applies it to its own, so
each such operation on a grouped path must either give the same bits everywhere (exact IEEE
arithmetic: +, *, /, sqrt, comparisons) or be run so that each member's elements are split as alone.
Shapes: n not a multiple of the vector width, below and above the grain per member and in total.

`--addresses` asks another question: does a kernel give a member's operand, as a view that starts
1-15 elements past a 64-byte boundary (a member's slice of a group's tensor), the bits it gives the
same values at the boundary (a fresh tensor alone)? A library may take another path for an operand
off a vector boundary (MKL's sgemm does, on the AMD EPYC of session 13).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

Op = Callable[[torch.Tensor], torch.Tensor]


def _grad(fn: Op) -> Op:
    """x -> d sum(fn(x) * w) / dx for a fixed pseudo-random w: the operation's backward kernel."""
    def backward(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        (fn(x) * (x.detach() * 0.5 + 1)).sum().backward()  # a weight made of x by exact arithmetic
        return x.grad

    return backward


OPS: dict[str, tuple[Op, Callable[[torch.Tensor], torch.Tensor]]] = {
    # name: (operation, input transform from standard normals)
    "exp": (torch.exp, lambda x: x * 4),
    "exp2": (torch.exp2, lambda x: x * 4),
    "log": (torch.log, lambda x: x.abs() + 1e-3),
    "log2": (torch.log2, lambda x: x.abs() + 1e-3),
    "pow2_fraction": (lambda x: torch.pow(2.0, x), lambda x: x * 4),
    "pow2_integer": (lambda x: torch.pow(2.0, x), lambda x: (x * 8).round()),
    "pow2_integer_clamped": (lambda x: torch.pow(2.0, x.clamp(min=0.0)) - 1,  # NITI's ti_loss
                             lambda x: (x * 16).round() / 2**15 * 47274),
    "tanh": (torch.tanh, lambda x: x * 2),
    "sigmoid": (torch.sigmoid, lambda x: x * 4),
    "erf": (torch.erf, lambda x: x * 2),
    "gelu": (F.gelu, lambda x: x * 2),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), lambda x: x * 2),
    "gelu_backward": (_grad(F.gelu), lambda x: x * 2),
    "silu": (F.silu, lambda x: x * 4),
    "softplus": (F.softplus, lambda x: x * 4),
    "elu": (F.elu, lambda x: x * 2),
    "selu": (F.selu, lambda x: x * 2),
    "celu": (F.celu, lambda x: x * 2),
    "mish": (F.mish, lambda x: x * 2),
    "logsigmoid": (F.logsigmoid, lambda x: x * 4),
    "hardswish": (F.hardswish, lambda x: x * 4),
    "leaky_relu": (F.leaky_relu, lambda x: x),
    "expm1": (torch.expm1, lambda x: x * 2),
    "log1p": (torch.log1p, lambda x: x.abs()),
    "sin": (torch.sin, lambda x: x * 4),
    "cos": (torch.cos, lambda x: x * 4),
    "atan": (torch.atan, lambda x: x * 4),
    "silu_backward": (_grad(F.silu), lambda x: x * 4),
    "sigmoid_backward": (_grad(torch.sigmoid), lambda x: x * 4),
    "tanh_backward": (_grad(torch.tanh), lambda x: x * 2),
    # the optimizers' updates: a second operand made of x by exact arithmetic
    "add_alpha": (lambda x: x.add(x * 0.5 + 0.25, alpha=-0.037), lambda x: x),
    "lerp": (lambda x: x.lerp(x * 0.5 + 0.25, 0.1), lambda x: x),
    "addcmul": (lambda x: x.addcmul(x * 0.5, x + 1, value=0.001), lambda x: x),
    "addcdiv": (lambda x: x.addcdiv(x * 0.5, x.abs() + 1, value=-0.01), lambda x: x),
    "sqrt": (torch.sqrt, lambda x: x.abs()),
    "reciprocal": (torch.reciprocal, lambda x: x),
    "div_by_3": (lambda x: x / 3.0, lambda x: x),
    "softmax_rows": (lambda x: torch.softmax(x, dim=-1), lambda x: x * 4),
    "log_softmax_rows": (lambda x: F.log_softmax(x, dim=-1), lambda x: x * 4),
    "softmax_backward": (_grad(lambda x: torch.softmax(x, dim=-1)), lambda x: x * 4),
    # kernels that compute an activation or a reduction inside (measured for users' networks)
    "glu": (lambda x: F.glu(torch.cat([x, x.flip(-1)], -1)), lambda x: x * 4),
    "glu_backward": (_grad(lambda x: F.glu(torch.cat([x, x.flip(-1)], -1))), lambda x: x * 4),
    "logsigmoid_backward": (_grad(F.logsigmoid), lambda x: x * 4),
    "hardsigmoid": (F.hardsigmoid, lambda x: x * 4),
    "hardswish_backward": (_grad(F.hardswish), lambda x: x * 4),
    "softsign": (F.softsign, lambda x: x * 4),
    "layer_norm_rows": (lambda x: F.layer_norm(x, x.shape[-1:]), lambda x: x * 4),
    "layer_norm_backward": (_grad(lambda x: F.layer_norm(x, x.shape[-1:])), lambda x: x * 4),
    "rms_norm_rows": (lambda x: F.rms_norm(x, x.shape[-1:]), lambda x: x * 4),
    "normalize_rows": (lambda x: F.normalize(x, dim=-1), lambda x: x * 4),
    "logsumexp_rows": (lambda x: torch.logsumexp(x, -1), lambda x: x * 4),
}

SHAPES = [(4, 37), (8, 1000), (8, 4099), (3, 33001)]
"""(G, n): all rows below the grain; rows below it but the group above (8 x 4099); rows above it."""

ROW_SHAPES = [(4, 6, 37), (8, 64, 10), (8, 700, 13)]
"""(G, rows, width) for row-wise operations (softmax over the last axis): the group folded by rows."""


def mismatches(op: Op, transform: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...],
               dtype: torch.dtype, seed: int = 0) -> tuple[int, int]:
    """(elements whose bits differ between the stacked call and each member's own call, elements)."""
    generator = torch.Generator().manual_seed(seed)
    x = transform(torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)
    stacked = op(x)
    alone = torch.stack([op(member.clone()) for member in x])
    same = (stacked == alone) | (stacked.isnan() & alone.isnan())
    return int((~same).sum()), same.numel()


def _with_grads(fn: Callable[..., torch.Tensor], *operands: torch.Tensor) -> list[torch.Tensor]:
    """[fn(*operands), d sum(fn * w) / d operand for each], w made of the output by exact arithmetic."""
    leaves = [t.detach().clone().requires_grad_(True) for t in operands]
    y = fn(*leaves)
    (y * (y.detach() * 0.5 + 1)).sum().backward()
    return [y.detach(), *[t.grad for t in leaves if t.grad is not None]]


def gemm_mismatches(members: int = 3) -> None:
    """Each GEMM a group runs batched (or per member on the folded batch) against the member's own
    call alone: elements that differ in the output and each operand's gradient."""
    source = torch.Generator().manual_seed(0)
    G = members

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=source)

    for rows, features, chunk in [(1536, 64, 4), (4096, 256, 1024)]:  # the accumulation's chunks
        dy, x, w = randn(G, rows, features), randn(G, rows, features), randn(G, features, features)
        weight_grad = sum(int((dy[:, s:s + chunk].transpose(1, 2) @ x[:, s:s + chunk]
                               != torch.stack([dy[g, s:s + chunk].t() @ x[g, s:s + chunk] for g in range(G)])
                               ).sum()) for s in range(0, rows, chunk))
        step = min(chunk, features)
        forward = sum(int((x[..., s:s + step] @ w[:, s:s + step]
                           != torch.stack([x[g, :, s:s + step] @ w[g, s:s + step] for g in range(G)])).sum())
                      for s in range(0, features, step))
        print(f"  accumulation chunks rows={rows} features={features} chunk={chunk}: "
              f"forward {forward}, weight gradient {weight_grad} differ")
    for batch, heads, n, d in [(32, 2, 48, 16), (64, 4, 128, 64)]:  # a Matmul (attention)
        q, k = randn(G * batch, heads, n, d), randn(G * batch, heads, d, n)
        together = _with_grads(torch.matmul, q, k)
        own = [_with_grads(torch.matmul, q_g, k_g) for q_g, k_g in zip(q.chunk(G), k.chunk(G), strict=True)]
        alone = [torch.cat(parts) for parts in zip(*own, strict=True)]
        differ = [int((t != a).sum()) for t, a in zip(together, alone, strict=True)]
        print(f"  Matmul {(batch, heads, n, d)}: y, da, db differ {differ}")
    for batch, tokens, k_in, n_out in [(32, 48, 64, 64), (64, 128, 256, 256)]:  # x @ W, x of 3 axes
        x, w = randn(G * batch, tokens, k_in), randn(G, k_in, n_out)
        y, dx, dw = _with_grads(lambda a, b, rows=batch: a.unflatten(0, (G, rows)) @ b.unsqueeze(1), x, w)
        own = [_with_grads(torch.matmul, x_g, w_g) for x_g, w_g in zip(x.chunk(G), w, strict=True)]
        y_alone, dx_alone, dw_alone = (torch.cat([a[0] for a in own]), torch.cat([a[1] for a in own]),
                                       torch.stack([a[2] for a in own]))
        print(f"  batched x @ W {(batch, tokens, k_in, n_out)}: y {int((y.flatten(0, 1) != y_alone).sum())}, "
              f"dx {int((dx != dx_alone).sum())}, dW {int((dw != dw_alone).sum())} differ "
              "(stacked: each member's own)")
    for batch, c_in, c_out, size in [(32, 8, 16, 14), (64, 16, 32, 28)]:  # convolutions
        x, w = randn(G * batch, c_in, size, size), randn(G, c_out, c_in, 3, 3)

        def conv(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return F.conv2d(a, b, padding=1)

        alone = [_with_grads(conv, x[g * batch:(g + 1) * batch].clone(), w[g].clone()) for g in range(G)]
        channels = x.unflatten(0, (G, batch)).transpose(0, 1).reshape(batch, G * c_in, size, size)
        grouped = _with_grads(lambda a, b: F.conv2d(a, b.flatten(0, 1), padding=1, groups=G), channels, w)
        y = grouped[0].reshape(batch, G, c_out, size, size).transpose(0, 1)
        y_differ = sum(int((y[g] != alone[g][0]).sum()) for g in range(G))
        dw_differ = sum(int((grouped[2][g] != alone[g][2]).sum()) for g in range(G))
        print(f"  grouped conv2d {(batch, c_in, c_out, size)}: y {y_differ}, dW {dw_differ} differ "
              "(stacked: each member's own conv2d)")


def _input_grad(fn: Op) -> Op:
    """x -> d sum(fn(x) * w) / dx, w made of fn's output by exact arithmetic (any output shape)."""
    def backward(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        y = fn(x)
        (y * (y.detach() * 0.5 + 1)).sum().backward()
        return x.grad

    return backward


ADDRESS_OPS: dict[str, tuple[Op, tuple[int, ...]]] = {
    # name: (operation of one operand, the operand's shape); an F.linear as the control
    "linear_50x37_to_10": (lambda x: F.linear(x, _fixed(x, 10, 37), _fixed(x, 10)), (50, 37)),
    "linear_50x64_to_37": (lambda x: F.linear(x, _fixed(x, 37, 64), _fixed(x, 37)), (50, 64)),
    "linear_backward_50x37_to_10": (_input_grad(lambda x: F.linear(x, _fixed(x, 10, 37))), (50, 37)),
    "conv1d": (lambda x: F.conv1d(x, _fixed(x, 10, 5, 5), padding=1), (7, 5, 37)),
    "conv1d_backward": (lambda x: _weight_and_input_grads(F.conv1d, x, _fixed(x, 10, 5, 5)), (7, 5, 37)),
    "conv2d_backward": (lambda x: _weight_and_input_grads(F.conv2d, x, _fixed(x, 16, 8, 3, 3)),
                        (50, 8, 14, 14)),
    "sum_rows": (lambda x: x.sum(0), (50, 37)),
    "sum_all": (lambda x: x.sum(), (3, 33001)),
    "var_rows": (lambda x: x.var(0), (50, 37)),
    "cumsum": (lambda x: x.cumsum(-1), (50, 37)),
}


def _weight_and_input_grads(conv: Callable[..., torch.Tensor], x: torch.Tensor,
                            weight: torch.Tensor) -> torch.Tensor:
    """A convolution's input and weight gradients (padding 1), flattened into one tensor."""
    return torch.cat([g.flatten() for g in _with_grads(lambda a, b: conv(a, b, padding=1), x, weight)[1:]])


def _fixed(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """A second operand of `like`'s dtype, the same on every call."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=like.dtype)


def address_mismatches(op: Op, transform: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...],
                       dtype: torch.dtype) -> list[int]:
    """The element offsets (1-15 past a 64-byte boundary) at which op of a view differs from op of
    the same values in a fresh tensor."""
    count = torch.Size(shape).numel()
    storage = transform(torch.randn(count + 16, generator=torch.Generator().manual_seed(0), dtype=dtype))
    differ = []
    for offset in range(1, 16):
        view = storage[offset:offset + count].view(shape)
        at, fresh = op(view), op(view.clone())
        if not bool(((at == fresh) | (at.isnan() & fresh.isnan())).all()):
            differ.append(offset)
    return differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--gemms", action="store_true", help="the GEMMs instead of the elementwise kernels")
    parser.add_argument("--addresses", action="store_true",
                        help="each operation on an operand off a 64-byte boundary against a fresh copy")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    if args.addresses:
        cases = {**{name: (op, transform, (8, 1000)) for name, (op, transform) in OPS.items()},
                 **{name: (op, lambda x: x, shape) for name, (op, shape) in ADDRESS_OPS.items()}}
        print(f"{'op':28} {'dtype':8} {'threads':7} element offsets that differ from a fresh copy")
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for dtype_name in args.dtypes.split(","):
                for name, (op, transform, shape) in cases.items():
                    offsets = address_mismatches(op, transform, shape, getattr(torch, dtype_name))
                    print(f"{name:28} {dtype_name:8} {threads:7} {offsets or 'none'}")
        return
    if args.gemms:
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            print(f"{threads} thread(s):")
            gemm_mismatches()
        return
    print(f"{'op':22} {'dtype':8} {'threads':7} {'shape':16} {'differ':>8} / elements")
    for name in args.ops.split(","):
        op, transform = OPS[name]
        shapes = ROW_SHAPES if "softmax" in name or "rows" in name else SHAPES
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            for threads in (int(t) for t in args.threads.split(",")):
                torch.set_num_threads(threads)
                for shape in shapes:
                    differ, total = mismatches(op, transform, shape, dtype)
                    flag = "  <-- differs" if differ else ""
                    print(f"{name:22} {dtype_name:8} {threads:7} {str(shape):16} {differ:8} / {total}{flag}")


if __name__ == "__main__":
    main()
