"""Every user mistake is one line on stderr and exit code 2."""

import pickle

import pytest
import torch

from ulrl.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    path = d / "m.safetensors"
    rc = main(["train", "--data", "synthetic", "--epochs", "1", "--attack", "badnets:patch_size=2",
               "--out", str(path), "--no-progress"])
    assert rc == 0 and path.exists() and path.with_suffix(".json").exists()
    return path


def _err(capsys, argv):
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(argv))
    err = capsys.readouterr().err.strip()
    return e.value.code, err


def test_train_purify_evaluate_happy_path(ckpt, tmp_path, capsys):
    out = tmp_path / "purified"
    rc = main(["purify", "--model", str(ckpt), "--data", "synthetic", "--clean-ratio", "0.25", "--out", str(out),
               "--set", "unlearn_epochs=2", "--set", "relearn_epochs=2", "--no-progress"])
    assert rc == 0
    for name in ("model.safetensors", "model.json", "report.json", "results.json", "clean_indices.json",
                 "neuron_scores.png", "curves.png"):
        assert (out / name).exists(), name
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out / "model.safetensors"), "--data", "synthetic", "--json"]) == 0
    assert '"asr"' in capsys.readouterr().out  # the attack spec travelled in the sidecar


def _cases(ckpt, tmp_path):
    (tmp_path / "corrupt.safetensors").write_bytes(b"garbage")
    (tmp_path / "corrupt.json").write_text(ckpt.with_suffix(".json").read_text())
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"w": torch.zeros(1), "f": print}, f)
    (tmp_path / "evil.json").write_text(ckpt.with_suffix(".json").read_text())
    same = tmp_path / "model.safetensors"
    same.write_bytes(ckpt.read_bytes())
    (tmp_path / "model.json").write_text(ckpt.with_suffix(".json").read_text())
    ro = tmp_path / "ro"
    ro.write_text("a file, not a directory")
    p = ["purify", "--model", str(ckpt), "--data", "synthetic", "--no-progress"]
    return {
        "missing checkpoint": (["evaluate", "--model", str(tmp_path / "nope.safetensors"), "--data", "synthetic"], "does not exist"),
        "corrupt checkpoint": (["evaluate", "--model", str(tmp_path / "corrupt.safetensors"), "--data", "synthetic"], "corrupt"),
        "pickle with objects": (["evaluate", "--model", str(tmp_path / "evil.pt"), "--data", "synthetic"], "refusing"),
        "empty clean set": (p + ["--clean-count", "0", "--out", str(tmp_path / "o1")], "clean-count"),
        "ratio zero": (p + ["--clean-ratio", "0", "--out", str(tmp_path / "o2")], "(0, 1]"),
        "ratio above one": (p + ["--clean-ratio", "1.5", "--out", str(tmp_path / "o3")], "(0, 1]"),
        "unknown dataset": (["evaluate", "--model", str(ckpt), "--data", "imagenet-9000"], "unknown dataset"),
        "unknown attack": (["evaluate", "--model", str(ckpt), "--data", "synthetic", "--attack", "voodoo"], "unknown attack"),
        "unknown model": (["train", "--data", "synthetic", "--arch", "resnet9000", "--out", str(tmp_path / "x.safetensors")], "unknown model"),
        "unwritable output": (p + ["--out", str(ro / "sub")], "not a directory"),
        "output over input": (["purify", "--model", str(same), "--data", "synthetic", "--out", str(tmp_path), "--overwrite"], "input"),
        "bad device": (["evaluate", "--model", str(ckpt), "--data", "synthetic", "--device", "banana"], "not a device"),
        "seed too large": (["evaluate", "--model", str(ckpt), "--data", "synthetic", "--seed", str(2**70)], "--seed"),
    }


CASES = ["missing checkpoint", "corrupt checkpoint", "pickle with objects", "empty clean set", "ratio zero",
         "ratio above one", "unknown dataset", "unknown attack", "unknown model", "unwritable output", "output over input",
         "bad device", "seed too large"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line_exit_2(case, ckpt, tmp_path, capsys):
    argv, needle = _cases(ckpt, tmp_path)[case]
    code, err = _err(capsys, argv)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err


def _write_idx(path, arr):
    import gzip
    import struct

    import numpy as np

    arr = np.asarray(arr, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 8, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def test_data_shape_mismatch(ckpt, tmp_path, capsys):
    """A model trained on 1x16x16 with 4 classes, evaluated on 1x28x28 data with 10 classes."""
    import numpy as np

    for split, n in (("train", 20), ("t10k", 10)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", np.zeros((n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    code, err = _err(capsys, ["evaluate", "--model", str(ckpt), "--data", "mnist", "--data-dir", str(tmp_path)])
    assert code == 2 and len(err.splitlines()) == 1 and "model expects" in err, err


def test_architecture_mismatch(ckpt, tmp_path, capsys):
    """The sidecar says one architecture or class count, the weights are of another."""
    from ulrl.checkpoints import read_meta, write_json

    for key, value, needle in (("num_classes", 10, "classes"), ("image_size", 28, "size"), ("in_channels", 3, "channels")):
        meta = read_meta(ckpt)
        meta[key] = value
        bad = tmp_path / f"{key}.safetensors"
        bad.write_bytes(ckpt.read_bytes())
        write_json(bad.with_suffix(".json"), meta)
        code, err = _err(capsys, ["evaluate", "--model", str(bad), "--data", "synthetic"])
        assert code == 2 and len(err.splitlines()) == 1, err
        assert "does not match" in err or needle in err, err


def test_pt_state_dict_with_arch_flag(ckpt, tmp_path, capsys):
    """A user's own .pt state_dict (no sidecar) is read with --arch; without it, a one-line hint."""
    from ulrl.checkpoints import load_checkpoint

    model, _, _ = load_checkpoint(ckpt)
    torch.save(model.net.state_dict(), tmp_path / "bare.pt")  # the bare network, no normalisation wrapper
    code, err = _err(capsys, ["evaluate", "--model", str(tmp_path / "bare.pt"), "--data", "synthetic"])
    assert code == 2 and "--arch" in err
    assert main(["evaluate", "--model", str(tmp_path / "bare.pt"), "--arch", "cnn-small", "--data", "synthetic",
                 "--attack", "none", "--json"]) == 0
    assert '"acc"' in capsys.readouterr().out
