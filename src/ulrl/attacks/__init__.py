"""Backdoor attacks. Adding one is a one-file change: write ``attacks/<name>.py`` with a
dataclass subclass of :class:`Attack` decorated with :func:`register_attack`; every module of
this package is imported here, which registers it."""

import importlib
import pkgutil

from .base import ATTACKS, Attack, FitContext, build_attack, parse_attack_spec, register_attack

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["ATTACKS", "Attack", "FitContext", "build_attack", "parse_attack_spec", "register_attack"]
