"""The universal signal's flip level (docs/detection.md, "The level"): measured over every scan a benchmark stored.

    python scripts/level_study.py RESULTS_DIR --out LEVELS.jsonl     # run the universal search again, keep its levels
    python scripts/level_study.py RESULTS_DIR --scores LEVELS.jsonl  # the verdicts at each level

The universal statistic is the radius at which a fraction (the level) of the other classes' images has flipped to a
class. One search gives every level up to the one it stops at (``uap_level``, 0.9). For every scan stored by ``ulrl
bench`` (a grid's scans, or the ones its ULRL cells ran), this runs the scan's universal search again on the same
model and clean set (same images, same seed) and keeps the radius at 0.25, 0.5, 0.75 and 0.9; then, per level,
recomputes the default verdict from the stored p-values of the other signals plus the universal signal's at that
level (reachability-adjusted as the scan does, default yardstick). Prints per level: targets found, all-to-all found,
clean classes also suspected, false positives, the smallest p of a clean model, the largest universal z on a clean
model, the three largest p of backdoored models; then the runs whose suspected classes differ from level 0.9's.
"""

import json
import math
import sys
from pathlib import Path

from ulrl.bench import benchmark_scans
from ulrl.detection import stats
from ulrl.detection.scan import config_from_parameters, decide, gap_adjusted, search_config
from ulrl.detection.universal import universal_radii

sys.path.insert(0, str(Path(__file__).parent))
from signal_study import rescaled, true_target  # noqa: E402
from study import append_line, key, main, stored_runs  # noqa: E402

LEVELS = ("0.25", "0.5", "0.75", "0.9")


def search(root: str, out: str) -> None:
    with open(out, "a") as f:
        for r, model, x, y, k in stored_runs(root, out):
            cfg = config_from_parameters(r["scan"]["parameters"], seed=r["clean_seed"])
            u = universal_radii(model, x, y, k, search_config(cfg, cfg.uap_min_rms, cfg.uap_max_rms, stop=cfg.uap_level),
                                seed=cfg.seed)
            append_line(f, {"run": key(r), "levels": {q: u["levels"][q] for q in LEVELS}})


def _decide(r: dict, radii: list[float]) -> tuple[dict, list[float]]:
    """The default verdict of scan ``r`` with the universal statistic ``radii``; and that signal's z."""
    score = [-math.log(v) if math.isfinite(v) else -math.inf for v in radii]
    gap = r["scan"]["signals"]["universal"]["extra"].get("clean_gap")  # absent: the scan did not adjust (uap_adjust, < 8 classes)
    return universal_verdict(r, gap_adjusted(score, gap)[0] if gap is not None else score)


def universal_verdict(r: dict, score: list[float]) -> tuple[dict, list[float]]:
    """The default verdict of scan ``r`` (default yardstick) with the universal signal's score replaced by ``score``
    (already adjusted for the clean gap); and that signal's z."""
    sc = rescaled(r["scan"], "trimmed", {})
    cfg = config_from_parameters(sc["parameters"])
    test = stats.outlier_test(score, cfg.null_df_universal, 0.0, cfg.z_scale)
    p = {s: e["p"] for s, e in sc["signals"].items()}
    pm = {s: e["p_model"] for s, e in sc["signals"].items()}
    p["universal"], pm["universal"] = test["p"], test["p_model"]
    return decide(p, pm, sc["all_to_all"], cfg), test["z"]


def verdicts(root: str, scores: str) -> None:
    levels = {d["run"]: d["levels"] for d in map(json.loads, open(scores))}
    records = [r for r in benchmark_scans(root) if key(r) in levels]
    out = {q: {key(r): (true_target(r["attack_spec"]), *_decide(r, levels[key(r)][q])) for r in records} for q in LEVELS}
    print(f"{len(records)} scans of {root}\n")
    print("| level | target found | all-to-all found | clean class also suspected | false positives | smallest clean p "
          "| largest clean universal z | largest backdoored p |")
    print("|---|---|---|---|---|---|---|---|")
    for q, runs in out.items():
        one = [(t, d) for t, d, _ in runs.values() if isinstance(t, int)]
        a2a = [d for t, d, _ in runs.values() if t == "all"]
        clean = [(d, z) for t, d, z in runs.values() if t is None]
        worst = sorted(d["p_value"] for t, d, _ in runs.values() if t is not None)[-3:]
        print(f"| {q} | {sum(t in d['suspected'] for t, d in one)}/{len(one)} | {sum(d['kind'] == 'all-to-all' for d in a2a)}"
              f"/{len(a2a)} | {sum(any(c != t for c in d['suspected']) for t, d in one)} | "
              f"{sum(bool(d['suspected']) for d, _ in clean)}/{len(clean)} | "
              f"{min((d['p_value'] for d, _ in clean), default=math.nan):.3g} | "
              f"{max((max(z) for _, z in clean), default=math.nan):.1f} | {', '.join(f'{p:.2g}' for p in worst)} |")
    print("\nRuns whose suspected classes differ from level 0.9's:")
    for k, (t, d, _) in out["0.75"].items():
        old = out["0.9"][k][1]
        if d["suspected"] != old["suspected"]:
            print(f"    {k}: target {t}: 0.9 {old['suspected']} (p {old['p_value']:.3g}) -> 0.75 {d['suspected']} "
                  f"(p {d['p_value']:.3g})")


if __name__ == "__main__":
    main(search, verdicts, "universal search")
