"""What the torch-function mode that quantizes functional GEMMs costs per training step, side by side.

    python benchmarks/functional_gemms.py [--steps 30] [--rounds 5] [--format int8]

The same transformer proxy (its GEMMs are Linear and Matmul modules) trains two ways: quantized
through its modules only (no mode: `quantize_model` was shown an example and found no functional
GEMM), and with the mode switched on as well (no example: the mode watches every torch call of the
forward for functional GEMMs). Both compute the same quantized step, so the ratio is the mode's own
overhead. A third row trains an equally sized nn.TransformerEncoder (its attention runs through the
mode, decomposed into four quantized GEMMs) for scale.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from dse.data import load_dataset
from dse.models.proxies import build_model
from dse.train import TrainConfig
from dse.train.loop import prepare


class TorchTransformer(nn.Module):
    """nn.TransformerEncoder on the sort task, sized like the transformer proxy."""

    def __init__(self, vocab: int, classes: int, width: int = 64, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)))


def make_step(model: nn.Module, config: TrainConfig, data, example, batch: int):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    setup = prepare(model, config, torch.Generator().manual_seed(0), example)
    order = torch.Generator().manual_seed(1)
    x, y = data.x_train, data.y_train

    def step() -> None:
        index = torch.randint(0, len(x), (batch,), generator=order)
        setup.loss_fn(setup.model(x[index]), y[index]).backward()
        setup.optimizer.step()
        setup.optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--format", default="int8")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    data = load_dataset("sort")
    config = TrainConfig(model="transformer", dataset="sort", format=args.format)
    example = data.x_train[:2]
    vocab, classes = int(data.x_train.max()) + 1, int(data.y_train.max()) + 1
    torch.manual_seed(0)
    steps = {
        "proxy, modules only": make_step(build_model("transformer", data), config, data, example, args.batch),
        "proxy, mode on": make_step(build_model("transformer", data), config, data, None, args.batch),
        "nn.TransformerEncoder": make_step(TorchTransformer(vocab, classes), config, data, example,
                                           args.batch),
    }
    times: dict[str, list[float]] = {label: [] for label in steps}
    for step in steps.values():
        for _ in range(3):
            step()
    for _ in range(args.rounds):
        for label, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[label].append((time.perf_counter() - start) / args.steps * 1e3)
    base = statistics.median(times["proxy, modules only"])
    for label, values in times.items():
        ms = statistics.median(values)
        print(f"{label:<24} {ms:8.2f} ms/step {ms / base:6.2f}x", flush=True)


if __name__ == "__main__":
    main()
