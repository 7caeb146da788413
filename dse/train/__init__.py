"""Low-precision training emulation: quantized GEMMs, optimizers, and the training loop.

    from dse.train import TrainConfig, train
    result = train(TrainConfig(model="mlp", dataset="digits", format="lns(8,gamma=8)",
                               optimizer="lns-madam", master_weights=False, epochs=10))
"""

from typing import Any

from dse.train.config import OPTIMIZERS, TrainConfig, TrainingSetup, TrainResult
from dse.train.layers import Matmul, quantize_model, set_quantization
from dse.train.policy import QuantPolicy, TensorQuant

__all__ = ["OPTIMIZERS", "Matmul", "QuantPolicy", "TensorQuant", "TrainConfig", "TrainResult",
           "TrainingSetup", "evaluate", "quantize_model", "set_quantization", "train"]


def __getattr__(name: str) -> Any:
    # The loop imports the proxies, which import Matmul from here: load it on first use.
    if name in ("train", "evaluate"):
        from dse.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'dse.train' has no attribute {name!r}")
