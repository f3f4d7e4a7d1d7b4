"""Tests for ulrl.data: readers on tiny fake files, the clean subset, and augmentation."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ulrl.data import augment, clean_subset, load_dataset, to_float
from ulrl.data.readers import (
    read_cifar,
    read_gtsrb,
    read_idx,
    read_image_folder,
    read_tiny_imagenet,
    synthetic,
)
from ulrl.errors import UserError

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _write_idx(path: Path, arr: np.ndarray, gz: bool = False, magic: bytes | None = None) -> None:
    header = magic or bytes((0, 0, 8, arr.ndim))
    raw = header + np.asarray(arr.shape, ">u4").tobytes() + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def _idx_dir(root: Path, gz: bool, n_train: int = 12, n_test: int = 5) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    _write_idx(root / f"train-images-idx3-ubyte{ext}", rng.integers(0, 256, (n_train, 28, 28)), gz)
    _write_idx(root / f"train-labels-idx1-ubyte{ext}", np.arange(n_train) % 10, gz)
    _write_idx(root / f"t10k-images-idx3-ubyte{ext}", rng.integers(0, 256, (n_test, 28, 28)), gz)
    _write_idx(root / f"t10k-labels-idx1-ubyte{ext}", np.arange(n_test) % 10, gz)
    return root


def _save_image(path: Path, size: tuple[int, int], mode: str = "RGB", value: int = 128) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    shape = (size[1], size[0]) + (() if mode == "L" else (3,))
    Image.fromarray(rng.integers(0, 256, shape).astype(np.uint8), mode).save(path)


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    root = _idx_dir(tmp_path / "fashion", gz)
    ds = read_idx(root)
    assert ds.train_x.shape == (12, 1, 28, 28) and ds.test_x.shape == (5, 1, 28, 28)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert ds.train_y.tolist() == [i % 10 for i in range(12)]
    assert ds.num_classes == 10 and ds.mean == (0.2860,) and ds.hflip
    raw = (root / f"train-images-idx3-ubyte{'.gz' if gz else ''}").read_bytes()
    raw = gzip.decompress(raw) if gz else raw
    assert ds.train_x.flatten().numpy().tobytes() == raw[16:]


def test_idx_dot_variant_and_detection(tmp_path: Path) -> None:
    root = _idx_dir(tmp_path / "mnist", gz=False)
    (root / "train-images-idx3-ubyte").rename(root / "train-images.idx3-ubyte")
    ds = load_dataset(str(root))
    assert ds.name == "mnist" and not ds.hflip and ds.mean == (0.1307,)


def test_idx_corrupt_magic(tmp_path: Path) -> None:
    root = _idx_dir(tmp_path / "x", gz=True)
    labels = np.arange(12) % 10
    _write_idx(root / "train-labels-idx1-ubyte.gz", labels, gz=True, magic=b"\x00\x00\x09\x01")
    with pytest.raises(UserError, match="magic"):
        read_idx(root)


def test_idx_count_mismatch_and_missing(tmp_path: Path) -> None:
    root = _idx_dir(tmp_path / "x", gz=False)
    _write_idx(root / "t10k-labels-idx1-ubyte", np.arange(4) % 10)
    with pytest.raises(UserError, match="corrupt"):
        read_idx(root)
    with pytest.raises(UserError, match=r"not found in .*empty.*--data-dir"):
        read_idx(tmp_path / "empty")


# ----------------------------------------------------------------------------- CIFAR


def _cifar_batch(path: Path, n: int, key: bytes, protocol: int = 2) -> None:
    rng = np.random.default_rng(n)
    d = {
        b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
        key: list(range(n)),
        b"batch_label": b"x",
    }
    path.write_bytes(pickle.dumps(d, protocol=protocol))


def test_cifar10(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        _cifar_batch(folder / f"data_batch_{i}", 4, b"labels")
    _cifar_batch(folder / "test_batch", 3, b"labels")
    for path in (tmp_path, folder):
        ds = read_cifar(path, 10)
        assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (3, 3, 32, 32)
        assert ds.num_classes == 10 and ds.hflip and len(ds.mean) == 3
    assert load_dataset(str(tmp_path)).name == "cifar10"


def test_cifar100_protocol5(tmp_path: Path) -> None:
    _cifar_batch(tmp_path / "train", 6, b"fine_labels", protocol=5)
    _cifar_batch(tmp_path / "test", 2, b"fine_labels", protocol=5)
    ds = load_dataset("cifar-100", str(tmp_path))
    assert ds.train_x.shape == (6, 3, 32, 32) and ds.num_classes == 100


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for i in range(1, 6):
        _cifar_batch(tmp_path / f"data_batch_{i}", 2, b"labels")
    _cifar_batch(tmp_path / "test_batch", 2, b"labels")
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": _Evil(marker)}, protocol=2))
    with pytest.raises(UserError, match="refuses to unpickle"):
        read_cifar(tmp_path, 10)
    assert not marker.exists()


# ----------------------------------------------------------------------------- image files


def test_image_folder(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("val", 1)):
        for c in ("b_cat", "a_dog"):
            for i in range(n):
                _save_image(tmp_path / split / c / f"{i}.png", (10, 8), mode="L", value=i)
    _save_image(tmp_path / "train" / "a_dog" / "odd.png", (20, 20), mode="L")
    ds = read_image_folder(tmp_path)
    assert ds.train_x.shape == (7, 1, 8, 10) and ds.test_x.shape == (2, 1, 8, 10)
    assert ds.train_y.tolist() == [0] * 4 + [1] * 3 and ds.num_classes == 2
    _save_image(tmp_path / "val" / "a_dog" / "colour.jpg", (10, 8), mode="RGB")
    ds = load_dataset(str(tmp_path))
    assert ds.train_x.shape[1] == 3 and len(ds.mean) == 3
    assert read_image_folder(tmp_path, size=6).train_x.shape == (7, 3, 6, 6)


def test_gtsrb(tmp_path: Path) -> None:
    root = tmp_path / "GTSRB"
    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
    for c in (0, 2):
        folder = root / "Final_Training" / "Images" / f"{c:05d}"
        for i in range(2):
            _save_image(folder / f"00000_{i:05d}.ppm", (30 + i, 29), value=i)
        (folder / f"GT-{c:05d}.csv").write_text(
            header + "".join(f"00000_{i:05d}.ppm;30;29;5;5;25;25;{c}\n" for i in range(2))
        )
    for i in range(3):
        _save_image(root / "Final_Test" / "Images" / f"{i:05d}.ppm", (40, 41), value=i)
    (tmp_path / "GT-final_test.csv").write_text(
        header + "".join(f"{i:05d}.ppm;40;41;5;5;35;35;{i}\n" for i in range(3))
    )
    ds = load_dataset("GTSRB", str(tmp_path))
    assert ds.train_x.shape == (4, 3, 32, 32) and ds.test_x.shape == (3, 3, 32, 32)
    assert ds.train_y.tolist() == [0, 0, 2, 2] and ds.test_y.tolist() == [0, 1, 2]
    assert ds.num_classes == 43 and not ds.hflip
    assert torch.equal(read_gtsrb(root).test_x, ds.test_x)


def test_tiny_imagenet(tmp_path: Path) -> None:
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01"]
    root.mkdir()
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        _save_image(root / "train" / w / "images" / f"{w}_0.JPEG", (64, 64))
        _save_image(root / "train" / w / "images" / f"{w}_1.JPEG", (64, 64), mode="L")
    _save_image(root / "val" / "images" / "val_0.JPEG", (64, 64))
    _save_image(root / "val" / "images" / "val_1.JPEG", (64, 64), mode="L")
    (root / "val" / "val_annotations.txt").write_text(
        "val_0.JPEG\tn02\t0\t0\t10\t10\nval_1.JPEG\tn01\t1\t1\t5\t5\n"
    )
    ds = read_tiny_imagenet(tmp_path)
    assert ds.train_x.shape == (4, 3, 64, 64) and ds.test_x.shape == (2, 3, 64, 64)
    assert ds.train_y.tolist() == [0, 0, 1, 1] and ds.test_y.tolist() == [1, 0]
    assert ds.num_classes == 2 and ds.hflip


def test_missing_dirs_and_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown dataset 'imagenet-21k'.*fashion-mnist"):
        load_dataset("imagenet-21k")
    for name in ("cifar10", "gtsrb", "tiny_imagenet"):
        with pytest.raises(UserError, match="not found in"):
            load_dataset(name, str(tmp_path))
    with pytest.raises(UserError, match="--data-dir"):
        load_dataset("cifar10")
    with pytest.raises(UserError, match="not found"):
        load_dataset(str(tmp_path))


def test_synthetic_is_learnable() -> None:
    ds = synthetic(num_classes=4, channels=3, size=16)
    assert ds.train_x.shape == (256, 3, 16, 16) and ds.train_x.dtype == torch.uint8
    assert load_dataset("synthetic").train_x.shape == (256, 1, 16, 16)
    x, t = to_float(ds.train_x).flatten(1), to_float(ds.test_x).flatten(1)
    centroids = torch.stack([x[ds.train_y == c].mean(0) for c in range(4)])
    accuracy = (torch.cdist(t, centroids).argmin(1) == ds.test_y).float().mean()
    assert accuracy > 0.95


# ----------------------------------------------------------------------------- clean subset


def test_clean_subset_stratified_and_seeded() -> None:
    labels = torch.tensor([0] * 500 + [1] * 300 + [2] * 200)
    idx = clean_subset(labels, ratio=0.05, seed=1)
    assert idx.dtype == torch.int64 and len(idx) == 50 and torch.equal(idx, idx.sort().values)
    assert torch.bincount(labels[idx]).tolist() == [25, 15, 10]
    assert torch.equal(idx, clean_subset(labels, ratio=0.05, seed=1))
    assert not torch.equal(idx, clean_subset(labels, ratio=0.05, seed=2))
    assert len(clean_subset(labels, count=7)) == 7 and len(clean_subset(labels, ratio=1.0)) == 1000
    skewed = torch.tensor([0] * 97 + [1, 2, 3])
    assert sorted(skewed[clean_subset(skewed, count=5)].tolist()) == [0, 0, 1, 2, 3]


@pytest.mark.parametrize("kwargs", [{"ratio": 0}, {"ratio": 1.5}, {"count": 0}, {"count": 11}, {}])
def test_clean_subset_rejects(kwargs: dict) -> None:
    with pytest.raises(UserError, match="clean"):
        clean_subset(torch.arange(10) % 2, **kwargs)


def test_clean_subset_message() -> None:
    with pytest.raises(UserError, match=r"--clean-ratio must be in \(0, 1\], got 0$"):
        clean_subset(torch.zeros(4), ratio=0)


# ----------------------------------------------------------------------------- augmentation


def test_augment() -> None:
    x = torch.rand(16, 3, 8, 8)
    assert torch.equal(augment(x, pad=0, hflip=False), x)
    out = augment(x, pad=2, hflip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert augment(to_float(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))).dtype == torch.float32
    flipped = augment(x, pad=0, hflip=True, generator=torch.Generator().manual_seed(0))
    same = [torch.equal(a, b) for a, b in zip(flipped, x, strict=True)]
    mirrored = [torch.equal(a, b.flip(-1)) for a, b in zip(flipped, x, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True)) and any(same) and any(mirrored)
    ones = augment(
        torch.ones(64, 1, 8, 8), pad=2, hflip=False, generator=torch.Generator().manual_seed(0)
    )
    assert set(ones.unique().tolist()) == {0.0, 1.0}  # zero padding shows up in shifted crops
    assert (ones.sum((1, 2, 3)) >= 36).all()  # a shift of at most 2 keeps a 6x6 block


# ----------------------------------------------------------------------------- real data


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist() -> None:
    ds = load_dataset("fashion-mnist")
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10 and int(ds.train_y.max()) == 9
    assert torch.bincount(ds.train_y).tolist() == [6000] * 10
