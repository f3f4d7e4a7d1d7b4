"""Calibration: from per-class statistics to outlier z-scores and p-values that mean the same on any model.

Each signal gives one number per class, oriented so that larger is more suspicious and put on a
log scale (a radius, a margin). The null hypothesis of a clean model is that these K numbers
are exchangeable draws from one distribution. For each class we compute a *leave-one-out
robust z-score*: its distance above the median of the other K-1 classes, in units of their
spread. Leaving the class out keeps a backdoor target from inflating its own yardstick. The
spread (``scale``) is, by default, the standard deviation of the other K-1 values with their two
largest and their smallest left out (``trimmed``): up to two other targets (the repair's cap), or a
class the search never reached (put below every other), cannot inflate it, and
with nine values it is a far less noisy yardstick than the median absolute deviation (``mad``,
MAD x 1.4826, the first version), so the same false-positive rate is reached at a smaller z
(docs/detection.md, "The yardstick").

The null distribution of these z-scores has no closed form (MAD of 9 values is itself noisy, so
the tail is much heavier than a normal's), so it is simulated: ``draws`` sets of K i.i.d.
Student-t values (``df`` degrees of freedom: heavier tails than a normal, so that natural
differences between classes are not read as a backdoor; ``df=inf`` is a normal null). A class's
p-value is the chance that one null z is at least as large; the model's p-value is the chance
that the *largest* of K null z's is at least as large as the largest observed, so it accounts for
having looked at every class. Under the null, ``P(model p <= alpha) = alpha`` up to Monte-Carlo
error (tests/test_detection.py checks it on random scores).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

MAD_SCALE = 1.4826


SCALES = ("trimmed", "mad")


def loo_robust_z(values: torch.Tensor, floor: float = 0.0, scale: str = "trimmed") -> torch.Tensor:
    """Leave-one-out robust z of each entry along the last axis: ``(v_k - median(v_-k)) / max(s(v_-k), floor)``,
    ``s`` the standard deviation of ``v_-k`` without its two largest values and its smallest (``trimmed``; fewer when
    fewer than three would remain) or ``MAD_SCALE * MAD(v_-k)`` (``mad``). Works on (..., K) batches."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    v = values.double()
    k = v.shape[-1]
    idx = torch.arange(k)
    others = torch.stack([idx[idx != i] for i in range(k)])  # (K, K-1)
    rest = v[..., others]  # (..., K, K-1)
    med = rest.median(-1).values
    if scale == "mad":
        spread = (rest - med[..., None]).abs().median(-1).values * MAD_SCALE
    else:
        top = min(2, max(0, k - 1 - 3))  # keep at least three values
        low = min(1, max(0, k - 1 - top - 3))
        spread = rest.sort(-1).values[..., low: k - 1 - top].std(-1)
    return ((v - med) / spread.clamp_min(max(floor, 1e-12))).float()


def theil_sen_residual(x: list[float], y: list[float], min_slope: float = 0.0) -> tuple[list[float], float, float]:
    """Residuals of ``y`` around the Theil-Sen line on ``x`` (median of pairwise slopes, at least
    ``min_slope``; median intercept): a fit that one or two outliers (a backdoor target) do not move.
    Non-finite ``y`` are left out of the fit and keep their value."""
    pts = [(a, b) for a, b in zip(x, y, strict=True) if math.isfinite(a) and math.isfinite(b)]
    slopes = [(pts[j][1] - pts[i][1]) / (pts[j][0] - pts[i][0])
              for i in range(len(pts)) for j in range(i + 1, len(pts)) if pts[j][0] != pts[i][0]]
    if len(pts) < 3 or not slopes:
        return list(y), 0.0, 0.0
    slope = max(min_slope, float(torch.tensor(slopes).median()))
    icpt = float(torch.tensor([b - slope * a for a, b in pts]).median())
    return [b - (icpt + slope * a) if math.isfinite(b) and math.isfinite(a) else b for a, b in zip(x, y, strict=True)], slope, icpt


@lru_cache(maxsize=32)
def null_z(k: int, df: float, scale: str = "trimmed", draws: int = 40000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Simulated null of :func:`loo_robust_z` for K exchangeable classes: the sorted z of one
    class, and the sorted largest z of the K. Values are t(df) draws (normal when df is inf)."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(draws, k, generator=gen, dtype=torch.float64)
    if math.isfinite(df):  # t = normal / sqrt(chi2_df / df)
        v = v / (_chi2(draws, k, df, gen) / df).sqrt()
    z = loo_robust_z(v, scale=scale)
    return z[:, 0].sort().values, z.max(1).values.sort().values


def _chi2(draws: int, k: int, df: float, gen: torch.Generator) -> torch.Tensor:
    """Chi-square(df) draws from a seeded generator (sum of squared normals, df rounded up)."""
    n = math.ceil(df)
    return torch.randn(draws, k, n, generator=gen, dtype=torch.float64).pow(2).sum(-1) * (df / n)


def tail_p(sorted_null: torch.Tensor, value: float) -> float:
    """P(null >= value), with the usual +1 correction so a Monte-Carlo p-value is never 0."""
    if math.isnan(value):
        return 1.0
    n = len(sorted_null)
    below = int(torch.searchsorted(sorted_null, torch.tensor([value], dtype=sorted_null.dtype), right=False))
    return (n - below + 1) / (n + 1)


def outlier_test(values: list[float] | torch.Tensor, df: float = 5.0, floor: float = 0.0, scale: str = "trimmed") -> dict:
    """Per-class z and p, and the model-level p of the largest z (see the module docstring).
    Non-finite values (a class the search never reached) are put at the most benign end. ``floor``
    bounds the spread from below (the statistic's resolution): when most classes tie, a difference
    finer than the measurement can resolve is not evidence (only ever makes z smaller)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    finite = torch.isfinite(v)
    if not finite.any():
        k = len(v)
        return {"z": [0.0] * k, "p": [1.0] * k, "p_model": 1.0}
    low = v[finite].min() - 1.0  # unreached (-inf evidence) sits below every reached class
    v = torch.where(torch.isposinf(v), v[finite].max() + 1.0, torch.where(finite, v, low))
    z = loo_robust_z(v, floor, scale)
    one, top = null_z(len(v), float(df), scale)
    p = [tail_p(one, float(zk)) for zk in z]
    return {"z": z.tolist(), "p": p, "p_model": tail_p(top, float(z.max()))}


def tail_ps(sorted_null: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """:func:`tail_p` for a tensor of values."""
    n = len(sorted_null)
    below = torch.searchsorted(sorted_null, values.to(sorted_null.dtype).contiguous(), right=False)
    return (n - below + 1).double() / (n + 1)


def _combined(logp: torch.Tensor, method: str) -> torch.Tensor:
    """Per-class combination of ``log p`` (..., signals, K): Fisher ``-2 sum log p`` or Tippett ``-log min p``."""
    return -2 * logp.sum(-2) if method == "fisher" else -logp.min(-2).values


@lru_cache(maxsize=32)
def null_combined(k: int, dfs: tuple[float, ...], method: str = "fisher", scale: str = "trimmed", draws: int = 40000,
                  seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Simulated null of the per-class combination of independent signals, signal ``i`` a set of
    K exchangeable t(``dfs[i]``) values put through :func:`loo_robust_z` and its one-class null:
    sorted statistic of one class, and sorted largest over the K classes."""
    gen = torch.Generator().manual_seed(seed)
    logp = torch.zeros(draws, len(dfs), k, dtype=torch.float64)
    for i, df in enumerate(dfs):
        one, _ = null_z(k, df, scale)
        v = torch.randn(draws, k, generator=gen, dtype=torch.float64)
        if math.isfinite(df):
            v = v / (_chi2(draws, k, df, gen) / df).sqrt()
        logp[:, i] = tail_ps(one, loo_robust_z(v, scale=scale).double()).log()
    stat = _combined(logp, method)
    return stat[:, 0].sort().values, stat.max(1).values.sort().values


def combine(p: torch.Tensor, dfs: tuple[float, ...] | float = 5.0, method: str = "fisher", scale: str = "trimmed") -> dict:
    """Combination of per-class p-values ``p`` (signals x K; signal i's null has ``dfs[i]``),
    ``fisher`` or ``tippett``: per class the combined statistic and its p-value, and the
    model-level p-value of the largest (simulated null of independent signals)."""
    p = torch.as_tensor(p, dtype=torch.float64)
    s, k = p.shape
    dfs = tuple(float(d) for d in dfs) if isinstance(dfs, tuple | list) else (float(dfs),) * s
    stat = _combined(p.clamp_min(1e-300).log(), method)
    one, top = null_combined(k, dfs, method, scale)
    return {"statistic": stat.tolist(), "p": tail_ps(one, stat).tolist(), "p_model": float(tail_ps(top, stat.max()[None])[0])}


def rank_sum_p(ranks: list[int], levels: int) -> float:
    """P(sum of len(ranks) independent uniform integers on 0..levels-1 <= sum(ranks)): exact, by
    convolution. Small rank sums mean the pre-specified targets were unusually easy to reach."""
    dist = torch.zeros(1, dtype=torch.float64)
    dist[0] = 1.0
    one = torch.full((levels,), 1.0 / levels, dtype=torch.float64)
    for _ in ranks:
        dist = torch.nn.functional.conv1d(dist.view(1, 1, -1), one.flip(0).view(1, 1, -1), padding=levels - 1).view(-1)
    return float(dist[: int(sum(ranks)) + 1].sum().clamp(max=1.0))


def cyclic_all_to_all(pair: list[list[float]], seed: int = 0) -> dict:
    """Test for an all-to-all backdoor of the field's form ``y -> (y + k) mod K``: for each shift k,
    rank target ``(s + k) mod K`` among the K-1 targets of every source class s by how easily the
    source reached it (``pair[s][t]``, a radius; ties broken at random). On a clean model no shift
    is special and each rank is uniform on 0..K-2; a backdoor makes every source's shifted class
    among its easiest. Returns per-shift rank sums and p-values and the Bonferroni p over shifts."""
    k = len(pair)
    gen = torch.Generator().manual_seed(seed)
    sources = [s for s in range(k) if any(math.isfinite(v) for t, v in enumerate(pair[s]) if t != s)]
    ranks: dict[int, list[int]] = {shift: [] for shift in range(1, k)}
    for s in sources:
        targets = [t for t in range(k) if t != s]
        jitter = torch.rand(len(targets), generator=gen).tolist()
        order = sorted(range(len(targets)), key=lambda i: (pair[s][targets[i]], jitter[i]))
        rank_of = {targets[i]: r for r, i in enumerate(order)}
        for shift in range(1, k):
            ranks[shift].append(rank_of[(s + shift) % k])
    p = {shift: rank_sum_p(r, k - 1) if r else 1.0 for shift, r in ranks.items()}
    best = min(p, key=p.get) if p else 1
    return {"rank_sums": {str(s): sum(r) for s, r in ranks.items()}, "p_shift": {str(s): v for s, v in p.items()},
            "shift": best, "p": min(1.0, (k - 1) * p.get(best, 1.0)), "sources": len(sources)}
