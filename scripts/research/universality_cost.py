"""Universality cost (docs/detection.md, "What still fails"): per target class, the median over source classes of
log(universal-search radius) - log(pairwise-search radius), both stored by every scan (the universal search's
``pair_radius`` and the all-to-all test's). A trigger is one pattern for every source, so a backdoor target should
cost little more to reach with one perturbation for all sources than with one per source; prints each run's z
(largest for clean models) beside the universal signal's.

    python scripts/research/universality_cost.py runs/bench-v8 runs/bench-heldout runs/bench-heldout-b ...
"""
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))
from signal_study import true_target  # noqa: E402
from study import key  # noqa: E402

from ulrl.bench import benchmark_scans  # noqa: E402
from ulrl.detection import stats  # noqa: E402


def radii(rows):
    return [[math.inf if v is None else v for v in row] for row in rows]


for root in sys.argv[1:]:
    for r in benchmark_scans(root):
        t, sc = true_target(r["attack_spec"]), r["scan"]
        if "pair_radius" not in sc["all_to_all"]:
            continue
        u, p = radii(sc["signals"]["universal"]["extra"]["pair_radius"]), radii(sc["all_to_all"]["pair_radius"])
        k = len(u)
        cost = []
        for c in range(k):
            d = [math.log(u[s][c]) - math.log(p[s][c]) for s in range(k)
                 if s != c and math.isfinite(u[s][c]) and math.isfinite(p[s][c])]
            cost.append(-statistics.median(d) if d else -math.inf)
        z, uz = stats.outlier_test(cost, math.inf)["z"], sc["signals"]["universal"]["z"]
        c = t if isinstance(t, int) else max(range(k), key=lambda i: z[i])
        print(f"{Path(root).name:20s} {key(r):26s} t={t!s:4s} cost z {z[c]:5.1f}  universal z "
              f"{uz[c] if isinstance(t, int) else max(uz):5.1f}")
