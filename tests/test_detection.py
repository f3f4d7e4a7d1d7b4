"""Detection: each signal finds a planted target; the verdict's false-positive rate holds on random
scores; scan.json validates against its schema; ``ulrl scan`` exit codes."""

import json
import math
from pathlib import Path

import pytest
import torch

import ulrl
from ulrl.attacks import build_attack
from ulrl.cli import main
from ulrl.data.readers import synthetic
from ulrl.detection import ScanConfig, scan, stats
from ulrl.detection.universal import UniversalConfig, low_rank, universal_radii, warp
from ulrl.errors import UserError

FAST = dict(uap_per_class=4, margin_steps=40)
K = 8  # classes of the toy data: enough for the per-class outlier tests to have power
SPEC = "badnets:patch_size=3,target=2,rate=0.1"


@pytest.fixture(scope="module")
def toy():
    return synthetic(num_classes=K, n_train=800, n_test=200, seed=0)


@pytest.fixture(scope="module")
def planted(toy):
    """cnn-small on the toy set with a BadNets backdoor toward class 2 (and a clean twin)."""
    attack = build_attack(SPEC, K)
    x, y, _ = attack.poison_train(toy.train_x, toy.train_y)
    models = {}
    for name, (xs, ys) in {"backdoored": (x, y), "clean": (toy.train_x, toy.train_y)}.items():
        torch.manual_seed(0)
        m = ulrl.create_model("cnn-small", K, toy.in_channels, toy.image_size)
        ulrl.fit(m, xs, ys, ulrl.TrainConfig(epochs=8, lr=0.02, batch_size=32, augment=False), progress=False)
        models[name] = m
    triggered = attack.trigger_uint8(toy.test_x[toy.test_y != 2])
    assert (ulrl.metrics.predict(models["backdoored"], triggered) == 2).float().mean() > 0.9  # the backdoor works
    idx = ulrl.clean_subset(toy.train_y, ratio=0.25, seed=0)
    return models, toy.train_x[idx], toy.train_y[idx]


def test_each_signal_ranks_the_planted_target_first(planted):
    models, x, y = planted
    result = scan(models["backdoored"], x, y, ScanConfig(**FAST), progress=False)
    for name, ev in result.signals.items():
        if name != "warp":  # a patch is not a warp: the warp signal has its own planted test below
            assert max(range(K), key=lambda c: ev.z[c]) == 2, (name, ev.z)
    assert result.suspected[:1] == [2] and result.verdict == "backdoored" and result.kind == "all-to-one"
    assert 0 <= result.p_value <= result.alpha
    assert result.perturbations.shape == (K, 1, 16, 16)


def test_scan_leaves_the_model_alone_and_checks_the_clean_set(planted):
    models, x, y = planted
    before = {k: v.clone() for k, v in models["clean"].state_dict().items()}
    scan(models["clean"], x, y, ScanConfig(**FAST, signals=("universal", "weight-change"),
                                           verdict_signals=("universal",)), progress=False)
    assert all(torch.equal(before[k], v) for k, v in models["clean"].state_dict().items())
    partial = scan(models["clean"], x[y != 1], y[y != 1], ScanConfig(**FAST, signals=("universal", "margin")), progress=False)
    assert "no image of class(es) [1]" in partial.notes[0]
    with pytest.raises(UserError, match="unknown detection signal"):
        ScanConfig(signals=("universal", "tea-leaves"))


@pytest.mark.parametrize("scale", ["trimmed", "mad"])
@pytest.mark.parametrize("df", [5.0, math.inf])
def test_verdict_false_positive_rate_holds_on_random_scores(df, scale):
    """Scores drawn i.i.d. from the null family: the model-level p-value is uniform, so the
    verdict fires at rate alpha (one signal and the Fisher combination of two)."""
    gen = torch.Generator().manual_seed(123)
    n, alpha, fired_one, fired_two = 1500, 0.05, 0, 0
    for _ in range(n):
        draws = torch.randn(2, 10, generator=gen, dtype=torch.float64)
        if math.isfinite(df):
            draws = draws / (torch.randn(2, 10, int(df), generator=gen, dtype=torch.float64).pow(2).mean(-1)).sqrt()
        tests = [stats.outlier_test(v, df, scale=scale) for v in draws]
        fired_one += tests[0]["p_model"] <= alpha
        fired_two += stats.combine(torch.tensor([t["p"] for t in tests]), df, scale=scale)["p_model"] <= alpha
    se = math.sqrt(alpha * (1 - alpha) / n)
    for fired in (fired_one, fired_two):
        assert abs(fired / n - alpha) < 4 * se, fired / n


def test_outlier_test_orders_and_handles_unreached_classes():
    v = [0.0, 0.1, -0.1, 0.05, -0.05, 0.02, -0.02, 3.0, 0.03, -0.03]
    r = stats.outlier_test(v)
    assert max(range(10), key=lambda c: r["z"][c]) == 7 and r["p_model"] < 0.01
    r = stats.outlier_test([-math.inf, 0.0, 0.1, -0.1, 0.05])  # a class never reached is the most benign
    assert min(range(5), key=lambda c: r["z"][c]) == 0 and r["p"][0] > 0.5
    two = [0.0, 0.1, -0.1, 0.05, -0.05, 0.02, -0.02, 3.0, 2.5, -0.03]  # two targets do not hide each other
    for scale in stats.SCALES:
        z = stats.outlier_test(two, scale=scale)["z"]
        assert sorted(range(10), key=lambda c: -z[c])[:2] == [7, 8] and min(z[7], z[8]) > 10, (scale, z)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, toy):
    """The toy data as a class-per-folder tree (what a user would pass as --data DIR) and a
    backdoored checkpoint trained on it through the CLI."""
    from PIL import Image

    d = tmp_path_factory.mktemp("scan")
    for split, xs, ys in (("train", toy.train_x, toy.train_y), ("test", toy.test_x, toy.test_y)):
        for i, (img, label) in enumerate(zip(xs, ys, strict=True)):
            folder = d / "data" / split / f"c{int(label)}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[0].numpy()).save(folder / f"{i}.png")
    assert main(["train", "--data", str(d / "data"), "--epochs", "8", "--lr", "0.02", "--batch-size", "32",
                 "--attack", SPEC, "--no-augment", "--out", str(d / "bd.safetensors"), "--no-progress"]) == 0
    return d


def _scan(d: Path, model: Path, out: Path, *more: str) -> int:
    sets = [a for k, v in FAST.items() for a in ("--set", f"{k}={v}")]
    return main(["scan", "--model", str(model), "--data", str(d / "data"), "--clean-ratio", "0.25", "--out", str(out),
                 "--no-progress", *sets, *more])


def test_scan_cli_writes_schema_valid_json_and_exit_codes(ckpts, tmp_path, capsys):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(ulrl.__file__).parent / "detection" / "scan.schema.json").read_text())
    assert _scan(ckpts, ckpts / "bd.safetensors", tmp_path / "a") == 0  # without --fail-on-detect: 0 either way
    assert "BACKDOORED" in capsys.readouterr().out
    record = json.loads((tmp_path / "a" / "scan.json").read_text())
    jsonschema.validate(record, schema)
    assert record["verdict"] == "backdoored" and record["suspected"][0] == 2
    assert record["model"]["sha256"] and (tmp_path / "a" / "scan.png").stat().st_size > 0
    assert _scan(ckpts, ckpts / "bd.safetensors", tmp_path / "b", "--fail-on-detect") == 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**record, "verdict": "maybe"}, schema)


def test_scan_cli_bad_input_is_exit_2(ckpts, tmp_path, capsys):
    assert _scan(ckpts, ckpts / "bd.safetensors", tmp_path / "c", "--set", "alpha=2") == 2
    assert "alpha" in capsys.readouterr().err
    assert _scan(ckpts, tmp_path / "missing.safetensors", tmp_path / "d", "--fail-on-detect") == 2
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "scan.json").write_text("{}")
    assert _scan(ckpts, ckpts / "bd.safetensors", tmp_path / "e") == 2  # never over an existing result
    assert "already exists" in capsys.readouterr().err


def test_warp_moves_pixels_by_the_field():
    x = torch.zeros(1, 1, 8, 8)
    x[..., 3] = 1.0  # a vertical bar in column 3
    assert torch.allclose(warp(x, torch.zeros(1, 2, 4, 4))[0], x, atol=1e-5)  # no displacement: the image itself
    flow = torch.zeros(1, 2, 4, 4)
    flow[:, 0] = 1.0  # every pixel samples one pixel to its right: the bar moves one column left
    moved = warp(x, flow)[0, 0, 0]
    assert torch.allclose(moved[..., 2], torch.ones(8), atol=1e-5) and moved[..., 3].abs().max() < 1e-6


class _IdentityHead(torch.nn.Module):
    """A hand-made model whose logits pass through an identity ``nn.Linear`` (the scan looks for the classifier)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(K, K)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(K))
            self.fc.bias.zero_()


def _blocks() -> tuple[torch.Tensor, torch.Tensor]:
    """160 16 x 16 images, 20 per class: class c is a bright block in rows 2c..2c+1, columns 0-3, on dim noise."""
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(160) % K
    x = torch.rand(160, 1, 16, 16, generator=gen) * 0.3
    for c in range(K):
        x[y == c, :, 2 * c: 2 * c + 2, :4] = 1.0
    return x, y


class _WarpTarget(_IdentityHead):
    """Class c is a bright block in rows 2c..2c+1 (columns 0-3); every image also has a bright bar
    in column 8, and class 5's logit rises sharply when that bar moves one column right: a warp
    trigger. Reaching any other class takes moving a block by two pixels or more."""

    def forward(self, x):
        rows = x[..., :4].mean(-1).flatten(1)  # (N, 16): brightness of each row's first four pixels
        out = 10 * (rows[:, 0::2] + rows[:, 1::2]) / 2
        bar = x[..., 9].mean((1, 2)) - x[..., 7].mean((1, 2))
        return self.fc(torch.cat([out[:, :5], out[:, 5:6] + 40 * bar[:, None], out[:, 6:]], 1))


def test_warp_signal_finds_a_planted_warp_trigger():
    x, y = _blocks()
    x[..., 8] = 1.0
    model = _WarpTarget()
    assert (model(x).argmax(1) == y).all()
    result = scan(model, x, y, ScanConfig(signals=("warp", "universal"), uap_per_class=4), progress=False)
    ev = result.signals["warp"]
    assert max(range(K), key=lambda c: ev.z[c]) == 5 and ev.p_model < 0.05, ev.z
    assert ev.statistic[5] < 2.0 and result.warps.shape == (K, 2, 8, 8)  # reached by a warp of under 2 pixels


class _AllToAllTarget(_IdentityHead):
    """Class c is a bright block in rows 2c..2c+1 (columns 0-3); a bright 4 x 4 corner patch sends an image of class c
    to class c + 1: BadNets all-to-all. No one perturbation sends every class to one target, one per class does."""

    def forward(self, x):
        rows = x[..., :4].mean(-1).flatten(1)
        blocks = (rows[:, 0::2] + rows[:, 1::2]) / 2  # (N, K)
        patch = torch.nn.functional.softplus(20 * (x[..., 12:, 12:].mean((1, 2, 3)) - 0.3)) / 20
        return self.fc(10 * blocks + 200 * patch[:, None] * blocks.roll(1, dims=1))


def test_pairwise_search_finds_an_all_to_all_patch():
    x, y = _blocks()
    model = _AllToAllTarget()
    assert (model(x).argmax(1) == y).all()
    patched = x.clone()
    patched[..., 12:, 12:] = 1.0
    assert (model(patched).argmax(1) == (y + 1) % K).all()  # the backdoor works
    result = scan(model, x, y, ScanConfig(signals=("universal",), uap_per_class=4), progress=False)
    assert result.kind == "all-to-all" and result.all_to_all["shift"] == 1 and result.all_to_all["p"] < 1e-3
    assert result.suspected == [(c + 1) % K for c in range(K)] and result.pair_perturbations.shape == (K, K, 1, 16, 16)
    assert "all-to-all" in result.seconds
    old = scan(model, x, y, ScanConfig(signals=("universal",), uap_per_class=4, a2a_search="universal"), progress=False)
    assert old.all_to_all["p"] > result.all_to_all["p"] and old.pair_perturbations is None


def test_all_to_all_rank_test():
    gen = torch.Generator().manual_seed(0)
    k = 10
    pair = (torch.rand(k, k, generator=gen) + 0.5).tolist()
    r = stats.cyclic_all_to_all(pair)
    assert r["p"] > 0.05  # no shift is special
    for s in range(k):
        pair[s][(s + 3) % k] = 0.1  # every source reaches its (s + 3) class first
    r = stats.cyclic_all_to_all(pair)
    assert r["shift"] == 3 and r["p"] < 1e-6
    assert stats.rank_sum_p([0] * 5, 9) == pytest.approx(9.0**-5) and stats.rank_sum_p([8] * 5, 9) == pytest.approx(1.0)


def test_ulrl_default_repairs_the_suspected_class_and_leaves_a_clean_model_alone(planted, toy):
    models, x, y = planted
    attack = build_attack(SPEC, K)
    triggered = attack.trigger_uint8(toy.test_x[toy.test_y != 2])
    repaired, report = ulrl.purify(models["backdoored"], (x, y), relearn_epochs=4, progress=False)
    assert report.flagged == [2] and report.extra["scan"]["verdict"] == "backdoored"
    asr = (ulrl.metrics.predict(repaired, triggered) == 2).float().mean().item()
    assert asr < 0.5, asr
    same, report = ulrl.purify(models["clean"], (x, y), progress=False)
    assert report.flagged == [] and report.extra["scan"]["verdict"] == "no evidence"
    assert any("left unchanged" in n for n in report.notes) and not report.relearn_history
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), models["clean"].state_dict().values(), strict=True))
    _, forced = ulrl.purify(models["clean"], (x, y), force_repair=True, relearn_epochs=1, progress=False)
    assert len(forced.flagged) == 1 and forced.relearn_history


def test_ulrl_guard_relearns_again_when_relearning_diverges(planted, monkeypatch):
    """A relearning that ruins the model (NaN weights, as frozen BatchNorm statistics did on PreAct-ResNet18) is caught
    on the clean set alone: relearn again with batch statistics; if every try diverges, the original comes back."""
    import ulrl.defenses.ulrl as method
    models, x, y = planted
    real, calls = method.relearn, []

    def first_diverges(model, *args, **kw):
        calls.append(args[3])  # freeze_bn of this try (model, repair, cfg, lr, freeze_bn, ...)
        real(model, *args, **kw)
        if len(calls) == 1:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))

    monkeypatch.setattr(method, "relearn", first_diverges)
    repaired, report = ulrl.purify(models["backdoored"], (x, y), relearn_epochs=2, relearn_budget=None, verify_repair=None,
                                   progress=False)
    assert calls == [True, False] and [a["freeze_bn"] for a in report.extra["relearn_attempts"]] == [True, False]
    assert any("diverged" in n for n in report.notes) and "repair_failed" not in report.extra
    assert all(torch.isfinite(p).all() for p in repaired.parameters())
    monkeypatch.setattr(method, "relearn", real)
    same, report = ulrl.purify(models["backdoored"], (x, y), relearn_epochs=2, relearn_lr=1e9, progress=False)
    assert len(report.extra["relearn_attempts"]) == 3 and report.extra["repair_failed"]
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), models["backdoored"].state_dict().values(), strict=True))


@pytest.mark.parametrize("accs, shrinks, kept", [((0.90, 0.85, 0.87, 0.88), [1.0, 0.5, 0.25], 2),  # none within: the best
                                                  ((0.90, 0.85, 0.895), [1.0, 0.5], 1)])  # the first within the budget
def test_ulrl_budget_halves_the_unlearned_shortcut_while_the_repair_costs(planted, monkeypatch, accs, shrinks, kept):
    """A relearning that loses more than the budget (1 point) of the clean images' accuracy (classes not flagged) is
    run again with the scan's shortcut halved, down to the floor (a quarter); the first try within the budget is kept,
    else the one that kept the most accuracy, and the report says so."""
    import ulrl.defenses.ulrl as method
    models, x, y = planted
    real, seen, scales = method.relearn, iter(accs), []
    snapshots = []

    def spy(model, *args, **kw):
        scales.append(args[1].trigger_scale)
        real(model, *args, **kw)
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})

    monkeypatch.setattr(method, "relearn", spy)
    monkeypatch.setattr(method, "accuracy", lambda *a, **kw: next(seen))
    repaired, report = ulrl.purify(models["backdoored"], (x, y), relearn_epochs=1, probe_epochs=0, verify_repair=None,
                                   progress=False)
    assert report.flagged == [2] and scales == shrinks
    assert [a["trigger_shrink"] for a in report.extra["relearn_attempts"]] == shrinks
    assert report.extra["trigger_shrink"] == shrinks[kept] and any("relearning again with 0.5" in n for n in report.notes)
    assert all(torch.equal(v, snapshots[kept][k]) for k, v in repaired.state_dict().items())
    assert ("no try kept within the budget" in " ".join(report.notes)) == (kept == 2)
    assert [a.get("kept", False) for a in report.extra["relearn_attempts"]] == [i == kept for i in range(len(shrinks))]


@pytest.mark.parametrize("survival, unlearned", [([0.005], [0.0]),  # relearning alone took the shortcut out: kept
                                                 ([0.5, 0.0], [0.0, 1.0])])  # it survived: relearn again, unlearning it
def test_ulrl_verifies_relearning_alone_before_unlearning_the_shortcut(planted, monkeypatch, survival, unlearned):
    """The default relearns first without trigger unlearning and applies the scan's shortcut to the clean images of the
    other classes: while the relearned model still sends more than verify_repair (1%) more of them to the flagged class, it
    relearns again with the shortcut unlearned. On the original the shortcut sends most of them there."""
    import ulrl.defenses.ulrl as method
    models, x, y = planted
    real_survival, real_relearn, seen, calls, weights = method.shortcut_survival, method.relearn, iter(survival), [], []

    def survival_spy(model, r, cfg):  # the first call measures the original; the later ones are the tries'
        calls.append(cfg)
        return real_survival(model, r, cfg) if len(calls) == 1 else [next(seen)]

    def relearn_spy(model, r, cfg, *args, **kw):
        weights.append(cfg.trigger_unlearn)
        return real_relearn(model, r, cfg, *args, **kw)

    monkeypatch.setattr(method, "relearn", relearn_spy)
    monkeypatch.setattr(method, "shortcut_survival", survival_spy)
    repaired, report = ulrl.purify(models["backdoored"], (x, y), relearn_epochs=1, probe_epochs=0, progress=False)
    tries = report.extra["relearn_attempts"]
    assert report.flagged == [2] and [a["trigger_shrink"] for a in tries] == unlearned
    assert weights == [0.0 if u == 0 else 1.0 for u in unlearned]
    assert report.extra["shortcut_survival_before"][0] > 0.5  # the scan's shortcut works on the original
    assert [a["shortcut_survival"] for a in tries] == [[v] for v in survival]
    assert report.extra["trigger_shrink"] == unlearned[-1] and tries[-1]["kept"]
    note = "relearning alone took the scan's shortcuts out" if len(survival) == 1 else "relearning again with it unlearned"
    assert any(note in n for n in report.notes)
    with pytest.raises(UserError, match="verify_repair"):
        ulrl.purify(models["backdoored"], (x, y), verify_repair=1.0, progress=False)


def test_ulrl_repairs_an_all_to_all_verdict_in_the_features(planted, monkeypatch):
    """Every class is a target: the default re-initialises no row (a cap of 2 leaves most of the backdoor, every row
    costs the classifier) and unlearns the scan's perturbation toward every class; ``rows`` keeps the capped rows."""
    import torch.nn.functional as F

    import ulrl.defenses.ulrl as method
    models, x, y = planted
    real = method.scan

    def all_to_all(*args, **kw):
        r = real(*args, **kw)
        r.kind, r.suspected = "all-to-all", list(range(K))
        return r

    monkeypatch.setattr(method, "scan", all_to_all)
    from ulrl.models import find_classifier
    original = find_classifier(models["backdoored"])[1].weight.detach().clone()
    repaired, report = ulrl.purify(models["backdoored"], (x, y), relearn_epochs=2, progress=False)
    assert report.flagged == [] and report.extra["unlearned_targets"] == list(range(K)) and report.relearn_history
    assert F.cosine_similarity(find_classifier(repaired)[1].weight.detach(), original, dim=1).min() > 0.5  # no row re-initialised
    assert any("all-to-all" in n for n in report.notes)
    _, rows = ulrl.purify(models["backdoored"], (x, y), relearn_epochs=1, all_to_all_repair="rows", progress=False)
    assert rows.flagged == [0, 1]
    assert "unlearned_targets" not in rows.extra


def test_config_round_trips_through_scan_json_parameters():
    from dataclasses import asdict

    from ulrl.detection.scan import _finite, config_from_parameters
    cfg = ScanConfig(signals=("universal", "warp"), alpha=0.01, unlearn_milestones=(5, 9))
    stored = json.loads(json.dumps(_finite(asdict(cfg))))  # as scan.json holds it: lists, and null for inf
    assert stored["null_df_universal"] is None and isinstance(stored["signals"], list)
    assert config_from_parameters(stored) == cfg
    assert config_from_parameters({**stored, "unknown": 1}, alpha=0.2).alpha == 0.2


def test_rank_one_search_keeps_every_perturbation_of_rank_one():
    x, y = _blocks()
    assert torch.linalg.matrix_rank(low_rank(x[:3], 1)[:, 0]).tolist() == [1, 1, 1]
    assert torch.allclose(low_rank(x[:3], 16), x[:3], atol=1e-5)  # full rank: the image itself
    cfg = UniversalConfig(per_class=2, min_rms=0.02, max_rms=0.5, growth=1.5, rank=1)
    u = universal_radii(_AllToAllTarget().eval(), x, y, K, cfg)
    assert u["deltas"].shape == (K, 1, 16, 16)
    assert all(int(torch.linalg.matrix_rank(d[0])) <= 1 for d in u["deltas"])
    with pytest.raises(ValueError, match="rank"):
        universal_radii(_AllToAllTarget().eval(), x, y, K, UniversalConfig(rank=1, norm="linf"))


def test_pull_reads_the_margin_curve_at_its_radius():
    from ulrl.detection.universal import margin_at
    log_r = [math.log(0.01), math.log(0.02), math.log(0.04)]
    curves = [[-3.0, -2.0, -1.0],  # interpolated between its steps
              [-1.0, 2.0, math.nan],  # stopped (reached) before the radius asked: its last margin, a lower bound
              [math.nan] * 3]  # never searched
    out = margin_at(log_r, curves, math.sqrt(0.02 * 0.04))
    assert out[0] == pytest.approx(-1.5) and out[1] == 2.0 and math.isnan(out[2])
    with pytest.raises(UserError, match="reads the universal search"):
        ScanConfig(signals=("pull", "margin"))


def test_universal_score_and_pull_are_means_over_draws(planted):
    models, x, y = planted
    cfg = dict(FAST, signals=("universal", "pull"), uap_adjust=False, all_to_all_share=0.0)
    one = scan(models["backdoored"], x, y, ScanConfig(**cfg, uap_draws=1), progress=False)
    two = scan(models["backdoored"], x, y, ScanConfig(**cfg, uap_draws=2), progress=False)
    u, pull = two.signals["universal"], two.signals["pull"]
    assert u.extra["draw_scores"][0] == one.signals["universal"].score  # draw 0 is the single-draw search
    assert u.extra["draw_scores"][1] != u.extra["draw_scores"][0]  # another draw of images
    assert u.score == pytest.approx([(a + b) / 2 for a, b in zip(*u.extra["draw_scores"], strict=True)])
    assert u.statistic == pytest.approx([math.exp(-s) for s in u.score])  # the geometric mean radius
    assert pull.extra["draw_pulls"][0] == one.signals["pull"].score
    assert pull.score == pytest.approx([(a + b) / 2 for a, b in zip(*pull.extra["draw_pulls"], strict=True)])
    assert "draw_scores" not in one.signals["universal"].extra
    with pytest.raises(UserError, match="uap_draws"):
        ScanConfig(uap_draws=0)


def test_universal_statistic_reads_its_level_of_the_same_search(planted):
    """``uap_score_level`` picks which crossing of one search is the statistic; the search (the perturbation the
    repair unlearns) and the pull's reference radius stay those of ``uap_level``."""
    models, x, y = planted
    cfg = dict(FAST, signals=("universal", "pull"), uap_adjust=False, all_to_all_share=0.0)
    at90 = scan(models["backdoored"], x, y, ScanConfig(**cfg, uap_score_level=0.9), progress=False)
    at75 = scan(models["backdoored"], x, y, ScanConfig(**cfg, uap_score_level=0.75), progress=False)
    assert torch.equal(at90.perturbations, at75.perturbations)
    assert at90.signals["pull"].score == at75.signals["pull"].score
    assert at90.signals["universal"].extra["pair_radius"] == at75.signals["universal"].extra["pair_radius"]
    assert all(a <= b for a, b in zip(at75.signals["universal"].statistic, at90.signals["universal"].statistic, strict=True))
    assert at75.signals["universal"].statistic != at90.signals["universal"].statistic
    with pytest.raises(UserError, match="uap_score_level"):
        ScanConfig(uap_score_level=1.5)
    ScanConfig(uap_level=0.5)  # a lower stop alone is fine: the statistic is read at min(uap_score_level, uap_level)


def test_weak_evidence_below_the_bar_gets_a_note(planted):
    """"No evidence" with p within twice alpha names the most suspicious class in a note; the verdict is unchanged."""
    models, x, y = planted
    cfg = dict(FAST, signals=("universal",), all_to_all_share=0.0, warp_share=0.0)
    p = scan(models["clean"], x, y, ScanConfig(**cfg), progress=False).p_value
    assert 0.0 < p < 1.0
    near = scan(models["clean"], x, y, ScanConfig(**cfg, alpha=0.6 * p), progress=False)
    far = scan(models["clean"], x, y, ScanConfig(**cfg, alpha=0.4 * p), progress=False)
    assert near.verdict == far.verdict == "no evidence" and near.p_value == far.p_value == p
    assert any(n.startswith("weak evidence") for n in near.notes)
    assert not any(n.startswith("weak evidence") for n in far.notes)
