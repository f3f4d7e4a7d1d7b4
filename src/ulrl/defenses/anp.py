"""ANP: Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021, "Adversarial Neuron Perturbations
Expose Backdoor Neurons").

A backdoored network is unusually sensitive to small perturbations of some of its neurons: a
perturbation of a few neurons is enough to make it predict the backdoor's target even on clean
images. ANP finds those neurons with the clean set alone:

1. **Masks and perturbations.** Every BatchNorm channel ``k`` (a "neuron") gets a mask
   ``m_k`` in [0, 1] (initially 1) and two multiplicative perturbations ``d_k``, ``e_k`` in
   [-eps, eps]; the channel's affine transform ``gamma_k * xhat + beta_k`` becomes
   ``(m_k + d_k) * gamma_k * xhat + (1 + e_k) * beta_k``. Here this is a forward hook on each
   BatchNorm layer (``out -> (m + d) * (out - beta) + (1 + e) * beta``), no model file changes.
2. **Optimise the masks under adversarial neuron perturbation.** Each iteration draws a
   mini-batch, initialises the perturbations uniformly in [-eps, eps], takes ``anp_steps``
   signed-gradient ascent steps (step ``eps / anp_steps``) on the cross-entropy, then one SGD
   step on the masks for ``alpha * CE(unperturbed) + (1 - alpha) * CE(perturbed)``, clipping the
   masks to [0, 1]. Backdoor neurons, whose perturbation the loss is most sensitive to, end with
   small masks.
3. **Prune.** In the ORIGINAL model, the channels whose mask is <= ``prune_threshold`` (or the
   ``prune_fraction`` with the smallest masks) are pruned: their BatchNorm weight ``gamma`` is
   set to 0 (the reference prunes the weight only, so the channel outputs its constant bias
   ``beta``; ``prune_bias=True`` zeroes the bias as well).

Defaults: the authors' code (``csdongxian/ANP_backdoor``) and BackdoorBench's ``anp`` config:
eps 0.4, 1 perturbation step, alpha 0.2, mask lr 0.2 (SGD, momentum 0.9), batch 128 drawn with
replacement from the (augmented) clean set, the network in training mode (BatchNorm on batch
statistics), pruning by threshold 0.2. The reference runs 2000 iterations (the ``paper``
preset: about 7 minutes of one CPU core for a 600-image Fashion-MNIST cnn-small); the
``default`` preset runs 200, which keeps that case under a minute (see docs/defenses.md for
what this costs in ASR).
As in the reference code, the perturbations are not clipped after the ascent step (a random
start in [-eps, eps] plus one step of size eps can reach 2 * eps); ``clip_noise=True`` projects
them back onto [-eps, eps].

The BatchNorm mask machinery (:class:`BNMasks`, :func:`prune_channels`) is shared with RNP.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.transforms import augment, to_float
from ..errors import UserError
from .base import CommonConfig, DefenseReport, Monitor, register_defense


# --- BatchNorm channel masks (shared with RNP) ---------------------------------------------------
class BNMasks:
    """Per-channel masks and multiplicative perturbations on every affine BatchNorm of ``model``.

    Attaching registers a forward hook on each BatchNorm that rewrites its output
    ``gamma * xhat + beta`` as ``(mask + noise_w) * gamma * xhat + (1 + noise_b) * beta`` (the
    perturbations only while :attr:`perturbed` is True). :meth:`remove` detaches the hooks.
    """

    def __init__(self, model: nn.Module, defense: str) -> None:
        self.layers: list[tuple[str, nn.modules.batchnorm._BatchNorm]] = [
            (name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine
        ]
        if not self.layers:
            raise UserError(f"{defense} masks BatchNorm channels but the model has no affine BatchNorm layer; "
                            "use a model with BatchNorm (e.g. cnn-small, preact-resnet18, vgg19-bn) or another defense")
        device = self.layers[0][1].weight.device
        self.masks = [torch.ones(m.num_features, device=device, requires_grad=True) for _, m in self.layers]
        self.noise_w = [torch.zeros(m.num_features, device=device, requires_grad=True) for _, m in self.layers]
        self.noise_b = [torch.zeros(m.num_features, device=device, requires_grad=True) for _, m in self.layers]
        self.perturbed = False
        self._handles = [m.register_forward_hook(self._hook(i)) for i, (_, m) in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(module: nn.Module, _inputs, out: torch.Tensor) -> torch.Tensor:
            shape = (1, -1) + (1,) * (out.dim() - 2)
            beta = module.bias.view(shape)
            coeff_w = self.masks[i] + self.noise_w[i] if self.perturbed else self.masks[i]
            shifted = beta * (1.0 + self.noise_b[i]).view(shape) if self.perturbed else beta
            return coeff_w.view(shape) * (out - beta) + shifted

        return hook

    @property
    def noises(self) -> list[torch.Tensor]:
        return self.noise_w + self.noise_b

    @torch.no_grad()
    def reset_noise(self, eps: float, generator: torch.Generator) -> None:
        """Draw the perturbations uniformly in [-eps, eps]."""
        for n in self.noises:
            n.copy_((torch.rand(n.shape, generator=generator) * 2 - 1).mul_(eps).to(n.device))

    @torch.no_grad()
    def clip_masks(self) -> None:
        for m in self.masks:
            m.clamp_(0.0, 1.0)

    def values(self) -> torch.Tensor:
        """All mask values, layer after layer, as one flat CPU tensor."""
        return torch.cat([m.detach().cpu() for m in self.masks])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def select_pruned(values: torch.Tensor, by: str, threshold: float, fraction: float) -> torch.Tensor:
    """Flat indices of the channels to prune: mask <= ``threshold``, or the ``fraction`` of
    channels with the smallest masks."""
    if by == "threshold":
        return (values <= threshold).nonzero().flatten()
    if by == "fraction":
        k = int(round(fraction * len(values)))
        return values.argsort()[:k].sort().values
    raise UserError(f"prune_by must be 'threshold' or 'fraction', got {by!r}")


@torch.no_grad()
def prune_channels(model: nn.Module, layer_names: list[str], sizes: list[int], flat: torch.Tensor,
                   bias: bool = False) -> dict[str, list[int]]:
    """Zero the BatchNorm weight (and, if ``bias``, the bias) of the channels at flat indices
    ``flat`` (numbered layer after layer, as :meth:`BNMasks.values`). Returns {layer: [channels]}."""
    modules = dict(model.named_modules())
    pruned: dict[str, list[int]] = {}
    start = 0
    chosen = set(flat.tolist())
    for name, size in zip(layer_names, sizes, strict=True):
        idx = [i - start for i in range(start, start + size) if i in chosen]
        if idx:
            bn = modules[name]
            bn.weight[idx] = 0.0
            if bias:
                bn.bias[idx] = 0.0
            pruned[name] = idx
        start += size
    return pruned


def mask_summary(masks: BNMasks, flat: torch.Tensor) -> dict:
    """JSON-friendly statistics of the learned masks and the pruned channels."""
    values = masks.values()
    q = torch.quantile(values, torch.tensor([0.01, 0.05, 0.25, 0.5]))
    per_layer = {name: [round(v, 4) for v in m.detach().cpu().tolist()] for (name, _), m in zip(masks.layers, masks.masks, strict=True)}
    return {
        "num_neurons": len(values),
        "num_pruned": len(flat),
        "mask_min": values.min().item(),
        "mask_mean": values.mean().item(),
        "mask_quantiles": {"1%": q[0].item(), "5%": q[1].item(), "25%": q[2].item(), "50%": q[3].item()},
        "masks": per_layer,
    }


# --- ANP ------------------------------------------------------------------------------------------
@dataclass
class PruneConfig(CommonConfig):
    """How ANP and RNP prune the original model's BatchNorm channels from their learned masks."""

    prune_by: str = "threshold"  # "threshold" | "fraction"
    prune_threshold: float = 0.2
    prune_fraction: float = 0.05
    prune_bias: bool = False  # also zero the BatchNorm bias of pruned channels (reference: weight only)


@dataclass
class ANPConfig(PruneConfig):
    # Mask optimisation under adversarial neuron perturbation
    anp_eps: float = 0.4  # bound of the multiplicative neuron perturbations
    anp_steps: int = 1  # signed-gradient ascent steps on the perturbations per iteration
    anp_alpha: float = 0.2  # weight of the unperturbed loss (1 - alpha on the perturbed one)
    clip_noise: bool = False  # project the perturbations onto [-eps, eps] after each step (reference: no)
    mask_lr: float = 0.2
    mask_momentum: float = 0.9
    iterations: int = 200  # reference: 2000 (the "paper" preset)
    eval_every: int = 50  # iterations between two records (and monitor calls)

    def __post_init__(self) -> None:
        if self.anp_eps < 0 or not 0.0 <= self.anp_alpha <= 1.0:
            raise UserError(f"anp_eps must be >= 0 and anp_alpha in [0, 1], got {self.anp_eps}, {self.anp_alpha}")
        if self.iterations < 1 or self.anp_steps < 1 or self.eval_every < 1 or self.batch_size < 1:
            raise UserError("iterations, anp_steps, eval_every and batch_size must be >= 1")
        if self.prune_by not in ("threshold", "fraction"):
            raise UserError(f"prune_by must be 'threshold' or 'fraction', got {self.prune_by!r}")
        if not 0.0 <= self.prune_fraction <= 1.0:
            raise UserError(f"prune_fraction must be in [0, 1], got {self.prune_fraction}")


PRESETS: dict[str, dict] = {
    "default": {},
    "paper": {"iterations": 2000, "eval_every": 500},  # the reference's iteration count
}


def sample_batch(x: torch.Tensor, y: torch.Tensor, batch_size: int, aug: bool, hflip: bool,
                 generator: torch.Generator, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A mini-batch drawn with replacement (as the reference's RandomSampler), augmented like fit's."""
    idx = torch.randint(len(y), (batch_size,), generator=generator)
    xb = to_float(x[idx])
    if aug:
        xb = augment(xb, hflip=hflip, generator=generator)
    return xb.to(device), y[idx].to(device)


def optimise_masks(model: nn.Module, masks: BNMasks, x: torch.Tensor, y: torch.Tensor, cfg: ANPConfig,
                   monitor: Monitor | None, progress: bool) -> list[dict]:
    """ANP's mask optimisation (the model's own weights are frozen). Returns the records."""
    gen = torch.Generator().manual_seed(cfg.seed)
    mask_opt = torch.optim.SGD(masks.masks, lr=cfg.mask_lr, momentum=cfg.mask_momentum)
    step = cfg.anp_eps / cfg.anp_steps
    history: list[dict] = []
    loss_sum, correct, seen, t0 = 0.0, 0, 0, time.perf_counter()
    model.train()  # the reference optimises the masks with BatchNorm on batch statistics
    for it in tqdm(range(1, cfg.iterations + 1), desc="ANP masks", disable=not progress, leave=False):
        xb, yb = sample_batch(x, y, cfg.batch_size, cfg.augment, cfg.hflip, gen, cfg.device)
        if cfg.anp_eps > 0:
            # 1. adversarial neuron perturbation: signed-gradient ascent on the loss
            masks.reset_noise(cfg.anp_eps, gen)
            masks.perturbed = True
            for _ in range(cfg.anp_steps):
                grads = torch.autograd.grad(F.cross_entropy(model(xb), yb), masks.noises)
                with torch.no_grad():
                    for n, g in zip(masks.noises, grads, strict=True):
                        n.add_(step * g.sign())
                        if cfg.clip_noise:
                            n.clamp_(-cfg.anp_eps, cfg.anp_eps)
            loss_rob = F.cross_entropy(model(xb), yb)
        else:
            loss_rob = torch.zeros((), device=xb.device)
        # 2. mask step on alpha * natural loss + (1 - alpha) * perturbed loss
        masks.perturbed = False
        out = model(xb)
        loss_nat = F.cross_entropy(out, yb)
        loss = cfg.anp_alpha * loss_nat + (1 - cfg.anp_alpha) * loss_rob
        mask_opt.zero_grad(set_to_none=True)
        loss.backward()
        mask_opt.step()
        masks.clip_masks()
        loss_sum += loss.item() * len(yb)
        correct += (out.argmax(1) == yb).sum().item()
        seen += len(yb)
        if it % cfg.eval_every == 0 or it == cfg.iterations:
            record = {"epoch": len(history) + 1, "iteration": it, "loss": loss_sum / seen, "train_acc": correct / seen,
                      "mask_mean": masks.values().mean().item(), "seconds": time.perf_counter() - t0}
            if monitor is not None:  # the masked (unperturbed) model
                record.update(monitor(model))
                model.train()
            history.append(record)
            loss_sum, correct, seen, t0 = 0.0, 0, 0, time.perf_counter()
    return history


@register_defense("anp", ANPConfig, PRESETS)
def anp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: ANPConfig | None = None,
        monitor: Monitor | None = None, progress: bool = True) -> tuple[nn.Module, DefenseReport]:
    """Repair ``model`` with ANP using clean images ``x`` and labels ``y``; returns (model, report)."""
    cfg = config or ANPConfig()
    if len(y) == 0:
        raise UserError("the clean set is empty; give at least one clean image per class")
    report = DefenseReport(defense="anp", config=asdict(cfg))
    t0 = time.perf_counter()
    work = copy.deepcopy(model).to(cfg.device).requires_grad_(False)
    masks = BNMasks(work, "ANP")
    report.relearn_history = optimise_masks(work, masks, x, y, cfg, monitor, progress)
    masks.remove()
    report.seconds["masks"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    values = masks.values()
    flat = select_pruned(values, cfg.prune_by, cfg.prune_threshold, cfg.prune_fraction)
    repaired = copy.deepcopy(model).to(cfg.device)
    names, sizes = [n for n, _ in masks.layers], [m.num_features for _, m in masks.layers]
    pruned = prune_channels(repaired, names, sizes, flat, bias=cfg.prune_bias)
    report.layer = ",".join(pruned)
    report.extra = {"pruned": pruned, **mask_summary(masks, flat)}
    if not len(flat):
        report.notes.append(f"no mask fell to the pruning threshold {cfg.prune_threshold}: the model is unchanged")
    report.seconds["prune"] = time.perf_counter() - t0
    report.seconds["total"] = report.seconds["masks"] + report.seconds["prune"]
    return repaired.eval(), report


__all__ = ["ANPConfig", "BNMasks", "PRESETS", "anp", "mask_summary", "optimise_masks", "prune_channels",
           "sample_batch", "select_pruned"]
