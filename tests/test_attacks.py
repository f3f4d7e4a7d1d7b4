import pytest
import torch

from ulrl.attacks import ATTACKS, build_attack, parse_attack_spec
from ulrl.errors import UserError


def test_registry_and_spec_parsing():
    assert {"badnets", "blended"} <= set(ATTACKS)
    spec = parse_attack_spec("badnets:patch_size=4,position=top-left,target=2,rate=0.05")
    assert spec == {"name": "badnets", "patch_size": 4, "position": "top-left", "target": 2, "rate": 0.05}
    a = build_attack(spec, num_classes=10)
    assert build_attack(a.spec()).spec() == a.spec()  # round-trips through the sidecar form


@pytest.mark.parametrize("bad", ["nosuch", "badnets:bogus=1", "badnets:patch_size=x", "badnets:target=12",
                                 "blended:alpha=0", "badnets:position=middle", "badnets:mode=some2some"])
def test_bad_specs_are_user_errors(bad):
    with pytest.raises(UserError):
        build_attack(bad, num_classes=10)


def test_badnets_patch_bottom_right():
    x = torch.zeros(2, 1, 8, 8)
    out = build_attack("badnets:patch_size=3").apply_trigger(x)
    assert out[:, :, 5:, 5:].eq(1).all() and out[:, :, :5, :].eq(0).all() and out[:, :, :, :5].eq(0).all()
    checker = build_attack("badnets:patch_size=2,pattern=checkerboard,position=top-left").apply_trigger(x)
    assert checker[0, 0, :2, :2].tolist() == [[1, 0], [0, 1]]


def test_blended_mixes_with_alpha():
    a = build_attack("blended:alpha=0.2,pattern_seed=7")
    x = torch.rand(3, 3, 8, 8)
    out = a.apply_trigger(x)
    pattern = a.blend_pattern(3, 8, 8)
    assert torch.allclose(out, 0.8 * x + 0.2 * pattern)
    assert torch.equal(pattern, build_attack("blended:alpha=0.5,pattern_seed=7").blend_pattern(3, 8, 8))


def test_poison_train_all2one_and_all2all():
    y = torch.arange(100) % 10
    x = torch.zeros(100, 1, 8, 8, dtype=torch.uint8)
    a = build_attack("badnets:rate=0.1,target=0", num_classes=10)
    px, py, mask = a.poison_train(x, y)
    assert mask.sum() == 10 and (y[mask] != 0).all() and (py[mask] == 0).all()
    assert torch.equal(py[~mask], y[~mask]) and (px[mask][:, :, -1, -1] == 255).all()
    assert (px[~mask] == 0).all()
    b = build_attack("badnets:rate=0.2,mode=all2all", num_classes=10)
    _, py, mask = b.poison_train(x, y)
    assert mask.sum() == 20 and torch.equal(py[mask], (y[mask] + 1) % 10)
    assert torch.equal(a.poison_indices(y), a.poison_indices(y))  # seeded


def test_pattern_from_image_file(tmp_path):
    from PIL import Image

    Image.new("RGB", (10, 10), (255, 0, 0)).save(tmp_path / "red.png")
    a = build_attack(f"badnets:patch_size=2,pattern={tmp_path / 'red.png'}")
    out = a.apply_trigger(torch.zeros(1, 3, 6, 6))
    assert out[0, :, -1, -1].tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(UserError):
        build_attack(f"blended:pattern={tmp_path / 'missing.png'}").apply_trigger(torch.zeros(1, 3, 6, 6))
