"""WaNet (Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021).

The trigger is a fixed, smooth warping field: a random ``k x k`` grid of 2-D control offsets,
normalised to mean absolute value 1, upsampled bicubically to the image size and added, scaled
by ``s / image_size``, to the identity sampling grid of :func:`torch.nn.functional.grid_sample`.
The attacker controls training: in each batch a fraction ``rate`` of the samples is warped and
relabelled to the target, and (noise mode) a further ``cross_ratio * rate`` is warped with the
field plus per-pixel random noise and keeps its label, so the network learns the exact warp
rather than "any warp".

Defaults are the paper's and BackdoorBench's (``config/attack/wanet/default.yaml``): ``k=4``,
``s=0.5``, ``grid_rescale=1``, ``rate=0.1`` (rho_a), ``cross_ratio=2`` (rho_n = 0.2), noise mode.
The fitted component is the seeded control grid, saved with the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .base import (
    BatchHook,
    BatchPoisoningAttack,
    FitContext,
    StepHook,
    batch_count,
    register_attack,
)


@register_attack
@dataclass
class WaNet(BatchPoisoningAttack):
    """Warping-based trigger; ``k`` control points per side, strength ``s``, noise-mode cross samples."""

    name = "wanet"
    size_fields = ("k",)
    fitted = True

    k: int = 4  # control grid size
    s: float = 0.5  # warping strength
    grid_rescale: float = 1.0
    cross_ratio: float = 2.0  # noise (cross) samples per batch = cross_ratio * rate; 0 disables noise mode

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 2:
            raise UserError(f"wanet k must be >= 2 (control points per side), got {self.k}")
        if self.s <= 0:
            raise UserError(f"wanet s (warping strength) must be positive, got {self.s}")
        if self.cross_ratio < 0 or self.rate * (1 + self.cross_ratio) > 1:
            raise UserError(f"wanet needs 0 <= cross_ratio and rate * (1 + cross_ratio) <= 1, "
                            f"got rate={self.rate}, cross_ratio={self.cross_ratio}")
        self._grid: torch.Tensor | None = None

    # --- the fitted component --------------------------------------------------------------
    def prepare(self, x: torch.Tensor, y: torch.Tensor, ctx: FitContext | None = None) -> None:
        """Draw the seeded ``(1, 2, k, k)`` control grid (uniform in [-1, 1], mean |.| = 1)."""
        gen = torch.Generator().manual_seed(self.seed)
        ins = torch.rand(1, 2, self.k, self.k, generator=gen) * 2 - 1
        self._grid = ins / ins.abs().mean()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self._grid is None else {"grid": self._grid.clone()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        grid = tensors.get("grid")
        if grid is None or tuple(grid.shape) != (1, 2, self.k, self.k) or set(tensors) != {"grid"}:
            raise UserError(f"the checkpoint's wanet component does not match the attack spec (expected one "
                            f"(1, 2, {self.k}, {self.k}) control grid); re-train with `ulrl train`")
        self._grid = grid.detach().float().cpu().clone()

    # --- the trigger -----------------------------------------------------------------------
    def sampling_grid(self, height: int, width: int) -> torch.Tensor:
        """The warped sampling grid ``(1, H, W, 2)`` for :func:`F.grid_sample` (align_corners=True)."""
        if self._grid is None:
            raise UserError("the wanet warping field is not fitted; run attack.prepare(...) or train "
                            "the model with `ulrl train`, which saves it in the checkpoint")
        noise = F.interpolate(self._grid, size=(height, width), mode="bicubic", align_corners=True)
        noise = noise.permute(0, 2, 3, 1)  # (1, H, W, 2): (x offset, y offset)
        ys, xs = torch.linspace(-1, 1, height), torch.linspace(-1, 1, width)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        identity = torch.stack((gx, gy), dim=2).unsqueeze(0)
        scale = torch.tensor([float(width), float(height)])  # the paper divides by the image size
        return ((identity + self.s * noise / scale) * self.grid_rescale).clamp(-1, 1)

    def warp(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Warp ``x`` with the field; ``noise`` (N, H, W, 2) in [-1, 1] perturbs it (cross samples)."""
        n, _, h, w = x.shape
        grid = self.sampling_grid(h, w).to(x)
        grid = grid.expand(n, h, w, 2)
        if noise is not None:
            grid = (grid + noise.to(x) / torch.tensor([float(w), float(h)]).to(x)).clamp(-1, 1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True).clamp(0, 1)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self.warp(x)

    # --- training-time control ---------------------------------------------------------------
    def training_hooks(self, model: nn.Module) -> tuple[BatchHook | None, StepHook | None]:
        if self._grid is None:
            self.prepare(torch.empty(0), torch.empty(0))
        gen = torch.Generator().manual_seed(self.seed + 1)

        def batch_hook(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            n = len(y)
            nb = batch_count(n, self.rate, gen)
            nc = min(batch_count(n, self.rate * self.cross_ratio, gen), n - nb)
            x, y = x.clone(), y.clone()
            if nb:
                x[:nb] = self.warp(x[:nb])
                y[:nb] = self.target_labels(y[:nb])
            if nc:
                _, _, h, w = x.shape
                noise = torch.rand(nc, h, w, 2, generator=gen) * 2 - 1
                x[nb : nb + nc] = self.warp(x[nb : nb + nc], noise)
            return x, y

        return batch_hook, None
