"""Do users' networks built from torch modules whose kernels may depend on where an element sits give
each member of a stacked group the bits it gets alone? For each small network (an activation, a
composite kernel such as GLU or a norm, a sequence-first attention, a recurrent layer, a leaf layer
of the user's own) this stacks G members (dse/train/stacked.py, fp32 or int8), runs one forward and
backward on the folded batch and each member alone on its own batch, and prints how many output and
input-gradient elements differ, at 1 and 2 threads; or why the network trains one by one.

    python benchmarks/user_kernels.py                      # every network, 1 and 2 threads
    python benchmarks/user_kernels.py --nets glu,gru --threads 2
    python benchmarks/user_kernels.py --no-mode            # the same without MemberKernelMode

Shapes: G = 2 and 3 members of B = 50 samples (a member's element counts not a multiple of the
vector width, so a member alone has a scalar tail where the group has none), and B = 400 (a
member's stretch above torch's 32768-element grain at 2 threads for the wider layers).
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.user_models import Gate, SequenceFirst  # noqa: E402  (the tests' users' layers)

WIDTH = 64
"""Each sample: 64 features (8 tokens of 8 for the sequence networks), as the digits data."""


class Head(nn.Module):
    """Linear(64 -> 74) -> `activation` -> Linear(-> 10): the activation on a (B, 74) tensor."""

    def __init__(self, activation: Callable[[Tensor], Tensor], hidden: int = 74) -> None:
        super().__init__()
        self.a, self.activation = nn.Linear(WIDTH, hidden), activation
        self.b = nn.Linear(activation(torch.zeros(2, hidden)).shape[-1], 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.activation(self.a(x)))


class ModuleHead(nn.Module):
    """Linear -> an activation module -> Linear."""

    def __init__(self, activation: nn.Module, hidden: int = 74) -> None:
        super().__init__()
        self.a, self.act = nn.Linear(WIDTH, hidden), activation
        with torch.no_grad():
            out = activation(torch.zeros(2, hidden)).shape[-1]
        self.b = nn.Linear(out, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.act(self.a(x)))


class EncoderFirst(nn.Module):
    """nn.TransformerEncoderLayer with `batch_first`, activation `activation`, no dropout."""

    def __init__(self, batch_first: bool, activation: str | Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.layer = nn.TransformerEncoderLayer(8, 2, 21, dropout=0.0, batch_first=batch_first,
                                                activation=activation)
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.reshape(len(x), 8, 8)
        if not self.batch_first:
            return self.head(self.layer(tokens.transpose(0, 1)).transpose(0, 1).flatten(1))
        return self.head(self.layer(tokens).flatten(1))


class Recurrent(nn.Module):
    """nn.GRU / nn.LSTM over the 8 tokens (their gates' sigmoid and tanh inside torch's kernel)."""

    def __init__(self, kind: type[nn.RNNBase], batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.rnn = kind(8, 16, batch_first=batch_first)
        self.head = nn.Linear(8 * 16, 10)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.reshape(len(x), 8, 8)
        if self.batch_first:
            return self.head(self.rnn(tokens)[0].flatten(1))
        return self.head(self.rnn(tokens.transpose(0, 1))[0].transpose(0, 1).flatten(1))


class Normed(nn.Module):
    """Linear -> a norm with no weights of its own (so it runs once on the folded batch) -> SiLU -> Linear."""

    def __init__(self, norm: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(WIDTH, 74), nn.Linear(74, 10)
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.relu(self.norm(self.a(x))))


def _channels(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """fn on the (B, 74) features seen as (B, 2, 37) channels, then flattened back."""
    return lambda h: fn(h.reshape(len(h), 2, 37)).flatten(1)


NETWORKS: dict[str, Callable[[], nn.Module]] = {
    # activations already in MemberKernelMode's list (controls)
    "silu": lambda: ModuleHead(nn.SiLU()),
    "sigmoid": lambda: Head(torch.sigmoid),
    # composite and other activations
    "glu": lambda: Head(F.glu),
    "nn.GLU": lambda: ModuleHead(nn.GLU()),
    "logsigmoid": lambda: ModuleHead(nn.LogSigmoid()),
    "hardswish": lambda: ModuleHead(nn.Hardswish()),
    "hardsigmoid": lambda: ModuleHead(nn.Hardsigmoid()),
    "softsign": lambda: ModuleHead(nn.Softsign()),
    "tanhshrink": lambda: ModuleHead(nn.Tanhshrink()),
    "tanh": lambda: ModuleHead(nn.Tanh()),
    "hardtanh": lambda: ModuleHead(nn.Hardtanh()),
    "relu6": lambda: ModuleHead(nn.ReLU6()),
    "leaky_relu": lambda: ModuleHead(nn.LeakyReLU(0.1)),
    "prelu": lambda: ModuleHead(nn.PReLU()),
    "softmin": lambda: ModuleHead(nn.Softmin(-1)),
    "log_softmax": lambda: ModuleHead(nn.LogSoftmax(-1)),
    "gelu": lambda: ModuleHead(nn.GELU()),
    "gelu_tanh": lambda: ModuleHead(nn.GELU("tanh")),
    "exp": lambda: Head(lambda h: torch.exp(h.clamp(max=8))),
    "expm1": lambda: Head(lambda h: torch.expm1(h.clamp(max=8))),
    "log1p": lambda: Head(lambda h: torch.log1p(h.abs())),
    "rsqrt": lambda: Head(lambda h: torch.rsqrt(h.abs() + 0.1)),
    "sin": lambda: Head(torch.sin),
    "atan": lambda: Head(torch.atan),
    "erfinv": lambda: Head(lambda h: torch.erfinv(torch.tanh(h) * 0.99)),
    "pow_scalar_1.5": lambda: Head(lambda h: h.abs().pow(1.5)),
    "pow_scalar_2": lambda: Head(lambda h: h.pow(2)),
    "square": lambda: Head(torch.square),
    "sqrt": lambda: Head(lambda h: torch.sqrt(h.abs())),
    "logsumexp": lambda: Head(lambda h: h - torch.logsumexp(h, -1, keepdim=True)),
    # norms with no weights of their own (once on the folded batch)
    "layer_norm": lambda: Normed(nn.LayerNorm(74, elementwise_affine=False)),
    "F.layer_norm": lambda: Normed(lambda h: F.layer_norm(h, (74,))),
    "rms_norm": lambda: Normed(nn.RMSNorm(74, elementwise_affine=False)),
    "group_norm": lambda: Normed(_channels(nn.GroupNorm(1, 2, affine=False))),
    "instance_norm": lambda: Normed(_channels(nn.InstanceNorm1d(2))),
    "normalize": lambda: Normed(lambda h: F.normalize(h, dim=-1)),
    "batch_norm_eval": lambda: Normed(lambda h: F.batch_norm(h, torch.zeros(74), torch.ones(74) * 2)),
    # norms with weights (member by member)
    "layer_norm_affine": lambda: Normed(nn.LayerNorm(74)),
    "rms_norm_affine": lambda: Normed(nn.RMSNorm(74)),
    "batch_norm": lambda: Normed(nn.BatchNorm1d(74)),
    # a user's own leaf layer calling sigmoid, member by member
    "leaf_sigmoid": lambda: ModuleHead(Gate(74)),
    # sequence-first layouts
    "mha_seq_first_silu": lambda: SequenceFirst(F.silu),
    "mha_seq_first_sigmoid": lambda: SequenceFirst(torch.sigmoid),
    "mha_seq_first_relu": lambda: SequenceFirst(torch.relu),
    "encoder_batch_first_silu": lambda: EncoderFirst(True, F.silu),
    "encoder_seq_first_silu": lambda: EncoderFirst(False, F.silu),
    "encoder_seq_first_gelu": lambda: EncoderFirst(False, "gelu"),
    # recurrent layers (weights: member by member)
    "gru": lambda: Recurrent(nn.GRU, True),
    "lstm": lambda: Recurrent(nn.LSTM, True),
    "gru_seq_first": lambda: Recurrent(nn.GRU, False),
}


def differences(make: Callable[[], nn.Module], members: int, batch: int, spec: str, mode: bool
                ) -> str:
    """'y a, dx b' (elements of the output and of the input gradient that differ from alone), or the
    reason the network trains one by one."""
    from dse.formats.base import MemberGenerators
    from dse.train.config import TrainConfig
    from dse.train.layers import QuantSwitch, quantize_model
    from dse.train.policy import QuantPolicy
    from dse.train.stacked import stack_models, stack_reason

    torch.manual_seed(0)
    nets = [make() for _ in range(members)]
    example = torch.randn(4, WIDTH)
    reason = stack_reason(copy.deepcopy(nets[0]), example)
    if reason is not None:
        return f"one by one: {reason}"
    policy = QuantPolicy.from_config(TrainConfig(model="mlp", format=spec))  # as `train` has it, fp32 too
    generators = [torch.Generator().manual_seed(g) for g in range(members)]
    stacked = stack_models([copy.deepcopy(n) for n in nets], policy, QuantSwitch(),
                           MemberGenerators(generators), example)
    if not mode and stacked.member_kernels is not None:
        stacked.member_kernels.remove()
    alone = [copy.deepcopy(n) for n in nets]
    for g, net in enumerate(alone):
        quantize_model(net, policy, torch.Generator().manual_seed(g), example[:2])
    x = torch.randn(members, batch, WIDTH, generator=torch.Generator().manual_seed(1)) * 2
    together_x = x.clone().requires_grad_()
    together = stacked(together_x)
    (together * torch.linspace(-1, 1, 10)).sum().backward()
    assert together_x.grad is not None
    y_differ = dx_differ = 0
    for g, net in enumerate(alone):
        own = x[g].clone().requires_grad_()
        out = net(own)
        (out * torch.linspace(-1, 1, 10)).sum().backward()
        assert own.grad is not None
        y_differ += int((out != together[g]).sum())
        dx_differ += int((own.grad != together_x.grad[g]).sum())
    return f"y {y_differ}, dx {dx_differ}" + ("  <-- differs" if y_differ or dx_differ else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", default=",".join(NETWORKS))
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--spec", default="fp32", help="the format of the stacked GEMMs (fp32: none)")
    parser.add_argument("--no-mode", action="store_true", help="the stacked forward without MemberKernelMode")
    args = parser.parse_args()
    from dse.train.layers import UnconvertedGemmWarning

    warnings.filterwarnings("ignore", category=UnconvertedGemmWarning)  # GRU / LSTM stay fp32, alone too
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.spec}, MemberKernelMode {'off' if args.no_mode else 'as decided'}")
    for name in args.nets.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for members, batch in ((2, 50), (3, 50), (2, 400)):
                result = differences(NETWORKS[name], members, batch, args.spec, not args.no_mode)
                print(f"{name:26} threads {threads} G={members} B={batch:<4} {result}", flush=True)
                if result.startswith("one by one"):
                    break


if __name__ == "__main__":
    main()
