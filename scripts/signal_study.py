"""How each detection signal, and each combination of them, would have decided (docs/detection.md).

    python scripts/signal_study.py RESULTS_DIR [RESULTS_DIR ...] [--alpha 0.05] [--raw-universal] [--warp-in-fisher]
                                   [--z-scale trimmed|mad [--set null_df_weight_change=2 ...]]

Reads the scans of a benchmark results directory (``ulrl bench`` writes one per model and clean
set) and, from the per-class p-values each scan stored for every signal, recomputes the verdict
for every subset of signals (the scan's own decision: Fisher combination, the all-to-all and warp
tests). Prints, per
subset: backdoored runs whose true target was found, all-to-all runs found, and false positives on
clean models; then the per-run z of each signal at the true target. Nothing is re-run.
``--raw-universal`` recomputes the universal signal's p-values from its unadjusted score (before
the regression on the clean logit gap), to compare the two; ``--warp-in-fisher`` puts the warp
signal into the per-class Fisher sum instead of giving it its own test; ``--z-scale`` recomputes every
signal's z and p from its stored score with that yardstick (the scans store the scale they used), and
``--set`` changes a parameter of that recomputation (a null's tail).
"""

import argparse
import itertools
import math

from ulrl.bench import benchmark_scans
from ulrl.detection import stats
from ulrl.detection.scan import config_from_parameters, decide, search_resolution


def true_target(spec):
    if not spec:
        return None
    return "all" if spec.get("mode") == "all2all" else int(spec["target"])


def _raw(scan: dict) -> dict:
    """The scan with the universal signal's p-values recomputed from its raw (unadjusted) score."""
    u = scan["signals"]["universal"]
    raw = [-math.inf if v is None else v for v in u["extra"]["raw_score"]]
    test = stats.outlier_test(raw, float(scan["parameters"]["null_df_universal"] or math.inf),
                              scale=config_from_parameters(scan["parameters"]).z_scale)
    return {**scan, "signals": {**scan["signals"], "universal": {**u, "p": test["p"], "z": test["z"], "p_model": test["p_model"]}}}


def rescaled(scan: dict, scale: str, overrides: dict) -> dict:
    """The scan with every signal's z and p recomputed from its stored score with the yardstick ``scale``
    (and the parameters ``overrides``)."""
    cfg = config_from_parameters(scan["parameters"], z_scale=scale, **overrides)
    signals = {}
    for name, ev in scan["signals"].items():
        floor = search_resolution(cfg) if name == "warp" else 0.0
        score = [-math.inf if v is None else v for v in ev["score"]]
        test = stats.outlier_test(score, getattr(cfg, "null_df_" + name.replace("-", "_")), floor, scale)
        signals[name] = {**ev, "p": test["p"], "z": test["z"], "p_model": test["p_model"]}
    return {**scan, "signals": signals, "parameters": {**scan["parameters"], "z_scale": scale, **overrides}}


def verdict(scan: dict, signals: tuple[str, ...], alpha: float, warp_in_fisher: bool = False) -> tuple[bool, list[int], str]:
    """The scan's own decision (:func:`ulrl.detection.scan.decide`) with only ``signals``
    (``warp_in_fisher``: the warp signal joins the per-class Fisher sum instead of its own test)."""
    cfg = config_from_parameters(scan["parameters"], alpha=alpha, signals=signals,
                                 verdict_signals=signals if warp_in_fisher else None)
    a2a = scan["all_to_all"] if scan.get("all_to_all") and "universal" in signals else {}
    d = decide({s: scan["signals"][s]["p"] for s in signals}, {s: scan["signals"][s]["p_model"] for s in signals}, a2a, cfg)
    return bool(d["suspected"]), d["suspected"], d["kind"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--raw-universal", action="store_true", help="the universal signal without the clean-gap adjustment")
    ap.add_argument("--warp-in-fisher", action="store_true", help="the warp signal in the per-class Fisher sum, not its own test")
    ap.add_argument("--z-scale", choices=stats.SCALES, help="recompute every signal's z and p with this yardstick")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="with --z-scale: e.g. null_df_weight_change=2")
    args = ap.parse_args()
    records = [r for d in args.results for r in benchmark_scans(d)]
    if args.z_scale:
        overrides = {k: float(v) for k, v in (item.split("=", 1) for item in args.set)}
        records = [{**r, "scan": rescaled(r["scan"], args.z_scale, overrides)} for r in records]
    if args.raw_universal:
        records = [{**r, "scan": _raw(r["scan"])} for r in records]
    names = sorted(records[0]["scan"]["signals"])
    print(f"{len(records)} scans; signals {names}; alpha {args.alpha}\n")
    print("| signals | target found (all-to-one) | all-to-all found | clean class also suspected | false positives on clean models |")
    print("|---|---|---|---|---|")
    for n in range(1, len(names) + 1):
        for subset in itertools.combinations(names, n):
            if "pull" in subset and "universal" not in subset:
                continue  # the pull reads the universal search
            found = total = a2a_found = a2a_total = extra = fp = clean = 0
            for r in records:
                truth = true_target(r.get("attack_spec"))
                det, sus, kind = verdict(r["scan"], subset, args.alpha, args.warp_in_fisher)
                if truth is None:
                    clean += 1
                    fp += det
                elif truth == "all":
                    a2a_total += 1
                    a2a_found += kind == "all-to-all"
                else:
                    total += 1
                    found += truth in sus
                    extra += kind == "all-to-one" and any(c != truth for c in sus)
            print(f"| {' + '.join(subset)} | {found}/{total} | {a2a_found}/{a2a_total} | {extra}/{total} | {fp}/{clean} |")
    print("\nPer run, z of each signal at the true target (all-to-one runs), and the scan's p-value and suspected classes:\n")
    print("| attack | clean seed | " + " | ".join(f"{s} z" for s in names) + " | p | suspected |")
    print("|---|---|" + "---|" * len(names) + "---|---|")
    for r in sorted(records, key=lambda r: (r["attack"], r["seed"], r["clean_seed"])):
        truth = true_target(r.get("attack_spec"))
        if not isinstance(truth, int):
            continue
        zs = " | ".join(f"{r['scan']['signals'][s]['z'][truth]:.1f}" for s in names)
        cfg = config_from_parameters(r["scan"]["parameters"], alpha=args.alpha)
        d = decide({s: r["scan"]["signals"][s]["p"] for s in names}, {s: r["scan"]["signals"][s]["p_model"] for s in names},
                   r["scan"].get("all_to_all") or {}, cfg)  # the decision as recomputed (= stored unless rescaled)
        print(f"| {r['attack']} | {r['clean_seed']} | {zs} | {d['p_value']:.2g} | {d['suspected']} |")


if __name__ == "__main__":
    main()
