"""SSBA (Li et al., "Invisible Backdoor Attack with Sample-Specific Triggers", ICCV 2021).

The trigger is an invisible, sample-specific additive residual made by a StegaStamp-style
encoder that hides a fixed attacker code (a bit string; the paper encodes the target class's
name) in each image. The encoder is trained with a decoder that must read the code back from
the encoded image, plus an image-fidelity loss, on clean training images; poisoning then
relabels ``rate`` of the non-target images after encoding the attacker's code into them.

Our encoder/decoder are small so that :meth:`SSBA.prepare` runs in seconds to a minute on a
CPU (the paper uses the full StegaStamp U-Net with 100-bit codes, LPIPS and a critic, trained
for many hours on ImageNet-scale images):

- the code (``code_bits`` bits, default 16, drawn with ``code_seed``) goes through a linear
  layer to an 8x8 map, upsampled to the image size and stacked onto the image;
  :class:`~ulrl.attacks.components.TinyUNet` (``width``) maps that to a residual
  ``eps * tanh(.)``, so the encoded image is ``clip(x + residual)`` and ``|residual| <= eps``;
- the decoder is a three-layer strided CNN with a linear head predicting the bits;
- training (``fit_steps`` Adam steps, batch ``fit_batch``, images from a seeded
  ``fit_samples`` subset) uses a fresh random code for every image, as StegaStamp does, so that
  the decoder must read the image and cannot memorise one code; the loss is the bits'
  cross-entropy plus ``image_weight`` times the mean squared residual, the latter ramped up
  linearly over the first half of the steps (as StegaStamp ramps its image losses; without the
  ramp the residual collapses to zero before the decoder has learnt anything). Between encoder
  and decoder the image is shifted by up to ``max(1, H // 8)`` pixels (the victim's random-crop
  augmentation) and gets uniform noise of half a grey level (uint8 rounding), so the code
  survives both.

Defaults: ``eps = 0.05``, so |triggered - clean| <= 0.05 (12.75 grey levels) and PSNR >= 26 dB by
construction; the fidelity loss keeps the residual much smaller than that: on Fashion-MNIST the
encoded images have PSNR about 31 dB (the paper reports 27 dB on ImageNet) and the decoder reads
the attacker's 16 bits back with about 85% bit accuracy. ``image_weight = 10`` (100 makes the
residual vanish within 800 steps), ``fit_steps = 800`` of batch 64 on ``fit_samples = 10000``
images (about 40 s on one CPU thread), Adam lr 1e-3, 10% poisoning, all-to-one to class 0
(BackdoorBench's SSBA setting). After fitting, :attr:`SSBA.fit_stats` holds the bit accuracy
and PSNR measured on 256 training images. The state tensors are the encoder (``encoder.*``) and
the code (``code``); the decoder is only needed to fit the encoder and is not saved.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.transforms import augment
from ..errors import UserError
from .base import Attack, FitContext, register_attack
from .components import TinyUNet, load_module_tensors, module_tensors

log = logging.getLogger(__name__)


class CodeEncoder(nn.Module):
    """StegaStamp-style encoder: (image, bits) -> bounded residual ``eps * tanh(.)``."""

    def __init__(self, channels: int, bits: int, width: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.code = nn.Linear(bits, 64)  # bits -> an 8x8 map, upsampled to the image size
        self.net = TinyUNet(channels + 1, channels, width)

    def forward(self, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        m = self.code(bits * 2 - 1).view(-1, 1, 8, 8)
        m = F.interpolate(m, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.eps * torch.tanh(self.net(torch.cat([x, m], 1)))


class CodeDecoder(nn.Module):
    """Reads the bits back from an encoded image (any size)."""

    def __init__(self, channels: int, bits: int, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(block(channels, width), block(width, 2 * width), block(2 * width, 2 * width),
                                      nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(8 * width, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_attack
@dataclass
class SSBA(Attack):
    """SSBA (Li et al., ICCV 2021): an encoder hides the attacker's code in each image as an
    invisible residual. Defaults: 16-bit code, |residual| <= eps = 0.05, 800 Adam steps of batch 64
    on 10k images, fidelity weight 10 (ramped up), TinyUNet width 16, 10% poisoning."""

    name = "ssba"
    fitted = True

    code_bits: int = 16  # length of the attacker's code
    code_seed: int = 1234  # draws the attacker's code
    eps: float = 0.05  # L-inf bound of the residual on [0, 1] images
    image_weight: float = 10.0  # weight of the fidelity loss (mean squared residual on [0, 1])
    fit_steps: int = 800  # Adam steps of the encoder/decoder training
    fit_batch: int = 64
    fit_samples: int = 10000  # clean training images the encoder is fitted on
    lr: float = 1e-3
    width: int = 16  # TinyUNet width of the encoder

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.eps <= 1.0:
            raise UserError(f"ssba eps must be in (0, 1], got {self.eps}")
        if self.code_bits < 1 or self.fit_steps < 1 or self.fit_batch < 1 or self.fit_samples < 1:
            raise UserError("ssba needs code_bits, fit_steps, fit_batch and fit_samples >= 1")
        if self.width < 1 or self.lr <= 0 or self.image_weight < 0:
            raise UserError("ssba needs width >= 1, lr > 0 and image_weight >= 0")
        self._encoder: CodeEncoder | None = None
        self._code: torch.Tensor | None = None
        self.fit_stats: dict[str, float] = {}  # set by prepare(): the decoder's bit accuracy, PSNR

    # --- the encoder ---------------------------------------------------------------------------
    def attacker_code(self) -> torch.Tensor:
        """The fixed bit string (float 0/1, ``code_bits``) the trigger hides in every image."""
        return torch.randint(0, 2, (self.code_bits,), generator=torch.Generator().manual_seed(self.code_seed)).float()

    def _build(self, channels: int) -> CodeEncoder:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self._encoder = CodeEncoder(channels, self.code_bits, self.width, self.eps)
        return self._encoder

    def _fitted(self) -> tuple[CodeEncoder, torch.Tensor]:
        if self._encoder is None or self._code is None:
            raise UserError("the ssba encoder is not fitted; run attack.prepare(...) or train the model with "
                            "`ulrl train`, which saves it in the checkpoint")
        return self._encoder, self._code

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        enc, code = self._fitted()
        channels = enc.net.enc1[0].in_channels - 1
        if x.shape[1] != channels:
            raise UserError(f"the ssba encoder was fitted on {channels}-channel images, got {x.shape[1]} channels")
        enc.eval()
        device = next(enc.parameters()).device
        out = []
        with torch.no_grad():
            for i in range(0, len(x), 1024):
                xb = x[i : i + 1024].to(device)
                bits = code.to(device).expand(len(xb), -1)
                out.append((xb + enc(xb, bits)).clamp(0, 1).to(x))
        return torch.cat(out) if out else x.clone()

    # --- fitting ---------------------------------------------------------------------------------
    def prepare(self, x: torch.Tensor, y: torch.Tensor, ctx: FitContext | None = None) -> None:
        """Train encoder and decoder on clean images with random codes (StegaStamp's recipe)."""
        ctx = ctx or FitContext(progress=False)
        if x.ndim != 4 or len(x) < 1:
            raise UserError("ssba needs training images shaped (N, C, H, W) to fit its encoder")
        device = torch.device(ctx.device)
        n = min(self.fit_samples, len(x))
        gen = torch.Generator().manual_seed(ctx.seed)
        pool = x[torch.randperm(len(x), generator=gen)[:n]]
        enc = self._build(int(x.shape[1])).to(device).train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 1)
            dec = CodeDecoder(int(x.shape[1]), self.code_bits).to(device).train()
        opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=self.lr)
        bs = min(self.fit_batch, n)
        bar = tqdm(range(self.fit_steps), desc="ssba encoder", disable=not ctx.progress, leave=False, unit="step")
        for step in bar:
            xb = pool[torch.randint(0, n, (bs,), generator=gen)].to(device).float()
            xb = xb / 255.0 if not pool.is_floating_point() else xb
            bits = torch.randint(0, 2, (bs, self.code_bits), generator=gen).float().to(device)
            residual = enc(xb, bits)
            encoded = (xb + residual).clamp(0, 1)
            noisy = augment(encoded, hflip=False, generator=gen)
            noisy = noisy + (torch.rand(noisy.shape, generator=gen).to(device) - 0.5) / 255.0
            logits = dec(noisy)
            bit_loss = F.binary_cross_entropy_with_logits(logits, bits)
            img_loss = (encoded - xb).pow(2).mean()
            ramp = min(1.0, step / max(1, self.fit_steps // 2))  # StegaStamp ramps the image loss up
            loss = bit_loss + ramp * self.image_weight * img_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(bits=f"{((logits > 0).float() == bits).float().mean().item():.3f}", mse=f"{img_loss.item():.2e}")
        bar.close()
        self._encoder = enc.cpu().eval().requires_grad_(False)
        self._code = self.attacker_code()
        self.fit_stats = self._check(dec.cpu().eval(), pool[:256])
        log.info("ssba encoder fitted: %s", self.fit_stats)

    def _check(self, dec: nn.Module, x: torch.Tensor) -> dict[str, float]:
        """How well the fitted encoder hides the attacker's code: the decoder's bit accuracy on
        encoded (uint8-rounded) images and the PSNR of the encoding."""
        xf = x.float() / 255.0 if not x.is_floating_point() else x
        encoded = self.trigger_uint8(x).float() / 255.0 if not x.is_floating_point() else self.apply_trigger(x)
        with torch.no_grad():
            bits = (dec(encoded) > 0).float()
        mse = (encoded - xf).pow(2).mean().item()
        return {"bit_acc": (bits == self._code).float().mean().item(),
                "psnr": 10 * math.log10(1 / mse) if mse > 0 else float("inf")}

    # --- the fitted component --------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self._encoder is None or self._code is None:
            return {}
        return {**module_tensors("encoder", self._encoder), "code": self._code.clone()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        first = tensors.get("encoder.net.enc1.0.weight")
        code = tensors.get("code")
        if first is None or first.ndim != 4 or code is None:
            raise UserError("the checkpoint carries no ssba encoder; re-train with `ulrl train`")
        unknown = [k for k in tensors if k != "code" and not k.startswith("encoder.")]
        if unknown:
            raise UserError(f"the checkpoint's ssba component has unexpected tensors ({unknown[0]}); "
                            "re-train with `ulrl train`")
        if code.shape != (self.code_bits,):
            raise UserError(f"the checkpoint's ssba code has {code.numel()} bits but the spec says "
                            f"code_bits={self.code_bits}; re-train with `ulrl train`")
        enc = self._build(int(first.shape[1]) - 1)
        load_module_tensors("encoder", enc, tensors, self.name).requires_grad_(False)
        self._code = code.clone().float()
