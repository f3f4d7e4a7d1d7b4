"""Safe checkpoints: weights as safetensors plus a JSON sidecar; atomic writes; no unpickling.

A checkpoint ``model.safetensors`` has a sidecar ``model.json`` with the architecture,
class count, input shape, normalisation, the attack spec when known, the training config and
the seed. Tensors of an attack's fitted component are stored in the same safetensors file
under the ``__attack__.`` prefix. A ``.pt``/``.pth`` file is read only with
``torch.load(weights_only=True)``, which refuses anything but plain tensors and containers.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import UserError

ATTACK_PREFIX = "__attack__."


# --- atomic, non-clobbering output ----------------------------------------------------------
def check_output(path: str | Path, inputs: Iterable[str | Path] = (), overwrite: bool = False) -> Path:
    """Refuse to write over an input file, or over an existing file unless ``overwrite``."""
    out = Path(path).resolve()
    for inp in inputs:
        if inp and out == Path(inp).resolve():
            raise UserError(f"output {path} is also an input; choose another output path")
    if out.exists() and not overwrite:
        raise UserError(f"{path} already exists; choose another path or pass --overwrite")
    return out


def ensure_dir(path: str | Path) -> Path:
    """Create an output directory and check that it is writable."""
    d = Path(path)
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d):
            pass
    except OSError as e:
        raise UserError(f"cannot write to output directory {d}: {e.strerror}; choose a writable --out") from None
    return d


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)`` then move the finished file into place in one rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n"))


def _jsonable(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple | set):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def sidecar(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


# --- save / load ------------------------------------------------------------------------------
def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    meta: dict[str, Any],
    attack_tensors: dict[str, torch.Tensor] | None = None,
    inputs: Iterable[str | Path] = (),
    overwrite: bool = False,
) -> Path:
    """Write ``path`` (.safetensors) and its JSON sidecar atomically; never over an input."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"checkpoint path {path} must end in .safetensors")
    check_output(path, inputs, overwrite)
    check_output(sidecar(path), inputs, overwrite)
    ensure_dir(path.parent)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({ATTACK_PREFIX + k: v.detach().cpu().contiguous() for k, v in (attack_tensors or {}).items()})
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
    write_json(sidecar(path), meta)
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    side = sidecar(path)
    if not side.is_file():
        raise UserError(f"checkpoint {path} has no sidecar {side} naming its architecture; pass --arch NAME (see 'ulrl models')")
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"sidecar {side} is not valid JSON ({e}); restore it from the original checkpoint") from None
    if not isinstance(meta, dict):
        raise UserError(f"sidecar {side} must hold a JSON object")
    return meta


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a .pt/.pth state dict, never unpickling objects."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if p.suffix == ".safetensors":
        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"checkpoint {path} is corrupt or not a safetensors file ({e})") from None
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing; the refusal is ours to say
            warnings.simplefilter("ignore")
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"refusing to load {path}: it contains pickled objects other than plain tensors; export a state_dict or safetensors file") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"checkpoint {path} is corrupt or not a PyTorch file ({str(e).splitlines()[0]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {path} is not a state_dict (a mapping of names to tensors)")
    return obj


def split_attack(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    n = len(ATTACK_PREFIX)
    model = {k: v for k, v in tensors.items() if not k.startswith(ATTACK_PREFIX)}
    attack = {k[n:]: v for k, v in tensors.items() if k.startswith(ATTACK_PREFIX)}
    return model, attack


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` with a one-line error naming what does not match."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if state and not (set(state) & set(own)) and any(k.startswith("net.") for k in own):
        state = {"net." + k: v for k, v in state.items()}  # a bare network's state_dict
        missing = sorted(set(own) - set(state) - {"mean", "std"})
        unexpected = sorted(set(state) - set(own))
        state = {**{k: own[k] for k in ("mean", "std") if k in own and k not in state}, **state}
    if missing or unexpected:
        raise UserError(
            f"{source} does not match the architecture: {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); check --arch"
        )
    bad = [k for k in own if own[k].shape != state[k].shape]
    if bad:
        k = bad[0]
        raise UserError(
            f"{source} does not match the architecture: {k} has shape {tuple(state[k].shape)}, "
            f"expected {tuple(own[k].shape)} (wrong class count or input size?)"
        )
    model.load_state_dict(state)


def load_checkpoint(path: str | Path, meta: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any], dict[str, torch.Tensor]]:
    """Load a checkpoint: ``(model, meta, attack_tensors)``.

    ``meta`` overrides or replaces the sidecar (needed for a .pt file without one).
    """
    from .models import create_model

    tensors = read_tensors(path)
    if meta is None:
        meta = read_meta(path)
    for key in ("arch", "num_classes", "in_channels", "image_size"):
        if key not in meta:
            raise UserError(f"checkpoint metadata for {path} lacks {key!r}; pass it with --{key.replace('_', '-')}")
    model = create_model(
        meta["arch"],
        num_classes=int(meta["num_classes"]),
        in_channels=int(meta["in_channels"]),
        image_size=int(meta["image_size"]),
        mean=tuple(meta.get("mean") or ()) or None,
        std=tuple(meta.get("std") or ()) or None,
    )
    state, attack_tensors = split_attack(tensors)
    load_state(model, state, f"checkpoint {path}")
    model.eval()
    return model, meta, attack_tensors
