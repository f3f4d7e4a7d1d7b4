"""The universal score read at several flip levels at once (the mean of the gap-adjusted scores at 0.5 and 0.75, at
0.25-0.75, at all four) against one level, over the stored scans of the benchmarks below and the level files of
scripts/level_study.py (runs/research/levels/NAME.jsonl). Run from the repository root:

    python scripts/research/multilevel.py
"""
import json
import math
import sys

sys.path.insert(0, "scripts")  # run from the repository root
from level_study import universal_verdict
from signal_study import true_target
from study import key

from ulrl.bench import benchmark_scans
from ulrl.detection.scan import gap_adjusted

SETS = [("runs/bench-v8", "v8"), ("runs/bench-heldout", "heldout"), ("runs/bench-heldout-b", "heldout-b"),
        ("runs/bench-heldout-c", "heldout-c"), ("runs/bench-heldout-c2", "heldout-c2")]

def sc(radii):
    return [-math.log(v) if v is not None and math.isfinite(v) else -math.inf for v in radii]

def variants(r, lv):
    gap = r["scan"]["signals"]["universal"]["extra"]["clean_gap"]
    adj = {q: gap_adjusted(sc(lv[q]), gap)[0] for q in lv}
    out = {q: adj[q] for q in ("0.5", "0.75")}
    def mean(qs):
        return [sum(adj[q][c] for q in qs) / len(qs) for c in range(len(gap))]
    out["mean .5/.75"] = mean(["0.5", "0.75"])
    out["mean .25/.5/.75"] = mean(["0.25", "0.5", "0.75"])
    out["mean all4"] = mean(["0.25", "0.5", "0.75", "0.9"])
    return out

rows = {}
for root, name in SETS:
    try:
        lvs = {d["run"]: d["levels"] for d in map(json.loads, open(f"runs/research/levels/{name}.jsonl"))}
    except FileNotFoundError:
        continue
    for r in benchmark_scans(root):
        if key(r) not in lvs:
            continue
        for v, score in variants(r, lvs[key(r)]).items():
            d, z = universal_verdict(r, score)
            rows.setdefault(v, []).append((name, key(r), true_target(r["attack_spec"]), d, z))

def summary(rs, sets):
    rs = [x for x in rs if x[0] in sets]
    one = [(t, d) for _, _, t, d, _ in rs if isinstance(t, int)]
    a2a = [d for _, _, t, d, _ in rs if t == "all"]
    clean = [(d, z) for _, _, t, d, z in rs if t is None]
    return (f"{sum(t in d['suspected'] for t, d in one)}/{len(one)} + {sum(d['kind']=='all-to-all' for d in a2a)}/{len(a2a)} | "
            f"{sum(any(c != t for c in d['suspected']) for t, d in one)} | {sum(bool(d['suspected']) for d, _ in clean)}/{len(clean)} | "
            f"{min((d['p_value'] for d, _ in clean), default=math.nan):.3g} | {max((max(z) for _, z in clean), default=math.nan):.1f}")

print("| universal score | zoo: found | clean class | FP | min clean p | max clean z | held out: found | clean class | FP | min clean p | max clean z |")
for v, rs in rows.items():
    print(f"| {v} | {summary(rs, {'v8'})} | {summary(rs, {'heldout','heldout-b','heldout-c','heldout-c2'})} |")
print()
names = list(rows)
for i, (s, k, t, _, _) in enumerate(rows["0.75"]):
    if t is None or (isinstance(t, int) and not all(t in rows[n][i][3]["suspected"] for n in names)) or any(rows[n][i][3]["suspected"] != rows["0.75"][i][3]["suspected"] for n in names):
        cells = []
        for n in names:
            d, z = rows[n][i][3], rows[n][i][4]
            zt = max(z) if not isinstance(t, int) else z[t]
            cells.append(f"{zt:5.1f} {d['p_value']:.3f} {''.join(map(str, d['suspected'])) or '-':>3s}")
        print(f"{s:10s} {k:26s} t={t!s:4s} | " + " | ".join(cells))
