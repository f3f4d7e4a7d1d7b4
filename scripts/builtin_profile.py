"""Build a reference profile (src/ulrl/detection/reference.py) from the clean-model scans that ``ulrl bench`` stored,
and the table of docs/detection.md, "The reference test".

    L=runs/research/levels
    python scripts/builtin_profile.py --out src/ulrl/detection/profiles/fashion-mnist-cnn-small.json \\
        runs/bench-v8:$L/v8.jsonl runs/bench-heldout-b:$L/heldout-b.jsonl runs/bench-heldout-c   # the shipped profile
    python scripts/builtin_profile.py --study runs/bench-v8:$L/v8.jsonl runs/bench-heldout:$L/heldout.jsonl \\
        runs/bench-heldout-b:$L/heldout-b.jsonl runs/bench-heldout-c runs/bench-heldout-c2 runs/bench-heldout-d \\
        [--profile P]                                                      # verdicts with and without the reference test
    python scripts/builtin_profile.py --show builtin:fashion-mnist-cnn-small                   # the profile, per class

A directory may be followed by ``:LEVELS.jsonl``, the radii ``scripts/level_study.py --out`` wrote for its scans: scans
stored before the universal statistic moved to level 0.75 (their parameters have no ``uap_score_level``) are then
scored as the scan now scores them, as ``scripts/level_study.py`` does; the clean models' scores of the shipped profile
are those.

``--study`` recomputes every stored scan's default verdict with the reference test added (the scan's own ``decide``;
the scan's stored p-values for everything else). A clean model's own scans are left out of the profile it is judged
against (leave one model out, built from the clean models of the directories given); backdoored models are judged
against the profile of every clean model given, or ``--profile``.
"""
import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from signal_study import rescaled, true_target  # noqa: E402
from study import key  # noqa: E402

from ulrl.bench import benchmark_scans  # noqa: E402
from ulrl.checkpoints import write_json  # noqa: E402
from ulrl.detection import (
    reference,  # noqa: E402
    stats,  # noqa: E402
)
from ulrl.detection.scan import config_from_parameters, decide, gap_adjusted  # noqa: E402

LEVEL = "0.75"


def records(spec: str) -> list[tuple[str, dict]]:
    """(directory, record) of every stored scan of ``DIR[:LEVELS.jsonl]``, each scan as the default scores it now
    (trimmed yardstick; universal statistic at level 0.75)."""
    root, _, levels_file = spec.partition(":")
    levels = {d["run"]: d["levels"] for d in map(json.loads, open(levels_file))} if levels_file else {}
    out = []
    for r in benchmark_scans(root):
        sc = rescaled(r["scan"], "trimmed", {})
        if sc["parameters"].get("uap_score_level") is None:
            if key(r) not in levels:
                raise SystemExit(f"{root}: {key(r)} was scored at level 0.9 and {levels_file or 'no levels file'} "
                                 f"has no radii for it (scripts/level_study.py --out)")
            u = sc["signals"]["universal"]
            score = gap_adjusted([-math.log(v) for v in levels[key(r)][LEVEL]], u["extra"]["clean_gap"])[0]
            test = stats.outlier_test(score, config_from_parameters(sc["parameters"]).null_df_universal, 0.0, "trimmed")
            u.update(score=score, z=test["z"], p=test["p"], p_model=test["p_model"])
            sc["parameters"] = {**sc["parameters"], "uap_score_level": float(LEVEL)}
        out.append((root, {**r, "scan": sc}))
    return out


def model_id(r: dict) -> str:
    return f"{r['attack_key']}:{r['seed']}"


def clean_scans(specs: list[str]) -> list[tuple[str, dict, str, dict]]:
    """(model id, scan, directory, record) of every clean-model scan stored under ``specs``."""
    return [(model_id(r), r["scan"], root, r) for spec in specs for root, r in records(spec) if r["attack_spec"] is None]


def meta_of(root: str, r: dict) -> dict:
    return json.loads((Path(root) / "models" / r["dataset"] / r["model"] / r["attack_key"] / f"seed{r['seed']}.json").read_text())


def build(specs: list[str], out: str) -> None:
    scans = clean_scans(specs)
    match = reference.match_key(meta_of(scans[0][2], scans[0][3]))
    for _, _, root, r in scans:  # every reference model must have been trained as the first one was
        if reference.match_key(meta_of(root, r)) != match:
            raise SystemExit(f"{root}: {key(r)} was trained with another recipe")
    name = Path(out).stem
    prof = reference.build_profile([(m, s) for m, s, _, _ in scans], name, match,
                                   source=f"python scripts/builtin_profile.py --out {out} {' '.join(specs)}")
    write_json(out, prof)
    print(f"wrote {out}: {prof['models']} models, {prof['scans']} scans")


OPTIONS: dict = {}


def verdict(r: dict, ref: dict | None) -> dict:
    sc = r["scan"]
    cfg = config_from_parameters(sc["parameters"], **({"reference_share": OPTIONS["share"]} if OPTIONS.get("share") else {}))
    p = {s: e["p"] for s, e in sc["signals"].items()}
    pm = {s: e["p_model"] for s, e in sc["signals"].items()}
    scores = {s: reference._scores(sc, s) for s in reference.SIGNALS}
    test = reference.reference_test(scores, ref) if ref else None
    d = decide(p, pm, sc["all_to_all"], cfg, test)
    if OPTIONS.get("others") and d["test"] == "reference":
        k = len(test["p"])
        d["suspected"] = [test["top"]] + [c for c in range(k) if c != test["top"] and test["p"][c] * k <= cfg.alpha]
    return d


def study(specs: list[str], given: str | None) -> None:
    clean = clean_scans(specs)
    full = reference.load_profile(given) if given else \
        reference.build_profile([(m, s) for m, s, _, _ in clean], "all clean models given")
    rows = []
    for spec in specs:
        for root, r in records(spec):
            t = true_target(r["attack_spec"])
            if t is None and not given:
                mine = model_id(r)
                ref = reference.build_profile([(m, s) for m, s, _, _ in clean if m != mine], "leave one out")
            else:
                ref = full
            rows.append((root, key(r), t, verdict(r, None), verdict(r, ref)))
    print("| run | target | without: p, suspected | with the reference test: p, suspected, decided by |")
    print("|---|---|---|---|")
    for root, k, t, a, b in rows:
        print(f"| {Path(root).name} {k} | {t} | {a['p_value']:.3g} {a['suspected']} | {b['p_value']:.3g} {b['suspected']} "
              f"{b['test'] or ''} |")
    print()
    changed = [(k, a["suspected"], b["suspected"]) for _, k, t, a, b in rows if a["suspected"] != b["suspected"]]
    print(f"suspected classes changed in {len(changed)} runs: {changed}")
    print(f"decided by the reference test: {sum(b['test'] == 'reference' for _, _, t, _, b in rows if isinstance(t, int))} "
          f"of the all-to-one runs")
    for label, i in (("without", 3), ("with the reference test", 4)):
        one = [(row[2], row[i]) for row in rows if isinstance(row[2], int)]
        a2a = [row[i] for row in rows if row[2] == "all"]
        cl = [row[i] for row in rows if row[2] is None]
        print(f"{label}: all-to-one targets found {sum(t in d['suspected'] for t, d in one)}/{len(one)}, "
              f"a clean class also suspected {sum(any(c != t for c in d['suspected']) for t, d in one)}, "
              f"all-to-all found {sum(d['kind'] == 'all-to-all' for d in a2a)}/{len(a2a)}, "
              f"false positives {sum(bool(d['suspected']) for d in cl)}/{len(cl)} "
              f"(smallest clean p {min((d['p_value'] for d in cl), default=float('nan')):.3g})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("roots", nargs="*")
    ap.add_argument("--show", help="print a profile's mean and spread per class")
    ap.add_argument("--out")
    ap.add_argument("--study", action="store_true")
    ap.add_argument("--profile")
    ap.add_argument("--signals", help="study only: the signals compared (default: reference.SIGNALS)")
    ap.add_argument("--share", type=float, help="study only: reference_share")
    ap.add_argument("--df", type=float, help="study only: the t tail's degrees of freedom instead of n - 1")
    ap.add_argument("--others-by-reference", action="store_true",
                    help="study only: suspect, beside the reference's class, the others below alpha / K in the reference test")
    a = ap.parse_args()
    if a.show:
        prof = reference.load_profile(a.show)
        print(f"{prof['name']}: {prof['models']} models, {prof['scans']} scans\n")
        print("| class | " + " | ".join(f"{sg} mean | sd" for sg in reference.SIGNALS) + " |")
        print("|---|" + "---|---|" * len(reference.SIGNALS))
        for c in range(prof["num_classes"]):
            print(f"| {c} | " + " | ".join(f"{prof['signals'][sg]['mean'][c]:.3f} | {prof['signals'][sg]['sd'][c]:.3f}"
                                           for sg in reference.SIGNALS) + " |")
    if a.out:
        build(a.roots, a.out)
    if a.signals:
        reference.SIGNALS = tuple(a.signals.split(","))
    if a.df:
        t_sf = reference.t_sf
        reference.t_sf = lambda t, df: t_sf(t, a.df)
    OPTIONS.update(share=a.share, others=a.others_by_reference)
    if a.study:
        study(a.roots, a.profile)
