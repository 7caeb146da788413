"""Build step: ship the repository's energy_tables/ inside the installed package (dse/energy_tables).

The tables live at the top of the repository (one YAML per source, read by people as much as by dse);
a wheel or a non-editable `pip install .` has no repository around it, so `build_py` copies them into
the built `dse` package, where `dse.energy.tables.tables_dir()` finds them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

TABLES = Path(__file__).resolve().parent / "energy_tables"


class BuildPyWithTables(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "dse" / "energy_tables"
        target.mkdir(parents=True, exist_ok=True)
        for table in sorted(TABLES.glob("*.yaml")):
            shutil.copy2(table, target / table.name)


setup(cmdclass={"build_py": BuildPyWithTables})
