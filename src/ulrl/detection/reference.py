"""A reference profile: what each class's evidence looks like on clean models of the same architecture, data and
training recipe.

The scan's own test compares each class with the *other classes of the same model*. Some classes stand out on every
clean model of a dataset (on Fashion-MNIST: Shirt is reached easily, Bag and Sandal reach large margins, T-shirt sits
low), so a backdoor toward such a class, or one whose trigger is only as strong as the natural routes, hides among
them. A profile records, per class and per signal, the mean and spread of the score over clean reference models;
the reference test asks how far *this* class sits from *the same class* on those models. Built from scans
(``ulrl profile``), or shipped for the built-in data and model (``profiles/``); ``docs/detection.md``, "The reference
test", has the measurements.

Per class and signal the statistic is ``(score - mean) / (sd * sqrt(1 + 1/n))`` over ``n`` reference models, read
against a Student t with ``n - 1`` degrees of freedom (the predictive distribution of one more clean model, normal
scores assumed); the signals are combined per class by Fisher's method; the test's p-value is that of the most
suspicious class, Sidak-corrected for the K classes looked at.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from pathlib import Path
from typing import Any

from ..errors import UserError

FORMAT = "ulrl-reference/1"
SIGNALS = ("universal", "margin")  # the scores compared (gap-adjusted universal score, log maximum margin)
# scan parameters that change those scores: a profile applies only to scans run with the same
PARAMETERS = ("uap_per_class", "uap_draws", "uap_min_rms", "uap_max_rms", "uap_growth", "uap_step", "uap_level",
              "uap_score_level", "uap_adjust", "margin_starts", "margin_steps", "margin_lr")
# what a checkpoint's description must share with the reference models' (train_config without seed and device)
MATCH = ("dataset", "arch", "num_classes", "in_channels", "image_size")
MIN_MODELS = 3
# the scores shift and spread with the clean-set size: a profile applies to clean sets within this factor of its own
SIZE_FACTOR = 1.5
BUILTIN_DIR = Path(__file__).parent / "profiles"


def build_profile(scans: list[tuple[str, dict[str, Any]]], name: str, match: dict[str, Any] | None = None,
                  source: str = "") -> dict[str, Any]:
    """A profile from ``(model id, scan.json dict)`` pairs of clean reference models (several clean sets of one model
    may be given: they share its id, and the spread's degrees of freedom count models, not scans)."""
    if not scans:
        raise UserError("a reference profile needs scans of clean models; none given")
    for model_id, s in scans:
        _check_scan(model_id, s)
    first = scans[0][1]
    k, params = first["num_classes"], {p: first["parameters"].get(p) for p in PARAMETERS}
    for model_id, s in scans:
        if s["num_classes"] != k:
            raise UserError(f"scan of {model_id} has {s['num_classes']} classes, the first one {k}")
        other = {p: s["parameters"].get(p) for p in PARAMETERS}
        if other != params:
            diff = sorted(p for p in PARAMETERS if other[p] != params[p])
            raise UserError(f"scan of {model_id} was run with other scan parameters ({', '.join(diff)}); "
                            f"scan every reference model with the same settings")
        missing = [sg for sg in SIGNALS if not isinstance(s["signals"].get(sg), dict) or "score" not in s["signals"][sg]]
        if missing:
            raise UserError(f"scan of {model_id} lacks the signal(s) {', '.join(missing)} a profile needs")
        if s.get("verdict") == "backdoored":
            raise UserError(f"scan of {model_id} says 'backdoored' (p = {s['p_value']:.3g}); a reference model must be "
                            f"one you trust to be clean")
    models = sorted({m for m, _ in scans})
    if len(models) < MIN_MODELS:
        raise UserError(f"a reference profile needs clean models of at least {MIN_MODELS} training seeds, got {len(models)}")
    signals = {}
    for sg in SIGNALS:
        cols = list(zip(*(_scores(s, sg) for _, s in scans), strict=True))
        signals[sg] = {"mean": [statistics.fmean(c) for c in cols], "sd": [statistics.stdev(c) for c in cols]}
    sizes = [s["clean_samples"] for _, s in scans if isinstance(s.get("clean_samples"), int)]
    return {"format": FORMAT, "name": name, "num_classes": k, "models": len(models), "scans": len(scans),
            "clean_samples": [min(sizes), max(sizes)] if len(sizes) == len(scans) else None,
            "match": match or {}, "parameters": params, "signals": signals, "source": source}


def _check_scan(model_id: str, s: Any) -> None:
    """A scan a profile can read: its class count, parameters and, per signal, one finite score per class."""
    if not (isinstance(s, dict) and isinstance(s.get("num_classes"), int) and isinstance(s.get("parameters"), dict)
            and isinstance(s.get("signals"), dict)):
        raise UserError(f"scan of {model_id} lacks num_classes, parameters or signals; give a scan.json of 'ulrl scan'")
    for sg in SIGNALS:
        v = (s["signals"].get(sg) or {}).get("score") if isinstance(s["signals"].get(sg), dict) else None
        if v is None:
            continue  # reported as a missing signal by the caller
        if not isinstance(v, list) or len(v) != s["num_classes"] or \
                not all(isinstance(x, int | float) and math.isfinite(x) for x in v):
            raise UserError(f"scan of {model_id}: the {sg} scores are not one finite number per class (a class the "
                            f"search never reached has none); scan that model with another clean set, or leave it out")


def _scores(scan: dict[str, Any], signal: str) -> list[float]:
    v = scan["signals"][signal]["score"]
    return [-math.inf if x is None else float(x) for x in v]  # scan.json writes a never-reached class as null


def load_profile(ref: str) -> dict[str, Any]:
    """A profile by file path, or a built-in one by name (``builtin:NAME``; read once per process: package data)."""
    return _builtin(ref) if ref.startswith("builtin:") else _read_profile(ref, Path(ref))


@functools.cache
def _builtin(ref: str) -> dict[str, Any]:
    return _read_profile(ref, BUILTIN_DIR / f"{ref.split(':', 1)[1]}.json")


def _read_profile(ref: str, path: Path) -> dict[str, Any]:
    if not path.is_file():
        known = ", ".join(f"builtin:{p.stem}" for p in sorted(BUILTIN_DIR.glob("*.json")))
        raise UserError(f"reference profile {ref!r} not found; give a file written by 'ulrl profile' or one of: {known}")
    try:
        prof = json.loads(path.read_text(), parse_constant=_no_constant)
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"reference profile {ref}: not readable JSON ({e})") from None
    if not isinstance(prof, dict) or prof.get("format") != FORMAT:
        raise UserError(f"reference profile {ref}: not a {FORMAT} file; write one with 'ulrl profile'")
    k, n = prof.get("num_classes"), prof.get("models")
    try:
        ok = isinstance(k, int) and isinstance(n, int) and n >= MIN_MODELS and isinstance(prof.get("name"), str) \
            and isinstance(prof.get("parameters"), dict) and isinstance(prof.get("match"), dict) and all(
                isinstance(v, list) and len(v) == k and all(isinstance(x, int | float) for x in v)
                and (f == "mean" or all(x > 0 for x in v))
                for sg in SIGNALS for f, v in ((f, prof["signals"][sg][f]) for f in ("mean", "sd")))
        size = prof.get("clean_samples")  # older profiles have none: no size check
        ok = ok and (size is None or (isinstance(size, list) and len(size) == 2
                                      and all(isinstance(v, int) and v > 0 for v in size) and size[0] <= size[1]))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise UserError(f"reference profile {ref}: malformed (needs num_classes, models >= {MIN_MODELS} and, per "
                        f"signal {', '.join(SIGNALS)}, a mean and sd per class); write it again with 'ulrl profile'")
    return prof


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number a profile may hold")


def match_key(meta: dict[str, Any]) -> dict[str, Any]:
    """What of a checkpoint's description a built-in profile must match: data, architecture, shape and the training
    recipe (without its seed and device), as JSON holds it (a tuple in memory is a list in a file)."""
    key = {f: meta.get(f) for f in MATCH}
    recipe = meta.get("train_config")
    key["train_config"] = {k: v for k, v in recipe.items() if k not in ("seed", "device")} if isinstance(recipe, dict) else None
    return json.loads(json.dumps(key, default=str))


def check_model(profile: dict[str, Any], ref: str, meta: dict[str, Any] | None) -> None:
    """Refuse a profile whose reference models are of another dataset, architecture or shape than the model
    described by ``meta`` (nothing to compare when either is unknown)."""
    if not meta or not profile.get("match"):
        return
    mine = match_key(meta)
    diff = [f for f in MATCH if profile["match"].get(f) != mine[f]]
    if diff:
        what = ", ".join(f"{f} {profile['match'].get(f)} vs {mine[f]}" for f in diff)
        raise UserError(f"reference profile {ref} was built on other models ({what}); give a profile of clean models "
                        f"like this one, or --reference none")


def builtin_for(meta: dict[str, Any] | None) -> str | None:
    """The name (``builtin:NAME``) of the shipped profile whose reference models were described as ``meta`` is, or
    None."""
    if not meta:
        return None
    key = match_key(meta)
    names = [f"builtin:{path.stem}" for path in sorted(BUILTIN_DIR.glob("*.json"))]
    return next((name for name in names if load_profile(name)["match"] == key), None)


def resolve(value: str | None, meta: dict[str, Any] | None) -> str | None:
    """The profile a scan uses: ``"auto"``, the shipped profile whose reference models were trained as the model
    described by ``meta`` was (None if none was, or without a description); ``"none"`` or None, none; otherwise
    ``value`` (a file, or ``builtin:NAME``)."""
    if value is None or value == "none":
        return None
    if value == "auto":
        return builtin_for(meta)
    check_model(load_profile(value), value, meta)
    return value


def unusable(profile: dict[str, Any], k: int, parameters: dict[str, Any], n: int | None = None) -> str | None:
    """Why ``profile`` cannot be used for a scan of ``k`` classes with ``n`` clean images, run with ``parameters``
    (None: it can)."""
    if profile["num_classes"] != k:
        return f"it has {profile['num_classes']} classes, the model {k}"
    size = profile.get("clean_samples")
    if n is not None and size and not size[0] / SIZE_FACTOR <= n <= size[1] * SIZE_FACTOR:
        return (f"its reference scans used {size[0]}-{size[1]} clean images, this one {n} (a profile applies within a "
                f"factor of {SIZE_FACTOR}); build one from scans with clean sets of this size")
    diff = sorted(p for p in PARAMETERS if profile["parameters"].get(p) != parameters.get(p))
    return f"it was built with other scan parameters ({', '.join(diff)})" if diff else None


def reference_test(scores: dict[str, list[float]], profile: dict[str, Any]) -> dict[str, Any]:
    """Per class: each signal's standardised distance from the reference models' mean (``z``), its one-sided p
    (larger = more suspicious), Fisher's combination over the signals (``p``); the test's p-value (``p_model``: the
    most suspicious class's, Sidak over the classes) and that class (``top``)."""
    n = profile["models"]
    k = profile["num_classes"]
    z = {}
    for sg in SIGNALS:
        mean, sd = profile["signals"][sg]["mean"], profile["signals"][sg]["sd"]
        z[sg] = [(s - m) / (max(d, 1e-9) * math.sqrt(1 + 1 / n)) for s, m, d in zip(scores[sg], mean, sd, strict=True)]
    p = []
    for c in range(k):
        chi = sum(-2.0 * math.log(max(t_sf(z[sg][c], n - 1), 1e-300)) for sg in SIGNALS)
        p.append(chi2_sf_even(chi, 2 * len(SIGNALS)))
    top = min(range(k), key=lambda c: p[c])
    return {"profile": profile["name"], "models": n, "z": z, "p": p, "top": top,
            "p_model": -math.expm1(k * math.log1p(-min(p[top], 1.0 - 1e-16)))}


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom (``-inf``/``inf`` give 1/0)."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


def chi2_sf_even(x: float, dof: int) -> float:
    """P(X > x) for a chi-square with an even number of degrees of freedom (closed form)."""
    half, term, total = x / 2.0, 1.0, 1.0
    for i in range(1, dof // 2):
        term *= half / i
        total += term
    return min(1.0, math.exp(-half) * total)


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) (continued fraction, Lentz's method)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast below the mean: use the symmetry
        return 1.0 - betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-14:
            break
    return front * (f - 1.0)
