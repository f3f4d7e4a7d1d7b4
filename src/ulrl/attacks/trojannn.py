"""TrojanNN (Liu, Ma, Aafer, Lee, Zhai, Wang & Zhang, NDSS 2018, "Trojaning attack on neural
networks"): a patch trigger reverse-engineered to fire chosen internal neurons.

1. Neuron selection. On a clean surrogate model, the neurons of the hidden layer that feeds the
   classifier (cnn-small: ``net.hidden``'s 256 units; in general the input of the layer found
   by :func:`ulrl.models.find_classifier`, read with a forward hook) are ranked by their
   connection strength to the previous layer, the sum of absolute incoming weights (the paper's
   rule). The layer whose output feeds the classifier is the last ``Linear``/``Conv2d`` before
   it with matching width; when there is none (e.g. a norm in between with another width), the
   ranking falls back to BackdoorBench's rule, the summed absolute outgoing classifier weights.
2. Trigger generation. The pixels inside a fixed square mask (``patch_size``, default a quarter
   of the image side, at ``position``) are optimised so that the selected neurons reach
   ``neuron_target`` (the paper's cost ``sum (target - activation)^2``), with the trigger
   stamped on clean training images.
3. Poisoning (as in BackdoorBench, which replaces the paper's model retraining on reverse-
   engineered data by data poisoning): ``rate`` of the training set, drawn from images whose
   label changes, get the trigger stamped in the mask and the target label.

Defaults follow BackdoorBench's ``config/attack/trojannn``: 2 neurons, target value 100,
``rate = 0.1``, all-to-one, target 0. Deviations: a square mask instead of the paper's
watermark/apple shapes, and ``fit_steps = 300`` Adam steps instead of 1000 sign steps.

The fitted component is the stamped image content: state tensors ``trojannn.trigger``
(C, H, W) and ``trojannn.mask`` (1, H, W), and the selected neuron indices
``trojannn.neurons`` (kept for reports).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import UserError
from ..models import find_classifier
from .base import Attack, FitContext, register_attack
from .components import train_surrogate

POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")


def connection_scores(model: nn.Module, classifier_name: str) -> torch.Tensor:
    """Strength of each classifier-input neuron's connection to the previous layer.

    The sum of absolute incoming weights when the layer producing the classifier's input (the
    last ``Linear``/``Conv2d`` registered before the classifier whose output width matches) is
    found, else the sum of absolute outgoing classifier weights.
    """
    modules = dict(model.named_modules())
    classifier = modules[classifier_name]
    width = classifier.in_features
    previous = None
    for name, m in model.named_modules():
        if name == classifier_name:
            break
        if isinstance(m, nn.Linear) and m.out_features == width or isinstance(m, nn.Conv2d) and m.out_channels == width:
            previous = m
    if previous is not None:
        return previous.weight.detach().abs().flatten(1).sum(1)
    return classifier.weight.detach().abs().sum(0)


@register_attack
@dataclass
class TrojanNN(Attack):
    """``patch_size``: side of the square mask in pixels (0 = a quarter of the shorter image side);
    ``position``: where the mask sits; ``num_neurons``/``neuron_target``: how many neurons to
    excite and the activation to drive them to; ``fit_steps``/``fit_samples``/``fit_lr``: the
    trigger optimisation budget (Adam); ``surrogate_epochs``/``surrogate_samples``: the clean
    surrogate's training budget; ``layer``: the classifier layer's name (empty = the last
    ``nn.Linear``)."""

    name = "trojannn"
    size_fields = ("patch_size",)
    fitted = True

    patch_size: int = 0
    position: str = "bottom-right"
    num_neurons: int = 2
    neuron_target: float = 100.0
    fit_steps: int = 300
    fit_samples: int = 256
    fit_lr: float = 0.05
    surrogate_epochs: int = 2
    surrogate_samples: int = 20000
    layer: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._trigger: torch.Tensor | None = None  # the fitted component (not part of the spec)
        self._mask: torch.Tensor | None = None
        self._neurons: torch.Tensor | None = None
        if self.position not in POSITIONS:
            raise UserError(f"trojannn position must be one of {', '.join(POSITIONS)}, got {self.position!r}")
        if self.patch_size < 0:
            raise UserError(f"trojannn patch_size must be >= 0 (0 = a quarter of the image side), got {self.patch_size}")
        if self.fit_lr <= 0:
            raise UserError(f"trojannn fit_lr must be positive, got {self.fit_lr}")
        for key in ("num_neurons", "fit_steps", "fit_samples", "surrogate_epochs", "surrogate_samples"):
            if getattr(self, key) < 1:
                raise UserError(f"trojannn {key} must be >= 1, got {getattr(self, key)}")

    # --- the mask ------------------------------------------------------------------------
    def square_mask(self, height: int, width: int) -> torch.Tensor:
        """(1, H, W) 0/1 mask of the ``patch_size`` square at ``position``."""
        s = self.patch_size or max(1, round(min(height, width) / 4))
        if s > min(height, width):
            raise UserError(f"trojannn patch of {s} px does not fit a {height}x{width} image")
        rows = {"top": 0, "bottom": height - s, "center": (height - s) // 2}
        cols = {"left": 0, "right": width - s, "center": (width - s) // 2}
        v, _, h = self.position.partition("-")
        r, c = rows[v], cols[h or "center"]
        mask = torch.zeros(1, height, width)
        mask[:, r : r + s, c : c + s] = 1.0
        return mask

    # --- trigger -------------------------------------------------------------------------
    def _require_fitted(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._trigger is None or self._mask is None:
            raise UserError("trojannn's trigger is not fitted; run prepare() on the training set "
                            "(`ulrl train` does) or load the checkpoint's attack tensors")
        return self._trigger, self._mask

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        trigger, mask = self._require_fitted()
        if tuple(x.shape[1:]) != tuple(trigger.shape):
            raise UserError(f"trojannn's trigger was fitted on {tuple(trigger.shape)} images, got "
                            f"{tuple(x.shape[1:])}; use the data the model was trained on")
        mask = mask.to(x)
        return (x * (1 - mask) + trigger.to(x) * mask).clamp(0, 1)

    def poison_train(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._require_fitted()
        return super().poison_train(x, y)

    # --- the fitted component ------------------------------------------------------------
    def prepare(self, x: torch.Tensor, y: torch.Tensor, ctx: FitContext | None = None) -> None:
        """Select the most connected neurons of a clean surrogate and optimise the masked trigger."""
        surrogate = train_surrogate(x, y, ctx, self.surrogate_epochs, self.surrogate_samples,
                                    desc="trojannn surrogate")
        device = torch.device(ctx.device if ctx else "cpu")
        surrogate.to(device)
        for p in surrogate.parameters():
            p.requires_grad_(False)
        name, classifier = find_classifier(surrogate, self.layer or None)
        scores = connection_scores(surrogate, name)
        k = min(self.num_neurons, len(scores))
        neurons = scores.argsort(descending=True)[:k].to(device)

        features: dict[str, torch.Tensor] = {}
        handle = classifier.register_forward_pre_hook(lambda _m, inp: features.__setitem__("x", inp[0]))
        try:
            gen = torch.Generator().manual_seed(self.seed)
            pick = torch.randperm(len(y), generator=gen)[: self.fit_samples]
            background = x[pick].float().div(255).to(device)
            _, c, h, w = background.shape
            mask = self.square_mask(h, w).to(device)
            trigger = torch.rand(c, h, w, generator=gen).to(device).mul(mask).requires_grad_(True)
            opt = torch.optim.Adam([trigger], lr=self.fit_lr)
            bar = tqdm(range(self.fit_steps), desc="trojannn trigger", disable=not (ctx and ctx.progress),
                       leave=False, unit="step")
            for _ in bar:
                stamped = background * (1 - mask) + trigger.clamp(0, 1) * mask
                surrogate(stamped)
                act = features["x"].flatten(1)[:, neurons]
                loss = (self.neuron_target - act).pow(2).sum(1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    trigger.clamp_(0, 1).mul_(mask)
                bar.set_postfix(loss=round(loss.item(), 2), act=round(act.mean().item(), 2))
        finally:
            handle.remove()
        self._trigger = trigger.detach().cpu().to(torch.float32).contiguous()
        self._mask = mask.cpu().contiguous()
        self._neurons = neurons.cpu().to(torch.long)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self._trigger is None or self._mask is None:
            return {}
        out = {"trojannn.trigger": self._trigger.clone(), "trojannn.mask": self._mask.clone()}
        if self._neurons is not None:
            out["trojannn.neurons"] = self._neurons.clone()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if not {"trojannn.trigger", "trojannn.mask"} <= set(tensors) <= {"trojannn.trigger", "trojannn.mask",
                                                                         "trojannn.neurons"}:
            raise UserError(f"the checkpoint's trojannn component has tensors {sorted(tensors)}, expected "
                            "trojannn.trigger and trojannn.mask; re-train with `ulrl train`")
        trigger, mask = tensors["trojannn.trigger"], tensors["trojannn.mask"]
        if trigger.ndim != 3 or mask.ndim != 3 or trigger.shape[1:] != mask.shape[1:]:
            raise UserError("the checkpoint's trojannn trigger and mask do not match; re-train with `ulrl train`")
        self._trigger = trigger.to(torch.float32).clone()
        self._mask = mask.to(torch.float32).clone()
        neurons = tensors.get("trojannn.neurons")
        self._neurons = None if neurons is None else neurons.to(torch.long).clone()
