"""dse: design-space exploration of number formats for low-precision deep-learning training."""

from pathlib import Path

__version__ = "0.1.0"

_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "models" / "__init__.py").is_file() and (_CHECKOUT / "cli.py").is_file():
    # A checkout keeps models/ and cli.py beside dse/ (the repository's layout); an installed dse has
    # them inside as dse/models and dse/cli.py (setup.py). Either way they import as dse.models, dse.cli.
    __path__.append(str(_CHECKOUT))
