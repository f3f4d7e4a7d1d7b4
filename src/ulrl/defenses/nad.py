"""NAD: Neural Attention Distillation (Li, Lyu, Koren, Lyu, Li & Ma, "Neural Attention
Distillation: Erasing Backdoor Triggers from Deep Neural Networks", ICLR 2021).

1. **Teacher.** Fine-tune a copy of the backdoored model on the clean set for a few epochs.
2. **Student.** Fine-tune the backdoored model itself on the clean set with
   ``CE + sum_l beta_l * AT(student_l, teacher_l)``, where ``AT`` is the mean squared difference of
   the L2-normalised attention maps ``sum_c |a_c|^p`` (Zagoruyko & Komodakis' attention transfer)
   of the two networks' activations at layer ``l``. The teacher's attention is cleaner than the
   backdoored student's, and matching it erases the trigger's pull.

Layers. The paper distils at the outputs of the residual groups of a WideResNet. We choose them by
walking one forward pass: for convolutional networks, for each spatial resolution the output of
the outermost module that finishes last at that resolution (a stage's output: ``layer2..4`` of
PreAct-ResNet-18; the three conv blocks of the small CNN; the last ReLU before each pooling of
VGG), keeping the last ``len(betas)``; feature maps of 1x1 are left out (their normalised attention
is constant). For transformers (a ``Sequential``/``ModuleList`` of blocks mapping (B, N, D) tokens
to tokens) the last blocks, the attention map running over tokens. ``layers`` names them by hand.

Defaults follow BackdoorBench (``defense/nad.py``, ``config/defense/nad/config.yaml``): teacher
fine-tuned 10 epochs (SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine annealing), student
trained 10 epochs at a constant lr 0.01 (its ``adjust_learning_rate``), betas 500, 1000, 1000 from
the shallowest to the deepest of three layers, p = 2; batch 128 (BackdoorBench: 256). The ``paper``
preset follows the authors' code (``bboylyg/NAD`` ``config.py``, ``main.py``): only the deepest
layer, beta 5000, 20 student epochs at lr 0.1 for 2 epochs then 0.01, weight decay 1e-4, batch 64
(their SGD is Nesterov; ours is not).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import to_float
from ..errors import UserError
from .base import DefenseReport, Monitor, register_defense
from .ft import FTConfig, finetune, start, train_config


@dataclass
class NADConfig(FTConfig):  # the FTConfig fields set the student's attention distillation
    # Teacher: plain fine-tuning of a copy
    teacher_epochs: int = 10
    teacher_lr: float = 0.01
    # Student: attention distillation
    epochs: int = 10
    schedule: str = "constant"
    milestones: tuple[int, ...] = ()  # for schedule "step"
    betas: tuple[float, ...] = (500.0, 1000.0, 1000.0)  # one per layer, shallowest first
    p: float = 2.0  # attention map: sum over channels of |activation|^p
    layers: tuple[str, ...] = ()  # module names to distil at; empty: chosen automatically

    def __post_init__(self) -> None:
        super().__post_init__()
        self.betas = tuple(float(b) for b in self.betas)
        self.layers = tuple(self.layers)
        if not self.betas or min(self.betas) < 0:
            raise UserError(f"betas must be one or more non-negative weights, got {self.betas}")
        if self.layers and len(self.layers) != len(self.betas):
            raise UserError(f"give one beta per layer: {len(self.layers)} layers but {len(self.betas)} betas")
        if self.teacher_epochs < 0 or self.teacher_lr <= 0 or self.p <= 0:
            raise UserError("teacher_epochs must be >= 0, teacher_lr and p positive")


PRESETS: dict[str, dict[str, Any]] = {
    # the authors' code (bboylyg/NAD): beta3 = 5000 on the last group only, lr 0.1 -> 0.01 after 2 epochs
    "paper": {"betas": (0.0, 0.0, 5000.0), "epochs": 20, "lr": 0.1, "schedule": "step", "milestones": (2,),
              "weight_decay": 1e-4, "batch_size": 64},
}


def _trace(model: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, ...] | None]]:
    """(module name, output shape) of every submodule, in the order their forward passes finish."""
    outs: list[tuple[str, tuple[int, ...] | None]] = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: outs.append((n, tuple(o.shape) if isinstance(o, torch.Tensor) else None)))
             for n, m in model.named_modules() if m is not model]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(to_float(x[:2]).to(next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return outs


def attention_layers(model: nn.Module, x: torch.Tensor, count: int = 3) -> list[str]:
    """The last ``count`` stage outputs of a CNN or blocks of a transformer (see the module docstring)."""
    outs = _trace(model, x)
    shapes = dict(outs)
    for name, module in reversed(list(model.named_modules())):  # transformer blocks
        if isinstance(module, nn.Sequential | nn.ModuleList) and len(module) >= 2:
            kids = [f"{name}.{k}" if name else k for k, _ in module.named_children()]
            kid_shapes = {shapes.get(k) for k in kids}
            if len(kid_shapes) == 1 and None not in kid_shapes and len(next(iter(kid_shapes))) == 3:
                return kids[-count:]
    stages: dict[tuple[int, ...], tuple[int, int, str]] = {}  # resolution -> (position, depth, name)
    for pos, (name, shape) in enumerate(outs):
        if shape is None or len(shape) != 4 or shape[2] * shape[3] <= 1:
            continue
        depth, best = name.count("."), stages.get(shape[2:])
        if best is None or depth <= best[1]:
            stages[shape[2:]] = (pos, depth, name)
    if not stages:
        raise UserError("nad distils attention maps of convolutional stages or transformer blocks, and found "
                        "neither; name the layers with layers=...")
    return [name for _, _, name in sorted(stages.values())][-count:]


def attention_map(a: torch.Tensor, p: float) -> torch.Tensor:
    """``sum_c |a|^p`` over channels (B, C, H, W) or features (B, N, D), flattened and L2-normalised."""
    am = a.float().abs().pow(p).sum(1 if a.dim() == 4 else -1).flatten(1)
    return F.normalize(am, dim=1, eps=1e-6)


class _Features:
    """Forward hooks that keep the latest output of the named modules (only in training mode if asked)."""

    def __init__(self, model: nn.Module, names: list[str], training_only: bool) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise UserError(f"nad: the model has no layer {missing[0]!r}")
        self.out: dict[str, torch.Tensor] = {}

        def keep(name: str):
            def hook(m: nn.Module, _i: Any, o: torch.Tensor) -> None:
                if m.training or not training_only:
                    self.out[name] = o.clone()  # a copy: a later in-place op must not change it
            return hook

        self.hooks = [modules[n].register_forward_hook(keep(n)) for n in names]

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


@register_defense("nad", NADConfig, PRESETS)
def nad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: NADConfig | None = None,
        monitor: Monitor | None = None, progress: bool = True) -> tuple[nn.Module, DefenseReport]:
    """Fine-tune a teacher, then distil its attention maps into the backdoored model."""
    cfg = config or NADConfig()
    model, report = start("nad", model, y, cfg)
    layers = list(cfg.layers) or attention_layers(model, x, len(cfg.betas))
    betas = list(cfg.betas[-len(layers):])
    report.layer = ", ".join(layers)

    t0 = time.perf_counter()
    teacher = copy.deepcopy(model)
    tc = train_config(cfg, epochs=cfg.teacher_epochs, lr=cfg.teacher_lr, schedule="cosine")
    teacher_history = finetune(teacher, x, y, tc, monitor, progress, "NAD teacher")
    teacher.eval().requires_grad_(False)
    report.seconds["teacher"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    student_feats = _Features(model, layers, training_only=True)
    teacher_feats = _Features(teacher, layers, training_only=False)

    def attention_loss(xb: torch.Tensor, _logits: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher(xb)
        return sum(beta * F.mse_loss(attention_map(student_feats.out[n], cfg.p), attention_map(teacher_feats.out[n], cfg.p))
                   for n, beta in zip(layers, betas, strict=True))

    try:
        tc = train_config(cfg, milestones=cfg.milestones)
        report.relearn_history = finetune(model, x, y, tc, monitor, progress, "NAD student", penalty=attention_loss)
    finally:
        student_feats.remove()
        teacher_feats.remove()
    report.seconds["student"] = time.perf_counter() - t0
    report.seconds["total"] = report.seconds["teacher"] + report.seconds["student"]
    report.extra.update(layers=layers, betas=betas, teacher_history=teacher_history)
    if len(layers) < len(cfg.betas):
        report.notes.append(f"only {len(layers)} layer(s) found; used the last {len(layers)} beta(s)")
    return model.eval(), report


__all__ = ["NADConfig", "PRESETS", "attention_layers", "attention_map", "nad"]
