import pytest
import torch
from torch import nn

from ulrl.data import load_dataset


@pytest.fixture(scope="session")
def synth():
    """A tiny learnable 4-class 1x16x16 dataset."""
    return load_dataset("synthetic")


class TinyNet(nn.Module):
    def __init__(self, in_features: int = 16, num_classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 8), nn.ReLU())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyNet()
