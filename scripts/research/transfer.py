"""Transfer of each class's universal perturbation to clean images the search never saw (docs/detection.md, "What
still fails"). The universal search fits one perturbation per class on five clean images per source class; a real
shortcut (a trigger) should flip the rest of the clean set about as well, a perturbation fitted to the 45 images less.
Per class: the flip rate toward it of the unseen clean images of the other classes, at the search's final radius;
score log(rate / (1 - rate)), z against the other classes; printed at the true target (clean models: the largest).

    python scripts/research/transfer.py RESULTS_DIR OUT.jsonl KEY_PREFIXES    # e.g. runs/bench-heldout-c ... sig,none
"""
import math
import sys

import torch

sys.path.insert(0, "scripts")  # run from the repository root
from signal_study import true_target  # noqa: E402
from study import append_line, key, stored_runs  # noqa: E402

from ulrl.data.transforms import to_float  # noqa: E402
from ulrl.detection import stats  # noqa: E402
from ulrl.detection.scan import config_from_parameters, search_config  # noqa: E402
from ulrl.detection.universal import sample_indices, universal_radii  # noqa: E402

root, out, keys = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
with open(out, "a") as f:
    for r, model, x, y, k in stored_runs(root, out):
        if not any(key(r).startswith(p) for p in keys):
            continue
        cfg = config_from_parameters(r["scan"]["parameters"], seed=r["clean_seed"])
        u = universal_radii(model, x, y, k, search_config(cfg, cfg.uap_min_rms, cfg.uap_max_rms, stop=cfg.uap_level),
                            seed=cfg.seed)
        unseen = torch.ones(len(y), dtype=torch.bool)  # the images the search did not use (same draw)
        unseen[sample_indices(y, k, cfg.uap_per_class, torch.Generator().manual_seed(cfg.seed))] = False
        xs, ys = to_float(x[unseen]), y[unseen]
        rate = []
        with torch.no_grad():
            for t in range(k):
                other = ys != t
                pred = model((xs[other] + u["deltas"][t]).clamp(0, 1)).argmax(1)
                rate.append(float((pred == t).float().mean()))
        score = [math.log(max(p, 1e-3) / max(1 - p, 1e-3)) for p in rate]
        z = stats.outlier_test(score, math.inf)["z"]
        t = true_target(r["attack_spec"])
        c = t if isinstance(t, int) else max(range(k), key=lambda i: z[i])
        append_line(f, {"run": key(r), "rate": rate, "z": z})
        print(f"{key(r):24s} t={t!s:4s} transfer z {z[c]:5.1f} (largest {max(z):4.1f}) rates {[round(v, 2) for v in rate]}",
              flush=True)
