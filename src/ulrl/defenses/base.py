"""The defense interface: (model, clean images, clean labels, config) -> (repaired model, report).

A defense is a function ``run(model, x, y, config, monitor=None, progress=True)`` registered with
its typed config dataclass and named presets::

    @register_defense("ft", FTConfig, presets={"default": {}})
    def fine_tune(model, x, y, config, monitor=None, progress=True): ...

It returns a new model (the input is never modified) and a :class:`DefenseReport`. A defense
never sees poisoned data or the trigger. ``monitor`` is an optional callback from the harness
(e.g. test ACC/ASR after each epoch) whose values are only recorded in the report for plots; a
defense must not base any decision on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ..errors import UserError

Monitor = Callable[[nn.Module], dict[str, float]]


@dataclass
class CommonConfig:
    """Fields every defense's config has; the harness sets ``hflip``, ``seed`` and ``device``."""

    batch_size: int = 128
    augment: bool = True  # the dataset's usual augmentation (random crop, flip where it makes sense)
    hflip: bool = True
    seed: int = 0
    device: str = "cpu"


Preset = dict[str, Any] | Callable[[str | None], dict[str, Any]]


@dataclass
class DefenseEntry:
    run: Callable[..., tuple[nn.Module, DefenseReport]]
    config: type
    presets: dict[str, Preset]


DEFENSES: dict[str, DefenseEntry] = {}


def register_defense(name: str, config: type, presets: dict[str, Preset] | None = None):
    """Register ``run`` under ``name`` with its config dataclass; ``presets`` map a preset name to
    overrides of the config's defaults, or to a function ``dataset name (or None) -> overrides``
    for presets that differ per dataset (a ``default`` preset, the config's defaults, always exists)."""

    def deco(fn):
        DEFENSES[name] = DefenseEntry(fn, config, {"default": {}, **(presets or {})})
        return fn

    return deco


def defense_entry(name: str) -> DefenseEntry:
    if name not in DEFENSES:
        raise UserError(f"unknown defense {name!r}; known: {', '.join(sorted(DEFENSES))}")
    return DEFENSES[name]


def make_defense_config(name: str, preset: str = "default", dataset: str | None = None,
                        base: dict[str, Any] | None = None, **overrides: Any):
    """The config of defense ``name``: ``base`` (what the harness knows of the data: ``hflip``,
    ``device``), then the preset (resolved for ``dataset`` where it depends on it), then
    ``overrides`` (unknown keys are user errors)."""
    entry = defense_entry(name)
    if preset not in entry.presets:
        raise UserError(f"unknown {name} preset {preset!r}; known: {', '.join(entry.presets)}")
    known = {f.name for f in fields(entry.config)}
    unknown = sorted((set(overrides) | set(base or {})) - known)
    if unknown:
        raise UserError(f"unknown {name} option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    chosen = entry.presets[preset]
    values = chosen(dataset) if callable(chosen) else chosen
    return entry.config(**{**(base or {}), **values, **overrides})


def parse_overrides(items: list[str], name: str) -> dict[str, Any]:
    """``["alpha=0.1", "freeze_bn=false"]`` -> typed overrides of defense ``name``'s config."""
    return parse_fields(items, defense_entry(name).config, name)


def parse_fields(items: list[str], config: type, what: str) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> values typed by the fields of dataclass ``config``."""
    types = {f.name: str(f.type) for f in fields(config)}
    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in types:
            raise UserError(f"{what} option {item!r}: expected KEY=VALUE with KEY one of {', '.join(types)}")
        kind = types[key]
        try:
            if kind.startswith("bool"):
                out[key] = value.lower() in ("1", "true", "yes", "on")
            elif kind.startswith("int"):
                out[key] = None if value.lower() == "none" and "None" in kind else int(value)
            elif kind.startswith("float"):
                out[key] = None if value.lower() == "none" and "None" in kind else float(value)
            elif kind.startswith("tuple"):
                item_type = int if "int" in kind else float if "float" in kind else str
                out[key] = tuple(item_type(v) for v in value.replace(",", "/").split("/") if v)  # 10/20 or 10,20
            else:
                out[key] = None if value.lower() == "none" else value
        except ValueError:
            raise UserError(f"{what} option {item!r}: {value!r} is not a valid {kind}") from None
    return out


def run_defense_fn(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, config=None,
                   monitor: Monitor | None = None, progress: bool = True) -> tuple[nn.Module, DefenseReport]:
    """Run defense ``name`` (config: its dataclass, or None for the default preset)."""
    if len(y) == 0:
        raise UserError("the clean set is empty; give at least one clean image per class")
    entry = defense_entry(name)
    return entry.run(model, x, y, config or make_defense_config(name), monitor=monitor, progress=progress)


@dataclass
class DefenseReport:
    """What a defense found and did; serialises to JSON with :meth:`to_dict`."""

    defense: str
    config: dict[str, Any]
    layer: str = ""
    scores: list[float] = field(default_factory=list)
    z_scores: list[float] = field(default_factory=list)
    flagged: list[int] = field(default_factory=list)
    second_look_z_scores: list[float] = field(default_factory=list)  # z-scores of the masked re-run, if any
    unlearn_epochs: int = 0
    unlearn_history: list[dict] = field(default_factory=list)
    relearn_history: list[dict] = field(default_factory=list)  # per-epoch records of the final fine-tuning
    selected_epoch: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # defense-specific findings (pruned channels, trigger norms, ...)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_holdout(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified split of clean-set positions into (train, held-out) for model selection."""
    gen = torch.Generator().manual_seed(seed)
    held = []
    for c in y.unique():
        pos = (y == c).nonzero().flatten()
        pos = pos[torch.randperm(len(pos), generator=gen)]
        held.append(pos[: int(round(fraction * len(pos)))])
    held_idx = torch.cat(held).sort().values if held else torch.empty(0, dtype=torch.long)
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[held_idx] = False
    return keep.nonzero().flatten(), held_idx
