"""The benchmark scripts as modules, for the tests that run their functions (benchmarks/ is no package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str, *, keep_registered: bool = True) -> ModuleType:
    """benchmarks/<name>.py imported as module `name`, in sys.modules while it runs (its dataclasses
    look their module up) and afterwards unless `keep_registered` is False."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        if not keep_registered:
            del sys.modules[name]
    return module
