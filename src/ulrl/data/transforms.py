"""Batched, vectorised image augmentation on tensors (no PIL, no per-sample Python loop)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]; float images are returned as they are (never modified)."""
    if x.is_floating_point():
        return x
    return x.to(torch.float32).div_(255)


def augment(
    x: torch.Tensor,
    pad: int | None = None,
    hflip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random crop with zero padding (``pad`` pixels, default H // 8) and, if ``hflip``, a random
    horizontal flip, drawn independently per sample of the batch ``x`` (N, C, H, W).

    Returns a new tensor of the same shape and dtype (``x`` itself when pad is 0 and hflip is off).
    """
    n, c, h, w = x.shape
    pad = max(1, h // 8) if pad is None else int(pad)
    if (pad == 0 and not hflip) or n == 0:
        return x
    device = generator.device if generator is not None else x.device
    oy = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator, device=device).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator, device=device).to(x.device)
    cols = torch.arange(w, device=x.device).expand(n, w)
    if hflip:
        flip = torch.rand(n, 1, generator=generator, device=device).to(x.device) < 0.5
        cols = torch.where(flip, w - 1 - cols, cols)
    rows = oy + torch.arange(h, device=x.device)
    cols = ox + cols
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    index = (
        (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    )
    return padded.flatten(2).gather(2, index).view(n, c, h, w)
