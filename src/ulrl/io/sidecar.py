"""The checkpoint sidecar (``model.json``) parsed into a typed, bounded description.

The sidecar is attacker-controlled text. It is read only if it is a regular file of at most
:data:`MAX_SIDECAR_BYTES`; JSON nesting is limited; every known key has a type and a range,
unknown keys are refused; the attack spec is checked against the attack's own typed fields.
Nothing is allocated from a sidecar number before it has passed these checks.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import UserError
from .paths import file_inside, input_file

MAX_SIDECAR_BYTES = 4 << 20
MAX_DEPTH = 8  # our sidecars nest 4 deep (train_config -> milestones)
MAX_CLASSES = 100_000
MAX_CHANNELS = 16
MAX_IMAGE_SIZE = 4096
MAX_STRING = 4096
MAX_PATTERN_BYTES = 16 << 20


@dataclass(frozen=True)
class Num:
    """An int (or float) key with a range; ``none`` allows null."""

    kind: type
    low: float | None = None
    high: float | None = None
    none: bool = False


@dataclass(frozen=True)
class Of:
    """A value of one of the JSON types ``kinds`` (free-form content, bounded by depth and size)."""

    kinds: tuple[type, ...]
    none: bool = True


_FLOATS = Of((list,), none=True)
SCHEMA: dict[str, Any] = {
    "format": Of((str,)),
    "ulrl_version": Of((str,)),
    "arch": Of((str,), none=False),
    "num_classes": Num(int, 2, MAX_CLASSES),
    "in_channels": Num(int, 1, MAX_CHANNELS),
    "image_size": Num(int, 4, MAX_IMAGE_SIZE),
    "mean": _FLOATS,
    "std": _FLOATS,
    "dataset": Of((str,)),
    "hflip": Of((bool,)),
    "attack": Of((dict, str)),
    "train_config": Of((dict,)),
    "seed": Num(int, -(2**63), 2**63 - 1, none=True),
    "poisoned_samples": Num(int, 0, 2**40, none=True),
    "train_seconds": Num(float, 0, None, none=True),
    "attack_fit_seconds": Num(float, 0, None, none=True),
    "train_history": Of((list,)),
    "test_metrics": Of((dict,)),
    "purified_by": Of((dict,)),
    "source": Of((dict,)),  # where an imported model came from (e.g. a BackdoorBench record)
}
REQUIRED = ("arch", "num_classes", "in_channels", "image_size")


def _type_name(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _depth(v: Any) -> int:
    """Nesting depth of a parsed JSON value, iteratively (no recursion to exhaust)."""
    best, stack = 0, [(v, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict | list):
            best = max(best, d)
            stack.extend((c, d + 1) for c in (node.values() if isinstance(node, dict) else node))
    return best


def _number(where: str, key: str, v: Any, spec: Num) -> int | float | None:
    if v is None and spec.none:
        return None
    ok = isinstance(v, int) and not isinstance(v, bool) if spec.kind is int else \
        isinstance(v, int | float) and not isinstance(v, bool)
    if not ok:
        raise UserError(f"{where}: {key} must be {'an integer' if spec.kind is int else 'a number'}, got {_type_name(v)}")
    if isinstance(v, float) and not math.isfinite(v):
        raise UserError(f"{where}: {key} must be finite, got {v}")
    if (spec.low is not None and v < spec.low) or (spec.high is not None and v > spec.high):
        raise UserError(f"{where}: {key} = {v} is out of range [{spec.low}, {spec.high}]")
    return v


def _floats(where: str, key: str, v: Any, channels: int) -> list[float] | None:
    if v is None:
        return None
    if not isinstance(v, list) or not 1 <= len(v) <= MAX_CHANNELS or \
            not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v):
        raise UserError(f"{where}: {key} must be a list of 1 to {MAX_CHANNELS} finite numbers")
    if len(v) not in (1, channels):
        raise UserError(f"{where}: {key} has {len(v)} values but in_channels is {channels}")
    if key == "std" and min(v) <= 0:
        raise UserError(f"{where}: std must be positive, got {v}")
    return [float(x) for x in v]


def validate_meta(meta: Any, where: str, root: Path | None = None) -> dict[str, Any]:
    """Check a parsed sidecar (or ``--arch`` metadata) against :data:`SCHEMA`; returns a clean copy.

    ``root`` is the checkpoint's folder: files the attack spec names must lie inside it.
    """
    from ..models import MODELS

    if not isinstance(meta, dict):
        raise UserError(f"{where} must hold a JSON object, got {_type_name(meta)}")
    if _depth(meta) > MAX_DEPTH:
        raise UserError(f"{where} nests deeper than {MAX_DEPTH} levels; it is not a ulrl sidecar")
    unknown = sorted(k for k in meta if k not in SCHEMA)
    if unknown:
        raise UserError(f"{where} has unknown key(s) {', '.join(map(repr, unknown[:3]))}; known: {', '.join(SCHEMA)}")
    missing = [k for k in REQUIRED if meta.get(k) is None]
    if missing:
        raise UserError(f"{where} lacks {missing[0]!r}; pass it with --{missing[0].replace('_', '-')} or use --arch")
    out: dict[str, Any] = {}
    for key, spec in SCHEMA.items():
        if key not in meta:
            continue
        v = meta[key]
        if isinstance(spec, Num):
            out[key] = _number(where, key, v, spec)
        elif key in ("mean", "std"):
            continue  # needs in_channels, below
        else:
            if not (v is None and spec.none) and not isinstance(v, spec.kinds):
                kinds = " or ".join(_type_name(k()) for k in spec.kinds)
                raise UserError(f"{where}: {key} must be {kinds}, got {_type_name(v)}")
            if isinstance(v, str) and len(v) > MAX_STRING:
                raise UserError(f"{where}: {key} is a string of {len(v)} characters (at most {MAX_STRING})")
            out[key] = v
    arch = out["arch"].strip().lower().replace("_", "-")
    if arch not in MODELS and ":" in arch:
        raise UserError(f"{where}: the model is the user architecture {out['arch'][:120]!r}, whose code is only imported "
                        "when you name it: pass --arch with it")
    if arch not in MODELS:
        raise UserError(f"{where}: unknown architecture {out['arch'][:64]!r}; known: {', '.join(sorted(MODELS))}")
    for key in ("mean", "std"):
        if key in meta:
            out[key] = _floats(where, key, meta[key], out["in_channels"])
    if out.get("attack") is not None:
        out["attack"] = validate_attack(out["attack"], where, out["num_classes"], out["image_size"], root)
    return out


def validate_attack(spec: Any, where: str, num_classes: int, image_size: int, root: Path | None) -> dict[str, Any]:
    """An attack spec from a file: a registered name, known fields of the right types, sizes
    that fit the image, finite numbers, and pattern files inside ``root``."""
    from ..attacks import ATTACKS
    from ..attacks.base import parse_attack_spec

    if isinstance(spec, str):
        if len(spec) > MAX_STRING:
            raise UserError(f"{where}: the attack spec is {len(spec)} characters long")
        spec = parse_attack_spec(spec)
    name = spec.get("name")
    if not isinstance(name, str) or name.lower() not in ATTACKS:
        raise UserError(f"{where}: the attack spec needs a 'name' naming a known attack, got {str(name)[:40]!r}; "
                        f"known: {', '.join(sorted(ATTACKS))}")
    cls = ATTACKS[name.lower()]
    types = {f.name: str(f.type) for f in fields(cls)}
    out: dict[str, Any] = {"name": name.lower()}
    for key, v in spec.items():
        if key == "name":
            continue
        if key not in types:
            raise UserError(f"{where}: attack {cls.name} has no parameter {str(key)[:40]!r}; known: {', '.join(sorted(types))}")
        kind = types[key]
        if kind.startswith("int"):
            low, high = (-1, image_size) if key in cls.size_fields else (-(2**31), 2**31 - 1)
            v = _number(where, f"attack {key}", v, Num(int, low, high))
        elif kind.startswith("float"):
            v = float(_number(where, f"attack {key}", v, Num(float, -1e9, 1e9)))
        elif kind.startswith("bool"):
            if not isinstance(v, bool):
                raise UserError(f"{where}: attack {key} must be a boolean, got {_type_name(v)}")
        elif not isinstance(v, str) or len(v) > 256:
            raise UserError(f"{where}: attack {key} must be a string of at most 256 characters, got {_type_name(v)}")
        out[key] = v
    if out.get("num_classes", num_classes) != num_classes:
        raise UserError(f"{where}: the attack is for {out['num_classes']} classes but the model has {num_classes}")
    pattern = out.get("pattern")
    if isinstance(pattern, str) and pattern not in cls.builtin_patterns:
        if root is None:
            raise UserError(f"{where}: the attack's pattern file {pattern!r} can only be read from a checkpoint's folder")
        out["pattern"] = str(file_inside(root, pattern, f"{where}: attack pattern file", MAX_PATTERN_BYTES))
    return out


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """Read and validate the sidecar of checkpoint ``path`` (``model.safetensors`` -> ``model.json``)."""
    side = Path(path).with_suffix(".json")
    if not (side.exists() or side.is_symlink()):
        raise UserError(f"checkpoint {path} has no sidecar {side} naming its architecture; pass --arch NAME (see 'ulrl models')")
    input_file(side, "sidecar", MAX_SIDECAR_BYTES)
    try:
        meta = json.loads(side.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        raise UserError(f"sidecar {side} nests too deeply; it is not a ulrl sidecar") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"sidecar {side} is not valid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                        "restore it from the original checkpoint") from None
    return validate_meta(meta, f"sidecar {side}", side.parent)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
