"""Cost of `batch_size_reason` (dse/train/batch_dependence.py), the check that a network's forward does
not depend on its batch's size, against one training step of the network alone (forward, backward,
SGD step at the config's batch size, fp32): CPU seconds of each, interleaved, and their ratio. The
check runs once per configuration before its groups train; a step runs thousands of times.

    python benchmarks/batch_size_check.py              # member counts 2 to 8 (group_reason's default)
    python benchmarks/batch_size_check.py --members 8  # one group size
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dse.data import load_dataset, with_validation  # noqa: E402
from dse.models.proxies import build_model  # noqa: E402
from dse.train import TrainConfig  # noqa: E402
from dse.train.batch_dependence import batch_size_reason  # noqa: E402
from dse.train.grouped import GROUP_MEMBERS, run_forwards  # noqa: E402
from dse.train.loop import EXAMPLE_SAMPLES  # noqa: E402

EXAMPLE = ROOT / "examples" / "own_model"
NETWORKS = [("mlp", "digits"), ("cnn", "digits"), ("cnn", "mnist1d"), ("resnet", "mnist1d"),
            ("transformer", "sort"), (f"{EXAMPLE}/model.py:small_resnet", f"{EXAMPLE}/data.py:digit_images")]


def _step_seconds(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    started = time.process_time()
    logits = model(x)
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
    optimizer.step()
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="*", default=list(GROUP_MEMBERS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.1f}, 1 torch thread, member counts {args.members}")
    for name, dataset in NETWORKS:
        config = TrainConfig(model=name, dataset=dataset)
        data = with_validation(load_dataset(dataset))
        model = build_model(name, data)
        forwards = run_forwards(config, data)
        x, y = data.x_train[:config.batch_size], data.y_train[:config.batch_size]
        checks, steps = [], []
        for _ in range(args.repeats):  # interleaved: the load moves both alike
            started = time.process_time()
            reason = batch_size_reason(model, data.x_train[:EXAMPLE_SAMPLES], forwards, args.members)
            checks.append(time.process_time() - started)
            steps.append(_step_seconds(model, x, y))
        check, step = min(checks), min(steps)
        label = Path(name).stem + ":" + name.split(":")[-1] if ":" in name else name
        print(f"{label:<22} {dataset.split('/')[-1]:<22} check {check:.3f} CPU s ({len(forwards)} sizes), "
              f"a training step {step:.4f} CPU s: check / step {check / step:.0f}; flagged: {reason}")


if __name__ == "__main__":
    main()
