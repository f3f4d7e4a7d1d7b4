"""What the study scripts that run a search again over a benchmark's stored scans share (pull_study, lowrank_study,
level_study): the run's key, the stored runs with their model and clean set, and the two-pass command line
(``--out``: run the search, append one JSON line per run; ``--scores``: recompute the verdicts from those lines)."""

import argparse
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from ulrl.bench import benchmark_scans
from ulrl.checkpoints import load_checkpoint
from ulrl.data import load_dataset
from ulrl.detection.scan import frozen_copy
from ulrl.pipeline import select_clean


def key(r: dict) -> str:
    return f"{r['attack_key']}:{r['seed']}:{r['clean_seed']}"


def stored_runs(root: str, out: str) -> Iterator[tuple[dict, nn.Module, torch.Tensor, torch.Tensor, int]]:
    """Each scan stored under ``root`` whose key is not yet in ``out``: (record, frozen model, clean x, clean y,
    number of classes), the clean set the scan had (same ratio and seed)."""
    done = {json.loads(line)["run"] for line in open(out)} if Path(out).exists() else set()
    data = {}
    for r in benchmark_scans(root):
        if key(r) in done:
            continue
        name = r["dataset"]
        data.setdefault(name, load_dataset(name))
        ckpt = Path(root) / "models" / name / r["model"] / r["attack_key"] / f"seed{r['seed']}.safetensors"
        idx = select_clean(data[name], r["clean_ratio"], None, r["clean_seed"])
        yield r, frozen_copy(load_checkpoint(str(ckpt))[0], "cpu"), data[name].train_x[idx], data[name].train_y[idx], \
            data[name].num_classes


def append_line(f, obj: dict) -> None:
    f.write(json.dumps(obj) + "\n")
    f.flush()


def main(search: Callable[[str, str], None], verdicts: Callable[[str, str], None], what: str) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--out", help=f"run the {what} and append one line per stored scan here")
    ap.add_argument("--scores", help="recompute the verdicts from these lines")
    a = ap.parse_args()
    if a.out:
        search(a.results, a.out)
    if a.scores:
        verdicts(a.results, a.scores)
