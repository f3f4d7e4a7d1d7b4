"""Draw a held-out set of attack variants: attacks, targets and settings that no choice has seen.

    python scripts/draw_heldout.py 20261130          # held out G (docs/detection.md)

Each target is drawn among the classes not yet used for that attack (in the zoo and the earlier held-out sets, as
listed in ``USED``); each setting from a short menu per attack; the poison rate from RATES where the attack takes one
and the setting does not fix it. Prints one attack spec per line, for ``ulrl bench --attacks``.
"""

from __future__ import annotations

import argparse
import random

# Targets already used per attack (the zoo of fashion-mnist-cpu and held-out sets A to F), when set G was drawn;
# add set G's (trojannn 5, blended 4, lira 2, adaptive-blend 5, ftrojan 4, ssba 1) before drawing another set.
USED = {"adaptive-blend": {8}, "badnets": {3, 7, 5, 4}, "blended": {6, 9}, "blind": {1}, "bpp": {9}, "ftrojan": {5},
        "lc": {2, 9, 5, 0}, "lf": {7, 3}, "lira": {0}, "sig": {4, 0, 7, 2, 8, 1}, "ssba": {2, 6}, "trojannn": {6, 0},
        "wanet": {1, 5}, "input-aware": {4}}
MENU = {
    "badnets": ["patch_size=2", "patch_size=5,position=top-right", "pattern=checkerboard,position=center"],
    "blended": ["alpha=0.15,pattern_seed=4242", "alpha=0.25,pattern_seed=99"],
    "blind": ["top=10,right=3", "top=18,right=10"],
    "bpp": ["squeeze_num=8", "squeeze_num=3"],
    "ftrojan": ["magnitude=40", "magnitude=80"],
    "lf": ["eps=20", "eps=30"],
    "trojannn": ["num_neurons=1", "num_neurons=4"],
    "wanet": ["s=0.75", "k=6"],
    "ssba": ["eps=0.03", "code_seed=7"],
    "adaptive-blend": ["alpha=0.2,pattern_seed=5", "pieces=9"],
    "lira": ["eps=0.03", "eps=0.08"],
    "sig": ["f=8"], "lc": ["rate=0.1"], "input-aware": [""],
}
RATES = [0.03, 0.05, 0.1]
NO_RATE = ("sig", "lc", "adaptive-blend")  # their poison rate is part of the attack's design (or the menu's)


def draw(seed: int, n: int = 6) -> list[str]:
    r = random.Random(seed)
    specs = []
    for name in r.sample(sorted(MENU), n):
        target = r.choice([c for c in range(10) if c not in USED[name]])
        rate, option = r.choice(RATES), r.choice(MENU[name])
        spec = f"{name}:target={target}" + (f",{option}" if option else "")
        if name not in NO_RATE and not any(o.startswith("rate=") for o in option.split(",")):
            spec += f",rate={rate}"
        specs.append(spec)
    return specs


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("seed", type=int)
    ap.add_argument("-n", type=int, default=6, help="how many attacks")
    args = ap.parse_args()
    print("\n".join(draw(args.seed, args.n)))
