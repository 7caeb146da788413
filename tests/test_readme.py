"""The README's Python example runs as written, so the first code a user copies does not rot."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_the_readme_python_example_runs(capsys) -> None:
    blocks = python_blocks(README.read_text())
    assert blocks, "README.md has no ```python block"
    threads = torch.get_num_threads()
    try:
        for block in blocks:
            exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    finally:
        torch.set_num_threads(threads)
    accuracy, diverged = capsys.readouterr().out.split()[:2]
    assert 0.5 < float(accuracy) <= 1.0 and diverged == "False"
