"""``cnn-small``: the fast CPU default for small grayscale images (Fashion-MNIST, MNIST).

Three conv3x3-BN-ReLU blocks (32, 64, 128 channels), each followed by 2x2 max-pooling, then
the flattened feature map (no global pooling, so spatial layout is kept) goes through
Linear(128*s*s, 256)-ReLU and the ``classifier`` Linear(256, num_classes), with s = image_size // 8.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from . import init_conv_net, register_model


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        if image_size < 8:
            raise UserError(f"cnn-small needs images of at least 8x8 pixels, got {image_size}")
        s = image_size // 8
        self.features = nn.Sequential(_block(in_channels, 32), _block(32, 64), _block(64, 128))
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(128 * s * s, 256), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(256, num_classes)
        init_conv_net(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.hidden(self.features(x)))


@register_model("cnn-small")
def cnn_small(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return SmallCNN(num_classes, in_channels, image_size)
