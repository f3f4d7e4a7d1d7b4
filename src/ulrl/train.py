"""The one training loop. Poisoned training, unlearning and every fine-tuning go through :func:`fit`."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data.transforms import augment, to_float

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimiser, schedule and batching for one call of :func:`fit`."""

    epochs: int = 10
    optimizer: str = "sgd"  # "sgd" | "adam" (Adam ignores momentum; I-BAU and SAU use it)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    schedule: str = "cosine"  # "cosine" | "step" | "constant"
    milestones: tuple[int, ...] = ()  # for "step"
    gamma: float = 0.1  # for "step"
    grad_clip: float | None = None  # max global gradient norm
    sam_rho: float = 0.0  # > 0: sharpness-aware minimisation (SAM) with this radius (two passes per step)
    sam_adaptive: bool = False  # adaptive SAM (ASAM): perturbation scaled elementwise by |w|
    augment: bool = True  # random crop with padding (+ flip when the data allows it)
    hflip: bool = True
    crop_pad: int | None = None  # padding of the random crop (None: image side // 8)
    freeze_bn: bool = False  # keep BatchNorm running statistics fixed (eval mode)
    amp: bool = False  # mixed precision, CUDA only
    extra_bn_pass: bool = False  # one more train-mode forward pass per batch after each step (BatchNorm statistics move twice)
    seed: int = 0
    device: str = "cpu"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class History:
    """Per-epoch records of one :func:`fit` call."""

    epochs: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    seconds: float = 0.0


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig):
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1))
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.milestones), gamma=cfg.gamma)
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    raise ValueError(f"unknown schedule {cfg.schedule!r}; use cosine, step or constant")


def _set_bn_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@torch.no_grad()
def _sam_perturb(params: list[nn.Parameter], rho: float, adaptive: bool) -> list[torch.Tensor]:
    """Move each weight to ``w + e`` with ``e = rho * T^2 g / ||T g||`` (T = |w| for ASAM, else 1),
    the worst case within radius ``rho`` to first order. Returns the weights ``w``, to restore."""
    originals = [p.detach().clone() for p in params]
    grads = [(p, p.grad) for p in params if p.grad is not None]
    if grads:
        norm = torch.norm(torch.stack([((p.abs() if adaptive else 1.0) * g).norm(2) for p, g in grads]))
        for p, g in grads:
            p.add_((p.pow(2) if adaptive else 1.0) * g * (rho / (norm + 1e-12)))
    return originals


class _FrozenBNStats:
    """Context: BatchNorm running statistics are left as they were by SAM's second forward pass."""

    def __init__(self, model: nn.Module) -> None:
        self.bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]

    def __enter__(self) -> None:
        self.saved = [(m.momentum, m.num_batches_tracked.clone()) for m in self.bns]
        for m in self.bns:
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch

    def __exit__(self, *_) -> None:
        for m, (momentum, tracked) in zip(self.bns, self.saved, strict=True):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    *,
    ascent: bool = False,
    penalty: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    lr_scale: Callable[[str], float] | None = None,
    on_epoch: Callable[[int, dict], bool | None] | None = None,
    batch_hook: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    step_hook: Callable[[], None] | None = None,
    desc: str = "train",
    progress: bool = True,
) -> History:
    """Train ``model`` in place on images ``x`` (uint8 or float in [0, 1]) and labels ``y``.

    ``ascent`` maximises the cross-entropy instead of minimising it (unlearning).
    ``penalty(x, logits, y)`` adds a differentiable term to the loss at each step.
    ``lr_scale(param_name)`` multiplies the learning rate of each parameter (default 1).
    ``on_epoch(epoch, record)`` is called after each epoch; returning True stops training.
    ``batch_hook(x, y) -> (x, y)`` rewrites each (augmented, float, on-device) batch before the
    forward pass: training-time attacks (WaNet, Input-aware, BPP, Blind) poison batches here.
    ``step_hook()`` runs after each optimiser step (e.g. to step an attack's own generator).
    With ``cfg.sam_rho > 0`` each step is a SAM step (Foret et al. 2021; adaptive: Kwon et al. 2021):
    the gradient is taken again (objective, penalty included) at the perturbed weights ``w + e``,
    the weights are restored and the optimiser steps with that second gradient.
    Each epoch's record holds the mean loss, the running training accuracy, the learning rate
    and the seconds taken, plus whatever ``on_epoch`` adds to it.
    """
    device = torch.device(cfg.device)
    model.to(device)
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    scales = sorted({lr_scale(k) for k, _ in named}) if lr_scale else [1.0]
    groups = [{"params": [p for k, p in named if (lr_scale(k) if lr_scale else 1.0) == s], "lr": cfg.lr * s} for s in scales]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use sgd or adam")
    sched = make_scheduler(opt, cfg)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(y)
    steps = math.ceil(n / cfg.batch_size)
    hist = History()

    def forward(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, cross-entropy and the objective that is minimised (ascent and penalty applied)."""
        with torch.autocast(device.type, enabled=use_amp):
            out = model(xb)
            loss = F.cross_entropy(out, yb)
        objective = -loss if ascent else loss
        if penalty is not None:
            objective = objective + penalty(xb, out, yb)
        return out, loss, objective

    start = time.perf_counter()
    bar = tqdm(total=cfg.epochs * steps, desc=desc, disable=not progress, leave=False, unit="step")
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        if cfg.freeze_bn:
            _set_bn_eval(model)
        order = torch.randperm(n, generator=gen)
        loss_sum, correct, seen = 0.0, 0, 0
        for i in range(steps):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            xb = to_float(x[idx])
            if cfg.augment:
                xb = augment(xb, pad=cfg.crop_pad, hflip=cfg.hflip, generator=gen)
            xb, yb = xb.to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
            if batch_hook is not None:
                xb, yb = batch_hook(xb, yb)
            out, loss, objective = forward(xb, yb)
            opt.zero_grad(set_to_none=True)
            scaler.scale(objective).backward()
            if cfg.sam_rho > 0:  # second pass at the sharpness-aware point, then back to w
                originals = _sam_perturb(params, cfg.sam_rho, cfg.sam_adaptive)
                opt.zero_grad(set_to_none=True)
                with _FrozenBNStats(model):
                    scaler.scale(forward(xb, yb)[2]).backward()
                with torch.no_grad():
                    for p, w in zip(params, originals, strict=True):
                        p.copy_(w)
            if cfg.grad_clip is not None:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            if cfg.extra_bn_pass:  # as the ULRL authors' trainer: BatchNorm statistics see the batch again
                with torch.no_grad(), torch.autocast(device.type, enabled=use_amp):
                    model(xb)
            if step_hook is not None:
                step_hook()
            loss_sum += loss.item() * len(yb)
            correct += (out.argmax(1) == yb).sum().item()
            seen += len(yb)
            bar.update(1)
        record = {
            "epoch": epoch,
            "loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "lr": opt.param_groups[-1]["lr"],
            "seconds": time.perf_counter() - t0,
        }
        sched.step()
        stop = bool(on_epoch(epoch, record)) if on_epoch is not None else False
        hist.epochs.append(record)
        bar.set_postfix({k: round(v, 4) for k, v in record.items() if isinstance(v, float)})
        log.info("%s epoch %d: %s", desc, epoch, record)
        if stop:
            hist.stopped_early = epoch < cfg.epochs
            break
    bar.close()
    hist.seconds = time.perf_counter() - start
    model.eval()
    return hist
