"""Every formats test leaves the CPU's denormal flushing as it found it: a test that sets it
(`torch.set_flush_denormal`, as training runs) and restores the wrong state made later tests that
read float32 subnormals fail only when run after it (test_lns after test_floating's flush test)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from dse.train.denormals import flushes_denormals


@pytest.fixture(autouse=True)
def _denormal_flushing_is_restored() -> Iterator[None]:
    before = flushes_denormals()
    yield
    after = flushes_denormals()
    if after != before:
        torch.set_flush_denormal(before)  # (the next tests run as they would alone)
        pytest.fail(f"the test left denormal flushing {'on' if after else 'off'} (it found it "
                    f"{'on' if before else 'off'})")
