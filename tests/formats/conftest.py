"""Every formats test leaves the CPU's denormal flushing as it found it: a test that sets it
(`torch.set_flush_denormal`, as training runs) and restores the wrong state made later tests that
read float32 subnormals fail only when run after it (test_lns after test_floating's flush test)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


def _flushes_denormals() -> bool:
    """Whether this thread flushes float32 denormals (set_flush_denormal returns support, not state)."""
    return bool(torch.tensor([1e-39]).mul(1.0)[0] == 0)


@pytest.fixture(autouse=True)
def _denormal_flushing_is_restored() -> Iterator[None]:
    before = _flushes_denormals()
    yield
    after = _flushes_denormals()
    if after != before:
        torch.set_flush_denormal(before)  # (the next tests run as they would alone)
        pytest.fail(f"the test left denormal flushing {'on' if after else 'off'} (it found it "
                    f"{'on' if before else 'off'})")
