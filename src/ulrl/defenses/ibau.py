"""I-BAU: Implicit Backdoor Adversarial Unlearning (Zeng, Chen, Park, Mao, Jin & Jia, ICLR 2022,
"Adversarial Unlearning of Backdoors via Implicit Hypergradient").

Backdoor removal as a min-max problem on the clean set::

    min_theta  L_outer(delta*(theta), theta),   delta*(theta) = argmin_delta L_inner(delta, theta)
    L_inner(delta, theta) = -CE(f_theta(x + delta), y) + reg * ||delta||^2

where ``delta`` is ONE universal perturbation shared by every image (the stand-in for an unknown
trigger). Each round:

1. **Inner maximisation.** Starting from zero, one pass over the clean set with SGD (lr
   ``inner_lr``) on ``-CE(f(x + delta), f(x)) + reg * ||delta||^2`` (the model's own predictions
   as labels), then optionally a projection onto the L2 ball of radius ``pert_norm``.
2. **Outer minimisation with the implicit hypergradient.** For each mini-batch, the outer loss
   is the cross-entropy of the batch in which a fraction ``portion`` of the images carries
   ``delta``. ``delta*`` depends on ``theta``, so its gradient is the implicit hypergradient
   ``dL_o/dtheta + (dPhi/dtheta)^T v``, where ``Phi(delta, theta) = delta - fp_lr * dL_inner/ddelta``
   is the fixed-point map of the inner problem and ``v`` solves ``v = (dPhi/ddelta)^T v + dL_o/ddelta``,
   approximated by ``K`` fixed-point iterations (Grazzi et al. 2020, as the reference's
   ``hypergrad.fixed_point``).

How it is wired into the one training loop: each round is one epoch of :func:`ulrl.train.fit`.
Its ``batch_hook`` stamps ``delta`` on the chosen images (``delta`` requires grad, so
``dL_o/ddelta`` comes from the logits fit computes anyway); its ``penalty`` runs the K fixed-point
iterations (gradients with respect to ``delta`` only) and returns ``<Phi(delta, theta), v>``
with ``v`` detached, whose gradient with respect to ``theta`` is exactly the second term of the
hypergradient. fit's backward pass on ``CE + penalty`` therefore leaves the implicit
hypergradient in ``.grad`` and its optimiser (Adam) takes the step. ``on_epoch`` recomputes
``delta`` for the next round. The model is kept in eval mode (BatchNorm statistics and dropout
frozen), as the reference does.

Defaults: the authors' code (``YiZeng623/I-BAU``, ``defense.py``): Adam lr 0.001, batch 100,
5 rounds, K = 5, inner SGD lr 10 with regulariser 0.001, fixed-point step 0.1, ``portion`` 0.01
of each batch perturbed in the outer loss, no L2 projection (it is commented out there), no
augmentation. The ``backdoorbench`` preset is BackdoorBench's ``i-bau`` config (Adam lr 1e-4,
batch 256, augmentation on). As in the reference, ``delta`` (and so ``inner_lr``, ``reg`` and ``pert_norm``)
is in units of the NORMALISED input: a model built by :func:`ulrl.models.create_model` carries its
normalisation, and the pixel perturbation is ``std * delta`` (``std`` = 1 for other models).
Deviations: the reference's inner loss in the fixed-point map always uses the first mini-batch of
the clean set, here it uses the current one; the reference perturbs ``int(portion * batch)``
images of a batch, which is 0 for batches under 100 images (no hypergradient at all), here at
least one (the same for the default batch of 100).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import to_float
from ..errors import UserError
from ..models import NormalizedModel
from ..train import TrainConfig, fit
from .base import CommonConfig, DefenseReport, Monitor, register_defense


@dataclass
class IBAUConfig(CommonConfig):
    # Outer minimisation (the model's weights, through fit)
    lr: float = 0.001
    optimizer: str = "adam"
    weight_decay: float = 0.0
    n_rounds: int = 5
    K: int = 5  # fixed-point iterations of the implicit hypergradient
    fp_lr: float = 0.1  # step of the inner fixed-point map Phi(delta) = delta - fp_lr * grad L_inner
    portion: float = 0.01  # fraction of each batch that carries delta in the outer loss (at least 1 image)
    # Inner maximisation (the universal perturbation)
    inner_lr: float = 10.0
    reg: float = 0.001  # weight of ||delta||^2 in the inner loss
    pert_norm: float = 0.0  # L2 radius delta is projected onto after the inner pass (0: none, as the reference)
    # Shared settings
    batch_size: int = 100
    augment: bool = False

    def __post_init__(self) -> None:
        if self.n_rounds < 0 or self.K < 0 or self.batch_size < 1:
            raise UserError("n_rounds and K must be >= 0 and batch_size >= 1")
        if not 0.0 <= self.portion <= 1.0:
            raise UserError(f"portion must be in [0, 1], got {self.portion}")
        if self.optimizer not in ("adam", "sgd"):
            raise UserError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")


PRESETS: dict[str, dict] = {
    "default": {},  # the authors' code; it fits the CPU budget as it is
    "paper": {},
    "backdoorbench": {"lr": 1e-4, "batch_size": 256, "augment": True},
}


def input_scale(model: nn.Module, channels: int, device: str) -> torch.Tensor:
    """Per-channel std of the model's input normalisation (1 when it has none), shape (1, C, 1, 1):
    a perturbation ``delta`` of the normalised input is ``scale * delta`` in pixels."""
    std = getattr(model, "std", None)
    if isinstance(model, NormalizedModel) and isinstance(std, torch.Tensor):
        return std.detach().to(device).reshape(1, -1, 1, 1)
    return torch.ones(1, channels, 1, 1, device=device)


def inner_max(model: nn.Module, x: torch.Tensor, cfg: IBAUConfig, gen: torch.Generator, scale: torch.Tensor) -> torch.Tensor:
    """One pass of SGD over the clean set for the universal perturbation that most changes the
    model's predictions (I-BAU's inner maximisation). Returns delta (normalised units), shape (1, C, H, W)."""
    model.eval()
    delta = torch.zeros((1, *x.shape[1:]), device=cfg.device, requires_grad=True)
    order = torch.randperm(len(x), generator=gen)
    for i in range(0, len(x), cfg.batch_size):
        xb = to_float(x[order[i : i + cfg.batch_size]]).to(cfg.device)
        with torch.no_grad():
            own = model(xb).argmax(1)
        loss = -F.cross_entropy(model(xb + scale * delta), own) + cfg.reg * delta.pow(2).sum()
        grad = torch.autograd.grad(loss, delta)[0]
        with torch.no_grad():
            delta -= cfg.inner_lr * grad  # plain SGD step on delta only
    delta = delta.detach()
    if cfg.pert_norm > 0:
        delta = delta * min(1.0, cfg.pert_norm / (delta.norm().item() + 1e-12))
    return delta


class Hypergradient:
    """The batch hook and penalty that make fit's gradient I-BAU's implicit hypergradient."""

    def __init__(self, model: nn.Module, cfg: IBAUConfig, gen: torch.Generator, scale: torch.Tensor) -> None:
        self.model, self.cfg, self.gen, self.scale = model, cfg, gen, scale
        self.delta = torch.zeros(1)
        self.norms: list[float] = []
        self._x: torch.Tensor | None = None
        self._d: torch.Tensor | None = None

    def batch_hook(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stamp delta (as a leaf requiring grad) on ``portion`` of the batch."""
        self.model.eval()  # the reference unlearns in eval mode (BatchNorm and dropout frozen)
        self._x = xb
        self._d = self.delta.clone().requires_grad_(True)
        k = max(1, int(len(xb) * self.cfg.portion)) if self.cfg.portion > 0 else 0
        chosen = torch.zeros(len(xb), 1, 1, 1, device=xb.device)
        chosen[torch.randperm(len(xb), generator=self.gen)[:k].to(xb.device)] = 1.0
        return xb + chosen * self.scale * self._d, yb

    def penalty(self, _xb: torch.Tensor, out: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """``<Phi(delta, theta), v>`` with v from K fixed-point iterations (v detached)."""
        cfg, d = self.cfg, self._d
        g_outer = torch.autograd.grad(F.cross_entropy(out, yb), d, retain_graph=True, allow_unused=True)[0]
        if g_outer is None:  # no image of this batch carries delta
            g_outer = torch.zeros_like(d)
        inner = -F.cross_entropy(self.model(self._x + self.scale * d), yb) + cfg.reg * d.pow(2).sum()
        g_inner = torch.autograd.grad(inner, d, create_graph=True)[0]
        mapped = d - cfg.fp_lr * g_inner  # the fixed-point map Phi(delta, theta)
        v = torch.zeros_like(d)
        for _ in range(cfg.K):
            v = torch.autograd.grad(mapped, d, grad_outputs=v, retain_graph=True)[0] + g_outer
        return (mapped * v.detach()).sum()


@register_defense("i-bau", IBAUConfig, PRESETS)
def ibau(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: IBAUConfig | None = None,
         monitor: Monitor | None = None, progress: bool = True) -> tuple[nn.Module, DefenseReport]:
    """Repair ``model`` with I-BAU using clean images ``x`` and labels ``y``; returns (model, report)."""
    cfg = config or IBAUConfig()
    if len(y) == 0:
        raise UserError("the clean set is empty; give at least one clean image per class")
    report = DefenseReport(defense="i-bau", config=asdict(cfg))
    model = copy.deepcopy(model).to(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    scale = input_scale(model, x.shape[1], cfg.device)
    hyper = Hypergradient(model, cfg, gen, scale)
    timing = {"inner": 0.0}

    def new_delta() -> None:
        t0 = time.perf_counter()
        hyper.delta = inner_max(model, x, cfg, gen, scale)
        hyper.norms.append(hyper.delta.norm().item())
        timing["inner"] += time.perf_counter() - t0

    def next_round(epoch: int, record: dict) -> None:
        record["delta_l2"] = hyper.norms[-1]
        if monitor is not None:
            record.update(monitor(model))
        if epoch < cfg.n_rounds:
            new_delta()

    t0 = time.perf_counter()
    if cfg.n_rounds:
        new_delta()
    tc = TrainConfig(epochs=cfg.n_rounds, optimizer=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                     batch_size=cfg.batch_size, schedule="constant", freeze_bn=True, augment=cfg.augment,
                     hflip=cfg.hflip, seed=cfg.seed, device=cfg.device)
    hist = fit(model, x, y, tc, batch_hook=hyper.batch_hook, penalty=hyper.penalty, on_epoch=next_round,
               desc="I-BAU", progress=progress)
    report.relearn_history = hist.epochs
    report.seconds["total"] = time.perf_counter() - t0
    report.seconds["inner"] = timing["inner"]
    report.seconds["outer"] = report.seconds["total"] - timing["inner"]
    report.extra = {"delta_l2_per_round": hyper.norms}
    return model.eval(), report


__all__ = ["Hypergradient", "IBAUConfig", "PRESETS", "ibau", "inner_max", "input_scale"]
