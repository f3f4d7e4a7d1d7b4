"""Neural Cleanse's mask as a detection signal, measured over a benchmark's stored scans; not part of the
scan (docs/detection.md, "What still fails").

    python scripts/mask_study.py RESULTS_DIR --out SCORES.jsonl [--part 0/2]   # reverse engineering, every class
    python scripts/mask_study.py RESULTS_DIR --scores SCORES.jsonl             # the verdicts with the signal

Collection: for each stored scan (``ulrl bench`` writes one per model and clean set), Neural Cleanse's trigger
reverse engineering (:func:`ulrl.defenses.nc.reverse_engineer`, the ``nc`` defense's default budget) toward every
class on the scan's clean set, seeded with the scan's seed; one JSON line per scan with each class's mask L1 norm.
Run ``--part 0/2`` and ``--part 1/2`` side by side to use two cores.

Verdicts: the signal's score is ``-log(norm)`` (a class whose reversed trigger never reached 99% counts as least
suspicious; ``--adjust``: its residual on the clean logit gap, as the universal signal's), its z and p as every
signal's (:func:`ulrl.detection.stats.outlier_test`). It joins the stored
evidence either as a fourth term of the per-class Fisher sum, or as a test of its own with a share of alpha
taken from the all-to-one test (as the warp signal has). Prints, per setting: all-to-one targets found, all-to-all
runs found, runs with a clean class also suspected, false positives on clean models, the signal's own false
positives, the largest z on clean models, and the runs missed.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

from ulrl.bench import benchmark_scans
from ulrl.checkpoints import load_checkpoint
from ulrl.data import load_dataset
from ulrl.defenses.nc import NCConfig, reverse_engineer
from ulrl.detection import stats
from ulrl.detection.scan import config_from_parameters, gap_adjusted, null_df, search_resolution
from ulrl.pipeline import select_clean

SETTINGS = [("fisher", 3.0, 0.0), ("fisher", math.inf, 0.0), ("own", 3.0, 0.1), ("own", math.inf, 0.1), ("own", math.inf, 0.05)]


def _key(rec: dict) -> tuple:
    return rec["attack_key"], rec["seed"], rec["clean_seed"]


def collect(root: Path, out: Path, part: int, parts: int) -> None:
    data = load_dataset("fashion-mnist")
    with out.open("a") as f:
        for n, rec in enumerate(sorted(benchmark_scans(root), key=_key)):
            if n % parts != part:
                continue
            path = root / "models" / rec["dataset"] / rec["model"] / rec["attack_key"] / f"seed{rec['seed']}.safetensors"
            model = load_checkpoint(path)[0].eval().requires_grad_(False)
            x = data.train_x[select_clean(data, rec["clean_ratio"], None, rec["clean_seed"])]
            gen = torch.Generator().manual_seed(rec["scan"]["parameters"]["seed"])
            t0 = time.perf_counter()
            trig = [reverse_engineer(model, x, t, NCConfig(), gen) for t in range(rec["scan"]["num_classes"])]
            f.write(json.dumps({"key": list(_key(rec)), "norm": [t.norm for t in trig], "succeeded": [t.succeeded for t in trig],
                                "seconds": time.perf_counter() - t0}) + "\n")
            f.flush()


def verdict(scan: dict, score: list[float], mode: str, df: float, share: float) -> tuple[float, str, list[int], dict]:
    """The scan's decision (weighted Bonferroni of its tests) with the mask signal in the Fisher sum or as its own test."""
    cfg = config_from_parameters(scan["parameters"])
    p, pm = {}, {}
    for name, ev in scan["signals"].items():
        floor = search_resolution(cfg) if name == "warp" else 0.0
        t = stats.outlier_test([-math.inf if v is None else v for v in ev["score"]], null_df(cfg, name), floor, cfg.z_scale)
        p[name], pm[name] = t["p"], t["p_model"]
    mask = stats.outlier_test(score, df, 0.0, cfg.z_scale)
    used = [s for s in ("universal", "margin", "weight-change") if s in p]
    ps, dfs = [p[s] for s in used], [null_df(cfg, s) for s in used]
    if mode == "fisher":
        ps, dfs = ps + [mask["p"]], dfs + [df]
    comb = stats.combine(torch.tensor(ps), tuple(dfs), scale=cfg.z_scale)
    tests = {"all-to-all": (scan["all_to_all"]["p"], cfg.all_to_all_share), "warp": (pm["warp"], cfg.warp_share)}
    if mode == "own":
        tests["mask"] = (mask["p_model"], share)
    tests["all-to-one"] = (comb["p_model"], 1.0 - sum(s for _, s in tests.values()))
    best = min(tests, key=lambda n: tests[n][0] / tests[n][1])
    p_value = min(1.0, tests[best][0] / tests[best][1])
    if p_value > cfg.alpha:
        return p_value, "none", [], mask
    if best == "all-to-all":
        return p_value, "all-to-all", [], mask
    per_class = {"warp": p["warp"], "mask": mask["p"]}.get(best, comb["p"])
    order = sorted(range(len(per_class)), key=lambda c: per_class[c])
    return p_value, "all-to-one", [order[0]] + [c for c in order[1:] if per_class[c] * len(order) <= cfg.alpha], mask


def report(root: Path, scores: Path, adjust: bool = False) -> None:
    rows = {tuple(r["key"]): r for r in map(json.loads, scores.open())}
    recs = [r for r in sorted(benchmark_scans(root), key=_key) if _key(r) in rows]
    for mode, df, share in SETTINGS:
        c = {"found": 0, "targets": 0, "a2a": 0, "a2a_runs": 0, "extra": 0, "fp": 0, "clean": 0, "alone_fp": 0}
        missed, z_clean, z_target = [], [], []
        for rec in recs:
            row = rows[_key(rec)]
            score = [-math.log(v) if ok else -math.inf for v, ok in zip(row["norm"], row["succeeded"], strict=True)]
            if adjust:  # as the universal signal: the residual on the class's clean logit gap
                gap = rec["scan"]["signals"]["universal"]["extra"]["clean_gap"]
                score = gap_adjusted(score, gap)[0]
            p_value, kind, suspected, mask = verdict(rec["scan"], score, mode, df, share)
            spec = rec.get("attack_spec") or {}
            if not spec:
                c["clean"] += 1
                c["fp"] += kind != "none"
                c["alone_fp"] += mask["p_model"] <= 0.05
                z_clean.append(max(mask["z"]))
            elif spec.get("mode") == "all2all":
                c["a2a_runs"] += 1
                c["a2a"] += kind == "all-to-all"
            else:
                t = int(spec["target"])
                c["targets"] += 1
                c["found"] += t in suspected
                c["extra"] += any(s != t for s in suspected)
                z_target.append(round(mask["z"][t], 1))
                if t not in suspected:
                    missed.append(f"{rec['attack_key']} clean {rec['clean_seed']}: p {p_value:.3g}")
        print(json.dumps({"mode": mode, "df": df, "share": share, **c, "max_z_clean": round(max(z_clean, default=0), 1),
                          "missed": missed}))
    print(json.dumps({"z_at_target": z_target}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--out", help="collect: append one line per scan to this JSONL file")
    ap.add_argument("--part", default="0/1", help="collect: this share of the scans (i/n)")
    ap.add_argument("--scores", help="verdicts: the collected JSONL file")
    ap.add_argument("--adjust", action="store_true", help="verdicts: take out natural reachability as the universal "
                    "signal does (the score's Theil-Sen residual on the clean logit gap)")
    args = ap.parse_args()
    if args.out:
        part, parts = map(int, args.part.split("/"))
        collect(Path(args.results), Path(args.out), part, parts)
    if args.scores:
        report(Path(args.results), Path(args.scores), args.adjust)


if __name__ == "__main__":
    main()
