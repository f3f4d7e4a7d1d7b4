"""FTrojan (Wang et al., "An Invisible Black-box Backdoor Attack through Frequency Domain", ECCV 2022).

The trigger lives in the frequency domain. Each image is cut into ``window x window`` blocks and
every block is moved to the frequency domain with the orthonormal 2-D DCT-II (what ``cv2.dct``
computes); a fixed ``magnitude`` is added to the coefficients at a mid and a high frequency,
and the inverse DCT brings the block back. For RGB images the paper works in YUV (OpenCV's
YCrCb) and only triggers the two chroma channels, where the eye is least sensitive; a
one-channel image has its single channel triggered.

Defaults follow the paper (and its code's) CIFAR-10 setting, positions (15, 15) and (31, 31) in
a 32x32 block, UV channels, except the magnitude: other image sizes use the image's shorter side
as the block (32 on CIFAR, 28 on Fashion-MNIST) and the same rule for the positions,
mid = window/2 - 1 and high = window - 1, so (13, 13) and (27, 27) on a 28x28 image. Pixels
outside whole blocks (a non-square image) are left as they are. Deviation: ``magnitude=60``
instead of the paper's 30 (0-255 scale). With 30 the 5-epoch small CNN on Fashion-MNIST (10%
poisoning) does not learn the trigger at all (ASR 0.03; the change is at most 4 grey levels and
the black background clamps half of it away); 60 reaches ASR 0.96 at the same clean accuracy.
Pass ``magnitude=30`` for the paper's setting.

Budget: the DCT is orthonormal, so a coefficient bump of ``m`` is a spatial cosine pattern of
amplitude at most ``m * 2 / window`` (per position); with two positions the change per pixel of a
triggered channel is at most ``4 m / window`` (0-255 scale, before clamping) and its mean square
is ``2 m^2 / window^2`` (Parseval). Going back from YCrCb to RGB multiplies by at most 1.772.
So on 1x28x28 images with m = 60: L-inf <= 8.6/255 and PSNR >= 38.5 dB; on 3x32x32, L-inf
<= 13.3/255 and PSNR >= 36.5 dB (m = 30: 4.3/255 and 44.5 dB; 6.6/255 and 42.5 dB).
:meth:`FTrojan.linf_bound` and :meth:`FTrojan.psnr_bound` give the bounds for any shape.

Unlike the reference code, the YCrCb round trip is done in floating point (the reference casts
the YCrCb image to uint8 before the inverse DCT and again after it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UserError
from .base import Attack, register_attack

# ITU-R BT.601 (OpenCV's RGB <-> YCrCb for 8-bit images, offsets 0 and 128).
_RGB_TO_YCRCB = torch.tensor([[0.299, 0.587, 0.114],
                              [0.5, -0.418688, -0.081312],
                              [-0.168736, -0.331264, 0.5]], dtype=torch.float64)
_YCRCB_OFFSET = torch.tensor([0.0, 128.0, 128.0], dtype=torch.float64)


def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``D`` (n x n): ``D @ v`` is the DCT of ``v``, ``D.T @ c`` its inverse."""
    k = torch.arange(n, dtype=dtype)[:, None]
    i = torch.arange(n, dtype=dtype)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def _blocks(x: torch.Tensor, window: int) -> tuple[torch.Tensor, int, int]:
    """(N, C, H, W) -> (N, C, bh, bw, window, window) view of the whole blocks (top-left aligned)."""
    n, c, h, w = x.shape
    bh, bw = h // window, w // window
    core = x[:, :, : bh * window, : bw * window]
    return core.reshape(n, c, bh, window, bw, window).permute(0, 1, 2, 4, 3, 5), bh, bw


def block_dct(x: torch.Tensor, window: int) -> torch.Tensor:
    """Blockwise orthonormal 2-D DCT of the whole ``window`` blocks of ``x`` (N, C, H, W):
    returns (N, C, H // window, W // window, window, window)."""
    d = dct_matrix(window, x.dtype).to(x.device)
    b, _, _ = _blocks(x, window)
    return d @ b @ d.T


def block_idct(coeffs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`block_dct`, written into a copy of ``out`` (pixels outside blocks kept)."""
    window = coeffs.shape[-1]
    d = dct_matrix(window, coeffs.dtype).to(coeffs.device)
    pix = d.T @ coeffs @ d
    n, c, bh, bw, _, _ = pix.shape
    res = out.clone()
    res[:, :, : bh * window, : bw * window] = pix.permute(0, 1, 2, 4, 3, 5).reshape(n, c, bh * window, bw * window)
    return res


def rgb_to_ycrcb(x: torch.Tensor) -> torch.Tensor:
    """RGB (N, 3, H, W) on the 0-255 scale -> YCrCb (OpenCV's order and offsets)."""
    m = _RGB_TO_YCRCB.to(x)
    return torch.einsum("ij,njhw->nihw", m, x) + _YCRCB_OFFSET.to(x)[None, :, None, None]


def ycrcb_to_rgb(x: torch.Tensor) -> torch.Tensor:
    m = torch.linalg.inv(_RGB_TO_YCRCB).to(x)
    return torch.einsum("ij,njhw->nihw", m, x - _YCRCB_OFFSET.to(x)[None, :, None, None])


@register_attack
@dataclass
class FTrojan(Attack):
    """FTrojan (Wang et al., ECCV 2022): a DCT-domain trigger. Defaults: magnitude 60 (0-255
    scale; the paper's 30 is too weak for a 5-epoch small CNN) at a mid (window/2 - 1) and a high
    (window - 1) frequency, window = the image's shorter side (the paper's 32 on CIFAR-10), UV
    channels of YCrCb for RGB images, 10% poisoning."""

    name = "ftrojan"
    size_fields = ("window", "mid", "high")

    magnitude: float = 60.0  # added to each trigger coefficient, on the 0-255 scale (paper: 30)
    window: int = 0  # DCT block size; 0 = the image's shorter side
    mid: int = -1  # mid-frequency position (mid, mid) in the block; -1 = window // 2 - 1
    high: int = -1  # high-frequency position (high, high); -1 = window - 1
    yuv: bool = True  # RGB images: trigger the chroma channels of YCrCb (False: all RGB channels)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.magnitude <= 0:
            raise UserError(f"ftrojan magnitude must be > 0, got {self.magnitude}")
        if self.window < 0 or self.window == 1:
            raise UserError(f"ftrojan window must be 0 (the image size) or >= 2, got {self.window}")

    def geometry(self, height: int, width: int) -> tuple[int, list[int]]:
        """The block size and the diagonal frequency positions used for an image of this size."""
        window = self.window or min(height, width)
        if window > min(height, width):
            raise UserError(f"ftrojan window {window} does not fit a {height}x{width} image; use window=0")
        mid = window // 2 - 1 if self.mid < 0 else self.mid
        high = window - 1 if self.high < 0 else self.high
        for p in (mid, high):
            if not 0 <= p < window:
                raise UserError(f"ftrojan frequency position {p} is outside the {window}x{window} block")
        return window, sorted({mid, high})

    def _channel_gain(self, channels: int) -> torch.Tensor:
        """How a unit change of the triggered (Y)CrCb channels shows in each output channel."""
        if channels == 3 and self.yuv:  # both chroma channels get the same change
            return torch.linalg.inv(_RGB_TO_YCRCB)[:, 1:].sum(1)  # R, G, B: 1.402, -1.058, 1.772
        return torch.ones(channels, dtype=torch.float64)

    def linf_bound(self, channels: int, height: int, width: int) -> float:
        """Largest possible change of a pixel (on [0, 1]) before clamping and quantisation."""
        window, positions = self.geometry(height, width)
        per_channel = len(positions) * self.magnitude * 2.0 / window
        return per_channel * self._channel_gain(channels).abs().max().item() / 255.0

    def psnr_bound(self, channels: int, height: int, width: int) -> float:
        """Lowest possible PSNR (dB, peak 1) of a triggered image before quantisation: the mean
        squared change is at most ``len(positions) * magnitude^2 / window^2`` per triggered channel
        (Parseval), times the colour conversion's gain; clamping only lowers it."""
        window, positions = self.geometry(height, width)
        mse = len(positions) * self.magnitude**2 / window**2 * self._channel_gain(channels).pow(2).mean().item()
        return 10 * math.log10(255.0**2 / mse)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        window, positions = self.geometry(h, w)
        img = x.to(torch.float64) * 255.0
        use_yuv = c == 3 and self.yuv
        if use_yuv:
            img = rgb_to_ycrcb(img)
        chans = [1, 2] if use_yuv else list(range(c))
        coeffs = block_dct(img[:, chans], window)
        for p in positions:
            coeffs[..., p, p] += self.magnitude
        img[:, chans] = block_idct(coeffs, img[:, chans])
        if use_yuv:
            img = ycrcb_to_rgb(img)
        return (img / 255.0).clamp(0, 1).to(x.dtype)
