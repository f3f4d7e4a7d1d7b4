"""The in-memory dataset every reader returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Dataset:
    """Images as uint8 tensors of shape (N, C, H, W), labels as int64 tensors of shape (N,).

    ``mean`` and ``std`` are per-channel normalisation constants for images scaled to [0, 1];
    ``hflip`` says whether a horizontal flip is a label-preserving augmentation for this data.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool = True

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])
