"""Stratified selection of the small clean subset a defense is allowed to use."""

from __future__ import annotations

import math

import torch

from ulrl.errors import UserError


def clean_subset(
    labels: torch.Tensor,
    ratio: float | None = None,
    count: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Sorted int64 indices of a seeded, class-stratified subset of ``labels``.

    Give exactly one of ``ratio`` (in (0, 1]; total is ``round(ratio * N)``, at least 1) or
    ``count`` (1..N). Each class gets its proportional share (largest remainders), and every
    class gets at least one sample when the total allows.
    """
    labels = torch.as_tensor(labels).flatten().cpu()
    n = len(labels)
    if (ratio is None) == (count is None):
        raise UserError("give exactly one of --clean-ratio and --clean-count")
    if ratio is not None:
        if not 0 < ratio <= 1:
            raise UserError(f"--clean-ratio must be in (0, 1], got {ratio:g}")
        total = max(1, round(ratio * n))
    else:
        if not 1 <= count <= n:
            raise UserError(
                f"--clean-count must be between 1 and {n} (the training set size), got {count}"
            )
        total = int(count)
    if n == 0:
        raise UserError("cannot pick a clean subset from an empty training set")

    classes, sizes = labels.unique(return_counts=True)
    share = sizes.double() * total / n
    alloc = share.floor().long()
    order = torch.argsort(share - alloc, descending=True, stable=True)
    alloc[order[: total - int(alloc.sum())]] += 1
    if total >= len(
        classes
    ):  # give empty classes one sample, taken from the most over-served class
        for c in (alloc == 0).nonzero().flatten().tolist():
            donor = int(torch.where(alloc > 1, alloc - share, -math.inf).argmax())
            alloc[donor] -= 1
            alloc[c] += 1

    g = torch.Generator().manual_seed(seed)
    picked = []
    for c, k in zip(classes.tolist(), alloc.tolist(), strict=True):
        members = (labels == c).nonzero().flatten()
        picked.append(members[torch.randperm(len(members), generator=g)[:k]])
    return torch.cat(picked).sort().values.to(torch.int64)
