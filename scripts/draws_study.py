"""How many draws of the universal search (``uap_draws``, docs/detection.md): measured over stored scans.

    python scripts/draws_study.py RESULTS_DIR [RESULTS_DIR ...]

A scan with ``uap_draws`` = D stores every draw's universal score (``draw_scores``) and pull
(``draw_pulls``); draw 0 is exactly the single-draw scan. For d = 1 .. D this recomputes the
universal and pull signals from the first d draws (mean, then the scan's own clean-gap adjustment
and outlier test) and the verdict with the stored p-values of the other signals, and prints per d:
targets found, clean classes also suspected, false positives on clean models (with their p range),
the target's universal and pull z (smallest over attacked runs) and the largest z of any class on
the clean models. With ``--runs`` it lists every run's p-value and suspected classes per d.
"""

import argparse
import math
import sys
from pathlib import Path

from ulrl.bench import benchmark_scans
from ulrl.detection import stats
from ulrl.detection.scan import config_from_parameters, decide, gap_adjusted, null_df

sys.path.insert(0, str(Path(__file__).parent))
from signal_study import true_target  # noqa: E402
from study import key  # noqa: E402


def _row(values: list[float | None]) -> list[float]:
    """A stored row with JSON's null (a class never reached) back to -inf."""
    return [-math.inf if v is None else v for v in values]


def _mean(rows: list[list[float | None]]) -> list[float]:
    return [sum(col) / len(rows) for col in zip(*map(_row, rows), strict=True)]


def _adjusted(u: dict, score: list[float]) -> list[float]:
    return gap_adjusted(score, u["clean_gap"])[0] if "clean_gap" in u else score


def recompute(scan: dict, d: int, how: str = "score") -> tuple[dict, dict]:
    """The verdict with the first ``d`` draws; and per signal (universal, pull) the z-scores. ``how``: "score" (the
    z of the mean score, as the scan does) or "z" (the mean of each draw's z, its p from the single-draw null)."""
    cfg = config_from_parameters(scan["parameters"])
    sig = scan["signals"]
    p = {s: e["p"] for s, e in sig.items()}
    pm = {s: e["p_model"] for s, e in sig.items()}
    z = {}
    u = sig["universal"]["extra"]
    draws = {"universal": [_adjusted(u, _row(row)) for row in u["draw_scores"][:d]],
             "pull": [_row(row) for row in sig["pull"]["extra"]["draw_pulls"][:d]]}
    for name, rows in draws.items():
        if how == "score":
            values = _adjusted(u, _mean(u["draw_scores"][:d])) if name == "universal" else _mean(rows)
            test = stats.outlier_test(values, null_df(cfg, name), 0.0, cfg.z_scale)
            p[name], pm[name], z[name] = test["p"], test["p_model"], test["z"]
        else:
            zs = [stats.outlier_test(row, null_df(cfg, name), 0.0, cfg.z_scale)["z"] for row in rows]
            z[name] = [sum(col) / len(col) for col in zip(*zs, strict=True)]
            one, top = stats.null_z(len(z[name]), null_df(cfg, name), cfg.z_scale)
            p[name], pm[name] = [stats.tail_p(one, v) for v in z[name]], stats.tail_p(top, max(z[name]))
    return decide(p, pm, scan["all_to_all"], cfg), z


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    ap.add_argument("--runs", action="store_true", help="every run's p-value and suspected classes per d")
    ap.add_argument("--how", choices=("score", "z"), default="score",
                    help="average the draws' scores (the scan's way) or their z-scores (p from the single-draw null)")
    a = ap.parse_args()
    records = [r for root in a.results for r in benchmark_scans(root) if "draw_scores" in r["scan"]["signals"]["universal"]["extra"]]
    if not records:
        raise SystemExit("no scan with several draws of the universal search under " + ", ".join(a.results))
    draws = min(len(r["scan"]["signals"]["universal"]["extra"]["draw_scores"]) for r in records)
    rows = {}
    for d in range(1, draws + 1):
        out = {}
        for r in records:
            dec, z = recompute(r["scan"], d, a.how)
            out[key(r)] = (true_target(r["attack_spec"]), dec["suspected"], dec["p_value"], z)
        rows[d] = out
        one = [v for v in out.values() if isinstance(v[0], int)]
        clean = [v for v in out.values() if v[0] is None]
        a2a = [v for v in out.values() if v[0] == "all"]
        line = (f"draws {d}: target found {sum(t in s for t, s, _, _ in one)}/{len(one)}, "
                f"all-to-all {sum(bool(s) for _, s, _, _ in a2a)}/{len(a2a)}, "
                f"clean class also suspected {sum(any(c != t for c in s) for t, s, _, _ in one)}, "
                f"false positives {sum(bool(s) for _, s, _, _ in clean)}/{len(clean)}")
        if clean:
            cp = [pv for _, _, pv, _ in clean]
            line += f" (clean p {min(cp):.2g} to {max(cp):.2g})"
        for name in ("universal", "pull"):
            if one:
                line += f"; {name} z: target min {min(zz[name][t] for t, _, _, zz in one):.1f}"
            if clean:
                line += f", clean max {max(max(zz[name]) for _, _, _, zz in clean):.1f}"
        print(line)
    if a.runs:
        for k in sorted(rows[1]):
            t = rows[1][k][0]
            print(f"{k} (target {t}): " + "; ".join(f"d{d} p {rows[d][k][2]:.2g} {rows[d][k][1]}" for d in rows))


if __name__ == "__main__":
    main()
