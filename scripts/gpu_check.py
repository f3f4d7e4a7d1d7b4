"""The CUDA path, mixed precision and the speed of the larger models, on a GPU machine.

    PYTHONPATH=src python3 scripts/gpu_check.py --data-dir DIR_OF_FASHION_MNIST --out OUTDIR

1. End to end on Fashion-MNIST with ``device="cuda"``: train a BadNets cnn-small (mixed
   precision), scan it, purify it with the default and the paper preset (the paper preset uses
   mixed precision on CUDA), evaluate; and the same scan and default purify of a clean model.
2. Speed: seconds per training step (batch 128, 3x32x32, 10 classes) of preact-resnet18,
   vgg19-bn and vit-small in fp32 and with mixed precision; then a scan and a default purify of
   a preact-resnet18 trained for a few epochs on a CIFAR-shaped synthetic set (500 clean images).
Prints one JSON line per result; nothing here decides anything from test data.
"""
import argparse
import dataclasses
import json
import sys
import time

import torch

import ulrl
from ulrl.attacks import build_attack
from ulrl.data import load_dataset
from ulrl.metrics import evaluate
from ulrl.models import create_model
from ulrl.pipeline import select_clean, train_model
from ulrl.train import TrainConfig

SMOKE = "--smoke" in sys.argv  # a CPU dry run of the script's code paths: tiny sizes
QUICK = {"uap_per_class": 1, "uap_growth": 2.0, "margin_steps": 3, "unlearn_epochs": 1, "warp_max_px": 0.1} if SMOKE else {}
QUICK_PURIFY = {"relearn_epochs": 1, "unlearn_epochs": 1} if SMOKE else {}


def emit(**row):
    print(json.dumps(row), flush=True)


def rounded(metrics: dict) -> dict:
    """The float metrics (ACC, ASR, RA) to four digits."""
    return {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}


def tic() -> float:
    """Wait for the GPU's queued work, then read the clock."""
    sync()
    return time.perf_counter()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def end_to_end(data_dir: str, dev: str) -> None:
    data = load_dataset("fashion-mnist", data_dir)
    idx = select_clean(data, 0.01, None, 0)
    clean = (data.train_x[idx], data.train_y[idx])
    for spec in ("badnets:target=3", "none"):
        attack = build_attack(spec, data.num_classes) if spec != "none" else None
        t0 = tic()
        model, _ = train_model(data, "cnn-small", attack, TrainConfig(epochs=1 if SMOKE else 5, lr=0.01, batch_size=128, amp=True,
                                                                       hflip=data.hflip, seed=0, device=dev), progress=False)
        train_s = tic() - t0
        before = evaluate(model, data.test_x, data.test_y, attack, dev)
        emit(part="train", attack=spec, seconds=round(train_s, 1), **rounded(before))
        t0 = tic()
        res = ulrl.scan(model, clean, progress=False, device=dev, hflip=data.hflip, **QUICK)
        sync()
        emit(part="scan", attack=spec, seconds=round(time.perf_counter() - t0, 1), verdict=res.verdict, p=res.p_value,
             suspected=res.suspected, per_signal={k: round(v, 1) for k, v in res.seconds.items()})
        for preset in ("paper",) if SMOKE else ("default", "paper"):
            t0 = tic()
            repaired, report = ulrl.purify(model, clean, preset=preset, progress=False, dataset="fashion-mnist",
                                           device=dev, hflip=data.hflip, **QUICK_PURIFY)
            secs = tic() - t0
            after = evaluate(repaired, data.test_x, data.test_y, attack, dev)
            emit(part="purify", attack=spec, preset=preset, seconds=round(secs, 1), flagged=report.flagged,
                 **rounded(after))


def speed(dev: str) -> None:
    for batch in (128, 512):
        step_times(dev, batch)


def step_times(dev: str, batch: int) -> None:
    x = torch.rand(batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    for arch in ("preact-resnet18",) if SMOKE else ("preact-resnet18", "vgg19-bn", "vit-small"):
        model = create_model(arch, 10, 3, 32).to(dev).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        for amp in (False, True):
            scaler = torch.amp.GradScaler("cuda", enabled=amp and dev == "cuda")
            for i in range(7 if SMOKE else 25):  # 5 warm-up steps, 20 timed
                if i == 5:
                    t0 = tic()
                with torch.autocast("cuda", enabled=amp and dev == "cuda"):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            sync()
            emit(part="step", arch=arch, batch=batch, amp=amp, ms_per_step=round(1000 * (time.perf_counter() - t0) / (2 if SMOKE else 20), 2))


def other_archs(data_dir: str, dev: str, only: str = "") -> None:
    """Detection and repair on the larger architectures (calibrated on cnn-small only): clean and
    backdoored models of each, scanned with three clean sets, repaired with the default preset."""
    data = load_dataset("fashion-mnist", data_dir)
    if SMOKE:
        data = dataclasses.replace(data, train_x=data.train_x[:3000], train_y=data.train_y[:3000])
    models = [("preact-resnet18", "none", 0), ("preact-resnet18", "none", 1), ("preact-resnet18", "none", 2),
              ("preact-resnet18", "badnets:target=5", 0), ("preact-resnet18", "blended:target=2", 0),
              ("preact-resnet18", "wanet:target=7", 0), ("vgg19-bn", "none", 0), ("vgg19-bn", "badnets:target=5", 0)]
    if only:  # a comma-separated selection of the list's positions
        models = [models[int(i)] for i in only.split(",")]
    for arch, spec, seed in models[:2] if SMOKE else models:
        try:
            attack = build_attack(spec, data.num_classes) if spec != "none" else None
            t0 = tic()
            model, _ = train_model(data, arch, attack, TrainConfig(epochs=1 if SMOKE else 5, lr=0.01, batch_size=128, amp=True,
                                                                    hflip=data.hflip, seed=seed, device=dev), progress=False)
            sync()
            m = evaluate(model, data.test_x, data.test_y, attack, dev)
            emit(part="arch-train", arch=arch, attack=spec, seed=seed, seconds=round(time.perf_counter() - t0, 1),
                 **rounded(m))
            for cs in (0, 1, 2):
                idx = select_clean(data, 0.01, None, cs)
                clean = (data.train_x[idx], data.train_y[idx])
                t0 = tic()
                res = ulrl.scan(model, clean, progress=False, device=dev, hflip=data.hflip, seed=cs, **QUICK)
                sync()
                emit(part="arch-scan", arch=arch, attack=spec, seed=seed, clean=cs, seconds=round(time.perf_counter() - t0, 1),
                     verdict=res.verdict, p=float(f"{res.p_value:.3g}"), suspected=res.suspected, decided_by=res.decided_by,
                     max_z={n: round(max(e.z), 1) for n, e in res.signals.items()},
                     argmax={n: e.z.index(max(e.z)) for n, e in res.signals.items()})
                if cs == 0:
                    t0 = tic()
                    repaired, report = ulrl.purify(model, clean, progress=False, device=dev, hflip=data.hflip, **QUICK_PURIFY)
                    sync()
                    after = evaluate(repaired, data.test_x, data.test_y, attack, dev)
                    emit(part="arch-purify", arch=arch, attack=spec, seed=seed, seconds=round(time.perf_counter() - t0, 1),
                         flagged=report.flagged, attempts=report.extra.get("relearn_attempts"),
                         reference=report.extra.get("clean_set_acc_before"), **rounded(after))
        except Exception as e:  # keep going: one failure should not cost the rest of the lease
            emit(part="error", arch=arch, attack=spec, error=repr(e)[:300])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--parts", default="e2e,speed")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--models", default="", help="archs part: positions in its list of models (default: all)")
    a = ap.parse_args()
    emit(part="env", torch=torch.__version__, cuda=torch.cuda.is_available(),
         gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, python=sys.version.split()[0])
    if "e2e" in a.parts:
        end_to_end(a.data_dir, a.device)
    if "speed" in a.parts:
        speed(a.device)
    if "archs" in a.parts:
        other_archs(a.data_dir, a.device, a.models)
