"""A user's own network for the ``--arch tests/user_arch.py:make_net`` tests.

Its classifier is ``scores``, which is neither the last module nor the last ``nn.Linear``
(``embed``, a projection head kept from pre-training, comes after it), so ULRL needs ``--layer scores``.
"""

from torch import nn


class UserNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveMaxPool2d(4), nn.Flatten(),
            nn.Linear(512, 64), nn.ReLU(),
        )
        self.scores = nn.Linear(64, num_classes)
        self.embed = nn.Linear(64, 16)  # unused by forward: a leftover projection head

    def forward(self, x):
        return self.scores(self.body(x))


def make_net(num_classes: int, in_channels: int = 3) -> nn.Module:
    return UserNet(num_classes, in_channels)
