"""The most CPU memory torch holds at once while a run runs (grouped training's memory tests)."""

from __future__ import annotations

from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile


def peak_bytes(run: Callable[[], object]) -> int:
    """The most CPU memory torch held at once while `run` ran (the profiler's allocations and frees,
    op by op, in time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        run()
    held = peak = 0
    events = [e for e in profiler.events() if e.self_cpu_memory_usage]
    for event in sorted(events, key=lambda e: e.time_range.start):
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak
