"""The relearning guard's margin on cnn-small (docs/method.md, Finding 6): per benchmark model, the default
purify's accuracy on the clean images of the classes not flagged, before and after relearning.

    python scripts/guard_margin.py blended trojannn lira badnets [--results runs/bench-v3]
"""
import argparse
import glob
import json

import ulrl
from ulrl.checkpoints import load_checkpoint
from ulrl.data import load_dataset
from ulrl.pipeline import select_clean

ap = argparse.ArgumentParser()
ap.add_argument("attacks", nargs="+", help="attack-key prefixes of the benchmark's models")
ap.add_argument("--results", default="runs/bench-v3")
ap.add_argument("--clean-seed", type=int, default=0)
args = ap.parse_args()
data = load_dataset("fashion-mnist")
for key in args.attacks:
    ckpt = sorted(glob.glob(f"{args.results}/models/fashion-mnist/cnn-small/{key}*/seed0.safetensors"))[0]
    model, _, _ = load_checkpoint(ckpt)
    idx = select_clean(data, 0.01, None, args.clean_seed)
    _, report = ulrl.purify(model, (data.train_x[idx], data.train_y[idx]), progress=False, dataset="fashion-mnist")
    print(json.dumps({"model": key, "flagged": report.flagged, "clean_set_acc_before": report.extra.get("clean_set_acc_before"),
                      "attempts": report.extra.get("relearn_attempts"),
                      "notes": report.notes}), flush=True)
