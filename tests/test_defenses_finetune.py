"""The fine-tuning based baseline defenses: FT, FT-SAM, FP, NAD, FST (and SAM in fit)."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet

from ulrl.defenses import make_defense_config, run_defense_fn
from ulrl.defenses.fp import find_prune_site
from ulrl.defenses.ft_sam import label_smoothing_penalty
from ulrl.defenses.nad import attention_layers, attention_map
from ulrl.errors import UserError
from ulrl.models import create_model
from ulrl.train import TrainConfig, fit

NAMES = ["ft", "ft-sam", "fp", "nad", "fst"]
TINY = {"epochs": 2, "batch_size": 32}


def tiny_config(name: str, **extra):
    more = {"nad": {"teacher_epochs": 1}, "fp": {"prune_step": 0.1}}.get(name, {})
    return make_defense_config(name, **{**TINY, **more, **extra})


@pytest.fixture(scope="module")
def trained(synth):
    torch.manual_seed(0)
    model = create_model("cnn-small", synth.num_classes, synth.in_channels, synth.image_size)
    fit(model, synth.train_x, synth.train_y, TrainConfig(epochs=2, lr=0.05, batch_size=64), progress=False)
    return model


@pytest.mark.parametrize("name", NAMES)
def test_defense_end_to_end(name, synth, trained):
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    calls = []

    def monitor(m):
        calls.append(1)
        return {"test_acc": 0.5, "test_asr": 0.25}

    x, y = synth.train_x[:64], synth.train_y[:64]
    repaired, report = run_defense_fn(name, trained, x, y, tiny_config(name), monitor=monitor, progress=False)
    assert repaired is not trained and type(repaired) is type(trained) and not repaired.training
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())  # input untouched
    state = repaired.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in before.items()}
    assert any(not torch.equal(before[k], state[k]) for k in before)  # something was trained
    assert len(report.relearn_history) == 2 and report.relearn_history[-1]["test_asr"] == 0.25
    assert calls and report.defense == name and report.seconds["total"] > 0
    json.dumps(report.to_dict())
    assert repaired(torch.rand(3, 1, 16, 16)).shape == (3, synth.num_classes)


@pytest.mark.parametrize("name", ["ft", "ft-sam", "fst"])
def test_plain_module_whose_last_linear_is_the_head(name, tiny):
    x, y = torch.rand(40, 1, 4, 4), torch.arange(40) % 4
    repaired, report = run_defense_fn(name, tiny, x, y, tiny_config(name, augment=False), progress=False)
    assert isinstance(repaired, TinyNet) and repaired is not tiny
    if name == "fst":
        assert report.layer == "fc"


@pytest.mark.parametrize("name", ["fp", "nad"])
def test_model_without_conv_layers_is_a_user_error(name, tiny):
    x, y = torch.rand(40, 1, 4, 4), torch.arange(40) % 4
    with pytest.raises(UserError):
        run_defense_fn(name, tiny, x, y, tiny_config(name), progress=False)


def test_empty_clean_set_and_bad_options_are_user_errors(tiny):
    with pytest.raises(UserError):
        run_defense_fn("ft", tiny, torch.rand(0, 1, 4, 4), torch.zeros(0, dtype=torch.long), progress=False)
    for name, bad in (("ft", {"lr": 0}), ("fp", {"acc_ratio": 2}), ("ft-sam", {"rho": -1}),
                      ("nad", {"layers": ("a",), "betas": (1.0, 2.0)}), ("fst", {"nonsense": 1})):
        with pytest.raises(UserError):
            make_defense_config(name, **bad)


def test_fp_zeroes_pruned_channels_and_they_stay_zero(synth, trained):
    x, y = synth.train_x[:64], synth.train_y[:64]
    repaired, report = run_defense_fn("fp", trained, x, y, tiny_config("fp", acc_ratio=1.0, prune_step=0.25), progress=False)
    pruned = report.extra["pruned_channels"]
    site = find_prune_site(repaired, x)
    assert site.feature == "net.features" and site.linear_name == "net.hidden.1" and site.group == 4  # 128 x 2 x 2
    assert len(pruned) == 96 and report.extra["pruned_fraction"] == 0.75  # 32 a step, never all 128
    w = repaired.state_dict()["net.hidden.1.weight"]
    cols = site.columns(torch.tensor(pruned))
    assert (w[:, cols] == 0).all() and (w.abs().sum(0) > 0).sum() == 32 * site.group
    # the pruned channels no longer reach the output: scrambling them changes nothing
    xb = torch.rand(4, 1, 16, 16)
    ref = repaired(xb)

    def scramble(_m, _i, out):
        out = out.clone()
        out[:, pruned] = torch.randn_like(out[:, pruned]) * 10
        return out

    hook = repaired.net.features.register_forward_hook(scramble)
    assert torch.allclose(repaired(xb), ref)
    hook.remove()


def test_fp_stops_at_the_accuracy_threshold(synth, trained):
    x, y = synth.train_x[:64], synth.train_y[:64]
    _, report = run_defense_fn("fp", trained, x, y, tiny_config("fp", acc_ratio=0.0, epochs=0), progress=False)
    assert report.extra["pruned_channels"] == [] and len(report.extra["prune_history"]) == 2


def test_fp_refuses_a_vit(synth):
    vit = create_model("vit-small", 4, 1, 16)
    with pytest.raises(UserError):
        find_prune_site(vit, synth.train_x[:2])


def _fit_copy(model, x, y, **cfg):
    m = copy.deepcopy(model)
    fit(m, x, y, TrainConfig(epochs=2, lr=0.1, batch_size=16, augment=False, **cfg), progress=False)
    return m.state_dict()


def test_sam_rho_zero_is_plain_sgd_and_rho_positive_differs(tiny):
    x, y = torch.rand(48, 1, 4, 4), torch.arange(48) % 4
    plain = _fit_copy(tiny, x, y)
    zero = _fit_copy(tiny, x, y, sam_rho=0.0, sam_adaptive=True)
    sam = _fit_copy(tiny, x, y, sam_rho=0.05)
    asam = _fit_copy(tiny, x, y, sam_rho=0.5, sam_adaptive=True)
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert any(not torch.equal(plain[k], sam[k]) for k in plain)
    assert any(not torch.equal(sam[k], asam[k]) for k in plain)


def test_sam_second_pass_leaves_batchnorm_statistics_alone():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(64, 3))
    x, y = torch.rand(16, 1, 6, 6), torch.arange(16) % 3
    plain, sam = copy.deepcopy(net), copy.deepcopy(net)
    cfg = dict(epochs=1, lr=0.0, momentum=0.0, weight_decay=0.0, batch_size=16, augment=False)
    fit(plain, x, y, TrainConfig(**cfg), progress=False)
    fit(sam, x, y, TrainConfig(sam_rho=1.0, **cfg), progress=False)
    bn_p, bn_s = plain[1], sam[1]
    assert torch.equal(bn_p.running_mean, bn_s.running_mean) and torch.equal(bn_p.running_var, bn_s.running_var)
    assert bn_p.num_batches_tracked == bn_s.num_batches_tracked == 1


def test_label_smoothing_penalty_matches_the_smoothed_cross_entropy():
    torch.manual_seed(0)
    logits, y, s = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 1]), 0.1
    target = torch.full((5, 4), s / 3).scatter_(1, y[:, None], 1 - s)
    smoothed = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    total = F.cross_entropy(logits, y) + label_smoothing_penalty(s)(None, logits, y)
    assert torch.allclose(total, smoothed)


def test_nad_layers_are_the_last_stages():
    cnn = create_model("cnn-small", 4, 1, 16)
    assert attention_layers(cnn, torch.rand(2, 1, 16, 16)) == ["net.features.0", "net.features.1", "net.features"]
    resnet = create_model("preact-resnet18", 10, 3, 32)
    assert attention_layers(resnet, torch.rand(2, 3, 32, 32)) == ["net.layer2", "net.layer3", "net.layer4"]
    vit = create_model("vit-small", 4, 1, 16)
    assert attention_layers(vit, torch.rand(2, 1, 16, 16), 2) == ["net.blocks.4", "net.blocks.5"]


def test_attention_map_is_normalised_channel_energy():
    a = torch.zeros(2, 3, 4, 4)
    a[:, :, 0, 0] = 1.0
    am = attention_map(a, 2.0)
    assert am.shape == (2, 16) and torch.allclose(am.norm(dim=1), torch.ones(2)) and am[0, 0] == 1.0


def test_fst_keeps_the_head_norm_and_moves_away(synth, trained):
    x, y = synth.train_x[:64], synth.train_y[:64]
    repaired, report = run_defense_fn("fst", trained, x, y, tiny_config("fst", alpha=1.0), progress=False)
    w0, w1 = trained.net.classifier.weight, repaired.net.classifier.weight
    assert torch.allclose(w1.norm(), w0.norm(), rtol=1e-5)
    assert report.extra["cosine_to_original"] < 0.5


def test_presets():
    assert (make_defense_config("ft", "paper").epochs, make_defense_config("ft", "paper").batch_size) == (100, 256)
    sam = make_defense_config("ft-sam")
    assert (sam.rho, sam.adaptive, sam.label_smoothing, sam.lr) == (2.0, True, 0.1, 0.01)
    fp = make_defense_config("fp")
    assert (fp.acc_ratio, fp.prune_step) == (0.1, 0.01)
    assert make_defense_config("nad").betas == (500.0, 1000.0, 1000.0)
    assert make_defense_config("nad", "paper").betas == (0.0, 0.0, 5000.0)
    fst = make_defense_config("fst")
    assert (fst.alpha, fst.lr, fst.epochs, fst.weight_decay) == (0.2, 0.01, 10, 0.0)
