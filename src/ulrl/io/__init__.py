"""The edge of the house: everything read from an untrusted file is validated here first.

- :mod:`.paths`: input files that are what they claim; files a sidecar names, kept inside the
  checkpoint's folder; outputs checked before any work starts.
- :mod:`.sidecar`: the checkpoint's JSON description parsed into a typed, bounded schema.
- :mod:`.tensors`: weights checked entry by entry against the architecture before they are
  materialised (safetensors, PyTorch zip, legacy ``.pt``).

docs/security.md lists the checks in the order they run.
"""

from .paths import check_outputs, file_inside, input_file
from .sidecar import read_sidecar, validate_meta
from .tensors import ATTACK_PREFIX, build_model, open_weights

__all__ = ["ATTACK_PREFIX", "build_model", "check_outputs", "file_inside", "input_file", "open_weights", "read_sidecar",
           "validate_meta"]
