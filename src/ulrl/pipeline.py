"""The jobs the CLI and the Python API share: train a (poisoned) model, purify, evaluate, demo."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .attacks import Attack, FitContext, build_attack
from .checkpoints import ensure_dir, save_checkpoint, write_json
from .data import Dataset, clean_subset
from .defenses import DefenseReport, make_defense_config, run_defense_fn
from .detection import ScanConfig, ScanResult, reference, scan
from .errors import UserError
from .metrics import der, evaluate
from .models import create_model
from .plots import plot_curves, plot_scores
from .train import TrainConfig, fit

log = logging.getLogger(__name__)


def check_compatible(meta: dict[str, Any], data: Dataset) -> None:
    """The data's class count, channels and image size must match the model's."""
    want = (int(meta["num_classes"]), int(meta["in_channels"]), int(meta["image_size"]))
    have = (data.num_classes, data.in_channels, data.image_size)
    names = ("classes", "channels", "image size")
    for name, w, h in zip(names, want, have, strict=True):
        if w != h:
            raise UserError(f"model expects {name} = {w} but dataset {data.name} has {h}; use the data the model was trained on")


def model_meta(arch: str, data: Dataset, attack: Attack | None, train_cfg: TrainConfig | None, **extra) -> dict[str, Any]:
    return {
        "format": "ulrl-checkpoint/1",
        "ulrl_version": __version__,
        "arch": arch,
        "num_classes": data.num_classes,
        "in_channels": data.in_channels,
        "image_size": data.image_size,
        "mean": list(data.mean),
        "std": list(data.std),
        "dataset": data.name,
        "hflip": data.hflip,
        "attack": attack.spec() if attack else None,
        "train_config": train_cfg.to_dict() if train_cfg else None,
        "seed": train_cfg.seed if train_cfg else None,
        **extra,
    }


def train_model(
    data: Dataset,
    arch: str = "cnn-small",
    attack: Attack | None = None,
    cfg: TrainConfig | None = None,
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``arch`` on ``data`` poisoned by ``attack`` (clean when None). Returns (model, meta)."""
    cfg = cfg or TrainConfig(hflip=data.hflip)
    torch.manual_seed(cfg.seed)

    def make_model() -> nn.Module:
        return create_model(arch, data.num_classes, data.in_channels, data.image_size, data.mean, data.std)

    model = make_model()
    x, y = data.train_x, data.train_y
    n_poison = 0
    batch_hook = step_hook = None
    t_fit = time.perf_counter()
    if attack is not None:
        attack.prepare(x, y, FitContext(make_model, cfg.device, progress, data.hflip, cfg.seed))
        x, y, mask = attack.poison_train(x, y)
        n_poison = int(mask.sum())
        batch_hook, step_hook = attack.training_hooks(model)
    fit_seconds = time.perf_counter() - t_fit
    sub = torch.arange(min(2000, len(data.test_y)))

    def test_metrics(epoch: int, record: dict) -> None:  # per-epoch ACC (and ASR) on 2000 test images
        m = evaluate(model, data.test_x[sub], data.test_y[sub], attack, cfg.device)
        record.update({f"test_{k}": v for k, v in m.items()})

    t0 = time.perf_counter()
    hist = fit(model, x, y, cfg, on_epoch=test_metrics, batch_hook=batch_hook, step_hook=step_hook,
               desc=f"train {arch}" + (f" + {attack.name}" if attack else ""), progress=progress)
    seconds = time.perf_counter() - t0 + fit_seconds
    metrics = evaluate(model, data.test_x, data.test_y, attack, cfg.device)
    meta = model_meta(arch, data, attack, cfg, poisoned_samples=n_poison, train_seconds=seconds,
                      attack_fit_seconds=fit_seconds,
                      train_history=hist.epochs, test_metrics=metrics)
    return model, meta


def select_clean(data: Dataset, ratio: float | None, count: int | None, seed: int) -> torch.Tensor:
    """The defender's clean set: a stratified, seeded subset of the (clean) training split."""
    if ratio is None and count is None:
        ratio = 0.01
    return clean_subset(data.train_y, ratio=ratio if count is None else None, count=count, seed=seed)


def run_defense(
    model: nn.Module,
    data: Dataset,
    clean_idx: torch.Tensor,
    attack: Attack | None,
    defense: str = "ulrl",
    preset: str = "default",
    overrides: dict[str, Any] | None = None,
    device: str = "cpu",
    progress: bool = True,
    monitor_size: int = 2000,
    before: dict[str, float] | None = None,
    meta: dict[str, Any] | None = None,
) -> tuple[nn.Module, DefenseReport, dict[str, Any]]:
    """Evaluate (unless ``before`` is given), defend, evaluate again. Returns (repaired model, report, results).
    ``meta``: the checkpoint's description, which picks the scan's reference profile (``scan_reference="auto"``)."""
    cfg = make_defense_config(defense, preset, dataset=data.name, base={"hflip": data.hflip, "device": device},
                              **(overrides or {}))
    if hasattr(cfg, "scan_reference"):
        cfg.scan_reference = reference.resolve(cfg.scan_reference, meta)
    if before is None:
        before = evaluate(model, data.test_x, data.test_y, attack, device)
    sub = torch.arange(min(monitor_size, len(data.test_y)))

    monitor_seconds = 0.0

    def monitor(m: nn.Module) -> dict[str, float]:  # test metrics per epoch, for plots only; timed apart
        nonlocal monitor_seconds
        t = time.perf_counter()
        r = evaluate(m, data.test_x[sub], data.test_y[sub], attack, device)
        monitor_seconds += time.perf_counter() - t
        return {f"test_{k}": v for k, v in r.items()}

    t0 = time.perf_counter()
    repaired, report = run_defense_fn(defense, model, data.train_x[clean_idx], data.train_y[clean_idx], cfg,
                                      monitor=monitor if monitor_size else None, progress=progress)
    seconds = time.perf_counter() - t0 - monitor_seconds
    after = evaluate(repaired, data.test_x, data.test_y, attack, device)
    results = {
        "defense": defense,
        "preset": preset,
        "before": before,
        "after": after,
        "der": der(before, after) if attack is not None else None,
        "flagged_neurons": report.flagged,
        "scan": {k: report.extra["scan"][k] for k in ("verdict", "p_value", "kind", "suspected")} if "scan" in report.extra else None,
        "unlearn_epochs": report.unlearn_epochs,
        "defense_seconds": seconds,  # without the per-epoch test monitoring
        "monitor_seconds": monitor_seconds,
        "clean_samples": int(len(clean_idx)),
        "attack": attack.spec() if attack else None,
        "config": asdict(cfg),
    }
    return repaired, report, results


def scan_model(model: nn.Module, data: Dataset, clean_idx: torch.Tensor, overrides: dict[str, Any] | None = None,
               device: str = "cpu", progress: bool = True, meta: dict[str, Any] | None = None) -> ScanResult:
    """Run the detection scan on the clean subset ``clean_idx`` of ``data``'s training split. ``meta``: the
    checkpoint's description, which picks the reference profile (``reference="auto"``)."""
    cfg = ScanConfig(**{"hflip": data.hflip, "device": device, **(overrides or {})})
    cfg.reference = reference.resolve(cfg.reference, meta)
    return scan(model, data.train_x[clean_idx], data.train_y[clean_idx], cfg, progress=progress)


def scan_record(result: ScanResult, data: Dataset, model_path: str | Path | None, clean_idx: torch.Tensor,
                clean_ratio: float | None = None) -> dict[str, Any]:
    """What ``scan.json`` holds: the result plus where it came from (model path and hash, data, clean set)."""
    model = {"path": str(model_path) if model_path else None, "sha256": None}
    if model_path and Path(model_path).is_file():
        model["sha256"] = hashlib.sha256(Path(model_path).read_bytes()).hexdigest()
    head = {"schema_version": result.schema_version, "ulrl_version": __version__, "model": model, "dataset": data.name,
            "clean_samples": int(len(clean_idx)), "clean_ratio": clean_ratio}
    body = result.to_dict()
    body["parameters"] = body.pop("config")
    return {**head, **body}


def write_defense_outputs(out: Path, repaired: nn.Module, meta: dict, report: DefenseReport, results: dict,
                          clean_idx: torch.Tensor, inputs=(), overwrite: bool = False) -> None:
    """Repaired checkpoint, report, results, clean indices and the plots, all written atomically."""
    ensure_dir(out)
    purified_meta = {**meta, "purified_by": {"defense": results["defense"], "preset": results["preset"],
                                             "config": results["config"]}}
    save_checkpoint(out / "model.safetensors", repaired, purified_meta, inputs=inputs, overwrite=overwrite)
    write_json(out / "clean_indices.json", {"split": "train", "indices": clean_idx.tolist()})
    write_json(out / "report.json", report.to_dict())
    write_json(out / "results.json", results)
    if report.defense == "ulrl":  # the per-neuron score plot is ULRL's own
        plot_scores(report, out / "neuron_scores.png")
    plot_curves(report, out / "curves.png")


def format_table(rows: list[tuple[str, dict, float | None]]) -> str:
    """A before/after table: rows of (label, metrics, seconds)."""

    def cell(v, width: int = 8, fmt: str = ".4f") -> str:
        return f"{v:{width}{fmt}}" if isinstance(v, float) else "-".rjust(width)

    head = f"{'model':<22}{'ACC':>8}{'ASR':>8}{'RA':>8}{'DER':>8}{'seconds':>10}"
    lines = [head, "-" * len(head)]
    for label, m, secs in rows:
        metrics = "".join(cell(m.get(k)) for k in ("acc", "asr", "ra", "der"))
        lines.append(f"{label:<22}{metrics}{cell(secs, 10, '.1f')}")
    return "\n".join(lines)


def demo(
    data: Dataset,
    attack_name: str = "badnets",
    out: str | Path = "runs/demo",
    seed: int = 0,
    epochs: int = 5,
    preset: str = "default",
    overrides: dict[str, Any] | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Train the small CNN with a backdoor, purify it with ULRL on 1% clean data, report."""
    out = ensure_dir(out)
    if (out / "results.json").exists() and not overwrite:
        raise UserError(f"{out} already holds a demo result; choose another --out or pass --overwrite")
    specs = {"badnets": "badnets:patch_size=3,position=bottom-right,rate=0.1,target=0",
             "blended": "blended:pattern=noise,alpha=0.2,rate=0.1,target=0"}
    attack = build_attack(specs.get(attack_name, attack_name), num_classes=data.num_classes)
    attack.seed = seed
    cfg = TrainConfig(epochs=epochs, lr=0.01, schedule="cosine", hflip=data.hflip, seed=seed, device=device)
    log.info("training cnn-small on %s with %s (%d epochs)", data.name, attack.name, epochs)
    model, meta = train_model(data, "cnn-small", attack, cfg, progress=progress)
    save_checkpoint(out / "poisoned.safetensors", model, meta, attack.state_tensors(), overwrite=overwrite)
    clean_idx = select_clean(data, 0.01, None, seed)
    ov = {"seed": seed, **(overrides or {})}
    repaired, report, results = run_defense(model, data, clean_idx, attack, "ulrl", preset, ov, device, progress, meta=meta)
    results["train_seconds"] = meta["train_seconds"]
    results["dataset"] = data.name
    results["seed"] = seed
    write_defense_outputs(out, repaired, meta, report, results, clean_idx, overwrite=overwrite)
    return results
