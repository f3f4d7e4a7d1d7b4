"""ANP, RNP, I-BAU and SAU: end-to-end runs on tiny synthetic data and checks of their pieces."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ulrl.defenses import make_defense_config, run_defense_fn
from ulrl.defenses.anp import BNMasks, prune_channels, select_pruned
from ulrl.defenses.ibau import Hypergradient, input_scale
from ulrl.defenses.sau import shared_pgd, shared_risk
from ulrl.errors import UserError
from ulrl.models import create_model
from ulrl.train import TrainConfig, fit

TINY = {
    "anp": {"iterations": 4, "eval_every": 2, "batch_size": 16, "prune_by": "fraction", "prune_fraction": 0.1},
    "rnp": {"unlearn_epochs": 2, "recover_epochs": 2, "batch_size": 16, "prune_by": "fraction", "prune_fraction": 0.1},
    "i-bau": {"n_rounds": 2, "K": 2, "batch_size": 16, "portion": 0.25},
    "sau": {"n_rounds": 2, "pgd_steps": 2, "batch_size": 16},
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors and double backward: one thread is fastest, and immune to busy cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return create_model("cnn-small", 4, 1, 16)


def _small(synth, n: int = 48):
    return synth.train_x[:n], synth.train_y[:n]


@pytest.mark.parametrize("name", sorted(TINY))
def test_defense_end_to_end(name, synth, cnn):
    x, y = _small(synth)
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    calls = []

    def monitor(m):
        calls.append(1)
        return {"test_acc": 0.5}

    cfg = make_defense_config(name, "default", seed=0, **TINY[name])
    repaired, report = run_defense_fn(name, cnn, x, y, cfg, monitor=monitor, progress=False)
    assert repaired is not cnn and type(repaired) is type(cnn) and not repaired.training
    assert {k: v.shape for k, v in repaired.state_dict().items()} == {k: v.shape for k, v in before.items()}
    for k, v in cnn.state_dict().items():  # the input model is untouched
        assert torch.equal(v, before[k]), k
    assert calls and report.relearn_history and "test_acc" in report.relearn_history[-1]
    assert report.defense == name and report.seconds
    json.dumps(report.to_dict())
    with torch.no_grad():
        assert repaired(torch.rand(2, 1, 16, 16)).shape == (2, 4)


@pytest.mark.parametrize("name", ["anp", "rnp"])
def test_pruned_channels_are_zero_in_returned_weights(name, synth, cnn):
    x, y = _small(synth)
    cfg = make_defense_config(name, "default", **TINY[name])
    repaired, report = run_defense_fn(name, cnn, x, y, cfg, progress=False)
    pruned = report.extra["pruned"]
    assert pruned and report.extra["num_pruned"] == sum(len(v) for v in pruned.values()) > 0
    modules, originals = dict(repaired.named_modules()), dict(cnn.named_modules())
    for layer, idx in pruned.items():
        w = modules[layer].weight.detach()
        assert (w[idx] == 0).all()
        keep = torch.ones(len(w), dtype=torch.bool)
        keep[idx] = False
        assert torch.equal(w[keep], originals[layer].weight.detach()[keep])
        assert torch.equal(modules[layer].bias, originals[layer].bias)  # the reference prunes gamma only


@pytest.mark.parametrize("name", ["anp", "rnp"])
def test_model_without_batchnorm_is_a_user_error(name, tiny):
    x = torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8)
    y = torch.arange(8) % 4
    with pytest.raises(UserError, match="BatchNorm"):
        run_defense_fn(name, tiny, x, y, make_defense_config(name, "default", **TINY[name]), progress=False)


@pytest.mark.parametrize("name", ["i-bau", "sau"])
def test_unlearning_defenses_work_on_plain_modules(name, tiny):
    x = torch.randint(0, 256, (16, 1, 4, 4), dtype=torch.uint8)
    y = torch.arange(16) % 4
    repaired, report = run_defense_fn(name, tiny, x, y, make_defense_config(name, "default", **TINY[name]), progress=False)
    assert repaired is not tiny and len(report.relearn_history) == TINY[name]["n_rounds"]


def test_bn_masks_hook_is_exact(cnn):
    cnn.eval()
    x = torch.rand(4, 1, 16, 16)
    ref = cnn(x)
    masks = BNMasks(cnn, "test")
    assert torch.allclose(cnn(x), ref, atol=1e-6)  # masks of 1, no perturbation: unchanged
    name, bn = masks.layers[1]
    with torch.no_grad():
        masks.masks[1][[0, 3]] = 0.0
        masks.masks[1][5] = 0.5
    masked = cnn(x)
    masks.remove()
    with torch.no_grad():  # the same as scaling gamma
        bn.weight[[0, 3]] = 0.0
        bn.weight[5] *= 0.5
    assert torch.allclose(cnn(x), masked, atol=1e-5)


def test_bn_masks_perturbation_scales_weight_and_bias(cnn):
    cnn.eval()
    x = torch.rand(3, 1, 16, 16)
    masks = BNMasks(cnn, "test")
    with torch.no_grad():
        for n in masks.noise_w:
            n.fill_(0.3)
        for n in masks.noise_b:
            n.fill_(-0.2)
    masks.perturbed = True
    perturbed = cnn(x)
    masks.remove()
    with torch.no_grad():
        for _, bn in masks.layers:
            bn.weight.mul_(1.3)
            bn.bias.mul_(0.8)
    assert torch.allclose(cnn(x), perturbed, atol=1e-5)


def test_select_and_prune_channels(cnn):
    values = torch.tensor([0.9, 0.1, 0.5, 0.0, 0.3])
    assert select_pruned(values, "threshold", 0.2, 0).tolist() == [1, 3]
    assert select_pruned(values, "fraction", 0, 0.4).tolist() == [1, 3]
    model = nn.Sequential(nn.BatchNorm2d(2), nn.BatchNorm2d(3))
    pruned = prune_channels(model, ["0", "1"], [2, 3], torch.tensor([1, 3]), bias=True)
    assert pruned == {"0": [1], "1": [1]}
    assert model[0].weight.tolist() == [1.0, 0.0] and model[1].weight.tolist() == [1.0, 0.0, 1.0]
    assert model[1].bias[1] == 0


def test_ibau_penalty_gives_the_implicit_hypergradient():
    """fit's gradient of CE + penalty equals the explicit fixed-point hypergradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.rand(5, 1, 2, 4), torch.tensor([0, 1, 2, 0, 1])
    cfg = make_defense_config("i-bau", "default", portion=0.4, K=3, fp_lr=0.1, reg=0.01)
    scale = input_scale(model, 1, "cpu")
    hyper = Hypergradient(model, cfg, torch.Generator().manual_seed(0), scale)
    hyper.delta = 0.3 * torch.randn(1, 1, 2, 4)
    xb, _ = hyper.batch_hook(x, y)
    out = model(xb)
    loss = F.cross_entropy(out, y) + hyper.penalty(xb, out, y)
    params = list(model.parameters())
    ours = torch.autograd.grad(loss, params)

    # explicit: grad_theta L_o + (dPhi/dtheta)^T v,  v = sum_k (dPhi/ddelta)^T^k dL_o/ddelta
    d = hyper._d.detach().requires_grad_(True)
    chosen = ((xb - x).abs().flatten(1).sum(1) > 0).float().view(-1, 1, 1, 1)
    l_outer = F.cross_entropy(model(x + chosen * d), y)
    g_d = torch.autograd.grad(l_outer, d, retain_graph=True)[0]
    g_theta = torch.autograd.grad(l_outer, params)
    inner = -F.cross_entropy(model(x + d), y) + 0.01 * d.pow(2).sum()
    mapped = d - 0.1 * torch.autograd.grad(inner, d, create_graph=True)[0]
    v = torch.zeros_like(d)
    for _ in range(3):
        v = torch.autograd.grad(mapped, d, grad_outputs=v, retain_graph=True)[0] + g_d
    mixed = torch.autograd.grad(mapped, params, grad_outputs=v)
    for a, b, c in zip(ours, g_theta, mixed, strict=True):
        assert torch.allclose(a, b + c, atol=1e-6)
    assert any(c.abs().sum() > 0 for c in mixed)


def test_shared_pgd_stays_in_the_linf_ball(cnn):
    cnn.eval()
    ref = create_model("cnn-small", 4, 1, 16).eval()
    cfg = make_defense_config("sau", "default", eps=0.1, pgd_steps=3)
    x, y = torch.rand(6, 1, 16, 16), torch.arange(6) % 4
    pert, clean_ref = shared_pgd(cnn, ref, x, y, cfg, torch.Generator().manual_seed(0))
    assert pert.shape == x.shape and pert.abs().max() <= 0.1 + 1e-7
    assert torch.equal(clean_ref, ref(x).argmax(1))
    assert all(p.grad is None for p in cnn.parameters())


def test_shared_risk():
    y = torch.tensor([0, 1, 2])
    ref_adv = torch.tensor([[0.0, 5.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])  # ref fools only sample 0
    clean_ref = torch.tensor([0, 1, 2])
    logits = torch.zeros(3, 3, requires_grad=True)
    loss = shared_risk(logits, ref_adv, clean_ref, y)
    loss.backward()
    assert loss > 0
    assert logits.grad[1:].abs().sum() == 0  # only the sample that fooled the original model counts
    assert logits.grad[0, 1] > 0  # lowering the original model's adversarial label lowers the loss
    assert shared_risk(torch.zeros(3, 3), torch.eye(3) * 5, clean_ref, y) == 0


def test_presets():
    assert make_defense_config("anp", "paper").iterations == 2000
    anp = make_defense_config("anp")
    assert (anp.anp_eps, anp.anp_steps, anp.anp_alpha, anp.mask_lr, anp.prune_threshold) == (0.4, 1, 0.2, 0.2, 0.2)
    rnp = make_defense_config("rnp", "paper")
    assert (rnp.unlearn_lr, rnp.recover_lr, rnp.alpha, rnp.clean_threshold, rnp.stop_check) == (0.01, 0.2, 0.2, 0.2, "epoch")
    ibau = make_defense_config("i-bau")
    assert (ibau.lr, ibau.n_rounds, ibau.K, ibau.batch_size, ibau.optimizer) == (0.001, 5, 5, 100, "adam")
    sau = make_defense_config("sau", "paper")
    assert (sau.lr, sau.n_rounds, sau.eps, sau.pgd_steps, sau.beta_1, sau.lmd_3) == (1e-4, 100, 0.2, 5, 0.01, 1.0)
    for name, bad in (("anp", {"prune_by": "size"}), ("rnp", {"stop_check": "never"}), ("i-bau", {"portion": 2.0}),
                      ("sau", {"pgd_init": "huge"})):
        with pytest.raises(UserError):
            make_defense_config(name, **bad)


def test_fit_with_adam(synth, cnn):
    x, y = _small(synth, 32)
    w0 = cnn.net.classifier.weight.detach().clone()
    fit(cnn, x, y, TrainConfig(epochs=1, optimizer="adam", lr=1e-3, batch_size=16), progress=False)
    assert not torch.equal(w0, cnn.net.classifier.weight)
    with pytest.raises(ValueError, match="optimizer"):
        fit(cnn, x, y, TrainConfig(epochs=1, optimizer="lbfgs"), progress=False)
