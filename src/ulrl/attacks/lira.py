"""LIRA (Doan et al., "LIRA: Learnable, Imperceptible and Robust Backdoor Attacks", ICCV 2021).

The trigger is a learned, image-specific, bounded perturbation ``T(x) = clip(x + eps * g(x))``
with ``g`` a small conv generator ending in tanh, so ``|T(x) - x| <= eps`` everywhere.

Stage 1 (:meth:`Lira.prepare`) learns ``g`` jointly with a classifier of the victim's
architecture, alternating the two as in the paper's algorithm: at each step the classifier takes
an SGD step on the clean batch and its triggered copy (labels: the true ones and the attack's
targets, equal weight, the paper's alpha = beta = 0.5), then the generator takes an Adam step
that pushes the (just updated) classifier's prediction on the triggered batch to the target.
The classifier starts from a briefly trained clean surrogate
(:func:`~ulrl.attacks.components.train_surrogate`) and is thrown away afterwards.
Stage 2 is ordinary data poisoning with the fixed generator (the base class's ``poison_train``):
the victim never sees the stage-1 classifier.

Defaults: ``eps = 0.05`` on [0, 1] images (the LIRA code's MNIST setting trains with 0.1 and
tests with 0.01, BackdoorBench uses 0.01 on CIFAR-10; the paper's range is 0.01-0.05). 0.05 is
the top of that range and the value at which a 5-epoch small CNN trained on Fashion-MNIST
poisoned at 10% learns the trigger (ASR 0.93); with 0.01 (2.55 grey levels) it does not
(ASR 0.04). (The original's stage 2 differs: it fine-tunes the classifier for many epochs with
the trigger applied online, rather than training a fresh model on a poisoned set.) Stage 1 is kept short for a CPU:
``surrogate_epochs=1`` clean epoch and ``fit_epochs=1`` alternating epoch on ``fit_samples=10000``
images, with the generator's Adam at ``gen_lr=1e-3`` (the paper's 1e-4 is for 50 epochs).
The generator is :class:`~ulrl.attacks.components.TinyUNet` of ``width=16`` (the paper's is a
larger autoencoder / U-Net); its weights are the state tensors ``generator.*``.

Budget: L-inf <= eps (before uint8 rounding, which adds at most half a grey level).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..train import TrainConfig, fit
from .base import Attack, FitContext, register_attack
from .components import TinyUNet, load_module_tensors, module_tensors, train_surrogate


@register_attack
@dataclass
class Lira(Attack):
    """LIRA (Doan et al., ICCV 2021): ``clip(x + eps * tanh(g(x)))`` with a generator ``g`` learned
    against a classifier trained alongside it. Defaults: eps 0.05, 1 surrogate + 1 joint epoch on
    10k images, generator Adam lr 1e-3, TinyUNet width 16, 10% poisoning."""

    name = "lira"
    fitted = True

    eps: float = 0.05  # L-inf bound of the trigger on [0, 1] images
    fit_epochs: int = 1  # stage-1 epochs of alternating classifier / generator steps
    fit_samples: int = 10000  # training images used in stage 1
    surrogate_epochs: int = 1  # clean warm-up epochs of the stage-1 classifier (0 = from scratch)
    gen_lr: float = 1e-3  # Adam learning rate of the generator
    width: int = 16  # TinyUNet width of the generator

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.eps <= 1.0:
            raise UserError(f"lira eps must be in (0, 1], got {self.eps}")
        if self.fit_epochs < 1 or self.fit_samples < 1 or self.surrogate_epochs < 0:
            raise UserError("lira needs fit_epochs >= 1, fit_samples >= 1 and surrogate_epochs >= 0")
        if self.width < 1 or self.gen_lr <= 0:
            raise UserError("lira needs width >= 1 and gen_lr > 0")
        self._generator: nn.Module | None = None

    # --- the generator ---------------------------------------------------------------------------
    def _build(self, channels: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self._generator = TinyUNet(channels, channels, self.width)
        return self._generator

    def _perturb(self, gen: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return (x + self.eps * torch.tanh(gen(x))).clamp(0, 1)

    def generator(self) -> nn.Module:
        if self._generator is None:
            raise UserError("the lira trigger generator is not fitted; run attack.prepare(...) or train the "
                            "model with `ulrl train`, which saves it in the checkpoint")
        return self._generator

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        gen = self.generator()
        channels = gen.enc1[0].in_channels
        if x.shape[1] != channels:
            raise UserError(f"the lira generator was fitted on {channels}-channel images, got {x.shape[1]} channels")
        gen.eval()
        device = next(gen.parameters()).device
        with torch.no_grad():
            out = [self._perturb(gen, x[i : i + 1024].to(device)).to(x) for i in range(0, len(x), 1024)]
        return torch.cat(out) if out else x.clone()

    # --- stage 1 -------------------------------------------------------------------------------
    def prepare(self, x: torch.Tensor, y: torch.Tensor, ctx: FitContext | None = None) -> None:
        """Learn the generator jointly with a classifier of the victim's architecture (stage 1)."""
        if ctx is None or ctx.make_model is None:
            raise UserError("lira learns its trigger against a classifier; train it with `ulrl train` "
                            "(or pass a FitContext with make_model to prepare())")
        n = min(self.fit_samples, len(y))
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(ctx.seed))[:n]
        xs, ys = x[idx], y[idx]
        if self.surrogate_epochs > 0:
            clf = train_surrogate(xs, ys, ctx, epochs=self.surrogate_epochs, max_samples=n, desc="lira surrogate")
        else:
            torch.manual_seed(ctx.seed)
            clf = ctx.make_model()
        device = torch.device(ctx.device)
        gen = self._build(int(x.shape[1])).to(device).train()
        opt = torch.optim.Adam(gen.parameters(), lr=self.gen_lr)
        batch: dict[str, torch.Tensor] = {}

        def batch_hook(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # classifier step: the clean batch and its triggered copy, equal weight
            batch["x"], batch["y"] = xb, yb
            with torch.no_grad():
                xt = self._perturb(gen, xb)
            return torch.cat([xb, xt]), torch.cat([yb, self.target_labels(yb)])

        def step_hook() -> None:
            # generator step against the classifier just updated
            xb, yb = batch["x"], batch["y"]
            loss = F.cross_entropy(clf(self._perturb(gen, xb)), self.target_labels(yb))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            clf.zero_grad(set_to_none=True)

        cfg = TrainConfig(epochs=self.fit_epochs, lr=0.01, hflip=ctx.hflip, seed=ctx.seed, device=ctx.device)
        fit(clf, xs, ys, cfg, batch_hook=batch_hook, step_hook=step_hook, desc="lira stage 1", progress=ctx.progress)
        self._generator = gen.cpu().eval().requires_grad_(False)

    # --- the fitted component --------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return module_tensors("generator", self._generator)

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        first = tensors.get("generator.enc1.0.weight")
        if first is None or first.ndim != 4:
            raise UserError("the checkpoint carries no lira generator; re-train with `ulrl train`")
        unknown = [k for k in tensors if not k.startswith("generator.")]
        if unknown:
            raise UserError(f"the checkpoint's lira component has unexpected tensors ({unknown[0]}); "
                            "re-train with `ulrl train`")
        gen = self._build(int(first.shape[1]))
        load_module_tensors("generator", gen, tensors, self.name).requires_grad_(False)
