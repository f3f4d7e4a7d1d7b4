"""Blind Backdoors (Bagdasaryan & Shmatikov, "Blind Backdoors in Deep Learning Models",
USENIX Security 2021).

The attacker never sees the data or the model: they only compromise the *loss computation*.
Each training batch is also used for the backdoor task: triggered copies of the batch's images
labelled with the target, and the normal and backdoor losses are combined,
``L = a_normal * L_normal + a_backdoor * L_backdoor``. The trigger is the paper's (and
backdoors101's / BackdoorBench's) pixel pattern: a 5x3 patch of black, white and transparent
pixels near the top-right corner (row 3, 6 px from the right edge: columns 23-25 of a 32x32 image).

Loss balancing. The paper balances the two losses per batch with MGDA; BackdoorBench's default
is fixed scales (``normal=1.0``, ``backdoor=0.9``, the backdoor batch being a full triggered copy
of the batch). Here the batch hook appends ``rate * batch_size`` triggered copies (of randomly
ordered batch samples) to the batch, and ``fit``'s mean cross-entropy over the enlarged batch is
``(L_normal + rate * L_backdoor) / (1 + rate)``: fixed scales ``1 : rate``, with ``L_backdoor``
estimated on the copies. ``rate=0.9`` reproduces BackdoorBench's scales (at 1.9x the training
cost); the default ``rate=0.1`` keeps the overhead at 10% and already gives a near-perfect ASR.
MGDA is not used: it needs the gradients of both losses over all weights at every step (two
extra backward passes) and a per-sample loss weight that ``fit``'s single loss does not offer.
No fitted component.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from .base import BatchHook, BatchPoisoningAttack, StepHook, batch_count, register_attack

# backdoors101's pattern: 1 = white, 0 = black, -1 = transparent (the image shows through)
PATTERN = ((1, 0, 1), (-1, 1, -1), (-1, -1, 0), (-1, 1, -1), (1, 0, 1))



@register_attack
@dataclass
class Blind(BatchPoisoningAttack):
    """Loss-computation attack with the backdoors101 pixel pattern; ``rate`` = backdoor loss weight."""

    name = "blind"
    size_fields = ("top", "right")

    top: int = 3  # pattern's first row
    right: int = 6  # columns between the pattern and the right edge

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top < 0 or self.right < 0:
            raise UserError(f"blind top and right must be >= 0, got top={self.top}, right={self.right}")

    def pattern(self, channels: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, mask)``, both (C, H, W): where ``mask`` is 1 the image takes ``values``."""
        p = torch.tensor(PATTERN, dtype=torch.float32)
        ph, pw = p.shape
        r, c = self.top, width - self.right - pw
        if r + ph > height or c < 0:
            raise UserError(f"the blind pattern ({ph}x{pw} px at row {self.top}, {self.right} px from the "
                            f"right) does not fit a {height}x{width} image; lower top/right")
        values = torch.zeros(channels, height, width)
        mask = torch.zeros(channels, height, width)
        values[:, r : r + ph, c : c + pw] = p.clamp(min=0)
        mask[:, r : r + ph, c : c + pw] = (p >= 0).float()
        return values, mask

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        values, mask = (t.to(x) for t in self.pattern(c, h, w))
        return x * (1 - mask) + values * mask

    def training_hooks(self, model: nn.Module) -> tuple[BatchHook | None, StepHook | None]:
        gen = torch.Generator().manual_seed(self.seed + 1)

        def batch_hook(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            k = batch_count(len(y), self.rate, gen)
            if k == 0:
                return x, y
            idx = torch.arange(k, device=x.device) % len(y)  # the batch is already in random order
            return torch.cat([x, self.apply_trigger(x[idx])]), torch.cat([y, self.target_labels(y[idx])])

        return batch_hook, None
