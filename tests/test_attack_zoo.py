"""One contract for every attack of the zoo (attack-specific budgets are tested in test_attacks_*.py)."""

import pytest
import torch

from ulrl.attacks import ATTACKS, build_attack
from ulrl.cli import main
from ulrl.errors import UserError

ZOO = ["adaptive-blend", "badnets", "blended", "blind", "bpp", "ftrojan", "input-aware", "lc", "lf", "lira", "sig",
       "ssba", "trojannn", "wanet"]


def test_every_attack_is_registered_and_listed(capsys):
    assert sorted(ATTACKS) == ZOO
    assert main(["attacks"]) == 0
    assert capsys.readouterr().out.split() == ZOO


@pytest.mark.parametrize("name", ZOO)
def test_spec_round_trips_through_the_sidecar_form(name):
    a = build_attack(f"{name}:target=3,seed=5", num_classes=10)
    assert a.target == 3 and a.name == name
    assert build_attack(a.spec(), num_classes=10).spec() == a.spec()
    with pytest.raises(UserError):
        build_attack(f"{name}:no_such_parameter=1", num_classes=10)


@pytest.mark.parametrize("name", ZOO)
def test_trigger_is_deterministic_and_in_range_or_asks_for_fitting(name):
    a = build_attack(name, num_classes=4)
    x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    if a.fitted:
        with pytest.raises(UserError):  # the component must come from prepare() or a checkpoint
            a.apply_trigger(x)
        return
    out = a.apply_trigger(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, a.apply_trigger(x)) and not torch.equal(out, x)
    assert torch.equal(x, torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0)))  # input untouched


@pytest.mark.parametrize("name", [n for n in ZOO if ATTACKS[n].clean_label and not ATTACKS[n].fitted])
def test_clean_label_attacks_keep_every_label(name):  # fitted ones (LC): in their own test file
    y = torch.arange(80) % 4
    x = torch.randint(0, 256, (80, 1, 16, 16), dtype=torch.uint8)
    a = build_attack(f"{name}:rate=0.1,target=2", num_classes=4)
    _, py, mask = a.poison_train(x, y)
    assert torch.equal(py, y) and (y[mask] == 2).all()
