"""SAU: Shared Adversarial Unlearning (Wei, Zhang, Zha & Wu, NeurIPS 2023, "Shared Adversarial
Unlearning: Backdoor Mitigation by Unlearning Shared Adversarial Examples").

The backdoor risk of a model is bounded by its risk on *shared* adversarial examples: inputs
that fool both the model being repaired and the original backdoored model in the same way.
SAU alternates, for every mini-batch of the clean set:

1. **Shared adversarial examples (maximisation).** Per-image L-inf perturbations (bound
   ``eps`` in pixel units, started at ``+eps``) found by ``pgd_steps`` signed-gradient steps of
   size ``pgd_lr`` that maximise the cross-entropy of both models on the images neither model
   is fooled on yet (weight ``beta_1``) while minimising the Jensen-Shannon divergence between
   the two models' predictions on the images not yet shared (weight ``beta_2``). PGD stops early
   once every image is a shared adversarial example.
2. **Unlearning (minimisation).** One step of the model on
   ``lmd_1 * CE(clean) + lmd_2 * CE(adversarial, y) + lmd_3 * L_shared``, where ``L_shared``
   lowers the model's probability of the label the ORIGINAL model gives to each adversarial
   image the original model is fooled on (``-log(1 - p)`` in the reference's symmetrised,
   clamped form).

Wired into the one training loop: each round is one epoch of :func:`ulrl.train.fit`; its
``batch_hook`` runs the shared PGD on the batch and keeps the adversarial images, its ``penalty``
adds the adversarial and shared terms (fit's own loss is the clean cross-entropy). The model is
kept in eval mode (BatchNorm statistics and dropout frozen), as the reference's default.

Defaults: the authors' implementation in BackdoorBench (``defense/sau.py``, ``config/defense/sau``):
Adam lr 1e-4 (constant, the scheduler is never stepped), batch 256, L-inf bound 0.2, PGD step
0.2, 5 steps, start at +eps, beta_1 0.01, beta_2 1, lmd_1 1, lmd_2 0, lmd_3 1, no augmentation.
The reference runs 100 rounds (the ``paper`` preset: about 6 minutes of one CPU core for a
600-image Fashion-MNIST cnn-small). The ``default`` preset runs 10 rounds at lr 1e-3 (the same
learning rate times number of Adam steps as 100 rounds at 1e-4), which fits the benchmark's
budget of under a minute; see docs/defenses.md.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..train import TrainConfig, fit
from .base import CommonConfig, DefenseReport, Monitor, register_defense


@dataclass
class SAUConfig(CommonConfig):
    # Unlearning (the model's weights, through fit)
    lr: float = 1e-3  # reference: 1e-4 with 100 rounds (the "paper" preset)
    optimizer: str = "adam"
    weight_decay: float = 0.0
    n_rounds: int = 10  # reference: 100 (the "paper" preset)
    lmd_1: float = 1.0  # clean cross-entropy
    lmd_2: float = 0.0  # adversarial cross-entropy (plain adversarial training; off in the reference)
    lmd_3: float = 1.0  # shared adversarial risk
    # Shared adversarial examples (PGD)
    eps: float = 0.2  # L-inf bound, pixel units (images in [0, 1])
    pgd_lr: float = 0.2
    pgd_steps: int = 5
    pgd_init: str = "max"  # "max" (+eps) | "zero" | "random" (uniform in [-eps, eps]) | "min" (-eps)
    beta_1: float = 0.01  # adversarial loss weight in PGD
    beta_2: float = 1.0  # shared (JS divergence) loss weight in PGD
    # Shared settings
    batch_size: int = 256
    augment: bool = False

    def __post_init__(self) -> None:
        if self.n_rounds < 0 or self.pgd_steps < 0 or self.batch_size < 1:
            raise UserError("n_rounds and pgd_steps must be >= 0 and batch_size >= 1")
        if self.pgd_init not in ("max", "zero", "random", "min"):
            raise UserError(f"pgd_init must be max, zero, random or min, got {self.pgd_init!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise UserError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")


PRESETS: dict[str, dict] = {
    "default": {},
    "paper": {"n_rounds": 100, "lr": 1e-4},  # the reference's budget
}


def _js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-sample Jensen-Shannon divergence of two probability rows."""
    m = 0.5 * (p + q)
    return 0.5 * (p * (p.log() - m.log())).sum(1) + 0.5 * (q * (q.log() - m.log())).sum(1)


def shared_pgd(model: nn.Module, ref: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: SAUConfig,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared adversarial perturbations of ``x`` for ``model`` and the original ``ref`` (both in
    eval mode). Returns the perturbation (same shape as x, detached) and ref's clean predictions."""
    n = len(x)
    if cfg.pgd_init == "max":
        pert = torch.full_like(x, cfg.eps)
    elif cfg.pgd_init == "min":
        pert = torch.full_like(x, -cfg.eps)
    elif cfg.pgd_init == "random":
        pert = ((torch.rand(x.shape, generator=gen) * 2 - 1) * cfg.eps).to(x)
    else:
        pert = torch.zeros_like(x)
    with torch.no_grad():
        own, own_ref = model(x).argmax(1), ref(x).argmax(1)
    for _ in range(cfg.pgd_steps):
        pert.requires_grad_(True)
        logits, logits_ref = model(x + pert), ref(x + pert)
        pred, pred_ref = logits.argmax(1), logits_ref.argmax(1)
        fooled, fooled_ref = pred != own, pred_ref != own_ref
        shared = fooled & fooled_ref & (pred == pred_ref)
        ce, ce_ref = F.cross_entropy(logits, y, reduction="none"), F.cross_entropy(logits_ref, y, reduction="none")
        loss_adv = -(ce[~fooled].sum() + ce_ref[~fooled_ref].sum()) / 2 / n
        p, q = F.softmax(logits, 1).clamp(min=1e-8), F.softmax(logits_ref, 1).clamp(min=1e-8)
        loss_shared = _js_divergence(p, q)[~shared].sum() / n
        grad = torch.autograd.grad(cfg.beta_1 * loss_adv + cfg.beta_2 * loss_shared, pert)[0]
        with torch.no_grad():
            pert = (pert - cfg.pgd_lr * grad.sign()).clamp(-cfg.eps, cfg.eps)
        if bool(shared.all()):
            break
    return pert.detach(), own_ref


def shared_risk(per_logits: torch.Tensor, per_logits_ref: torch.Tensor, clean_pred_ref: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
    """SAU's shared adversarial loss: on the adversarial images that fool the original model
    (prediction neither the true label nor its clean prediction), lower the repaired model's
    probability of the original model's adversarial label (the reference's clamped, symmetrised
    ``-log(1 - p)``), summed and divided by the batch size."""
    label_ref = per_logits_ref.argmax(1)
    poisoned = (label_ref != y) & (label_ref != clean_pred_ref)
    if not bool(poisoned.any()):
        return per_logits.new_zeros(())
    prob = F.softmax(per_logits, 1)
    one_hot = F.one_hot(label_ref, prob.shape[1]).to(prob)
    pos = (prob * one_hot).sum(1)[poisoned]
    neg = (prob * (1 - one_hot)).sum(1)[poisoned]  # = 1 - pos, summed directly for precision (as the reference)
    loss = -torch.log(1e-6 + neg.clamp(max=0.999)).sum() - torch.log(1 + 1e-6 - pos.clamp(min=0.001)).sum()
    return loss / 2 / len(y)


class SharedUnlearning:
    """The batch hook (shared PGD) and penalty (adversarial + shared terms) for fit."""

    def __init__(self, model: nn.Module, ref: nn.Module, cfg: SAUConfig, gen: torch.Generator) -> None:
        self.model, self.ref, self.cfg, self.gen = model, ref, cfg, gen
        self._pert: torch.Tensor | None = None
        self._clean_pred_ref: torch.Tensor | None = None
        self.stats = {"batches": 0, "shared": 0, "fooled_ref": 0, "images": 0}

    def batch_hook(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.model.eval()  # the reference unlearns in eval mode (train_mode=False)
        self._pert, self._clean_pred_ref = shared_pgd(self.model, self.ref, xb, yb, self.cfg, self.gen)
        return xb, yb

    def penalty(self, xb: torch.Tensor, out: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        x_adv = xb + self._pert
        per_logits = self.model(x_adv)
        with torch.no_grad():
            per_logits_ref = self.ref(x_adv)
            pred, pred_ref = per_logits.argmax(1), per_logits_ref.argmax(1)
            self.stats["shared"] += int(((pred != yb) & (pred_ref != yb) & (pred == pred_ref)).sum())
            self.stats["fooled_ref"] += int((pred_ref != yb).sum())
            self.stats["images"] += len(yb)
            self.stats["batches"] += 1
        total = (cfg.lmd_1 - 1.0) * F.cross_entropy(out, yb)  # fit's loss already counts CE(clean) once
        if cfg.lmd_2:
            total = total + cfg.lmd_2 * F.cross_entropy(per_logits, yb)
        return total + cfg.lmd_3 * shared_risk(per_logits, per_logits_ref, self._clean_pred_ref, yb)


@register_defense("sau", SAUConfig, PRESETS)
def sau(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: SAUConfig | None = None,
        monitor: Monitor | None = None, progress: bool = True) -> tuple[nn.Module, DefenseReport]:
    """Repair ``model`` with SAU using clean images ``x`` and labels ``y``; returns (model, report)."""
    cfg = config or SAUConfig()
    if len(y) == 0:
        raise UserError("the clean set is empty; give at least one clean image per class")
    report = DefenseReport(defense="sau", config=asdict(cfg))
    ref = copy.deepcopy(model).to(cfg.device).eval().requires_grad_(False)  # the original backdoored model
    model = copy.deepcopy(model).to(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    sau_terms = SharedUnlearning(model, ref, cfg, gen)
    per_round: list[float] = []

    def end_round(epoch: int, record: dict) -> None:
        s = sau_terms.stats
        record["shared_adv_rate"] = s["shared"] / max(s["images"], 1)  # during this round, after PGD
        record["ref_fooled_rate"] = s["fooled_ref"] / max(s["images"], 1)
        per_round.append(record["shared_adv_rate"])
        sau_terms.stats = {k: 0 for k in s}
        if monitor is not None:
            record.update(monitor(model))

    t0 = time.perf_counter()
    tc = TrainConfig(epochs=cfg.n_rounds, optimizer=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                     batch_size=cfg.batch_size, schedule="constant", freeze_bn=True, augment=cfg.augment,
                     hflip=cfg.hflip, seed=cfg.seed, device=cfg.device)
    hist = fit(model, x, y, tc, batch_hook=sau_terms.batch_hook, penalty=sau_terms.penalty, on_epoch=end_round,
               desc="SAU", progress=progress)
    report.relearn_history = hist.epochs
    report.seconds["total"] = time.perf_counter() - t0
    report.extra = {"shared_adv_rate_per_round": per_round}
    return model.eval(), report


__all__ = ["PRESETS", "SAUConfig", "SharedUnlearning", "sau", "shared_pgd", "shared_risk"]
