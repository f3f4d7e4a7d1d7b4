"""Trigger patterns shared by attacks: image files, seeded noise, checkerboards."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError

MAX_PATTERN_PIXELS = 4096 * 4096


def load_image(path: str, channels: int, height: int, width: int) -> torch.Tensor:
    """An image file as a float tensor (C, H, W) in [0, 1], resized to (height, width).

    The file must be a regular file; its pixel count is checked before it is decoded."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    from ..io.paths import input_file

    p = input_file(path, "trigger image", 64 << 20, "; give the path of a PNG or JPEG file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                if im.width * im.height > MAX_PATTERN_PIXELS:
                    raise UserError(f"trigger image {path} has {im.width}x{im.height} pixels, more than the "
                                    f"{MAX_PATTERN_PIXELS:,} a pattern may have")
                im = im.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise UserError(f"trigger image {path} cannot be read as an image: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def noise(channels: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Seeded uniform noise in [0, 1], shape (C, H, W)."""
    return torch.rand(channels, height, width, generator=torch.Generator().manual_seed(seed))


def checkerboard(channels: int, height: int, width: int) -> torch.Tensor:
    ii, jj = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return ((ii + jj) % 2 == 0).float().expand(channels, height, width).clone()


def resize(pattern: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if pattern.shape[-2:] == (height, width):
        return pattern
    return F.interpolate(pattern.unsqueeze(0), size=(height, width), mode="bilinear", align_corners=False)[0]
