"""The pull signal (docs/detection.md): measured over every scan a benchmark stored.

    python scripts/pull_study.py RESULTS_DIR --out SCORES.jsonl     # run the universal search again, keep its margins
    python scripts/pull_study.py RESULTS_DIR --scores SCORES.jsonl  # the verdicts, from the stored scans plus the pull

For every scan stored by ``ulrl bench`` (scanned before the pull signal existed), this runs the
scan's universal search again on the same model and clean set (same images, same seed), reads the
pull off its margins at several radii (``pull_ratio``), and recomputes the default verdict from the
stored p-values of the other signals plus the pull's (default yardstick), for each ratio and tail
of the pull's null. Prints targets found, clean classes also suspected, false positives on clean
models, the pull alone, and the runs whose decision the default setting changes.
"""

import dataclasses
import json
import math
import sys
from pathlib import Path

from ulrl.bench import benchmark_scans
from ulrl.detection import stats
from ulrl.detection.scan import (
    ScanConfig,
    config_from_parameters,
    decide,
    pull_signal,
    universal_signal,
)

sys.path.insert(0, str(Path(__file__).parent))
from signal_study import rescaled, true_target  # noqa: E402
from study import append_line, key, main, stored_runs  # noqa: E402

RATIOS = (0.3, 0.4, 0.5, 0.6)


def search(root: str, out: str) -> None:
    with open(out, "a") as f:
        for r, model, x, y, k in stored_runs(root, out):
            cfg = config_from_parameters(r["scan"]["parameters"], seed=r["clean_seed"], uap_draws=1)  # the scan's own search
            radius, _, extra = universal_signal(model, x, y, k, cfg, False)
            pull = {f"{q:g}": pull_signal(extra["curves"], dataclasses.replace(cfg, pull_ratio=q))[0] for q in RATIOS}
            append_line(f, {"run": key(r), "radius": radius, "pull": pull})


def verdicts(root: str, scores: str) -> None:
    pulls = {d["run"]: d["pull"] for d in map(json.loads, open(scores))}
    records = [r for r in benchmark_scans(root) if key(r) in pulls]

    def run(ratio: str | None, df: float, alone: bool = False) -> dict:
        out = {}
        for r in records:
            sc = rescaled(r["scan"], "trimmed", {})
            cfg = config_from_parameters(sc["parameters"])
            p = {s: e["p"] for s, e in sc["signals"].items()}
            pm = {s: e["p_model"] for s, e in sc["signals"].items()}
            if ratio is not None:
                test = stats.outlier_test(pulls[key(r)][ratio], df, 0.0, "trimmed")
                if alone:
                    p, pm, cfg = {"pull": test["p"]}, {"pull": test["p_model"]}, dataclasses.replace(
                        cfg, signals=("universal", "pull"), verdict_signals=("pull",), all_to_all_share=0.0, warp_share=0.0)
                else:
                    p["pull"], pm["pull"] = test["p"], test["p_model"]
                    cfg = dataclasses.replace(cfg, signals=tuple(p), verdict_signals=None)
                cfg.null_df_pull = df
            d = decide(p, pm, sc["all_to_all"] if not alone else {}, cfg)
            out[key(r)] = (true_target(r["attack_spec"]), d["suspected"], d["p_value"])
        found = sum(t in s for t, s, _ in out.values() if isinstance(t, int))
        targets = sum(isinstance(t, int) for t, _, _ in out.values())
        a2a = sum(bool(s) for t, s, _ in out.values() if t == "all")
        other = sum(any(c != t for c in s) for t, s, _ in out.values() if isinstance(t, int))
        fp = sum(bool(s) for t, s, _ in out.values() if t is None)
        clean = sum(t is None for t, _, _ in out.values())
        print(f"{'no pull' if ratio is None else ('pull alone' if alone else 'with pull')} ratio {ratio} null df {df}: "
              f"target found {found}/{targets}, all-to-all {a2a}/{sum(t == 'all' for t, _, _ in out.values())}, "
              f"clean class also suspected {other}, false positives {fp}/{clean}"
              + (f" (their p {min(cp):.2g} to {max(cp):.2g})" if (cp := [pv for t, _, pv in out.values() if t is None]) else ""))
        return out

    base = run(None, math.inf)
    for ratio in pulls[next(iter(pulls))]:
        for df in (math.inf, 5.0, 3.0):
            run(ratio, df, alone=True)
            changed = run(ratio, df)
            if ratio == f"{ScanConfig.pull_ratio:g}" and df == ScanConfig.null_df_pull:
                for k, (t, s, pv) in changed.items():
                    if bool(s) != bool(base[k][1]) or (isinstance(t, int) and (t in s) != (t in base[k][1])) or s != base[k][1]:
                        print(f"    {k}: target {t}, suspected {base[k][1]} (p {base[k][2]:.3g}) -> {s} (p {pv:.3g})")


if __name__ == "__main__":
    main(search, verdicts, "universal search")
