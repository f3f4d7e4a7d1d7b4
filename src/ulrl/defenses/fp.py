"""FP: Fine-Pruning (Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against Backdooring
Attacks on Deep Neural Networks", RAID 2018).

Backdoor behaviour tends to live in channels of the last convolutional layer that stay dormant on
clean inputs. Fine-Pruning

1. records the mean activation of each channel of the last convolutional feature map over the
   clean set,
2. prunes channels in increasing order of that activation, a step of ``prune_step`` (a fraction
   of the channels) at a time, as long as the clean-set accuracy stays within ``acc_ratio``
   (relative) of the unpruned model's, keeping the last pruning that did,
3. fine-tunes the pruned model on the clean set, the pruned channels held at zero.

Where a channel is cut (as BackdoorBench ``defense/fp.py`` does): the last convolutional feature
map reaches the classifier part of the network through pooling or flattening only, so channel
``c`` is exactly the block of input columns of the first ``nn.Linear`` that follows
(``c * H * W ... (c + 1) * H * W - 1``; one column after global pooling). Pruning zeroes those
columns: the channel is gone from the network's function, BatchNorm needs no special care, and the
mask is plain zeros in the returned state dict (re-applied after every fine-tuning step). For the
small CNN this is the third conv block's output (after BN-ReLU-pool) feeding ``hidden``; for
PreAct-ResNet-18 and VGG-19-BN the pooled last stage feeding the first linear layer. A ViT's only
convolution is its patch embedding, which feeds tokens, not a linear layer through pooling: FP
refuses it.

Defaults follow BackdoorBench (``config/defense/fp/cifar10.yaml``): ``acc_ratio`` 0.1 (stop
before the clean accuracy drops by 10% relative), ``once_prune_ratio`` 0.01 (1% of the channels a
step), then fine-tuning with SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine annealing, 100
epochs at batch 256 (``paper`` preset; ``default``: 20 epochs at batch 128, the FT budget).
BackdoorBench measures the accuracy during pruning on the clean *test* set; a defender only has
its clean set, so we measure it there (the paper's "validation data").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data.transforms import to_float
from ..errors import UserError
from ..metrics import accuracy
from .base import DefenseReport, Monitor, register_defense
from .ft import FTConfig, finetune, start, train_config


@dataclass
class FPConfig(FTConfig):  # the FTConfig fields set the fine-tuning after pruning
    acc_ratio: float = 0.1  # largest tolerated relative drop of clean-set accuracy while pruning
    prune_step: float = 0.01  # fraction of the channels pruned per step (BackdoorBench once_prune_ratio)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.acc_ratio <= 1.0:
            raise UserError(f"acc_ratio must be in [0, 1], got {self.acc_ratio}")
        if not 0.0 < self.prune_step <= 1.0:
            raise UserError(f"prune_step must be in (0, 1], got {self.prune_step}")


PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"epochs": 100, "batch_size": 256},  # BackdoorBench config/defense/fp/cifar10.yaml
}


@dataclass
class PruneSite:
    """Where the last convolutional feature map (C, H, W) meets the first linear layer after it."""

    feature: str  # module whose output is that feature map
    linear_name: str
    linear: nn.Linear
    channels: int
    group: int  # linear input columns per channel (H * W, or 1 after global pooling)

    def columns(self, channels: torch.Tensor) -> torch.Tensor:
        """Input columns of the linear layer that carry the given channels."""
        offsets = torch.arange(self.group)
        return (channels[:, None] * self.group + offsets).flatten()


def find_prune_site(model: nn.Module, x: torch.Tensor) -> PruneSite:
    """Trace one forward pass to find the last ``nn.Conv2d``, the last 4-D feature map after it and
    the first ``nn.Linear`` that takes that map, flattened or globally pooled, as its input."""
    names = {m: n for n, m in model.named_modules()}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UserError("fp prunes channels of the last convolutional layer, but the model has no nn.Conv2d")
    events: list[tuple[str, nn.Module, Any]] = []  # ("out", module, output) / ("in", linear, input)
    hooks = [m.register_forward_hook(lambda m, i, o: events.append(("out", m, o))) for m in names if m is not model]
    hooks += [m.register_forward_pre_hook(lambda m, i: events.append(("in", m, i[0])))
              for m in names if isinstance(m, nn.Linear)]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(to_float(x[:2]).to(next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    last_conv = max((i for i, (kind, m, _) in enumerate(events) if kind == "out" and isinstance(m, nn.Conv2d)),
                    default=None)
    if last_conv is None:
        raise UserError("fp: no convolutional layer ran in the model's forward pass")
    feature = None
    for kind, m, t in events[last_conv:]:
        if kind == "out" and isinstance(t, torch.Tensor) and t.dim() == 4:
            feature = (names[m], t.shape[1:])
        elif kind == "in":
            break
    else:
        raise UserError("fp: no nn.Linear layer follows the last convolutional layer")
    linear_in = t
    c, h, w = feature[1]
    if linear_in.dim() != 2 or linear_in.shape[1] != c * h * w:
        raise UserError(f"fp: the last convolutional feature map ({c}x{h}x{w}, {feature[0]}) does not feed "
                        f"{names[m]} through pooling or flattening (its input is {tuple(linear_in.shape[1:])}); "
                        "fine-pruning needs a convolutional network (use another defense for this model)")
    return PruneSite(feature[0], names[m], m, c, h * w)


@torch.no_grad()
def channel_activations(model: nn.Module, site: PruneSite, x: torch.Tensor, device: str,
                        batch_size: int = 512) -> torch.Tensor:
    """Mean activation of each channel of the feature map over the clean images ``x``."""
    module = dict(model.named_modules())[site.feature]
    total = torch.zeros(site.channels, dtype=torch.float64)

    def accumulate(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
        total.add_(out.detach().double().sum((0, 2, 3)).cpu())

    hook = module.register_forward_hook(accumulate)
    try:
        model.eval()
        for i in range(0, len(x), batch_size):
            model(to_float(x[i: i + batch_size]).to(device))
    finally:
        hook.remove()
    return (total / (len(x) * site.group)).float()


@register_defense("fp", FPConfig, PRESETS)
def fine_prune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: FPConfig | None = None,
               monitor: Monitor | None = None, progress: bool = True) -> tuple[nn.Module, DefenseReport]:
    """Prune the least active channels of the last conv feature map while the clean-set accuracy
    holds, then fine-tune with the pruned channels held at zero."""
    cfg = config or FPConfig()
    model, report = start("fp", model, y, cfg)
    site = find_prune_site(model, x)
    report.layer = site.linear_name

    # Pruning: cumulative, least active channels first, stop before the accuracy drops too far.
    t0 = time.perf_counter()
    order = channel_activations(model, site, x, cfg.device).argsort()
    weight = site.linear.weight
    original = weight.detach().clone()
    base_acc = accuracy(model, x, y, cfg.device)
    step = max(1, math.ceil(site.channels * cfg.prune_step))
    kept, kept_acc, history = 0, base_acc, [{"pruned": 0, "clean_acc": base_acc}]
    for n in range(step, site.channels, step):  # as BackdoorBench: never every channel
        with torch.no_grad():
            weight[:, site.columns(order[:n]).to(weight.device)] = 0.0
        acc = accuracy(model, x, y, cfg.device)
        history.append({"pruned": n, "clean_acc": acc})
        if base_acc - acc >= cfg.acc_ratio * base_acc:
            break
        kept, kept_acc = n, acc
    pruned = order[:kept].sort().values
    cols = site.columns(pruned).to(weight.device)
    with torch.no_grad():
        weight.copy_(original)
        weight[:, cols] = 0.0
    report.seconds["prune"] = time.perf_counter() - t0

    # Fine-tuning, the pruned columns re-zeroed after every optimiser step.
    def keep_pruned() -> None:
        with torch.no_grad():
            weight[:, cols] = 0.0

    t0 = time.perf_counter()
    report.relearn_history = finetune(model, x, y, train_config(cfg), monitor, progress, "FP fine-tune",
                                      step_hook=keep_pruned)
    report.seconds["finetune"] = time.perf_counter() - t0
    report.seconds["total"] = report.seconds["prune"] + report.seconds["finetune"]
    report.extra.update(feature=site.feature, channels=site.channels, pruned_channels=pruned.tolist(),
                        pruned_fraction=kept / site.channels, clean_acc_before=base_acc,
                        clean_acc_pruned=kept_acc, prune_history=history)
    report.notes.append(f"pruned {kept}/{site.channels} channels of {site.feature} (inputs of {site.linear_name})")
    return model.eval(), report


__all__ = ["FPConfig", "PRESETS", "PruneSite", "channel_activations", "find_prune_site", "fine_prune"]
