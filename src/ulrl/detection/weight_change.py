"""Signal: which classifier rows move most when the clean accuracy is unlearned (ULRL's own).

Gradient ascent on the clean set until its accuracy collapses: a backdoored network tends to
collapse toward its target, so the target's row of the classifier moves most. Each row is
scored by the summed absolute change of its weights and a median/MAD test flags outliers. The
*second look* unlearns again from the original weights with the first collapse's classes
masked, because a network also collapses onto natural attractor classes.

These are ULRL's detection pieces (``defenses/ulrl.py`` uses them as the paper describes); in
:func:`ulrl.detection.scan` they are one signal among others, because a collapse happens on
clean models too (see docs/detection.md).
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch
from torch import nn

from ..train import TrainConfig, fit


def neuron_scores(w_before: torch.Tensor, w_after: torch.Tensor) -> torch.Tensor:
    """Per-neuron (row) summed absolute weight change."""
    return (w_after - w_before).abs().flatten(1).sum(1)


def robust_z(scores: torch.Tensor) -> torch.Tensor:
    """``|s - median| / (1.4826 * MAD)``; where MAD is 0, every score off the median is ``inf``."""
    s = scores.double()
    med = s.median()
    dev = (s - med).abs()
    mad = dev.median()
    if mad > 0:
        return (dev / (1.4826 * mad)).float()
    return torch.where(dev > 0, torch.full_like(dev, math.inf), torch.zeros_like(dev)).float()


def mad_outliers(scores: torch.Tensor, threshold: float = 3.5, cap: int = 2,
                 rank_by: str = "score") -> tuple[list[int], torch.Tensor]:
    """Flag rows with robust z > ``threshold`` and a score above the median, at most ``cap``:
    the highest scores first, or the lowest class indices with ``rank_by="index"`` (what the
    reference code keeps). Returns (flagged, z)."""
    z = robust_z(scores)
    suspicious = ((z > threshold) & (scores > scores.median())).nonzero().flatten()
    ranked = suspicious if rank_by == "index" else suspicious[scores[suspicious].argsort(descending=True)]
    return ranked[:cap].tolist(), z


class MaskLogits(nn.Module):
    """The model with some classes' logits pinned very low, so unlearning cannot collapse onto them."""

    def __init__(self, model: nn.Module, classes: list[int]) -> None:
        super().__init__()
        self.model, self.classes = model, classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x).clone()
        out[:, self.classes] = -1e4
        return out


def unlearn(model: nn.Module, layer: nn.Linear, x: torch.Tensor, y: torch.Tensor, train: TrainConfig,
            clean_threshold: float, masked: list[int] | None = None, monitor=None,
            progress: bool = False) -> tuple[torch.Tensor, list[dict]]:
    """Gradient ascent on the clean set (``model`` in place) until an epoch's accuracy is <=
    ``clean_threshold``. Returns the per-row weight-change scores of ``layer`` and the per-epoch
    history. Classes in ``masked`` (and their samples) are left out, and their scores are set to
    the median of the others."""
    w_before = layer.weight.detach().clone()
    net = model
    if masked:
        keep = ~torch.isin(y, torch.tensor(masked))
        x, y, net = x[keep], y[keep], MaskLogits(model, masked)

    def collapsed(epoch: int, record: dict) -> bool:
        if monitor is not None:
            record.update(monitor(model))
        return record["train_acc"] <= clean_threshold

    hist = fit(net, x, y, train, ascent=True, on_epoch=collapsed, desc="unlearn", progress=progress)
    scores = neuron_scores(w_before, layer.weight.detach())
    if masked:
        others = torch.ones(len(scores), dtype=torch.bool)
        others[masked] = False
        scores[masked] = scores[others].median()
    return scores, hist.epochs


def two_looks(model: nn.Module, layer_name: str, x: torch.Tensor, y: torch.Tensor, train: TrainConfig,
              clean_threshold: float, threshold: float = 3.5, second_freeze_bn: bool = False,
              progress: bool = False) -> dict:
    """Both looks on a copy of ``model``: per-row scores and z of the first unlearning, the rows it
    flags, then the same with those rows' classes masked. The model is not modified."""
    work = copy.deepcopy(model)
    layer = dict(work.named_modules())[layer_name]
    state = copy.deepcopy(work.state_dict())
    s1, hist = unlearn(work, layer, x, y, train, clean_threshold, progress=progress)
    first, z1 = mad_outliers(s1, threshold, cap=len(s1))
    out = {"scores": s1.tolist(), "z": z1.tolist(), "flagged": first, "epochs": len(hist), "second_flagged": [],
           "second_scores": [], "second_z": []}
    if first:
        work.load_state_dict(state)
        train2 = replace(train, freeze_bn=second_freeze_bn)
        s2, _ = unlearn(work, layer, x, y, train2, clean_threshold, masked=first[:1], progress=progress)
        second, z2 = mad_outliers(s2, threshold, cap=len(s2))
        out.update(second_scores=s2.tolist(), second_z=z2.tolist(), second_flagged=second)
    return out
