"""``vgg19-bn``: VGG-19 (configuration E) with BatchNorm, CIFAR-style for 32x32 inputs.

Choice: BackdoorBench's CIFAR ``vgg19_bn`` is torchvision's, with a 7x7 average pool and a
25088-4096-4096 classifier (~139M parameters). This one is lighter (~20M parameters): the 16
conv3x3-BN-ReLU layers and 5 max-pools are the same, then adaptive average pooling to 1x1 and
the classifier Linear(512, 512)-ReLU-Dropout(0.5)-Linear(512, 512)-ReLU-Dropout(0.5)-
Linear(512, num_classes). A max-pool that would shrink a map below 1x1 (images under 32 px,
e.g. 28x28 gives 28-14-7-3-1) is left out, so any image size works.
"""

from __future__ import annotations

import torch
from torch import nn

from . import init_conv_net, register_model

CFG_E: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                          512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, cfg: list[int | str], num_classes: int, in_channels: int = 3, image_size: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin, size = in_channels, image_size
        for v in cfg:
            if v == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(cin, 512), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(512, num_classes),
        )
        init_conv_net(self)  # the linears keep PyTorch's default init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@register_model("vgg19-bn")
def vgg19_bn(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return VGG(CFG_E, num_classes, in_channels, image_size)
