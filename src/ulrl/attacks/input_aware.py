"""Input-Aware Dynamic Backdoor (Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack",
NeurIPS 2020).

Every image gets its own trigger: a pattern generator ``G`` and a mask generator ``M`` (small conv
encoder-decoders, :class:`~ulrl.attacks.components.TinyUNet`) produce
``x' = x + M(x) * (G(x) - x)``, with ``G(x) = tanh(.)/2 + 1/2`` and ``M(x)`` a sharp threshold
``tanh(20 m - 10)/2 + 1/2`` of ``m = tanh(.)/2 + 1/2``.

1. :meth:`prepare` pre-trains ``M`` alone on the clean data (the paper's first stage) with the
   mask-norm loss ``lambda_norm * mean(relu(M(x) - mask_density))`` and the diversity loss
   ``lambda_div * mean(||x1 - x2|| / ||M(x1) - M(x2)||)``; ``M`` is then frozen.
2. During training (:meth:`training_hooks`) ``G`` is trained jointly with the classifier: per batch
   a fraction ``rate`` of the samples gets its own trigger and the target label, a fraction
   ``cross_ratio`` gets the trigger generated from *another* image of the batch and keeps its
   label (cross-trigger samples: a trigger only works on the image it was made for), and ``G``
   also minimises the diversity loss ``lambda_div * mean(||x1 - x2|| / ||G(x1) - G(x2)||)``. The
   batch hook back-propagates the diversity loss into ``G``; the classifier's loss in ``fit``
   reaches ``G`` through the poisoned batch; the step hook steps ``G``'s Adam optimiser.

Defaults are the paper's / BackdoorBench's (``config/attack/inputaware/default.yaml``):
``rate=0.1``, ``cross_ratio=0.1`` (the paper's p_cross), ``lambda_div=1``, ``lambda_norm=100``,
``mask_density=0.032``, Adam(lr 0.01, betas (0.5, 0.9)) for both generators. Deviation: the mask
generator is pre-trained for ``mask_steps`` batches of ``mask_batch`` image pairs (default
100 x 64, about 0.2 epoch of Fashion-MNIST) instead of 25 epochs, to keep the attack cheap on a
CPU; its norm and diversity losses plateau after about 100 steps. Both generators are saved with the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .base import (
    BatchHook,
    BatchPoisoningAttack,
    FitContext,
    StepHook,
    batch_count,
    register_attack,
)
from .components import TinyUNet, load_module_tensors, module_tensors

EPS = 1e-7


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample root-mean-square distance (``+ EPS`` under the root keeps the gradient finite
    when two masks coincide, which otherwise turns the whole generator into NaN)."""
    return (a - b).pow(2).flatten(1).mean(1).add(EPS).sqrt()


def diversity_loss(x1: torch.Tensor, x2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """The paper's diversity loss: different images must get different triggers."""
    return (_distance(x1, x2) / (_distance(t1, t2) + EPS)).mean()


@register_attack
@dataclass
class InputAware(BatchPoisoningAttack):
    """Per-image generated triggers (pattern x mask) trained with the classifier."""

    name = "input-aware"
    fitted = True

    cross_ratio: float = 0.1  # cross-trigger samples per batch (label kept), the paper's p_cross
    lambda_div: float = 1.0
    lambda_norm: float = 100.0
    mask_density: float = 0.032
    lr_g: float = 0.01  # pattern generator, Adam
    lr_m: float = 0.01  # mask generator, Adam
    width: int = 16  # generator channels (TinyUNet width)
    mask_steps: int = 100  # mask generator pre-training steps in prepare()
    mask_batch: int = 64  # image pairs per pre-training step

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cross_ratio < 0 or self.rate + self.cross_ratio > 1:
            raise UserError(f"input-aware needs 0 <= cross_ratio and rate + cross_ratio <= 1, "
                            f"got rate={self.rate}, cross_ratio={self.cross_ratio}")
        if not 0 < self.mask_density < 1:
            raise UserError(f"input-aware mask_density must be in (0, 1), got {self.mask_density}")
        if self.width < 1 or self.mask_steps < 0 or self.mask_batch < 2:
            raise UserError("input-aware needs width >= 1, mask_steps >= 0 and mask_batch >= 2")
        self._pattern_net: nn.Module | None = None
        self._mask_net: nn.Module | None = None

    # --- the generators ----------------------------------------------------------------------
    def _build(self, channels: int) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self._pattern_net = TinyUNet(channels, channels, self.width)
            self._mask_net = TinyUNet(channels, 1, self.width)

    @staticmethod
    def _pattern(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(net(x)) / (2 + EPS) + 0.5

    @staticmethod
    def _mask(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        m = torch.tanh(net(x)) / (2 + EPS) + 0.5
        return torch.tanh(m * 20 - 10) / (2 + EPS) + 0.5

    def _nets(self) -> tuple[nn.Module, nn.Module]:
        if self._pattern_net is None or self._mask_net is None:
            raise UserError("the input-aware trigger generators are not fitted; run attack.prepare(...) "
                            "or train the model with `ulrl train`, which saves them in the checkpoint")
        return self._pattern_net, self._mask_net

    def prepare(self, x: torch.Tensor, y: torch.Tensor, ctx: FitContext | None = None) -> None:
        """Build both generators (seeded) and pre-train the mask generator on the clean images."""
        if x.ndim != 4 or len(x) < 2:
            raise UserError("input-aware needs at least two training images (N, C, H, W) to fit its mask generator")
        self._build(int(x.shape[1]))
        _, mask_net = self._nets()
        device = ctx.device if ctx is not None else "cpu"
        mask_net.to(device).train()
        opt = torch.optim.Adam(mask_net.parameters(), lr=self.lr_m, betas=(0.5, 0.9))
        gen = torch.Generator().manual_seed(self.seed)
        bs = min(self.mask_batch, len(x))
        for _ in range(self.mask_steps):
            idx = torch.randint(0, len(x), (2 * bs,), generator=gen)
            xb = x[idx].to(device).float()
            xb = xb / 255.0 if not x.is_floating_point() else xb
            m = self._mask(mask_net, xb)
            m1, m2 = m[:bs], m[bs:]
            norm = F.relu(m1 - self.mask_density).mean()
            loss = self.lambda_norm * norm + self.lambda_div * diversity_loss(xb[:bs], xb[bs:], m1, m2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        mask_net.zero_grad(set_to_none=True)
        mask_net.eval().requires_grad_(False)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**module_tensors("pattern", self._pattern_net), **module_tensors("mask", self._mask_net)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        first = tensors.get("pattern.enc1.0.weight")
        if first is None or first.ndim != 4:
            raise UserError("the checkpoint carries no input-aware generators; re-train with `ulrl train`")
        self._build(int(first.shape[1]))
        pattern_net, mask_net = self._nets()
        unknown = [k for k in tensors if not k.startswith(("pattern.", "mask."))]
        if unknown:
            raise UserError(f"the checkpoint's input-aware component has unexpected tensors ({unknown[0]}); "
                            "re-train with `ulrl train`")
        load_module_tensors("pattern", pattern_net, tensors, self.name)
        load_module_tensors("mask", mask_net, tensors, self.name).requires_grad_(False)

    # --- the trigger -------------------------------------------------------------------------
    def _blend(self, x: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Trigger ``x`` with the pattern and mask generated from ``source``: (x', pattern, mask)."""
        pattern_net, mask_net = self._nets()
        pattern = self._pattern(pattern_net, source)
        with torch.no_grad():
            mask = self._mask(mask_net, source)
        return x + mask * (pattern - x), pattern, mask

    def trigger_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Deterministic ``(pattern, mask)`` of images ``x`` (generators in eval mode, no grad)."""
        pattern_net, mask_net = self._nets()
        channels = pattern_net.enc1[0].in_channels
        if x.shape[1] != channels:
            raise UserError(f"the input-aware generators were fitted on {channels}-channel images, "
                            f"got {x.shape[1]} channels")
        pattern_net.eval()
        mask_net.eval()
        device = next(pattern_net.parameters()).device
        patterns, masks = [], []
        with torch.no_grad():
            for i in range(0, len(x), 512):  # chunks: a whole test set at once would need GBs
                xd = x[i : i + 512].to(device)
                patterns.append(self._pattern(pattern_net, xd).to(x))
                masks.append(self._mask(mask_net, xd).to(x))
        if not patterns:
            return x.clone(), x[:, :1].clone()
        return torch.cat(patterns), torch.cat(masks)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        pattern, mask = self.trigger_parts(x)
        return (x + mask * (pattern - x)).clamp(0, 1)

    # --- training-time control ---------------------------------------------------------------
    def training_hooks(self, model: nn.Module) -> tuple[BatchHook | None, StepHook | None]:
        pattern_net, mask_net = self._nets()
        opt = torch.optim.Adam(pattern_net.parameters(), lr=self.lr_g, betas=(0.5, 0.9))
        params = list(pattern_net.parameters())
        gen = torch.Generator().manual_seed(self.seed + 1)

        def batch_hook(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            n = len(y)
            nb = batch_count(n, self.rate, gen)
            nc = min(batch_count(n, self.cross_ratio, gen), n - nb)
            if nb + nc == 0 or n < 2:
                return x, y
            pattern_net.to(x.device).train()
            mask_net.to(x.device).eval()
            # every sample's partner is another image of the batch (a random cyclic shift)
            other = (torch.arange(n) + torch.randint(1, n, (1,), generator=gen)) % n
            x2 = x[other.to(x.device)]
            bd, p1, _ = self._blend(x[:nb], x[:nb])
            cross, p2, _ = self._blend(x[nb : nb + nc], x2[nb : nb + nc])
            opt.zero_grad(set_to_none=True)
            k = min(nb, nc)
            if k and self.lambda_div:
                div = self.lambda_div * diversity_loss(x[:k], x2[nb : nb + k], p1[:k], p2[:k])
                div.backward(inputs=params, retain_graph=True)
            xs = torch.cat([bd, cross, x[nb + nc :]])
            ys = torch.cat([self.target_labels(y[:nb]), y[nb:]])
            return xs, ys

        def step_hook() -> None:
            if any(p.grad is not None for p in params):
                opt.step()
            opt.zero_grad(set_to_none=True)

        return batch_hook, step_hook

