"""Low-precision training emulation: quantized GEMMs, optimizers, and the training loop.

    from dse.train import TrainConfig, train
    result = train(TrainConfig(model="mlp", dataset="digits", format="lns(8,gamma=8)",
                               optimizer="lns-madam", master_weights=False, epochs=10))

Names are imported on first use, so that `dse.train.config` (plain data, no torch) costs what it
needs: the command line reads TrainConfig's fields for `dse train`'s options on every command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dse.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from dse.train.config import OPTIMIZERS, TrainConfig, TrainingSetup, TrainResult
    from dse.train.layers import Matmul, quantize_model, set_quantization
    from dse.train.loop import evaluate, train
    from dse.train.policy import QuantPolicy, TensorQuant

_EXPORTS = {
    "OPTIMIZERS": "dse.train.config", "TrainConfig": "dse.train.config", "TrainingSetup": "dse.train.config",
    "TrainResult": "dse.train.config", "Matmul": "dse.train.layers", "quantize_model": "dse.train.layers",
    "set_quantization": "dse.train.layers", "evaluate": "dse.train.loop", "train": "dse.train.loop",
    "QuantPolicy": "dse.train.policy", "TensorQuant": "dse.train.policy",
}

__all__ = ["OPTIMIZERS", "Matmul", "QuantPolicy", "TensorQuant", "TrainConfig", "TrainResult",
           "TrainingSetup", "evaluate", "quantize_model", "set_quantization", "train"]

__getattr__ = lazy_exports(__name__, _EXPORTS)
