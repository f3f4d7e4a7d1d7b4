"""Signal: how small a universal perturbation sends clean images of other classes to each class.

A backdoor is a shortcut: one small input change (the trigger) sends images of every class to
the target. So for each class ``t`` we look for the smallest *dense* universal perturbation
``delta_t`` (one tensor, added to every image, L2-bounded) that makes the model predict ``t`` on
clean images of the other classes. The search grows the L2 radius geometrically (a continuation:
one normalised gradient step per radius, then projection on the ball) and records, per class
and per source class, the radius at which half of the images first flip. A class that is reached
at an abnormally small radius is a backdoor target. Dense, not sparse: the perturbation may
spread over the whole image, so whole-image and clean-label triggers (Blended, SIG, LC, WaNet,
frequency triggers) are found as well as patches.

Natural reachability. Some classes are reached by a small universal perturbation on every model,
clean or not: the ones the clean data already sits close to (on Fashion-MNIST, Shirt). The scan
regresses the per-class statistic on the class's clean logit gap (:func:`clean_gap`) with a
robust (Theil-Sen) line and keeps the residual: a target is a class reached far more easily than
its clean gap explains.

Warps. A trigger can also be a change of *shape*: WaNet moves every pixel by a fraction of a pixel
along one fixed, smooth warping field. No small additive perturbation reproduces that (the pixel
change depends on the image), but a small universal *warp* does. With ``transform="warp"`` the
search is over a smooth displacement field instead (``warp_grid`` x ``warp_grid`` control points
per axis, upsampled bicubically, applied with ``grid_sample``), its radius the RMS displacement of
the control points in pixels. On a clean model no class is reached by a warp of a few pixels,
so most classes are never reached at all; the statistic that still ranks them is the mean over
images of the log radius at which each one flips (``mean_log_radius``, capped at the largest
radius searched).

Radii are reported as RMS per pixel value (L2 norm / sqrt(C*H*W), images in [0, 1]), so they
mean the same at every image size. The per-class statistic is ``-log(radius)`` (higher is more
suspicious); per-source radii also give a source x target matrix, which exposes all-to-all
backdoors (every source class reached at a small radius, each toward its own target).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.transforms import to_float


@dataclass
class UniversalConfig:
    per_class: int = 6  # clean images per source class used in the search
    min_rms: float = 0.004  # first radius (RMS per pixel value)
    max_rms: float = 0.5  # last radius
    growth: float = 1.12  # radius ratio between consecutive steps
    step: float = 0.5  # gradient step length, relative to the current radius
    flip: float = 0.5  # fraction of images that must reach the class
    stop: float = 0.5  # a class's search stops once this fraction reached it
    pair_level: float | None = None  # the flip level of the per-(source, target) radii (None: ``flip``)
    per_image: bool = False  # one perturbation per image instead of one per class (the sample-specific baseline)
    pairwise: bool = False  # one perturbation per (target, source class): how easily each source reaches each target
    norm: str = "l2"  # "l2" (radius: RMS per pixel value) or "linf" (radius: the largest change of a pixel value)
    transform: str = "add"  # "add": x + delta; "warp": x resampled along a smooth displacement field (radius in pixels)
    warp_grid: int = 4  # transform="warp": control points per axis of the displacement field
    rank: int = 0  # transform="add", l2 norm: keep each channel of a perturbation of this rank at most (0: any)
    batch_size: int = 512


@torch.no_grad()
def clean_gap(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, device: str = "cpu",
              batch_size: int = 512) -> list[float]:
    """Per class ``t``: the mean, over clean images of the other classes, of ``max logit - logit_t``.
    How far the class is, on clean data, from being predicted: small for the natural attractor
    classes (Shirt among T-shirt, Pullover and Coat), which a universal perturbation reaches
    easily on any model, backdoored or not."""
    model.eval().to(device)
    logits = torch.cat([model(to_float(x[i:i + batch_size]).to(device)).float().cpu() for i in range(0, len(x), batch_size)])
    gap = logits.max(1, keepdim=True).values - logits
    return [gap[y != t, t].mean().item() if bool((y != t).any()) else math.nan for t in range(k)]


def sample_indices(y: torch.Tensor, k: int, per_class: int, gen: torch.Generator) -> torch.Tensor:
    """The positions in the clean set of the images a search uses: up to ``per_class`` of each class, drawn from ``gen``."""
    picks = []
    for c in range(k):
        pos = (y == c).nonzero().flatten()
        picks.append(pos[torch.randperm(len(pos), generator=gen)[:per_class]])
    return torch.cat(picks)


def _crossing(frac: torch.Tensor, log_r: torch.Tensor, level: float) -> float:
    """The log radius at which ``frac`` (per step) first reaches ``level``, interpolated linearly
    in log radius between the two steps around it; ``inf`` if it never does."""
    above = (frac >= level).nonzero().flatten()
    if len(above) == 0:
        return math.inf
    i = int(above[0])
    if i == 0:
        return float(log_r[0])
    f0, f1 = float(frac[i - 1]), float(frac[i])
    w = (level - f0) / max(f1 - f0, 1e-12)
    return float(log_r[i - 1] + w * (log_r[i] - log_r[i - 1]))


def warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Resample images ``x`` (N, C, H, W) along displacement fields ``flow`` (M, 2, g, g), in pixels
    (x then y offsets at g x g control points, upsampled bicubically); returns (M, N, C, H, W)."""
    m, (n, c, h, w) = flow.shape[0], x.shape
    field = F.interpolate(flow, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)  # (M, H, W, 2)
    gy, gx = torch.meshgrid(torch.linspace(-1, 1, h, device=x.device), torch.linspace(-1, 1, w, device=x.device),
                            indexing="ij")
    pixel = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], device=x.device)  # pixels -> grid units
    grid = (torch.stack((gx, gy), 2) + field * pixel).clamp(-1, 1)
    grid = grid[:, None].expand(m, n, h, w, 2).reshape(m * n, h, w, 2)
    out = F.grid_sample(x[None].expand(m, n, c, h, w).reshape(m * n, c, h, w), grid, mode="bilinear",
                        padding_mode="border", align_corners=True)
    return out.view(m, n, c, h, w)


def low_rank(d: torch.Tensor, rank: int) -> torch.Tensor:
    """Each channel (the last two dimensions) of ``d`` replaced by its best approximation of rank ``rank``."""
    u, sv, vh = torch.linalg.svd(d, full_matrices=False)
    return (u[..., :rank] * sv[..., None, :rank]) @ vh[..., :rank, :]


def universal_radii(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: UniversalConfig,
                    seed: int = 0, device: str = "cpu", progress: bool = False) -> dict:
    """Per target class: the RMS radius at which ``cfg.flip`` of the other classes' images flip to
    it (``radius``), the mean over those images of the log radius at which each flips, capped at
    ``cfg.max_rms`` (``mean_log_radius``), and per (source, target) the radius at which that
    source's images do (``pair_radius[s][t]``); ``inf`` where the search stopped first (it stops for
    a class once the class is reached). Also the final perturbations (``deltas``: K x C x H x W, K x K x C x H x W
    per (target, source) with ``pairwise``, or K x 2 x g x g displacement fields for ``transform="warp"``), and at
    every radius searched (``log_radii``) each class's mean margin toward it over those images (``margins``: K lists,
    ``nan`` once the class's search stopped), which the scan's pull signal reads; ``levels``: per flip level, the
    radius at which that fraction flipped (0.25, 0.5, 0.75, 0.9, ``flip`` and ``stop``), ``stop_radius`` the one at
    ``stop``."""
    if cfg.transform not in ("add", "warp") or (cfg.transform == "warp" and (cfg.per_image or cfg.pairwise or cfg.norm != "l2")):
        raise ValueError(f"transform must be 'add', or 'warp' with the l2 norm and one field per class, got {cfg}")
    if cfg.per_image and cfg.pairwise:
        raise ValueError("per_image and pairwise are exclusive")
    if cfg.rank and (cfg.transform != "add" or cfg.norm != "l2"):
        raise ValueError("rank applies to additive perturbations under the l2 norm only")
    gen = torch.Generator().manual_seed(seed)
    model = model.eval()
    picked = sample_indices(y, num_classes, cfg.per_class, gen)
    xs, ys = to_float(x[picked]), y[picked]
    xs, ys = xs.to(device), ys.to(device)
    n = len(ys)
    shape = (2, cfg.warp_grid, cfg.warp_grid) if cfg.transform == "warp" else xs.shape[1:]
    dim = math.prod(shape)
    k = num_classes
    targets = torch.arange(k, device=device)
    others = ys[None, :] != targets[:, None]  # (K, n): images of other classes
    source = torch.nn.functional.one_hot(ys, k).float().T  # (K sources, n)
    source = source / source.sum(1, keepdim=True).clamp_min(1)
    delta = torch.zeros(k, *((n,) if cfg.per_image else (k,) if cfg.pairwise else ()), *shape, device=device)
    steps = math.ceil(math.log(cfg.max_rms / cfg.min_rms) / math.log(cfg.growth)) + 1
    log_r = torch.tensor([math.log(cfg.min_rms * cfg.growth**i) for i in range(steps)])
    frac = torch.full((steps, k), math.nan)  # fraction of other classes' images reaching t
    margin = torch.full((steps, k), math.nan)  # their mean margin toward t (logit_t - the largest other logit)
    first = torch.full((k, n), float(steps))  # per target and image: the first step at which the image reached it
    pair_frac = torch.full((steps, k, k), math.nan)  # [step, source, target]
    active = torch.ones(k, dtype=torch.bool)
    used = 0
    for i in tqdm(range(steps), desc="scan: universal perturbations", disable=not progress, leave=False):
        live = active.nonzero().flatten()
        if len(live) == 0:
            break
        used = i + 1
        r = math.exp(float(log_r[i])) * (math.sqrt(dim) if cfg.norm == "l2" else 1.0)
        d = delta[live].clone().requires_grad_(True)
        if cfg.transform == "warp":
            xb = warp(xs, d).flatten(0, 1)
        elif cfg.pairwise:  # each image gets its (target, source class) perturbation
            xb = (xs[None] + d[:, ys]).clamp(0, 1).flatten(0, 1)
        else:
            xb = (xs[None] + (d if cfg.per_image else d[:, None])).clamp(0, 1).flatten(0, 1)
        tb = live.to(device).repeat_interleave(n)
        weight = others[live].flatten().float()
        preds, margins, grads = [], [], torch.zeros_like(d)
        for j in range(0, len(tb), cfg.batch_size):  # chunks: the batch is (live classes) x n images
            sl = slice(j, j + cfg.batch_size)
            out = model(xb[sl])
            loss = (F.cross_entropy(out, tb[sl], reduction="none") * weight[sl]).sum()
            grads += torch.autograd.grad(loss, d, retain_graph=j + cfg.batch_size < len(tb))[0]
            preds.append(out.argmax(1).detach())
            margins.append(_margin(out.detach().float(), tb[sl]))
        with torch.no_grad():
            hit = (torch.cat(preds).view(len(live), n) == live.to(device)[:, None]).float()
            frac[i, live] = ((hit * others[live]).sum(1) / others[live].sum(1)).cpu()
            margin[i, live] = ((torch.cat(margins).view(len(live), n) * others[live]).sum(1) / others[live].sum(1)).cpu()
            first[live] = torch.where((hit.cpu() > 0) & (first[live] > i), float(i), first[live])
            pair_frac[i][:, live] = (source @ hit.T).cpu()
            flat = 2 if cfg.per_image or cfg.pairwise else 1
            g = grads.flatten(flat)
            if cfg.norm == "linf":  # signed step, then clip every pixel to the radius
                nd = (d.detach().flatten(flat) - cfg.step * r * g.sign()).clamp(-r, r)
            else:  # normalised step, then projection on the L2 ball
                g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                nd = d.detach().flatten(flat) - cfg.step * r * g
                if cfg.rank > 0:
                    nd = low_rank(nd.view_as(d), cfg.rank).flatten(flat)
                nd = nd * (r / nd.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
            delta[live] = nd.view_as(d)
            active[live[frac[i, live] >= max(cfg.flip, cfg.stop)]] = False  # reached: its radius is known
    # capped at the last radius searched: a class never reached counts its images at that radius
    at = log_r[first.clamp(max=steps - 1).long()]
    mean_log = [float(at[t][others[t].cpu()].mean()) if bool(others[t].any()) else math.nan for t in range(k)]
    log_r = log_r[:used]
    radius = [math.exp(_crossing(frac[:used, t], log_r, cfg.flip)) for t in range(k)]
    levels = {f"{q:g}": [math.exp(_crossing(frac[:used, t], log_r, q)) for t in range(k)]
              for q in sorted({0.25, 0.5, 0.75, 0.9, cfg.flip, cfg.stop})}
    pair_level = cfg.flip if cfg.pair_level is None else cfg.pair_level
    pair = [[math.inf if s == t else math.exp(_crossing(pair_frac[:used, s, t].nan_to_num(0.0), log_r, pair_level))
             for t in range(k)] for s in range(k)]
    return {"radius": radius, "mean_log_radius": mean_log, "pair_radius": pair, "deltas": delta.cpu(), "images": n,
            "steps": used, "levels": levels, "stop_radius": levels[f"{cfg.stop:g}"], "log_radii": log_r.tolist(),
            "margins": margin[:used].T.tolist()}


def _margin(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row: ``logit_target - max_{j != target} logit_j``."""
    t = logits.gather(1, target[:, None])[:, 0]
    return t - logits.scatter(1, target[:, None], -math.inf).max(1).values


def margin_at(log_radii: list[float], margins: list[list[float]], radius: float) -> list[float]:
    """Per class, the mean margin its perturbation reached at ``radius`` (interpolated in log radius between the
    search's steps); a class whose search stopped before ``radius`` (it was reached: every later margin would be
    larger) keeps its last one, a lower bound."""
    lr, out = math.log(radius), []
    for m in margins:
        pts = [(a, b) for a, b in zip(log_radii, m, strict=True) if not math.isnan(b)]
        if not pts:
            out.append(math.nan)
            continue
        below = [p for p in pts if p[0] <= lr]
        above = [p for p in pts if p[0] > lr]
        if not below or not above:
            out.append((below or above)[-1 if below else 0][1])
            continue
        (a0, b0), (a1, b1) = below[-1], above[0]
        out.append(b0 + (lr - a0) / (a1 - a0) * (b1 - b0))
    return out
