"""FST: Feature Shift Tuning (Min, Qin, Shen & Cheng, "Towards Stable Backdoor Purification
through Feature Shift Tuning", NeurIPS 2023).

With few poisoned training samples the backdoor and clean features are entangled, and plain
fine-tuning leaves the backdoor features in place. FST re-initialises the classifier head and
fine-tunes the whole model with

    CE + alpha * <W, W_original>

(the inner product of the head's weight matrix with the original, backdoored one), which pushes
the new head away from the old direction so that the feature extractor must shift its features;
after every optimiser step the head's weight is rescaled to the original's Frobenius norm, which
keeps the penalty from being won by merely shrinking or growing the weights.

Defaults follow the authors' code (``AISafety-HKUST/stable_backdoor_purification``,
``fine_tune/ft.py`` with ``--ft_mode fst``): head weight and bias re-initialised uniformly in
``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``, alpha 0.2 (the code's default; the README's CIFAR-10
example uses 0.1), SGD lr 0.01, momentum 0.9, no weight decay, cosine annealing, 10 epochs, batch
128. All of these fit the time budget, so ``paper`` and ``default`` are the same.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..models import find_classifier
from .base import DefenseReport, Monitor, register_defense
from .ft import FTConfig, finetune, start, train_config


@dataclass
class FSTConfig(FTConfig):
    alpha: float = 0.2  # weight of the inner-product penalty <W, W_original>
    layer: str | None = None  # the head; default: the last nn.Linear
    epochs: int = 10
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha < 0:
            raise UserError(f"alpha must be >= 0, got {self.alpha}")


PRESETS: dict[str, dict[str, Any]] = {"paper": {}}  # the authors' code, see the module docstring


@torch.no_grad()
def reinit_head(layer: nn.Linear, generator: torch.Generator) -> None:
    """Weight and bias uniform in [-1/sqrt(fan_in), 1/sqrt(fan_in)], as the FST code does."""
    bound = 1.0 / math.sqrt(layer.weight.shape[1])
    layer.weight.copy_((torch.rand(layer.weight.shape, generator=generator) * 2 - 1) * bound)
    if layer.bias is not None:
        layer.bias.copy_((torch.rand(layer.bias.shape, generator=generator) * 2 - 1) * bound)


@register_defense("fst", FSTConfig, PRESETS)
def fst(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: FSTConfig | None = None,
        monitor: Monitor | None = None, progress: bool = True) -> tuple[nn.Module, DefenseReport]:
    """Re-initialise the head, fine-tune with the feature-shift penalty and the norm projection."""
    cfg = config or FSTConfig()
    model, report = start("fst", model, y, cfg)
    report.layer, head = find_classifier(model, cfg.layer)
    w_original = head.weight.detach().clone()
    norm_original = w_original.norm()
    reinit_head(head, torch.Generator().manual_seed(cfg.seed))

    def shift_penalty(*_: torch.Tensor) -> torch.Tensor:
        return cfg.alpha * (head.weight * w_original).sum()

    def project() -> None:  # back to the original head's norm after every step
        with torch.no_grad():
            head.weight.mul_(norm_original / head.weight.norm().clamp_min(1e-12))

    t0 = time.perf_counter()
    report.relearn_history = finetune(model, x, y, train_config(cfg), monitor, progress, "FST",
                                      penalty=shift_penalty, step_hook=project)
    report.seconds["finetune"] = report.seconds["total"] = time.perf_counter() - t0
    w = head.weight.detach()
    report.extra.update(head_norm=float(norm_original),
                        cosine_to_original=float(torch.cosine_similarity(w.flatten(), w_original.flatten(), dim=0)))
    return model.eval(), report


__all__ = ["FSTConfig", "PRESETS", "fst", "reinit_head"]
