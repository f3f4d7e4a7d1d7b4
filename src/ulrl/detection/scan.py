"""Run the detection signals on a model and a clean set, combine them, decide.

Each signal gives one statistic per class (``universal``: the radius of the smallest universal
perturbation that sends the other classes' clean images to the class; ``margin``: the largest
margin the class reaches; ``weight-change``: how far the class's classifier row moves when the
clean accuracy is unlearned). :mod:`.stats` turns each into per-class p-values under the null
that, on a clean model, no class stands out from the others; the signals are combined per class
(Fisher), and the all-to-one p-value is that of the most suspicious class, corrected for having
looked at all of them. A rank test on the universal search's source x target radii looks for
all-to-all backdoors (``y -> y + k mod K``). The model's p-value is a weighted Bonferroni of the
two; verdict ``backdoored`` when it is <= ``alpha`` (the nominal false-positive rate), else
``no evidence``. docs/detection.md has the measurements behind every choice.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..models import find_classifier
from ..train import TrainConfig
from . import stats
from .margin import MarginConfig, max_margins
from .universal import UniversalConfig, clean_gap, universal_radii
from .weight_change import two_looks

SCHEMA_VERSION = 1
SIGNALS = ("universal", "margin", "weight-change")


@dataclass
class ScanConfig:
    signals: tuple[str, ...] = SIGNALS  # which signals to run
    verdict_signals: tuple[str, ...] | None = None  # the ones combined into the verdict (None: every signal run)
    alpha: float = 0.05  # verdict threshold on the model's p-value: the nominal false-positive rate
    all_to_all_share: float = 0.1  # share of alpha spent on the all-to-all test (weighted Bonferroni; 0: off)
    # tails of each signal's null (Student t degrees of freedom; inf: normal), set on clean models (docs/detection.md)
    null_df_universal: float = math.inf
    null_df_margin: float = 3.0
    null_df_weight_change: float = 3.0
    # universal perturbations
    uap_per_class: int = 5  # clean images per source class
    uap_min_rms: float = 0.006
    uap_max_rms: float = 0.5
    uap_growth: float = 1.15
    uap_step: float = 0.5
    uap_level: float = 0.9  # the statistic: radius at which this fraction of the other classes' images flip
    uap_adjust: bool = True  # score = residual of -log(radius) on the class's clean logit gap (8+ classes)
    # maximum margins
    margin_starts: int = 4
    margin_steps: int = 100
    margin_lr: float = 0.05
    # weight change under unlearning (ULRL's signal, both looks)
    layer: str | None = None
    unlearn_lr: float = 0.01
    unlearn_epochs: int = 20
    unlearn_milestones: tuple[int, ...] = (10, 20)
    clean_threshold: float = 0.2
    grad_clip: float = 20.0
    mad_threshold: float = 3.5
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    augment: bool = True
    hflip: bool = True
    crop_pad: int | None = None
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.signals) - set(SIGNALS))
        if unknown:
            raise UserError(f"unknown detection signal(s) {', '.join(unknown)}; known: {', '.join(SIGNALS)}")
        if self.verdict_signals is not None and (not set(self.verdict_signals) <= set(self.signals)
                                                 or not self.verdict_signals):
            raise UserError("verdict_signals must be a non-empty subset of signals")
        if not 0.0 < self.alpha < 1.0:
            raise UserError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0.0 <= self.all_to_all_share < 1.0:
            raise UserError(f"all_to_all_share must be in [0, 1), got {self.all_to_all_share}")


@dataclass
class Evidence:
    """One signal's findings: the raw per-class statistic, the oriented log score, z and p."""

    statistic: list[float]
    score: list[float]
    z: list[float]
    p: list[float]
    p_model: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScanResult:
    num_classes: int
    clean_samples: int
    signals: dict[str, Evidence]
    combined: list[float]  # per class: -log10 of the combined p-value (higher: more suspicious)
    p_class: list[float]  # per class: combined p-value
    p_all_to_one: float  # the most suspicious class, corrected for having looked at all of them
    all_to_all: dict[str, Any]  # the test for y -> (y + k) mod K backdoors (shift, rank sums, p), from the universal search
    p_value: float  # the model's: chance that a clean model shows a class (or a shift) this extreme
    verdict: str  # "backdoored" | "no evidence"
    kind: str  # "all-to-one", "all-to-all" or "none"
    suspected: list[int]  # suspected target classes, most suspicious first (empty: none)
    alpha: float
    seconds: dict[str, float]
    config: dict[str, Any]
    schema_version: int = SCHEMA_VERSION
    notes: list[str] = field(default_factory=list)
    perturbations: torch.Tensor | None = field(default=None, repr=False)  # per class, from the universal search

    @property
    def backdoored(self) -> bool:
        return self.verdict == "backdoored"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: non-finite numbers (a class never reached) become ``None``."""
        out = asdict(self)
        out.pop("perturbations")
        return _finite(out)


def _finite(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_finite(v) for v in o]
    return o


def _universal(model, x, y, k, cfg: ScanConfig, progress: bool) -> tuple[list[float], list[float], dict]:
    u = universal_radii(model, x, y, k, UniversalConfig(cfg.uap_per_class, cfg.uap_min_rms, cfg.uap_max_rms,
                                                        cfg.uap_growth, cfg.uap_step, flip=cfg.uap_level,
                                                        stop=cfg.uap_level),
                        seed=cfg.seed, device=cfg.device, progress=progress)
    score = [-math.log(r) if math.isfinite(r) else -math.inf for r in u["radius"]]
    extra = {"pair_radius": u["pair_radius"], "images": u["images"], "steps": u["steps"], "perturbations": u["deltas"]}
    if cfg.uap_adjust and k >= 8:  # what the clean data's closeness to each class explains is not evidence
        # (a robust line needs points to spare: with fewer than 8 classes it would pass through most of them)
        gap = clean_gap(model, x, y, k, cfg.device)
        extra.update(raw_score=score, clean_gap=gap)
        score, extra["adjust_slope"], extra["adjust_intercept"] = stats.theil_sen_residual([-g for g in gap], score)
    return u["radius"], score, extra


def _margin(model, x, y, k, cfg: ScanConfig, progress: bool) -> tuple[list[float], list[float], dict]:
    m = max_margins(model, k, tuple(x.shape[1:]), MarginConfig(cfg.margin_starts, cfg.margin_steps, cfg.margin_lr),
                    seed=cfg.seed, device=cfg.device, progress=progress)
    return m, [math.log(max(v, 1e-6)) for v in m], {}


def _weight_change(model, x, y, k, cfg: ScanConfig, progress: bool) -> tuple[list[float], list[float], dict]:
    name, _ = find_classifier(model, cfg.layer)
    train = TrainConfig(epochs=cfg.unlearn_epochs, lr=cfg.unlearn_lr, schedule="step",
                        milestones=cfg.unlearn_milestones, grad_clip=cfg.grad_clip, momentum=cfg.momentum,
                        weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, augment=cfg.augment,
                        hflip=cfg.hflip, crop_pad=cfg.crop_pad, seed=cfg.seed, device=cfg.device)
    looks = two_looks(model, name, x, y, train, cfg.clean_threshold, cfg.mad_threshold, progress=progress)
    first, second = looks["scores"], looks["second_scores"] or looks["scores"]
    # each class's score: its change relative to the median change, the larger of the two looks
    med1, med2 = sorted(first)[k // 2], sorted(second)[k // 2]
    score = [math.log(max(a / med1, b / med2, 1e-6)) for a, b in zip(first, second, strict=True)]
    return first, score, {"layer": name, **looks}


_RUN = {"universal": _universal, "margin": _margin, "weight-change": _weight_change}


def _df(cfg: ScanConfig, signal: str) -> float:
    return getattr(cfg, "null_df_" + signal.replace("-", "_"))


def _frozen(model: nn.Module, device: str) -> nn.Module:
    """A copy in eval mode without parameter gradients: the searches differentiate inputs only."""
    return copy.deepcopy(model).to(device).eval().requires_grad_(False)


def scan(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: ScanConfig | None = None,
         progress: bool = True) -> ScanResult:
    """Look for a backdoor in ``model`` with clean images ``x`` (uint8, or float in [0, 1]) and
    labels ``y``; returns per-class evidence of each signal, the combination and a verdict.
    ``model`` is not modified."""
    cfg = config or ScanConfig()
    if len(y) == 0:
        raise UserError("the clean set is empty; give at least one clean image per class")
    k = find_classifier(model, cfg.layer)[1].out_features
    present = torch.bincount(y, minlength=k)
    missing = (present == 0).nonzero().flatten().tolist()
    if k < 3:
        raise UserError(f"scanning needs at least 3 classes to compare, the model has {k}")
    frozen = _frozen(model, cfg.device)
    evidence: dict[str, Evidence] = {}
    seconds: dict[str, float] = {}
    perturbations = None
    for name in cfg.signals:
        t0 = time.perf_counter()
        target = model if name == "weight-change" else frozen  # weight change trains a copy of its own
        statistic, score, extra = _RUN[name](target, x, y, k, cfg, progress)
        perturbations = extra.pop("perturbations", perturbations)
        test = stats.outlier_test(score, _df(cfg, name))
        seconds[name] = time.perf_counter() - t0
        evidence[name] = Evidence(statistic, score, test["z"], test["p"], test["p_model"], seconds[name], extra)
    used = list(cfg.verdict_signals or cfg.signals)
    comb = stats.combine(torch.tensor([evidence[s].p for s in used]), tuple(_df(cfg, s) for s in used)) \
        if len(used) > 1 else {"p": evidence[used[0]].p, "p_model": evidence[used[0]].p_model}
    p_class, p_one = comb["p"], comb["p_model"]
    order = sorted(range(k), key=lambda c: p_class[c])
    a2a: dict[str, Any] = {}
    p_value, share = p_one, cfg.all_to_all_share
    if "universal" in evidence and share > 0:
        pair = [[math.inf if v is None else v for v in row] for row in evidence["universal"].extra["pair_radius"]]
        a2a = stats.cyclic_all_to_all(pair, cfg.seed)
        p_value = min(1.0, p_one / (1 - share), a2a["p"] / share)  # weighted Bonferroni over the two kinds
    suspected: list[int] = []
    kind = "none"
    if p_value <= cfg.alpha:
        if a2a and a2a["p"] / share < p_one / (1 - share):  # every class is a target: (s + shift) mod K
            kind, suspected = "all-to-all", [(s + a2a["shift"]) % k for s in range(k)]
        else:
            kind = "all-to-one"
            suspected = [order[0]] + [c for c in order[1:] if p_class[c] * k <= cfg.alpha]  # Bonferroni for the rest
    seconds["total"] = sum(seconds.values())
    notes = [f"the clean set has no image of class(es) {missing}: they are only reached, never sources"] if missing else []
    return ScanResult(
        num_classes=k, clean_samples=int(len(y)), signals=evidence,
        combined=[-math.log10(max(p, 1e-300)) for p in p_class], p_class=p_class, p_all_to_one=p_one,
        all_to_all=a2a, p_value=p_value, verdict="backdoored" if suspected else "no evidence", kind=kind,
        suspected=suspected, alpha=cfg.alpha, seconds=seconds, config=asdict(cfg), notes=notes,
        perturbations=perturbations,
    )
