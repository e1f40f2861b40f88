"""Import this repository's model files as one package, the way transformers imports remote code.

The model files import each other relatively (``from .configuration_mambavision import ...``), as a Hub
repository requires; scripts and tests reach them through ``load()``.
"""

import importlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root, where the model files live
PACKAGE = "mambavision_hub_code"


def load(module="modeling_mambavision"):
    """Return ``module`` of this repository, imported inside the package ``mambavision_hub_code``."""
    if PACKAGE not in sys.modules:
        package = importlib.util.module_from_spec(importlib.util.spec_from_loader(PACKAGE, loader=None, is_package=True))
        package.__path__ = [str(ROOT)]
        sys.modules[PACKAGE] = package
    return importlib.import_module(f"{PACKAGE}.{module}")
