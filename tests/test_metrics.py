import pytest
import torch
from torch import nn

from ulrl.attacks import build_attack
from ulrl.metrics import der, evaluate


class Fixed(nn.Module):
    """Predicts class 0 when the bottom-right pixel is white, else the label stored in pixel (0, 0)."""

    def forward(self, x):
        triggered = x[:, 0, -1, -1] > 0.99
        label = (x[:, 0, 0, 0] * 10).round().long()
        return nn.functional.one_hot(torch.where(triggered, 0, label), 4).float()


def test_asr_ignores_target_class_images():
    y = torch.tensor([0, 0, 1, 2, 3, 3])
    x = torch.zeros(6, 1, 5, 5, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.tensor([0, 0, 26, 51, 77, 77], dtype=torch.uint8)  # encodes the label
    attack = build_attack("badnets:patch_size=1,target=0", num_classes=4)
    m = evaluate(Fixed(), x, y, attack)
    assert m["acc"] == 1.0
    assert m["asr"] == 1.0  # 4 non-target images, all flipped to 0; the two class-0 images are ignored
    assert m["ra"] == 0.0


def test_der_hand_computed():
    assert der({"acc": 0.9, "asr": 1.0}, {"acc": 0.9, "asr": 0.0}) == pytest.approx(1.0)
    assert der({"acc": 0.9, "asr": 1.0}, {"acc": 0.8, "asr": 0.0}) == pytest.approx(0.95)
    assert der({"acc": 0.9, "asr": 0.5}, {"acc": 0.95, "asr": 0.7}) == pytest.approx(0.5)
    assert der({"acc": 0.9, "asr": 0.9}, {"acc": 0.5, "asr": 0.1}) == pytest.approx(0.7)
