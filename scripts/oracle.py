"""Oracle check (docs/method.md, Finding 3): force ULRL to flag the true target class 0 and see
whether relearning then removes the backdoor. Separates a detection failure from a repair failure.

    python scripts/oracle.py CKPT [CKPT ...]
"""

import json
import sys

import ulrl.defenses.ulrl as method
from ulrl.checkpoints import load_checkpoint
from ulrl.cli import _attack_for
from ulrl.data import load_dataset
from ulrl.pipeline import run_defense, select_clean

_mad = method.mad_outliers
method.mad_outliers = lambda scores, threshold, cap, rank_by="score": ([0], _mad(scores, threshold, cap)[1])

for ckpt in sys.argv[1:]:
    model, meta, tensors = load_checkpoint(ckpt)
    data = load_dataset(meta["dataset"])
    attack = _attack_for(None, meta, data.num_classes, tensors)
    clean_idx = select_clean(data, 0.01, None, 0)
    for overrides in ({}, {"cos_margin": -0.3}):
        _, report, r = run_defense(model, data, clean_idx, attack, "ulrl", "paper", {"seed": 0, **overrides},
                                   progress=False)
        print(json.dumps({"checkpoint": ckpt, "preset": "paper", **overrides, "flagged": report.flagged,
                          "before": r["before"], "after": r["after"], "der": r["der"]}), flush=True)
