"""Run ULRL with several configurations on one poisoned checkpoint and print ACC/ASR/RA per config.

    python scripts/sweep.py runs/exp/badnets.safetensors "paper" "default" "paper:freeze_bn=true" ...

Each config is PRESET[:key=value,key=value]. Used to produce the numbers in docs/method.md.
"""

import json
import sys

from ulrl.checkpoints import load_checkpoint
from ulrl.cli import _overrides
from ulrl.data import load_dataset
from ulrl.pipeline import run_defense, select_clean


def main(ckpt: str, configs: list[str], seed: int = 0) -> None:
    model, meta, attack_tensors = load_checkpoint(ckpt)
    from ulrl.cli import _attack_for

    data = load_dataset(meta["dataset"])
    attack = _attack_for(None, meta, data.num_classes, attack_tensors)
    clean_idx = select_clean(data, 0.01, None, seed)
    for spec in configs:
        preset, _, rest = spec.partition(":")
        ov = _overrides([s for s in rest.split(",") if s])
        _, report, r = run_defense(model, data, clean_idx, attack, "ulrl", preset, {"seed": seed, **ov},
                                   progress=False, monitor_size=2000)
        curve = [(e["epoch"], round(e.get("test_acc", 0), 3), round(e.get("test_asr", 0), 3), round(e.get("heldout_acc", -1), 3))
                 for e in report.relearn_history]
        print(json.dumps({"config": spec, "before": r["before"], "after": r["after"], "der": r["der"],
                          "flagged": r["flagged_neurons"], "unlearn_epochs": r["unlearn_epochs"],
                          "selected": report.selected_epoch, "seconds": round(r["defense_seconds"], 1)}))
        print("   relearn curve (epoch, acc, asr, heldout):", curve, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
