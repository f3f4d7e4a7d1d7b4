"""Model zoo: a timm-style registry of architectures, one family per file.

Adding a model is a one-file change: write ``models/<family>.py`` with a builder
``(num_classes, in_channels, image_size) -> nn.Module`` decorated with :func:`register_model`;
every module of this package is imported here, which registers it.

:func:`create_model` wraps the architecture in a :class:`NormalizedModel`, so every model takes
raw float images in [0, 1] and carries its normalisation constants in its state dict.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import UserError

Builder = Callable[[int, int, int], nn.Module]
MODELS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder(num_classes, in_channels, image_size)`` under ``name``."""

    def deco(builder: Builder) -> Builder:
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        MODELS[name] = builder
        return builder

    return deco


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(MODELS)


class NormalizedModel(nn.Module):
    """``net((x - mean) / std)`` for images ``x`` in [0, 1]; ``mean``/``std`` are saved buffers."""

    def __init__(self, net: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1).float())
        self.register_buffer("std", std.reshape(1, -1, 1, 1).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def _channel_stats(values: Sequence[float] | None, default: float, channels: int, what: str) -> torch.Tensor:
    if values is None:
        return torch.full((channels,), default)
    vals = [float(v) for v in values]
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels:
        raise UserError(f"normalisation {what} has {len(vals)} values but the images have {channels} channels")
    if what == "std" and min(vals) <= 0:
        raise UserError(f"normalisation std must be positive, got {tuple(vals)}")
    return torch.tensor(vals)


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> NormalizedModel:
    """Build the registered architecture ``name`` wrapped in a :class:`NormalizedModel`."""
    key = name.strip().lower().replace("_", "-")
    if key not in MODELS:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    for what, value, low in (("num_classes", num_classes, 1), ("in_channels", in_channels, 1),
                             ("image_size", image_size, 1)):
        if int(value) != value or value < low:
            raise UserError(f"{what} must be a positive integer, got {value!r}")
    net = MODELS[key](int(num_classes), int(in_channels), int(image_size))
    return NormalizedModel(
        net,
        _channel_stats(mean, 0.0, in_channels, "mean"),
        _channel_stats(std, 1.0, in_channels, "std"),
    )


def find_classifier(model: nn.Module, name: str | None = None) -> tuple[str, nn.Linear]:
    """The classification layer: the module called ``name``, or else the last ``nn.Linear``."""
    modules = dict(model.named_modules())
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if name is None:
        if not linears:
            raise UserError("the model has no nn.Linear layer to use as the classifier")
        name = linears[-1]
    elif name not in modules and f"net.{name}" in modules:
        name = f"net.{name}"  # the user's name for a layer of their network, inside our normalisation wrapper
    if name not in modules:
        raise UserError(f"the model has no layer {name!r}; its linear layers are: {', '.join(linears) or 'none'}")
    layer = modules[name]
    if not isinstance(layer, nn.Linear):
        raise UserError(f"layer {name!r} is a {type(layer).__name__}, not nn.Linear; linear layers: {', '.join(linears) or 'none'}")
    return name, layer


def init_conv_net(net: nn.Module) -> None:
    """Kaiming-normal convolutions (fan-out, ReLU), unit/zero BatchNorm, zero biases."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["MODELS", "NormalizedModel", "create_model", "find_classifier", "list_models", "register_model"]
