"""Signal: the largest classification margin each class can reach (MM-BD, Wang et al., S&P 2024).

For every class ``k`` we search input space (from random images, no clean data needed) for the
image that maximises ``logit_k - max_{j != k} logit_j``. A backdoor target can be driven to an
abnormally large margin: the trigger's features excite its logit far beyond what natural
features do. The per-class statistic is ``log`` of that maximum margin (higher is more
suspicious).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class MarginConfig:
    starts: int = 4  # random starting images per class
    steps: int = 100
    lr: float = 0.05  # Adam step on pixel values in [0, 1]


def max_margins(model: nn.Module, num_classes: int, shape: tuple[int, ...], cfg: MarginConfig, seed: int = 0,
                device: str = "cpu", progress: bool = False) -> list[float]:
    """The largest margin found for each class (over ``cfg.starts`` random starts)."""
    gen = torch.Generator().manual_seed(seed)
    model = model.eval()
    k = num_classes
    z = torch.rand(k * cfg.starts, *shape, generator=gen).to(device).requires_grad_(True)
    cls = torch.arange(k, device=device).repeat_interleave(cfg.starts)
    opt = torch.optim.Adam([z], lr=cfg.lr)
    best = torch.full((k,), -math.inf, device=device)
    rows = torch.arange(len(cls), device=device)
    for _ in tqdm(range(cfg.steps), desc="scan: max margins", disable=not progress, leave=False):
        out = model(z)
        own = out[rows, cls]
        margin = own - out.masked_fill(torch.nn.functional.one_hot(cls, k).bool(), -math.inf).max(1).values
        opt.zero_grad(set_to_none=True)
        (-margin.sum()).backward()
        opt.step()
        with torch.no_grad():
            z.clamp_(0, 1)
            best = torch.maximum(best, margin.detach().view(k, cfg.starts).max(1).values)
    return best.cpu().tolist()
