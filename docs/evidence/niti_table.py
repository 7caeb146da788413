"""The NITI table of docs/niti.md: NITI as the reference runs it, each departure the issue found
switched back one at a time, and fp32 SGD, on the same data, batch order and seeds.

    PYTHONPATH=. nice -n 5 python docs/evidence/niti_table.py [--seeds 0 1] [--tasks digits-mlp ...]

Variants (every one is `dse.train.train` on a TrainConfig; the ablations swap one function of
dse.train.niti's modules for the length of the run):
  niti            Xavier-uniform init then weight_quant, the cross-entropy's division as run
  model-init      the proxy's own PyTorch init, then weight_quant (dse before issue 11)
  integer-ce      the cross-entropy's divisions truncating on integers
  exp+1           every weight exponent one up (the weights' values doubled, mantissas kept)
  wrap            an accumulator of +-128 with nothing to shift cast to int8 as the reference's
                  `.type(torch.int8)` does (+128 wraps to -128, -128 stays) instead of clipped to +-127
  eval-1024       evaluation in batches of 1024 (dse before issue 11) instead of the training batch
  fp32            SGD, lr 0.05, momentum 0.9 (the loop's default)
Prints one Markdown row per task and variant: test accuracy per seed, then validation accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
from collections.abc import Iterator

import torch

from dse.train import TrainConfig, niti, train
from dse.train.niti import layers, method, optim  # where the ablations swap a function

TASKS = {  # name: (model, dataset, epochs, batch size) as in issue 11's table
    "digits-mlp": ("mlp", "digits", 15, 64),
    "mnist5k-cnn": ("cnn", "mnist5k", 15, 64),
    "mnist1d-mlp": ("mlp", "mnist1d", 20, 100),
    "mnist1d-cnn": ("cnn", "mnist1d", 20, 100),
}
VARIANTS = ("niti", "model-init", "integer-ce", "exp+1", "wrap", "eval-1024", "fp32")


def _model_init(param: torch.Tensor, bitwidth: int, generator: torch.Generator) -> int:
    """dse before issue 11: weight_quant of the model's own initial weights."""
    with torch.no_grad():
        mantissa, exp = niti.weight_quant(param, bitwidth)
        param.copy_(mantissa.to(param.dtype) * 2.0**exp)
    return exp


def _int8_cast(m: torch.Tensor) -> torch.Tensor:
    """What the reference's int8 cast does to a value in -128..128: +128 becomes -128."""
    return torch.where(m == 128, torch.full_like(m, -128), m)


def _act_calc_wrapping(acc: torch.Tensor, bitwidth: int = niti.INT8_BITWIDTH) -> tuple[torch.Tensor, int]:
    shift = niti.range_estimate(acc) - bitwidth
    if shift > 0:
        return niti.round_shift(acc, shift, bitwidth), shift
    return _int8_cast(acc), 0


def _grad_calc_wrapping(g32: torch.Tensor, mu: int, bitwidth: int = niti.INT8_BITWIDTH) -> torch.Tensor:
    g32 = g32.to(torch.int64)
    b = niti.range_estimate(g32)
    if 0 < b and b - mu < 1:
        return _int8_cast(g32)
    return _saved_grad_calc(g32, mu, bitwidth)


_saved_grad_calc = niti.grad_calc


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    saved = (layers._init_weight, method.NitiCrossEntropy, layers.act_calc, optim.grad_calc, niti.niti_setup,
             optim.step_weight_)
    if name == "model-init":
        layers._init_weight = _model_init
    elif name == "integer-ce":
        method.NitiCrossEntropy = lambda bitwidth, generator: saved[1](bitwidth, generator, "integer")
    elif name == "exp+1":
        def one_up(param: torch.Tensor, bitwidth: int, generator: torch.Generator) -> int:
            exp = saved[0](param, bitwidth, generator)
            with torch.no_grad():
                param.mul_(2.0)
            return exp + 1
        layers._init_weight = one_up
    elif name == "wrap":  # (the update in the reference's arithmetic, which calls grad_calc)
        layers.act_calc, optim.grad_calc = _act_calc_wrapping, _grad_calc_wrapping
        optim.step_weight_ = optim.reference_step_weight_
    elif name == "eval-1024":
        def setup_1024(*args: object) -> object:
            made = saved[4](*args)
            made.eval_batch = 1024
            return made
        niti.niti_setup = setup_1024
    try:
        yield
    finally:
        (layers._init_weight, method.NitiCrossEntropy, layers.act_calc, optim.grad_calc,
         niti.niti_setup, optim.step_weight_) = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, seeds {args.seeds}")
    print("| task | variant | test accuracy per seed | validation accuracy per seed |")
    print("|---|---|---|---|")
    for task in args.tasks:
        model, dataset, epochs, batch = TASKS[task]
        for name in args.variants:
            tests, vals = [], []
            for seed in args.seeds:
                config = TrainConfig(model=model, dataset=dataset, epochs=epochs, batch_size=batch, seed=seed)
                if name != "fp32":
                    config = config.replace(format="int8", optimizer="niti")
                with variant(name):
                    result = train(config)
                tests.append(f"{100 * result.test_accuracy:.1f}")
                vals.append(f"{100 * result.val_accuracy:.1f}")
            print(f"| {task} | {name} | {' / '.join(tests)} | {' / '.join(vals)} |", flush=True)


if __name__ == "__main__":
    main()
