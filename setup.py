"""Build: install one top-level name, `dse`, from the repository's layout.

The repository keeps `dse/`, `models/`, `cli.py` and `energy_tables/` side by side (models and tables
are read by people as much as by dse). Installed, they all live inside the `dse` package, so that no
`models` or `cli` of dse's collides with another package's: `models/` is mapped to `dse.models`, and
`build_py` copies `cli.py` to `dse/cli.py` and the tables to `dse/energy_tables`, where
`dse.energy.tables.tables_dir()` finds them. In a checkout (or an editable install), `dse/__init__.py`
finds `dse.models` and `dse.cli` beside the package instead.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
TABLES = ROOT / "energy_tables"


class BuildPyWithTables(build_py):
    """The package as built, plus the command line and the energy tables."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "dse" / "energy_tables"
        target.mkdir(parents=True, exist_ok=True)
        for table in sorted(TABLES.glob("*.yaml")):
            shutil.copy2(table, target / table.name)
        shutil.copy2(ROOT / "cli.py", Path(self.build_lib) / "dse" / "cli.py")


setup(packages=[*find_packages(include=["dse", "dse.*"]), "dse.models"], package_dir={"dse.models": "models"},
      cmdclass={"build_py": BuildPyWithTables})
