"""ulrl: remove backdoors from image classifiers with a few clean samples (UnLearn and ReLearn).

The one-line API::

    import ulrl
    result = ulrl.scan(model, (x_clean, y_clean))             # is there a backdoor, which class?
    repaired, report = ulrl.purify(model, (x_clean, y_clean))  # remove it
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from .attacks import build_attack  # noqa: E402
from .checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from .data import Dataset, clean_subset, load_dataset  # noqa: E402
from .defenses.base import DefenseReport  # noqa: E402
from .defenses.ulrl import ULRLConfig, make_config  # noqa: E402
from .defenses.ulrl import purify as _ulrl  # noqa: E402
from .detection import ScanConfig, ScanResult  # noqa: E402
from .detection import scan as _scan  # noqa: E402
from .errors import UserError  # noqa: E402
from .metrics import der, evaluate  # noqa: E402
from .models import create_model, find_classifier  # noqa: E402
from .train import TrainConfig, fit  # noqa: E402


def as_tensors(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept ``(x, y)`` tensors, a :class:`Dataset` (its training split), or any iterable of
    ``(x, y)`` batches or samples (a torch Dataset or DataLoader)."""
    if isinstance(data, Dataset):
        return data.train_x, data.train_y
    if isinstance(data, tuple | list) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
    else:
        xs, ys = [], []
        for item in data:
            bx, by = item[0], torch.as_tensor(item[1])
            batched = by.ndim == 1
            xs.append(bx if batched else bx.unsqueeze(0))
            ys.append(by if batched else by.unsqueeze(0))
        if not xs:
            raise UserError("the clean set is empty; give at least one clean image per class")
        x, y = torch.cat(xs), torch.cat(ys)
    if x.ndim != 4 or len(x) != len(y):
        raise UserError(f"clean images must be (N, C, H, W) with N labels; got {tuple(x.shape)} and {len(y)} labels")
    return x, y.long()


def purify(model: nn.Module, clean_data: Any, preset: str = "default", progress: bool = True,
           dataset: str | None = None, **config: Any) -> tuple[nn.Module, DefenseReport]:
    """Remove a backdoor from ``model`` with ULRL, using a few clean labelled images.

    ``clean_data``: ``(x, y)`` tensors (x uint8, or float as the model takes it, shape N,C,H,W),
    a :class:`Dataset`, or a torch Dataset/DataLoader of ``(x, y)``. ``config``: any field of
    :class:`ULRLConfig` (e.g. ``alpha=0.7``, ``layer="fc"``, ``device="cuda"``); ``preset``:
    ``"default"`` or ``"paper"``; ``dataset`` (e.g. ``"cifar10"``) picks the paper preset's
    per-dataset settings (taken from ``clean_data`` when it is a :class:`Dataset`). Returns
    ``(repaired_model, report)``; ``model`` is untouched. With the default preset, a model with no
    evidence of a backdoor comes back unchanged (``report.notes`` says so; ``force_repair=True``).
    """
    if isinstance(clean_data, Dataset):
        dataset = dataset or clean_data.name
        config.setdefault("hflip", clean_data.hflip)
    x, y = as_tensors(clean_data)
    return _ulrl(model, x, y, make_config(preset, dataset=dataset, **config), progress=progress)


def scan(model: nn.Module, clean_data: Any, progress: bool = True, **config: Any) -> ScanResult:
    """Look for a backdoor in ``model`` with a few clean labelled images (``clean_data`` as for
    :func:`purify`). ``config``: any field of :class:`ScanConfig` (e.g. ``alpha=0.01``).
    Returns a :class:`ScanResult`: per-class evidence of each signal, the p-value, the verdict
    (``result.backdoored``), the suspected target classes; ``result.to_dict()`` is scan.json."""
    if isinstance(clean_data, Dataset):
        config.setdefault("hflip", clean_data.hflip)
    x, y = as_tensors(clean_data)
    return _scan(model, x, y, ScanConfig(**config), progress=progress)


__all__ = [
    "Dataset", "DefenseReport", "ScanConfig", "ScanResult", "TrainConfig", "ULRLConfig", "UserError", "build_attack",
    "clean_subset", "create_model", "der", "evaluate", "find_classifier", "fit", "load_checkpoint", "load_dataset",
    "make_config", "purify", "save_checkpoint", "scan",
]
