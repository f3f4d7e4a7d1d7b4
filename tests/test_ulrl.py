import math

import pytest
import torch
from torch import nn

import ulrl
from ulrl.defenses.ulrl import cosine_penalty, make_config, reinitialise, with_distillation
from ulrl.detection.weight_change import mad_outliers, neuron_scores
from ulrl.errors import UserError


def test_mad_flags_planted_outlier():
    scores = torch.tensor([1.0, 1.1, 0.9, 1.05, 0.95, 1.02, 0.98, 9.0, 1.01, 0.97])
    flagged, z = mad_outliers(scores, threshold=3.5, cap=2)
    assert flagged == [7]
    assert z[7] > 3.5 and (z[torch.arange(10) != 7] < 3.5).all()


def test_mad_flags_nothing_in_flat_vector():
    flagged, z = mad_outliers(torch.full((10,), 2.5))
    assert flagged == [] and (z == 0).all()
    flagged, _ = mad_outliers(torch.linspace(1.0, 1.1, 10))
    assert flagged == []


def test_mad_ignores_low_outliers_and_caps_by_score():
    scores = torch.tensor([1.0, 1.1, 0.9, 1.05, 0.95, 1.02, -20.0, 8.0, 12.0, 10.0])
    flagged, _ = mad_outliers(scores, cap=2)
    assert flagged == [8, 9]  # highest first, capped at 2, the low outlier (index 6) ignored


def test_neuron_scores_sum_abs_change_per_row():
    before = torch.zeros(3, 4)
    after = torch.tensor([[1.0, -1.0, 0, 0], [0, 0, 0, 0], [0.5, 0.5, 0.5, -0.5]])
    assert neuron_scores(before, after).tolist() == [2.0, 0.0, 2.0]


def test_reinitialise_touches_only_flagged_rows():
    torch.manual_seed(0)
    layer = nn.Linear(50, 6)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    reinitialise(layer, [1, 4], torch.Generator().manual_seed(0))
    changed = (layer.weight != w0).any(1)
    assert changed.tolist() == [False, True, False, False, True, False]
    assert torch.equal(layer.bias[[0, 2, 3, 5]], b0[[0, 2, 3, 5]])
    assert layer.bias[1] == 0 and layer.bias[4] == 0
    bound = math.sqrt(2.0 / 50)
    assert layer.weight[[1, 4]].abs().max() <= bound


def test_cosine_penalty_gradient_pushes_row_away():
    torch.manual_seed(0)
    layer = nn.Linear(8, 3)
    w_orig = layer.weight.detach().clone()
    with torch.no_grad():  # start the relearned row close to its original direction
        layer.weight[2] = w_orig[2] + 0.1 * torch.randn(8)
    pen = cosine_penalty(layer, w_orig, [2], alpha=1.0)
    cos_before = torch.cosine_similarity(layer.weight[2], w_orig[2], dim=0).item()
    pen().backward()
    assert layer.weight.grad[[0, 1]].abs().sum() == 0  # only the flagged row gets a gradient
    with torch.no_grad():
        layer.weight -= 0.5 * layer.weight.grad
    cos_after = torch.cosine_similarity(layer.weight[2], w_orig[2], dim=0).item()
    assert cos_after < cos_before


def test_config_presets_and_bad_option():
    paper = make_config("paper")
    assert (paper.unlearn_lr, paper.relearn_lr, paper.alpha, paper.clean_threshold) == (0.01, 0.005, 0.7, 0.2)
    assert (paper.mad_threshold, paper.max_neurons, paper.grad_clip, paper.relearn_epochs) == (3.5, 2, 20.0, 20)
    assert paper.detect == "unlearning" and make_config("default").detect == "scan"
    with pytest.raises(UserError):
        make_config("default", nonsense=1)
    with pytest.raises(UserError):
        make_config("nope")


def test_purify_end_to_end_on_tiny_model(synth, tiny):
    model = ulrl.create_model("cnn-small", synth.num_classes, synth.in_channels, synth.image_size)
    ulrl.fit(model, synth.train_x, synth.train_y, ulrl.TrainConfig(epochs=3, lr=0.05), progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    repaired, report = ulrl.purify(model, (synth.train_x[:64], synth.train_y[:64]), preset="paper",
                                   unlearn_epochs=3, relearn_epochs=2, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    assert report.layer == "net.classifier" or report.layer.endswith("classifier")
    assert len(report.scores) == synth.num_classes == len(report.z_scores)
    assert 1 <= report.unlearn_epochs <= 3 and len(report.relearn_history) == 2
    assert set(report.seconds) == {"unlearn", "relearn", "total"}
    assert repaired(torch.rand(2, 1, 16, 16)).shape == (2, synth.num_classes)


def test_purify_accepts_any_module_and_named_layer(tiny):
    x, y = torch.rand(40, 1, 4, 4), torch.arange(40) % 4
    repaired, report = ulrl.purify(tiny, (x, y), preset="paper", layer="fc", unlearn_epochs=1, relearn_epochs=1,
                                   augment=False, progress=False)
    assert report.layer == "fc"
    with pytest.raises(UserError):
        ulrl.purify(tiny, (x[:0], y[:0]), progress=False)
    with pytest.raises(UserError):
        ulrl.purify(tiny, (x, y), layer="features.2", progress=False)  # a ReLU


def test_cosine_margin_stops_pushing_below_it():
    layer = nn.Linear(4, 2)
    w_orig = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-1.0, 0.1, 0, 0], [1.0, 1.0, 0, 0]]))  # row 0: cos ~ -0.99
    cosine_penalty(layer, w_orig, [0, 1], alpha=1.0, margin=-0.5)().backward()
    assert layer.weight.grad[0].abs().sum() == 0  # already below the margin: left alone
    assert layer.weight.grad[1].abs().sum() > 0


def test_unlearn_with_masked_class_never_collapses_onto_it(synth):
    from ulrl.detection.weight_change import unlearn
    from ulrl.models import find_classifier

    model = ulrl.create_model("cnn-small", synth.num_classes, synth.in_channels, synth.image_size)
    ulrl.fit(model, synth.train_x, synth.train_y, ulrl.TrainConfig(epochs=2, lr=0.05), progress=False)
    _, layer = find_classifier(model)
    train = ulrl.TrainConfig(epochs=2, lr=0.01, batch_size=64, augment=False, hflip=False)
    scores, hist = unlearn(model, layer, synth.train_x, synth.train_y, train, 0.2, masked=[1])
    others = scores[[0, 2, 3]]
    assert scores[1] == others.median()  # the masked class is scored neutrally
    assert len(hist) >= 1


def test_each_look_unlearns_in_its_own_batchnorm_mode(synth, monkeypatch):
    import ulrl.defenses.ulrl as method
    import ulrl.detection.weight_change as wc

    modes, real_fit = [], wc.fit

    def recording_fit(model, x, y, cfg, **kw):
        modes.append((kw.get("ascent", False), cfg.freeze_bn))
        return real_fit(model, x, y, cfg, **kw)

    monkeypatch.setattr(wc, "fit", recording_fit)
    monkeypatch.setattr(method, "mad_outliers", lambda s, t, cap, rank_by: ([1], torch.zeros_like(s)))  # one flag: look again
    model = ulrl.create_model("cnn-small", synth.num_classes, synth.in_channels, synth.image_size)
    ulrl.purify(model, (synth.train_x[:64], synth.train_y[:64]), preset="paper", second_look=True, unlearn_epochs=1,
                relearn_epochs=1, unlearn_freeze_bn=True, second_look_freeze_bn=False, progress=False)
    assert [m for ascent, m in modes if ascent] == [True, False]  # first look: running stats; second: batch stats


def test_paper_preset_follows_the_reference_code_per_dataset():
    cifar, gtsrb, fmnist = (make_config("paper", dataset=d) for d in ("cifar10", "gtsrb", "fashion-mnist"))
    assert cifar.hflip and not gtsrb.hflip and not fmnist.hflip  # the reference flips on CIFAR-10 only
    assert (cifar.relearn_lr, cifar.alpha) == (0.005, 0.7) and (gtsrb.relearn_lr, gtsrb.alpha) == (0.001, 0.001)
    for c in (cifar, gtsrb, fmnist):
        assert (c.crop_pad, c.relearn_weight_decay, c.relearn_extra_bn_pass, c.amp, c.rank_by) == (4, 0.0, True, True, "index")
    default = make_config("default", dataset="fashion-mnist")
    assert default.crop_pad is None and default.relearn_weight_decay is None and not default.relearn_extra_bn_pass
    # the harness's knowledge of the data goes under the preset, the user's options over it
    from ulrl.defenses.base import make_defense_config
    assert not make_defense_config("ulrl", "paper", dataset="mnist", base={"hflip": True}).hflip
    assert make_defense_config("ulrl", "paper", dataset="mnist", base={"hflip": True}, hflip=True).hflip


def test_mad_cap_by_index_keeps_the_lowest_classes():
    scores = torch.tensor([1.0, 1.1, 0.9, 1.05, 0.95, 1.02, 0.98, 8.0, 12.0, 10.0])
    assert mad_outliers(scores, cap=2, rank_by="index")[0] == [7, 8]
    assert mad_outliers(scores, cap=2)[0] == [8, 9]


def test_extra_bn_pass_moves_batchnorm_statistics_twice_per_batch(synth):
    def bn_batches(extra: bool) -> int:
        torch.manual_seed(0)
        model = ulrl.create_model("cnn-small", synth.num_classes, synth.in_channels, synth.image_size)
        ulrl.fit(model, synth.train_x[:64], synth.train_y[:64], ulrl.TrainConfig(epochs=1, batch_size=32, extra_bn_pass=extra),
                 progress=False)
        return int(next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).num_batches_tracked)

    assert bn_batches(False) == 2 and bn_batches(True) == 4


def test_distillation_leaves_the_flagged_classes_out_unless_asked():
    """``distill_flagged`` distils every class; by default the flagged ones are left out."""
    torch.manual_seed(0)
    teacher = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.zeros(8, dtype=torch.long)
    out = teacher(x).detach().clone()
    out[:, 1] += 2.0  # the student differs from the teacher on class 1 only
    assert with_distillation(teacher, [1], 1.0)(x, out, y).item() < 1e-6
    assert with_distillation(teacher, [], 1.0)(x, out, y).item() > 1e-3
    assert make_config("default").distill_flagged is False


def test_probe_trains_the_flagged_rows_with_the_backbone_fixed(tiny):
    """``probe_epochs`` (LP-FT): before the whole network relearns, only the examined layer learns, the backbone and its
    statistics stay as they were."""
    torch.manual_seed(0)
    x, y = torch.rand(40, 1, 4, 4), torch.arange(40) % 4
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    repaired, report = ulrl.purify(tiny, (x, y), preset="default", layer="fc", force_repair=True, probe_epochs=2,
                                   relearn_epochs=0, relearn_guard=None, augment=False, progress=False)
    after = repaired.state_dict()
    assert len(report.extra["probe_history"]) == 2 and report.flagged
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("features."))
    assert not torch.equal(before["fc.weight"][report.flagged], after["fc.weight"][report.flagged])
    assert make_config("paper").probe_epochs == 0


def test_source_unlearning_uses_own_or_random_classes_perturbations():
    """All-to-all repair: each image carries its own class's perturbation ("own") or a random class's ("any")."""
    from ulrl.defenses.ulrl import source_unlearning

    seen = []

    class Record(nn.Module):
        def forward(self, x):
            seen.append(x.detach().clone())
            return torch.zeros(len(x), 3, requires_grad=True)

    deltas = torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1, 1).expand(3, 1, 2, 2).contiguous()
    x, y = torch.full((60, 1, 2, 2), 0.5), torch.arange(60) % 3

    def used(batch):
        return (batch[:, 0, 0, 0] - 0.6).div(0.1).round().long()

    source_unlearning(Record(), deltas, 1.0)(x, None, y)
    assert len(seen) == 1 and torch.equal(used(seen[0]), y)
    source_unlearning(Record(), deltas, 1.0, "any")(x, None, y)
    assert len(seen) == 2 and (used(seen[1]) != y).sum() > 20 and set(used(seen[1]).tolist()) == {0, 1, 2}
    with pytest.raises(UserError, match="all_to_all_sources"):
        make_config("default", all_to_all_sources="mixed")
