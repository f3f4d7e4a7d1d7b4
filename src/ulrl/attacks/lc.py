"""Label-Consistent backdoor (Turner, Tsipras & Madry, 2019, "Label-consistent backdoor
attacks", arXiv:1912.02771): a clean-label attack that first makes the poisoned images hard.

Target-class training images are pushed away from their (correct) label by an L-inf PGD
adversarial perturbation computed against a clean surrogate model, so the natural features no
longer explain the label; then a small trigger is stamped on them: a 3x3 black-and-white
pattern in each of the four corners (mirrored so the four corners are symmetric), at full or
reduced amplitude. Labels are never changed. At test time the trigger alone (full amplitude,
as in the paper) is stamped on images of other classes.

Defaults: ``eps = 16`` on the 0-255 scale (the paper's larger L-inf budget; BackdoorBench's
``attack/lc.py`` loads the poisoned set named ``eps = 16``, its crafting script uses 8), ``amplitude = 1`` (BackdoorBench's
``reduced_amplitude: 1``, i.e. black/white corners), ``rate = 0.07`` of the whole training set
(70% of the target class on a balanced 10-class set; BackdoorBench's 0.1 poisons the whole
class, and on Fashion-MNIST that costs 7.6 points of clean accuracy, 0.82 vs 0.90, because
clean target-class images then lack the trigger the model relies on). Deviations: the surrogate is a briefly
trained clean model of the victim's architecture (the paper and BackdoorBench use an
adversarially trained one), and PGD takes ``pgd_steps = 10`` steps of ``2.5 * eps / steps``
(Madry's rule) instead of BackdoorBench's 100 steps of 1.5/255, to stay cheap on a CPU.

The fitted component is the quantised perturbation of each poisoned training image, saved as
the state tensors ``lc.index`` (which images) and ``lc.delta`` (int16 pixel offsets), so a
checkpoint re-creates the poisoned training set bit for bit; evaluation only needs the patch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import UserError
from .base import Attack, FitContext, register_attack
from .components import train_surrogate

# The paper's 3x3 corner pattern (+1 = white, -1 = black) for the top-left corner; the other
# corners carry its mirror images.
CORNER = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, 1.0]])


@register_attack
@dataclass
class LabelConsistent(Attack):
    """``eps``/``pgd_step``: L-inf budget and PGD step on the 0-255 scale (``pgd_step = 0``:
    ``2.5 * eps / pgd_steps``); ``amplitude``: training-time trigger amplitude in (0, 1]
    (the paper's "reduced amplitude"; the test-time trigger is always full amplitude);
    ``surrogate_epochs``/``surrogate_samples``: the clean surrogate's training budget."""

    name = "lc"
    clean_label = True
    fitted = True

    rate: float = 0.07
    eps: float = 16.0
    pgd_steps: int = 10
    pgd_step: float = 0.0
    amplitude: float = 1.0
    surrogate_epochs: int = 2
    surrogate_samples: int = 20000
    batch_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        self._index: torch.Tensor | None = None  # the fitted component (not part of the spec)
        self._delta: torch.Tensor | None = None
        if self.mode != "all2one":
            raise UserError("lc is a clean-label attack and only defines mode=all2one")
        if not 0.0 < self.eps <= 255.0:
            raise UserError(f"lc eps is an L-inf budget on the 0-255 scale in (0, 255], got {self.eps}")
        if not 0.0 < self.amplitude <= 1.0:
            raise UserError(f"lc amplitude must be in (0, 1], got {self.amplitude}")
        if self.pgd_steps < 0 or self.pgd_step < 0:
            raise UserError("lc pgd_steps and pgd_step must be >= 0")
        for key in ("surrogate_epochs", "surrogate_samples", "batch_size"):
            if getattr(self, key) < 1:
                raise UserError(f"lc {key} must be >= 1, got {getattr(self, key)}")

    # --- the trigger ---------------------------------------------------------------------
    @staticmethod
    def pattern(height: int, width: int) -> torch.Tensor:
        """(1, H, W) with the mirrored 3x3 pattern (+-1) in each corner and 0 elsewhere."""
        if min(height, width) < 6:
            raise UserError(f"lc's four 3x3 corner patches need images of at least 6x6 pixels, got {height}x{width}")
        p = torch.zeros(1, height, width)
        p[0, :3, :3] = CORNER
        p[0, :3, -3:] = CORNER.flip(1)
        p[0, -3:, :3] = CORNER.flip(0)
        p[0, -3:, -3:] = CORNER.flip(0).flip(1)
        return p

    def _stamp(self, x: torch.Tensor, amplitude: float) -> torch.Tensor:
        _, _, h, w = x.shape
        return (x + amplitude * self.pattern(h, w).to(x)).clamp(0, 1)

    def _require_fitted(self) -> None:
        if self._index is None or self._delta is None:
            raise UserError("lc's adversarial perturbations are not fitted; run prepare() on the training set "
                            "(`ulrl train` does) or load the checkpoint's attack tensors")

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """The test-time trigger: the four corner patterns at full amplitude (no perturbation)."""
        self._require_fitted()
        return self._stamp(x, 1.0)

    # --- the fitted component ------------------------------------------------------------
    def prepare(self, x: torch.Tensor, y: torch.Tensor, ctx: FitContext | None = None) -> None:
        """PGD (untargeted, away from the true label) on the target-class images to be poisoned."""
        idx = self.poison_indices(y)
        surrogate = train_surrogate(x, y, ctx, self.surrogate_epochs, self.surrogate_samples, desc="lc surrogate")
        device = torch.device(ctx.device if ctx else "cpu")
        surrogate.to(device)
        for p in surrogate.parameters():
            p.requires_grad_(False)
        eps = self.eps / 255.0
        step = (self.pgd_step / 255.0) if self.pgd_step else 2.5 * eps / max(self.pgd_steps, 1)
        deltas = []
        starts = range(0, len(idx), self.batch_size)
        for s in tqdm(starts, desc="lc pgd", disable=not (ctx and ctx.progress), leave=False, unit="batch"):
            xb = x[idx[s : s + self.batch_size]].float().div(255).to(device)
            yb = y[idx[s : s + self.batch_size]].to(device)
            adv = xb.clone()
            for _ in range(self.pgd_steps):
                adv.requires_grad_(True)
                loss = F.cross_entropy(surrogate(adv), yb)
                (grad,) = torch.autograd.grad(loss, adv)
                adv = (adv.detach() + step * grad.sign()).clamp(xb - eps, xb + eps).clamp(0, 1)
            q = (adv.detach() * 255).round().cpu().to(torch.int16)
            deltas.append(q - x[idx[s : s + self.batch_size]].to(torch.int16))
        bound = int(self.eps)
        delta = torch.cat(deltas) if deltas else torch.zeros(0, *x.shape[1:], dtype=torch.int16)
        self._index = idx.clone()
        self._delta = delta.clamp(-bound, bound).contiguous()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self._index is None or self._delta is None:
            return {}
        return {"lc.index": self._index.clone(), "lc.delta": self._delta.clone()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != {"lc.index", "lc.delta"}:
            raise UserError(f"the checkpoint's lc component has tensors {sorted(tensors)}, expected lc.index and "
                            "lc.delta; re-train with `ulrl train`")
        index, delta = tensors["lc.index"], tensors["lc.delta"]
        if index.ndim != 1 or delta.ndim != 4 or len(index) != len(delta):
            raise UserError("the checkpoint's lc component is malformed (index/delta shapes differ); re-train with `ulrl train`")
        self._index = index.to(torch.long).clone()
        self._delta = delta.to(torch.int16).clone()

    # --- poisoning -----------------------------------------------------------------------
    def poison_train(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Perturbed (stored PGD offsets) then stamped (``amplitude``) target-class images; labels kept."""
        self._require_fitted()
        idx = self.poison_indices(y)
        if not torch.equal(idx, self._index) or tuple(x.shape[1:]) != tuple(self._delta.shape[1:]):
            raise UserError("lc's perturbations were fitted on another training set (or another rate/seed/target); "
                            "run prepare() on this one")
        x = x.clone()
        perturbed = (x[idx].to(torch.int16) + self._delta).clamp(0, 255).float() / 255.0
        x[idx] = (self._stamp(perturbed, self.amplitude) * 255.0).round().to(torch.uint8)
        mask = torch.zeros(len(y), dtype=torch.bool)
        mask[idx] = True
        return x, y.clone(), mask
