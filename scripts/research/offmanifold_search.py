"""Universal search constrained off the clean manifold: perturbations with the clean set's top-m principal
directions projected out. Natural routes to a class run along the data's directions; a trigger need not.

    python scripts/research/offmanifold_search.py RESULTS_DIR OUT.jsonl M KEY_PREFIXES   # e.g. runs/bench-heldout-c
        runs/research/offman/offsearch30.jsonl 30 sig,none  (one line per run: the radius at each flip level)
(The projection is put in place of the rank-r step of universal_radii: a research shortcut.)"""
import sys
import time

sys.path.insert(0, "scripts")  # run from the repository root
import torch
from study import append_line, key, stored_runs

import ulrl.detection.universal as U
from ulrl.detection.scan import config_from_parameters, search_config

root, out, m, keys = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")
basis = {}
def proj(nd, rank):
    flat = nd.flatten(-3)
    b = basis["U"]
    return (flat - (flat @ b) @ b.T).view_as(nd)
U.low_rank = proj
with open(out, "a") as f:
    for r, model, x, y, k in stored_runs(root, out):
        if not any(key(r).startswith(kk) for kk in keys):
            continue
        t0 = time.perf_counter()
        xf = x.float().flatten(1) / 255
        xc = xf - xf.mean(0)
        _, _, vh = torch.linalg.svd(xc, full_matrices=False)
        basis["U"] = vh[:m].T.contiguous()
        cfg = config_from_parameters(r["scan"]["parameters"], seed=r["clean_seed"])
        u = U.universal_radii(model, x, y, k, search_config(cfg, cfg.uap_min_rms, cfg.uap_max_rms, stop=cfg.uap_level, rank=1),
                              seed=cfg.seed)
        append_line(f, {"run": key(r), "m": m, "levels": {q: u["levels"][q] for q in ("0.25", "0.5", "0.75", "0.9")}})
        print(key(r), f"{time.perf_counter()-t0:.0f}s", [round(v, 3) for v in u["levels"]["0.75"]], flush=True)
