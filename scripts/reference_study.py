"""A model trained on the clean set alone as the yardstick of natural attractors (docs/detection.md, "What still fails").

    python scripts/reference_study.py RESULTS_DIR [RESULTS_DIR ...] --out REF.jsonl [--only sig,lc,none] [--universal] [--distill]
    python scripts/reference_study.py RESULTS_DIR [RESULTS_DIR ...] --scores REF.jsonl

Some classes stand out on every clean model of a dataset: Fashion-MNIST's Sandal and Bag have the largest natural
margin (the margin signal's z 3.5 to 12.4 on every clean model), Shirt is the easiest to reach. A clean-label
trigger's target (SIG, LC) stands out no more than they do. Whatever a class owes to the data, a model trained on the
clean set alone should share; a backdoor it does not have. For every scan stored under RESULTS_DIR (``--only``: attack
keys starting so) this trains such a reference (the suspect's architecture, re-initialised, 30 epochs on the scan's
clean set) and keeps its per-class maximum margin (``--universal``: also its universal radius at 0.75); ``--scores``
prints the margin signal's z at the true target taken relative to the reference's (a robust line on it, or the
difference) beside the scan's own.
"""

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

from ulrl.bench import benchmark_scans
from ulrl.defenses.ulrl import with_distillation
from ulrl.detection import stats
from ulrl.detection.margin import MarginConfig, max_margins
from ulrl.detection.scan import config_from_parameters, search_config
from ulrl.detection.universal import clean_gap, universal_radii
from ulrl.train import TrainConfig, fit

sys.path.insert(0, str(Path(__file__).parent))
from signal_study import true_target  # noqa: E402
from study import append_line, key, stored_runs  # noqa: E402


def reference(model, x, y, cfg, epochs: int, seed: int, distill: bool = False):
    """The suspect's architecture, re-initialised and trained on the clean set alone (``distill``: also matching the
    suspect's outputs on the clean images, its knowledge of the data without its trigger)."""
    ref = copy.deepcopy(model).requires_grad_(True)
    torch.manual_seed(seed)
    for m in ref.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    fit(ref, x, y, TrainConfig(epochs=epochs, lr=0.01, batch_size=64, augment=cfg.augment, hflip=cfg.hflip,
                               crop_pad=cfg.crop_pad, seed=seed),
        penalty=with_distillation(copy.deepcopy(model), [], 1.0) if distill else None, progress=False)
    return ref.eval().requires_grad_(False)


def search(root: str, out: str, only: list[str], epochs: int, refs: int, universal: bool, distill: bool) -> None:
    with open(out, "a") as f:
        for r, model, x, y, k in stored_runs(root, out):
            if only and not any(r["attack_key"].startswith(o) for o in only):
                continue
            cfg = config_from_parameters(r["scan"]["parameters"], seed=r["clean_seed"])
            rows = []
            for j in range(refs):
                t0 = time.perf_counter()
                ref = reference(model, x, y, cfg, epochs, r["clean_seed"] + 100 * j, distill)
                t1 = time.perf_counter()
                acc = float((ref(x.float() / 255 if x.dtype == torch.uint8 else x).argmax(1) == y).float().mean())
                row = {"margin": max_margins(ref, k, tuple(x.shape[1:]), MarginConfig(cfg.margin_starts, cfg.margin_steps,
                                                                                       cfg.margin_lr), seed=cfg.seed),
                       "gap": clean_gap(ref, x, y, k, "cpu"), "train_acc": acc, "train_s": t1 - t0}
                if universal:
                    u = universal_radii(ref, x, y, k, search_config(cfg, cfg.uap_min_rms, cfg.uap_max_rms, flip=0.75,
                                                                    stop=cfg.uap_level), seed=cfg.seed)
                    row["radius"] = u["levels"]["0.75"]
                row["search_s"] = time.perf_counter() - t1
                rows.append(row)
            append_line(f, {"run": key(r), "refs": rows})
            print(key(r), [round(v["train_acc"], 3) for v in rows], f"{sum(v['train_s'] + v['search_s'] for v in rows):.0f} s",
                  flush=True)


def _log(values: list[float]) -> list[float]:
    return [math.log(max(v, 1e-6)) for v in values]


def scores(roots: list[str], files: list[str]) -> None:
    """Per run: the margin signal's z at the true target (clean model: its largest) as the scan scored it (own), as
    the residual of a robust (Theil-Sen) line on the reference's log margin, and as the difference from it."""
    refs = {d["run"]: d["refs"] for f in files for d in map(json.loads, open(f))}
    print("run | target | own z (largest) | residual z (largest), slope | difference z (largest)")
    for root in roots:
        for r in benchmark_scans(root):
            if key(r) not in refs:
                continue
            t = true_target(r["attack_spec"])
            own = _log(r["scan"]["signals"]["margin"]["statistic"])
            ref = [sum(col) / len(col) for col in zip(*(_log(d["margin"]) for d in refs[key(r)]), strict=True)]
            res, slope, _ = stats.theil_sen_residual(ref, own)
            zs = [stats.outlier_test(v, math.inf)["z"] for v in (own, res, [a - b for a, b in zip(own, ref, strict=True)])]
            c = t if isinstance(t, int) else max(range(len(own)), key=lambda i: zs[1][i])
            cells = [f"{z[c]:5.1f} ({max(z):4.1f})" for z in zs]
            u = r["scan"]["signals"]["universal"]
            if "radius" in refs[key(r)][0] and r["scan"]["parameters"].get("uap_score_level") == 0.75:
                ref_u = [-math.log(v) for v in refs[key(r)][0]["radius"]]  # universal: the scan's adjusted score on it
                uz = [stats.outlier_test(v, math.inf)["z"] for v in (u["score"], stats.theil_sen_residual(ref_u, u["score"])[0])]
                ct = t if isinstance(t, int) else max(range(len(own)), key=lambda i: uz[1][i])
                cells.append(" | universal " + ", ".join(f"{z[ct]:5.1f} ({max(z):4.1f})" for z in uz))
            print(f"{Path(root).name} {key(r)} | {t} | {cells[0]} | {cells[1]}, {slope:.2f} | {cells[2]}{''.join(cells[3:])}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    ap.add_argument("--out")
    ap.add_argument("--scores", nargs="*", default=[])
    ap.add_argument("--only", default="")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--refs", type=int, default=1)
    ap.add_argument("--universal", action="store_true", help="also the universal search on each reference")
    ap.add_argument("--distill", action="store_true", help="the reference also matches the suspect's clean outputs")
    a = ap.parse_args()
    if a.out:
        for root in a.results:
            search(root, a.out, [o for o in a.only.split(",") if o], a.epochs, a.refs, a.universal, a.distill)
    if a.scores:
        scores(a.results, a.scores)
