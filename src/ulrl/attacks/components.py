"""Building blocks shared by attacks that fit a component: a clean surrogate model, a small
image-to-image generator, and saving/loading an ``nn.Module`` as the attack's state tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..train import TrainConfig, fit
from .base import FitContext


def train_surrogate(x: torch.Tensor, y: torch.Tensor, ctx: FitContext | None, epochs: int = 2,
                    max_samples: int = 20000, desc: str = "surrogate") -> nn.Module:
    """A clean model of the victim's architecture trained briefly on (a seeded subset of) ``x, y``.

    Attacks that need "a clean model" (LC's adversarial examples, LF's universal perturbation,
    TrojanNN's neuron selection, LIRA's first stage) fit against it. It is never saved.
    """
    if ctx is None or ctx.make_model is None:
        raise UserError("this attack fits its trigger on a clean model; train it with `ulrl train` "
                        "(or pass a FitContext with make_model to prepare())")
    gen = torch.Generator().manual_seed(ctx.seed)
    idx = torch.randperm(len(y), generator=gen)[:max_samples]
    torch.manual_seed(ctx.seed)
    model = ctx.make_model()
    cfg = TrainConfig(epochs=epochs, lr=0.01, hflip=ctx.hflip, seed=ctx.seed, device=ctx.device)
    fit(model, x[idx], y[idx], cfg, desc=desc, progress=ctx.progress)
    return model.eval()


class TinyUNet(nn.Module):
    """A two-level conv encoder-decoder with skip connections, for any image size.

    Output has ``out_channels`` channels and the input's spatial size; the final activation is
    left to the caller (tanh for residuals, sigmoid for masks/images).
    """

    def __init__(self, in_channels: int, out_channels: int, width: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.enc1 = block(in_channels, width)
        self.enc2 = block(width, 2 * width)
        self.mid = block(2 * width, 2 * width)
        self.dec2 = block(4 * width, width)
        self.dec1 = block(2 * width, width)
        self.out = nn.Conv2d(width, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2, ceil_mode=True))
        m = self.mid(F.max_pool2d(e2, 2, ceil_mode=True))
        d2 = self.dec2(torch.cat([F.interpolate(m, size=e2.shape[-2:], mode="nearest"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:], mode="nearest"), e1], 1))
        return self.out(d1)


def module_tensors(prefix: str, module: nn.Module | None) -> dict[str, torch.Tensor]:
    """``module``'s state dict with names under ``prefix.`` (empty when not fitted)."""
    if module is None:
        return {}
    return {f"{prefix}.{k}": v.detach().cpu().clone() for k, v in module.state_dict().items()}


def load_module_tensors(prefix: str, module: nn.Module, tensors: dict[str, torch.Tensor], attack: str) -> nn.Module:
    """Load the ``prefix.``-named tensors into ``module``; a mismatch is a one-line user error."""
    own = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    try:
        module.load_state_dict(own, strict=True)
    except RuntimeError as e:
        raise UserError(f"the checkpoint's {attack} component does not match the attack spec "
                        f"({str(e).splitlines()[0]}); re-train with `ulrl train`") from None
    return module.eval()
