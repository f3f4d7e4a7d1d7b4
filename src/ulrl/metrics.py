"""ACC, ASR, RA and DER, as BackdoorBench (and the ULRL paper) define them. One evaluation function."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .data.transforms import to_float


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024, device: str = "cpu") -> torch.Tensor:
    """Predicted labels for images ``x`` (uint8 or float in [0, 1])."""
    was_training = model.training
    model.eval().to(device)
    preds = [model(to_float(x[i : i + batch_size]).to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str = "cpu") -> float:
    return (predict(model, x, device=device) == y).float().mean().item() if len(y) else float("nan")


@dataclass
class PoisonedSet:
    """Triggered test images held as files (a user's folder, a BackdoorBench record's ``bd_test``)
    rather than made by a trigger function: uint8 images, their true labels and the attacker's
    label for each."""

    x: torch.Tensor
    y: torch.Tensor
    target: torch.Tensor
    source: str = "poisoned test set"

    def spec(self) -> dict[str, Any]:
        targets = sorted(set(self.target.tolist()))
        return {"name": "poisoned-test", "source": self.source, "images": len(self.y),
                "target": targets[0] if len(targets) == 1 else None, "targets": targets[:20]}


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack=None, device: str = "cpu") -> dict:
    """Clean accuracy on ``(x, y)``; with an attack (or a :class:`PoisonedSet`) also ASR and RA.

    ASR and RA are measured on the triggered images whose true label differs from the attacker's
    label for them (for all-to-one: every image not of the target class): the triggered copies of
    the test images, or the stored poisoned images. ASR is the fraction classified as the
    attacker's label, RA the fraction classified as the true label.
    """
    result = {"acc": accuracy(model, x, y, device)}
    if attack is not None:
        if isinstance(attack, PoisonedSet):
            targets, truth, keep = attack.target, attack.y, attack.target != attack.y
            triggered = attack.x[keep]
        else:
            targets, truth = attack.target_labels(y), y
            keep = targets != y
            triggered = attack.trigger_uint8(x[keep])
        pred = predict(model, triggered, device=device)
        result["asr"] = (pred == targets[keep]).float().mean().item()
        known = truth[keep] >= 0  # a record without original labels (-1) gives ASR but no RA
        result["ra"] = (pred[known] == truth[keep][known]).float().mean().item() if bool(known.all()) else None
    return result


def der(before: dict, after: dict) -> float:
    """Defense effectiveness rating: [max(0, dASR) - max(0, dACC) + 1] / 2, in [0, 1]."""
    d_asr = before["asr"] - after["asr"]
    d_acc = before["acc"] - after["acc"]
    return (max(0.0, d_asr) - max(0.0, d_acc) + 1.0) / 2.0
