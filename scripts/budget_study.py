"""The relearning budget's evidence from stored bench cells (docs/method.md, Finding 11).

For every ULRL cell that relearned (something flagged), the change of the clean set's accuracy on the classes not
flagged (the number the budget reads: relearning trains on these images, so it normally rises) next to the test ACC
drop and ASR after (which no decision reads). Prints one line per cell, sorted by the clean-set change, and a summary.

    python scripts/budget_study.py runs/bench-v8 runs/bench-heldout runs/bench-heldout-b ... [--budget 0.01]

With ``--summary``: issue 8's criteria over the backdoored models' ULRL cells, a later bench's cell replacing an
earlier one's of the same attack and clean set (``--summary runs/bench-v8 runs/bench-v8-budget``: the zoo with the
cells run again in the second).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def cells(root: Path):
    for f in sorted(root.glob("cells/**/ulrl/*.json")):
        d = json.loads(f.read_text())
        r = d.get("report") or {}
        e = r.get("extra") or {}
        if not e.get("relearn_attempts"):
            continue  # nothing flagged: no relearning
        whole = [a for a in e["relearn_attempts"] if a.get("trigger_shrink", 1.0) == 1.0]
        if not whole:
            continue  # verify_repair kept a relearning without trigger unlearning: the budget had nothing to read
        first = whole[-1]  # after any guard retry
        yield {"bench": root.name, "cell": f"{d['attack_key']} clean {d['clean_seed']}", "flagged": r.get("flagged"),
               "cost": 100 * (e["clean_set_acc_before"] - first["clean_set_acc_after"]),
               "drop": 100 * (d["before"]["acc"] - d["after"]["acc"]),
               "asr": None if d["after"].get("asr") is None else 100 * d["after"]["asr"],
               "tries": [(a.get("trigger_shrink", 1.0), round(100 * a["clean_set_acc_after"], 1)) for a in e["relearn_attempts"]]}


def summary(benches: list[Path]) -> None:
    latest = {}
    for root in benches:
        for f in sorted(root.glob("cells/**/ulrl/*.json")):
            d = json.loads(f.read_text())
            if d["before"].get("asr") is not None:  # a backdoored model (a clean one has no ASR)
                latest[(d["attack_key"], d["clean_seed"])] = d
    if not latest:
        raise SystemExit("no ULRL cell of a backdoored model under " + ", ".join(map(str, benches)))
    asr = [100 * d["after"]["asr"] for d in latest.values()]
    drop = [100 * (d["before"]["acc"] - d["after"]["acc"]) for d in latest.values()]
    ra = [100 * d["after"]["ra"] for d in latest.values() if d["after"].get("ra") is not None]
    print(f"{len(latest)} runs: ASR <= 5% in {sum(a <= 5 for a in asr)}, mean ASR {statistics.fmean(asr):.2f}% "
          f"(max {max(asr):.2f}), mean ACC drop {statistics.fmean(drop):.2f} points (max {max(drop):.2f}), "
          f"mean RA {statistics.fmean(ra):.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("benches", nargs="+", type=Path)
    ap.add_argument("--budget", type=float, default=0.01)
    ap.add_argument("--summary", action="store_true", help="issue 8's criteria, later benches' cells replacing earlier")
    args = ap.parse_args()
    if args.summary:
        return summary(args.benches)
    rows = sorted((c for b in args.benches for c in cells(b)), key=lambda c: c["cost"])
    print("clean-set cost (first try, points) | test ACC drop | ASR after | bench, cell, flagged | tries (shrink, clean-set acc.)")
    for c in rows:
        asr = "-" if c["asr"] is None else f"{c['asr']:.2f}"
        print(f"{c['cost']:6.2f} | {c['drop']:6.2f} | {asr:>6} | {c['bench']} {c['cell']} {c['flagged']} | {c['tries']}")
    over = [c for c in rows if c["cost"] > 100 * args.budget]
    print(f"\n{len(rows)} cells relearned; the first try's clean-set accuracy rose in {sum(c['cost'] < 0 for c in rows)}; "
          f"{len(over)} cost more than the budget ({100 * args.budget:g} point): "
          + ", ".join(f"{c['bench']} {c['cell']}" for c in over))


if __name__ == "__main__":
    main()
