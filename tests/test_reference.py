"""The reference test (src/ulrl/detection/reference.py): its tails, its false-positive rate on simulated clean models, a
planted class found, the profile's refusals, the shipped profile's matching, ``ulrl profile`` and ``scan --reference``."""

import copy
import json
import math
import random
from pathlib import Path

import pytest
from test_detection import _scan, ckpts, toy  # noqa: F401  (module fixtures: the toy data and checkpoint)

import ulrl
from ulrl.cli import main
from ulrl.detection import reference
from ulrl.detection.scan import ScanConfig, decide
from ulrl.errors import UserError

K = 10


def test_tails_match_known_quantiles():
    assert reference.t_sf(0.0, 5) == pytest.approx(0.5)
    assert reference.t_sf(2.015048, 5) == pytest.approx(0.05, abs=1e-6)
    assert reference.t_sf(-2.015048, 5) == pytest.approx(0.95, abs=1e-6)
    assert reference.t_sf(3.355387, 8) == pytest.approx(0.005, abs=1e-6)
    assert reference.t_sf(math.inf, 3) == 0.0 and reference.t_sf(-math.inf, 3) == 1.0
    assert reference.chi2_sf_even(5.991465, 2) == pytest.approx(0.05, abs=1e-6)
    assert reference.chi2_sf_even(9.487729, 4) == pytest.approx(0.05, abs=1e-6)


def _fake_scan(rng: random.Random, shift: dict[int, float] | None = None, params: dict | None = None) -> dict:
    """A scan.json's fields a profile reads: per class a universal and a margin score (class means differ, as natural
    attractors do), plus a shift on some classes."""
    shift = shift or {}
    scores = {sg: [c * 0.3 + (1.5 if sg == "margin" and c in (5, 8) else 0.0) + rng.gauss(0, 0.1) + shift.get(c, 0.0)
                   for c in range(K)] for sg in reference.SIGNALS}
    return {"num_classes": K, "verdict": "no evidence", "p_value": 0.5,
            "parameters": {**{p: 1 for p in reference.PARAMETERS}, **(params or {})},
            "signals": {sg: {"score": v} for sg, v in scores.items()}}


def test_reference_test_holds_its_rate_on_clean_models_and_finds_a_planted_class():
    rng = random.Random(0)
    n, trials, alpha = 9, 1500, 0.05
    hits = 0
    for _ in range(trials):  # each trial: a fresh set of reference models, then one more clean model
        prof = reference.build_profile([(f"m{i}", _fake_scan(rng)) for i in range(n)], "sim")
        new = _fake_scan(rng)
        hits += reference.reference_test({sg: new["signals"][sg]["score"] for sg in reference.SIGNALS}, prof)["p_model"] <= alpha
    assert abs(hits / trials - alpha) < 0.02, hits / trials  # calibrated: the predictive t is exact for normal scores
    # a class moved on both signals by 10 spreads of the reference models: found
    prof = reference.build_profile([(f"m{i}", _fake_scan(rng)) for i in range(n)], "sim")
    moved = _fake_scan(rng, {8: 1.0})  # class 8, a natural attractor of the margin, moved 10 spreads further
    t = reference.reference_test({sg: moved["signals"][sg]["score"] for sg in reference.SIGNALS}, prof)
    assert t["top"] == 8 and t["p_model"] < 0.01


def test_profile_refuses_what_cannot_be_a_reference():
    rng = random.Random(1)
    with pytest.raises(UserError, match="at least 3"):
        reference.build_profile([("a", _fake_scan(rng)), ("a", _fake_scan(rng)), ("b", _fake_scan(rng))], "x")
    with pytest.raises(UserError, match="other scan parameters"):
        reference.build_profile([("a", _fake_scan(rng)), ("b", _fake_scan(rng, params={"uap_score_level": 0.9}))], "x")
    bad = {**_fake_scan(rng), "verdict": "backdoored"}
    with pytest.raises(UserError, match="trust"):
        reference.build_profile([("a", _fake_scan(rng)), ("b", bad)], "x")
    unreached = _fake_scan(rng)
    unreached["signals"]["universal"]["score"][4] = None  # scan.json's null: a class the search never reached
    with pytest.raises(UserError, match="finite"):
        reference.build_profile([("a", _fake_scan(rng)), ("b", _fake_scan(rng)), ("c", unreached)], "x")
    prof = reference.build_profile([(f"m{i}", _fake_scan(rng)) for i in range(3)], "x")
    assert reference.unusable(prof, 8, prof["parameters"]) and reference.unusable(prof, K, {}) \
        and reference.unusable(prof, K, prof["parameters"]) is None
    # the scores depend on the clean-set size: a profile applies to clean sets of about the size it was built with
    sized = {**prof, "clean_samples": [600, 600]}
    assert reference.unusable(sized, K, prof["parameters"], 600) is None and reference.unusable(sized, K, prof["parameters"], 800) is None
    assert "clean images" in reference.unusable(sized, K, prof["parameters"], 200)
    assert reference.load_profile("builtin:fashion-mnist-cnn-small")["clean_samples"] == [600, 600]


def test_decide_lets_the_reference_name_the_class_and_leaves_the_rest_alone():
    cfg = ScanConfig()
    flat = [0.5] * K
    p = {"universal": flat, "margin": flat}
    pm = {"universal": 0.9, "margin": 0.9}
    ref = {"p_model": 1e-6, "top": 3, "p": [0.5] * K}
    d = decide(p, pm, {}, cfg, ref)
    assert d["test"] == "reference" and d["suspected"] == [3] and d["p_value"] == pytest.approx(1e-6 / cfg.reference_share)
    assert decide(p, pm, {}, cfg, {**ref, "p_model": 0.5})["suspected"] == []
    # below the bar, the class named (weak-evidence note, force_repair) is the one of the test nearest it
    near = {"universal": [0.5, 0.01] + flat[2:], "margin": flat}
    assert decide(near, pm, {}, cfg, {**ref, "p_model": 0.01})["closest"] == 3
    assert decide(near, pm, {}, cfg, {**ref, "p_model": 0.9})["closest"] == 1
    assert decide(p, pm, {"p": 0.06, "shift": 1}, cfg)["closest"] is None  # all-to-all nearest: no one class
    a2a = {"p": 1e-4, "shift": 1}  # an all-to-all backdoor moves classes off their profile too: its own test decides
    assert decide(p, pm, a2a, cfg, ref)["kind"] == "all-to-all"
    # without a profile the all-to-one test keeps its whole share, as before
    strong = {"universal": [1e-4] + flat[1:], "margin": [1e-4] + flat[1:]}
    assert decide(strong, pm, {}, cfg)["p_value"] < decide(strong, pm, {}, cfg, {**ref, "p_model": 0.5})["p_value"]


def test_auto_picks_the_shipped_profile_only_for_the_recipe_of_its_models():
    name = "builtin:fashion-mnist-cnn-small"
    prof = reference.load_profile(name)
    meta = {**prof["match"], "train_config": {**prof["match"]["train_config"], "seed": 7, "device": "cuda"}, "seed": 7}
    assert reference.resolve("auto", meta) == name
    assert reference.resolve("auto", {**meta, "train_config": {**meta["train_config"], "epochs": 30}}) is None
    assert reference.resolve("auto", None) is None and reference.resolve("none", meta) is None
    assert reference.resolve(name, None) == name
    with pytest.raises(UserError, match="not found"):  # a named profile is read when resolved: a bad one fails first
        reference.resolve("my.json", None)
    assert prof["models"] >= 5 and len(prof["signals"]["universal"]["mean"]) == 10
    with pytest.raises(UserError, match="not found"):
        reference.load_profile("builtin:nothing-like-it")
    # a description made in memory (tuples, not lists) matches as its saved sidecar does
    from dataclasses import asdict

    from ulrl.train import TrainConfig
    live = {**prof["match"], "train_config": asdict(TrainConfig(epochs=5, lr=0.01, schedule="cosine", hflip=True))}
    assert reference.resolve("auto", live) == name
    # a profile named by hand for a model of other data or shape is refused
    with pytest.raises(UserError, match="other models"):
        reference.resolve(name, {**meta, "dataset": "cifar10", "in_channels": 3, "image_size": 32})


@pytest.mark.parametrize("change", [
    lambda p: p["signals"]["universal"]["sd"].__setitem__(0, None),
    lambda p: p["signals"]["margin"]["sd"].__setitem__(3, 0.0),
    lambda p: p.__setitem__("models", "9"),
    lambda p: p.pop("parameters"),
    lambda p: p["signals"]["margin"]["mean"].pop(),
])
def test_a_malformed_profile_is_refused_when_read(tmp_path, change):
    prof = json.loads(json.dumps(reference.load_profile("builtin:fashion-mnist-cnn-small")))
    change(prof)
    (tmp_path / "p.json").write_text(json.dumps(prof))
    with pytest.raises(UserError, match="malformed"):
        reference.load_profile(str(tmp_path / "p.json"))
    (tmp_path / "nan.json").write_text(json.dumps(reference.load_profile("builtin:fashion-mnist-cnn-small"))
                                       .replace("0.0", "NaN", 1))
    with pytest.raises(UserError, match="not readable"):
        reference.load_profile(str(tmp_path / "nan.json"))


def test_profile_cli_then_scan_with_the_reference(ckpts, tmp_path, capsys):  # noqa: F811
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(ulrl.__file__).parent / "detection" / "scan.schema.json").read_text())
    assert _scan(ckpts, ckpts / "bd.safetensors", tmp_path / "s") == 0
    record = json.loads((tmp_path / "s" / "scan.json").read_text())
    # a backdoored scan is no reference
    assert main(["profile", str(tmp_path / "s" / "scan.json"), "--out", str(tmp_path / "p.json")]) == 2
    assert "trust" in capsys.readouterr().err
    rng = random.Random(2)
    files = []
    for i in range(3):  # three 'clean models': the record's scores, jittered, under other model hashes
        s = copy.deepcopy(record)
        s.update(verdict="no evidence", model={"path": None, "sha256": f"{i:064x}"})
        for sg in reference.SIGNALS:
            s["signals"][sg]["score"] = [None if v is None else v + rng.gauss(0, 0.05) for v in s["signals"][sg]["score"]]
        files.append(tmp_path / f"clean{i}.json")
        files[-1].write_text(json.dumps(s))
    assert main(["profile", *map(str, files[:2]), "--out", str(tmp_path / "p.json")]) == 2  # two models: too few
    assert main(["profile", *map(str, files), "--out", str(tmp_path / "p.json")]) == 0
    assert main(["profile", *map(str, files), "--out", str(tmp_path / "p.json")]) == 2  # never over an existing file
    assert main(["profile", *map(str, files), "--out", str(files[0])]) == 2  # never over an input
    capsys.readouterr()
    assert _scan(ckpts, ckpts / "bd.safetensors", tmp_path / "r", "--reference", str(tmp_path / "p.json")) == 0
    out = json.loads((tmp_path / "r" / "scan.json").read_text())
    jsonschema.validate(out, schema)
    assert out["reference"]["models"] == 3 and len(out["reference"]["p"]) == out["num_classes"]
    assert out["parameters"]["reference"] == str(tmp_path / "p.json")
    assert _scan(ckpts, ckpts / "bd.safetensors", tmp_path / "m", "--reference", str(tmp_path / "missing.json")) == 2
    assert "not found" in capsys.readouterr().err
    # a profile of other scan parameters is not used, and the scan says so
    assert _scan(ckpts, ckpts / "bd.safetensors", tmp_path / "o", "--reference", str(tmp_path / "p.json"),
                 "--set", "margin_steps=41") == 0
    other = json.loads((tmp_path / "o" / "scan.json").read_text())
    assert other["reference"] is None and any("not used" in n for n in other["notes"])
