"""The benchmark grid: spec validation, resuming after a kill, reports from a known directory, Ray."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ulrl.bench import (
    DefenseSpec,
    Grid,
    benchmark_scans,
    collect,
    collect_scans,
    load_grid,
    plan,
    run_grid,
    scans_from_cells,
)
from ulrl.checkpoints import write_json
from ulrl.errors import UserError
from ulrl.report import NO_DEFENSE, csv_text, detection_markdown, summary, tables, write_report

TINY = dict(datasets=["synthetic"], attacks=["badnets:patch_size=2"], epochs=1, seeds=[0], scan=False,
            defenses=["ulrl@paper:unlearn_epochs=1,relearn_epochs=1"])


def test_defense_spec_parsing():
    d = DefenseSpec.parse("ulrl@paper:alpha=0.1,relearn_epochs=3")
    assert (d.name, d.preset, dict(d.overrides)) == ("ulrl", "paper", {"alpha": 0.1, "relearn_epochs": 3})
    assert d.label == "ulrl@paper:alpha=0.1,relearn_epochs=3"
    assert DefenseSpec.parse({"name": "ulrl", "preset": "paper", "set": {"alpha": 0.1, "relearn_epochs": 3}}) == d
    assert DefenseSpec.parse("ulrl").key == "ulrl" and "/" not in d.key


@pytest.mark.parametrize("bad", [dict(defenses=["nosuch"]), dict(defenses=["ulrl@nopreset"]),
                                 dict(defenses=["ulrl:bogus=1"]), dict(clean_ratios=[0]), dict(models=["resnet9000"]),
                                 dict(attacks=["nosuch"]), dict(seeds=[])])
def test_bad_grids_are_user_errors(bad):
    with pytest.raises(UserError):
        Grid(**{**TINY, **bad})


def test_grid_file_and_preset(tmp_path):
    f = tmp_path / "g.yaml"
    f.write_text("datasets: [synthetic]\nattacks: [badnets, none]\ndefenses: [ulrl, {name: ulrl, preset: paper}]\nseeds: [0, 1]\n")
    g = load_grid(f, epochs=2)
    assert g.epochs == 2 and len(plan(g)) == 4 and sum(len(w.cells) for w in plan(g)) == 8
    (tmp_path / "bad.yaml").write_text("datasets: [synthetic]\nwhatever: 1\n")
    with pytest.raises(UserError, match="unknown grid key"):
        load_grid(tmp_path / "bad.yaml")
    with pytest.raises(UserError, match="unknown bench preset"):
        load_grid(preset="nosuch")
    preset = load_grid(preset="fashion-mnist-cpu")
    assert preset.datasets == ["fashion-mnist"] and len(preset.attacks) >= 2 and len(preset.defenses) >= 2


def _cells(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in (root / "cells").rglob("*.json")}


def test_grid_resumes_after_kill_without_recomputing(tmp_path):
    root = tmp_path / "res"
    cmd = [sys.executable, "-m", "ulrl.cli", "bench", "--out", str(root), "--datasets", "synthetic",
           "--attacks", "badnets:patch_size=2", "--epochs", "1", "--seeds", "0", "1", "--no-progress", "--no-scan",
           "--defenses", *[f"ulrl@paper:unlearn_epochs=1,relearn_epochs={k}" for k in (1, 2, 3)]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (root / "cells").exists() and any((root / "cells").rglob("*.json")):
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-way: after the first cell, before the last
    proc.wait()
    first = _cells(root)
    assert 1 <= len(first) < 6, "the kill should land mid-grid"
    for data in first.values():
        json.loads(data)  # no corrupt (half-written) result file
    s = run_grid(load_grid(None, **{**TINY, "seeds": [0, 1],
                                     "defenses": [f"ulrl@paper:unlearn_epochs=1,relearn_epochs={k}" for k in (1, 2, 3)]}),
                 root, progress=False)
    after = _cells(root)
    assert len(after) == 6 and not s.failures
    assert s.cells_skipped == len(first) and s.cells_run == 6 - len(first)
    assert all(after[p] == data for p, data in first.items())  # finished cells were not recomputed
    assert run_grid(load_grid(None, **TINY), root, progress=False).cells_run == 0  # and a rerun does nothing
    # a cell finished by a version whose defense lacked an option (or had another value) is kept, and said so
    for cell in root.glob("cells/**/*.json"):
        record = json.loads(cell.read_text())
        del record["config"]["relearn_budget"]
        record["config"]["alpha"] = 0.5
        write_json(cell, record)
    s = run_grid(load_grid(None, **TINY), root, progress=False)
    assert s.cells_run == 0 and s.stale == {"alpha": 1}  # relearn_budget: the paper preset runs without, as before


def _record(attack, defense, acc0, asr0, acc1, asr1, seconds, seed=0):
    return {"dataset": "d", "model": "m", "clean_ratio": 0.01, "attack": attack, "defense": defense, "seed": seed,
            "before": {"acc": acc0, "asr": asr0, "ra": 0.0}, "after": {"acc": acc1, "asr": asr1, "ra": 0.5},
            "der": (max(0, asr0 - asr1) - max(0, acc0 - acc1) + 1) / 2, "defense_seconds": seconds, "train_seconds": 10.0}


def test_report_matches_hand_computed_numbers(tmp_path):
    recs = [_record("a1", "x", 0.90, 1.00, 0.88, 0.00, 4.0), _record("a1", "x", 0.90, 1.00, 0.86, 0.10, 6.0, seed=1),
            _record("a2", "x", 0.80, 0.90, 0.80, 0.50, 2.0), _record("a1", "y", 0.90, 1.00, 0.90, 1.00, 1.0)]
    root = tmp_path / "res"
    for i, r in enumerate(recs):
        p = root / "cells" / f"{i}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(r))
    (t,) = tables(collect(root))
    assert t["attacks"] == ["a1", "a2"] and t["defenses"] == [NO_DEFENSE, "x", "y"]
    a1x = t["cells"][("a1", "x")]  # mean over seeds 0 and 1
    assert a1x["acc"] == pytest.approx(0.87) and a1x["asr"] == pytest.approx(0.05) and a1x["seconds"] == pytest.approx(5.0)
    assert a1x["der"] == pytest.approx(((1.0 - 0.02 + 1) / 2 + (0.9 - 0.04 + 1) / 2) / 2)  # 0.96
    assert t["cells"][("a2", "x")]["der"] == pytest.approx(0.7)
    assert t["mean"]["x"]["der"] == pytest.approx((0.96 + 0.7) / 2)
    assert t["mean"]["x"]["acc_drop"] == pytest.approx((0.03 + 0.0) / 2)
    assert t["cells"][("a1", NO_DEFENSE)]["asr"] == pytest.approx(1.0)
    assert ("a2", "y") not in t["cells"]
    best = summary(t)
    assert [r["defense"] for r in best] == ["x", "y"] and best[1]["der"] == pytest.approx(0.5)
    rows = csv_text(t).splitlines()
    assert rows[0].startswith("attack,no defense:acc") and rows[1].startswith("a1,0.9,1,")
    md = write_report(collect(root), tmp_path / "out", "r")
    text = md.read_text()
    assert "| a1 | 90.0 / 100.0 / 0.0 | 87.0 / 5.0 / 50.0 | 90.0 / 100.0 / 50.0 |" in text
    assert "| **mean DER** | 83.0 | 50.0 |" in text
    assert {p.suffix for p in (tmp_path / "out" / "r").iterdir()} == {".csv", ".png"}


def test_report_of_missing_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no benchmark results"):
        collect(tmp_path)


def test_grid_through_local_ray(tmp_path):
    pytest.importorskip("ray")
    grid = load_grid(None, **{**TINY, "attacks": ["badnets:patch_size=2", "none"]})
    s = run_grid(grid, tmp_path / "res", executor="ray", cpus_per_cell=1, progress=False)
    assert not s.failures and s.models_trained == 2 and s.cells_run == 2
    recs = collect(tmp_path / "res")
    assert {r["attack"] for r in recs} == {"badnets:patch_size=2", "none"}
    assert run_grid(grid, tmp_path / "res", executor="ray", progress=False).cells_skipped == 2


def test_missing_dataset_is_one_user_error(tmp_path):
    grid = Grid(**{**TINY, "datasets": ["fashion-mnist"], "data_dirs": {"fashion-mnist": str(tmp_path / "nowhere")}})
    with pytest.raises(UserError, match="not found"):
        run_grid(grid, tmp_path / "res", progress=False)
    assert not (tmp_path / "res" / "cells").exists()


def test_grid_scans_clean_seeds_and_per_entry_seeds(tmp_path):
    """Each model is scanned once per clean set, defended once per clean set; a clean model
    entry with its own training seeds; the report gets the detection and per-run tables."""
    grid = load_grid(None, datasets=["synthetic"], epochs=1, clean_ratios=[0.5], seeds=[0], clean_seeds=[0, 1],
                     attacks=["badnets:patch_size=2,target=1", {"name": "none", "seeds": [3, 4]}],
                     defenses=["ulrl@paper:unlearn_epochs=1,relearn_epochs=1"],
                     scan_set={"uap_per_class": 2, "margin_steps": 5, "unlearn_epochs": 1})
    assert [(w.job.attack_key, w.job.seed) for w in plan(grid)] == [("badnets-637fc4", 0), ("none", 3), ("none", 4)]
    s = run_grid(grid, tmp_path / "res", progress=False)
    assert not s.failures and (s.models_trained, s.scans_run, s.cells_run) == (3, 6, 6)
    recs = collect(tmp_path / "res")
    assert sorted((r["seed"], r["clean_seed"]) for r in recs if r["attack"] == "none") == [(3, 0), (3, 1), (4, 0), (4, 1)]
    names = sorted(p.name for p in (tmp_path / "res" / "scans").rglob("*.json"))
    assert names == ["ratio0.5-seed0-clean1.json", "ratio0.5-seed0.json", "ratio0.5-seed3-clean0.json",
                     "ratio0.5-seed3-clean1.json", "ratio0.5-seed4-clean0.json", "ratio0.5-seed4-clean1.json"]
    text = write_report(recs, tmp_path / "out", "r", scans=collect_scans(tmp_path / "res")).read_text()
    assert "### Detection (ulrl scan)" in text and "Clean models: verdict 'backdoored' in" in text
    assert "| badnets:patch_size=2,target=1 | 1 | 2 |" in text
    assert "attacked runs" in text and run_grid(grid, tmp_path / "res", progress=False).scans_skipped == 6
    with pytest.raises(UserError, match="seeds"):
        Grid(**{**TINY, "attacks": [{"name": "none", "seeds": []}]})
    with pytest.raises(UserError, match="scan"):
        Grid(**{**TINY, "scan_set": {"alpha": 3}})


def test_report_reads_the_scans_ulrl_cells_ran():
    """``--no-scan``: the detection table comes from the scans the ULRL default cells ran (one defense's cells)."""
    def cell(defense, attack, spec, clean_seed, suspected, verdict):
        scan = {"suspected": suspected, "p_value": 0.001 if verdict == "backdoored" else 0.4, "verdict": verdict,
                "kind": "all-to-one", "alpha": 0.05}
        return {"dataset": "d", "model": "m", "attack": attack, "attack_key": attack, "attack_spec": spec, "clean_ratio": 0.01,
                "seed": 0, "clean_seed": clean_seed, "defense": defense, "report": {"extra": {"scan": scan}}}
    records = [cell("ulrl", "badnets:target=3", {"name": "badnets", "target": 3}, c, [3], "backdoored") for c in (0, 1)]
    records += [cell("ulrl:alpha=0.1", "badnets:target=3", {"name": "badnets", "target": 3}, 0, [5], "backdoored"),
                cell("ulrl", "none", None, 0, [], "no evidence"), {"defense": "ft", "report": {"extra": {}}}]
    scans = scans_from_cells(records)
    assert len(scans) == 3 and {s["scan_source"] for s in scans} == {"ulrl"}
    text = detection_markdown(scans)
    assert "### Detection (the scans the ulrl cells ran)" in text and "| badnets:target=3 | 3 | 2 | 2/2 | 0 |" in text
    assert "Clean models: verdict 'backdoored' in 0 of 1 runs" in text and scans_from_cells(records[-1:]) == []


def test_a_scan_the_ulrl_cells_run_is_not_run_twice(tmp_path):
    """A grid whose ULRL default cells run the very scan it would plans no scan of its own; the report merges the
    grid's scans with the cells' for the runs it did not scan."""
    base = dict(preset="fashion-mnist-detect", attacks=["badnets:target=3"], clean_seeds=[0])
    assert sum(len(w.scans) for w in plan(load_grid(**base, defenses=["ulrl"]))) == 0
    assert sum(len(w.scans) for w in plan(load_grid(**base, defenses=["ulrl@paper", "ft"]))) == 1
    assert sum(len(w.scans) for w in plan(load_grid(**base, defenses=["ulrl:unlearn_lr=0.02"]))) == 1  # another scan
    assert sum(len(w.scans) for w in plan(load_grid(**base, defenses=["ulrl"], scan_set={"alpha": 0.01}))) == 1
    assert sum(len(w.scans) for w in plan(load_grid(**base, defenses=["ulrl"], scan_set={"hflip": True}))) == 1
    head = {"dataset": "d", "model": "m", "attack": "a", "attack_key": "a", "attack_spec": None, "clean_ratio": 0.01,
            "seed": 0}
    own = {**head, "clean_seed": 0, "scan": {"verdict": "no evidence"}}
    (tmp_path / "scans" / "d" / "m" / "a").mkdir(parents=True)
    write_json(tmp_path / "scans" / "d" / "m" / "a" / "ratio0.01-seed0.json", own)
    cells = [{**head, "clean_seed": c, "defense": "ulrl", "report": {"extra": {"scan": {"config": {}}}}} for c in (0, 1)]
    merged = benchmark_scans(tmp_path, cells)
    assert [r["clean_seed"] for r in merged] == [0, 1] and merged[0]["scan"] == own["scan"]
    assert merged[1]["scan"] == {"parameters": {}} and merged[1]["scan_source"] == "ulrl"


def test_preset_extends_another():
    detect, cpu = load_grid(preset="fashion-mnist-detect"), load_grid(preset="fashion-mnist-cpu")
    assert detect.attacks == cpu.attacks and detect.clean_seeds == [0, 1, 2] and "ulrl" in detect.defenses
    targets = {str(a).partition("target=")[2] for a in cpu.attacks if "target=" in str(a)}
    assert len(targets) >= 8 and any("all2all" in str(a) for a in cpu.attacks)
    assert sum(len(w.cells) for w in plan(cpu) if w.job.attack is None) == 5 * len(cpu.defenses)
