"""Would a rank-1 universal perturbation search find SIG? (docs/detection.md, "What still fails")

    python scripts/lowrank_study.py RESULTS_DIR --out SCORES.jsonl     # run the search on every scanned model and clean set
    python scripts/lowrank_study.py RESULTS_DIR --scores SCORES.jsonl  # the verdicts only, from stored scores

SIG's trigger is a horizontal sine: every row the same, a matrix of rank 1. For every scan a
benchmark stored (``ulrl bench``), this runs the scan's universal search again on the same model
and clean set with each perturbation kept at rank 1 per channel (``UniversalConfig.rank``), scores
it like the universal signal (``-log radius``, regressed on the clean logit gap) and, from the
stored scores of the other signals (default yardstick), recomputes the default verdict with the
rank-1 signal as one more term of the per-class Fisher sum (its null a normal or a t with 5 or 3
degrees of freedom), or folded into the universal signal (per class the smaller of the two
p-values, Sidak-corrected). Prints targets found, clean classes also suspected, false positives on
clean models, and every run whose decision changes.
"""

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
    search_resolution,
    universal_signal,
)

sys.path.insert(0, str(Path(__file__).parent))
from signal_study import rescaled, true_target  # noqa: E402
from study import append_line, key, main, stored_runs  # noqa: E402


def search(root: str, out: str) -> None:
    with open(out, "a") as f:
        for r, model, x, y, k in stored_runs(root, out):
            # the scan's universal signal (score regressed on the clean logit gap), its search held to rank 1
            cfg = config_from_parameters(r["scan"]["parameters"], seed=r["clean_seed"], uap_draws=1)
            radius, score, _ = universal_signal(model, x, y, k, cfg, False, rank=1)
            append_line(f, {"run": key(r), "radius": radius, "score": score})


def verdicts(root: str, scores: str) -> None:
    low_rank = {d["run"]: d["score"] for d in map(json.loads, open(scores))}
    records = [r for r in benchmark_scans(root) if key(r) in low_rank]
    floor = search_resolution(ScanConfig())  # unreached classes tie at the cap

    def run(how: str, df: float) -> dict:
        out = {}
        for r in records:
            sc = rescaled(r["scan"], "trimmed", {})
            cfg = config_from_parameters(sc["parameters"])
            p = {s: e["p"] for s, e in sc["signals"].items()}
            pm = {s: e["p_model"] for s, e in sc["signals"].items()}
            if how != "base":
                low = stats.outlier_test(low_rank[key(r)], df, floor, "trimmed")
                if how == "fisher":
                    p["low-rank"], pm["low-rank"], cfg.null_df_low_rank = low["p"], low["p_model"], df
                else:  # the smaller of the two p-values per class, Sidak-corrected for taking it
                    p["universal"] = [1 - (1 - min(a, b)) ** 2 for a, b in zip(p["universal"], low["p"], strict=True)]
            d = decide(p, pm, sc["all_to_all"], cfg)
            out[key(r)] = (true_target(r["attack_spec"]), d["suspected"], d["p_value"])
        found = sum(t in s for t, s, _ in out.values() if isinstance(t, int))
        targets = sum(isinstance(t, int) for t, _, _ in out.values())
        other = sum(any(c != t for c in s) for t, s, _ in out.values() if isinstance(t, int))
        fp = sum(bool(s) for t, s, _ in out.values() if t is None)
        clean = sum(t is None for t, _, _ in out.values())
        print(f"{how:7s} null df {df}: target found {found}/{targets}, clean class also suspected {other}, "
              f"false positives {fp}/{clean}")
        return out

    base = run("base", math.inf)
    for how, df in (("sidak", math.inf), ("fisher", math.inf), ("fisher", 5.0), ("fisher", 3.0)):
        for k, (t, s, pv) in run(how, df).items():
            if bool(s) != bool(base[k][1]) or (isinstance(t, int) and (t in s) != (t in base[k][1])):
                print(f"    {k}: target {t}, suspected {base[k][1]} (p {base[k][2]:.3g}) -> {s} (p {pv:.3g})")


if __name__ == "__main__":
    main(search, verdicts, "rank-1 search")
