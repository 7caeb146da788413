"""Every ```python example in README.md and docs/*.md runs as written, so the code users copy does not
rot. Each runs in a fresh folder holding a sweep store at results/quickstart (synthetic trials), which
is what the report examples read; examples guarded by `if __name__ == "__main__"` only import."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


EXAMPLES = [(path, index, block) for path in DOCUMENTS
            for index, block in enumerate(python_blocks(path.read_text()))]


def test_the_readme_has_a_python_example() -> None:
    assert any(path.name == "README.md" for path, _, _ in EXAMPLES)


@pytest.mark.parametrize(("path", "index", "block"), EXAMPLES,
                         ids=[f"{path.name}-{index}" for path, index, _ in EXAMPLES])
def test_the_example_runs(path: Path, index: int, block: str, built_store: Path,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(built_store.parents[1])  # the folder holding results/quickstart
    threads = torch.get_num_threads()
    try:
        exec(compile(block, f"{path.name} example {index}", "exec"), {"__name__": "docs_example"})
    finally:
        torch.set_num_threads(threads)
