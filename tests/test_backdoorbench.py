"""BackdoorBench interop: records in (both formats), defense results out, key layouts of its models.

The reference networks below are written from BackdoorBench's own definitions (``models/preact_resnet.py``;
torchvision's ``vgg19_bn`` and ``vit_b_16`` as ``generate_cls_model`` builds them), independently of
``ulrl.models``: the tests check that a state dict in their key layout loads into our model with no
missing or unexpected key and gives the same logits.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ulrl.cli import main


# --- BackdoorBench's networks, as its code defines them ---------------------------------------------------
class RefPreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class RefPreActResNet18(nn.Module):
    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(64, 2, 1)
        self.layer2 = self._make_layer(128, 2, 2)
        self.layer3 = self._make_layer(256, 2, 2)
        self.layer4 = self._make_layer(512, 2, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(RefPreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(self.avgpool(out).flatten(1))


def ref_vgg19_bn(num_classes):
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
    layers, c = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
    net = nn.Module()
    net.features = nn.Sequential(*layers)
    net.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    net.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, 4096),
                                   nn.ReLU(True), nn.Dropout(), nn.Linear(4096, num_classes))
    net.forward = lambda x: net.classifier(torch.flatten(net.avgpool(net.features(x)), 1))
    return net


class RefEncoderBlock(nn.Module):  # torchvision.models.vision_transformer.EncoderBlock
    def __init__(self, heads, dim, mlp_dim):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp_dim, dim), nn.Dropout(0.0))

    def forward(self, inp):
        x = self.ln_1(inp)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = x + inp
        return x + self.mlp(self.ln_2(x))


class RefViT(nn.Module):  # torchvision.models.VisionTransformer, the parts that hold weights
    def __init__(self, image_size, patch, layers, heads, dim, mlp_dim, num_classes):
        super().__init__()
        self.patch = patch
        self.conv_proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.encoder = nn.Module()
        self.encoder.pos_embedding = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.encoder.layers = nn.Sequential()
        for i in range(layers):
            self.encoder.layers.add_module(f"encoder_layer_{i}", RefEncoderBlock(heads, dim, mlp_dim))
        self.encoder.ln = nn.LayerNorm(dim, eps=1e-6)
        self.heads = nn.Sequential()
        self.heads.add_module("head", nn.Linear(dim, num_classes))

    def forward(self, x):
        n = x.shape[0]
        x = self.conv_proj(x).reshape(n, self.conv_proj.out_channels, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1) + self.encoder.pos_embedding
        x = self.encoder.ln(self.encoder.layers(x))
        return self.heads(x[:, 0])


def _randomise_bn(net):
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)


def _load_bare(arch, state, num_classes, channels, size, **kw):
    from ulrl.io.tensors import checked_state, state_entries
    from ulrl.models import create_model

    model = create_model(arch, num_classes, channels, size, **kw)
    entries, get = state_entries(state, "test")
    ours, extra = checked_state(entries, get, model, "test")  # raises on any missing/unexpected key or shape
    assert not extra
    own = model.state_dict()
    assert set(own) - set(ours) == {"mean", "std"}
    model.load_state_dict({**own, **ours})
    return model.eval()


# --- key layouts -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("reference,arch,batch,atol", [
    (lambda: RefPreActResNet18(10), "preact-resnet18", 4, 1e-5),
    (lambda: ref_vgg19_bn(10), "vgg19-bn-torchvision", 2, 1e-4),
], ids=["preactresnet18", "vgg19_bn"])
def test_key_layout_and_logits(reference, arch, batch, atol):
    torch.manual_seed(0)
    ref = reference()
    _randomise_bn(ref)
    ref.eval()
    ours = _load_bare(arch, ref.state_dict(), 10, 3, 32)
    x = torch.rand(batch, 3, 32, 32)
    assert torch.allclose(ours(x), ref(x), atol=atol)


def test_vit_key_mapping_and_logits():
    """A small ViT in torchvision's layout behind BackdoorBench's Resize (keys '1.*') maps onto ours."""
    from ulrl.io.backdoorbench import from_backdoorbench, vit_to_backdoorbench
    from ulrl.models.backdoorbench import ResizedViT
    from ulrl.models.vit import VisionTransformer

    torch.manual_seed(0)
    ref = RefViT(32, 8, 2, 4, 32, 64, 5).eval()
    bb_state = {"1." + k: v for k, v in ref.state_dict().items()}
    ours = ResizedViT(VisionTransformer(5, 3, 32, patch=8, dim=32, depth=2, heads=4, mlp_dim=64), 32).eval()
    mapped = from_backdoorbench("vit_b_16", bb_state)
    assert set(mapped) == set(ours.state_dict())
    ours.load_state_dict(mapped)
    x = torch.rand(3, 3, 16, 16)  # resized to 32 by both (BackdoorBench's Resize upsamples)
    want = ref(F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False))
    assert torch.allclose(ours(x), want, atol=1e-5)
    assert {vit_to_backdoorbench(k) for k in ours.state_dict()} == set(bb_state)


# --- records ---------------------------------------------------------------------------------------------
K, SIZE, TARGET = 4, 16, 2


def _trained_reference():
    """BackdoorBench's PreActResNet18 (1 input channel) fitted a little on the synthetic data with a patch."""
    from ulrl.data import load_dataset

    torch.manual_seed(0)
    data = load_dataset("synthetic")
    net = RefPreActResNet18(K, in_channels=1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = data.train_x.float() / 255, data.train_y.clone()
    x[:64, :, -4:, -4:] = 1.0
    y[:64] = TARGET
    net.train()
    for _ in range(5):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 32):
            b = perm[i:i + 32]
            opt.zero_grad()
            F.cross_entropy(net(x[b]), y[b]).backward()
            opt.step()
    return net.eval(), data


def _poisoned_test(data):
    keep = (data.test_y != TARGET).nonzero().flatten()[:30]
    x = data.test_x[keep].clone()
    x[:, :, -4:, -4:] = 255
    return keep, x, data.test_y[keep]


def _reference_metrics(net, data, px, py):
    with torch.no_grad():
        acc = (net(data.test_x.float() / 255).argmax(1) == data.test_y).float().mean().item()
        pred = net(px.float() / 255).argmax(1)
    return acc, (pred == TARGET).float().mean().item(), (pred == py).float().mean().item()


@pytest.fixture(scope="module")
def reference():
    net, data = _trained_reference()
    keep, px, py = _poisoned_test(data)
    return net, data, keep, px, py, _reference_metrics(net, data, px, py)


def write_record(folder: Path, net, data, keep, px, py, fmt: str = "v2", **changes) -> Path:
    """A record as BackdoorBench's save_attack_result writes it (absolute PNG paths of another machine)."""
    folder.mkdir(parents=True)
    state = {("module." + k if fmt == "old" else k): v for k, v in net.state_dict().items()}
    record = {"model_name": "preactresnet18", "num_classes": K, "model": state, "data_path": "./data/synthetic",
              "img_size": (SIZE, SIZE, 1), "clean_data": "synthetic", "bd_train": None}
    if fmt == "v2":
        data_dict = {}
        for idx, img, label in zip(keep.tolist(), px, py.tolist(), strict=True):
            d = folder / "bd_test_dataset" / str(label)
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[0].numpy()).save(d / f"{idx}.png")
            stored = f"/workspace/someone/bdzoo2/record/{folder.name}/bd_test_dataset/{label}/{idx}.png"
            data_dict[np.int64(idx)] = {"path": stored, "other_info": [TARGET, label]}
        indicator = np.zeros(len(data.test_y))
        indicator[keep.numpy()] = 1
        record["bd_test"] = {"bd_data_container": {"save_folder_path": "/workspace/someone/bd_test_dataset",
                                                   "data_dict": data_dict, "save_file_format": ".png"},
                             "getitem_all": True, "getitem_all_switch": False, "original_index_array": keep.numpy().astype(np.int64),
                             "poison_indicator": indicator, "save_folder_path": "/workspace/someone/bd_test_dataset"}
    else:  # the older format: arrays
        record["bd_test"] = {"x": px.permute(0, 2, 3, 1).numpy(), "y": np.full(len(py), TARGET), "original_targets": py.numpy()}
    record.update(changes)
    torch.save(record, folder / "attack_result.pt")
    return folder


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("fmt", ["v2", "old"])
def test_record_imports_with_the_reported_metrics(fmt, reference, tmp_path, capsys):
    net, data, keep, px, py, (acc, asr, ra) = reference
    rec = write_record(tmp_path / "record" / f"badnet_{fmt}", net, data, keep, px, py, fmt)
    m = _json(capsys, ["evaluate", "--model", str(rec), "--json"])  # the clean data is the record's clean_data
    assert m["acc"] == pytest.approx(acc, abs=1e-6)
    assert m["asr"] == pytest.approx(asr, abs=1e-6) and m["ra"] == pytest.approx(ra, abs=1e-6)
    assert asr > 0.5  # the reference really is backdoored: ASR comes from the record's own images
    same = _json(capsys, ["evaluate", "--model", str(rec / "attack_result.pt"), "--json"])
    assert same == m


def test_record_purify_and_export(reference, tmp_path, capsys):
    net, data, keep, px, py, _ = reference
    rec = write_record(tmp_path / "record" / "badnet", net, data, keep, px, py)
    out = tmp_path / "defended"
    assert main(["purify", "--model", str(rec), "--defense", "ft", "--set", "epochs=1", "--clean-count", "32",
                 "--out", str(out), "--export", "backdoorbench", "--no-progress"]) == 0
    exported = torch.load(out / "defense_result.pt", weights_only=True)
    assert exported["model_name"] == "preactresnet18" and exported["num_classes"] == K
    assert set(exported["model"]) == set(net.state_dict())
    from ulrl.checkpoints import load_checkpoint

    repaired, meta, _ = load_checkpoint(out / "model.safetensors")
    assert meta["source"]["model_name"] == "preactresnet18"
    for k, v in repaired.net.state_dict().items():
        assert torch.equal(exported["model"][k], v), k
    results = json.loads((out / "results.json").read_text())
    assert results["attack"]["name"] == "poisoned-test" and results["before"]["asr"] > 0.5


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_records_are_one_line(reference, tmp_path, capsys):
    net, data, keep, px, py, _ = reference
    marker = tmp_path / "PWNED"
    evil = write_record(tmp_path / "evil", net, data, keep, px, py, payload=Payload(marker))
    assert "refusing" in _bad(capsys, ["evaluate", "--model", str(evil)])
    assert not marker.exists()
    rec = write_record(tmp_path / "nomodel", net, data, keep, px, py)
    torch.save({k: v for k, v in torch.load(rec / "attack_result.pt", weights_only=False).items() if k != "model_name"},
               rec / "attack_result.pt")
    assert "model_name" in _bad(capsys, ["evaluate", "--model", str(rec)])
    rec = write_record(tmp_path / "resnet9000", net, data, keep, px, py, model_name="resnet9000")
    assert "resnet9000" in _bad(capsys, ["evaluate", "--model", str(rec)])
    rec = write_record(tmp_path / "shape", net, data, keep, px, py, num_classes=5)
    assert "classes" in _bad(capsys, ["evaluate", "--model", str(rec)])
    small = dict(net.state_dict())
    small["linear.weight"] = small["linear.weight"][:, :100]
    rec = write_record(tmp_path / "shape2", net, data, keep, px, py, model=small)
    assert "shape" in _bad(capsys, ["evaluate", "--model", str(rec)])
    rec = write_record(tmp_path / "nopng", net, data, keep, px, py)
    import shutil

    shutil.rmtree(rec / "bd_test_dataset")
    assert "missing" in _bad(capsys, ["evaluate", "--model", str(rec)])
