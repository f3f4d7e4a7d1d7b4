"""Readers for the supported datasets; each loads everything into memory once.

Every reader returns a :class:`~ulrl.data.base.Dataset` with uint8 NCHW images and int64 labels.
Missing or corrupt files raise :class:`~ulrl.errors.UserError` with a one-line message.
PIL is only used here, at load time, to decode and resize image files.
"""

from __future__ import annotations

import csv
import gzip
import os
import pickle
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ulrl.errors import UserError

from ..io.paths import input_file
from .base import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".ppm", ".bmp")

# (display name, mean, std, hflip) for datasets with published constants.
_KNOWN: dict[str, tuple[str, tuple[float, ...], tuple[float, ...], bool]] = {
    "fashion-mnist": ("Fashion-MNIST", (0.2860,), (0.3530,), True),
    "mnist": ("MNIST", (0.1307,), (0.3081,), False),
    "cifar10": ("CIFAR-10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    "cifar100": ("CIFAR-100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
}


# ----------------------------------------------------------------------------- shared helpers


def _not_found(what: str, where: str | Path, expected: str) -> UserError:
    return UserError(f"{what} not found in {where}: expected {expected}; pass --data-dir DIR")


def _find_root(
    path: str | Path, nests: Sequence[str], marker: Callable[[Path], bool]
) -> Path | None:
    """Return the first of ``path`` and ``path/<nest>`` (also two levels deep) where ``marker(p)`` holds."""
    base = Path(path).expanduser()
    candidates = [base] + [base / n for n in nests] + [base / a / b for a in nests for b in nests]
    return next((p for p in candidates if p.is_dir() and marker(p)), None)


def channel_stats(
    x: torch.Tensor, chunk: int = 4096
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, C, H, W) scaled to [0, 1], in float64 chunks."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for i in range(0, len(x), chunk):
        part = x[i : i + chunk].to(torch.float64).div_(255).transpose(0, 1).flatten(1)
        total += part.sum(1)
        squares += part.square().sum(1)
    n = max(1, x.numel() // x.shape[1])
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def _make(
    name: str,
    train: tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor | Sequence[int]],
    test: tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor | Sequence[int]],
    num_classes: int | None = None,
    hflip: bool = True,
    source: str | Path = "",
) -> Dataset:
    """Build a Dataset: check shapes and label range, fill in published or computed mean/std."""
    xs, ys = [], []
    for split, (x, y) in (("train", train), ("test", test)):
        x = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.uint8)
        y = torch.as_tensor(np.asarray(y, dtype=np.int64))
        if x.ndim != 4 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
            raise UserError(
                f"{name} in {source} looks corrupt: {split} has {tuple(x.shape)} images "
                f"and {tuple(y.shape)} labels"
            )
        xs.append(x)
        ys.append(y)
    k = num_classes if num_classes is not None else int(max(ys[0].max(), ys[1].max())) + 1
    for split, y in zip(("train", "test"), ys, strict=True):
        if int(y.min()) < 0 or int(y.max()) >= k:
            raise UserError(f"{name} in {source} looks corrupt: {split} labels outside 0..{k - 1}")
    if name in _KNOWN:
        _, mean, std, hflip = _KNOWN[name]
    else:
        mean, std = channel_stats(xs[0])
    return Dataset(name, xs[0], ys[0], xs[1], ys[1], k, mean, std, hflip)


MAX_IMAGE_PIXELS = 4096 * 4096  # per image file; a larger one is refused before it is decoded


def _decode(path: Path, size: tuple[int, int], mode: str) -> np.ndarray:
    import warnings

    from PIL import Image  # load time only

    input_file(path, "image", 64 << 20)  # a FIFO named x.png would block the reader forever
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise UserError(f"image {path} has {im.width}x{im.height} pixels (at most {MAX_IMAGE_PIXELS:,})")
                im = im.convert(mode)
                if im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"cannot read image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_images(paths: Sequence[Path], size: tuple[int, int], mode: str = "RGB") -> np.ndarray:
    """Decode image files into one uint8 array (N, C, H, W), resized to ``size`` = (H, W)."""
    out = np.empty((len(paths), 1 if mode == "L" else 3, *size), dtype=np.uint8)

    def fill(i: int) -> None:
        out[i] = _decode(paths[i], size, mode)

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(fill, range(len(paths))))
    return out


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


# ----------------------------------------------------------------------------- IDX (MNIST family)

_IDX_FILES = {
    "train_x": ("train-images", "idx3"),
    "train_y": ("train-labels", "idx1"),
    "test_x": ("t10k-images", "idx3"),
    "test_y": ("t10k-labels", "idx1"),
}


def _idx_path(folder: Path, stem: str, kind: str) -> Path | None:
    for sep in ("-", "."):
        for suffix in ("", ".gz"):
            p = folder / f"{stem}{sep}{kind}-ubyte{suffix}"
            if p.is_file():
                return p
    return None


def _has_idx(folder: Path) -> bool:
    return all(_idx_path(folder, *v) for v in _IDX_FILES.values())


MAX_IDX_BYTES = 1 << 30  # the largest IDX dataset (EMNIST) holds about 0.6 GB


def parse_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse one IDX file of unsigned bytes (plain or gzip) with ``ndim`` dimensions.

    The header is read first; a gzip stream is then decompressed only up to the size the header
    declares (at most :data:`MAX_IDX_BYTES`), so a small compressed file cannot expand without bound."""
    header = 4 + 4 * ndim
    with open(path, "rb") as raw_file:
        gz = raw_file.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            head = f.read(header)
            if len(head) < header or head[:4] != bytes((0, 0, 8, ndim)):
                raise UserError(f"corrupt IDX file {path}: bad magic number {head[:4].hex()}, expected 000008{ndim:02x}")
            dims = tuple(int(d) for d in np.frombuffer(head, ">u4", ndim, 4))
            n = int(np.prod(dims, dtype=np.int64))
            if n > MAX_IDX_BYTES:
                raise UserError(f"corrupt IDX file {path}: header says {dims}, {n:,} bytes (at most {MAX_IDX_BYTES:,})")
            data = f.read(n + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"corrupt gzip file {path}: {e}") from None
    if len(data) != n:
        raise UserError(f"corrupt IDX file {path}: header says {dims} but has {len(data)}{'+' if len(data) > n else ''} data bytes")
    return np.frombuffer(data, np.uint8).reshape(dims).copy()


def read_idx(path: str | Path, name: str = "fashion-mnist") -> Dataset:
    """Read MNIST-style IDX files (``train-images-idx3-ubyte[.gz]`` etc.) from ``path`` or ``path/raw``.

    ``name`` picks the published constants (``fashion-mnist`` or ``mnist``); any other name
    computes mean/std from the data and sets hflip=False.
    """
    title = _KNOWN.get(name, (name,))[0]
    root = _find_root(path, ("raw",), _has_idx)
    if root is None:
        raise _not_found(
            title,
            path,
            "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
            "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]",
        )
    arr = {
        k: parse_idx(_idx_path(root, *v), 3 if v[1] == "idx3" else 1) for k, v in _IDX_FILES.items()
    }
    return _make(
        name,
        (arr["train_x"][:, None], arr["train_y"]),
        (arr["test_x"][:, None], arr["test_y"]),
        10 if name in _KNOWN else None,
        hflip=False,
        source=root,
    )


# ----------------------------------------------------------------------------- CIFAR


def _numpy_attr(*dotted: str):
    """The first importable object among dotted names such as ``numpy._core.multiarray._reconstruct``."""
    import importlib

    for name in dotted:
        module, _, attr = name.rpartition(".")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue
    raise ImportError(dotted[0])


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays (and plain containers); refuses every other global."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
        ("codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise UserError(
                f"{self.source} refuses to unpickle {module}.{name}: only numpy arrays are allowed"
            )
        if module.endswith("codecs"):
            import codecs

            return codecs.encode
        if module == "numpy":
            return getattr(np, name)
        sub = module.rsplit(".", 1)[1]  # numpy 2 renamed numpy.core to numpy._core
        return _numpy_attr(f"numpy._core.{sub}.{name}", f"numpy.core.{sub}.{name}")

    def __init__(self, file, source: str = "pickle") -> None:
        super().__init__(file, encoding="bytes")
        self.source = source


def load_pickle(path: Path) -> dict:
    """Load a pickle of a plain dict of numpy arrays safely; bytes keys are decoded to str."""
    with open(path, "rb") as f:
        try:
            obj = RestrictedUnpickler(f, source=f"{path}:").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as e:
            raise UserError(f"corrupt pickle {path}: {e}") from None
    if not isinstance(obj, dict):
        raise UserError(f"corrupt pickle {path}: expected a dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


_CIFAR = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    100: ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}


def read_cifar(path: str | Path, num_classes: int = 10) -> Dataset:
    """Read the python-pickle CIFAR-10 or CIFAR-100 release (the extracted folder or its parent)."""
    if num_classes not in _CIFAR:
        raise UserError(f"CIFAR has 10 or 100 classes, got {num_classes}")
    folder, train_files, test_files, key = _CIFAR[num_classes]
    name = f"cifar{num_classes}"
    root = _find_root(
        path, (folder,), lambda p: all((p / f).is_file() for f in train_files + test_files)
    )
    if root is None:
        raise _not_found(
            _KNOWN[name][0], path, f"{folder}/ with {', '.join(train_files + test_files)}"
        )

    def split(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for f in files:
            d = load_pickle(root / f)
            if "data" not in d or key not in d:
                raise UserError(f"corrupt CIFAR batch {root / f}: missing 'data' or '{key}'")
            x = np.asarray(d["data"], dtype=np.uint8)
            if x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
                raise UserError(f"corrupt CIFAR batch {root / f}: data has shape {x.shape}")
            xs.append(x.reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[key], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    return _make(name, split(train_files), split(test_files), num_classes, source=root)


# ----------------------------------------------------------------------------- GTSRB


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter=";"))


def read_gtsrb(path: str | Path, size: int = 32) -> Dataset:
    """Read the published GTSRB layout (Final_Training/Images/000NN, Final_Test/Images + GT-final_test.csv)."""
    expected = (
        "Final_Training/Images/000NN/*.ppm and Final_Test/Images/*.ppm with GT-final_test.csv"
    )
    root = _find_root(path, ("GTSRB",), lambda p: (p / "Final_Training" / "Images").is_dir())
    if root is None:
        raise _not_found("GTSRB", path, expected)
    gt = [p / "GT-final_test.csv" for p in (root / "Final_Test" / "Images", root, root.parent)]
    gt_file = next((p for p in gt if p.is_file()), None)
    if gt_file is None or not (root / "Final_Test" / "Images").is_dir():
        raise _not_found("GTSRB test set", root, expected)
    train_paths, train_y = [], []
    for d in sorted(p for p in (root / "Final_Training" / "Images").iterdir() if p.is_dir()):
        if not d.name.isdigit():
            continue
        files = _images_in(d)
        train_paths += files
        train_y += [int(d.name)] * len(files)
    try:
        rows = [(r["Filename"], int(r["ClassId"])) for r in _read_csv(gt_file)]
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"corrupt GTSRB ground truth {gt_file}: {e}") from None
    test_paths = [root / "Final_Test" / "Images" / f for f, _ in rows]
    hw = (size, size)
    return _make(
        "gtsrb",
        (load_images(train_paths, hw), train_y),
        (load_images(test_paths, hw), [c for _, c in rows]),
        43,
        hflip=False,
        source=root,
    )


# ----------------------------------------------------------------------------- Tiny-ImageNet


def read_tiny_imagenet(path: str | Path) -> Dataset:
    """Read ``tiny-imagenet-200/`` (train/<wnid>/images, val/images + val_annotations.txt as test).

    Class indices follow the sorted wnids of wnids.txt (as torchvision's ImageFolder would).
    """
    root = _find_root(path, ("tiny-imagenet-200",), lambda p: (p / "wnids.txt").is_file())
    if root is None:
        raise _not_found(
            "Tiny-ImageNet",
            path,
            "tiny-imagenet-200/ with wnids.txt, train/<wnid>/images/, "
            "val/images/ and val/val_annotations.txt",
        )
    wnids = sorted({w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip()})
    index = {w: i for i, w in enumerate(wnids)}
    train_paths, train_y = [], []
    for w in wnids:
        folder = root / "train" / w / "images"
        if not folder.is_dir():
            raise _not_found("Tiny-ImageNet class folder", root, f"train/{w}/images/")
        files = _images_in(folder)
        train_paths += files
        train_y += [index[w]] * len(files)
    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise _not_found("Tiny-ImageNet validation labels", root, "val/val_annotations.txt")
    rows = [line.split("\t") for line in annotations.read_text().splitlines() if line.strip()]
    try:
        test_y = [index[r[1]] for r in rows]
    except (KeyError, IndexError) as e:
        raise UserError(f"corrupt {annotations}: unknown or missing wnid {e}") from None
    test_paths = [root / "val" / "images" / r[0] for r in rows]
    hw = (64, 64)
    return _make(
        "tiny-imagenet",
        (load_images(train_paths, hw), train_y),
        (load_images(test_paths, hw), test_y),
        len(wnids),
        source=root,
    )


# ----------------------------------------------------------------------------- generic folders


def read_image_folder(path: str | Path, size: int | tuple[int, int] | None = None) -> Dataset:
    """Read ``path/train/<class>/*`` and ``path/test/<class>/*`` (or ``val``); classes sorted by name.

    Images are resized to ``size`` (default: the most common size among a sample of training
    images) and kept RGB if any image has colour, else converted to one grey channel.
    """
    root = Path(path).expanduser()
    test_dir = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise _not_found(
            "image folder dataset",
            root,
            "train/<class>/*.png|jpg|ppm|bmp and test/<class>/* (or val/)",
        )
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    unknown = sorted({p.name for p in test_dir.iterdir() if p.is_dir()} - set(classes))
    if unknown:
        raise UserError(
            f"{test_dir} has classes missing from {root / 'train'}: {', '.join(unknown)}"
        )

    def listing(split: Path) -> tuple[list[Path], list[int]]:
        paths, labels = [], []
        for i, c in enumerate(classes):
            files = _images_in(split / c) if (split / c).is_dir() else []
            paths += files
            labels += [i] * len(files)
        return paths, labels

    (train_paths, train_y), (test_paths, test_y) = listing(root / "train"), listing(test_dir)
    if not train_paths or not test_paths:
        raise _not_found(
            "images",
            root,
            f"files ending in {'/'.join(IMAGE_EXTENSIONS)} under train/ and {test_dir.name}/",
        )
    if size is None:
        from PIL import Image

        sample = train_paths[:: max(1, len(train_paths) // 256)]
        sizes = Counter()
        for p in sample:
            input_file(p, "image", 64 << 20)
            try:
                with Image.open(p) as im:
                    sizes[im.size] += 1
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                raise UserError(f"cannot read image {p}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        w, h = sizes.most_common(1)[0][0]
        if max(w, h) > 1024:
            raise UserError(f"the images under {root} are {w}x{h} pixels; resize them to at most 1024 (classifiers of "
                            "this kind take 16 to 224 pixels)")
        hw = (h, w)
    else:
        hw = (size, size) if isinstance(size, int) else tuple(size)
    train_x, test_x = load_images(train_paths, hw), load_images(test_paths, hw)
    if all((x[:, :1] == x[:, 1:]).all() for x in (train_x, test_x)):
        train_x, test_x = train_x[:, :1], test_x[:, :1]
    return _make(
        root.resolve().name or "folder",
        (train_x, train_y),
        (test_x, test_y),
        len(classes),
        source=root,
    )


# ----------------------------------------------------------------------------- synthetic


def synthetic(
    num_classes: int = 4,
    n_train: int = 256,
    n_test: int = 128,
    channels: int = 1,
    size: int = 16,
    seed: int = 0,
) -> Dataset:
    """A learnable toy dataset: each class is a smooth random template plus pixel noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=g)
    templates = torch.nn.functional.interpolate(
        coarse, size=(size, size), mode="bilinear", align_corners=False
    )
    lo, hi = templates.amin((1, 2, 3), keepdim=True), templates.amax((1, 2, 3), keepdim=True)
    templates = (templates - lo) / (hi - lo + 1e-8)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        x = 40 + 175 * templates[y] + 20 * torch.randn(n, channels, size, size, generator=g)
        return x.round().clamp(0, 255).to(torch.uint8), y

    return _make(
        "synthetic", split(n_train), split(n_test), num_classes, hflip=False, source="memory"
    )
