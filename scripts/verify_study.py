"""Does the repaired model still reach the flagged class abnormally easily? (docs/method.md, Finding 12)

    python scripts/verify_study.py CKPT [CKPT ...] [--seeds 0] [--variants JSON]

For each poisoned checkpoint and clean-set seed the detection scan runs once and its suspected classes are replaced
by the attack's true target (an oracle for detection, as in scripts/repair_study.py). Each variant relearns; the
repaired model is then scanned again (the universal, pull, margin and warp signals, the same reference profile) and
the line reports, for the target class, each signal's z, the combined and reference p, beside ACC/ASR/RA after.
"""

import argparse
import dataclasses
import json
from types import SimpleNamespace

import torch
from repair_study import oracle  # a sibling script: run as python scripts/verify_study.py

import ulrl.defenses.ulrl as method
from ulrl.checkpoints import load_checkpoint
from ulrl.cli import _attack_for
from ulrl.data import load_dataset
from ulrl.data.transforms import to_float
from ulrl.pipeline import run_defense, select_clean

CHECK = ("universal", "pull", "margin", "warp")


def at(result, c: int) -> dict:
    ref = result.reference or {}
    return {"p_class": float(f"{result.p_class[c]:.3g}"),
            "p_ref": None if not ref else float(f"{ref['p'][c]:.3g}"),
            "z_ref": None if not ref else {s: round(v[c], 2) for s, v in ref["z"].items()},
            "z": {s: round(e.z[c], 2) for s, e in result.signals.items()},
            "p_warp": float(f"{result.signals['warp'].p[c]:.3g}") if "warp" in result.signals else None}


@torch.no_grad()
def flips(model, x, y, delta, c: int) -> list[float]:
    """Fraction of the clean images not of class ``c`` sent to ``c`` by ``delta`` at scales 1, 0.5, 0.25."""
    keep = y != c
    xs = to_float(x[keep])
    out = []
    for s in (1.0, 0.5, 0.25):
        pred = model.eval()((xs + s * delta).clamp(0, 1)).argmax(1)
        out.append(round((pred == c).float().mean().item(), 3))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--variants", default='{"none": {"trigger_unlearn": 0}, "whole": {"relearn_budget": null}}')
    ap.add_argument("--no-rescan", action="store_true", help="only the shortcut's flip rate, no scan of the repaired model")
    args = ap.parse_args()
    variants = json.loads(args.variants)
    real_scan = method.scan
    for ckpt in args.checkpoints:
        model, meta, tensors = load_checkpoint(ckpt)
        data = load_dataset(meta["dataset"])
        attack = _attack_for(None, meta, data.num_classes, tensors)
        target = meta["attack"]["target"]
        for seed in (int(s) for s in args.seeds.split(",")):
            idx = select_clean(data, 0.01, None, seed)
            cached = {}
            method.scan = oracle(real_scan, [target], cached)
            for name, options in variants.items():
                repaired, report, r = run_defense(model, data, idx, attack, "ulrl", "default", {"seed": seed, **options},
                                                  progress=False, monitor_size=0, before=meta.get("test_metrics"), meta=meta)
                if "before" not in cached:  # the original model and its scan, once
                    cached["before"] = {**at(cached["result"], target), "flips": flips(
                        model, data.train_x[idx], data.train_y[idx], cached["result"].perturbations[target], target)}
                cfg = method.ULRLConfig(**report.config)
                check = dataclasses.replace(method.scan_config(cfg), signals=CHECK, all_to_all_share=0.0)
                after = None if args.no_rescan else real_scan(repaired, data.train_x[idx], data.train_y[idx], check, progress=False)
                flipped = flips(repaired, data.train_x[idx], data.train_y[idx], cached["result"].perturbations[target], target)
                plan = SimpleNamespace(result=cached["result"], targets=[target], x=data.train_x[idx], y=data.train_y[idx])
                survival = round(method.shortcut_survival(repaired, plan, cfg)[0], 3)
                print(json.dumps({"checkpoint": ckpt.split("/")[-2], "seed": seed, "target": target, "variant": name,
                                  "scan_found": cached["found"], "acc_drop": round(100 * (r["before"]["acc"] - r["after"]["acc"]), 2),
                                  "asr": round(100 * r["after"]["asr"], 2), "ra": round(100 * r["after"]["ra"], 1),
                                  "shrink": report.extra.get("trigger_shrink"), "before": cached["before"],
                                  "after": {**({} if after is None else at(after, target)), "flips": flipped, "survival": survival}}), flush=True)
            method.scan = real_scan


if __name__ == "__main__":
    main()
