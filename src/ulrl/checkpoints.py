"""Safe checkpoints: weights as safetensors plus a JSON sidecar; atomic writes; no unpickling.

A checkpoint ``model.safetensors`` has a sidecar ``model.json`` with the architecture,
class count, input shape, normalisation, the attack spec when known, the training config and
the seed. Tensors of an attack's fitted component are stored in the same safetensors file
under the ``__attack__.`` prefix. Reading goes through :mod:`ulrl.io`, which validates the sidecar and
every tensor entry before anything is allocated; a ``.pt``/``.pth`` file is read only with
``torch.load(weights_only=True)``, which refuses anything but plain tensors and containers.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .errors import UserError
from .io import ATTACK_PREFIX, build_model, input_file, open_weights, read_sidecar, validate_meta
from .io.paths import check_output, ensure_dir  # noqa: F401  (part of this module's interface)


# --- atomic, non-clobbering output ----------------------------------------------------------
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
    """The validated sidecar of checkpoint ``path`` (see :mod:`ulrl.io.sidecar`)."""
    return read_sidecar(path)


def load_checkpoint(path: str | Path, meta: dict[str, Any] | None = None,
                    check: Callable[[dict[str, Any]], None] | None = None,
                    ) -> tuple[nn.Module, dict[str, Any], dict[str, torch.Tensor]]:
    """Load a checkpoint: ``(model, meta, attack_tensors)``, validating before allocating.

    ``meta`` replaces the sidecar (a .pt file without one, with ``--arch``). ``check(meta)`` runs
    after the description is validated and before any weight is read (e.g. against the data).
    Order: the file is a regular file; the sidecar parses into its bounded schema; ``check``; the
    architecture is built on the ``meta`` device (no memory); the file's entries are matched to it
    by name, shape and dtype; only then is the model allocated and each tensor read, checked
    finite and copied in.
    """
    p = input_file(path, "checkpoint", hint="; give a .safetensors or .pt/.pth file")
    meta = read_sidecar(p) if meta is None else validate_meta(meta, f"the description of {path}", p.parent)
    if check is not None:
        check(meta)
    model, attack_tensors = build_model(meta, lambda honest: open_weights(p, honest), f"checkpoint {path}")
    return model, meta, attack_tensors
