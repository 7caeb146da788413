"""Low-precision training emulation: quantized GEMMs, optimizers, and the training loop.

    from dse.train import TrainConfig, train
    result = train(TrainConfig(model="mlp", dataset="digits", format="lns(8,gamma=8)",
                               optimizer="lns-madam", master_weights=False, epochs=10))
"""

from dse.train.config import OPTIMIZERS, TrainConfig, TrainingSetup, TrainResult
from dse.train.layers import Matmul, quantize_model, set_quantization
from dse.train.loop import evaluate, train
from dse.train.policy import QuantPolicy, TensorQuant

__all__ = ["OPTIMIZERS", "Matmul", "QuantPolicy", "TensorQuant", "TrainConfig", "TrainResult",
           "TrainingSetup", "evaluate", "quantize_model", "set_quantization", "train"]

