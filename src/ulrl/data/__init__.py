"""Datasets: a registry of known names, directory auto-detection, and the clean-subset picker."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from ulrl.errors import UserError

from .base import Dataset
from .readers import (
    read_cifar,
    read_gtsrb,
    read_idx,
    read_image_folder,
    read_tiny_imagenet,
    synthetic,
)
from .subset import clean_subset
from .transforms import augment, to_float

__all__ = [
    "DATASETS",
    "Dataset",
    "augment",
    "clean_subset",
    "load_dataset",
    "read_cifar",
    "read_gtsrb",
    "read_idx",
    "read_image_folder",
    "read_tiny_imagenet",
    "synthetic",
    "to_float",
]

# name -> (reader taking a directory, default directory or None)
DATASETS: dict[str, tuple[Callable[[str], Dataset], str | None]] = {
    "fashion-mnist": (partial(read_idx, name="fashion-mnist"), "/usr/share/datasets/fashion-mnist"),
    "mnist": (partial(read_idx, name="mnist"), None),
    "cifar10": (partial(read_cifar, num_classes=10), None),
    "cifar100": (partial(read_cifar, num_classes=100), None),
    "gtsrb": (read_gtsrb, None),
    "tiny-imagenet": (read_tiny_imagenet, None),
    "synthetic": (lambda _dir: synthetic(), None),
}


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    return {
        "fashionmnist": "fashion-mnist",
        "cifar-10": "cifar10",
        "cifar-100": "cifar100",
        "tinyimagenet": "tiny-imagenet",
        "tiny-imagenet-200": "tiny-imagenet",
    }.get(key, key)


def detect(path: str | Path) -> Dataset:
    """Load a dataset directory, guessing its kind from the files in it."""
    root = Path(path).expanduser()

    def found(*patterns: str) -> bool:
        return any(next(root.glob(p), None) for p in patterns)

    if found("train-images[-.]idx3-ubyte*", "raw/train-images[-.]idx3-ubyte*"):
        here = root.resolve()
        low = (here.parent if here.name == "raw" else here).name.lower()
        kind = "fashion-mnist" if "fashion" in low else "mnist" if "mnist" in low else low
        return read_idx(root, name=kind)
    if found("data_batch_1", "cifar-10-batches-py"):
        return read_cifar(root, 10)
    if found("cifar-100-python") or ((root / "train").is_file() and (root / "test").is_file()):
        return read_cifar(root, 100)
    if found("Final_Training", "GTSRB/Final_Training"):
        return read_gtsrb(root)
    if found("wnids.txt", "tiny-imagenet-200"):
        return read_tiny_imagenet(root)
    return read_image_folder(root)


def load_dataset(name_or_dir: str, data_dir: str | None = None) -> Dataset:
    """Load a dataset by registry name (case-insensitive, ``-``/``_`` alike) or by directory.

    ``data_dir`` overrides the default location of a named dataset.
    """
    key = _canonical(name_or_dir)
    if key in DATASETS:
        reader, default = DATASETS[key]
        where = data_dir or default
        if where is None and key != "synthetic":
            raise UserError(f"{key} has no default location; pass --data-dir DIR")
        return reader(where)
    if Path(name_or_dir).expanduser().is_dir():
        return detect(name_or_dir)
    raise UserError(
        f"unknown dataset {name_or_dir!r}: use one of {', '.join(DATASETS)} or an existing directory"
    )
