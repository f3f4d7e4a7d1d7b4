"""The small attack interface and the registry. One file per attack registers itself here.

An attack is a typed dataclass (its spec). It knows how to trigger a batch of images
(:meth:`Attack.apply_trigger`, float images in [0, 1]), which label a triggered image should get
(:meth:`Attack.target_labels`), and how to poison a training set (:meth:`Attack.poison_train`).

Two optional extensions cover the rest of the field:

- **Fitted components** (a perturbation, an encoder, a generator): fitted in
  :meth:`Attack.prepare`, which receives the clean training set and a :class:`FitContext`
  (a factory for fresh models of the victim's architecture, the device, progress). The component
  is exposed through :meth:`Attack.state_tensors` / :meth:`Attack.load_state_tensors`, saved in
  the checkpoint, and re-used bit for bit at evaluation time.
- **Training-time control** (WaNet, Input-aware, BPP, Blind): :meth:`Attack.training_hooks`
  returns ``(batch_hook, step_hook)`` for the one training loop, :func:`ulrl.train.fit`; the
  batch hook poisons each augmented batch on the fly, the step hook steps the attack's own
  optimiser (e.g. a trigger generator trained with the classifier).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import UserError

ATTACKS: dict[str, type[Attack]] = {}


def register_attack(cls: type[Attack]) -> type[Attack]:
    ATTACKS[cls.name] = cls
    return cls


BatchHook = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
StepHook = Callable[[], None]


@dataclass
class FitContext:
    """What :meth:`Attack.prepare` may use besides the clean training data."""

    make_model: Callable[[], nn.Module] | None = None  # a fresh, untrained model of the victim's architecture
    device: str = "cpu"
    progress: bool = True
    hflip: bool = True  # whether a horizontal flip is a label-preserving augmentation of this data
    seed: int = 0


@dataclass
class Attack:
    """Fields common to every attack. Subclasses add their own trigger parameters."""

    name: ClassVar[str] = "attack"
    clean_label: ClassVar[bool] = False  # poisons only target-class images and never changes labels
    fitted: ClassVar[bool] = False  # prepare() fits a component saved with the checkpoint
    size_fields: ClassVar[tuple[str, ...]] = ()  # integer fields measured in pixels (at most the image size)
    builtin_patterns: ClassVar[tuple[str, ...]] = ()  # values of ``pattern`` that are not image files

    target: int = 0  # the attacker's class (all-to-one)
    mode: str = "all2one"  # "all2one" or "all2all" (label y -> (y + 1) mod K)
    rate: float = 0.1  # fraction of the training set that is poisoned
    num_classes: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("all2one", "all2all"):
            raise UserError(f"attack mode must be all2one or all2all, got {self.mode!r}")
        if not 0.0 <= self.rate <= 1.0:
            raise UserError(f"attack rate must be in [0, 1], got {self.rate}")
        if not 0 <= self.target < self.num_classes:
            raise UserError(f"attack target {self.target} is not a class of a {self.num_classes}-class dataset")

    # --- the interface -------------------------------------------------------------------
    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """Return triggered copies of float images ``x`` (N, C, H, W) in [0, 1]."""
        raise NotImplementedError

    def target_labels(self, y: torch.Tensor) -> torch.Tensor:
        if self.mode == "all2all":
            return (y + 1) % self.num_classes
        return torch.full_like(y, self.target)

    def prepare(self, x: torch.Tensor, y: torch.Tensor, ctx: FitContext | None = None) -> None:
        """Fit whatever the trigger needs on the clean uint8 training set (no-op for static triggers)."""

    def training_hooks(self, model: nn.Module) -> tuple[BatchHook | None, StepHook | None]:
        """Hooks for :func:`ulrl.train.fit` while the victim ``model`` trains (none for data poisoning)."""
        return None, None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The fitted component, saved with the checkpoint (empty for static triggers)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise UserError(f"attack {self.name} has no fitted component, but the checkpoint carries one")

    # --- shared behaviour ----------------------------------------------------------------
    def check_fits(self, channels: int, size: int) -> None:
        """Trigger two blank images of the model's shape: a spec or fitted component that does not
        fit the model's images (a 5-channel mask for a 1-channel model) fails here, in one line."""
        x = torch.zeros(2, channels, size, size)
        try:
            out = self.apply_trigger(x)
        except (RuntimeError, ValueError, IndexError, TypeError, KeyError) as e:
            line = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise UserError(f"attack {self.name} cannot trigger {channels}x{size}x{size} images ({line}); "
                            "its spec or fitted component does not fit this model") from None
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise UserError(f"attack {self.name} turns {tuple(x.shape)} images into "
                            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}; "
                            "its fitted component does not fit this model")

    def trigger_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """Trigger uint8 images and quantise back to uint8, as a saved poisoned image would be."""
        out = self.apply_trigger(x.float() / 255.0)
        return (out.clamp(0, 1) * 255.0).round().to(torch.uint8)

    def poison_indices(self, y: torch.Tensor) -> torch.Tensor:
        """Which training samples to poison: ``rate`` of the set, drawn from the eligible ones
        (images whose label the attack changes; for clean-label attacks, target-class images)."""
        eligible = (y == self.target) if self.clean_label else (self.target_labels(y) != y)
        pool = eligible.nonzero().flatten()
        k = min(len(pool), round(self.rate * len(y)))
        gen = torch.Generator().manual_seed(self.seed)
        return pool[torch.randperm(len(pool), generator=gen)[:k]].sort().values

    def poison_train(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Poisoned copy of a uint8 training set: ``(x, y, poisoned_mask)``."""
        idx = self.poison_indices(y)
        x, y = x.clone(), y.clone()
        x[idx] = self.trigger_uint8(x[idx])
        if not self.clean_label:
            y[idx] = self.target_labels(y[idx])
        mask = torch.zeros(len(y), dtype=torch.bool)
        mask[idx] = True
        return x, y, mask

    def spec(self) -> dict[str, Any]:
        """JSON-serialisable spec; :func:`build_attack` re-creates the attack from it."""
        return {"name": self.name, **dataclasses.asdict(self)}


class BatchPoisoningAttack(Attack):
    """An attack that controls training: it poisons each batch in :meth:`training_hooks` and
    leaves the stored training set clean."""

    def poison_train(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return x, y, torch.zeros(len(y), dtype=torch.bool)


def batch_count(n: int, frac: float, gen: torch.Generator) -> int:
    """``n * frac`` rounded up or down at random (at most ``n``), so the expected count is ``n * frac``."""
    exact = n * frac
    base = int(exact)
    return min(n, base + int(torch.rand(1, generator=gen).item() < exact - base))


def _convert(cls: type[Attack], key: str, value: str) -> Any:
    types = {f.name: f.type for f in fields(cls)}
    if key not in types:
        known = ", ".join(sorted(types))
        raise UserError(f"attack {cls.name} has no parameter {key!r}; known: {known}")
    kind = str(types[key])
    try:
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("bool"):
            return value.lower() in ("1", "true", "yes")
    except ValueError:
        raise UserError(f"attack parameter {key}={value!r} is not a valid {kind}") from None
    return value


def parse_attack_spec(spec: str | dict) -> dict[str, Any]:
    """``"badnets:patch_size=3,target=0"`` -> ``{"name": "badnets", "patch_size": 3, "target": 0}``."""
    if isinstance(spec, dict):
        return dict(spec)
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower().replace("_", "-")
    cls = _attack_class(name)
    out: dict[str, Any] = {"name": name}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"attack parameter {item!r} must look like key=value")
        key = key.strip().replace("-", "_")
        out[key] = _convert(cls, key, value.strip())
    return out


def _attack_class(name: str) -> type[Attack]:
    if name not in ATTACKS:
        raise UserError(f"unknown attack {name!r}; known: {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name]


def build_attack(spec: str | dict, num_classes: int | None = None) -> Attack:
    """Create an attack from a spec string or dict (as saved in a checkpoint sidecar)."""
    params = parse_attack_spec(spec)
    cls = _attack_class(str(params.pop("name")).lower())
    if num_classes is not None:
        params["num_classes"] = num_classes
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise UserError(f"attack {cls.name} has no parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**params)
