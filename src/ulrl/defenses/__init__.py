"""Post-training defenses: each takes (model, clean x, clean y, config) and returns (model, report).

Adding one is a one-file change: write ``defenses/<name>.py`` with a config dataclass and a run
function decorated with :func:`register_defense`; every module of this package is imported here.
"""

import importlib
import pkgutil

from .base import DEFENSES, DefenseReport, make_defense_config, register_defense, run_defense_fn

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["DEFENSES", "DefenseReport", "make_defense_config", "register_defense", "run_defense_fn"]
