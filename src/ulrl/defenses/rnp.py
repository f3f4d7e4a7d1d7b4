"""RNP: Reconstructive Neuron Pruning (Li, Lyu, Ma, Koren, Lyu, Li & Jiang, ICML 2023).

An asymmetric unlearn-recover process exposes the backdoor neurons:

1. **Unlearn.** Maximise the cross-entropy of the model on the clean set (gradient ascent)
   until the clean accuracy of an epoch is <= ``clean_threshold``. Unlearning clean features
   leaves the backdoor features, which the clean data never exercise, largely intact.
2. **Recover.** On the unlearned model, learn a mask ``m_k`` in [0, 1] (initially 1) per
   BatchNorm channel ("neuron", multiplying its weight ``gamma``) that restores clean accuracy:
   minimise ``alpha * CE`` over the masks only, clipping them to [0, 1]. Recovery re-enables the
   clean neurons; the backdoor neurons, which do not help on clean data, keep shrinking.
3. **Prune.** In the ORIGINAL model, prune the channels whose mask is <= ``prune_threshold``
   (their BatchNorm weight is set to 0, as the reference does).

Defaults: the authors' code (``bboylyg/RNP``, also BackdoorBench's ``rnp``): unlearning with SGD
lr 0.01, momentum 0.9, weight decay 5e-4, batch 128, MultiStepLR at epochs 10 and 20 (gamma 0.1),
at most 20 epochs, clean threshold 0.2; recovering with SGD lr 0.2, momentum 0.9, alpha 0.2,
20 epochs; the usual training augmentation; the network in training mode throughout. The
reference reports pruning results over thresholds 0 to 0.9 in steps of 0.05; its README example
(CIFAR-10, BadNets) removes the backdoor at 0.2, the threshold used here. The reference calls
``clip_grad_norm_`` before ``backward`` (so no clipping happens); ``grad_clip`` is 0 (off) here too.

One deviation in the ``default`` preset (``stop_check="batch"``): the reference checks the clean
threshold once per epoch, on the running accuracy of the epoch. A small network collapses within
a few ascent steps (Fashion-MNIST cnn-small: from 0.89 to 0.18 test accuracy in the 5 steps of
the first epoch, then a loss of 100+ in the second), so by the end of the epoch whose running
accuracy is <= 0.2 the network is wrecked, recovering cannot bring back any clean accuracy (it
stays at chance), and pruning by the masks removes most channels. With ``stop_check="batch"``
the weights are kept from the first step whose mini-batch accuracy (computed by fit on the
batch, before the step) is <= the threshold, i.e. as soon as the collapse is seen. The
``paper`` preset keeps the per-epoch check.
Unlearning goes through :func:`ulrl.train.fit` (``ascent=True``); the masks, which are not model
weights, have their own small loop.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.transforms import augment, to_float
from ..errors import UserError
from ..train import TrainConfig, fit
from .anp import BNMasks, PruneConfig, mask_summary, prune_channels, select_pruned
from .base import DefenseReport, Monitor, register_defense


@dataclass
class RNPConfig(PruneConfig):
    # Unlearning (gradient ascent on the clean set)
    unlearn_lr: float = 0.01
    unlearn_epochs: int = 20
    unlearn_milestones: tuple[int, ...] = (10, 20)
    clean_threshold: float = 0.2  # stop once an epoch's clean accuracy is <= this
    stop_check: str = "batch"  # "batch": stop at the first batch at or below the threshold | "epoch" (reference)
    grad_clip: float = 0.0  # max gradient norm while unlearning; 0: none (the reference's effective setting)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # Recovering (masks of the unlearned model's BatchNorm channels)
    recover_lr: float = 0.2
    recover_momentum: float = 0.9
    recover_epochs: int = 20
    alpha: float = 0.2  # the recovering loss is alpha * CE

    def __post_init__(self) -> None:
        if self.unlearn_epochs < 0 or self.recover_epochs < 0 or self.batch_size < 1:
            raise UserError("unlearn_epochs and recover_epochs must be >= 0 and batch_size >= 1")
        if self.stop_check not in ("batch", "epoch"):
            raise UserError(f"stop_check must be 'batch' or 'epoch', got {self.stop_check!r}")
        if self.prune_by not in ("threshold", "fraction"):
            raise UserError(f"prune_by must be 'threshold' or 'fraction', got {self.prune_by!r}")
        if not 0.0 <= self.prune_fraction <= 1.0:
            raise UserError(f"prune_fraction must be in [0, 1], got {self.prune_fraction}")


PRESETS: dict[str, dict] = {
    "default": {},  # the reference's settings but the batch-level stop (they fit the CPU budget)
    "paper": {"stop_check": "epoch"},
}


def recover_masks(model: nn.Module, masks: BNMasks, x: torch.Tensor, y: torch.Tensor, cfg: RNPConfig,
                  monitor: Monitor | None, progress: bool) -> list[dict]:
    """RNP's recovering: minimise ``alpha * CE`` of the masked unlearned model over the masks only."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.SGD(masks.masks, lr=cfg.recover_lr, momentum=cfg.recover_momentum)
    steps = math.ceil(len(y) / cfg.batch_size)
    history: list[dict] = []
    bar = tqdm(total=cfg.recover_epochs * steps, desc="RNP recover", disable=not progress, leave=False)
    for epoch in range(1, cfg.recover_epochs + 1):
        t0 = time.perf_counter()
        model.train()  # as the reference: BatchNorm on batch statistics
        order = torch.randperm(len(y), generator=gen)
        loss_sum, correct = 0.0, 0
        for i in range(steps):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            xb = to_float(x[idx])
            if cfg.augment:
                xb = augment(xb, hflip=cfg.hflip, generator=gen)
            xb, yb = xb.to(cfg.device), y[idx].to(cfg.device)
            out = model(xb)
            loss = cfg.alpha * F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            masks.clip_masks()
            loss_sum += loss.item() * len(yb)
            correct += (out.argmax(1) == yb).sum().item()
            bar.update(1)
        record = {"epoch": epoch, "loss": loss_sum / len(y), "train_acc": correct / len(y),
                  "mask_mean": masks.values().mean().item(), "seconds": time.perf_counter() - t0}
        if monitor is not None:  # the masked unlearned model
            record.update(monitor(model))
        history.append(record)
    bar.close()
    return history


@register_defense("rnp", RNPConfig, PRESETS)
def rnp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: RNPConfig | None = None,
        monitor: Monitor | None = None, progress: bool = True) -> tuple[nn.Module, DefenseReport]:
    """Repair ``model`` with RNP using clean images ``x`` and labels ``y``; returns (model, report)."""
    cfg = config or RNPConfig()
    if len(y) == 0:
        raise UserError("the clean set is empty; give at least one clean image per class")
    report = DefenseReport(defense="rnp", config=asdict(cfg))
    work = copy.deepcopy(model).to(cfg.device)
    BNMasks(work, "RNP").remove()  # fail early, before any work, if there is no BatchNorm

    # 1. Unlearn: gradient ascent until the clean accuracy collapses.
    t0 = time.perf_counter()

    snapshot: dict = {}

    def watch(_x: torch.Tensor, out: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        # batch-level stop: keep the weights that first scored <= the threshold on a batch
        if cfg.stop_check == "batch" and not snapshot:
            if (out.argmax(1) == yb).float().mean().item() <= cfg.clean_threshold:
                snapshot.update(copy.deepcopy(work.state_dict()))
        return out.new_zeros(())

    def collapsed(epoch: int, record: dict) -> bool:
        if snapshot:
            work.load_state_dict(snapshot)
            record["stopped_at_batch"] = True
        if monitor is not None:
            record.update(monitor(work))
        return bool(snapshot) or record["train_acc"] <= cfg.clean_threshold

    tc = TrainConfig(epochs=cfg.unlearn_epochs, lr=cfg.unlearn_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                     batch_size=cfg.batch_size, schedule="step", milestones=cfg.unlearn_milestones,
                     grad_clip=cfg.grad_clip or None, augment=cfg.augment, hflip=cfg.hflip, seed=cfg.seed, device=cfg.device)
    report.unlearn_history = fit(work, x, y, tc, ascent=True, penalty=watch, on_epoch=collapsed, desc="RNP unlearn",
                                 progress=progress).epochs
    report.unlearn_epochs = len(report.unlearn_history)
    if report.unlearn_history and report.unlearn_history[-1]["train_acc"] > cfg.clean_threshold:
        report.notes.append(f"unlearning did not reach the clean threshold {cfg.clean_threshold} in {cfg.unlearn_epochs} epochs")
    report.seconds["unlearn"] = time.perf_counter() - t0

    # 2. Recover: learn BatchNorm channel masks on the unlearned model (its weights frozen).
    t0 = time.perf_counter()
    work.requires_grad_(False)
    masks = BNMasks(work, "RNP")
    report.relearn_history = recover_masks(work, masks, x, y, cfg, monitor, progress)
    masks.remove()
    report.seconds["recover"] = time.perf_counter() - t0

    # 3. Prune the original model's channels with small masks.
    t0 = time.perf_counter()
    flat = select_pruned(masks.values(), cfg.prune_by, cfg.prune_threshold, cfg.prune_fraction)
    repaired = copy.deepcopy(model).to(cfg.device)
    names, sizes = [n for n, _ in masks.layers], [m.num_features for _, m in masks.layers]
    pruned = prune_channels(repaired, names, sizes, flat, bias=cfg.prune_bias)
    report.layer = ",".join(pruned)
    report.extra = {"pruned": pruned, **mask_summary(masks, flat)}
    if not len(flat):
        report.notes.append(f"no mask fell to the pruning threshold {cfg.prune_threshold}: the model is unchanged")
    report.seconds["prune"] = time.perf_counter() - t0
    report.seconds["total"] = report.seconds["unlearn"] + report.seconds["recover"] + report.seconds["prune"]
    return repaired.eval(), report


__all__ = ["PRESETS", "RNPConfig", "recover_masks", "rnp"]
