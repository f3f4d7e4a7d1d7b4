"""FT: vanilla fine-tuning of the whole model on the defender's clean set (the baseline of
every fine-tuning based defense; BackdoorBench ``defense/ft.py``).

BackdoorBench's configuration (``config/defense/ft/config.yaml``): SGD lr 0.01, momentum 0.9,
weight decay 5e-4, cosine annealing, batch 256, 100 epochs on 5% of the training set. Our
``default`` preset keeps the optimiser and schedule but runs 20 epochs at batch 128, the budget of
ULRL's relearning phase (an epoch of the small CNN on 600 Fashion-MNIST images took ~1.2 s on our
shared 2-core CPU, so 100 epochs would take ~2 minutes, too slow for the benchmark grid); the
``paper`` preset is BackdoorBench's 100 epochs at batch 256.

The helpers below (:func:`start`, :func:`train_config`, :func:`finetune`) are shared by the other
fine-tuning based defenses (FT-SAM, FP, NAD, FST), so each of them differs from this one only in
what the method adds.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..train import TrainConfig, fit
from .base import CommonConfig, DefenseReport, Monitor, register_defense

# TrainConfig fields that every fine-tuning defense's config carries under the same name.
SHARED_FIELDS = ("epochs", "lr", "schedule", "momentum", "weight_decay", "batch_size", "augment", "hflip",
                 "seed", "device")


@dataclass
class FTConfig(CommonConfig):
    """Plain fine-tuning; also the base of every defense that ends in a fine-tuning (FP, FT-SAM, NAD, FST)."""

    epochs: int = 20
    lr: float = 0.01
    schedule: str = "cosine"  # "cosine" | "step" | "constant"
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        check_common(self)


def check_common(cfg: Any) -> None:
    """One-line user errors for the optimiser fields every fine-tuning defense shares."""
    if cfg.epochs < 0:
        raise UserError(f"epochs must be >= 0, got {cfg.epochs}")
    if cfg.lr <= 0:
        raise UserError(f"lr must be positive, got {cfg.lr}")
    if cfg.batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.schedule not in ("cosine", "step", "constant"):
        raise UserError(f"schedule must be cosine, step or constant, got {cfg.schedule!r}")


def train_config(cfg: Any, **overrides: Any) -> TrainConfig:
    """The :class:`TrainConfig` of a defense config's shared fields, with ``overrides``."""
    return TrainConfig(**{**{k: getattr(cfg, k) for k in SHARED_FIELDS}, **overrides})


def start(name: str, model: nn.Module, y: torch.Tensor, cfg: Any) -> tuple[nn.Module, DefenseReport]:
    """A deep copy of ``model`` on the config's device (the input is never modified) and an empty report."""
    if len(y) == 0:
        raise UserError("the clean set is empty; give at least one clean image per class")
    return copy.deepcopy(model).to(cfg.device), DefenseReport(defense=name, config=asdict(cfg))


def finetune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, tc: TrainConfig, monitor: Monitor | None,
             progress: bool, desc: str, **fit_kwargs: Any) -> list[dict]:
    """:func:`ulrl.train.fit` with the harness's monitor recorded in each epoch's record; returns the records."""

    def record(epoch: int, rec: dict) -> None:
        if monitor is not None:
            rec.update(monitor(model))

    return fit(model, x, y, tc, on_epoch=record, desc=desc, progress=progress, **fit_kwargs).epochs


PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"epochs": 100, "batch_size": 256},  # BackdoorBench config/defense/ft/config.yaml
}


@register_defense("ft", FTConfig, PRESETS)
def fine_tune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: FTConfig | None = None,
              monitor: Monitor | None = None, progress: bool = True) -> tuple[nn.Module, DefenseReport]:
    """Fine-tune all of ``model``'s weights on the clean images ``x`` and labels ``y``."""
    cfg = config or FTConfig()
    model, report = start("ft", model, y, cfg)
    t0 = time.perf_counter()
    report.relearn_history = finetune(model, x, y, train_config(cfg), monitor, progress, "FT")
    report.seconds["finetune"] = report.seconds["total"] = time.perf_counter() - t0
    return model.eval(), report


__all__ = ["FTConfig", "PRESETS", "check_common", "fine_tune", "finetune", "start", "train_config"]
