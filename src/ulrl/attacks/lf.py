"""Low Frequency (LF) backdoor (Zeng, Park, Mao & Jia, ICCV 2021, "Rethinking the backdoor
attacks' triggers: a frequency perspective"): a smooth, low-frequency universal trigger.

The trigger is a universal adversarial perturbation ``v`` (one image-sized pattern added to
every input) fitted on a clean surrogate model so that ``clamp(x + v)`` is pushed towards the
target class (all-to-one) or away from the true class (all-to-all), while ``v`` is kept free of
high-frequency content: after every update ``v`` is projected onto the low-frequency subspace
(an ideal low-pass filter in the 2-D Fourier domain keeping frequencies with radius at most
``cutoff`` cycles per pixel) and then scaled so that ``|v| <= eps`` (scaling keeps it
low-frequency, unlike clipping). Poisoning is label-changing: ``rate`` of the training set,
drawn from the images whose label changes, get ``x + v`` and the target label.

Defaults: ``eps = 25`` on the 0-255 scale, the same peak-to-peak range (0.2, i.e. 51/255)
to which BackdoorBench's ``resource/lowFrequency`` script normalises its pattern; ``rate = 0.1``,
target 0, all-to-one (BackdoorBench ``config/attack/lf/default.yaml``). Deviations: the paper and
BackdoorBench accumulate targeted DeepFool steps and smooth with a spatial Gaussian; here the
same kind of pattern is fitted by low-passed gradient steps on mini-batches, which is cheaper
and keeps the L-inf bound exact.

The fitted component is ``v`` itself, the state tensor ``lf.pattern`` (C, H, W), float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import UserError
from .base import Attack, FitContext, register_attack
from .components import train_surrogate


def low_pass_mask(height: int, width: int, cutoff: float) -> torch.Tensor:
    """(H, W) 0/1 mask over ``torch.fft.fft2`` frequencies: 1 where the radius <= ``cutoff``
    cycles per pixel. It is symmetric, so a filtered real image stays real."""
    fy = torch.fft.fftfreq(height, dtype=torch.float64)
    fx = torch.fft.fftfreq(width, dtype=torch.float64)
    radius = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt()
    return (radius <= cutoff + 1e-12).to(torch.float32)


def low_pass(v: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Keep only the frequencies of ``v`` (..., H, W) within radius ``cutoff`` (cycles/pixel)."""
    mask = low_pass_mask(v.shape[-2], v.shape[-1], cutoff).to(v.device)
    return torch.fft.ifft2(torch.fft.fft2(v) * mask).real


@register_attack
@dataclass
class LowFrequency(Attack):
    """``eps``: L-inf bound of the pattern on the 0-255 scale; ``cutoff``: low-pass radius in
    cycles per pixel (0.5 = Nyquist); ``fit_steps``/``fit_samples``/``fit_batch``: the
    universal perturbation's optimisation budget; ``surrogate_epochs``/``surrogate_samples``:
    the clean surrogate's training budget."""

    name = "lf"
    fitted = True

    eps: float = 25.0
    cutoff: float = 0.1
    fit_steps: int = 200
    fit_samples: int = 5000
    fit_batch: int = 128
    fit_lr: float = 0.1  # step, as a fraction of eps, along the normalised low-passed gradient
    surrogate_epochs: int = 2
    surrogate_samples: int = 20000

    def __post_init__(self) -> None:
        super().__post_init__()
        self._pattern: torch.Tensor | None = None  # the fitted component (not part of the spec)
        if not 0.0 < self.eps <= 255.0:
            raise UserError(f"lf eps is an L-inf bound on the 0-255 scale in (0, 255], got {self.eps}")
        if not 0.0 <= self.cutoff <= 0.75:
            raise UserError(f"lf cutoff is a frequency radius in cycles per pixel in [0, 0.75], got {self.cutoff}")
        if self.fit_lr <= 0:
            raise UserError(f"lf fit_lr must be positive, got {self.fit_lr}")
        for key in ("fit_steps", "fit_samples", "fit_batch", "surrogate_epochs", "surrogate_samples"):
            if getattr(self, key) < 1:
                raise UserError(f"lf {key} must be >= 1, got {getattr(self, key)}")

    @property
    def pattern(self) -> torch.Tensor:
        """The fitted universal perturbation (C, H, W) on the [0, 1] scale, |v| <= eps/255."""
        if self._pattern is None:
            raise UserError("lf's low-frequency trigger is not fitted; run prepare() on the training set "
                            "(`ulrl train` does) or load the checkpoint's attack tensors")
        return self._pattern

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        v = self.pattern
        if tuple(x.shape[1:]) != tuple(v.shape):
            raise UserError(f"lf's trigger was fitted on {tuple(v.shape)} images, got {tuple(x.shape[1:])}; "
                            "use the data the model was trained on")
        return (x + v.to(x)).clamp(0, 1)

    def poison_train(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.pattern  # noqa: B018  (raises the one-line error before any work when not fitted)
        return super().poison_train(x, y)

    def _project(self, v: torch.Tensor) -> torch.Tensor:
        v = low_pass(v, self.cutoff)
        peak = v.abs().max()
        bound = self.eps / 255.0
        return v * (bound / peak) if peak > bound else v

    def prepare(self, x: torch.Tensor, y: torch.Tensor, ctx: FitContext | None = None) -> None:
        """Fit the universal low-frequency perturbation on a clean surrogate."""
        surrogate = train_surrogate(x, y, ctx, self.surrogate_epochs, self.surrogate_samples, desc="lf surrogate")
        device = torch.device(ctx.device if ctx else "cpu")
        surrogate.to(device)
        for p in surrogate.parameters():
            p.requires_grad_(False)
        pool = (self.target_labels(y) != y).nonzero().flatten()
        gen = torch.Generator().manual_seed(self.seed)
        pool = pool[torch.randperm(len(pool), generator=gen)[: self.fit_samples]]
        if len(pool) == 0:
            raise UserError("lf needs training images of classes other than the target to fit its trigger")
        v = torch.zeros(x.shape[1:], device=device)
        step = self.fit_lr * self.eps / 255.0
        bar = tqdm(range(self.fit_steps), desc="lf trigger", disable=not (ctx and ctx.progress), leave=False,
                   unit="step")
        for _ in bar:
            pick = pool[torch.randint(len(pool), (min(self.fit_batch, len(pool)),), generator=gen)]
            xb = x[pick].float().div(255).to(device)
            yb = y[pick].to(device)
            v.requires_grad_(True)
            logits = surrogate((xb + v).clamp(0, 1))
            if self.mode == "all2one":  # towards the target
                loss = F.cross_entropy(logits, self.target_labels(yb))
            else:  # all2all: a universal shift away from every true class
                loss = -F.cross_entropy(logits, yb)
            (grad,) = torch.autograd.grad(loss, v)
            g = low_pass(grad.detach(), self.cutoff)
            v = self._project(v.detach() - step * g / (g.abs().max() + 1e-12))
            bar.set_postfix(loss=round(loss.item(), 4))
        self._pattern = v.detach().cpu().to(torch.float32).contiguous()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self._pattern is None else {"lf.pattern": self._pattern.clone()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != {"lf.pattern"} or tensors["lf.pattern"].ndim != 3:
            raise UserError(f"the checkpoint's lf component has tensors {sorted(tensors)}, expected one (C, H, W) "
                            "lf.pattern; re-train with `ulrl train`")
        self._pattern = tensors["lf.pattern"].to(torch.float32).clone()
