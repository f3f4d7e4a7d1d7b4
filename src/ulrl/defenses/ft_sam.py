"""FT-SAM: fine-tuning with sharpness-aware minimisation (Zhu, Wei, Shen, Fan & Wu, "Enhancing
Fine-Tuning Based Backdoor Defense with Sharpness-Aware Minimization", ICCV 2023).

Backdoor-related neurons tend to have large weight norms and sit in a sharp region that plain
fine-tuning on a few clean samples barely moves them out of. FT-SAM fine-tunes on the clean set
with adaptive SAM (ASAM, Kwon et al. 2021): each step takes the gradient at the worst-case
weights ``w + e`` within radius ``rho`` (``e`` scaled elementwise by ``|w|``), which shrinks the
large-norm neurons. The SAM step lives in the one training loop (``TrainConfig.sam_rho`` /
``sam_adaptive`` in :func:`ulrl.train.fit`).

Defaults follow the authors' code in BackdoorBench (``defense/ft-sam.py``,
``config/defense/ft-sam/cifar10.yaml``): ASAM (``--adaptive`` is on by default there), rho 2.0
for CIFAR-10 (8.0 for GTSRB and Tiny-ImageNet), label smoothing 0.1 (CIFAR-10; 0 for the others),
SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine annealing. BackdoorBench trains 100 epochs at
batch 256 (``paper`` preset); the ``default`` preset runs 20 epochs at batch 128 (the FT budget,
each SAM step costing two forward/backward passes). Label smoothing is the smoothed cross-entropy
of that code (``1 - s`` on the true class, ``s / (K - 1)`` on each other class), added to fit's
cross-entropy as a penalty term.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .base import DefenseReport, Monitor, register_defense
from .ft import FTConfig, finetune, start, train_config


@dataclass
class FTSAMConfig(FTConfig):
    rho: float = 2.0  # SAM radius (BackdoorBench: 2 for CIFAR-10, 8 for GTSRB / Tiny-ImageNet)
    adaptive: bool = True  # ASAM: perturbation scaled elementwise by |w|
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rho < 0:
            raise UserError(f"rho must be >= 0, got {self.rho}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"epochs": 100, "batch_size": 256},  # BackdoorBench config/defense/ft-sam/cifar10.yaml
}


def label_smoothing_penalty(smoothing: float):
    """``penalty(x, logits, y)`` that turns fit's cross-entropy into the smoothed cross-entropy with
    ``1 - s`` on the true class and ``s / (K - 1)`` on every other class."""

    def penalty(_x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=1)
        true = logp.gather(1, y[:, None]).squeeze(1)
        others = (logp.sum(1) - true) / max(logits.shape[1] - 1, 1)
        return smoothing * (true - others).mean()  # (1 - s) * (-true) + s * (-others) - (-true)

    return penalty


@register_defense("ft-sam", FTSAMConfig, PRESETS)
def ft_sam(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: FTSAMConfig | None = None,
           monitor: Monitor | None = None, progress: bool = True) -> tuple[nn.Module, DefenseReport]:
    """Fine-tune ``model`` on the clean set with (adaptive) SAM."""
    cfg = config or FTSAMConfig()
    model, report = start("ft-sam", model, y, cfg)
    t0 = time.perf_counter()
    tc = train_config(cfg, sam_rho=cfg.rho, sam_adaptive=cfg.adaptive)
    penalty = label_smoothing_penalty(cfg.label_smoothing) if cfg.label_smoothing > 0 else None
    report.relearn_history = finetune(model, x, y, tc, monitor, progress, "FT-SAM", penalty=penalty)
    report.seconds["finetune"] = report.seconds["total"] = time.perf_counter() - t0
    return model.eval(), report


__all__ = ["FTSAMConfig", "PRESETS", "ft_sam", "label_smoothing_penalty"]
