"""Weights from an untrusted file, validated before they are materialised.

The architecture's expected tensors (names, shapes, dtypes) are known first, from a model built
on the ``meta`` device (no memory). The file is then opened lazily and its table of contents is
checked against them:

- ``.safetensors``: the 8-byte header length is bounded before the header is parsed; the library
  memory-maps the data and checks offsets;
- ``.pt``/``.pth`` in PyTorch's zip format: the zip directory is read first; every entry must be
  stored (``torch.save`` never compresses, so a deflated entry is a zip bomb's signature) and the
  pickle (``data.pkl``) is bounded; then ``torch.load(weights_only=True, mmap=True)`` maps the
  storages without reading them. Only plain tensors and containers can be unpickled;
- ``.pt`` in the legacy (pre-1.6) format has no table of contents, so the whole file is bounded by
  the architecture's honest size before ``torch.load(weights_only=True)`` reads it.

Each entry must be a dense CPU tensor with the expected name and shape, floating point where the
architecture has floating point (integer where it has integer buffers), and finite. Only then is
a real model allocated and filled, so peak memory is about twice the architecture's honest size
whatever the file claims.
"""

from __future__ import annotations

import math
import pickle
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError

ATTACK_PREFIX = "__attack__."
MAX_HEADER_BYTES = 16 << 20  # safetensors header / zip pickle
MAX_ATTACK_BYTES = 256 << 20  # an attack's fitted component (generator, perturbations) saved with the model
MAX_MODEL_BYTES = 4 << 30
MAX_ENTRIES = 100_000
SLACK_BYTES = 1 << 20


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype, device="meta").element_size()


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def expected_entries(model: nn.Module) -> dict[str, Entry]:
    """Names, shapes and dtypes of ``model``'s state dict (a ``meta`` model costs no memory)."""
    return {k: Entry(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


# --- opening files lazily --------------------------------------------------------------------------
def _safetensors(path: Path) -> tuple[dict[str, Entry], Any]:
    from safetensors import SafetensorError, safe_open

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise UserError(f"checkpoint {path} is not a safetensors file (only {size} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > min(MAX_HEADER_BYTES, size - 8):
        raise UserError(f"checkpoint {path} is corrupt: its safetensors header claims {n:,} bytes "
                        f"(file {size:,} bytes, limit {MAX_HEADER_BYTES:,})")
    try:
        handle = safe_open(str(path), framework="pt")
        entries = {}
        for k in handle.keys():
            sl = handle.get_slice(k)
            entries[k] = Entry(k, tuple(sl.get_shape()), _st_dtype(path, k, sl.get_dtype()))
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"checkpoint {path} is corrupt or not a safetensors file ({first_line(e)})") from None
    return entries, handle.get_tensor


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _st_dtype(path: Path, name: str, code: str) -> torch.dtype:
    if code not in _ST_DTYPES:
        raise UserError(f"checkpoint {path}: tensor {name[:80]} has dtype {code}, which no layer of a classifier uses")
    return _ST_DTYPES[code]


def _refused_global(e: BaseException) -> str:
    """What torch's weights-only unpickler refused, from its long message (e.g. ``GLOBAL posix.system``)."""
    text = str(e)
    m = re.search(r"(?:unsupported|Unsupported global:) (GLOBAL [\w.]+)", text) or \
        re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    return m.group(1)[:120] if m else first_line(e)


def _check_zip(path: Path, max_pickle: int = MAX_HEADER_BYTES) -> None:
    """PyTorch's zip format: every entry stored, the pickle bounded."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise UserError(f"checkpoint {path} is a damaged zip archive ({first_line(e)})") from None
    if len(infos) > MAX_ENTRIES:
        raise UserError(f"checkpoint {path} has {len(infos):,} archive entries; a state dict has far fewer")
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise UserError(f"checkpoint {path}: entry {info.filename[:80]} is compressed, which torch.save never does "
                            "(a compressed entry can expand without bound); re-save it with torch.save")
        if info.filename.endswith(".pkl") and info.file_size > max_pickle:
            raise UserError(f"checkpoint {path}: its pickle {info.filename[:80]} is {info.file_size:,} bytes; "
                            "a state dict's is far smaller")


def torch_load(path: Path, max_bytes: int | None = None, max_pickle: int = MAX_HEADER_BYTES,
               allow: list | None = None) -> Any:
    """``torch.load(weights_only=True)`` after the checks above; ``allow``: extra safe globals."""
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        _check_zip(path, max_pickle)
    elif max_bytes is not None and path.stat().st_size > max_bytes:
        raise UserError(f"checkpoint {path} is {path.stat().st_size:,} bytes but the architecture's weights need "
                        f"at most {max_bytes:,}; it is not this model's state dict")
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(allow or []):
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing; the refusal is ours to say
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        raise UserError(f"refusing to load {path}: it holds pickled objects other than plain tensors "
                        f"({_refused_global(e)}); export a state_dict or a safetensors file") from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            struct.error, zipfile.BadZipFile, MemoryError, RecursionError, OverflowError) as e:
        raise UserError(f"checkpoint {path} is corrupt or not a PyTorch file ({first_line(e)})") from None


def state_entries(obj: Any, source: str) -> tuple[dict[str, Entry], Any]:
    """A loaded state dict's table of contents: string keys, dense CPU tensors (not yet read)."""
    if not isinstance(obj, dict):
        raise UserError(f"{source} holds a {type(obj).__name__}, not a state_dict (a mapping of names to tensors)")
    entries = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise UserError(f"{source} has a key of type {type(k).__name__} ({str(k)[:40]}); state dict keys are names")
        if not isinstance(v, torch.Tensor):
            raise UserError(f"{source}: {k[:80]} is a {type(v).__name__}, not a tensor")
        if v.is_meta or v.layout != torch.strided or v.device.type != "cpu" or v.is_quantized:
            kind = "a meta tensor (no values)" if v.is_meta else f"a {v.layout} / {v.device.type} tensor"
            raise UserError(f"{source}: {k[:80]} is {kind}; weights must be dense CPU tensors")
        entries[k] = Entry(k, tuple(v.shape), v.dtype)
    return entries, obj.__getitem__


def _torch_file(path: Path, max_bytes: int) -> tuple[dict[str, Entry], Any]:
    obj = torch_load(path, max_bytes)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return state_entries(obj, f"checkpoint {path}")


# --- the check ------------------------------------------------------------------------------------
def _dtype_ok(found: torch.dtype, want: torch.dtype) -> bool:
    if want.is_floating_point:
        return found.is_floating_point  # float16/bfloat16/float64 are the same family, converted on load
    return not found.is_floating_point and not found.is_complex and found != torch.bool


def check_entries(entries: dict[str, Entry], expected: dict[str, Entry], source: str) -> dict[str, str]:
    """Match the file's entries to the architecture's: ``{file name: model name}``, or a one-line error."""
    model_keys = {k: k for k in entries if not k.startswith(ATTACK_PREFIX)}
    wanted = set(expected)
    if model_keys and not set(model_keys) & wanted and any(k.startswith("net.") for k in wanted):
        model_keys = {k: "net." + k for k in model_keys}  # a bare network's state dict: our normalisation stays
        wanted -= {"mean", "std"}
    have = set(model_keys.values())
    missing, unexpected = sorted(wanted - have), sorted(k for k, v in model_keys.items() if v not in expected)
    if missing or unexpected:
        raise UserError(f"{source} does not match the architecture: {len(missing)} missing keys (e.g. {missing[:2]}), "
                        f"{len(unexpected)} unexpected (e.g. {[u[:60] for u in unexpected[:2]]}); check --arch")
    for k, name in model_keys.items():
        got, want = entries[k], expected[name]
        if got.shape != want.shape:
            raise UserError(f"{source} does not match the architecture: {k} has shape {got.shape}, expected {want.shape} "
                            "(wrong class count or input size?)")
        if not _dtype_ok(got.dtype, want.dtype):
            raise UserError(f"{source}: tensor {k} has dtype {str(got.dtype).removeprefix('torch.')}, expected a "
                            f"{'floating-point' if want.dtype.is_floating_point else 'integer'} tensor like "
                            f"{str(want.dtype).removeprefix('torch.')}")
    odd = next((k for k, e in entries.items() if k.startswith(ATTACK_PREFIX) and (e.dtype.is_complex or e.dtype == torch.bool)), None)
    if odd:
        raise UserError(f"{source}: attack tensor {odd[:80]} has dtype {str(entries[odd].dtype).removeprefix('torch.')}, "
                        "expected real numbers")
    attack_bytes = sum(e.nbytes for k, e in entries.items() if k.startswith(ATTACK_PREFIX))
    if attack_bytes > MAX_ATTACK_BYTES:
        raise UserError(f"{source}: its attack component claims {attack_bytes:,} bytes (limit {MAX_ATTACK_BYTES:,})")
    return model_keys


def honest_bytes(model_on_meta: nn.Module, source: str) -> int:
    honest = sum(e.nbytes for e in expected_entries(model_on_meta).values())
    if honest > MAX_MODEL_BYTES:
        raise UserError(f"{source}: the architecture described needs {honest:,} bytes of weights (limit {MAX_MODEL_BYTES:,}); "
                        "check num_classes and image_size")
    return honest


def open_weights(path: Path, honest: int) -> tuple[dict[str, Entry], Any]:
    """The table of contents of a weights file and a getter for each entry (nothing read yet)."""
    if path.suffix == ".safetensors":
        return _safetensors(path)
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return _torch_file(path, 2 * honest + MAX_ATTACK_BYTES // 16 + SLACK_BYTES)
    raise UserError(f"checkpoint {path} must be a .safetensors, .pt or .pth file")


def build_model(meta: dict[str, Any], open_entries, source: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model ``meta`` describes, filled from ``open_entries(honest_bytes)`` -> ``(entries, get)``:
    the architecture is built on the ``meta`` device (no memory), the entries are matched to it by
    name, shape and dtype, and only then is the model allocated and each tensor read, checked finite
    and copied in. Returns ``(model in eval mode, attack tensors)``."""
    from ..models import create_model

    def build() -> nn.Module:
        return create_model(meta["arch"], meta["num_classes"], meta["in_channels"], meta["image_size"],
                            meta.get("mean"), meta.get("std"))

    with torch.device("meta"):
        skeleton = build()
    entries, get = open_entries(honest_bytes(skeleton, source))
    state, attack = checked_state(entries, get, skeleton, source)
    model = build()
    own = model.state_dict()
    model.load_state_dict({**{k: own[k] for k in set(own) - set(state)}, **state})  # at most mean/std kept (bare network)
    return model.eval(), attack


def checked_state(entries: dict[str, Entry], get, model_on_meta: nn.Module, source: str
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Match ``entries`` to the architecture, then read each tensor (finite, converted to the model's dtype)."""
    expected = expected_entries(model_on_meta)
    names = check_entries(entries, expected, source)
    state: dict[str, torch.Tensor] = {}
    attack: dict[str, torch.Tensor] = {}
    for k in entries:
        t = _materialise(get, k, source)
        if k in names:
            want = expected[names[k]].dtype
            state[names[k]] = t.to(want) if t.dtype != want else t
        else:
            attack[k[len(ATTACK_PREFIX):]] = t
    return state, attack


def _materialise(get, name: str, source: str) -> torch.Tensor:
    try:
        t = get(name).clone(memory_format=torch.contiguous_format)  # off the file's mapping, into our memory
    except (RuntimeError, OSError, ValueError) as e:
        raise UserError(f"{source}: tensor {name[:80]} cannot be read ({first_line(e)})") from None
    if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
        raise UserError(f"{source}: tensor {name[:80]} holds NaN or infinite values; this checkpoint is damaged")
    if name.endswith("running_var") and bool((t < 0).any()):
        raise UserError(f"{source}: tensor {name[:80]} holds negative variances; this checkpoint is damaged")
    return t
