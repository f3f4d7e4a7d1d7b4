"""BadNets (Gu et al., 2017): a small fixed patch stamped on the image."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .base import Attack, register_attack
from .patterns import checkerboard, load_image

POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")


@register_attack
@dataclass
class BadNets(Attack):
    """``pattern`` is ``solid`` (all pixels = ``value``), ``checkerboard`` or an image path."""

    name = "badnets"
    size_fields = ("patch_size", "margin")
    builtin_patterns = ("solid", "checkerboard")

    patch_size: int = 3
    position: str = "bottom-right"
    pattern: str = "solid"
    value: float = 1.0  # intensity of the solid patch (1.0 = white)
    margin: int = 0  # distance from the image border

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.position not in POSITIONS:
            raise UserError(f"badnets position must be one of {', '.join(POSITIONS)}, got {self.position!r}")
        if self.patch_size < 1:
            raise UserError(f"badnets patch_size must be >= 1, got {self.patch_size}")

    def patch(self, channels: int) -> torch.Tensor:
        s = self.patch_size
        if self.pattern == "solid":
            return torch.full((channels, s, s), float(self.value))
        if self.pattern == "checkerboard":
            return checkerboard(channels, s, s)
        return load_image(self.pattern, channels, s, s)

    def corner(self, height: int, width: int) -> tuple[int, int]:
        s, m = self.patch_size, self.margin
        if s + m > min(height, width):
            raise UserError(f"badnets patch of {s} px (+{m} margin) does not fit a {height}x{width} image")
        rows = {"top": m, "bottom": height - s - m, "center": (height - s) // 2}
        cols = {"left": m, "right": width - s - m, "center": (width - s) // 2}
        v, _, h = self.position.partition("-")
        return rows[v], cols[h or "center"]

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        r, q = self.corner(h, w)
        out = x.clone()
        out[:, :, r : r + self.patch_size, q : q + self.patch_size] = self.patch(c).to(x)
        return out
