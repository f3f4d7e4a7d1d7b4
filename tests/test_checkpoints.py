import os
import pickle

import pytest
import torch

from ulrl.checkpoints import load_checkpoint, save_checkpoint
from ulrl.errors import UserError
from ulrl.models import create_model

META = {"arch": "cnn-small", "num_classes": 4, "in_channels": 1, "image_size": 16, "mean": [0.5], "std": [0.25]}


def _model():
    torch.manual_seed(0)
    return create_model("cnn-small", 4, 1, 16, (0.5,), (0.25,))


def test_round_trip_is_exact(tmp_path):
    model = _model()
    extra = {"pattern": torch.rand(1, 16, 16)}
    path = save_checkpoint(tmp_path / "m.safetensors", model, META, extra)
    loaded, meta, attack = load_checkpoint(path)
    assert meta == META
    assert torch.equal(attack["pattern"], extra["pattern"])
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_refuses_to_overwrite(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", _model(), META)
    with pytest.raises(UserError, match="already exists"):
        save_checkpoint(path, _model(), META)
    with pytest.raises(UserError, match="also an input"):
        save_checkpoint(path, _model(), META, inputs=[path], overwrite=True)
    save_checkpoint(path, _model(), META, overwrite=True)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/ulrl_pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"weight": Evil()}, f)
    torch.save({"w": torch.zeros(1), "x": Evil()}, tmp_path / "evil2.pt")
    for p in (path, tmp_path / "evil2.pt"):
        with pytest.raises(UserError):
            load_checkpoint(p, meta=META)
    assert not os.path.exists("/tmp/ulrl_pwned")


def test_pt_state_dict_loads_with_meta(tmp_path):
    model = _model()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    loaded, _, _ = load_checkpoint(tmp_path / "m.pt", meta=META)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_corrupt_and_mismatched(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(tmp_path / "bad.safetensors", meta=META)
    path = save_checkpoint(tmp_path / "m.safetensors", _model(), META)
    with pytest.raises(UserError, match="does not match"):
        load_checkpoint(path, meta={**META, "num_classes": 7})
    with pytest.raises(UserError, match="does not match"):
        load_checkpoint(path, meta={**META, "arch": "preact-resnet18"})
