"""Blended (Chen et al., 2017): a whole-image pattern mixed in with weight ``alpha``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .base import Attack, register_attack
from .patterns import load_image, noise


@register_attack
@dataclass
class Blended(Attack):
    """``pattern`` is ``noise`` (seeded uniform noise, ``pattern_seed``) or an image path."""

    name = "blended"
    builtin_patterns = ("noise",)

    pattern: str = "noise"
    alpha: float = 0.2
    pattern_seed: int = 1234

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.alpha <= 1.0:
            raise UserError(f"blended alpha must be in (0, 1], got {self.alpha}")

    def blend_pattern(self, channels: int, height: int, width: int) -> torch.Tensor:
        if self.pattern == "noise":
            return noise(channels, height, width, self.pattern_seed)
        return load_image(self.pattern, channels, height, width)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        return (1 - self.alpha) * x + self.alpha * self.blend_pattern(c, h, w).to(x)
