"""Re-run some detection signals with other settings over a benchmark's stored scans, keep the
other signals' stored evidence, and decide again (docs/detection.md).

    python scripts/rescan_study.py RESULTS_DIR --signals universal --set uap_per_class=10 [--attacks sig,lc,none]

For every stored scan (``ulrl bench`` writes one per model and clean set) whose attack key starts
with one of ``--attacks``: loads the model and the same clean set, re-runs ``--signals`` with the
stored parameters plus ``--set``, puts the new evidence in place of the stored one (the all-to-all
test too, when the universal signal is re-run), and decides with :func:`ulrl.detection.scan.decide`.
Prints one line per run (old and new p-value and suspected classes, z at the true target) and a
summary: targets found, all-to-all found, clean classes suspected, false positives on clean models.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from ulrl.bench import benchmark_scans
from ulrl.checkpoints import load_checkpoint
from ulrl.data import load_dataset
from ulrl.detection import scan
from ulrl.detection.scan import config_from_parameters, decide
from ulrl.pipeline import select_clean


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--signals", default="universal")
    ap.add_argument("--set", action="append", default=[], help="NAME=VALUE of ScanConfig for the re-run signals")
    ap.add_argument("--attacks", default="", help="comma-separated attack-key prefixes (default: every scan)")
    args = ap.parse_args()
    overrides = {k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}
    signals = tuple(args.signals.split(","))
    prefixes = [p for p in args.attacks.split(",") if p]
    data = load_dataset("fashion-mnist")
    counts = {"found": 0, "targets": 0, "a2a": 0, "a2a_runs": 0, "extra": 0, "fp": 0, "clean": 0}
    root = Path(args.results)
    for rec in sorted(benchmark_scans(root), key=lambda r: (r["attack_key"], r["seed"], r["clean_seed"])):
        if prefixes and not any(rec["attack_key"].startswith(p) for p in prefixes):
            continue
        old = rec["scan"]
        model, _, _ = load_checkpoint(root / "models" / rec["dataset"] / rec["model"] / rec["attack_key"] / f"seed{rec['seed']}.safetensors")
        idx = select_clean(data, rec["clean_ratio"], None, rec["clean_seed"])
        cfg = config_from_parameters(old["parameters"], signals=signals, verdict_signals=None, **overrides)
        t0 = time.perf_counter()
        new = scan(model, data.train_x[idx], data.train_y[idx], cfg, progress=False)
        secs = time.perf_counter() - t0
        p = {s: old["signals"][s]["p"] for s in old["signals"]}
        pm = {s: old["signals"][s]["p_model"] for s in old["signals"]}
        for s in signals:
            p[s], pm[s] = new.signals[s].p, new.signals[s].p_model
        a2a = new.all_to_all if "universal" in signals else old.get("all_to_all") or {}
        full = config_from_parameters(old["parameters"], signals=tuple(p), verdict_signals=None)
        d = decide(p, pm, a2a, full)
        spec = rec.get("attack_spec") or {}
        truth = None if not spec else ("all" if spec.get("mode") == "all2all" else int(spec["target"]))
        z = {s: round(new.signals[s].z[truth], 1) for s in signals} if isinstance(truth, int) else {}
        zold = {s: round(old["signals"][s]["z"][truth], 1) for s in signals} if isinstance(truth, int) else {}
        if truth is None:
            counts["clean"] += 1
            counts["fp"] += bool(d["suspected"])
        elif truth == "all":
            counts["a2a_runs"] += 1
            counts["a2a"] += d["kind"] == "all-to-all"
        else:
            counts["targets"] += 1
            counts["found"] += truth in d["suspected"]
            counts["extra"] += any(c != truth for c in d["suspected"]) and d["kind"] == "all-to-one"
        print(json.dumps({"attack": rec["attack_key"], "seed": rec["seed"], "clean": rec["clean_seed"], "truth": truth,
                          "p_old": float(f"{old['p_value']:.3g}"), "p_new": float(f"{d['p_value']:.3g}"),
                          "sus_old": old["suspected"], "sus_new": d["suspected"], "z_old": zold, "z_new": z,
                          "max_z_new": {s: round(max(new.signals[s].z), 1) for s in signals}, "seconds": round(secs, 1)}),
              flush=True)
    print(json.dumps({"summary": counts, "signals": signals, "set": overrides, "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
