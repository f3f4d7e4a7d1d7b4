"""The universal signal at other flip levels (docs/detection.md, "What still fails").

    python scripts/level_study.py CLEAN_SEEDS CKPT [CKPT ...]     # e.g. 0,1,2 runs/.../sig-a043eb/seed0.safetensors

Per checkpoint and clean-set seed, runs the universal search once and prints, for the radius at
which 50% and 90% of the other classes' images flip (and averages over levels, and the mean log
radius), the reachability-adjusted z at the true target, the largest z and its class.
"""
import json
import math
import sys

from ulrl.checkpoints import load_checkpoint
from ulrl.data import load_dataset
from ulrl.detection import stats
from ulrl.detection.universal import UniversalConfig, clean_gap, universal_radii
from ulrl.pipeline import select_clean


def _z(score, gap, t):
    """(z at the target, largest z, its class) of the reachability-adjusted score."""
    adj = stats.theil_sen_residual([-g for g in gap], score)[0]
    z = stats.outlier_test(adj, math.inf)["z"]
    return (round(z[t], 1) if t is not None else None, round(max(z), 1), z.index(max(z)))


def _levels(u, qs):
    """Per class: -log radius averaged over the flip levels ``qs`` (-5 where never reached)."""
    return [sum(-math.log(u["levels"][q][c]) if math.isfinite(u["levels"][q][c]) else -5 for q in qs) / len(qs)
            for c in range(len(u["radius"]))]


data = load_dataset("fashion-mnist")
seeds = [int(s) for s in sys.argv[1].split(",")]
for ck in sys.argv[2:]:
    model, meta, _ = load_checkpoint(ck)
    model.eval().requires_grad_(False)
    t = (meta.get("attack") or {}).get("target")
    for s in seeds:
        idx = select_clean(data, 0.01, None, s)
        x, y = data.train_x[idx], data.train_y[idx]
        u = universal_radii(model, x, y, 10, UniversalConfig(5, 0.006, 0.5, 1.15, 0.5, flip=0.9, stop=0.9), seed=s)
        gap = clean_gap(model, x, y, 10)
        row = {name: _z(sc, gap, t) for name, sc in (
            ("avg579", _levels(u, ["0.5", "0.75", "0.9"])), ("avg2579", _levels(u, ["0.25", "0.5", "0.75", "0.9"])),
            ("meanlog", [-v for v in u["mean_log_radius"]]), ("0.5", _levels(u, ["0.5"])), ("0.9", _levels(u, ["0.9"])))}
        print(ck.split("/")[-2][:12], ck.split("/")[-1][:6], s, "target", t, json.dumps(row), flush=True)
