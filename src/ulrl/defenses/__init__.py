"""Post-training defenses: each takes (model, clean x, clean y, config) and returns (model, report)."""

from . import ulrl  # noqa: F401  (registers the defense)
from .base import DEFENSES, DefenseReport, register_defense

__all__ = ["DEFENSES", "DefenseReport", "register_defense"]
