"""Real data (Fashion-MNIST), a few minutes: the demo end to end at reduced size."""

import json
from pathlib import Path

import pytest

from ulrl.cli import main

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST not installed (Debian dataset-fashion-mnist)")
def test_demo_removes_badnets_on_fashion_mnist(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--attack", "badnets", "--epochs", "2", "--out", str(out), "--no-progress"]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["before"]["asr"] > 0.9  # the backdoor is there
    assert 0 in r["flagged_neurons"]  # the target's neuron is found
    assert r["after"]["asr"] < 0.05  # and removed
    assert r["before"]["acc"] - r["after"]["acc"] < 0.05
    for name in ("poisoned.safetensors", "model.safetensors", "report.json", "neuron_scores.png", "curves.png"):
        assert (out / name).exists()
