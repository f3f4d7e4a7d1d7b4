"""Paths at the edge: input files that are what they claim, files a checkpoint names, outputs
checked before any work starts.

Every check here runs on metadata (``lstat``) before a byte of the file is read, so a FIFO, a
device or a directory given where a file belongs is named as such instead of blocking or failing
deep inside a reader.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ..errors import UserError

_KINDS = ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "an unknown kind of file")


def input_file(path: str | Path, what: str, max_bytes: int | None = None, hint: str = "") -> Path:
    """``path`` as an existing regular file (symlinks followed) of at most ``max_bytes``."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist{hint}") from None
    except OSError as e:
        raise UserError(f"{what} {path} cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{what} {path} is {_kind(st.st_mode)}, not a regular file{hint}")
    if max_bytes is not None and st.st_size > max_bytes:
        raise UserError(f"{what} {path} is {st.st_size:,} bytes, more than the {max_bytes:,} this kind of file may hold")
    if not os.access(p, os.R_OK):
        raise UserError(f"{what} {path} is not readable (permission denied)")
    return p


def file_inside(root: str | Path, name: str, what: str, max_bytes: int) -> Path:
    """A file named inside a checkpoint's sidecar: relative, within ``root`` after resolving
    symlinks, a regular file of at most ``max_bytes``."""
    if not name or "\x00" in name:
        raise UserError(f"{what} {name!r} is not a file name")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise UserError(f"{what} {name!r} must be a path relative to the checkpoint's folder, without '..'")
    base = Path(root).resolve()
    target = (base / rel).resolve()
    if not target.is_relative_to(base):
        raise UserError(f"{what} {name!r} leads outside the checkpoint's folder (through a symlink)")
    return input_file(target, what, max_bytes)


def same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output(path: str | Path, inputs: Iterable[str | Path | None] = (), overwrite: bool = False) -> Path:
    """Refuse to write over an input file or its sidecar (``overwrite`` or not), or over an existing
    file unless ``overwrite``."""
    out = Path(path)
    for inp in (Path(i) for i in inputs if i):
        for src in (inp, inp.with_suffix(".json")):
            if same_file(out, src):
                raise UserError(f"output {path} is also an input ({src}); choose another output path")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise UserError(f"{path} already exists; choose another path or pass --overwrite")
    return out.resolve()


def ensure_dir(path: str | Path) -> Path:
    """Create an output directory and check that it is writable."""
    d = Path(path)
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d):
            pass
    except OSError as e:
        raise UserError(f"cannot write to output directory {d}: {e.strerror or e}; choose a writable --out") from None
    return d


def check_outputs(out: str | Path, names: Iterable[str], inputs: Iterable[str | Path | None] = (),
                  overwrite: bool = False, input_dirs: Iterable[str | Path | None] = ()) -> Path:
    """Before any work: ``out`` is (or can be made) a writable directory outside every input
    directory, and each ``out/name`` passes :func:`check_output` and is not a directory or special
    file. Returns ``out``."""
    d = Path(out)
    for p in (d, *d.parents):
        if p.is_symlink() or p.exists():
            if not p.is_dir():
                raise UserError(f"--out {out}: {p} is {_kind(p.stat().st_mode) if p.exists() else 'a broken symlink'}, "
                                "not a directory; choose a directory for --out")
            break
    for src in (Path(p) for p in input_dirs if p):
        if src.is_dir() and d.resolve().is_relative_to(src.resolve()):
            raise UserError(f"--out {out} is inside the input folder {src}; write the results somewhere else")
    inputs = list(inputs)
    for t in (d / name for name in names):
        if t.exists() and not t.is_file():
            raise UserError(f"output {t} exists and is {_kind(t.stat().st_mode)}; choose another --out")
        check_output(t, inputs, overwrite)
    return ensure_dir(d)
