"""Run ULRL with several configurations on one poisoned checkpoint and print ACC/ASR/RA per config.

    python scripts/sweep.py CKPT [--seeds 0,1,2] "paper" "default" "paper:freeze_bn=true" ...

Each config is PRESET[:key=value,key=value]; the seed picks the 1% clean subset and the defense's
randomness. Used to produce the numbers in docs/method.md.
"""

import json
import sys

from ulrl.checkpoints import load_checkpoint
from ulrl.cli import _attack_for, _overrides
from ulrl.data import load_dataset
from ulrl.metrics import predict
from ulrl.pipeline import run_defense, select_clean


def per_class(model, data) -> list[float]:
    pred = predict(model, data.test_x)
    return [round(((pred == data.test_y) & (data.test_y == c)).sum().item() / max(1, (data.test_y == c).sum().item()), 3)
            for c in range(data.num_classes)]


def main(ckpt: str, configs: list[str], seeds: list[int]) -> None:
    model, meta, attack_tensors = load_checkpoint(ckpt)
    data = load_dataset(meta["dataset"])
    attack = _attack_for(None, meta, data.num_classes, attack_tensors)
    print(json.dumps({"per_class_before": per_class(model, data)}))
    for seed, spec in ((s, c) for c in configs for s in seeds):
        clean_idx = select_clean(data, 0.01, None, seed)
        preset, _, rest = spec.partition(":")
        ov = _overrides([s for s in rest.split(",") if s])
        repaired, report, r = run_defense(model, data, clean_idx, attack, "ulrl", preset, {"seed": seed, **ov},
                                   progress=False, monitor_size=2000)
        curve = [(e["epoch"], round(e.get("test_acc", 0), 3), round(e.get("test_asr", 0), 3), round(e.get("heldout_acc", -1), 3))
                 for e in report.relearn_history]
        print(json.dumps({"config": spec, "seed": seed, "before": r["before"], "after": r["after"], "der": r["der"],
                          "flagged": r["flagged_neurons"], "unlearn_epochs": r["unlearn_epochs"],
                          "selected": report.selected_epoch, "per_class_after": per_class(repaired, data), "seconds": round(r["defense_seconds"], 1)}))
        print("   relearn curve (epoch, acc, asr, heldout):", curve, flush=True)


if __name__ == "__main__":
    args = sys.argv[2:]
    seeds = [0]
    if args[:1] == ["--seeds"]:
        seeds, args = [int(s) for s in args[1].split(",")], args[2:]
    main(sys.argv[1], args, seeds)
