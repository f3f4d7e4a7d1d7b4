"""Invisible-trigger attacks: SSBA, LIRA, FTrojan, Adaptive-Blend (synthetic data, tiny fits)."""

import math

import pytest
import torch

from ulrl.attacks import ATTACKS, FitContext, build_attack
from ulrl.attacks.ftrojan import block_dct, block_idct, dct_matrix
from ulrl.checkpoints import load_checkpoint, save_checkpoint
from ulrl.errors import UserError
from ulrl.models import create_model

TINY = {
    "ssba": "ssba:fit_steps=4,fit_batch=8,fit_samples=64,width=4",
    "lira": "lira:fit_samples=64,fit_epochs=1,surrogate_epochs=1,width=4",
    "ftrojan": "ftrojan",
    "adaptive-blend": "adaptive-blend",
}
FITTED = ("ssba", "lira")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a - b).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def budget_ok(attack, x: torch.Tensor, out: torch.Tensor) -> None:
    """Every attack's own invisibility budget."""
    diff = (out - x).abs().max().item()
    assert diff > 0, "the trigger must change the image"
    if attack.name in ("ssba", "lira"):
        assert diff <= attack.eps + 1e-6
    if attack.name == "ftrojan":
        assert diff <= attack.linf_bound(*x.shape[1:]) + 1e-6
        assert psnr(out, x) >= attack.psnr_bound(*x.shape[1:]) - 1e-3  # float32 rounding
    if attack.name == "adaptive-blend":
        assert diff <= attack.test_alpha + 1e-6
    if attack.name == "ssba":
        assert psnr(out, x) >= 26  # |residual| <= 0.05 alone guarantees 26 dB


def ctx_for(channels: int, size: int, classes: int = 4) -> FitContext:
    return FitContext(make_model=lambda: create_model("cnn-small", classes, channels, size), progress=False,
                      hflip=False, seed=0)


def fitted_attack(name: str, channels: int = 1, size: int = 16, **kw):
    spec = TINY[name] + "".join(f",{k}={v}" for k, v in kw.items())
    a = build_attack(spec, num_classes=4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, channels, size, size), dtype=torch.uint8, generator=gen)
    y = torch.arange(64) % 4
    if a.fitted:
        a.prepare(x, y, ctx_for(channels, size))
    return a


@pytest.fixture(scope="module")
def fitted_gray():
    """Each attack prepared once on 1x16x16 data (the synthetic dataset's shape)."""
    torch.manual_seed(0)
    return {name: fitted_attack(name) for name in TINY}


def test_registered_and_flags():
    assert {"ssba", "lira", "ftrojan", "adaptive-blend"} <= set(ATTACKS)
    assert ATTACKS["ssba"].fitted and ATTACKS["lira"].fitted
    assert not ATTACKS["ftrojan"].fitted and not ATTACKS["adaptive-blend"].fitted
    for name in TINY:
        a = build_attack(TINY[name], num_classes=10)
        assert build_attack(a.spec()).spec() == a.spec()
        assert a.__doc__ and ATTACKS[name].__doc__


@pytest.mark.parametrize("name", FITTED)
def test_unfitted_trigger_is_user_error(name):
    a = build_attack(name, num_classes=10)
    with pytest.raises(UserError, match="prepare|ulrl train"):
        a.apply_trigger(torch.rand(2, 1, 16, 16))
    with pytest.raises(UserError):
        a.load_state_tensors({})


def test_lira_without_model_factory_is_user_error():
    with pytest.raises(UserError, match="ulrl train"):
        build_attack(TINY["lira"]).prepare(torch.zeros(8, 1, 16, 16, dtype=torch.uint8), torch.zeros(8, dtype=torch.long))


@pytest.mark.parametrize("name", list(TINY))
def test_trigger_within_budget_and_deterministic_gray(name, fitted_gray):
    a = fitted_gray[name]
    x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
    out = a.apply_trigger(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, a.apply_trigger(x))
    budget_ok(a, x, out)


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("shape", [(1, 28), (3, 32)])
def test_trigger_any_channels_and_size(name, shape):
    channels, size = shape
    a = fitted_attack(name, channels, size)
    x = torch.rand(4, channels, size, size, generator=torch.Generator().manual_seed(2)) * 0.8 + 0.1
    out = a.apply_trigger(x)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    budget_ok(a, x, out)
    assert torch.equal(out, a.apply_trigger(x))


@pytest.mark.parametrize("name", list(TINY))
def test_poisoned_labels_follow_target(name, fitted_gray):
    a = fitted_gray[name]
    y = torch.arange(80) % 4
    x = torch.randint(0, 256, (80, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    a.target, a.rate = 2, 0.25
    try:
        px, py, mask = a.poison_train(x, y)
        payload = a.poison_indices(y)
        assert len(payload) == 20 and (y[payload] != 2).all() and (py[payload] == 2).all()
        others = torch.ones(80, dtype=torch.bool)
        others[payload] = False
        assert torch.equal(py[others], y[others])
        assert (px[payload] != x[payload]).any()
        a.mode = "all2all"
        _, py, mask = a.poison_train(x, y)
        payload = a.poison_indices(y)
        assert torch.equal(py[payload], (y[payload] + 1) % 4)
    finally:
        a.target, a.rate, a.mode = 0, build_attack(TINY[name]).rate, "all2one"


@pytest.mark.parametrize("name", FITTED)
def test_fitted_component_round_trips_through_checkpoint(name, fitted_gray, tmp_path):
    a = fitted_gray[name]
    model = create_model("cnn-small", 4, 1, 16)
    meta = {"arch": "cnn-small", "num_classes": 4, "in_channels": 1, "image_size": 16, "attack": a.spec()}
    path = save_checkpoint(tmp_path / "m.safetensors", model, meta, a.state_tensors())
    _, meta2, tensors = load_checkpoint(path)
    b = build_attack(meta2["attack"])
    with pytest.raises(UserError):
        b.apply_trigger(torch.rand(1, 1, 16, 16))
    b.load_state_tensors(tensors)
    x = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.apply_trigger(x), b.apply_trigger(x))
    assert all(torch.equal(v, b.state_tensors()[k]) for k, v in a.state_tensors().items())
    with pytest.raises(UserError):  # a component fitted on 1-channel images does not trigger RGB ones
        b.apply_trigger(torch.rand(1, 3, 16, 16))
    with pytest.raises(UserError):  # a spec that does not match the saved component
        build_attack({**meta2["attack"], "width": 8}).load_state_tensors(tensors)


def test_lira_stage1_on_synthetic_data(synth):
    """A slightly longer stage 1 on the synthetic set: a bounded, non-trivial perturbation."""
    torch.manual_seed(0)
    a = build_attack("lira:fit_samples=256,fit_epochs=3,surrogate_epochs=1,width=4,eps=0.1,target=1", num_classes=4)
    a.prepare(synth.train_x, synth.train_y, ctx_for(1, 16))
    x = synth.test_x.float() / 255
    delta = a.apply_trigger(x) - x
    assert delta.abs().max() <= 0.1 + 1e-6 and delta.abs().mean() > 0.005


def test_ssba_decoder_learns_the_code():
    """A short fit already carries bits: the residual depends on the code."""
    a = fitted_attack("ssba")
    x = torch.rand(3, 1, 16, 16)
    enc, code = a._fitted()
    with torch.no_grad():
        r1 = enc(x, code.expand(3, -1))
        r2 = enc(x, (1 - code).expand(3, -1))
    assert not torch.equal(r1, r2)
    assert torch.equal(code, a.attacker_code()) and code.numel() == a.code_bits


def test_dct_matrix_orthonormal_and_blockwise_round_trip():
    d = dct_matrix(8)
    assert torch.allclose(d @ d.T, torch.eye(8, dtype=d.dtype), atol=1e-12)
    x = torch.rand(2, 3, 20, 24, dtype=torch.float64)
    c = block_dct(x, 8)
    assert c.shape == (2, 3, 2, 3, 8, 8)
    assert torch.allclose(block_idct(c, x), x, atol=1e-12)
    const = torch.full((1, 1, 8, 8), 0.5, dtype=torch.float64)  # DC only
    cc = block_dct(const, 8)[0, 0, 0, 0]
    assert math.isclose(cc[0, 0].item(), 4.0, abs_tol=1e-12) and cc.flatten()[1:].abs().max() < 1e-12


def test_ftrojan_adds_magnitude_at_the_paper_positions():
    a = build_attack("ftrojan")
    assert a.geometry(32, 32) == (32, [15, 31])  # the paper's CIFAR-10 setting
    assert a.geometry(28, 28) == (28, [13, 27])
    assert a.psnr_bound(1, 28, 28) > 38.5 and a.psnr_bound(3, 32, 32) > 36.4
    assert a.linf_bound(1, 28, 28) < 8.6 / 255 and a.linf_bound(3, 32, 32) < 13.3 / 255
    paper = build_attack("ftrojan:magnitude=30")
    assert paper.psnr_bound(1, 28, 28) > 44.5 and paper.linf_bound(1, 28, 28) < 4.3 / 255
    x = torch.full((1, 1, 28, 28), 0.5, dtype=torch.float64)  # mid-grey: no clamping
    out = a.apply_trigger(x)
    delta = block_dct((out - x) * 255, 28)[0, 0, 0, 0]
    assert math.isclose(delta[13, 13].item(), 60, abs_tol=1e-9) and math.isclose(delta[27, 27].item(), 60, abs_tol=1e-9)
    delta[13, 13] = delta[27, 27] = 0
    assert delta.abs().max() < 1e-9
    rgb = torch.full((1, 3, 32, 32), 0.5, dtype=torch.float64)
    from ulrl.attacks.ftrojan import rgb_to_ycrcb

    yuv = block_dct(rgb_to_ycrcb(a.apply_trigger(rgb) * 255) - rgb_to_ycrcb(rgb * 255), 32)[0, :, 0, 0]
    assert yuv[0].abs().max() < 1e-9  # luma untouched
    assert torch.allclose(yuv[1:, 15, 15], torch.full((2,), 60.0, dtype=torch.float64))
    with pytest.raises(UserError):
        build_attack("ftrojan:window=40").apply_trigger(torch.rand(1, 1, 28, 28))
    with pytest.raises(UserError):
        build_attack("ftrojan:magnitude=0")


def test_ftrojan_uint8_trigger_survives_rounding():
    a = build_attack("ftrojan")
    x = torch.full((2, 1, 28, 28), 128, dtype=torch.uint8)
    t = a.trigger_uint8(x)
    assert (t != x).float().mean() > 0.5 and (t.int() - x.int()).abs().max() <= 9


def test_adaptive_blend_payload_cover_and_partial_trigger():
    a = build_attack("adaptive-blend:rate=0.1,cover_rate=0.1,target=0", num_classes=10)
    y = torch.arange(1000) % 10
    x = torch.full((1000, 1, 28, 28), 100, dtype=torch.uint8)
    px, py, mask = a.poison_train(x, y)
    payload, cover = a.poison_indices(y), a.cover_indices(y)
    assert len(payload) == 100 and len(cover) == 100
    assert not set(payload.tolist()) & set(cover.tolist())
    assert (py[payload] == 0).all() and torch.equal(py[cover], y[cover])
    assert mask.sum() == 200 and mask[payload].all() and mask[cover].all()
    assert torch.equal(px[~mask], x[~mask]) and torch.equal(py[~mask], y[~mask])
    # half of the 16 pieces (7x7 tiles on 28x28) carry the trigger in each poisoned image
    changed = (px[mask] != x[mask]).view(200, 4, 7, 4, 7).any(4).any(2)  # (n, 4, 4) tiles touched
    assert (changed.sum((1, 2)) == 8).all()
    assert not all(torch.equal(changed[0], c) for c in changed[1:])  # a fresh subset per image
    # training alpha 0.15 on a partial trigger, test alpha 0.2 on the whole image
    pattern = a.blend_pattern(1, 28, 28)
    full = a.apply_trigger(x[:1].float() / 255)
    assert torch.allclose(full, 0.8 * x[:1].float() / 255 + 0.2 * pattern)
    tile = px[mask.nonzero()[0, 0], 0].float() / 255  # the first poisoned image, changed[0]
    on = changed[0].repeat_interleave(7, 0).repeat_interleave(7, 1)
    expect = (0.85 * x[0, 0].float() / 255 + 0.15 * pattern[0])
    assert torch.allclose(tile[on], expect[on], atol=0.5 / 255 + 1e-6)
    assert torch.equal(a.poison_train(x, y)[0], px)  # seeded
    for bad in ("pieces=15", "alpha=0", "test_alpha=1.5", "mask_rate=1", "cover_rate=0.99"):
        with pytest.raises(UserError):
            build_attack(f"adaptive-blend:{bad}")
