"""Which neurons ULRL's unlearning flags, over several clean-set seeds (no relearning).

    python scripts/detect.py CKPT SEEDS [PRESET[:key=value,...] ...]

Prints, per configuration, (flagged neurons, unlearning epochs, highest z-score) for each seed.
Used for the detection numbers in docs/method.md.
"""

import sys

from ulrl.checkpoints import load_checkpoint
from ulrl.cli import _overrides
from ulrl.data import load_dataset
from ulrl.defenses.ulrl import make_config, purify
from ulrl.pipeline import select_clean


def main(ckpt: str, seeds: int, specs: list[str]) -> None:
    model, meta, _ = load_checkpoint(ckpt)
    data = load_dataset(meta["dataset"])
    for spec in specs or ["paper"]:
        preset, _, rest = spec.partition(":")
        found = []
        for seed in range(seeds):
            idx = select_clean(data, 0.01, None, seed)
            cfg = make_config(preset, seed=seed, relearn_epochs=0, **_overrides([s for s in rest.split(",") if s]))
            _, rep = purify(model, data.train_x[idx], data.train_y[idx], cfg, progress=False)
            found.append((rep.flagged, rep.unlearn_epochs, round(max(rep.z_scores), 1)))
        print(spec, found, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
