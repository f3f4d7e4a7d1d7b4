"""BackdoorBench attack records in, defense results out, without executing code.

A record is a folder ``record/NAME/`` holding ``attack_result.pt`` (and, in the current format,
``bd_test_dataset/<original label>/<index>.png``). ``attack_result.pt`` is a ``torch.save`` of a dict:
``model_name``, ``num_classes``, ``model`` (the state dict, possibly with DataParallel's ``module.``
prefix), ``img_size`` (H, W, C), ``clean_data`` (dataset name), ``data_path``, ``bd_train``, ``bd_test``.
``bd_test`` is either the current ``prepro_cls_DatasetBD_v2`` state (``bd_data_container`` ->
``data_dict`` {index: ``{"path", "other_info": [bd_label, original_label]}`` or
``(image, bd_label, original_label)``}, ``original_index_array``, ``poison_indicator``) or the older
``{"x", "y"[, "original_targets"]}`` arrays.

**Reading.** ``torch.load(weights_only=True)`` (after the zip checks of :mod:`.tensors`), with
exactly these extra safe globals, which the records' numpy arrays and numpy-integer keys need:
``numpy.ndarray``, ``numpy.dtype`` and its concrete dtype classes, and numpy's array and scalar
reconstructors (``numpy[._]core.multiarray._reconstruct`` / ``scalar``). No other class is
allowed: in particular records that hold PIL images inside the pickle (BackdoorBench's in-memory
mode) are refused. The PNGs are read from the record's own folder only (the absolute paths stored
in the record, from the machine that ran the attack, are re-rooted at ``bd_test_dataset/``).

**Models.** ``preactresnet18`` -> ``preact-resnet18`` (identical keys), ``vgg19_bn`` ->
``vgg19-bn-torchvision`` (identical keys), ``vit_b_16`` -> ``vit-b16-resize224`` (keys renamed by
:func:`vit_from_backdoorbench`). The record's normalisation is BackdoorBench's for its dataset.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..metrics import PoisonedSet
from .paths import file_inside, input_file
from .sidecar import MAX_CLASSES, MAX_IMAGE_SIZE, validate_meta
from .tensors import build_model, state_entries, torch_load

RECORD_FILE = "attack_result.pt"
ARCHS = {"preactresnet18": "preact-resnet18", "vgg19_bn": "vgg19-bn-torchvision", "vit_b_16": "vit-b16-resize224"}
BACK = {v: k for k, v in ARCHS.items()}
DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100", "gtsrb": "gtsrb", "mnist": "mnist", "tiny": "tiny-imagenet"}
NORMALISATION = {  # BackdoorBench's get_dataset_normalization (applied as a transform there, inside the model here)
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.5,), (0.5,)),
    "tiny": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "gtsrb": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
MAX_RECORD_PICKLE = 1 << 30
MAX_POISONED = 200_000


def _numpy_globals() -> list:
    try:
        from numpy._core import multiarray  # numpy 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray

    allow: list = [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # records pickled under either numpy
        allow += [(multiarray._reconstruct, f"{module}._reconstruct"), (multiarray.scalar, f"{module}.scalar")]
    kinds = ("bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32", "float64")
    return allow + [type(np.dtype(k)) for k in kinds]


def is_record(path: str | Path) -> bool:
    p = Path(path)
    return p.name == RECORD_FILE or (p.is_dir() and (p / RECORD_FILE).exists())


# --- key layouts ------------------------------------------------------------------------------------------
# torchvision's ViT names (after the Sequential index "1.") <-> ours; "{i}" is the block number.
_VIT_NAMES = [
    ("conv_proj.", "vit.patch_embed."), ("class_token", "vit.cls_token"), ("encoder.pos_embedding", "vit.pos_embed"),
    ("encoder.layers.encoder_layer_{i}.ln_1.", "vit.blocks.{i}.norm1."),
    ("encoder.layers.encoder_layer_{i}.ln_2.", "vit.blocks.{i}.norm2."),
    ("encoder.layers.encoder_layer_{i}.self_attention.in_proj_weight", "vit.blocks.{i}.attn.qkv.weight"),
    ("encoder.layers.encoder_layer_{i}.self_attention.in_proj_bias", "vit.blocks.{i}.attn.qkv.bias"),
    ("encoder.layers.encoder_layer_{i}.self_attention.out_proj.", "vit.blocks.{i}.attn.proj."),
    ("encoder.layers.encoder_layer_{i}.mlp.0.", "vit.blocks.{i}.mlp.0."),
    ("encoder.layers.encoder_layer_{i}.mlp.3.", "vit.blocks.{i}.mlp.2."),
    ("encoder.ln.", "vit.norm."), ("heads.head.", "vit.head."),
]
_VIT_OLD_NAMES = [  # older torchvision MLP names, read but never written
    ("encoder.layers.encoder_layer_{i}.mlp.linear_1.", "vit.blocks.{i}.mlp.0."),
    ("encoder.layers.encoder_layer_{i}.mlp.linear_2.", "vit.blocks.{i}.mlp.2."),
]


def _rules(pairs: list[tuple[str, str]], forward: bool) -> list[tuple[str, str]]:
    """Regex rules from name templates: a prefix ending in "." matches a prefix, any other a whole key."""
    out = []
    for a, b in pairs:
        src, dst = (a, b) if forward else (b, a)
        pattern = "^" + re.escape(src).replace(re.escape("{i}"), r"(\d+)") + ("" if src.endswith(".") else "$")
        out.append((pattern, dst.replace("{i}", r"\1")))
    return out


_FROM_BB = _rules(_VIT_NAMES + _VIT_OLD_NAMES, forward=True)
_TO_BB = _rules(_VIT_NAMES, forward=False)


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def vit_from_backdoorbench(key: str) -> str:
    """``1.encoder.layers.encoder_layer_3.mlp.0.weight`` -> ``vit.blocks.3.mlp.0.weight`` (the ``1.`` is the
    Sequential index after BackdoorBench's Resize)."""
    return _rename(key.removeprefix("1."), _FROM_BB)


def vit_to_backdoorbench(key: str) -> str:
    return "1." + _rename(key, _TO_BB)


def from_backdoorbench(model_name: str, state: dict[str, Any]) -> dict[str, Any]:
    """A record's state dict in our key layout (bare network keys; ``module.`` stripped)."""
    state = {(k[7:] if isinstance(k, str) and k.startswith("module.") else k): v for k, v in state.items()}
    if model_name == "vit_b_16":
        state = {vit_from_backdoorbench(k) if isinstance(k, str) else k: v for k, v in state.items()}
    return state


def to_backdoorbench(arch: str, model: nn.Module, model_name: str | None = None) -> dict[str, Any]:
    """What BackdoorBench's ``save_defense_result`` writes: ``model_name``, ``num_classes``, ``model``."""
    name = model_name or BACK.get(arch)
    if name is None:
        raise UserError(f"--export backdoorbench: architecture {arch} has no BackdoorBench counterpart; "
                        f"exportable: {', '.join(sorted(BACK))}")
    net = getattr(model, "net", model)
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    if name == "vit_b_16":
        state = {vit_to_backdoorbench(k): v for k, v in state.items()}
    head = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    return {"model_name": name, "num_classes": int(head.out_features), "model": state}


# --- reading a record -----------------------------------------------------------------------------------
@dataclass
class Record:
    folder: Path
    model_name: str
    meta: dict[str, Any]
    state: dict[str, Any]
    bd_test: Any


def _need(obj: dict, key: str, kinds: tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise UserError(f"{where} lacks the key {key!r}; it is not a BackdoorBench attack record")
    v = obj[key]
    if not isinstance(v, kinds) or isinstance(v, bool):
        raise UserError(f"{where}: {key} is a {type(v).__name__}, expected {' or '.join(k.__name__ for k in kinds)}")
    return v


def read_record(path: str | Path) -> Record:
    """Open a record folder or its ``attack_result.pt``; validate its description (weights not yet read)."""
    p = Path(path)
    file = p / RECORD_FILE if p.is_dir() else p
    input_file(file, "BackdoorBench record", hint=f"; give the record folder (record/NAME/) or its {RECORD_FILE}")
    where = f"BackdoorBench record {file}"
    obj = torch_load(file, max_bytes=4 << 30, max_pickle=MAX_RECORD_PICKLE, allow=_numpy_globals())
    if not isinstance(obj, dict):
        raise UserError(f"{where} holds a {type(obj).__name__}, not a BackdoorBench result dict")
    name = _need(obj, "model_name", (str,), where)
    k = _need(obj, "num_classes", (int, np.integer), where)
    state = _need(obj, "model", (dict,), where)
    size = _need(obj, "img_size", (tuple, list, np.ndarray), where)
    clean = _need(obj, "clean_data", (str,), where)
    if name not in ARCHS:
        raise UserError(f"{where}: model_name {name[:60]!r} is not one we can map; supported: {', '.join(sorted(ARCHS))} "
                        "(or load the state dict with --arch package.module:factory)")
    if not 2 <= int(k) <= MAX_CLASSES:
        raise UserError(f"{where}: num_classes {k} is out of range")
    size = list(size)
    if len(size) != 3 or not all(isinstance(s, int | np.integer) for s in size) or size[0] != size[1] \
            or not 4 <= int(size[0]) <= MAX_IMAGE_SIZE or int(size[2]) not in (1, 3):
        raise UserError(f"{where}: img_size {size[:4]} is not (H, W, C) with square images and 1 or 3 channels")
    mean, std = NORMALISATION.get(clean, (None, None))
    meta = validate_meta({
        "format": "backdoorbench-record", "arch": ARCHS[name], "num_classes": int(k), "in_channels": int(size[2]),
        "image_size": int(size[0]), "mean": list(mean) if mean else None, "std": list(std) if std else None,
        "dataset": DATASETS.get(clean, clean), "attack": None,
        "source": {"format": "backdoorbench", "record": str(file.parent), "model_name": name, "clean_data": clean},
    }, where)
    return Record(file.parent, name, meta, from_backdoorbench(name, state), obj.get("bd_test"))


def load_record_model(rec: Record) -> nn.Module:
    """The record's model, its weights checked against the architecture before they are read."""
    source = f"the model of BackdoorBench record {rec.folder}"
    model, extra = build_model(rec.meta, lambda _: state_entries(rec.state, source), source)
    if extra:
        raise UserError(f"{source} has unexpected entries ({next(iter(extra))})")
    return model


def _uint8_images(x: Any, where: str, channels: int, size: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4:
        raise UserError(f"{where}: poisoned images have shape {tuple(t.shape)}, expected (N, C, H, W) or (N, H, W, C)")
    if t.shape[1] not in (1, 3) and t.shape[-1] in (1, 3):
        t = t.permute(0, 3, 1, 2)
    if tuple(t.shape[1:]) != (channels, size, size):
        raise UserError(f"{where}: poisoned images are {tuple(t.shape[1:])}, the model takes {(channels, size, size)}")
    if t.dtype != torch.uint8:
        t = t.float()
        if not bool(torch.isfinite(t).all()):
            raise UserError(f"{where}: poisoned images hold NaN or infinite values")
        t = (t * 255 if float(t.max()) <= 1.0 else t).round().clamp(0, 255).to(torch.uint8)
    return t.contiguous()


def poisoned_test(rec: Record) -> PoisonedSet | None:
    """The record's poisoned test images with their attacker's and original labels (None when it has none)."""
    from ..data.readers import load_images

    bd, m = rec.bd_test, rec.meta
    where = f"BackdoorBench record {rec.folder}: bd_test"
    c, s = m["in_channels"], m["image_size"]
    if bd is None:
        return None
    if not isinstance(bd, dict):
        raise UserError(f"{where} is a {type(bd).__name__}, expected a dict")
    if "x" in bd and "y" in bd:  # the older format: arrays
        x = _uint8_images(bd["x"], where, c, s)
        target = torch.as_tensor(np.asarray(bd["y"])).long().flatten()
        truth = bd.get("original_targets")
        y = torch.as_tensor(np.asarray(truth)).long().flatten() if truth is not None else torch.full_like(target, -1)
        if not len(x) == len(target) == len(y):
            raise UserError(f"{where}: x, y and original_targets have different lengths")
        return PoisonedSet(x, y, target, source=f"{rec.folder} (bd_test arrays)")
    container = bd.get("bd_data_container")
    if not isinstance(container, dict) or not isinstance(container.get("data_dict"), dict):
        raise UserError(f"{where} has neither x/y arrays nor a bd_data_container with a data_dict")
    data = container["data_dict"]
    keep = set(int(i) for i in np.asarray(bd["original_index_array"]).tolist()) if bd.get("original_index_array") is not None else None
    poison = np.asarray(bd["poison_indicator"]) if bd.get("poison_indicator") is not None else None
    keys = [int(k) for k in data if (keep is None or int(k) in keep) and (poison is None or 0 <= int(k) < len(poison) and poison[int(k)] == 1)]
    if len(keys) > MAX_POISONED:
        raise UserError(f"{where} has {len(keys):,} poisoned images (at most {MAX_POISONED:,})")
    images, paths, targets, truth = [], [], [], []
    for k in keys:
        v = data[np.int64(k)] if np.int64(k) in data else data[k]
        if isinstance(v, dict) and "path" in v:
            info = v.get("other_info")
            if not isinstance(info, list | tuple) or len(info) < 2:
                raise UserError(f"{where}: entry {k} has no [bd_label, original_label] in other_info")
            paths.append(_png_in_record(rec.folder, str(v["path"]), int(info[1]), k, where))
            targets.append(int(info[0]))
            truth.append(int(info[1]))
        elif isinstance(v, tuple | list) and len(v) >= 3:
            images.append(_uint8_images(v[0], where, c, s)[0])
            targets.append(int(v[1]))
            truth.append(int(v[2]))
        else:
            raise UserError(f"{where}: entry {k} is neither {{path, other_info}} nor (image, bd_label, label)")
    if paths and images:
        raise UserError(f"{where} mixes images on disk and in memory")
    if not keys:
        return None
    x = torch.from_numpy(load_images(paths, (s, s), "L" if c == 1 else "RGB")) if paths else torch.stack(images)
    return PoisonedSet(x, torch.tensor(truth), torch.tensor(targets), source=f"{rec.folder}/bd_test_dataset")


def _png_in_record(folder: Path, stored: str, label: int, index: int, where: str) -> Path:
    """The stored path (absolute, from the attacking machine) re-rooted at the record's bd_test_dataset/."""
    parts = Path(stored).parts
    rel = Path(*parts[parts.index("bd_test_dataset"):]) if "bd_test_dataset" in parts else \
        Path("bd_test_dataset", str(label), Path(stored).name or f"{index}.png")
    if not (folder / "bd_test_dataset").is_dir():
        raise UserError(f"{where}: the PNG folder {folder / 'bd_test_dataset'} is missing; unpack the whole record")
    return file_inside(folder, str(rel), f"{where}: poisoned image", 64 << 20)
