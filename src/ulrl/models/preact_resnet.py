"""``preact-resnet18``: the pre-activation ResNet-18 used by BackdoorBench.

PreActBlocks in four stages of [2, 2, 2, 2] blocks (64, 128, 256, 512 channels), a 3x3 stride-1
stem, adaptive average pooling to 1x1 and the ``linear`` head. As in BackdoorBench the same
network (same stem) serves 32x32 and larger inputs such as 64x64 Tiny-ImageNet; there is no
BN-ReLU after the last stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import init_conv_net, register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3 twice; the shortcut (1x1 conv when the shape changes) sees the
    pre-activated input."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    def __init__(self, num_blocks: list[int], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        stages, cin = [], 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), num_blocks, strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(PreActBlock(cin, width, stride=2 if (i > 0 and j == 0) else 1))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)
        init_conv_net(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.avgpool(out), 1))


@register_model("preact-resnet18")
def preact_resnet18(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return PreActResNet([2, 2, 2, 2], num_classes, in_channels)
