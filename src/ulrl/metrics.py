"""ACC, ASR, RA and DER, as BackdoorBench (and the ULRL paper) define them. One evaluation function."""

from __future__ import annotations

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


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack=None, device: str = "cpu") -> dict:
    """Clean accuracy on ``(x, y)``; with an attack also ASR and RA.

    ASR and RA are measured on the triggered copies of the test images whose true label differs
    from the attack's target for them (for all-to-one: every image not of the target class).
    ASR is the fraction classified as the target, RA the fraction classified as the true label.
    """
    result = {"acc": accuracy(model, x, y, device)}
    if attack is not None:
        targets = attack.target_labels(y)
        keep = targets != y
        triggered = attack.trigger_uint8(x[keep])
        pred = predict(model, triggered, device=device)
        result["asr"] = (pred == targets[keep]).float().mean().item()
        result["ra"] = (pred == y[keep]).float().mean().item()
    return result


def der(before: dict, after: dict) -> float:
    """Defense effectiveness rating: [max(0, dASR) - max(0, dACC) + 1] / 2, in [0, 1]."""
    d_asr = before["asr"] - after["asr"]
    d_acc = before["acc"] - after["acc"]
    return (max(0.0, d_asr) - max(0.0, d_acc) + 1.0) / 2.0
