"""The defense interface: (model, clean images, clean labels, config) -> (repaired model, report).

A defense never sees poisoned data or the trigger. ``monitor`` is an optional callback from the
harness (e.g. test ACC/ASR after each epoch) whose values are only recorded in the report for
plots; a defense must not base any decision on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

Monitor = Callable[[nn.Module], dict[str, float]]
DEFENSES: dict[str, Callable[..., tuple[nn.Module, DefenseReport]]] = {}


def register_defense(name: str):
    def deco(fn):
        DEFENSES[name] = fn
        return fn

    return deco


@dataclass
class DefenseReport:
    """What a defense found and did; serialises to JSON with :meth:`to_dict`."""

    defense: str
    config: dict[str, Any]
    layer: str = ""
    scores: list[float] = field(default_factory=list)
    z_scores: list[float] = field(default_factory=list)
    flagged: list[int] = field(default_factory=list)
    second_look_z_scores: list[float] = field(default_factory=list)  # z-scores of the masked re-run, if any
    unlearn_epochs: int = 0
    unlearn_history: list[dict] = field(default_factory=list)
    relearn_history: list[dict] = field(default_factory=list)
    selected_epoch: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_holdout(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified split of clean-set positions into (train, held-out) for model selection."""
    gen = torch.Generator().manual_seed(seed)
    held = []
    for c in y.unique():
        pos = (y == c).nonzero().flatten()
        pos = pos[torch.randperm(len(pos), generator=gen)]
        held.append(pos[: int(round(fraction * len(pos)))])
    held_idx = torch.cat(held).sort().values if held else torch.empty(0, dtype=torch.long)
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[held_idx] = False
    return keep.nonzero().flatten(), held_idx
