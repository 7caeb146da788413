"""Training flushes denormals (dse.train.loop); block-scaled gradients with a non-nearest rounding
must train there: an E8M0 block scale of 2^-127 (a weight-gradient row of zeros) is a float32
subnormal that the CPU reads as 0, and dividing a zero block by it made the first batch NaN."""

from __future__ import annotations

import math

import pytest

from dse.train import TrainConfig, train


@pytest.mark.parametrize(("gradients", "rounding"),
                         [("mxfp8_e4m3", "stochastic"), ("mxint8", "stochastic(8)"), ("nvfp4", "stochastic")])
def test_block_scaled_gradients_with_stochastic_rounding_train_where_denormals_are_flushed(
        gradients: str, rounding: str) -> None:
    result = train(TrainConfig(model="mlp", dataset="digits", format="mxfp8_e4m3", gradients=gradients,
                               rounding=rounding, epochs=2, seed=0))
    assert not result.diverged
    assert result.epochs_run == 2 and all(math.isfinite(loss) for loss in result.loss_curve)
    assert result.test_accuracy > 0.5
