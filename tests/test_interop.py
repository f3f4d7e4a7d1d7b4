"""Bring your own model: user architectures from the CLI, your own trigger set (and BackdoorBench records)."""

import json
from pathlib import Path

import pytest
import torch

from ulrl.cli import main

HERE = Path(__file__).parent
ARCH = f"{HERE / 'user_arch.py'}:make_net"
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _err(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def test_user_arch_trains_and_loads_from_a_plain_state_dict(tmp_path, capsys):
    ckpt = tmp_path / "user.safetensors"
    assert main(["train", "--arch", ARCH, "--data", "synthetic", "--epochs", "1", "--out", str(ckpt), "--no-progress"]) == 0
    meta = json.loads(ckpt.with_suffix(".json").read_text())
    assert meta["arch"].endswith(":make-net")
    from ulrl.checkpoints import load_checkpoint

    model, _, _ = load_checkpoint(ckpt)  # registered in this process by the train command
    torch.save(model.net.state_dict(), tmp_path / "plain.pt")  # the user's own file: no sidecar, their key layout
    assert main(["evaluate", "--model", str(tmp_path / "plain.pt"), "--arch", ARCH, "--data", "synthetic", "--json"]) == 0
    assert '"acc"' in capsys.readouterr().out


def test_user_arch_is_never_imported_because_a_sidecar_says_so(tmp_path, capsys):
    evil = tmp_path / "evil.py"
    marker = tmp_path / "PWNED"
    evil.write_text(f"open({str(marker)!r}, 'w')\ndef make(): pass\n")
    from ulrl.checkpoints import save_checkpoint
    from ulrl.models import create_model

    path = save_checkpoint(tmp_path / "m.safetensors", create_model("cnn-small", 4, 1, 16),
                           {"arch": f"{evil}:make", "num_classes": 4, "in_channels": 1, "image_size": 16})
    code, err = _err(capsys, ["evaluate", "--model", str(path), "--data", "synthetic"])
    assert code == 2 and "pass --arch" in err and len(err.splitlines()) == 1, err
    assert not marker.exists()


@pytest.mark.parametrize("spec,needle", [("nosuchmodule_xyz:make", "importing"), (f"{HERE / 'user_arch.py'}:nothing", "no callable"),
                                         ("just:", "must look like")])
def test_bad_user_arch_is_one_line(spec, needle, tmp_path, capsys):
    code, err = _err(capsys, ["train", "--arch", spec, "--data", "synthetic", "--out", str(tmp_path / "x.safetensors")])
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err


def test_poisoned_test_folder_measures_asr(tmp_path, capsys):
    from PIL import Image

    ckpt = tmp_path / "m.safetensors"
    assert main(["train", "--data", "synthetic", "--epochs", "3", "--attack", "badnets:patch_size=4,target=1,rate=0.2",
                 "--out", str(ckpt), "--no-progress"]) == 0
    capsys.readouterr()
    from ulrl.attacks import build_attack
    from ulrl.data import load_dataset

    data = load_dataset("synthetic")
    attack = build_attack("badnets:patch_size=4,target=1,rate=0.2", 4)
    x = attack.trigger_uint8(data.test_x[:40])
    for i, (img, label) in enumerate(zip(x, data.test_y[:40], strict=True)):
        (tmp_path / "trig" / str(int(label))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy()).save(tmp_path / "trig" / str(int(label)) / f"{i}.png")
    assert main(["evaluate", "--model", str(ckpt), "--data", "synthetic", "--json", "--attack", "badnets:patch_size=4,target=1,rate=0.2"]) == 0
    via_trigger = json.loads(capsys.readouterr().out)
    assert main(["evaluate", "--model", str(ckpt), "--data", "synthetic", "--json", "--poisoned-test", str(tmp_path / "trig"),
                 "--target", "1"]) == 0
    via_folder = json.loads(capsys.readouterr().out)
    assert via_folder["asr"] > 0.5 and abs(via_folder["asr"] - via_trigger["asr"]) < 0.2
    code, err = _err(capsys, ["evaluate", "--model", str(ckpt), "--data", "synthetic", "--poisoned-test", str(tmp_path / "trig")])
    assert code == 2 and "--target" in err


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST not installed (Debian dataset-fashion-mnist)")
def test_user_arch_purified_end_to_end_on_fashion_mnist(tmp_path):
    """A user network whose classifier is not the last module and not named 'linear': --layer names it."""
    ckpt = tmp_path / "user.safetensors"
    assert main(["train", "--arch", ARCH, "--data", "fashion-mnist", "--epochs", "2", "--attack",
                 "badnets:patch_size=3,target=4,rate=0.1", "--out", str(ckpt), "--no-progress"]) == 0
    out = tmp_path / "purified"
    assert main(["purify", "--model", str(ckpt), "--arch", ARCH, "--layer", "scores", "--data", "fashion-mnist",
                 "--out", str(out), "--no-progress"]) == 0
    r = json.loads((out / "results.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert report["layer"] == "net.scores"
    assert r["before"]["asr"] > 0.9 and r["after"]["asr"] < 0.1, r
    assert r["before"]["acc"] - r["after"]["acc"] < 0.05, r
