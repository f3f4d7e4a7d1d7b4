"""ULRL's relearning variants with the true target flagged (docs/method.md, Finding 4).

    python scripts/repair_study.py CKPT [CKPT ...] [--seeds 0] --variants '{"name": {"option": value}, ...}'

For each poisoned checkpoint and clean-set seed the detection scan runs once; its suspected
classes are then replaced by the attack's true target (all classes for all-to-all), so that every
variant relearns the same rows and only the repair differs (an oracle for detection, never for
the repair). Prints one JSON line per run: ACC/ASR/RA after, per-class accuracy before and after.
"""

import argparse
import json

import ulrl.defenses.ulrl as method
from ulrl.checkpoints import load_checkpoint
from ulrl.cli import _attack_for
from ulrl.data import load_dataset
from ulrl.metrics import predict
from ulrl.pipeline import run_defense, select_clean


def per_class(model, data) -> list[float]:
    pred = predict(model, data.test_x)
    return [round(((pred == data.test_y) & (data.test_y == c)).sum().item() / max(1, (data.test_y == c).sum().item()), 3)
            for c in range(data.num_classes)]


def oracle(real_scan, truth: list[int], cached: dict):
    """A stand-in for the scan: runs it once (kept in ``cached["result"]``, its own verdict in ``cached["found"]``) and
    replaces its suspected classes by ``truth``, so that every variant relearns the same rows."""
    def oracle_scan(m, x, y, cfg, progress=True):
        if "result" not in cached:
            cached["result"] = real_scan(m, x, y, cfg, progress=False)
            cached["found"] = cached["result"].suspected
            cached["result"].suspected = truth
        return cached["result"]

    return oracle_scan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--variants", required=True, help="JSON: variant name -> ULRL options over the default preset")
    args = ap.parse_args()
    variants = json.loads(args.variants)
    real_scan = method.scan
    for ckpt in args.checkpoints:
        model, meta, tensors = load_checkpoint(ckpt)
        data = load_dataset(meta["dataset"])
        attack = _attack_for(None, meta, data.num_classes, tensors)
        spec = meta["attack"]
        truth = list(range(data.num_classes)) if spec.get("mode") == "all2all" else [spec["target"]]
        before_classes = per_class(model, data)
        for seed in (int(s) for s in args.seeds.split(",")):
            idx = select_clean(data, 0.01, None, seed)
            cached = {}
            method.scan = oracle(real_scan, truth, cached)
            for name, options in variants.items():
                repaired, report, r = run_defense(model, data, idx, attack, "ulrl", "default", {"seed": seed, **options},
                                                  progress=False, monitor_size=0, before=meta.get("test_metrics"))
                print(json.dumps({"checkpoint": ckpt, "seed": seed, "variant": name, "scan_found": cached["found"],
                                  "flagged": report.flagged, "before": r["before"], "after": r["after"],
                                  "acc_drop_points": round(100 * (r["before"]["acc"] - r["after"]["acc"]), 2),
                                  "per_class_before": before_classes, "per_class_after": per_class(repaired, data),
                                  "relearn_seconds": round(report.seconds.get("relearn", 0.0), 1)}), flush=True)
            method.scan = real_scan


if __name__ == "__main__":
    main()
