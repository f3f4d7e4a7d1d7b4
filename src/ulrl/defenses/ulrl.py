"""ULRL: UnLearn and ReLearn (Min, Pham & Sun, arXiv 2405.14781).

Given a possibly backdoored classifier and a few clean samples:

1. **Find the backdoor's neurons.** The paper: maximise the cross-entropy on the clean set
   (gradient ascent) until the clean accuracy of an epoch falls to the clean threshold; a
   backdoored network collapses toward its target class, so the neurons that carry the backdoor
   move the most. Each neuron of the examined layer (a row of the classifier) is scored by the
   summed absolute change of its incoming weights; a robust (median/MAD) outlier test flags the
   suspicious ones (:mod:`ulrl.detection.weight_change`).
2. **Restore and re-initialise.** Go back to the original weights and re-initialise only the
   flagged neurons.
3. **Relearn.** Fine-tune on the clean set with a cosine-similarity penalty that pushes each
   flagged neuron away from its original (backdoored) direction.

The ``paper`` preset is the authors' reference code. The ``default`` preset finds the neurons
with :func:`ulrl.detection.scan` instead (docs/detection.md): step 1's collapse also happens onto
natural attractor classes and on clean models, so the default asks a calibrated detector which
classes a backdoor serves, re-initialises exactly those rows, and leaves a model with no evidence
of a backdoor untouched. Its repair (docs/method.md, Finding 4) scales each re-initialised
(random) row to the norm and bias of the other rows (``reinit="matched"``), floors the cosine
penalty (``cos_margin``), and relearns with the scan's universal perturbation toward each
flagged class added to clean images under their true labels (``trigger_unlearn``,
``trigger_scale``; Findings 4 and 10), which takes the backdoor out of the features as well as the row; it relearns
without that term first and adds it only when the relearned model still follows the perturbation (``verify_repair``,
Finding 12: the term is adversarial training toward the flagged class, costly when that class is a natural
attractor, and needless where re-initialising the row took the backdoor out). It relearns
with the original model's BatchNorm statistics (``freeze_bn``: with batch statistics, a batch of
perturbed images is normalised back toward clean ones and the shortcut survives in eval mode), at
a lower learning rate (0.002: without batch normalisation the paper's 0.005 overshoots), and
distils the original model's clean-image predictions on the other classes (``distill``). Before the
whole network relearns, the re-initialised layer alone learns with the same losses, the backbone
fixed (``probe_epochs``, a linear probe as in LP-FT, docs/method.md, Finding 9): a random row
trained together with the backbone bends the features toward itself, and the flagged class paid
for it. An all-to-all
backdoor (every class a target) has no row to single out: no row is re-initialised, and relearning
unlearns the scan's perturbations from each class to its target (``all_to_all_repair="features"``),
each clean image carrying one of them at random, keeping its label (``all_to_all_sources="any"``:
the trigger is one pattern for every class, which no single class's perturbation recovers whole).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import to_float
from ..detection import ScanConfig, ScanResult, scan
from ..detection.universal import warp
from ..detection.weight_change import mad_outliers, unlearn
from ..errors import UserError
from ..metrics import accuracy
from ..models import find_classifier
from ..train import TrainConfig, fit
from .base import DefenseReport, Monitor, make_defense_config, register_defense, split_holdout


@dataclass
class ULRLConfig:
    # Phase 1: which neurons (rows of the classifier) carry the backdoor
    detect: str = "unlearning"  # "unlearning": the paper's weight-change outliers; "scan": ulrl.detection's verdict
    scan_alpha: float = 0.05  # detect=scan: false-positive rate of the verdict
    force_repair: bool = False  # detect=scan: repair the most suspicious class even without evidence of a backdoor
    scan_reference: str | None = "auto"  # detect=scan: the scan's profile of clean reference models (ScanConfig.reference)
    unlearn_lr: float = 0.01  # unlearning (gradient ascent on the clean set); also the scan's weight-change signal
    unlearn_epochs: int = 20
    unlearn_milestones: tuple[int, ...] = (10, 20)
    clean_threshold: float = 0.2  # stop once an epoch's clean accuracy is <= this
    grad_clip: float = 20.0
    unlearn_freeze_bn: bool = False  # keep BatchNorm statistics fixed while unlearning
    layer: str | None = None  # examined layer; default: the last nn.Linear (the classifier)
    mad_threshold: float = 3.5
    max_neurons: int = 2
    # detect=scan, an all-to-all verdict (every class a target): "rows" re-initialises the first max_neurons rows like an
    # all-to-one backdoor; "features" re-initialises none (a cap of 2 left 9-18% ASR, all 10 rows cost 9 points of ACC)
    # and relearns with the classes' shortcuts to their targets unlearned and distillation on every class
    all_to_all_repair: str = "rows"
    all_to_all_scale: float | None = None  # the size of each class's own perturbation unlearned (None: trigger_scale)
    # whose perturbation each clean image carries: "own" (its class's) or "any" (a random class's): the field's
    # all-to-all triggers are one pattern for every source, which one source's perturbation (fitted on five images)
    # recovers only in part (docs/method.md, Finding 7)
    all_to_all_sources: str = "own"
    rank_by: str = "score"  # which flagged rows the cap keeps: highest "score" first, or lowest class "index" (reference)
    second_look: bool = False  # detect=unlearning: unlearn again with the flagged classes masked; flag that collapse too
    second_look_freeze_bn: bool = False  # BatchNorm statistics fixed during the second look
    # Phase 2: relearning with the cosine-similarity penalty
    relearn_lr: float = 0.005
    relearn_epochs: int = 20
    # a linear probe first (LP-FT, Kumar et al. 2022): the examined layer alone learns for probe_epochs (at probe_lr,
    # the backbone fixed) before the whole network relearns, so that a random row does not distort the features
    probe_epochs: int = 0
    probe_lr: float = 0.05
    relearn_weight_decay: float | None = None  # None: the shared weight_decay (the reference relearns with 0)
    relearn_extra_bn_pass: bool = False  # the reference trainer's second train-mode forward pass per batch
    alpha: float = 0.7  # weight of the cosine penalty
    cos_margin: float = -1.0  # penalise cos(w_k, w_k_original) only above this (-1: always, as the paper)
    reinit: str = "he"  # "he": the paper's He-uniform rows, bias 0; "matched": the same scaled to the other rows' median norm
    # and bias; "prototype": the flagged class's mean clean feature at that scale (docs/method.md)
    trigger_unlearn: float = 0.0  # detect=scan: weight of the loss on clean images + the scan's perturbation, true labels
    trigger_scale: float = 1.0  # that perturbation's size, relative to the one the scan found (90% of images flipped)
    # A guard against a relearning that diverges (PreAct-ResNet18 with frozen BatchNorm statistics): when the relearned
    # model loses more than this (a fraction) of the original's accuracy on the clean images of the classes not
    # flagged, relearn with batch statistics, then at a quarter of the lr; if every try diverges, the original comes
    # back. None: no guard (paper)
    relearn_guard: float | None = None
    # The cost budget (docs/method.md, Finding 11): relearning trains on the clean set, so its accuracy there normally
    # rises; when the relearned model instead loses more than this (a fraction) of the original's accuracy on the clean
    # images of the classes not flagged, the unlearned shortcut overlaps the clean task (a perturbation toward a natural
    # attractor class): relearn again with it halved (trigger_scale and all_to_all_scale), down to trigger_floor of it,
    # and keep the first try within the budget, else the one that kept the most. None: no budget (paper)
    relearn_budget: float | None = None
    trigger_floor: float = 0.25
    # Verify before unlearning a shortcut (docs/method.md, Finding 12): relearn first with no trigger unlearning, then
    # add the scan's perturbation toward each flagged class to the clean images of the other classes; when it still
    # sends more than this fraction of them to the class (beyond those the relearned model puts there without it),
    # the shortcut survived relearning: relearn again with it unlearned (then the budget applies). None: unlearn it
    # from the first try (the paper has no trigger unlearning at all)
    verify_repair: float | None = None
    # Shared optimiser settings
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    augment: bool = True
    hflip: bool = True
    crop_pad: int | None = None  # random-crop padding; None: image side // 8 (3 on 28x28), the reference uses 4
    amp: bool = False  # mixed precision on CUDA (the reference uses it); ignored on the CPU
    freeze_bn: bool = False  # keep BatchNorm statistics of the original model while relearning (default preset: on)
    distill: float = 0.0  # weight of distilling the original model's non-flagged logits (default preset: 1)
    distill_flagged: bool = False  # distil the flagged classes' logits too (the original's outputs on clean images)
    # Options measured in docs/method.md, off in both presets
    holdout: float = 0.0  # fraction of the clean set held out to select the relearning epoch
    backbone_lr_scale: float = 1.0  # relearning lr of every layer but the examined one, relative
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not 0.0 <= self.holdout < 1.0:
            raise UserError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.max_neurons < 0 or self.relearn_epochs < 0 or self.unlearn_epochs < 0:
            raise UserError("max_neurons, unlearn_epochs and relearn_epochs must be >= 0")
        if self.trigger_unlearn < 0 or self.trigger_scale <= 0 or (self.all_to_all_scale is not None and self.all_to_all_scale <= 0):
            raise UserError("trigger_unlearn must be >= 0 and trigger_scale > 0")
        if self.verify_repair is not None and not 0.0 <= self.verify_repair < 1.0:
            raise UserError(f"verify_repair must be in [0, 1) (a fraction of images), got {self.verify_repair}")
        if not 1 / 64 <= self.trigger_floor <= 1.0 or (self.relearn_budget is not None and self.relearn_budget < 0):
            raise UserError(f"trigger_floor must be in [1/64, 1] and relearn_budget >= 0, got {self.trigger_floor} and "
                            f"{self.relearn_budget}")
        if self.rank_by not in ("score", "index"):
            raise UserError(f"rank_by must be 'score' or 'index', got {self.rank_by!r}")
        if self.reinit not in ("he", "matched", "prototype"):
            raise UserError(f"reinit must be 'he', 'matched' or 'prototype', got {self.reinit!r}")
        if self.all_to_all_sources not in ("own", "any"):
            raise UserError(f"all_to_all_sources must be 'own' or 'any', got {self.all_to_all_sources!r}")
        if self.all_to_all_repair not in ("rows", "features"):
            raise UserError(f"all_to_all_repair must be 'rows' or 'features', got {self.all_to_all_repair!r}")
        if self.detect not in ("unlearning", "scan"):
            raise UserError(f"detect must be 'unlearning' or 'scan', got {self.detect!r}")


def paper_preset(dataset: str | None) -> dict:
    """The authors' reference code, per dataset: random crop with padding 4 everywhere, horizontal
    flip only on CIFAR-10, relearning without weight decay and with a second train-mode forward
    pass per batch, mixed precision on CUDA, the cap keeping the first flagged rows by class index;
    relearning lr 0.005 / alpha 0.7 on CIFAR-10 (and datasets they did not configure), lr 0.001 /
    alpha 0.001 on GTSRB, CIFAR-100 and Tiny-ImageNet. Unknown dataset: the flip is left as the data says."""
    out = {"crop_pad": 4, "relearn_weight_decay": 0.0, "relearn_extra_bn_pass": True, "amp": True, "rank_by": "index"}
    if dataset is not None:
        out["hflip"] = dataset == "cifar10"
    if dataset in ("gtsrb", "cifar100", "tiny-imagenet"):
        out.update(relearn_lr=0.001, alpha=0.001)
    return out


PRESETS = {
    "paper": paper_preset,
    # docs/detection.md; docs/method.md, Findings 4, 9 and 10
    "default": {"detect": "scan", "reinit": "matched", "cos_margin": -0.3, "trigger_unlearn": 1.0, "trigger_scale": 1.0,
                "freeze_bn": True, "distill": 1.0, "relearn_lr": 0.002, "relearn_guard": 0.1, "relearn_budget": 0.01, "verify_repair": 0.01, "probe_epochs": 10,
                "all_to_all_repair": "features", "all_to_all_scale": 0.75, "all_to_all_sources": "any"},
}


def make_config(preset: str = "default", dataset: str | None = None, **overrides) -> ULRLConfig:
    return make_defense_config("ulrl", preset, dataset=dataset, **overrides)


# --- the pieces of the method ------------------------------------------------------------------
def scan_config(cfg: ULRLConfig) -> ScanConfig:
    """The detection scan ULRL runs: its weight-change signal is ULRL's own unlearning."""
    return ScanConfig(alpha=cfg.scan_alpha, reference=cfg.scan_reference, layer=cfg.layer, unlearn_lr=cfg.unlearn_lr, unlearn_epochs=cfg.unlearn_epochs,
                      unlearn_milestones=cfg.unlearn_milestones, clean_threshold=cfg.clean_threshold,
                      grad_clip=cfg.grad_clip, mad_threshold=cfg.mad_threshold, momentum=cfg.momentum,
                      weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, augment=cfg.augment, hflip=cfg.hflip,
                      crop_pad=cfg.crop_pad, seed=cfg.seed, device=cfg.device)


@torch.no_grad()
def reinitialise(layer: nn.Linear, rows: list[int], generator: torch.Generator, how: str = "he",
                 prototypes: torch.Tensor | None = None) -> None:
    """Re-initialise the given rows. ``he`` (the paper): U(-std, std), std = sqrt(2/fan_in), bias 0.
    ``matched``: the same random direction scaled to the median norm of the other rows, bias their
    median. ``prototype``: the direction of ``prototypes`` (one mean clean feature per row) at that
    scale: the row starts as a nearest-class-mean classifier of clean data, with none of its old weights."""
    if not rows:
        return
    std = math.sqrt(2.0 / layer.weight.shape[1])
    new = (torch.rand(len(rows), layer.weight.shape[1], generator=generator) * 2 - 1) * std
    if how == "prototype" and prototypes is not None:
        new = prototypes.cpu().float()
    others = [r for r in range(layer.weight.shape[0]) if r not in rows]
    scaled = how in ("matched", "prototype") and others
    if scaled:
        new = new / new.norm(dim=1, keepdim=True).clamp_min(1e-12) * layer.weight[others].norm(dim=1).median().cpu()
    layer.weight[rows] = new.to(layer.weight)
    if layer.bias is not None:
        layer.bias[rows] = layer.bias[others].median() if scaled else 0.0


@torch.no_grad()
def layer_inputs(model: nn.Module, layer: nn.Linear, x: torch.Tensor, device: str = "cpu",
                 delta: torch.Tensor | None = None) -> torch.Tensor:
    """The inputs of ``layer`` (penultimate features) for images ``x`` (plus ``delta``), model in eval mode."""
    feats = []
    handle = layer.register_forward_hook(lambda _m, inp, _out: feats.append(inp[0].detach().flatten(1).cpu()))
    was = model.training
    model.eval()
    try:
        for i in range(0, len(x), 256):
            xb = to_float(x[i: i + 256]).to(device)
            model(xb if delta is None else (xb + delta.to(device)).clamp(0, 1))
    finally:
        handle.remove()
        model.train(was)
    return torch.cat(feats)


def class_prototypes(model: nn.Module, layer: nn.Linear, x: torch.Tensor, y: torch.Tensor, classes: list[int],
                     device: str = "cpu") -> torch.Tensor:
    """Mean input of ``layer`` (the penultimate features) over the clean images of each class, centred
    on the mean over all classes."""
    f = layer_inputs(model, layer, x, device)
    centre = torch.stack([f[y == c].mean(0) for c in y.unique()]).mean(0)
    return torch.stack([f[y == c].mean(0) - centre for c in classes])


def cosine_penalty(layer: nn.Linear, w_original: torch.Tensor, rows: list[int], alpha: float, margin: float = -1.0):
    """``alpha * sum_k max(cos(w_k, w_k_original), margin)`` over the flagged rows: minimising it
    pushes each relearned row away from its backdoored direction (down to ``margin``; the paper's
    penalty has no floor, ``margin = -1``)."""
    target = w_original[rows].to(layer.weight.device)

    def penalty(*_) -> torch.Tensor:
        cos = F.cosine_similarity(layer.weight[rows], target, dim=1)
        return alpha * cos.clamp(min=margin).sum()

    return penalty


def with_shortcut(x: torch.Tensor, pick: torch.Tensor, deltas: torch.Tensor, warps: list[torch.Tensor | None]) -> torch.Tensor:
    """Images ``x`` (float, in [0, 1]), image ``i`` carrying shortcut ``pick[i]``: warped along ``warps[pick[i]]``
    where the scan's warp search reached that class, then ``deltas[pick[i]]`` added, clipped to [0, 1]."""
    xp = x.clone()
    for k in pick.unique().tolist():
        if warps[k] is not None:
            sel = (pick == k).to(x.device)
            xp[sel] = warp(xp[sel], warps[k][None].to(x.device))[0]
    return (xp + deltas[pick].to(x.device)).clamp(0, 1)


def trigger_unlearning(model: nn.Module, deltas: torch.Tensor, targets: list[int], beta: float,
                       warps: list[torch.Tensor | None] | None = None):
    """``beta * CE(model(x + delta_k), y)``: clean images carrying the scan's perturbation toward a
    flagged class ``targets[k]`` keep their true labels, so relearning takes the shortcut away in
    the whole network, not only in the re-initialised rows. Where the scan's warp search reached
    the class (``warps[k]``, a displacement field), the images are also warped along it. Each image
    gets one of the flagged classes' perturbations at random; images of that very class are left out."""
    tgt = torch.tensor(targets)
    gen = torch.Generator().manual_seed(0)
    warps = warps or [None] * len(targets)

    def penalty(x: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pick = torch.randint(len(targets), (len(y),), generator=gen)
        keep = tgt[pick].to(y.device) != y
        if not keep.any():
            return out.sum() * 0
        return beta * F.cross_entropy(model(with_shortcut(x[keep], pick[keep.cpu()], deltas, warps)), y[keep])

    return penalty


def source_unlearning(model: nn.Module, deltas: torch.Tensor, beta: float, sources: str = "own"):
    """``beta * CE(model(x + deltas[s]), y)``: for an all-to-all backdoor, each clean image carries the perturbation
    the scan found from a class ``s`` to that class's target (``deltas``: one per source class) and keeps its label;
    ``s`` is the image's own class (``sources="own"``) or a random class (``"any"``)."""
    gen = torch.Generator().manual_seed(0)

    def penalty(x: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        src = y if sources == "own" else torch.randint(len(deltas), y.shape, generator=gen).to(y.device)
        return beta * F.cross_entropy(model((x + deltas.to(x.device)[src]).clamp(0, 1)), y)

    return penalty


def with_distillation(teacher: nn.Module, flagged: list[int], beta: float):
    """``beta * KL(teacher || student)`` over the non-flagged classes; the teacher is the original
    model, a good classifier on clean images for every class but the flagged."""
    teacher = teacher.eval().requires_grad_(False)

    def penalty(x: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = teacher(x)
        keep = torch.ones(out.shape[1], dtype=torch.bool, device=out.device)
        keep[flagged] = False
        return beta * F.kl_div(F.log_softmax(out[:, keep], 1), F.log_softmax(t[:, keep], 1), log_target=True,
                               reduction="batchmean")

    return penalty


def summed(penalties: list):
    """One penalty that adds several (None when there are none)."""
    if not penalties:
        return None
    return lambda x, out, y: sum(p(x, out, y) for p in penalties)


def find_by_unlearning(model: nn.Module, layer: nn.Linear, x: torch.Tensor, y: torch.Tensor, cfg: ULRLConfig,
                       train: TrainConfig, report: DefenseReport, monitor: Monitor | None, progress: bool) -> list[int]:
    """The paper's step 1 (and, with ``second_look``, a second unlearning with the first collapse's
    classes masked). Leaves ``model`` unlearned; the caller restores it."""
    original = copy.deepcopy(model.state_dict())
    scores, report.unlearn_history = unlearn(model, layer, x, y, TrainConfig(**{**train.to_dict(), "freeze_bn": cfg.unlearn_freeze_bn}),
                                             cfg.clean_threshold, monitor=monitor, progress=progress)
    report.unlearn_epochs = len(report.unlearn_history)
    if report.unlearn_history and report.unlearn_history[-1]["train_acc"] > cfg.clean_threshold:
        report.notes.append(f"unlearning did not reach the clean threshold {cfg.clean_threshold} in {cfg.unlearn_epochs} epochs")
    flagged, z = mad_outliers(scores, cfg.mad_threshold, cfg.max_neurons, cfg.rank_by)
    if cfg.second_look and flagged and len(flagged) < cfg.max_neurons:
        model.load_state_dict(original)
        second = TrainConfig(**{**train.to_dict(), "freeze_bn": cfg.second_look_freeze_bn})
        scores2, _ = unlearn(model, layer, x, y, second, cfg.clean_threshold, masked=flagged, progress=progress)
        more, z2 = mad_outliers(scores2, cfg.mad_threshold, cfg.max_neurons - len(flagged), cfg.rank_by)
        report.notes.append(f"second look with classes {flagged} masked flagged {more}")
        report.second_look_z_scores = z2.tolist()
        flagged = flagged + more
    report.scores, report.z_scores = scores.tolist(), z.tolist()
    if not flagged:
        report.notes.append("no suspicious neuron found: relearning is plain fine-tuning")
    return flagged


def find_by_scan(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: ULRLConfig, report: DefenseReport,
                 progress: bool) -> tuple[list[int], list[int], ScanResult]:
    """The default step 1: the rows of the classes the detection scan suspects, up to the cap, and the classes
    whose shortcut (the scan's perturbation) relearning unlearns. For an all-to-all verdict with
    ``all_to_all_repair="features"``: no row, every class."""
    result = scan(model, x, y, scan_config(cfg), progress=progress)
    report.extra["scan"] = result.to_dict()
    report.notes += [f"scan: {n}" for n in result.notes]
    wc = result.signals.get("weight-change")
    if wc is not None:
        report.scores, report.z_scores = wc.statistic, wc.z
        report.unlearn_epochs = wc.extra.get("epochs", 0)
    if result.kind == "all-to-all" and cfg.all_to_all_repair == "features":
        report.notes.append("all-to-all backdoor: every class is a target, so no row is re-initialised; relearning "
                            "unlearns each class's perturbation to its target and distils the original on clean images")
        return [], list(result.suspected), result
    flagged = result.suspected[: cfg.max_neurons]
    if len(result.suspected) > cfg.max_neurons:
        report.notes.append(f"the scan suspects {result.suspected}; the cap (max_neurons={cfg.max_neurons}) keeps {flagged}")
    if not flagged and cfg.force_repair:
        flagged = [result.most_suspicious]
        report.notes.append(f"no evidence of a backdoor (p = {result.p_value:.3g}); force_repair relearns the most "
                            f"suspicious class {flagged}")
    return flagged, flagged, result


@dataclass
class Repair:
    """What every relearning try of one repair shares: the examined layer, the clean set (and its held-out slice),
    the flagged rows and their original weights, the classes whose shortcut is unlearned (``targets``), the scan that
    chose them (``None`` with ``detect="unlearning"``), the distillation teacher and the seed of the re-initialised
    rows (every try starts from the same rows, so that tries differ only in what they change)."""

    layer: nn.Linear
    layer_name: str
    x: torch.Tensor
    y: torch.Tensor
    x_held: torch.Tensor
    y_held: torch.Tensor
    flagged: list[int]
    targets: list[int]
    w_original: torch.Tensor
    result: ScanResult | None
    teacher: nn.Module | None
    seed: int


def shortcut_kind(r: Repair, cfg: ULRLConfig) -> str | None:
    """Which of the scan's shortcuts relearning unlearns: "sources" (each class's perturbation to its shifted class,
    an all-to-all verdict), "targets" (the flagged classes' universal perturbations), or None."""
    res = r.result
    if cfg.trigger_unlearn <= 0 or not r.targets or res is None:
        return None
    if res.kind == "all-to-all" and res.pair_perturbations is not None:
        return "sources"
    return "targets" if res.perturbations is not None else None


def relearning_penalties(model: nn.Module, r: Repair, cfg: ULRLConfig) -> list:
    """The terms added to the clean loss while relearning: the cosine penalty on the flagged rows, distillation of the
    original (``cfg.distill``), and unlearning of the scan's shortcuts to the targets (``cfg.trigger_unlearn``): each
    class's perturbation to its shifted class for an all-to-all verdict (on images of that class or of any, per
    ``cfg.all_to_all_sources``), else the targets' universal perturbations (and the warps that reached them)."""
    penalties = [cosine_penalty(r.layer, r.w_original, r.flagged, cfg.alpha, cfg.cos_margin)] if r.flagged else []
    if r.teacher is not None:
        penalties.append(with_distillation(r.teacher, [] if cfg.distill_flagged else r.flagged, cfg.distill))
    scan_result, kind = r.result, shortcut_kind(r, cfg)
    if kind == "sources":  # all-to-all: source -> source + shift
        k, shift = scan_result.num_classes, scan_result.all_to_all["shift"]
        shortcuts = torch.stack([scan_result.pair_perturbations[(c + shift) % k, c] for c in range(k)])  # class c -> its target
        scale = cfg.trigger_scale if cfg.all_to_all_scale is None else cfg.all_to_all_scale
        penalties.append(source_unlearning(model, (shortcuts * scale).to(cfg.device), cfg.trigger_unlearn,
                                           cfg.all_to_all_sources))  # on the device once, not per batch
    elif kind == "targets":
        deltas, warps = target_shortcuts(scan_result, r.targets, cfg.trigger_scale, cfg.device)
        penalties.append(trigger_unlearning(model, deltas, r.targets, cfg.trigger_unlearn, warps))
    return penalties


def target_shortcuts(result: ScanResult, targets: list[int], scale: float, device: str) -> tuple[torch.Tensor, list]:
    """The scan's shortcuts toward the ``targets`` classes, times ``scale``: the universal perturbations (on the device
    once, not per batch) and, where the warp search reached a class, its warp (else None)."""
    deltas = (result.perturbations[targets] * scale).to(device)
    reached = result.signals["warp"].statistic if result.warps is not None else None
    warps = [result.warps[c] * scale if reached is not None and math.isfinite(reached[c]) else None for c in targets]
    return deltas, warps


@torch.no_grad()
def shortcut_survival(model: nn.Module, r: Repair, cfg: ULRLConfig) -> list[float]:
    """Per class whose shortcut relearning would unlearn: how many more of the clean images of the other classes go
    to that class on ``model`` when they carry the scan's universal perturbation toward it (a fraction; the images
    that go there without it are not counted). About 0.9 on the original: the scan's search stops where 90% of its
    images flip. The perturbation alone, not the warp: a warp of a few pixels reaches a class without a backdoor
    (docs/method.md, Finding 12)."""
    was = model.training
    model.eval()
    rates = []
    for c in r.targets:
        xs, delta, hits = r.x[r.y != c], r.result.perturbations[c].to(cfg.device) * cfg.trigger_scale, 0
        for i in range(0, len(xs), 256):
            xb = to_float(xs[i: i + 256]).to(cfg.device)
            hits += int((model((xb + delta).clamp(0, 1)).argmax(1) == c).sum()) - int((model(xb).argmax(1) == c).sum())
        rates.append(max(0, hits) / max(1, len(xs)))
    model.train(was)
    return rates


def relearn(model: nn.Module, r: Repair, cfg: ULRLConfig, lr: float, freeze_bn: bool, report: DefenseReport,
            monitor: Monitor | None, progress: bool) -> None:
    """Steps 2 and 3 on ``model`` (the original weights): re-initialise the flagged rows, then fine-tune
    on the clean set with the cosine penalty (and, in the default preset, trigger unlearning toward the
    ``targets`` classes and distillation; the examined layer alone first, for ``cfg.probe_epochs``) at ``lr``,
    with the original BatchNorm statistics if ``freeze_bn``. Keeps the best
    held-out epoch when ``cfg.holdout`` sets a slice aside; stops at the first epoch whose loss is not finite."""
    protos = class_prototypes(model, r.layer, r.x, r.y, r.flagged, cfg.device) if cfg.reinit == "prototype" else None
    reinitialise(r.layer, r.flagged, torch.Generator().manual_seed(r.seed), cfg.reinit, protos)
    penalties = relearning_penalties(model, r, cfg)
    best = {"acc": -1.0, "epoch": 0, "state": None}

    def track(epoch: int, record: dict) -> bool:
        if len(r.y_held):  # model selection on the held-out slice of the clean set
            record["heldout_acc"] = accuracy(model, r.x_held, r.y_held, cfg.device)
            if record["heldout_acc"] >= best["acc"]:  # ties go to the later (longer relearned) epoch
                best.update(acc=record["heldout_acc"], epoch=epoch, state=copy.deepcopy(model.state_dict()))
        if monitor is not None:
            record.update(monitor(model))
        return not math.isfinite(record["loss"])  # diverged: no later epoch comes back from NaN weights

    prefix = r.layer_name + "."
    wd = cfg.weight_decay if cfg.relearn_weight_decay is None else cfg.relearn_weight_decay
    train = TrainConfig(epochs=cfg.relearn_epochs, lr=lr, schedule="cosine", freeze_bn=freeze_bn, weight_decay=wd,
                        extra_bn_pass=cfg.relearn_extra_bn_pass, **shared_training(cfg))
    loss = summed(penalties)
    if cfg.probe_epochs > 0 and r.flagged:  # the linear probe: the backbone (weights and statistics) fixed, no gradient
        backbone = [p for name, p in model.named_parameters() if not name.startswith(prefix) and p.requires_grad]
        probe = replace(train, epochs=cfg.probe_epochs, lr=cfg.probe_lr, freeze_bn=True, extra_bn_pass=False)
        try:
            for p in backbone:
                p.requires_grad_(False)
            report.extra["probe_history"] = fit(model, r.x, r.y, probe, penalty=loss, desc="ULRL probe", progress=progress).epochs
        finally:
            for p in backbone:
                p.requires_grad_(True)
    hist = fit(model, r.x, r.y, train, penalty=loss, on_epoch=track, desc="ULRL relearn", progress=progress,
               lr_scale=lambda name: 1.0 if name.startswith(prefix) else cfg.backbone_lr_scale)
    report.relearn_history = hist.epochs
    if best["state"] is not None:
        model.load_state_dict(best["state"])
        report.selected_epoch = best["epoch"]


def shared_training(cfg: ULRLConfig) -> dict:
    """The :class:`TrainConfig` settings the unlearning and the relearning share."""
    return dict(momentum=cfg.momentum, batch_size=cfg.batch_size, augment=cfg.augment, hflip=cfg.hflip,
                crop_pad=cfg.crop_pad, amp=cfg.amp, seed=cfg.seed, device=cfg.device)


def relearning_tries(cfg: ULRLConfig) -> list[tuple[float, bool]]:
    """(lr, freeze_bn) of each relearning try: the configured one; with the guard, then batch statistics (stable on
    deep networks, where frozen statistics can diverge: docs/method.md, Finding 6), then a quarter of the lr."""
    tries = [(cfg.relearn_lr, cfg.freeze_bn)]
    if cfg.relearn_guard is not None:
        tries += ([(cfg.relearn_lr, False)] if cfg.freeze_bn else []) + [(cfg.relearn_lr / 4, False)]
    return tries


def shrunk(cfg: ULRLConfig, shrink: float) -> ULRLConfig:
    """``cfg`` with the unlearned shortcuts' sizes (``trigger_scale``, ``all_to_all_scale``) times ``shrink``; 0: no
    trigger unlearning."""
    if shrink == 1.0:
        return cfg
    if shrink == 0.0:
        return replace(cfg, trigger_unlearn=0.0)
    a2a = None if cfg.all_to_all_scale is None else cfg.all_to_all_scale * shrink
    return replace(cfg, trigger_scale=cfg.trigger_scale * shrink, all_to_all_scale=a2a)


@dataclass
class Try:
    """One relearning from the original weights: its lr, BatchNorm mode and share of the scan's shortcut unlearned
    (``shrink``), the accuracy it kept on the clean images of the classes not flagged, its weights, and what the
    report shows of it (``record``: its entry in ``relearn_attempts``)."""

    lr: float
    freeze_bn: bool
    shrink: float
    clean_acc: float
    state: dict
    relearn_history: list
    selected_epoch: int | None
    probe_history: list | None
    record: dict


def over_budget(cfg: ULRLConfig, r: Repair, start_acc: float, t: Try) -> bool:
    """Did a relearning that unlearned the scan's shortcuts lose more than ``cfg.relearn_budget`` of the clean-set
    accuracy (classes not flagged)?"""
    return t.shrink > 0 and shortcut_kind(r, cfg) is not None and cfg.relearn_budget is not None \
        and t.clean_acc < start_acc - cfg.relearn_budget


def within_budget(cfg: ULRLConfig, r: Repair, attempt, start_acc: float, t: Try, notes: list[str]) -> Try:
    """The cost budget: relearn with the unlearned shortcuts halved (``attempt(shrink)`` relearns and returns the
    :class:`Try`) until a try keeps within ``cfg.relearn_budget`` or the next halving would go below
    ``cfg.trigger_floor``; the first try within the budget, else the one with the highest accuracy."""
    first = best = t
    while over_budget(cfg, r, start_acc, t) and t.shrink / 2 >= cfg.trigger_floor * (1 - 1e-9):
        notes.append(f"relearning cost {100 * (start_acc - t.clean_acc):.1f} points of the clean images' accuracy "
                     f"(classes not flagged; budget {100 * cfg.relearn_budget:g}): the unlearned shortcut overlaps "
                     f"the clean task, relearning again with {t.shrink / 2:g} of it")
        t = attempt(t.shrink / 2)
        best = t if t.clean_acc > best.clean_acc else best
    if t is not first and over_budget(cfg, r, start_acc, t):
        notes.append(f"no try kept within the budget; the repair with {best.shrink:g} of the shortcut kept the most "
                     f"({100 * best.clean_acc:.1f}% on the clean images of the classes not flagged, the original "
                     f"{100 * start_acc:.1f}%)")
        return best
    return t


def guarded(cfg: ULRLConfig, attempt, start_acc: float, shrink: float, notes: list[str]) -> Try | None:
    """The guard: relearn (``attempt(lr, freeze_bn, shrink)``) with the configured settings, then with the stable
    settings of :func:`relearning_tries` while a try loses more than ``cfg.relearn_guard`` of the clean-set accuracy
    (classes not flagged); the first try that does not, else None."""
    tries = relearning_tries(cfg)
    for n, (lr, freeze_bn) in enumerate(tries, 1):
        t = attempt(lr, freeze_bn, shrink)
        if cfg.relearn_guard is None or t.clean_acc >= start_acc - cfg.relearn_guard:
            return t
        again = f"; relearning again at lr {tries[n][0]:g} with {_stats(tries[n][1])}" if n < len(tries) else ""
        notes.append(f"relearning at lr {lr:g} with {_stats(freeze_bn)} diverged: {100 * t.clean_acc:.1f}% on the clean "
                     f"images of the classes not flagged, the original {100 * start_acc:.1f}%{again}")
    return None


def verified(cfg: ULRLConfig, r: Repair, attempt, t: Try, notes: list[str]) -> Try:
    """The least repair first: ``t`` relearned without trigger unlearning. If the scan's shortcut toward a flagged
    class still sends more than ``cfg.verify_repair`` more of the other classes' clean images there, relearn again
    (``attempt(shrink)``) with the whole shortcut unlearned; else keep ``t``."""
    survived = {c: v for c, v in zip(r.targets, t.record["shortcut_survival"], strict=True) if v > cfg.verify_repair}
    if not survived:
        notes.append("relearning alone took the scan's shortcuts out (they send at most "
                     f"{100 * max(t.record['shortcut_survival']):.1f}% more of the other classes' clean "
                     f"images to a flagged class, verify_repair={cfg.verify_repair:g}): no trigger unlearning")
        return t
    notes.append("after relearning without trigger unlearning the scan's shortcut still sends "
                 + ", ".join(f"{100 * v:.1f}% more of the other classes' clean images to class {c}" for c, v in survived.items())
                 + f" (verify_repair={cfg.verify_repair:g}): relearning again with it unlearned")
    return attempt(1.0)


def _stats(frozen: bool) -> str:
    return "frozen BatchNorm statistics" if frozen else "batch statistics"


# --- the method --------------------------------------------------------------------------------
@register_defense("ulrl", ULRLConfig, PRESETS)
def purify(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: ULRLConfig | None = None,
    monitor: Monitor | None = None,
    progress: bool = True,
) -> tuple[nn.Module, DefenseReport]:
    """Repair ``model`` with ULRL using clean images ``x`` (uint8 or float in [0, 1]) and labels ``y``.

    Returns a new model (the input is not modified) and a :class:`DefenseReport`.
    """
    cfg = config or ULRLConfig()
    if len(y) == 0:
        raise UserError("the clean set is empty; give at least one clean image per class")
    model = copy.deepcopy(model).to(cfg.device)
    layer_name, layer = find_classifier(model, cfg.layer)
    report = DefenseReport(defense="ulrl", config=asdict(cfg), layer=layer_name)
    train_pos, held_pos = split_holdout(y, cfg.holdout, cfg.seed)
    x_train, y_train, x_held, y_held = x[train_pos], y[train_pos], x[held_pos], y[held_pos]
    original_state = copy.deepcopy(model.state_dict())
    w_original = layer.weight.detach().clone()

    # Phase 1: find the neurons that carry the backdoor.
    t0 = time.perf_counter()
    result = None
    if cfg.detect == "scan":
        flagged, targets, result = find_by_scan(model, x_train, y_train, cfg, report, progress)
    else:
        unlearning = TrainConfig(epochs=cfg.unlearn_epochs, lr=cfg.unlearn_lr, schedule="step",
                                 milestones=cfg.unlearn_milestones, grad_clip=cfg.grad_clip,
                                 weight_decay=cfg.weight_decay, **shared_training(cfg))
        flagged = find_by_unlearning(model, layer, x_train, y_train, cfg, unlearning, report, monitor, progress)
        targets = flagged
    report.flagged = flagged
    if targets != flagged:
        report.extra["unlearned_targets"] = targets
    report.seconds["unlearn"] = time.perf_counter() - t0
    model.load_state_dict(original_state)
    if result is not None and not targets:
        report.notes.append(f"no evidence of a backdoor (scan p = {result.p_value:.3g} > alpha = {cfg.scan_alpha}): "
                            "the model's weights are left unchanged (force_repair=true repairs anyway)")
        report.seconds["relearn"] = 0.0
        report.seconds["total"] = report.seconds["unlearn"]
        return model.eval(), report

    # Phase 2: restore the original weights, re-initialise the flagged neurons, relearn with the
    # cosine penalty pushing them away from their original (backdoored) direction.
    t0 = time.perf_counter()
    teacher = copy.deepcopy(model) if cfg.distill > 0 else None
    plan = Repair(layer, layer_name, x_train, y_train, x_held, y_held, flagged, targets, w_original, result, teacher, cfg.seed)
    # The guard (default preset) judges each try on the clean set alone: the accuracy on the clean images of the
    # classes not flagged (a re-initialised row may legitimately lag; a diverged network loses every class).
    kept = ~torch.isin(y_train, torch.tensor(flagged, dtype=y_train.dtype))
    kept = kept if kept.any() else torch.ones_like(kept)
    start_acc = accuracy(model, x_train[kept], y_train[kept], cfg.device)
    report.extra.update(clean_set_acc_before=start_acc, relearn_attempts=[])
    verify = cfg.verify_repair is not None and shortcut_kind(plan, cfg) == "targets"
    if verify:  # the scan's shortcuts on the original: about 0.9 by construction
        report.extra["shortcut_survival_before"] = shortcut_survival(model, plan, cfg)

    def attempt(lr: float, freeze_bn: bool, shrink: float) -> Try:
        """Relearn from the original weights, unlearning ``shrink`` of the scan's shortcuts."""
        model.load_state_dict(original_state)
        relearn(model, plan, shrunk(cfg, shrink), lr, freeze_bn, report, monitor, progress)
        acc = accuracy(model, x_train[kept], y_train[kept], cfg.device)
        record = {"lr": lr, "freeze_bn": freeze_bn, "trigger_shrink": shrink, "clean_set_acc_after": acc}
        if verify:
            record["shortcut_survival"] = shortcut_survival(model, plan, cfg)
        report.extra["relearn_attempts"].append(record)
        return Try(lr, freeze_bn, shrink, acc, copy.deepcopy(model.state_dict()), report.relearn_history,
                   report.selected_epoch, report.extra.get("probe_history"), record)

    # The guard, then the check, then the budget: each judges a try on the clean set alone.
    t = guarded(cfg, attempt, start_acc, 0.0 if verify else 1.0, report.notes)
    if t is None:  # every try diverged: a destroyed model is worse than none, hand the original back
        model.load_state_dict(original_state)
        report.extra["repair_failed"] = True
        report.notes.append("the repair failed (relearning diverged every time): the model's weights are returned "
                            "unchanged; try a lower relearn_lr")
    else:
        retry = partial(attempt, t.lr, t.freeze_bn)  # every later try relearns with the settings the guard kept
        if verify:
            t = verified(cfg, plan, retry, t, report.notes)
        if over_budget(cfg, plan, start_acc, t):
            t = within_budget(cfg, plan, retry, start_acc, t, report.notes)
        model.load_state_dict(t.state)
        report.relearn_history, report.selected_epoch = t.relearn_history, t.selected_epoch
        if t.probe_history is not None:
            report.extra["probe_history"] = t.probe_history
        t.record["kept"] = True
        if shortcut_kind(plan, cfg) is not None:  # the share of the scan's shortcut the kept try unlearned
            report.extra["trigger_shrink"] = t.shrink
    report.seconds["relearn"] = time.perf_counter() - t0
    report.seconds["total"] = report.seconds["unlearn"] + report.seconds["relearn"]
    return model.eval(), report


__all__ = ["PRESETS", "Repair", "Try", "ULRLConfig", "cosine_penalty", "find_by_scan", "find_by_unlearning", "make_config", "purify",
           "reinitialise", "relearn", "relearning_penalties", "relearning_tries", "scan_config", "shortcut_survival", "source_unlearning",
           "trigger_unlearning", "with_shortcut"]
