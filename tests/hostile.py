"""A corpus of hostile and malformed inputs for ``ulrl evaluate`` / ``purify`` / ``scan``, and its runner.

    python tests/hostile.py build DIR   # write every case's files under DIR/cases/NAME and DIR/cases.json
    python tests/hostile.py run DIR     # run each case in a forked child; DIR/results.json

Nothing here is committed as a binary: every file is generated from the code below. Each case
is run in a child forked from a process that has imported ``ulrl`` but never run a tensor
operation, with the case's folder as the current directory; the runner records the exit code,
stdout, stderr, the child's peak resident memory (``wait4``), its seconds, and every file that
appeared or changed under DIR outside the case's ``out`` folder. ``tests/test_hostile.py``
asserts on the results. Payloads try to create ``PWNED`` files: their absence is the
"no code ran" check.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

CASES: dict[str, tuple[str, Callable[[Path], list[str]]]] = {}  # name -> (category, build(case_dir) -> argv)
SIZE, CLASSES = 16, 4
BASE_META = {"format": "ulrl-checkpoint/1", "arch": "cnn-small", "num_classes": CLASSES, "in_channels": 1,
             "image_size": SIZE, "mean": [0.5], "std": [0.25], "dataset": "synthetic",
             "attack": {"name": "badnets", "patch_size": 3, "target": 0, "rate": 0.1}}


def case(category: str):
    def deco(fn):
        CASES[fn.__name__.removeprefix("c_").replace("_", "-")] = (category, fn)
        return fn
    return deco


# --- helpers -------------------------------------------------------------------------------------------
def _state():
    import torch

    from ulrl.models import create_model

    torch.manual_seed(0)
    return create_model("cnn-small", CLASSES, 1, SIZE, (0.5,), (0.25,)).state_dict()


def evaluate(model: str, *extra: str) -> list[str]:
    return ["evaluate", "--model", model, "--data", "synthetic", "--no-progress", *extra]


def purify(model: str, *extra: str, out: str = "out") -> list[str]:
    return ["purify", "--model", model, "--data", "synthetic", "--clean-count", "16", "--out", out, "--no-progress", *extra]


def checkpoint(d: Path, meta=None, state=None, extra=None, name: str = "model") -> str:
    """A well-formed safetensors checkpoint with a sidecar (``meta`` replaced as given)."""
    from safetensors.torch import save_file

    tensors = dict(state if state is not None else _state())
    tensors.update({"__attack__." + k: v for k, v in (extra or {}).items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / f"{name}.safetensors"))
    side = d / f"{name}.json"
    side.write_text(meta if isinstance(meta, str) else json.dumps(BASE_META if meta is None else meta))
    return f"{name}.safetensors"


def sidecar_case(d: Path, **changes) -> list[str]:
    meta = {**BASE_META, **changes}
    return evaluate(checkpoint(d, meta))


def attack_case(d: Path, **attack) -> list[str]:
    return evaluate(checkpoint(d, {**BASE_META, "attack": attack}))


def raw_safetensors(header: dict, data: bytes = b"", length: int | None = None) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data


class Payload:
    """Pickled, it calls ``os.system`` to create a marker file: if the marker exists, code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def marker(d: Path) -> Path:
    return d.parent.parent / f"PWNED-{d.name}"


def torch_save(obj, path: Path, legacy: bool = False) -> None:
    import torch

    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)


def rezip(src: Path, dst: Path, replace: dict[str, bytes] | None = None, compress: bool = False) -> None:
    """Copy a torch zip archive entry by entry, replacing some entries' bytes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = (replace or {}).get(info.filename.split("/", 1)[1], zin.read(info))
            zout.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED)


# --- pickle payloads ------------------------------------------------------------------------------------
@case("pickle")
def c_pickle_zip_object(d):
    import torch
    torch_save({"net.classifier.weight": torch.zeros(1), "x": Payload(marker(d))}, d / "m.pt")
    return evaluate("m.pt", "--arch", "cnn-small")


@case("pickle")
def c_pickle_legacy_format(d):
    torch_save({"w": Payload(marker(d))}, d / "m.pt", legacy=True)
    return evaluate("m.pt", "--arch", "cnn-small")


@case("pickle")
def c_pickle_plain_pickle(d):
    (d / "m.pt").write_bytes(pickle.dumps({"w": Payload(marker(d))}))
    return evaluate("m.pt", "--arch", "cnn-small")


@case("pickle")
def c_pickle_edited_data_pkl(d):
    torch_save(_state(), d / "ok.pt")
    rezip(d / "ok.pt", d / "m.pt", {"data.pkl": pickle.dumps(Payload(marker(d)), protocol=2)})
    (d / "ok.pt").unlink()
    return evaluate("m.pt", "--arch", "cnn-small")


@case("pickle")
def c_pickle_nested_in_state_dict(d):
    torch_save({"state_dict": {**_state(), "extra": [{"deep": Payload(marker(d))}]}}, d / "m.pt")
    return evaluate("m.pt", "--arch", "cnn-small")


@case("pickle")
def c_pickle_protocol0_text(d):
    (d / "m.pth").write_bytes(f"cposix\nsystem\n(Vtouch {marker(d)}\ntR.".encode())
    return evaluate("m.pth", "--arch", "cnn-small")


@case("pickle")
def c_pickle_builtins_exec(d):
    class Exec:
        def __reduce__(self):
            return (exec, (f"open({str(marker(d))!r}, 'w')",))
    torch_save({"w": Exec()}, d / "m.pt")
    return purify("m.pt", "--arch", "cnn-small")


@case("pickle")
def c_pickle_in_purify_with_sidecar(d):
    torch_save({"w": Payload(marker(d))}, d / "model.pt")
    (d / "model.json").write_text(json.dumps(BASE_META))
    return purify("model.pt")


# --- safetensors corruption -----------------------------------------------------------------------------
@case("safetensors")
def c_st_empty_file(d):
    (d / "model.safetensors").write_bytes(b"")
    (d / "model.json").write_text(json.dumps(BASE_META))
    return evaluate("model.safetensors")


@case("safetensors")
def c_st_header_length_huge(d):
    (d / "model.safetensors").write_bytes(raw_safetensors({}, length=2**63 - 1))
    (d / "model.json").write_text(json.dumps(BASE_META))
    return evaluate("model.safetensors")


@case("safetensors")
def c_st_header_longer_than_file(d):
    (d / "model.safetensors").write_bytes(raw_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                                                          length=10_000))
    (d / "model.json").write_text(json.dumps(BASE_META))
    return evaluate("model.safetensors")


@case("safetensors")
def c_st_header_not_json(d):
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 12) + b"{not json!!}")
    (d / "model.json").write_text(json.dumps(BASE_META))
    return evaluate("model.safetensors")


@case("safetensors")
def c_st_offsets_out_of_bounds(d):
    (d / "model.safetensors").write_bytes(raw_safetensors(
        {"net.classifier.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 1 << 30]}}, bytes(32)))
    (d / "model.json").write_text(json.dumps(BASE_META))
    return evaluate("model.safetensors")


@case("safetensors")
def c_st_overlapping_offsets(d):
    (d / "model.safetensors").write_bytes(raw_safetensors(
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
         "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24)))
    (d / "model.json").write_text(json.dumps(BASE_META))
    return evaluate("model.safetensors")


@case("safetensors")
def c_st_unknown_dtype(d):
    (d / "model.safetensors").write_bytes(raw_safetensors({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}},
                                                          bytes(8)))
    (d / "model.json").write_text(json.dumps(BASE_META))
    return evaluate("model.safetensors")


@case("safetensors")
def c_st_shape_mismatch(d):
    import torch
    state = _state()
    state["net.classifier.weight"] = torch.zeros(7, state["net.classifier.weight"].shape[1])
    return evaluate(checkpoint(d, state=state))


@case("safetensors")
def c_st_nan_weights(d):
    state = _state()
    state["net.classifier.weight"][0, 0] = float("nan")
    return purify(checkpoint(d, state=state))


@case("safetensors")
def c_st_inf_weights(d):
    state = _state()
    state["net.classifier.bias"][1] = float("inf")
    return evaluate(checkpoint(d, state=state))


@case("safetensors")
def c_st_int_weights(d):
    state = _state()
    state["net.classifier.weight"] = state["net.classifier.weight"].to(__import__("torch").int64)
    return evaluate(checkpoint(d, state=state))


@case("safetensors")
def c_st_bool_attack_tensor(d):
    import torch
    return evaluate(checkpoint(d, extra={"mask": torch.ones(3, dtype=torch.bool)}))


@case("safetensors")
def c_st_missing_and_unexpected_keys(d):
    import torch
    state = {k: v for k, v in _state().items() if "classifier" not in k}
    state["evil.weight"] = torch.zeros(3)
    return evaluate(checkpoint(d, state=state))


# --- torch file oddities --------------------------------------------------------------------------------
@case("torch-file")
def c_pt_empty_file(d):
    (d / "m.pt").write_bytes(b"")
    return evaluate("m.pt", "--arch", "cnn-small")


@case("torch-file")
def c_pt_integer_keys(d):
    torch_save({i: v for i, v in enumerate(_state().values())}, d / "m.pt")
    return evaluate("m.pt", "--arch", "cnn-small")


@case("torch-file")
def c_pt_meta_tensors(d):
    import torch
    torch_save({k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in _state().items()}, d / "m.pt")
    return evaluate("m.pt", "--arch", "cnn-small")


@case("torch-file")
def c_pt_sparse_tensors(d):
    torch_save({k: v.to_sparse() if v.ndim == 2 else v for k, v in _state().items()}, d / "m.pt")
    return evaluate("m.pt", "--arch", "cnn-small")


@case("torch-file")
def c_pt_complex_weights(d):
    import torch
    torch_save({k: v.to(torch.complex64) if v.is_floating_point() else v for k, v in _state().items()}, d / "m.pt")
    return evaluate("m.pt", "--arch", "cnn-small")


@case("torch-file")
def c_pt_nan_weights(d):
    state = _state()
    state["net.classifier.weight"].fill_(float("nan"))
    torch_save(state, d / "m.pt")
    return evaluate("m.pt", "--arch", "cnn-small")


@case("torch-file")
def c_pt_not_a_dict(d):
    import torch
    torch_save([torch.zeros(2), torch.ones(2)], d / "m.pt")
    return evaluate("m.pt", "--arch", "cnn-small")


@case("torch-file")
def c_pt_truncated_zip(d):
    torch_save(_state(), d / "ok.pt")
    data = (d / "ok.pt").read_bytes()
    (d / "m.pt").write_bytes(data[: len(data) // 2])
    (d / "ok.pt").unlink()
    return evaluate("m.pt", "--arch", "cnn-small")


# --- memory bombs -------------------------------------------------------------------------------------
@case("memory")
def c_bomb_deflated_storage(d):
    """A torch zip whose first storage is 1 GiB of zeros, deflated to about 1 MB."""
    torch_save(_state(), d / "ok.pt")
    with zipfile.ZipFile(d / "ok.pt") as zin, zipfile.ZipFile(d / "m.pt", "w") as zout:
        for info in zin.infolist():
            if not info.filename.endswith("/data/0"):
                zout.writestr(info, zin.read(info))
                continue
            big = zipfile.ZipInfo(info.filename)
            big.compress_type = zipfile.ZIP_DEFLATED
            with zout.open(big, "w", force_zip64=True) as f:
                block = bytes(1 << 22)
                for _ in range(256):
                    f.write(block)
    (d / "ok.pt").unlink()
    return evaluate("m.pt", "--arch", "cnn-small")


@case("memory")
def c_bomb_sparse_legacy_file(d):
    """A legacy .pt padded (sparsely) to 3 GiB: refused on its size before it is read."""
    torch_save(_state(), d / "m.pt", legacy=True)
    with open(d / "m.pt", "r+b") as f:
        f.truncate(3 << 30)
    return evaluate("m.pt", "--arch", "cnn-small")


@case("memory")
def c_bomb_safetensors_huge_tensor(d):
    """A sparse 3 GiB safetensors file whose one tensor claims a real model name with a huge shape."""
    n = 3 << 30
    with open(d / "model.safetensors", "wb") as f:
        f.write(raw_safetensors({"net.classifier.weight": {"dtype": "F32", "shape": [4, n // 16], "data_offsets": [0, n // 4 * 4]}}))
        f.truncate(f.tell() + n // 4 * 4)
    (d / "model.json").write_text(json.dumps(BASE_META))
    return evaluate("model.safetensors")


@case("memory")
def c_bomb_sidecar_classes_in_range(d):
    """num_classes 100000 passes the range check; the 2 KB weights do not match: refused before allocation."""
    return sidecar_case(d, num_classes=100_000)


@case("memory")
def c_bomb_sidecar_billion_classes(d):
    return sidecar_case(d, num_classes=10**9)


@case("memory")
def c_bomb_sidecar_image_size(d):
    return sidecar_case(d, image_size=10**6)


@case("memory")
def c_bomb_json_nesting(d):
    checkpoint(d, "[" * 200_000 + "]" * 200_000)
    return evaluate("model.safetensors")


@case("memory")
def c_bomb_sidecar_too_big(d):
    checkpoint(d, json.dumps({**BASE_META, "dataset": "x" * (5 << 20)}))
    return evaluate("model.safetensors")


@case("memory")
def c_bomb_attack_patch_size(d):
    return attack_case(d, name="badnets", patch_size=10**9)


@case("memory")
def c_bomb_pattern_png(d):
    """A 20000x20000 one-bit PNG (tens of KB on disk, 400 M pixels decoded)."""
    from PIL import Image
    Image.new("1", (20000, 20000)).save(d / "pat.png", optimize=True)
    return attack_case(d, name="badnets", pattern="pat.png")


# --- sidecar types and structure ------------------------------------------------------------------------
@case("sidecar")
def c_side_string_for_number(d):
    return sidecar_case(d, num_classes="ten")


@case("sidecar")
def c_side_negative_channels(d):
    return sidecar_case(d, in_channels=-1)


@case("sidecar")
def c_side_arch_not_string(d):
    return sidecar_case(d, arch=123)


@case("sidecar")
def c_side_unknown_arch(d):
    return sidecar_case(d, arch="resnet9000")


@case("sidecar")
def c_side_attack_is_list(d):
    return sidecar_case(d, attack=["badnets", 3])


@case("sidecar")
def c_side_attack_without_name(d):
    return attack_case(d, patch_size=3, target=0)


@case("sidecar")
def c_side_float_patch_size(d):
    return attack_case(d, name="badnets", patch_size=2.5)


@case("sidecar")
def c_side_attack_target_out_of_range(d):
    return attack_case(d, name="badnets", target=99)


@case("sidecar")
def c_side_attack_unknown_field(d):
    return attack_case(d, name="badnets", payload="rm -rf /")


@case("sidecar")
def c_side_attack_nan_alpha(d):
    checkpoint(d, json.dumps({**BASE_META, "attack": {"name": "blended", "alpha": 1e999}}).replace("Infinity", "1e999"))
    return evaluate("model.safetensors")


@case("sidecar")
def c_side_mean_not_numbers(d):
    return sidecar_case(d, mean="abc")


@case("sidecar")
def c_side_zero_std(d):
    return sidecar_case(d, std=[0])


@case("sidecar")
def c_side_unknown_key(d):
    return sidecar_case(d, __class__="os.system")


@case("sidecar")
def c_side_nan_constant(d):
    checkpoint(d, json.dumps(BASE_META)[:-1] + ', "seed": NaN}')
    return evaluate("model.safetensors")


@case("sidecar")
def c_side_invalid_utf8(d):
    checkpoint(d, "{}")
    (d / "model.json").write_bytes(b'{"arch": "\xff\xfe"}')
    return evaluate("model.safetensors")


@case("sidecar")
def c_side_top_level_array(d):
    checkpoint(d, "[1, 2, 3]")
    return evaluate("model.safetensors")


@case("sidecar")
def c_side_is_directory(d):
    checkpoint(d)
    (d / "model.json").unlink()
    (d / "model.json").mkdir()
    return evaluate("model.safetensors")


@case("sidecar")
def c_side_attack_component_wrong_shape(d):
    """An LF attack whose fitted pattern has 5 channels, for a 1-channel model."""
    import torch
    meta = {**BASE_META, "attack": {"name": "lf", "target": 1}}
    return evaluate(checkpoint(d, meta, extra={"lf.pattern": torch.rand(5, SIZE, SIZE)}))


# --- paths named inside the sidecar ----------------------------------------------------------------------
@case("paths")
def c_path_absolute_pattern(d):
    return attack_case(d, name="badnets", pattern="/etc/passwd")


@case("paths")
def c_path_dotdot_pattern(d):
    from PIL import Image
    Image.new("L", (3, 3)).save(d.parent / f"outside-{d.name}.png")
    return attack_case(d, name="blended", pattern=f"../outside-{d.name}.png")


@case("paths")
def c_path_symlink_escape(d):
    from PIL import Image
    Image.new("L", (3, 3)).save(d.parent / f"outside-{d.name}.png")
    (d / "pat.png").symlink_to(d.parent / f"outside-{d.name}.png")
    return attack_case(d, name="badnets", pattern="pat.png")


@case("paths")
def c_path_pattern_is_directory(d):
    (d / "pat").mkdir()
    return attack_case(d, name="badnets", pattern="pat")


@case("paths")
def c_path_pattern_is_fifo(d):
    os.mkfifo(d / "pat.png")
    return attack_case(d, name="badnets", pattern="pat.png")


@case("paths")
def c_path_pattern_not_an_image(d):
    (d / "pat.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    return attack_case(d, name="badnets", pattern="pat.png")


@case("paths")
def c_model_is_directory(d):
    (d / "m.safetensors").mkdir()
    return evaluate("m.safetensors")


@case("paths")
def c_model_is_fifo(d):
    os.mkfifo(d / "m.pt")
    return evaluate("m.pt", "--arch", "cnn-small")


@case("paths")
def c_model_is_device(d):
    return evaluate("/dev/zero", "--arch", "cnn-small")


@case("paths")
def c_model_missing(d):
    return purify("nothing.safetensors")


# --- output paths ----------------------------------------------------------------------------------------
@case("output")
def c_out_is_a_file(d):
    (d / "out").write_text("keep me")
    return purify(checkpoint(d))


@case("output")
def c_out_in_proc(d):
    return purify(checkpoint(d), out="/proc/self/ulrl-out")


@case("output")
def c_out_is_input_folder_sidecar(d):
    """A .pt whose sidecar is model.json: purifying into its own folder would replace that sidecar."""
    torch_save(_state(), d / "model.pt")
    (d / "model.json").write_text(json.dumps(BASE_META))
    return purify("model.pt", "--overwrite", out=".")


@case("output")
def c_out_is_input_folder(d):
    return purify(checkpoint(d), "--overwrite", out=".")


@case("output")
def c_out_symlink_to_input(d):
    checkpoint(d, name="input")
    (d / "out").mkdir()
    (d / "out" / "model.safetensors").symlink_to(d / "input.safetensors")
    return purify("input.safetensors", "--overwrite")


@case("output")
def c_out_inside_data_dir(d):
    from PIL import Image
    for c in range(CLASSES):
        (d / "data" / str(c)).mkdir(parents=True)
        Image.new("L", (SIZE, SIZE), 60 * c).save(d / "data" / str(c) / "0.png")
    argv = ["scan", "--model", checkpoint(d), "--data", "data", "--out", "data/results", "--no-progress"]
    return argv


@case("output")
def c_out_existing_without_overwrite(d):
    (d / "out").mkdir()
    (d / "out" / "results.json").write_text("{}")
    return purify(checkpoint(d))


# --- the data the model is checked on -------------------------------------------------------------------
def image_folder(d: Path, bad: Callable[[Path], None] | None = None) -> str:
    """A class-per-folder dataset (train/ and test/) of tiny grey images; ``bad(folder)`` adds a hostile file."""
    from PIL import Image
    for split in ("train", "test"):
        for c in range(CLASSES):
            (d / "data" / split / str(c)).mkdir(parents=True)
            for i in range(4):
                Image.new("L", (SIZE, SIZE), 60 * c + i).save(d / "data" / split / str(c) / f"{i}.png")
    if bad:
        bad(d / "data" / "train" / "0")
    return "data"


@case("data")
def c_data_png_bomb(d):
    from PIL import Image
    data = image_folder(d, lambda f: Image.new("1", (20000, 20000)).save(f / "zz.png", optimize=True))
    return ["evaluate", "--model", checkpoint(d), "--data", data, "--no-progress"]


@case("data")
def c_data_fifo_image(d):
    data = image_folder(d, lambda f: os.mkfifo(f / "zz.png"))
    return ["evaluate", "--model", checkpoint(d), "--data", data, "--no-progress"]


@case("data")
def c_data_idx_gzip_bomb(d):
    """An IDX image file whose 1 MB gzip stream expands to 1 GiB of pixels beyond what its header declares."""
    import gzip
    (d / "mnist").mkdir()
    for split, n in (("train", 8), ("t10k", 4)):
        with gzip.open(d / "mnist" / f"{split}-images-idx3-ubyte.gz", "wb", compresslevel=1) as f:
            f.write(bytes((0, 0, 8, 3)) + struct.pack(">III", n, 28, 28))
            block = bytes(1 << 22)
            for _ in range(256 if split == "train" else 1):
                f.write(block)
        with gzip.open(d / "mnist" / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(bytes((0, 0, 8, 1)) + struct.pack(">I", n) + bytes(n))
    return ["evaluate", "--model", "/dev/null", "--data", "./mnist", "--no-progress"]


@case("data")
def c_data_idx_header_claims_huge(d):
    (d / "mnist").mkdir()
    for split in ("train", "t10k"):
        (d / "mnist" / f"{split}-images-idx3-ubyte").write_bytes(bytes((0, 0, 8, 3)) + struct.pack(">III", 2**31, 4096, 4096))
        (d / "mnist" / f"{split}-labels-idx1-ubyte").write_bytes(bytes((0, 0, 8, 1)) + struct.pack(">I", 2**31))
    return ["evaluate", "--model", "/dev/null", "--data", "./mnist", "--no-progress"]


# --- building and running ------------------------------------------------------------------------------
def build(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    manifest = []
    for name, (category, fn) in CASES.items():
        d = root / "cases" / name
        d.mkdir(parents=True)
        argv = fn(d)
        manifest.append({"name": name, "category": category, "argv": argv})
    (root / "cases.json").write_text(json.dumps(manifest, indent=1))


def snapshot(root: Path) -> dict[str, str]:
    """Path -> kind and content digest of everything under ``root/cases`` (not following symlinks)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root / "cases"):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            elif p.is_file() and st.st_size < (64 << 20):
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = f"{st.st_mode}:{st.st_size}:{st.st_mtime_ns}"
    for p in root.glob("PWNED*"):
        out[p.name] = "marker"
    return out


def run(root: Path, timeout: float = 60.0) -> None:
    import torch

    import ulrl.checkpoints  # noqa: F401  (imported before forking, so each child starts fast)
    import ulrl.pipeline  # noqa: F401
    from ulrl.cli import main

    with torch.device("meta"):  # warm the meta-device dispatch; no thread pool is started by meta tensors
        torch.empty(2) + 1

    cases = json.loads((root / "cases.json").read_text())
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    results = []
    for c in [{"name": "baseline", "argv": None}] + cases:
        before = snapshot(root)
        out_err = [logs / f"{c['name']}.{s}" for s in ("stdout", "stderr")]
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the child: run one command line, never return into the runner
            rc = 1
            try:
                for fd, path in zip((1, 2), out_err, strict=True):
                    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
                if c["argv"] is not None:
                    os.chdir(root / "cases" / c["name"])
                    rc = main(c["argv"])
                else:
                    rc = 0
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException:
                import traceback
                traceback.print_exc()
                rc = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
        status, usage, killed = 0, None, False
        while True:
            wpid, status, usage = os.wait4(pid, os.WNOHANG)
            if wpid:
                break
            if time.perf_counter() - t0 > timeout:
                os.kill(pid, 9)
                killed = True
            time.sleep(0.01)
        seconds = time.perf_counter() - t0
        after = snapshot(root)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)
                         and not k.startswith(f"cases/{c['name']}/out"))
        results.append({"name": c["name"], "category": c.get("category"), "argv": c["argv"],
                        "exit": os.waitstatus_to_exitcode(status), "killed": killed, "seconds": seconds,
                        "peak_mb": usage.ru_maxrss / 1024, "stdout": out_err[0].read_text(errors="replace"),
                        "stderr": out_err[1].read_text(errors="replace"), "changed": changed})
    (root / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    cmd, where = sys.argv[1], Path(sys.argv[2])
    {"build": build, "run": run}[cmd](where)
