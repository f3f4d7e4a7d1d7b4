"""Architectures laid out exactly as BackdoorBench builds them, so its records load key for key.

- ``preact-resnet18`` (models/preact_resnet.py) already is BackdoorBench's ``preactresnet18``.
- ``vgg19-bn-torchvision``: BackdoorBench's ``vgg19_bn`` is torchvision's ``vgg19_bn(num_classes=K)``:
  the same 16 conv3x3-BN-ReLU layers and 5 max-pools as our ``vgg19-bn``, then a 7x7 adaptive
  average pool and the 25088-4096-4096-K classifier (~139M parameters). Keys ``features.N.*``,
  ``classifier.{0,3,6}.*``.
- ``vit-b16-resize224``: BackdoorBench's ``vit_b_16`` is ``Sequential(Resize((224, 224)), torchvision
  vit_b_16)`` with a new head: images of any size are resized (bilinear) to 224x224 and go through
  ViT-B/16. Our ViT has the same computation under other names; :mod:`ulrl.io.backdoorbench` maps them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import init_conv_net, register_model
from .vgg import CFG_E
from .vit import VisionTransformer


class TorchvisionVGG(nn.Module):
    def __init__(self, cfg: list[int | str], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(cin * 49, 4096), nn.ReLU(True), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(0.5),
            nn.Linear(4096, num_classes),
        )
        init_conv_net(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class ResizedViT(nn.Module):
    """Bilinear resize to ``size`` x ``size`` (no antialiasing: BackdoorBench upsamples), then the ViT."""

    def __init__(self, vit: nn.Module, size: int) -> None:
        super().__init__()
        self.size = size
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.vit(x)


@register_model("vgg19-bn-torchvision")
def vgg19_bn_torchvision(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return TorchvisionVGG(CFG_E, num_classes, in_channels)


@register_model("vit-b16-resize224")
def vit_b16_resize224(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    vit = VisionTransformer(num_classes, in_channels, 224, patch=16, dim=768, depth=12, heads=12, mlp_dim=3072,
                            name="vit-b16-resize224")
    return ResizedViT(vit, 224)
