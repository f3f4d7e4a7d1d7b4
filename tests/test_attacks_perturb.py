"""SIG, LC, LF and TrojanNN: trigger budgets, poisoning rules, fitted components that round-trip
through a checkpoint bit for bit. Synthetic data, tiny surrogates: seconds."""

import math

import pytest
import torch

from ulrl.attacks import ATTACKS, FitContext, build_attack
from ulrl.attacks.lf import low_pass_mask
from ulrl.attacks.trojannn import connection_scores
from ulrl.checkpoints import load_checkpoint, save_checkpoint
from ulrl.data import synthetic
from ulrl.errors import UserError
from ulrl.models import create_model

TINY = "surrogate_epochs=1,surrogate_samples=128"
SPECS = {
    "lc": f"lc:pgd_steps=2,{TINY}",
    "lf": f"lf:fit_steps=5,fit_samples=64,fit_batch=32,{TINY}",
    "trojannn": f"trojannn:fit_steps=5,fit_samples=32,{TINY}",
}


def context(data) -> FitContext:
    def make_model():
        return create_model("cnn-small", data.num_classes, data.in_channels, data.image_size)

    return FitContext(make_model=make_model, progress=False, hflip=False, seed=0)


def fitted(name: str, data, **extra) -> object:
    spec = SPECS[name] + "".join(f",{k}={v}" for k, v in extra.items())
    attack = build_attack(spec, num_classes=data.num_classes)
    attack.prepare(data.train_x, data.train_y, context(data))
    return attack


@pytest.fixture(scope="module")
def rgb():
    """A tiny 3x32x32 set, to check attacks on another channel count and size."""
    return synthetic(num_classes=4, n_train=64, n_test=16, channels=3, size=32)


def test_registered_and_specs_round_trip():
    assert {"sig", "lc", "lf", "trojannn"} <= set(ATTACKS)
    for name in ("sig", "lc", "lf", "trojannn"):
        a = build_attack(name, num_classes=10)
        assert build_attack(a.spec()).spec() == a.spec()
        assert "_pattern" not in a.spec() and "_delta" not in a.spec()
    assert ATTACKS["sig"].clean_label and ATTACKS["lc"].clean_label
    assert ATTACKS["lc"].fitted and ATTACKS["lf"].fitted and ATTACKS["trojannn"].fitted


@pytest.mark.parametrize("bad", ["sig:mode=all2all", "lc:mode=all2all", "sig:delta=0", "lc:eps=300",
                                 "lf:cutoff=2", "trojannn:position=middle", "lf:fit_steps=0", "lc:amplitude=0"])
def test_bad_specs_are_user_errors(bad):
    with pytest.raises(UserError):
        build_attack(bad, num_classes=10)


@pytest.mark.parametrize("name", ["lc", "lf", "trojannn"])
def test_unfitted_component_is_a_user_error(name, synth):
    a = build_attack(name, num_classes=4)
    with pytest.raises(UserError, match="prepare"):
        a.apply_trigger(torch.rand(2, 1, 16, 16))
    with pytest.raises(UserError, match="prepare"):
        a.poison_train(synth.train_x, synth.train_y)
    with pytest.raises(UserError, match="ulrl train"):
        a.prepare(synth.train_x, synth.train_y, None)  # no model factory: nothing to fit on
    assert a.state_tensors() == {}


# --- SIG ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 1, 28, 28), (2, 3, 32, 32)])
def test_sig_adds_the_sinusoid_within_its_amplitude(shape):
    a = build_attack("sig:delta=40,f=6,test_delta=0", num_classes=10)  # test signal = training signal
    x = torch.rand(*shape) * 0.5 + 0.25  # away from 0 and 1: no clamping
    out = a.apply_trigger(x)
    assert torch.equal(out, a.apply_trigger(x))
    diff = out - x
    assert diff.abs().max() <= 40 / 255 + 1e-6 and diff.abs().max() > 30 / 255
    w = shape[-1]
    want = torch.tensor([40 / 255 * math.sin(2 * math.pi * j * 6 / w) for j in range(w)])
    assert torch.allclose(diff, want.expand_as(diff), atol=1e-5)  # along columns, same in every row/channel
    assert out.min() >= 0 and out.max() <= 1


def test_sig_test_delta_and_clean_label_poisoning():
    y = torch.arange(100) % 10
    x = torch.full((100, 1, 8, 8), 128, dtype=torch.uint8)
    a = build_attack("sig:rate=0.05,target=3,test_delta=60", num_classes=10)
    px, py, mask = a.poison_train(x, y)
    assert torch.equal(py, y) and mask.sum() == 5 and (y[mask] == 3).all()
    assert torch.equal(px[~mask], x[~mask]) and (px[mask] != x[mask]).any()
    assert (px[mask].float() - 128).abs().max() <= 40 + 0.5  # training uses delta, not test_delta
    assert (a.apply_trigger(x[:1].float() / 255) - 128 / 255).abs().max() > 50 / 255
    default = build_attack("sig", num_classes=10)
    assert (default.apply_trigger(x[:1].float() / 255) - 128 / 255).abs().max() > 45 / 255  # test_delta = 50
    full = build_attack("sig:rate=0.5", num_classes=10).poison_train(x, y)[2]
    assert full.sum() == 10 and (y[full] == 0).all()  # never more than the target class


# --- LC -------------------------------------------------------------------------------------
def test_lc_patch_only_at_test_time_and_bounded_perturbation_in_training(synth, tmp_path):
    a = fitted("lc", synth, target=1, rate=0.1)
    x = torch.full((2, 1, 16, 16), 0.5)
    out = a.apply_trigger(x)
    corners = torch.zeros(16, 16, dtype=torch.bool)
    for r in (slice(0, 3), slice(13, 16)):
        for c in (slice(0, 3), slice(13, 16)):
            corners[r, c] = True
    assert torch.equal(out[:, :, ~corners], x[:, :, ~corners])
    assert set(out[:, :, corners].unique().tolist()) == {0.0, 1.0}  # full-amplitude black/white
    assert torch.equal(out, a.apply_trigger(x))

    px, py, mask = a.poison_train(synth.train_x, synth.train_y)
    assert torch.equal(py, synth.train_y) and (synth.train_y[mask] == 1).all()
    assert mask.sum() == min(round(0.1 * len(synth.train_y)), int((synth.train_y == 1).sum()))
    assert torch.equal(px[~mask], synth.train_x[~mask])
    moved = (px[mask].int() - synth.train_x[mask].int())[:, :, ~corners]
    assert moved.abs().max() <= 16 and moved.abs().max() > 0  # the PGD step, within eps = 16/255

    path = tmp_path / "lc.safetensors"
    model = create_model("cnn-small", 4, 1, 16)
    meta = {"arch": "cnn-small", "num_classes": 4, "in_channels": 1, "image_size": 16, "attack": a.spec()}
    save_checkpoint(path, model, meta, a.state_tensors())
    _, meta2, tensors = load_checkpoint(path)
    b = build_attack(meta2["attack"])
    b.load_state_tensors(tensors)
    for k, v in a.state_tensors().items():
        assert torch.equal(v, b.state_tensors()[k]) and v.dtype == b.state_tensors()[k].dtype
    assert torch.equal(b.apply_trigger(x), out)
    assert torch.equal(b.poison_train(synth.train_x, synth.train_y)[0], px)
    with pytest.raises(UserError, match="another training set"):
        b.poison_train(synth.train_x[:100], synth.train_y[:100])


def test_lc_reduced_amplitude_and_other_image_shapes(rgb):
    a = fitted("lc", rgb, amplitude=0.25)
    px, py, mask = a.poison_train(rgb.train_x, rgb.train_y)
    assert torch.equal(py, rgb.train_y) and (rgb.train_y[mask] == 0).all() and mask.any()
    corner = px[mask][:, :, :3, :3].int() - rgb.train_x[mask][:, :, :3, :3].int()
    assert corner.abs().max() <= round(0.25 * 255) + 16  # reduced trigger + the PGD step
    out = a.apply_trigger(torch.full((1, 3, 32, 32), 0.5))
    assert out.shape == (1, 3, 32, 32) and set(out[0, :, :3, :3].unique().tolist()) == {0.0, 1.0}


# --- LF -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["all2one", "all2all"])
def test_lf_low_frequency_pattern_within_eps_and_label_rule(synth, mode, tmp_path):
    a = fitted("lf", synth, eps=20, cutoff=0.15, mode=mode)
    v = a.state_tensors()["lf.pattern"]
    assert v.shape == (1, 16, 16) and v.abs().max() <= 20 / 255 + 1e-6 and v.abs().max() > 0
    spectrum = torch.fft.fft2(v).abs()
    outside = low_pass_mask(16, 16, 0.15) == 0
    assert spectrum[:, outside].max() < 1e-4 * spectrum.max()  # no high-frequency content

    x = torch.rand(5, 1, 16, 16)
    out = a.apply_trigger(x)
    assert (out - x).abs().max() <= 20 / 255 + 1e-6 and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, a.apply_trigger(x))

    px, py, mask = a.poison_train(synth.train_x, synth.train_y)
    y = synth.train_y
    assert mask.sum() == round(0.1 * len(y)) and torch.equal(py[~mask], y[~mask])
    want = torch.zeros_like(y[mask]) if mode == "all2one" else (y[mask] + 1) % 4
    assert torch.equal(py[mask], want) and (y[mask] != py[mask]).all()

    path = tmp_path / "lf.safetensors"
    meta = {"arch": "cnn-small", "num_classes": 4, "in_channels": 1, "image_size": 16, "attack": a.spec()}
    save_checkpoint(path, create_model("cnn-small", 4, 1, 16), meta, a.state_tensors())
    _, meta2, tensors = load_checkpoint(path)
    b = build_attack(meta2["attack"])
    b.load_state_tensors(tensors)
    assert torch.equal(b.apply_trigger(x), out) and torch.equal(b.state_tensors()["lf.pattern"], v)
    with pytest.raises(UserError, match="fitted on"):
        b.apply_trigger(torch.rand(1, 3, 32, 32))
    with pytest.raises(UserError):
        b.load_state_tensors({"lf.bogus": v})


def test_lf_on_rgb_images(rgb):
    a = fitted("lf", rgb)
    x = torch.rand(2, 3, 32, 32)
    assert (a.apply_trigger(x) - x).abs().max() <= 25 / 255 + 1e-6


# --- TrojanNN -------------------------------------------------------------------------------
def test_trojannn_neurons_trigger_in_mask_and_round_trip(synth, tmp_path):
    a = fitted("trojannn", synth, num_neurons=3)
    state = a.state_tensors()
    mask = state["trojannn.mask"]
    assert mask.shape == (1, 16, 16) and mask.sum() == 16 and mask[0, 12:, 12:].eq(1).all()  # 4x4 bottom-right
    x = torch.rand(4, 1, 16, 16)
    out = a.apply_trigger(x)
    inside = mask[0].bool()
    assert torch.equal(out[:, :, ~inside], x[:, :, ~inside])
    assert torch.equal(out[:, :, inside], state["trojannn.trigger"][:, inside].expand(4, -1, -1))
    assert torch.equal(out, a.apply_trigger(x)) and out.min() >= 0 and out.max() <= 1

    px, py, pmask = a.poison_train(synth.train_x, synth.train_y)
    assert (py[pmask] == 0).all() and (synth.train_y[pmask] != 0).all()
    assert torch.equal(py[~pmask], synth.train_y[~pmask]) and torch.equal(px[~pmask], synth.train_x[~pmask])

    path = tmp_path / "t.safetensors"
    meta = {"arch": "cnn-small", "num_classes": 4, "in_channels": 1, "image_size": 16, "attack": a.spec()}
    save_checkpoint(path, create_model("cnn-small", 4, 1, 16), meta, state)
    _, meta2, tensors = load_checkpoint(path)
    b = build_attack(meta2["attack"])
    b.load_state_tensors(tensors)
    assert torch.equal(b.apply_trigger(x), out)
    assert all(torch.equal(v, b.state_tensors()[k]) for k, v in state.items())
    assert len(state["trojannn.neurons"]) == 3


def test_trojannn_selects_most_connected_hidden_neurons_and_excites_them(synth):
    model = create_model("cnn-small", 4, 1, 16)
    scores = connection_scores(model, "net.classifier")
    assert torch.equal(scores, model.net.hidden[1].weight.abs().sum(1))  # incoming weights of net.hidden
    a = fitted("trojannn", synth, fit_steps=30, neuron_target=20)
    # the fitted trigger drives the chosen neurons above what a random patch does, on a fresh surrogate
    from ulrl.attacks.components import train_surrogate

    surrogate = train_surrogate(synth.train_x, synth.train_y, context(synth), 1, 128)
    acts = {}
    surrogate.net.classifier.register_forward_pre_hook(lambda _m, inp: acts.__setitem__("x", inp[0]))
    x = synth.train_x[:64].float() / 255
    surrogate(a.apply_trigger(x))
    fired = acts["x"][:, a.state_tensors()["trojannn.neurons"]].mean()
    surrogate(x)
    assert fired > acts["x"][:, a.state_tensors()["trojannn.neurons"]].mean()


def test_trojannn_on_rgb_images_and_patch_size(rgb):
    a = fitted("trojannn", rgb, patch_size=5, position="top-left")
    mask = a.state_tensors()["trojannn.mask"]
    assert mask.shape == (1, 32, 32) and mask[0, :5, :5].eq(1).all() and mask.sum() == 25
    x = torch.rand(2, 3, 32, 32)
    out = a.apply_trigger(x)
    assert torch.equal(out[:, :, 5:, :], x[:, :, 5:, :]) and out.shape == x.shape
