"""TSBD: clean unlearning, NWC ranking and zero reinitialisation, activeness-aware fine-tuning."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet
from torch import nn

from ulrl.cli import main
from ulrl.defenses import DEFENSES, make_defense_config, run_defense_fn
from ulrl.defenses.base import parse_overrides
from ulrl.defenses.tsbd import ActivenessPenalty, nwc_layers, weight_changes, zero_reinit
from ulrl.errors import UserError
from ulrl.models import create_model
from ulrl.train import TrainConfig, fit

TINY = {"epochs": 2, "batch_size": 32, "unlearn_max_epochs": 3}


@pytest.fixture(scope="module")
def trained(synth):
    torch.manual_seed(0)
    model = create_model("cnn-small", synth.num_classes, synth.in_channels, synth.image_size)
    fit(model, synth.train_x, synth.train_y, TrainConfig(epochs=2, lr=0.05, batch_size=64), progress=False)
    return model


def test_end_to_end(synth, trained):
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    calls = []

    def monitor(m):
        calls.append(1)
        return {"test_acc": 0.5, "test_asr": 0.25}

    x, y = synth.train_x[:64], synth.train_y[:64]
    cfg = make_defense_config("tsbd", **TINY, unlearn_lr=0.01)
    repaired, report = run_defense_fn("tsbd", trained, x, y, cfg, monitor=monitor, progress=False)
    assert repaired is not trained and type(repaired) is type(trained) and not repaired.training
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())  # input untouched
    state = repaired.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in before.items()}
    assert any(not torch.equal(before[k], state[k]) for k in before)
    assert report.defense == "tsbd" and report.layer == "net.features.0.0,net.features.1.0,net.features.2.0"
    assert 1 <= report.unlearn_epochs <= 3 and "clean_acc" in report.unlearn_history[-1]
    assert len(report.relearn_history) == 2 and report.relearn_history[-1]["test_asr"] == 0.25
    assert report.relearn_history[-1]["grad_norm"] > 0
    assert len(report.scores) == 32 + 64 + 128 and len(report.flagged) == int(224 * 0.15)
    extra = report.extra
    assert extra["neurons_total"] == 224 and extra["neurons_reinitialized"] == 33
    assert sum(len(v) for v in extra["reinitialized"].values()) == 33
    assert extra["weights_zeroed"] >= int(0.7 * extra["weights_in_selected"]) > 0
    assert extra["after_reinit"] == {"test_acc": 0.5, "test_asr": 0.25} and calls
    assert {"unlearn", "reinit", "finetune", "total"} <= set(report.seconds) and report.seconds["total"] > 0
    json.dumps(report.to_dict())
    assert repaired(torch.rand(3, 1, 16, 16)).shape == (3, synth.num_classes)


def test_reinitialisation_zeroes_the_most_changed_weights_of_the_top_neurons():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    changes = {"0": torch.tensor([[0.0, 0.0, 0.0, 0.1],    # NWC 0.1
                                  [5.0, 1.0, 0.0, 0.0],    # NWC 6.0  (top)
                                  [0.5, 0.5, 0.5, 0.5]]),  # NWC 2.0
               "2": torch.tensor([[1.0, 1.0, 2.0],         # NWC 4.0  (second)
                                  [0.0, 0.0, 0.2]])}       # NWC 0.2
    w0, w2 = net[0].weight.detach().clone(), net[2].weight.detach().clone()
    done = zero_reinit(net, changes, neuron_ratio=0.4, weight_ratio=0.5)  # int(5 * 0.4) = 2 neurons
    assert done["selected"] == [("0", 1), ("2", 0)] and done["per_layer"] == {"0": [1], "2": [0]}
    assert done["flat"].tolist() == [1, 3] and done["weights_in_selected"] == 7
    # the 3 (int(7 * 0.5)) largest changes among those 7 weights: 5.0, 2.0, 1.0 and the ties at 1.0
    expect0, expect2 = w0.clone(), w2.clone()
    expect0[1, [0, 1]] = 0.0
    expect2[0, :] = 0.0
    assert torch.equal(net[0].weight, expect0) and torch.equal(net[2].weight, expect2)
    assert done["weights_zeroed"] == 5
    assert zero_reinit(copy.deepcopy(net), changes, 0.1, 0.7)["weights_zeroed"] == 0  # int(0.5) neurons


def test_weight_changes_rows_are_output_neurons():
    a = nn.Sequential(nn.Conv2d(2, 3, 3, bias=False))
    b = copy.deepcopy(a)
    with torch.no_grad():
        b[0].weight[1, 0, 0, 0] += 2.0
    ch = weight_changes(a, b, ["0"])["0"]
    assert ch.shape == (3, 18) and ch.sum(1).tolist() == pytest.approx([0.0, 2.0, 0.0])
    resnet = create_model("preact-resnet18", 10, 3, 32)
    names = [n for n, _ in nwc_layers(resnet, "conv")]
    assert len(names) == 17 and not any("shortcut" in n for n in names)  # as the authors' code


def test_activeness_penalty_gives_the_authors_mixed_gradient():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4)).train()
    x, y = torch.rand(8, 1, 6, 6), torch.arange(8) % 4
    r, alpha = 0.05, 0.7
    # the authors' procedure on a throwaway copy: g1 at w, g2 at w + r g/||g|| per tensor
    tmp = copy.deepcopy(net)
    F.cross_entropy(tmp(x), y).backward()
    g1 = [p.grad.clone() for p in tmp.parameters()]
    with torch.no_grad():
        for p, g in zip(tmp.parameters(), g1, strict=True):
            p.add_(r * g / g.norm())
    tmp.zero_grad()
    F.cross_entropy(tmp(x), y).backward()
    expected = [(1 - alpha) * a + alpha * p.grad for a, p in zip(g1, tmp.parameters(), strict=True)]
    # ours: fit's objective CE + penalty, one backward pass
    bn_before = (net[1].running_mean.clone(), net[1].running_var.clone())
    out = net(x)
    stats_after_one_pass = (net[1].running_mean.clone(), net[1].running_var.clone())
    assert not torch.equal(bn_before[0], stats_after_one_pass[0])
    penalty = ActivenessPenalty(net, r, alpha)
    (F.cross_entropy(out, y) + penalty(x, out, y)).backward()
    for p, e in zip(net.parameters(), expected, strict=True):
        assert torch.allclose(p.grad, e, atol=1e-6)
    assert torch.equal(net[1].running_mean, stats_after_one_pass[0])  # the shifted pass left BN statistics alone
    assert penalty.grad_norms[0] == pytest.approx(sum(g.norm().item() for g in g1), rel=1e-5)
    zero = ActivenessPenalty(net, r, 0.0)
    assert zero(x, net(x), y).item() == 0.0


def test_model_without_convolutions(tiny):
    x, y = torch.rand(40, 1, 4, 4), torch.arange(40) % 4
    with pytest.raises(UserError):
        run_defense_fn("tsbd", tiny, x, y, make_defense_config("tsbd", **TINY), progress=False)
    cfg = make_defense_config("tsbd", **TINY, layer_type="linear", augment=False)
    repaired, report = run_defense_fn("tsbd", tiny, x, y, cfg, progress=False)
    assert isinstance(repaired, TinyNet) and report.layer == "features.1,fc" and report.extra["neurons_total"] == 12
    _, report = run_defense_fn("tsbd", tiny, x, y, make_defense_config("tsbd", **TINY, layer_type="linear",
                                                                          neuron_ratio=0.0), progress=False)
    assert report.extra["weights_zeroed"] == 0 and any("selects none" in n for n in report.notes)


def test_unlearning_stops_at_the_threshold_or_on_divergence(tiny):
    x, y = torch.rand(40, 1, 4, 4), torch.arange(40) % 4
    base = {**TINY, "layer_type": "linear", "augment": False, "epochs": 0}
    _, report = run_defense_fn("tsbd", tiny, x, y, make_defense_config("tsbd", **base, clean_threshold=1.0), progress=False)
    assert report.unlearn_epochs == 1
    _, report = run_defense_fn("tsbd", tiny, x, y, make_defense_config("tsbd", **base, unlearn_lr=1e30), progress=False)
    assert report.unlearn_history[-1]["diverged"] and any("diverged" in n for n in report.notes)
    assert report.scores == [0.0] * 12 and report.extra["weights_zeroed"] == 0  # stepped back to the original


def test_config_defaults_overrides_and_errors():
    cfg = make_defense_config("tsbd")
    assert (cfg.unlearn_lr, cfg.unlearn_momentum, cfg.unlearn_max_epochs, cfg.clean_threshold) == (1e-4, 0.9, 1000, 0.1)
    assert (cfg.layer_type, cfg.neuron_ratio, cfg.weight_ratio) == ("conv", 0.15, 0.7)
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.schedule, cfg.epochs, cfg.batch_size) == \
        (0.01, 0.9, 0.0, "constant", 21, 256)
    assert (cfg.r, cfg.alpha) == (0.05, 0.7) and make_defense_config("tsbd", "paper") == cfg
    assert "tsbd" in DEFENSES
    over = parse_overrides(["neuron_ratio=0.3", "layer_type=bn", "alpha=0.5"], "tsbd")
    assert over == {"neuron_ratio": 0.3, "layer_type": "bn", "alpha": 0.5}
    assert make_defense_config("tsbd", **over).neuron_ratio == 0.3
    for bad in ({"neuron_ratio": 1.5}, {"weight_ratio": -0.1}, {"layer_type": "attention"}, {"r": -1},
                {"unlearn_lr": 0}, {"lr": 0}, {"nonsense": 1}):
        with pytest.raises(UserError):
            make_defense_config("tsbd", **bad)


def test_cli_lists_and_runs_tsbd(tmp_path, capsys):
    assert main(["defenses"]) == 0 and "tsbd" in capsys.readouterr().out
    ckpt = tmp_path / "m.safetensors"
    assert main(["train", "--data", "synthetic", "--epochs", "1", "--attack", "badnets:patch_size=2",
                 "--out", str(ckpt), "--no-progress"]) == 0
    out = tmp_path / "purified"
    rc = main(["purify", "--model", str(ckpt), "--data", "synthetic", "--clean-ratio", "0.1", "--defense", "tsbd",
               "--set", "epochs=1", "--set", "unlearn_max_epochs=2", "--set", "batch_size=64",
               "--out", str(out), "--no-progress"])
    assert rc == 0 and (out / "report.json").exists() and (out / "model.safetensors").exists()
    assert json.loads((out / "report.json").read_text())["defense"] == "tsbd"
