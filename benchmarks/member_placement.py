"""Does `MemberKernelMode` split a group's tensors where each member's samples lie, for the two layouts
its shape reading (`_member_axis`) cannot tell apart? Each case builds G members' own batch-first
tensors, joins them as a group's folded batch, reshapes the group's tensor (and each member's alone,
on fresh tensors) the same way, runs F.silu (a position-dependent kernel) over it under the mode, and
counts the member blocks whose values differ from the member's alone, the cases refused
(MemberAxisLost: the group would train one by one) and those warned about
(AmbiguousMemberAxisWarning). Once with the folded input placed (`MemberKernelMode.place`, as a
group's forward does: its placement followed through the reshapes), once read by shape only (the
input not placed: the mode before placements were followed).

    python benchmarks/member_placement.py                  # exactness, then cost
    python benchmarks/member_placement.py --cost-only --repeat 9 --steps 10

Cases: (a) rows straddling samples: a (G*B, H) tensor reshaped into rows of K = G*B values
((G*B*H/K, K)), G 2-3, B 4-7, H 12-20 where K does not divide H; (b) a sequence-first tensor
flattened behind its samples: a (G*B, L, E) tensor made (L, G*B, E) and flattened to (L, G*B*E),
L a multiple of G*B (G 2-3, B 2-5, E 3-4).

Cost: a group step (forward, backward, SGD step) of users' networks (tests/support/user_models.py,
G 3, batch 50, fp32, one thread), with the placements followed and read by shape only (a mode whose
`_follow`, `follow_layer` and `place` do only what the mode did before: the reshape check), each in
its own stacked copy, interleaved round by round; thread CPU time, median per step, and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dse.train.member_kernels import (  # noqa: E402
    RESHAPING_FUNCTIONS,
    AmbiguousMemberAxisWarning,
    MemberAxisLost,
    MemberKernelMode,
    _members_interleaved,
    positional_input,
)

USER_MODELS = Path(__file__).resolve().parent.parent / "tests" / "support" / "user_models.py"
NETWORKS = ("encoder", "functional", "attention", "gated", "tokens")
"""A TransformerEncoderLayer, functional GEMMs with reshapes and a bmm, a sequence-first
MultiheadAttention, SiLU and sigmoid gates, an embedding's tokens."""

Case = tuple[int, int, Callable[[Tensor], Tensor], Callable[[Tensor, int, int], Tensor]]
"""members, rows, the reshape of a batch-first tensor, and member g's block of the result."""


def straddling_rows() -> Iterator[tuple[str, list[Tensor], Case]]:
    for members in (2, 3):
        for rows in range(4, 8):
            for hidden in range(12, 21):
                chunk = members * rows
                if hidden % chunk == 0 or (rows * hidden) % chunk:  # (rows of whole samples; no split alone)
                    continue
                blocks = [torch.randn(rows, hidden, generator=torch.Generator().manual_seed(g)) * 3
                          for g in range(members)]

                def reshape(t: Tensor, chunk: int = chunk) -> Tensor:
                    return t.reshape(-1, chunk)

                def block(y: Tensor, g: int, members: int) -> Tensor:
                    each = y.shape[0] // members
                    return y[g * each:(g + 1) * each]

                yield f"(a) G {members} B {rows} H {hidden}", blocks, (members, rows, reshape, block)


def flattened_sequence() -> Iterator[tuple[str, list[Tensor], Case]]:
    for members in (2, 3):
        for rows in range(2, 6):
            for features in (3, 4):
                length = members * rows
                blocks = [torch.randn(rows, length, features, generator=torch.Generator().manual_seed(g)) * 3
                          for g in range(members)]

                def reshape(t: Tensor) -> Tensor:
                    return t.transpose(0, 1).contiguous().flatten(1)

                def block(y: Tensor, g: int, members: int) -> Tensor:
                    each = y.shape[1] // members
                    return y[:, g * each:(g + 1) * each]

                name = f"(b) G {members} B {rows} L {length} E {features}"
                yield name, blocks, (members, rows, reshape, block)


def run(blocks: list[Tensor], case: Case, placed: bool) -> tuple[int, bool, bool]:
    """(member blocks differing from alone, refused, warned)."""
    members, rows, reshape, block = case
    folded = torch.cat([b.clone() for b in blocks])
    mode = MemberKernelMode(members, rows) if placed else read_by_shape(MemberKernelMode(members, rows))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AmbiguousMemberAxisWarning)
        try:
            with mode:
                if placed:
                    mode.place(folded)
                grouped = F.silu(reshape(folded))
        except MemberAxisLost:
            return 0, True, bool(caught)
    differing = sum(not torch.equal(block(grouped, g, members), F.silu(reshape(b.clone())))
                    for g, b in enumerate(blocks))
    return differing, False, bool(caught)


def read_by_shape(mode: MemberKernelMode) -> MemberKernelMode:
    """`mode` reading every tensor by its shape: no placement recorded, the reshape check as before (its
    methods replaced on the instance: its type stays the one our layers take off the stack)."""

    def follow(func: object, args: tuple[object, ...], kwargs: dict[str, object], out: Tensor) -> None:
        if func in RESHAPING_FUNCTIONS:
            args, kwargs = positional_input(args, kwargs)
            x = args[0] if args else None
            if isinstance(x, Tensor) and x is not out:
                mode.lost = mode.lost or _members_interleaved(x, out, mode.members, mode.rows)

    vars(mode).update(_follow=follow, place=lambda x, axis=0: None, follow_layer=lambda args, output: None)
    return mode


def step_timer(network: str, members: int, batch: int, shape_only: bool) -> Callable[[int], float]:
    """A group step of `network` (user_models.py) timed over `steps` steps: thread CPU s per step."""
    from dse.data import load_dataset
    from dse.formats.base import MemberGenerators
    from dse.models.proxies import build_model
    from dse.train.config import TrainConfig
    from dse.train.grouped import _cross_entropies
    from dse.train.layers import QuantSwitch
    from dse.train.policy import QuantPolicy
    from dse.train.stacked import stack_models

    model = f"{USER_MODELS}:{network}"
    data = load_dataset("digits")
    torch.manual_seed(0)
    nets = [build_model(model, data) for _ in range(members)]
    policy = QuantPolicy.from_config(TrainConfig(model=model, dataset="digits", format="fp32"))
    generators = MemberGenerators([torch.Generator().manual_seed(g) for g in range(members)])
    stacked = stack_models(nets, policy, QuantSwitch(), generators, data.x_train[:4])
    assert stacked.member_kernels is not None, network
    if shape_only:
        stacked.member_kernels.mode = read_by_shape(MemberKernelMode(members))
    optimizer = torch.optim.SGD(stacked.parameters(), lr=0.01)
    x = data.x_train[:members * batch].reshape(members, batch, *data.x_train.shape[1:])
    y = data.y_train[:members * batch].reshape(members, batch, *data.y_train.shape[1:])

    def timed(steps: int) -> float:
        start = time.thread_time()
        for _ in range(steps):
            _, objective = _cross_entropies(stacked(x), y)
            objective.backward()
            optimizer.step()
            optimizer.zero_grad()
        return (time.thread_time() - start) / steps

    timed(2)
    return timed


def cost(repeat: int, steps: int, members: int, batch: int) -> None:
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"\ncost: G {members}, batch {batch}, fp32, 1 thread, median of {repeat} rounds x {steps} steps, "
          f"thread CPU time; load average {load}")
    print(f"{'network':12} {'shape only ms':>14} {'followed ms':>12} {'followed/shape':>15}")
    for network in NETWORKS:
        timers = {variant: step_timer(network, members, batch, variant == "shape only")
                  for variant in ("shape only", "followed")}
        times: dict[str, list[float]] = {variant: [] for variant in timers}
        for round_ in range(repeat):
            order = list(timers.items())
            for variant, timer in order[::-1] if round_ % 2 else order:  # interleaved, either first
                times[variant].append(timer(steps))
        ms = {variant: statistics.median(t) * 1e3 for variant, t in times.items()}
        print(f"{network:12} {ms['shape only']:14.2f} {ms['followed']:12.2f} "
              f"{ms['followed'] / ms['shape only']:15.3f}", flush=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cost-only", action="store_true")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, 1 thread")
    if not args.cost_only:
        exactness()
    cost(args.repeat, args.steps, args.members, args.batch)


def exactness() -> None:
    for title, cases in (("(a) rows straddling samples", straddling_rows),
                         ("(b) sequence-first flattened, L a multiple of G*B", flattened_sequence)):
        for placed in (False, True):
            blocks_total = differing = refused = warned = silent = 0
            for _, blocks, case in cases():
                count, lost, warning = run(blocks, case, placed)
                blocks_total += len(blocks)
                differing += count
                refused += lost
                warned += warning
                silent += bool(count) and not lost and not warning
            print(f"{title}, {'placement followed' if placed else 'shape only':18}: {differing:3} of "
                  f"{blocks_total} member blocks differ, {refused} cases refused, {warned} warned, "
                  f"{silent} silently wrong")


if __name__ == "__main__":
    main()
