"""Users' own architectures: ``--arch package.module:factory`` or ``--arch path/to/file.py:factory``.

The user's module is imported only when the command line names it this way (never because a
checkpoint or sidecar says so: a sidecar that names a user architecture is refused unless the same
``--arch`` is given). The factory returns an ``nn.Module``; it is called with whichever of
``num_classes``, ``in_channels`` and ``image_size`` its signature accepts. The result is registered
under the spec for this process, so checkpoints, scans and defenses treat it like a built-in model.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

from torch import nn

from ..errors import UserError


def is_user_arch(spec: str) -> bool:
    return ":" in spec


def import_user_arch(spec: str) -> str:
    """Import ``module:factory`` (a dotted module or a ``.py`` file) and register it; returns the model name."""
    from ..models import MODELS

    key = spec.strip().lower().replace("_", "-")
    if key in MODELS:
        return key
    module_name, _, attr = spec.strip().rpartition(":")
    if not module_name or not attr.isidentifier():
        raise UserError(f"--arch {spec!r} must look like package.module:factory or path/to/file.py:factory")
    try:
        if module_name.endswith(".py") or "/" in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise UserError(f"--arch {spec}: {module_name} is not a file")
            mod_spec = importlib.util.spec_from_file_location(f"ulrl_user_arch_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))  # like `python -m`: modules of the current folder
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as e:  # the user's own code failed to import: say where, in one line
        raise UserError(f"--arch {spec}: importing {module_name} failed ({type(e).__name__}: {e})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UserError(f"--arch {spec}: {module_name} has no callable {attr!r}")
    try:
        accepted = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        accepted = {}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())

    def builder(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        given = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
        kwargs = {k: v for k, v in given.items() if takes_any or k in accepted}
        try:
            net = factory(**kwargs)
        except Exception as e:
            raise UserError(f"--arch {spec}: {attr}({', '.join(f'{k}={v}' for k, v in kwargs.items())}) failed "
                            f"({type(e).__name__}: {e})") from None
        if not isinstance(net, nn.Module):
            raise UserError(f"--arch {spec}: {attr} returned a {type(net).__name__}, not a torch.nn.Module")
        return net

    MODELS[key] = builder
    return key
