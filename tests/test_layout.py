"""The installed names: dse is the only top-level package; the repository's models/ and cli.py import as
dse.models and dse.cli (setup.py maps them there when installing, dse/__init__.py in a checkout; CI's
.ci/installed_check.sh checks that a wheel installs no other top-level name)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL_IMPORT = re.compile(r"^\s*(from|import)\s+(models|cli)\b", re.MULTILINE)


def test_code_imports_models_and_cli_only_as_part_of_dse() -> None:
    folders = ("dse", "models", "tests", "benchmarks", "examples")
    offenders = [str(path.relative_to(ROOT)) for folder in folders for path in (ROOT / folder).rglob("*.py")
                 if TOP_LEVEL_IMPORT.search(path.read_text())]
    offenders += [str(path.relative_to(ROOT)) for path in [ROOT / "cli.py", *ROOT.glob("docs/**/*.md")]
                  if TOP_LEVEL_IMPORT.search(path.read_text())]
    assert offenders == []


def test_a_checkout_imports_dse_models_and_dse_cli_from_the_repository_layout() -> None:
    code = "import dse.cli, dse.models.proxies; print(dse.cli.__file__, dse.models.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "docs", capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(ROOT), "PATH": ""}).stdout.split()
    assert out == [str(ROOT / "cli.py"), str(ROOT / "models" / "__init__.py")]
