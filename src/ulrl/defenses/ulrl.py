"""ULRL: UnLearn and ReLearn (Min, Pham & Sun, arXiv 2405.14781).

Given a possibly backdoored classifier and a few clean samples:

1. **Unlearn.** Maximise the cross-entropy on the clean set (gradient ascent) until the
   clean accuracy of an epoch falls to the clean threshold. A backdoored network collapses
   toward its target class, so the neurons that carry the backdoor move the most.
2. **Score.** Each neuron of the examined layer (a row of the classifier) is scored by the
   summed absolute change of its incoming weights; a robust (median/MAD) outlier test flags
   the suspicious ones.
3. **Restore and re-initialise.** Go back to the original weights and re-initialise only the
   flagged neurons.
4. **Relearn.** Fine-tune on the clean set with a cosine-similarity penalty that pushes each
   flagged neuron away from its original (backdoored) direction.

The ``paper`` preset is the authors' reference configuration. The ``default`` preset adds two
things we found necessary with 1% of the data (see docs/method.md): a *second look* (unlearn again
with the first collapse's class masked, since a network can also collapse onto a natural
attractor class that is not the backdoor's target) and a floor (``cos_margin``) on the cosine
penalty, so relearned rows are pushed away from their old direction but not to its opposite.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..metrics import accuracy
from ..models import find_classifier
from ..train import TrainConfig, fit
from .base import DefenseReport, Monitor, make_defense_config, register_defense, split_holdout


@dataclass
class ULRLConfig:
    # Phase 1: unlearning (gradient ascent on the clean set)
    unlearn_lr: float = 0.01
    unlearn_epochs: int = 20
    unlearn_milestones: tuple[int, ...] = (10, 20)
    clean_threshold: float = 0.2  # stop once an epoch's clean accuracy is <= this
    grad_clip: float = 20.0
    unlearn_freeze_bn: bool = False  # keep BatchNorm statistics fixed while unlearning
    # Scoring: median/MAD outlier test on per-neuron weight change
    layer: str | None = None  # examined layer; default: the last nn.Linear (the classifier)
    mad_threshold: float = 3.5
    max_neurons: int = 2
    second_look: bool = False  # unlearn again with the flagged classes masked; flag that collapse too
    second_look_freeze_bn: bool = False  # BatchNorm statistics fixed during the second look
    # Phase 2: relearning with the cosine-similarity penalty
    relearn_lr: float = 0.005
    relearn_epochs: int = 20
    alpha: float = 0.7  # weight of the cosine penalty
    cos_margin: float = -1.0  # penalise cos(w_k, w_k_original) only above this (-1: always, as the paper)
    # Shared optimiser settings
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    augment: bool = True
    hflip: bool = True
    # Our additions (off in the paper preset)
    holdout: float = 0.0  # fraction of the clean set held out to select the relearning epoch
    freeze_bn: bool = False  # keep BatchNorm statistics of the original model while relearning
    backbone_lr_scale: float = 1.0  # relearning lr of every layer but the examined one, relative
    distill: float = 0.0  # weight of distilling the original model's non-flagged logits
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not 0.0 <= self.holdout < 1.0:
            raise UserError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.max_neurons < 0 or self.relearn_epochs < 0 or self.unlearn_epochs < 0:
            raise UserError("max_neurons, unlearn_epochs and relearn_epochs must be >= 0")


PRESETS: dict[str, dict] = {
    "paper": {},  # the reference implementation's defaults (CIFAR-10)
    "default": {"second_look": True, "cos_margin": -0.3},  # see docs/method.md
}


def make_config(preset: str = "default", **overrides) -> ULRLConfig:
    return make_defense_config("ulrl", preset, **overrides)


# --- the pieces of the method ----------------------------------------------------------------
def neuron_scores(w_before: torch.Tensor, w_after: torch.Tensor) -> torch.Tensor:
    """Per-neuron (row) summed absolute weight change."""
    return (w_after - w_before).abs().flatten(1).sum(1)


def mad_outliers(scores: torch.Tensor, threshold: float = 3.5, cap: int = 2) -> tuple[list[int], torch.Tensor]:
    """Robust z-scores ``|s - median| / (1.4826 * MAD)``; flag rows with z > threshold and a
    score above the median, highest score first, at most ``cap``. Returns (flagged, z)."""
    s = scores.double()
    med = s.median()
    dev = (s - med).abs()
    mad = dev.median()
    if mad > 0:
        z = dev / (1.4826 * mad)
    else:  # more than half the scores are equal: any other score is an outlier
        z = torch.where(dev > 0, torch.full_like(dev, math.inf), torch.zeros_like(dev))
    suspicious = ((z > threshold) & (s > med)).nonzero().flatten()
    ranked = suspicious[s[suspicious].argsort(descending=True)]
    return ranked[:cap].tolist(), z.float()


class _MaskLogits(nn.Module):
    """The model with some classes' logits pinned very low, so unlearning cannot collapse onto them."""

    def __init__(self, model: nn.Module, classes: list[int]) -> None:
        super().__init__()
        self.model, self.classes = model, classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x).clone()
        out[:, self.classes] = -1e4
        return out


def unlearn(model: nn.Module, layer: nn.Linear, x: torch.Tensor, y: torch.Tensor, cfg: ULRLConfig, shared: dict,
            masked: list[int], freeze_bn: bool, monitor: Monitor | None, progress: bool) -> tuple[torch.Tensor, list[dict]]:
    """Gradient ascent on the clean set until an epoch's accuracy is <= the clean threshold
    (BatchNorm on batch statistics, or on the model's running statistics with ``freeze_bn``).

    Returns the per-neuron scores of ``layer`` and the per-epoch history. Classes in ``masked``
    (and their samples) are left out, and their scores are set to the median of the others.
    """
    w_before = layer.weight.detach().clone()
    net = model
    if masked:
        keep = ~torch.isin(y, torch.tensor(masked))
        x, y, net = x[keep], y[keep], _MaskLogits(model, masked)

    def collapsed(epoch: int, record: dict) -> bool:
        if monitor is not None:
            record.update(monitor(model))
        return record["train_acc"] <= cfg.clean_threshold

    tc = TrainConfig(epochs=cfg.unlearn_epochs, lr=cfg.unlearn_lr, schedule="step", milestones=cfg.unlearn_milestones,
                     grad_clip=cfg.grad_clip, freeze_bn=freeze_bn, **shared)
    hist = fit(net, x, y, tc, ascent=True, on_epoch=collapsed, desc="ULRL unlearn", progress=progress)
    scores = neuron_scores(w_before, layer.weight.detach())
    if masked:
        others = torch.ones(len(scores), dtype=torch.bool)
        others[masked] = False
        scores[masked] = scores[others].median()
    return scores, hist.epochs


@torch.no_grad()
def reinitialise(layer: nn.Linear, rows: list[int], generator: torch.Generator) -> None:
    """He-style uniform re-initialisation of the given rows: U(-std, std), std = sqrt(2/fan_in); bias 0."""
    if not rows:
        return
    std = math.sqrt(2.0 / layer.weight.shape[1])
    new = (torch.rand(len(rows), layer.weight.shape[1], generator=generator) * 2 - 1) * std
    layer.weight[rows] = new.to(layer.weight)
    if layer.bias is not None:
        layer.bias[rows] = 0.0


def cosine_penalty(layer: nn.Linear, w_original: torch.Tensor, rows: list[int], alpha: float, margin: float = -1.0):
    """``alpha * sum_k max(cos(w_k, w_k_original), margin)`` over the flagged rows: minimising it
    pushes each relearned row away from its backdoored direction (down to ``margin``; the paper's
    penalty has no floor, ``margin = -1``)."""
    target = w_original[rows].to(layer.weight.device)

    def penalty(*_) -> torch.Tensor:
        cos = F.cosine_similarity(layer.weight[rows], target, dim=1)
        return alpha * cos.clamp(min=margin).sum()

    return penalty


def with_distillation(penalty, teacher: nn.Module, flagged: list[int], beta: float):
    """Add ``beta * KL(teacher || student)`` over the non-flagged classes to ``penalty``; the
    teacher is the original model, a good classifier on clean images for every class but the flagged."""
    teacher = teacher.eval().requires_grad_(False)

    def total(x: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = teacher(x)
        keep = torch.ones(out.shape[1], dtype=torch.bool, device=out.device)
        keep[flagged] = False
        kd = F.kl_div(F.log_softmax(out[:, keep], 1), F.log_softmax(t[:, keep], 1), log_target=True, reduction="batchmean")
        return beta * kd + (penalty(x, out, y) if penalty is not None else 0.0)

    return total


# --- the method --------------------------------------------------------------------------------
@register_defense("ulrl", ULRLConfig, PRESETS)
def purify(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: ULRLConfig | None = None,
    monitor: Monitor | None = None,
    progress: bool = True,
) -> tuple[nn.Module, DefenseReport]:
    """Repair ``model`` with ULRL using clean images ``x`` (uint8 or float in [0, 1]) and labels ``y``.

    Returns a new model (the input is not modified) and a :class:`DefenseReport`.
    """
    cfg = config or ULRLConfig()
    if len(y) == 0:
        raise UserError("the clean set is empty; give at least one clean image per class")
    model = copy.deepcopy(model).to(cfg.device)
    layer_name, layer = find_classifier(model, cfg.layer)
    report = DefenseReport(defense="ulrl", config=asdict(cfg), layer=layer_name)
    gen = torch.Generator().manual_seed(cfg.seed)
    shared = dict(momentum=cfg.momentum, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size,
                  augment=cfg.augment, hflip=cfg.hflip, seed=cfg.seed, device=cfg.device)
    train_pos, held_pos = split_holdout(y, cfg.holdout, cfg.seed)
    x_train, y_train, x_held, y_held = x[train_pos], y[train_pos], x[held_pos], y[held_pos]
    original_state = copy.deepcopy(model.state_dict())
    w_original = layer.weight.detach().clone()

    # Phase 1: unlearn until the clean accuracy collapses, score the neurons, flag the outliers.
    t0 = time.perf_counter()
    scores, report.unlearn_history = unlearn(model, layer, x_train, y_train, cfg, shared, [], cfg.unlearn_freeze_bn,
                                                 monitor, progress)
    report.unlearn_epochs = len(report.unlearn_history)
    if report.unlearn_history and report.unlearn_history[-1]["train_acc"] > cfg.clean_threshold:
        report.notes.append(f"unlearning did not reach the clean threshold {cfg.clean_threshold} in {cfg.unlearn_epochs} epochs")
    flagged, z = mad_outliers(scores, cfg.mad_threshold, cfg.max_neurons)
    if cfg.second_look and flagged and len(flagged) < cfg.max_neurons:
        # A network can also collapse onto a "natural attractor" class that is not the backdoor's
        # target. Look again with the flagged classes masked out, and flag that collapse too.
        model.load_state_dict(original_state)
        scores2, _ = unlearn(model, layer, x_train, y_train, cfg, shared, flagged, cfg.second_look_freeze_bn,
                             None, progress)
        more, z2 = mad_outliers(scores2, cfg.mad_threshold, cfg.max_neurons - len(flagged))
        report.notes.append(f"second look with classes {flagged} masked flagged {more}")
        report.second_look_z_scores = z2.tolist()
        flagged = flagged + more
    report.scores, report.z_scores, report.flagged = scores.tolist(), z.tolist(), flagged
    if not flagged:
        report.notes.append("no suspicious neuron found: relearning is plain fine-tuning")
    report.seconds["unlearn"] = time.perf_counter() - t0

    # Phase 2: restore the original weights, re-initialise the flagged neurons, relearn with the
    # cosine penalty pushing them away from their original (backdoored) direction.
    t0 = time.perf_counter()
    model.load_state_dict(original_state)
    teacher = copy.deepcopy(model) if cfg.distill > 0 else None
    reinitialise(layer, flagged, gen)
    penalty = cosine_penalty(layer, w_original, flagged, cfg.alpha, cfg.cos_margin) if flagged else None
    if teacher is not None:
        penalty = with_distillation(penalty, teacher, flagged, cfg.distill)
    best = {"acc": -1.0, "epoch": 0, "state": None}

    def track(epoch: int, record: dict) -> None:
        if len(y_held):  # model selection on the held-out slice of the clean set
            record["heldout_acc"] = accuracy(model, x_held, y_held, cfg.device)
            if record["heldout_acc"] >= best["acc"]:  # ties go to the later (longer relearned) epoch
                best.update(acc=record["heldout_acc"], epoch=epoch, state=copy.deepcopy(model.state_dict()))
        if monitor is not None:
            record.update(monitor(model))

    prefix = layer_name + "."
    relearn = TrainConfig(epochs=cfg.relearn_epochs, lr=cfg.relearn_lr, schedule="cosine", freeze_bn=cfg.freeze_bn, **shared)
    hist = fit(model, x_train, y_train, relearn, penalty=penalty, on_epoch=track, desc="ULRL relearn", progress=progress,
               lr_scale=lambda name: 1.0 if name.startswith(prefix) else cfg.backbone_lr_scale)
    report.relearn_history = hist.epochs
    if best["state"] is not None:
        model.load_state_dict(best["state"])
        report.selected_epoch = best["epoch"]
    report.seconds["relearn"] = time.perf_counter() - t0
    report.seconds["total"] = report.seconds["unlearn"] + report.seconds["relearn"]
    return model.eval(), report


__all__ = ["PRESETS", "ULRLConfig", "cosine_penalty", "mad_outliers", "make_config", "neuron_scores",
           "purify", "reinitialise", "unlearn"]
