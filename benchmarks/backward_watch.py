"""What the grouped trainer's watch on users' autograd.Function backwards costs (dse/train/grouped.py,
`_user_backwards_watched`: a mode pushed around each user Function's backward while a group trains,
which finds a Function the pre-training check did not reach). Trains one group with the watch and
the same group with the watch replaced by nothing, alternating which goes first, side by side in one
process, and prints the best time of each and their ratio (the results must be equal: the watch only
reads).

    python benchmarks/backward_watch.py                               # straight_through, int8, 4 members
    python benchmarks/backward_watch.py --model swish_on_large_batches --format fp32 --repeats 5

The networks are tests/support/user_models.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dse.train.grouped as grouped  # noqa: E402
from dse.data import load_dataset  # noqa: E402
from dse.train import TrainConfig  # noqa: E402


@contextlib.contextmanager
def _unwatched(model: Any, members: int, rows: int) -> Iterator[dict[Any, Any]]:
    yield {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="straight_through", help="tests/support/user_models.py's network")
    parser.add_argument("--format", default="int8")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    data = load_dataset("digits")
    configs = [TrainConfig(model=f"{ROOT / 'tests/support/user_models.py'}:{args.model}", dataset="digits",
                           format=args.format, epochs=args.epochs, batch_size=50, threads=1, seed=seed)
               for seed in range(args.members)]
    watched = grouped._user_backwards_watched
    runs = {"watched": watched, "unwatched": _unwatched}
    times: dict[str, list[float]] = {name: [] for name in runs}
    losses: dict[str, list[float]] = {}
    for repeat in range(args.repeats):
        for name in sorted(runs, reverse=repeat % 2 == 1):
            grouped._user_backwards_watched = runs[name]  # type: ignore[assignment]
            start = time.perf_counter()
            results = grouped.train_group(configs, data)
            times[name].append(time.perf_counter() - start)
            losses[name] = [result.final_loss for result in results]
    grouped._user_backwards_watched = watched  # type: ignore[assignment]
    best = {name: min(seconds) for name, seconds in times.items()}
    same = losses["watched"] == losses["unwatched"]
    print(f"{args.model}, {args.format}, {args.members} members, {args.epochs} epochs, "
          f"best of {args.repeats}: "
          f"watched {best['watched']:.3f} s, unwatched {best['unwatched']:.3f} s, "
          f"ratio {best['watched'] / best['unwatched']:.3f}x; same results: {same}")


if __name__ == "__main__":
    main()
