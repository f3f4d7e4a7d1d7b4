"""Run the detection signals on a model and a clean set, combine them, decide.

Each signal gives one statistic per class (``universal``: the radius of the smallest universal
perturbation that sends the other classes' clean images to the class; ``margin``: the largest
margin the class reaches; ``weight-change``: how far the class's classifier row moves when the
clean accuracy is unlearned; ``pull``, read off the universal search: the mean margin toward the class that a
universal perturbation of a fixed, sub-natural radius reaches). :mod:`.stats` turns each into per-class p-values under the null
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
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..models import find_classifier
from ..train import TrainConfig
from . import reference, stats
from .margin import MarginConfig, max_margins
from .universal import UniversalConfig, clean_gap, margin_at, universal_radii
from .weight_change import two_looks

SCHEMA_VERSION = 1
SIGNALS = ("universal", "pull", "warp", "margin", "weight-change")


@dataclass
class ScanConfig:
    signals: tuple[str, ...] = SIGNALS  # which signals to run
    verdict_signals: tuple[str, ...] | None = None  # the ones combined per class (None: every signal run but warp)
    alpha: float = 0.05  # verdict threshold on the model's p-value: the nominal false-positive rate
    all_to_all_share: float = 0.1  # share of alpha spent on the all-to-all test (weighted Bonferroni; 0: off)
    # the all-to-all test's source x target radii: "pairwise" (one perturbation per target and source class, a search
    # of its own) or "universal" (the universal search's, one perturbation per target: misses a patch that sends
    # each class to its own target, docs/detection.md)
    a2a_search: str = "pairwise"
    warp_share: float = 0.1  # share of alpha spent on the warp signal's own test (0: off)
    # a profile of clean reference models: a file written by `ulrl profile`, "builtin:NAME", "auto" (the shipped
    # profile whose reference models were trained as this model was, read from its checkpoint's description: `ulrl
    # scan`, `ulrl purify` and `ulrl bench` resolve it; a bare nn.Module has none) or "none"; and the share of alpha its
    # test gets when one applies (taken from the all-to-one test's; :mod:`.reference`)
    reference: str | None = "auto"
    reference_share: float = 0.1
    z_scale: str = "trimmed"  # each z's yardstick: "trimmed" (sd of the other classes without their two largest and
    # their smallest) or "mad"
    # tails of each signal's null (Student t degrees of freedom; inf: normal), set on clean models (docs/detection.md)
    null_df_universal: float = math.inf
    null_df_pull: float = 5.0  # Fisher's sum treats it as independent of the universal signal, whose search it reads
    null_df_warp: float = math.inf  # its own test; largest z over the 33 clean runs: 6.4 (p 0.028 before its share)
    null_df_margin: float = 3.0
    null_df_weight_change: float = 2.0
    # universal perturbations
    uap_per_class: int = 5  # clean images per source class
    uap_draws: int = 1  # independent draws of those images, one search each; a class's score and pull: their mean (docs/detection.md: 4 did not help)
    uap_min_rms: float = 0.006
    uap_max_rms: float = 0.5
    uap_growth: float = 1.15
    uap_step: float = 0.5
    uap_level: float = 0.9  # the search runs until this fraction of the other classes' images flip (the perturbation
    # the repair unlearns, and the pull's reference radius)
    uap_score_level: float = 0.75  # the statistic: radius at which this fraction flip, at most uap_level
    # (docs/detection.md, "The level")
    uap_adjust: bool = True  # score = residual of -log(radius) on the class's clean logit gap (8+ classes)
    # the pull (read off the universal search): each class's mean margin at this fraction of the median class's radius
    pull_ratio: float = 0.4
    # universal warps (a smooth displacement field; radius: RMS displacement of the control points, pixels)
    warp_grid: int = 8  # control points per axis (WaNet draws 4; 8 also fits finer fields)
    warp_min_px: float = 0.02
    warp_max_px: float = 4.0
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
        if "pull" in self.signals and "universal" not in self.signals:
            raise UserError("the pull signal reads the universal search: add 'universal' to the signals")
        if self.uap_draws < 1:
            raise UserError(f"uap_draws must be at least 1, got {self.uap_draws}")
        if not (0.0 < self.uap_score_level <= 1.0 and 0.0 < self.uap_level <= 1.0):
            raise UserError(f"uap_score_level and uap_level must be in (0, 1], got {self.uap_score_level} and {self.uap_level}")
        if not 0.0 < self.pull_ratio <= 1.0:
            raise UserError(f"pull_ratio must be in (0, 1], got {self.pull_ratio}")
        if self.a2a_search not in ("pairwise", "universal"):
            raise UserError(f"a2a_search must be 'pairwise' or 'universal', got {self.a2a_search!r}")
        if self.z_scale not in stats.SCALES:
            raise UserError(f"z_scale must be one of {', '.join(stats.SCALES)}, got {self.z_scale!r}")
        if not 0.0 < self.alpha < 1.0:
            raise UserError(f"alpha must be in (0, 1), got {self.alpha}")
        shares = (self.all_to_all_share, self.warp_share, self.reference_share)
        if min(shares) < 0.0 or sum(shares[:2]) >= 1.0 or (self.reference not in (None, "none") and sum(shares) >= 1.0):
            raise UserError(f"all_to_all_share, warp_share and (with a reference profile) reference_share must be >= 0 "
                            f"and sum to less than 1, got {shares}")
        if self.reference is not None and (not isinstance(self.reference, str) or not self.reference.strip()):
            raise UserError(f"reference must be a profile file or 'builtin:NAME', got {self.reference!r}")


def config_from_parameters(parameters: dict[str, Any], **overrides: Any) -> ScanConfig:
    """The :class:`ScanConfig` that a scan.json's ``parameters`` record (JSON lists back to tuples, a
    null tail back to the normal null it stood for), with ``overrides``; unknown keys are ignored."""
    # what scans written before these options used
    kw = {"z_scale": "mad", "a2a_search": "universal", "uap_draws": 1,
          "uap_score_level": overrides.get("uap_level", parameters.get("uap_level", 0.9))}
    for f in fields(ScanConfig):
        if f.name in parameters:
            v = parameters[f.name]
            kw[f.name] = math.inf if v is None and f.name.startswith("null_df_") else tuple(v) if isinstance(v, list) else v
    return ScanConfig(**{**kw, **overrides})


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
    p_warp: float | None  # the warp signal's own test (None: not run, or combined per class)
    decided_by: str | None  # the test behind a "backdoored" verdict: "all-to-one", "all-to-all", "warp" or "reference"
    p_value: float  # the model's: chance that a clean model shows a class (or a shift) this extreme
    verdict: str  # "backdoored" | "no evidence"
    kind: str  # "all-to-one", "all-to-all" or "none"
    suspected: list[int]  # suspected target classes, most suspicious first (empty: none)
    alpha: float
    seconds: dict[str, float]
    config: dict[str, Any]
    schema_version: int = SCHEMA_VERSION
    notes: list[str] = field(default_factory=list)
    reference: dict[str, Any] | None = None  # the reference test (profile, per class z and p, p_model, top), if one applied
    closest: int | None = None  # the most suspicious class, as the test nearest its bar names it (None: all-to-all)
    perturbations: torch.Tensor | None = field(default=None, repr=False)  # per class, from the universal search
    warps: torch.Tensor | None = field(default=None, repr=False)  # per class displacement fields, from the warp search
    pair_perturbations: torch.Tensor | None = field(default=None, repr=False)  # per (target, source), the pairwise search

    @property
    def backdoored(self) -> bool:
        return self.verdict == "backdoored"

    @property
    def most_suspicious(self) -> int:
        """The class the test nearest its bar names (the combined per-class test for a result without it)."""
        return most_suspicious(self.p_class) if self.closest is None else self.closest

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: non-finite numbers (a class never reached) become ``None``."""
        out = asdict(self)
        for name in ("perturbations", "warps", "pair_perturbations"):
            out.pop(name)
        return _finite(out)


def _finite(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_finite(v) for v in o]
    return o


def search_config(cfg: ScanConfig, first: float, last: float, **kw: Any) -> UniversalConfig:
    """The continuation search every signal of :mod:`.universal` runs: the scan's images per class, growth, step and
    flip level (unless ``kw`` names another), from radius ``first`` to ``last``."""
    return UniversalConfig(cfg.uap_per_class, first, last, cfg.uap_growth, cfg.uap_step, **{"flip": cfg.uap_level, **kw})


DRAW_SEED_STRIDE = 1000  # draw j of the universal search samples its images with seed + j * stride


def universal_signal(model, x, y, k, cfg: ScanConfig, progress: bool, **search: Any) -> tuple[list[float], list[float], dict]:
    """The universal signal. The search sees five images per class, so one search's radius is noisy. It is run on
    ``uap_draws`` independent draws of images (seeds ``seed + j * DRAW_SEED_STRIDE``; draw 0 is the default, single
    search) and each class's score is the mean of its ``-log(radius)`` over them; the statistic, the geometric mean
    radius. The perturbations and the per-source radii are draw 0's. More draws did not help on the benchmark
    (docs/detection.md, "Draws of the universal search"). ``search``: other settings (``rank=1``: scripts/lowrank_study.py)."""
    score_level = min(cfg.uap_score_level, cfg.uap_level)  # the search stops at uap_level: nothing is read beyond
    draws = [universal_radii(model, x, y, k, search_config(cfg, cfg.uap_min_rms, cfg.uap_max_rms, flip=score_level,
                                                     stop=cfg.uap_level, pair_level=cfg.uap_level, **search),
                             seed=cfg.seed + j * DRAW_SEED_STRIDE, device=cfg.device, progress=progress)
             for j in range(cfg.uap_draws)]
    per_draw = [[-math.log(r) if math.isfinite(r) else -math.inf for r in u["radius"]] for u in draws]
    score = [sum(col) / len(col) for col in zip(*per_draw, strict=True)]  # -inf (never reached in a draw) stays
    u = draws[0]
    radius = u["radius"] if len(draws) == 1 else [math.exp(-v) for v in score]
    extra = {"pair_radius": u["pair_radius"], "images": u["images"], "steps": u["steps"], "perturbations": u["deltas"],
             "curves": [(d["log_radii"], d["margins"], d["stop_radius"]) for d in draws]}
    if cfg.uap_draws > 1:
        extra["draw_scores"] = per_draw
    if cfg.uap_adjust and k >= 8:  # what the clean data's closeness to each class explains is not evidence
        # (a robust line needs points to spare: with fewer than 8 classes it would pass through most of them)
        gap = clean_gap(model, x, y, k, cfg.device)
        extra.update(raw_score=score, clean_gap=gap)
        score, extra["adjust_slope"], extra["adjust_intercept"] = gap_adjusted(score, gap)
    return radius, score, extra


def gap_adjusted(score: list[float], gap: list[float]) -> tuple[list[float], float, float]:
    """The universal score with what each class's clean logit gap explains taken out: the residuals around a robust
    (Theil-Sen) line of the score on minus the gap, its slope and intercept."""
    return stats.theil_sen_residual([-g for g in gap], score)


def pull_of_draw(log_radii: list[float], margins: list[list[float]], radius: list[float], ratio: float) -> tuple[list[float], float]:
    """One universal search's pull: per class, the mean margin toward it of the other classes' images at ``ratio``
    times the median class's radius (a class never measured there gets the lowest margin); and that radius."""
    med = sorted(radius)[len(radius) // 2]
    at = ratio * (med if math.isfinite(med) else math.exp(log_radii[-1]))
    m = margin_at(log_radii, margins, at)
    lowest = min((v for v in m if math.isfinite(v)), default=0.0)
    return [v if math.isfinite(v) else lowest for v in m], at


def pull_signal(curves: list[tuple[list[float], list[list[float]], list[float]]], cfg: ScanConfig) -> tuple[list[float], list[float], dict]:
    """The pull signal, from the universal searches' margins: per class, the mean margin toward it of the other
    classes' images at a radius below the one a typical class needs (``pull_ratio`` times the median class's
    radius at ``uap_level``, in each draw), averaged over the draws. There a clean model's classes are not reached yet and sit close
    together; a backdoor target is already pulled in, its trigger half-formed. A measure of the whole curve at a fixed
    budget, where the universal signal reads one noisy point (the radius at which ``uap_score_level`` of five images per
    class flip)."""
    draws = [pull_of_draw(*c, cfg.pull_ratio) for c in curves]
    m = [sum(col) / len(col) for col in zip(*(d[0] for d in draws), strict=True)]
    extra: dict[str, Any] = {"radius": [d[1] for d in draws]}
    if len(draws) > 1:
        extra["draw_pulls"] = [d[0] for d in draws]
    return m, m, extra


def _pairwise(model, x, y, k, cfg: ScanConfig, progress: bool) -> dict:
    """Per (source, target) the radius at which the source's images reach the target, each pair with a perturbation
    of its own: an all-to-all trigger (a patch that sends every class to its own target) is one perturbation per
    source, which no single perturbation toward a target reproduces. As many forward passes as the universal search."""
    return universal_radii(model, x, y, k, search_config(cfg, cfg.uap_min_rms, cfg.uap_max_rms, stop=1.0, pairwise=True),
                           seed=cfg.seed, device=cfg.device, progress=progress)


def _warp(model, x, y, k, cfg: ScanConfig, progress: bool) -> tuple[list[float], list[float], dict]:
    u = universal_radii(model, x, y, k, search_config(cfg, cfg.warp_min_px, cfg.warp_max_px, stop=1.0, transform="warp",
                                                warp_grid=cfg.warp_grid),
                        seed=cfg.seed, device=cfg.device, progress=progress)
    # most classes are never reached by a warp of a few pixels: rank by the mean log radius over images
    return u["radius"], [-v for v in u["mean_log_radius"]], {"warps": u["deltas"], "resolution": search_resolution(cfg)}


def search_resolution(cfg: ScanConfig) -> float:
    """The smallest difference of log radius a continuation search resolves: half of one step (the warp signal's
    statistic is a mean of log radii on the search's grid, where most classes tie at the cap)."""
    return 0.5 * math.log(cfg.uap_growth)


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


_RUN = {"universal": universal_signal, "warp": _warp, "margin": _margin, "weight-change": _weight_change}


def null_df(cfg: ScanConfig, signal: str) -> float:
    return getattr(cfg, "null_df_" + signal.replace("-", "_"))


def combined_signals(cfg: ScanConfig, run: list[str] | tuple[str, ...]) -> list[str]:
    """The signals of the per-class (Fisher) combination: ``verdict_signals``, or every signal run
    but ``warp``, which has a test of its own (unless it is the only one)."""
    used = [s for s in (cfg.verdict_signals or run) if s in run and (s != "warp" or cfg.verdict_signals)]
    return used or list(run)


def decide(p: dict[str, list[float]], p_model: dict[str, float], a2a: dict[str, Any], cfg: ScanConfig,
           ref: dict[str, Any] | None = None) -> dict[str, Any]:
    """The verdict from each signal's per-class p-values (``p``) and model-level p (``p_model``),
    the all-to-all test (``a2a``, may be empty) and the reference test (``ref``, None where no profile
    applies). The tests, each for one kind of evidence, share alpha (weighted Bonferroni): all-to-one
    (per class, Fisher over :func:`combined_signals`; the most suspicious class, corrected for having
    looked at all K), all-to-all (the rank test, share ``all_to_all_share``), warp (the warp signal
    alone, share ``warp_share``) and reference (each class against the same class on clean reference
    models, share ``reference_share``). Kept apart because each sees one kind of trigger: folded into
    the Fisher sum, a warp signal that sees nothing on a patch or a blend dilutes the signals that do
    (docs/detection.md)."""
    used = combined_signals(cfg, list(p))
    k = len(p[used[0]])
    comb = stats.combine(torch.tensor([p[s] for s in used]), tuple(null_df(cfg, s) for s in used), scale=cfg.z_scale) \
        if len(used) > 1 else {"p": p[used[0]], "p_model": p_model[used[0]]}
    tests = {}  # name: (p-value, share of alpha)
    if a2a and cfg.all_to_all_share > 0:
        tests["all-to-all"] = (a2a["p"], cfg.all_to_all_share)
    if "warp" in p and "warp" not in used and cfg.warp_share > 0:
        tests["warp"] = (p_model["warp"], cfg.warp_share)
    if ref is not None and 0 < cfg.reference_share < 1.0 - sum(share for _, share in tests.values()):
        tests["reference"] = (ref["p_model"], cfg.reference_share)  # (the all-to-one test keeps a share)
    tests["all-to-one"] = (comb["p_model"], 1.0 - sum(share for _, share in tests.values()))
    best = min(tests, key=lambda n: tests[n][0] / tests[n][1])
    if best == "reference" and "all-to-all" in tests and tests["all-to-all"][0] / tests["all-to-all"][1] <= cfg.alpha:
        best = "all-to-all"  # an all-to-all backdoor moves classes off their profile too; its own test says which form
    p_value = min(1.0, tests[best][0] / tests[best][1])
    kind, suspected = "none", []
    closest = None if best == "all-to-all" else ref["top"] if best == "reference" else \
        most_suspicious(p["warp"] if best == "warp" else comb["p"])  # all-to-all: no one class
    if p_value <= cfg.alpha:
        if best == "all-to-all":  # every class is a target: (s + shift) mod K
            kind, suspected = "all-to-all", [(s + a2a["shift"]) % k for s in range(k)]
        else:
            kind = "all-to-one"
            ps = p["warp"] if best == "warp" else comb["p"]
            order = sorted(range(k), key=lambda c: ps[c])
            if best == "reference":  # a backdoor moves other classes off their profile too: the reference names the
                # class that moved most, the model's own comparison any other (measured: docs/detection.md)
                order = [ref["top"]] + [c for c in order if c != ref["top"]]
            suspected = [order[0]] + [c for c in order[1:] if ps[c] * k <= cfg.alpha]  # Bonferroni for the rest
    return {"p_class": comb["p"], "p_all_to_one": comb["p_model"], "p_warp": tests.get("warp", (None,))[0],
            "p_value": p_value, "kind": kind, "suspected": suspected, "test": best if suspected else None,
            "closest": None if kind == "all-to-all" else suspected[0] if suspected else closest}


def reference_profile(cfg: ScanConfig) -> dict[str, Any] | None:
    """The profile ``cfg.reference`` names (read before any work, so that a bad one fails fast), or None."""
    if cfg.reference in (None, "none", "auto"):  # "auto" unresolved: no checkpoint description to match
        return None
    return reference.load_profile(cfg.reference)


def reference_evidence(evidence: dict[str, Evidence], k: int, n: int, cfg: ScanConfig, profile: dict[str, Any] | None,
                       notes: list[str]) -> dict[str, Any] | None:
    """The reference test of :mod:`.reference` on the scores of this scan (``k`` classes, ``n`` clean images), when
    ``profile`` applies to it (else None, and a note says why not)."""
    if profile is None:
        return None
    missing = [s for s in reference.SIGNALS if s not in evidence]
    why = f"the scan did not run {', '.join(missing)}" if missing else reference.unusable(profile, k, asdict(cfg), n)
    if why:
        notes.append(f"reference profile {cfg.reference} not used: {why}")
        return None
    return reference.reference_test({s: evidence[s].score for s in reference.SIGNALS}, profile)


WEAK_EVIDENCE = 2.0  # "no evidence" with p <= this x alpha gets a note naming the most suspicious class


def most_suspicious(p_class: list[float]) -> int:
    """The class with the smallest combined p-value (the first, on a tie)."""
    return min(range(len(p_class)), key=lambda c: p_class[c])


def frozen_copy(model: nn.Module, device: str) -> nn.Module:
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
    profile = reference_profile(cfg)
    frozen = frozen_copy(model, cfg.device)
    evidence: dict[str, Evidence] = {}
    seconds: dict[str, float] = {}
    perturbations = warps = curves = None
    for name in (s for s in SIGNALS if s in cfg.signals):  # the pull reads the universal search: it runs first
        t0 = time.perf_counter()
        target = model if name == "weight-change" else frozen  # weight change trains a copy of its own
        if name == "pull":
            statistic, score, extra = pull_signal(curves, cfg)
        else:
            statistic, score, extra = _RUN[name](target, x, y, k, cfg, progress)
            curves = extra.pop("curves", curves)
        perturbations = extra.pop("perturbations", perturbations)
        warps = extra.pop("warps", warps)
        test = stats.outlier_test(score, null_df(cfg, name), extra.pop("resolution", 0.0), cfg.z_scale)
        seconds[name] = time.perf_counter() - t0
        evidence[name] = Evidence(statistic, score, test["z"], test["p"], test["p_model"], seconds[name], extra)
    a2a: dict[str, Any] = {}
    pair_perturbations = None
    if "universal" in evidence and cfg.all_to_all_share > 0:
        t0 = time.perf_counter()
        if cfg.a2a_search == "pairwise":
            u = _pairwise(frozen, x, y, k, cfg, progress)
            pair, pair_perturbations = u["pair_radius"], u["deltas"]
        else:
            pair = [[math.inf if v is None else v for v in row] for row in evidence["universal"].extra["pair_radius"]]
        a2a = {**stats.cyclic_all_to_all(pair, cfg.seed), "pair_radius": pair}
        seconds["all-to-all"] = time.perf_counter() - t0
    notes = [f"the clean set has no image of class(es) {missing}: they are only reached, never sources"] if missing else []
    ref = reference_evidence(evidence, k, len(y), cfg, profile, notes)
    d = decide({n: e.p for n, e in evidence.items()}, {n: e.p_model for n, e in evidence.items()}, a2a, cfg, ref)
    seconds["total"] = sum(seconds.values())
    if not d["suspected"] and d["p_value"] <= WEAK_EVIDENCE * cfg.alpha:  # the verdict stays; the user should know
        top = "the all-to-all test (every class a target)" if d["closest"] is None else f"class {d['closest']}"
        notes.append(f"weak evidence, below the verdict's bar: {top} is the most suspicious (p = {d['p_value']:.3g}, "
                     f"alpha = {cfg.alpha}); scan again with another clean set (--seed) or more clean images, or "
                     f"repair that class anyway (force_repair)")
    return ScanResult(
        num_classes=k, clean_samples=int(len(y)), signals=evidence,
        combined=[-math.log10(max(p, 1e-300)) for p in d["p_class"]], p_class=d["p_class"],
        p_all_to_one=d["p_all_to_one"], all_to_all=a2a, p_warp=d["p_warp"], decided_by=d["test"], p_value=d["p_value"],
        verdict="backdoored" if d["suspected"] else "no evidence", kind=d["kind"], suspected=d["suspected"], alpha=cfg.alpha, seconds=seconds, config=asdict(cfg), notes=notes,
        reference=ref, closest=d["closest"],
        perturbations=perturbations, warps=warps, pair_perturbations=pair_perturbations,
    )
