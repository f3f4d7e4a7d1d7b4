import json

import pytest
import torch

from ulrl.attacks import build_attack
from ulrl.defenses import make_defense_config, run_defense_fn
from ulrl.defenses.nc import anomaly_indices, make_config, reverse_engineer, stamp, trigger_hook
from ulrl.errors import UserError
from ulrl.models import create_model
from ulrl.pipeline import train_model
from ulrl.train import TrainConfig

TINY = dict(max_steps=3, batches_per_step=1, reverse_batch_size=16, epochs=1, batch_size=64)


def test_anomaly_index_flags_planted_small_norm():
    norms = torch.tensor([50.0, 55.0, 48.0, 60.0, 52.0, 3.0, 58.0, 49.0, 51.0, 57.0])
    flagged, index = anomaly_indices(norms)
    assert flagged == [5]
    assert index[5] > 2 and (index[torch.arange(10) != 5] < 2).all()


def test_anomaly_index_ignores_flat_vectors_and_large_norms():
    flagged, index = anomaly_indices(torch.full((10,), 40.0))
    assert flagged == [] and (index == 0).all()
    assert anomaly_indices(torch.linspace(40.0, 44.0, 10))[0] == []
    # a class needing a much LARGER trigger is not a backdoor target
    assert anomaly_indices(torch.tensor([50.0, 55.0, 48.0, 60.0, 52.0, 300.0, 58.0, 49.0]))[0] == []


def test_anomaly_index_orders_flagged_smallest_first():
    norms = torch.tensor([50.0, 5.0, 48.0, 60.0, 52.0, 2.0, 58.0, 49.0, 51.0, 57.0])
    assert anomaly_indices(norms)[0] == [5, 1]


def test_stamp_and_trigger_hook_keep_labels():
    x = torch.zeros(8, 1, 4, 4)
    mask = torch.zeros(1, 4, 4)
    mask[0, -1, -1] = 1.0
    pattern = torch.ones(1, 1, 4, 4)
    assert stamp(x[0], mask[0], pattern[0])[0, -1, -1] == 1 and stamp(x[0], mask[0], pattern[0]).sum() == 1
    y = torch.arange(8)
    hook = trigger_hook(mask, pattern, 0.25, torch.Generator().manual_seed(0))
    xb, yb = hook(x, y)
    assert torch.equal(yb, y) and x.sum() == 0  # true labels kept, input batch not modified in place
    assert (xb.flatten(1).sum(1) == 1).sum() == 2  # 25% of 8 carry the trigger
    assert hook(x[:1], y[:1])[0].sum() == 0  # round(0.25) = 0 triggered images


def test_config_presets_and_bad_options():
    paper, default = make_config("paper"), make_config()
    assert (paper.max_steps, paper.batches_per_step, paper.early_stop_patience) == (1000, 31, 25)
    for cfg in (paper, default):
        assert (cfg.reverse_lr, cfg.init_cost, cfg.attack_succ_threshold, cfg.anomaly_threshold) == (0.1, 1e-3, 0.99, 2.0)
        assert (cfg.unlearn_ratio, cfg.lr) == (0.2, 0.01)
    with pytest.raises(UserError):
        make_config(unlearn_ratio=1.5)
    with pytest.raises(UserError):
        make_config(nonsense=1)


def test_reverse_engineer_finds_a_successful_small_trigger(synth):
    torch.manual_seed(0)
    model = create_model("cnn-small", 4, 1, 16).eval().requires_grad_(False)
    cfg = make_config(max_steps=4, batches_per_step=2, reverse_batch_size=32)
    tr = reverse_engineer(model, synth.train_x[:64], 2, cfg, torch.Generator().manual_seed(0))
    assert tr.mask.shape == (16, 16) and tr.pattern.shape == (1, 16, 16)
    assert 0 <= tr.mask.min() and tr.mask.max() <= 1 and 0 <= tr.pattern.min() and tr.pattern.max() <= 1
    assert tr.norm == pytest.approx(tr.mask.sum().item())
    assert tr.steps == 4 and len(tr.history) == 4
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("threshold", [2.0, 0.0])  # 0.0 flags the smallest norm: exercises unlearning
def test_nc_end_to_end(synth, threshold):
    torch.manual_seed(0)
    model = create_model("cnn-small", 4, 1, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = synth.train_x[:96], synth.train_y[:96]
    cfg = make_defense_config("nc", "default", anomaly_threshold=threshold, **TINY)
    calls = []

    def monitor(m):
        calls.append(1)
        return {"test_acc": 0.5}

    repaired, report = run_defense_fn("nc", model, x, y, cfg, monitor=monitor, progress=False)
    assert repaired is not model and not repaired.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert len(report.scores) == 4 and len(report.extra["anomaly_indices"]) == 4
    assert set(report.seconds) >= {"reverse", "unlearn", "total"}
    json.dumps(report.to_dict())
    if report.flagged:
        assert threshold == 0.0 or report.extra["anomaly_index"] > threshold
        assert set(report.extra["triggers"]) == {str(c) for c in report.flagged}
        assert len(report.relearn_history) == 1 and report.relearn_history[0]["test_acc"] == 0.5 and calls
        assert any(not torch.equal(v, repaired.state_dict()[k]) for k, v in before.items())
    else:
        assert report.relearn_history == [] and not calls and report.notes
        assert all(torch.equal(v, repaired.state_dict()[k]) for k, v in before.items())
    if threshold == 0.0:  # every class below the median is flagged, smallest norm first
        norms = torch.tensor(report.scores)
        assert report.flagged[0] == int(norms.argmin())
        assert report.flagged == sorted(report.flagged, key=lambda c: report.scores[c])


def test_reversed_mask_of_backdoor_target_is_smallest(synth):
    """A tiny cnn-small trained with a strong 3x3 BadNets patch (target 1): the target needs by far
    the smallest reversed mask (~18 vs >= 50 for the other classes with these settings)."""
    attack = build_attack("badnets:patch_size=3,rate=0.2,target=1", num_classes=4)
    model, _ = train_model(synth, "cnn-small", attack, TrainConfig(epochs=15, lr=0.05, hflip=False, seed=0), progress=False)
    model.eval().requires_grad_(False)
    cfg = make_config(max_steps=25, batches_per_step=2, reverse_batch_size=32)
    gen = torch.Generator().manual_seed(0)
    norms = torch.tensor([reverse_engineer(model, synth.train_x[:128], t, cfg, gen).norm for t in range(4)])
    others = norms[torch.arange(4) != 1]
    assert int(norms.argmin()) == 1 and norms[1] < 0.7 * others.min()
