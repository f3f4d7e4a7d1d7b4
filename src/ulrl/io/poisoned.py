"""A user's own triggered images: ``--poisoned-test DIR --target T``.

``DIR/<true label>/*.png|jpg|...``: one folder per true class, named by its class index. Images are
decoded and resized to the model's input like any dataset (regular files, pixel limit), and become
a :class:`~ulrl.metrics.PoisonedSet` whose attacker's label is ``T`` for every image, so ASR and RA
can be measured without a trigger function.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..metrics import PoisonedSet

MAX_IMAGES = 200_000


def read_poisoned_folder(folder: str | Path, target: int | None, num_classes: int, channels: int, size: int) -> PoisonedSet:
    from ..data.readers import IMAGE_EXTENSIONS, load_images

    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--poisoned-test {folder} is not a directory of class folders (DIR/<true label>/*.png)")
    if target is None:
        raise UserError("--poisoned-test needs --target T: the class the trigger sends images to")
    if not 0 <= target < num_classes:
        raise UserError(f"--target {target} is not a class of this {num_classes}-class model")
    paths, labels = [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if not sub.name.isdigit() or int(sub.name) >= num_classes:
            raise UserError(f"--poisoned-test: folder {sub.name!r} must be named by a class index 0..{num_classes - 1} "
                            "(the images' true label)")
        files = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths += files
        labels += [int(sub.name)] * len(files)
    if not paths:
        raise UserError(f"--poisoned-test {folder} holds no images under <class index>/ folders")
    if len(paths) > MAX_IMAGES:
        raise UserError(f"--poisoned-test {folder} holds {len(paths):,} images (at most {MAX_IMAGES:,})")
    y = torch.tensor(labels)
    if bool((y == target).all()):
        raise UserError(f"every image under --poisoned-test {folder} is of the target class {target}: "
                        "ASR is measured on images of other classes")
    x = torch.from_numpy(load_images(paths, (size, size), "L" if channels == 1 else "RGB"))
    return PoisonedSet(x, y, torch.full_like(y, target), source=str(root))
