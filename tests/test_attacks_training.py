"""Training-time-controlled attacks: WaNet, Input-aware, BPP, Blind (synthetic data, tiny models)."""

import pytest
import torch
import torch.nn.functional as F

from ulrl.attacks import ATTACKS, build_attack
from ulrl.attacks.bpp import quantize
from ulrl.checkpoints import load_checkpoint, save_checkpoint
from ulrl.errors import UserError
from ulrl.models import create_model
from ulrl.pipeline import train_model
from ulrl.train import TrainConfig, fit

# tiny fit costs so that every test takes a fraction of a second
SPECS = {
    "wanet": "wanet",
    "input-aware": "input-aware:width=4,mask_steps=3,mask_batch=8",
    "bpp": "bpp",
    "blind": "blind",
}
FITTED = ("wanet", "input-aware")


def _smooth(n: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth float images in [0.1, 0.9] (a warp of a smooth image changes it little)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, c, 4, 4, generator=g)
    return 0.1 + 0.8 * F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _spec(name: str, **kw) -> str:
    """The test spec of ``name`` with ``kw`` added (``_spec("wanet", k=5)`` -> ``"wanet:k=5"``)."""
    extra = ",".join(f"{k}={v}" for k, v in kw.items())
    if not extra:
        return SPECS[name]
    return SPECS[name] + ("," if ":" in SPECS[name] else ":") + extra


def _prepared(name: str, x: torch.Tensor | None = None, **kw):
    a = build_attack(_spec(name, **kw), num_classes=4)
    if x is None:
        x = (_smooth(16, 1, 16) * 255).round().to(torch.uint8)
    a.prepare(x, torch.arange(len(x)) % 4)
    return a


def test_registered_with_round_tripping_specs():
    assert {"wanet", "input-aware", "bpp", "blind"} <= set(ATTACKS)
    for name in SPECS:
        a = build_attack(SPECS[name], num_classes=4)
        assert build_attack(a.spec()).spec() == a.spec()
        assert ATTACKS[name].fitted == (name in FITTED)


@pytest.mark.parametrize("bad", ["wanet:k=1", "wanet:s=0", "wanet:rate=0.5,cross_ratio=2", "bpp:squeeze_num=1",
                                 "bpp:rate=0.9,neg_ratio=0.2", "input-aware:rate=0.6,cross_ratio=0.5",
                                 "input-aware:mask_density=0", "blind:top=-1"])
def test_bad_specs_are_user_errors(bad):
    with pytest.raises(UserError):
        build_attack(bad, num_classes=10)


@pytest.mark.parametrize("name", FITTED)
def test_unfitted_trigger_says_to_prepare(name):
    with pytest.raises(UserError, match="ulrl train"):
        build_attack(SPECS[name], num_classes=4).apply_trigger(torch.rand(2, 1, 16, 16))


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 16, 16)])
def test_trigger_is_deterministic_float_in_range(name, shape):
    x = _smooth(3, shape[0], shape[1])
    a = _prepared(name, (x * 255).round().to(torch.uint8))
    out = a.apply_trigger(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, a.apply_trigger(x))
    assert not torch.equal(out, x)
    assert a.trigger_uint8((x * 255).round().to(torch.uint8)).dtype == torch.uint8


@pytest.mark.parametrize("name", list(SPECS))
def test_data_stays_clean_poisoning_is_per_batch(name):
    x = torch.randint(0, 256, (20, 1, 16, 16), dtype=torch.uint8)
    y = torch.arange(20) % 4
    px, py, mask = _prepared(name).poison_train(x, y)
    assert torch.equal(px, x) and torch.equal(py, y) and not mask.any()


# --- WaNet -----------------------------------------------------------------------------------
def test_wanet_warp_is_small_and_smooth():
    a = _prepared("wanet")
    grid = a.sampling_grid(28, 28)[0]
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    shift_px = (grid - torch.stack((xs, ys), 2)).abs() * 27 / 2  # normalised -> pixels
    assert 0.05 < shift_px.mean() < 0.5 and shift_px.max() < 1.5  # sub-pixel warp (s = 0.5)
    x = _smooth(4, 1, 28)
    diff = (a.apply_trigger(x) - x).abs()
    assert 0 < diff.mean() < 0.02 and diff.max() < 0.15
    assert a.state_tensors()["grid"].abs().mean().item() == pytest.approx(1.0)
    b = _prepared("wanet", seed=1)
    assert not torch.equal(a.state_tensors()["grid"], b.state_tensors()["grid"])  # seeded


@pytest.mark.parametrize("mode", ["all2one", "all2all"])
def test_wanet_hook_poisons_rate_and_keeps_noise_sample_labels(mode):
    a = _prepared("wanet", mode=mode, rate=0.1, cross_ratio=2)
    hook, step = a.training_hooks(torch.nn.Identity())
    assert step is None
    x, y = _smooth(100, 1, 16), torch.arange(100) % 4
    hx, hy = hook(x, y)
    assert torch.equal(hy[:10], a.target_labels(y[:10])) and torch.equal(hy[10:], y[10:])
    assert torch.allclose(hx[:10], a.apply_trigger(x[:10]))  # backdoor samples: the exact warp
    assert not torch.allclose(hx[10:30], a.apply_trigger(x[10:30]))  # noise samples: warp + noise
    assert (hx[10:30] - x[10:30]).abs().flatten(1).amax(1).gt(0).all()
    assert torch.equal(hx[30:], x[30:])


# --- BPP -------------------------------------------------------------------------------------
def _sequential_floyd_steinberg(img: torch.Tensor, levels: int) -> torch.Tensor:
    """Reference: the textbook pixel-by-pixel scan, on one (C, H, W) image."""
    img = img.double().clone()
    _, h, w = img.shape
    q = levels - 1
    for i in range(h):
        for j in range(w):
            old = img[:, i, j].clone()
            new = (old * q).round().clamp(0, q) / q
            err = old - new
            img[:, i, j] = new
            for di, dj, wt in ((0, 1, 7 / 16), (1, -1, 3 / 16), (1, 0, 5 / 16), (1, 1, 1 / 16)):
                if i + di < h and 0 <= j + dj < w:
                    img[:, i + di, j + dj] += err * wt
    return img.float()


def test_bpp_output_takes_only_squeeze_levels():
    x = torch.rand(3, 3, 32, 32)
    for levels in (8, 4):
        for dithering in (True, False):
            out = build_attack(f"bpp:squeeze_num={levels},dithering={dithering}").apply_trigger(x)
            k = out * (levels - 1)
            assert torch.equal(k, k.round()) and k.min() >= 0 and k.max() <= levels - 1
    plain = build_attack("bpp:squeeze_num=8,dithering=false").apply_trigger(x)
    assert torch.equal(plain, (x * 7).round() / 7)
    assert (plain - x).abs().max() <= 0.5 / 7 + 1e-6
    dithered = build_attack("bpp:squeeze_num=8").apply_trigger(x)
    assert (dithered - x).abs().max() > 0.5 / 7  # error diffusion moves values further...
    assert (F.avg_pool2d(dithered - x, 4)).abs().mean() < (F.avg_pool2d(plain - x, 4)).abs().mean()  # ...keeping local means


def test_bpp_dithering_matches_the_sequential_scan():
    x = torch.rand(2, 2, 7, 9)
    out = quantize(x, 8)
    for i in range(2):
        assert torch.allclose(out[i], _sequential_floyd_steinberg(x[i], 8), atol=1e-6)
    # error diffusion keeps the local mean: a flat grey that is not a level becomes a mix of two levels
    flat = quantize(torch.full((1, 1, 16, 16), 0.5), 8)
    assert set((flat * 7).round().unique().tolist()) == {3.0, 4.0}
    assert flat.mean().item() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("mode", ["all2one", "all2all"])
def test_bpp_hook_poisons_rate_and_keeps_negative_labels(mode):
    a = build_attack(f"bpp:rate=0.1,neg_ratio=0.2,mode={mode}", num_classes=4)
    hook, step = a.training_hooks(torch.nn.Identity())
    assert step is None
    x, y = torch.rand(100, 1, 16, 16), torch.arange(100) % 4
    hx, hy = hook(x, y)
    assert torch.equal(hy[:10], a.target_labels(y[:10])) and torch.equal(hy[10:], y[10:])
    assert torch.equal(hx[:10], (a.apply_trigger(x[:10]) * 255).round() / 255)  # as trigger_uint8 saves it
    neg = hx[10:30] - x[10:30]  # clean image + another image's quantisation residual
    assert neg.abs().flatten(1).amax(1).gt(0).all() and neg.abs().max() < 0.6
    assert not torch.equal(hx[10:30], a.apply_trigger(x[10:30]))
    assert torch.equal(hx[30:], x[30:])


# --- Input-aware -----------------------------------------------------------------------------
def test_input_aware_change_is_confined_to_the_mask():
    x = torch.rand(6, 3, 32, 32)
    a = _prepared("input-aware", (x * 255).round().to(torch.uint8))
    pattern, mask = a.trigger_parts(x)
    assert mask.shape == (6, 1, 32, 32) and pattern.shape == x.shape
    assert mask.min() >= 0 and mask.max() <= 1
    out = a.apply_trigger(x)
    assert torch.allclose(out, x + mask * (pattern - x), atol=1e-6)
    assert ((out - x).abs() <= mask * (pattern - x).abs() + 1e-6).all()
    assert torch.allclose(out[mask.expand_as(x) < 1e-4], x[mask.expand_as(x) < 1e-4], atol=1e-4)
    assert not torch.equal(pattern[0], pattern[1])  # input-aware: each image its own pattern
    with pytest.raises(UserError, match="channels"):
        a.apply_trigger(torch.rand(1, 1, 32, 32))


def test_input_aware_mask_pretraining_lowers_the_mask_norm():
    x = (_smooth(64, 1, 16) * 255).round().to(torch.uint8)
    before = _prepared("input-aware", x, mask_steps=0)
    after = _prepared("input-aware", x, mask_steps=40, mask_batch=16)
    xf = x.float() / 255
    assert after.trigger_parts(xf)[1].mean() < before.trigger_parts(xf)[1].mean()
    assert after.trigger_parts(xf)[1].mean() < 0.2


@pytest.mark.parametrize("mode", ["all2one", "all2all"])
def test_input_aware_hook_poisons_rate_keeps_cross_labels_and_trains_the_generator(mode):
    x = torch.rand(50, 1, 16, 16)
    a = _prepared("input-aware", (x * 255).round().to(torch.uint8), mode=mode, rate=0.1, cross_ratio=0.1)
    hook, step = a.training_hooks(torch.nn.Identity())
    y = torch.arange(50) % 4
    hx, hy = hook(x, y)
    assert torch.equal(hy[:5], a.target_labels(y[:5])) and torch.equal(hy[5:], y[5:])
    assert torch.equal(hx[10:], x[10:])
    assert hx.requires_grad  # the classifier's loss reaches the pattern generator
    pattern_net = a._pattern_net
    assert all(p.grad is not None for p in pattern_net.parameters())  # diversity loss back-propagated
    assert all(p.grad is None for p in a._mask_net.parameters())  # the mask generator is frozen
    before = [p.detach().clone() for p in pattern_net.parameters()]
    hx.sum().backward()
    step()
    assert any(not torch.equal(b, p) for b, p in zip(before, pattern_net.parameters(), strict=True))
    assert all(p.grad is None for p in pattern_net.parameters())
    # cross samples carry a trigger generated from another image: not their own trigger
    a._pattern_net.eval()
    assert not torch.allclose(hx[5:10].detach(), a.apply_trigger(x[5:10]), atol=1e-4)


# --- Blind -----------------------------------------------------------------------------------
def test_blind_pattern_is_the_backdoors101_patch():
    a = build_attack("blind")
    x = torch.full((2, 3, 32, 32), 0.5)
    out = a.apply_trigger(x)
    changed = (out != x).any(1)[0].nonzero()
    assert changed[:, 0].min() == 3 and changed[:, 0].max() == 7  # rows 3-7
    assert changed[:, 1].min() == 23 and changed[:, 1].max() == 25  # columns 23-25 of 32
    assert out[0, :, 3, 23].tolist() == [1, 1, 1] and out[0, :, 3, 24].tolist() == [0, 0, 0]
    assert out[0, :, 4, 23].tolist() == [0.5] * 3  # transparent pixel
    assert (out != x).any(1)[0].sum() == 9
    with pytest.raises(UserError, match="does not fit"):
        a.apply_trigger(torch.rand(1, 1, 6, 6))


@pytest.mark.parametrize("mode", ["all2one", "all2all"])
def test_blind_hook_appends_triggered_copies(mode):
    a = build_attack(f"blind:rate=0.25,mode={mode}", num_classes=4)
    hook, step = a.training_hooks(torch.nn.Identity())
    assert step is None
    x, y = torch.rand(40, 1, 16, 16), torch.arange(40) % 4
    hx, hy = hook(x, y)
    assert len(hy) == 50 and torch.equal(hx[:40], x) and torch.equal(hy[:40], y)
    assert torch.equal(hx[40:], a.apply_trigger(x[:10])) and torch.equal(hy[40:], a.target_labels(y[:10]))


# --- training and checkpoints ----------------------------------------------------------------
def test_expected_fraction_over_many_batches():
    a = build_attack("wanet:rate=0.1,cross_ratio=0", num_classes=4)
    a.prepare(torch.empty(0), torch.empty(0))
    hook, _ = a.training_hooks(torch.nn.Identity())
    x, y = torch.rand(37, 1, 8, 8), torch.ones(37, dtype=torch.long)
    changed = sum(int((hook(x, y)[1] == 0).sum()) for _ in range(200))
    assert changed / (200 * 37) == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("name", list(SPECS))
def test_fit_runs_with_the_hooks(name, synth):
    a = build_attack(_spec(name, rate=0.2), num_classes=4)
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.01, hflip=False, seed=0)
    model, meta = train_model(synth, "cnn-small", a, cfg, progress=False)
    assert meta["poisoned_samples"] == 0 and len(meta["train_history"]) == 1
    assert set(meta["test_metrics"]) == {"acc", "asr", "ra"}
    # the hooks are plain fit() arguments too
    torch.manual_seed(0)
    m = create_model("cnn-small", 4, 1, 16)
    hook, step = a.training_hooks(m)
    hist = fit(m, synth.train_x[:64], synth.train_y[:64], cfg, batch_hook=hook, step_hook=step, progress=False)
    assert torch.isfinite(torch.tensor(hist.epochs[0]["loss"]))


@pytest.mark.parametrize("name", FITTED)
def test_fitted_component_round_trips_through_a_checkpoint(name, synth, tmp_path):
    a = build_attack(SPECS[name], num_classes=4)
    cfg = TrainConfig(epochs=1, batch_size=64, hflip=False, seed=0)
    model, meta = train_model(synth, "cnn-small", a, cfg, progress=False)
    path = save_checkpoint(tmp_path / "m.safetensors", model, meta, a.state_tensors())
    _, meta2, tensors = load_checkpoint(path)
    b = build_attack(meta2["attack"])
    assert b.spec() == a.spec()
    with pytest.raises(UserError):
        b.apply_trigger(synth.test_x[:2].float() / 255)
    b.load_state_tensors(tensors)
    x = synth.test_x.float() / 255
    assert torch.equal(a.apply_trigger(x), b.apply_trigger(x))
    assert torch.equal(a.trigger_uint8(synth.test_x), b.trigger_uint8(synth.test_x))
    assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in a.state_tensors().items()}


@pytest.mark.parametrize("name", FITTED)
def test_mismatched_component_is_a_user_error(name):
    a = _prepared(name)
    tensors = a.state_tensors()
    other = build_attack(_spec(name, k=5) if name == "wanet" else _spec(name, width=5))
    with pytest.raises(UserError, match="re-train"):
        other.load_state_tensors(tensors)
    with pytest.raises(UserError):
        build_attack(SPECS[name]).load_state_tensors({})


def test_static_attacks_refuse_a_component():
    for name in ("bpp", "blind"):
        assert build_attack(name).state_tensors() == {}
        with pytest.raises(UserError):
            build_attack(name).load_state_tensors({"x": torch.zeros(1)})
