"""Time one training step of each proxy in fp32 and under each format family, side by side.

    python benchmarks/train_step.py [--steps 40] [--rounds 5] [--threads 1] [--device cpu] [--markdown]
        [--variants fp32,mxfp8_e4m3,...] [--clock wall|cpu]

Each (proxy, format) gets its own model and optimizer; rounds interleave the variants so that load
from elsewhere on the machine hits them alike, and the median ms/step over rounds counts. Targets
(issue 4): at most 1.5x the fp32 step for FP, INT and LNS, 2x for posit and MX. A variant labelled
"(before)" runs as the step ran before the step-speed changes (benchmarks/before_step_speed.py: one
axis per block-scaled quantize call, NITI's int64 update), and a line gives today's speed-up over it.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

from dse.data import load_dataset
from dse.models.proxies import build_model
from dse.train import TrainConfig
from dse.train.layers import quantized_layers
from dse.train.loop import prepare

sys.path.insert(0, str(Path(__file__).resolve().parent))
from before_step_speed import per_axis_quantize_and_int64_update  # noqa: E402

PROXIES = (("mlp", "digits", 64), ("mlp", "mnist1d", 100), ("cnn", "mnist1d", 100), ("resnet", "digits", 64),
           ("transformer", "sort", 128))
# "no-op quantizers": every GEMM runs through the quantized layers with quantizers that return their
# input, so its row is the floor that the autograd functions alone put under every format.
NO_OP = "no-op quantizers"
VARIANTS = (
    ("fp32", {}, None),
    (NO_OP, {"format": "int8"}, None),
    ("fp8_e4m3", {"format": "fp8_e4m3"}, 1.5),
    ("int8", {"format": "int8"}, 1.5),
    ("lns8", {"format": "lns8"}, 1.5),
    ("lns8 lns-madam", {"format": "lns8", "optimizer": "lns-madam", "master_weights": False}, 1.5),
    ("posit8", {"format": "posit8"}, 2.0),
    ("posit(16,1)", {"format": "posit(16,1)"}, 2.0),
    ("mxfp8_e4m3", {"format": "mxfp8_e4m3"}, 2.0),
    ("mxfp8_e4m3 (before)", {"format": "mxfp8_e4m3"}, None),
    ("mxfp4", {"format": "mxfp4"}, 2.0),
    ("mxfp4 (before)", {"format": "mxfp4"}, None),
    ("niti", {"format": "int8", "optimizer": "niti"}, None),
    ("niti (before)", {"format": "int8", "optimizer": "niti"}, None),
)
BEFORE = " (before)"


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def make_step(label: str, model_name: str, data, dataset_name: str, batch: int, overrides: dict,  # type: ignore[no-untyped-def]
              device: torch.device):
    config = TrainConfig(model=model_name, dataset=dataset_name, batch_size=batch, device=str(device),
                         **overrides)
    torch.manual_seed(0)
    generator = torch.Generator(device).manual_seed(0)
    before = label.endswith(BEFORE)
    with per_axis_quantize_and_int64_update() if before else contextlib.nullcontext():
        setup = prepare(build_model(model_name, data).to(device), config, generator,
                        data.x_train[:2].to(device))
    if label == NO_OP:
        for module in quantized_layers(setup.model):
            quant = module.gemm_quant
            for name in ("activations", "weights", "gradients", "weight_grads"):
                if getattr(quant, name) is not None:
                    setattr(quant, name, _identity)
    x, y = data.x_train.to(device), data.y_train.to(device)
    order = torch.Generator(device).manual_seed(1)

    def step() -> None:
        index = torch.randint(0, len(x), (batch,), generator=order, device=device)
        loss = setup.loss_fn(setup.model(x[index]), y[index])
        loss.backward()
        setup.optimizer.step()
        setup.optimizer.zero_grad(set_to_none=True)

    def step_before() -> None:
        with per_axis_quantize_and_int64_update():
            step()

    return step_before if before else step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--proxies", default=",".join(f"{m}/{d}" for m, d, _ in PROXIES))
    parser.add_argument("--device", default="cpu", help="cpu or cuda; a CUDA round ends in a synchronize")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--variants", default=",".join(label for label, _, _ in VARIANTS),
                        help="comma-separated labels (fp32 always runs: the ratios' base)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time (time.process_time), on a loaded machine")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    variants = [v for v in VARIANTS if v[0] == "fp32" or v[0] in args.variants.split(",")]
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False  # as train() runs
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    wanted = set(args.proxies.split(","))
    rows = []
    for model_name, dataset_name, batch in PROXIES:
        if f"{model_name}/{dataset_name}" not in wanted:
            continue
        data = load_dataset(dataset_name)
        steps = {label: make_step(label, model_name, data, dataset_name, batch, overrides, device)
                 for label, overrides, _ in variants}
        times: dict[str, list[float]] = {label: [] for label in steps}
        for step in steps.values():
            for _ in range(3):
                step()
        for _ in range(args.rounds):
            for label, step in steps.items():
                sync()
                start = clock()
                for _ in range(args.steps):
                    step()
                sync()
                times[label].append((clock() - start) / args.steps * 1e3)
        base = statistics.median(times["fp32"])
        for label, _, target in variants:
            ms = statistics.median(times[label])
            rows.append((f"{model_name}/{dataset_name}", label, ms, ms / base, target))
            verdict = "" if target is None else ("ok" if ms / base <= target else f"over {target}x")
            proxy = f"{model_name}/{dataset_name}"
            print(f"{proxy:<20} {label:<16} {ms:8.3f} ms/step {ms / base:6.2f}x  {verdict}", flush=True)
        for label in times:
            if label.endswith(BEFORE) and label[:-len(BEFORE)] in times:
                now = label[:-len(BEFORE)]
                ratios = [b / a for a, b in zip(times[now], times[label], strict=True)]  # round by round
                speedup = statistics.median(times[label]) / statistics.median(times[now])
                print(f"{proxy:<20} {now}: before / now {speedup:.2f}x (per round {min(ratios):.2f}-"
                      f"{max(ratios):.2f}x)", flush=True)
    if args.markdown:
        print("\n| proxy | format | ms/step | vs fp32 | target |\n|---|---|---|---|---|")
        for proxy, label, ms, ratio, target in rows:
            goal = "" if target is None else f"{target}x"
            print(f"| {proxy} | {label} | {ms:.3f} | {ratio:.2f}x | {goal} |")


if __name__ == "__main__":
    main()
