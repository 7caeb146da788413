"""Import hygiene: a command pays only for the libraries it uses.

torch (1.3 s on the 2-core machine), scipy.stats (0.6 s), matplotlib (0.5 s) and pandas (0.3 s) are
most of what `dse report`, `dse export`, `--help` and a sweep rerun with nothing to train used to pay
before doing anything (docs/benchmarks.md, "Fixed costs"). Each check runs in a fresh interpreter, so
that what another test imported does not hide an import.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "scipy", "matplotlib", "pandas", "ray", "onnx")


def imported_by(code: str) -> set[str]:
    """The HEAVY libraries a fresh interpreter has imported after running `code`."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    return set(result.stdout.split())


def test_the_command_line_imports_no_heavy_library_before_a_command_runs() -> None:
    assert imported_by("import dse.cli") == set()


def test_train_config_is_plain_data_without_torch() -> None:
    """The command line builds `dse train`'s options from TrainConfig's fields on every command."""
    assert imported_by("from dse.train.config import TrainConfig") == set()


@pytest.mark.parametrize("module", ["dse.report", "dse.report.tables", "dse.report.files", "dse.sweep.store"])
def test_reading_a_store_and_writing_tables_imports_neither_torch_nor_matplotlib(module: str) -> None:
    """Matplotlib is imported by the first figure, scipy.stats by the first interval."""
    assert imported_by(f"import {module}") <= {"pandas"}


def test_choosing_tuning_points_imports_no_scipy() -> None:
    """A sweep picks its best trial among the chosen tuning points on every run (the runner's _best_of);
    choosing compares validation means and needs no confidence interval."""
    code = """
import pandas as pd
from dse.report.tables import chosen_trials
frame = pd.DataFrame({"task": ["t"] * 4, "label": ["a"] * 4, "tuning": ['{"lr": 1}', '{"lr": 1}', '{"lr": 2}',
                      '{"lr": 2}'], "status": ["ok"] * 4, "val_accuracy": [0.5, 0.6, 0.7, 0.8]})
assert list(chosen_trials(frame)["val_accuracy"]) == [0.7, 0.8]
"""
    assert imported_by(code) == {"pandas"}


def test_the_signal_handlers_cli_sets_first_import_nothing_but_signal_and_contextlib() -> None:
    """cli.py sets its handlers (dse.interrupts) before its own imports, so that a signal while `dse`
    imports says one line: that module may add no import beyond signal, contextlib and __future__
    (which cli.py imports first anyway); typing alone was 1.8 ms of -X importtime there."""
    probe = ("import sys\nimport dse\nbefore = set(sys.modules)\nimport dse.interrupts\n"
             "print(' '.join(sorted(set(sys.modules) - before)))")
    result = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    assert set(result.stdout.split()) <= {"dse.interrupts", "signal", "contextlib", "__future__"}, \
        result.stdout
