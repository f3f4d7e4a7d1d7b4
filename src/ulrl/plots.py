"""Plots of a defense report: per-neuron scores with the threshold, per-epoch curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .checkpoints import atomic_write  # noqa: E402
from .defenses.base import DefenseReport  # noqa: E402


def _save(fig, path: str | Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


def plot_scores(report: DefenseReport, path: str | Path) -> None:
    """Bar chart of per-neuron weight-change scores, flagged neurons in red, with the score
    above which the MAD test flags a neuron marked."""
    import statistics

    scores, z = report.scores, report.z_scores
    fig, ax = plt.subplots(figsize=(6, 3.2))
    colors = ["tab:red" if i in report.flagged else "tab:blue" for i in range(len(scores))]
    ax.bar(range(len(scores)), scores, color=colors)
    if scores:
        med = statistics.median(scores)
        mad = statistics.median(abs(s - med) for s in scores)
        thr = report.config.get("mad_threshold", 3.5)
        ax.axhline(med + thr * 1.4826 * mad, color="tab:red", ls="--", lw=1, label=f"MAD threshold (z = {thr})")
        ax.axhline(med, color="gray", ls=":", lw=1, label="median")
        for rank, i in enumerate(report.flagged):
            second = rank > 0 and report.second_look_z_scores and z[i] <= thr
            text = f"2nd look\nz={report.second_look_z_scores[i]:.1f}" if second else f"z={z[i]:.1f}"
            ax.annotate(text, (i, scores[i]), ha="center", va="bottom", fontsize=8)
        ax.legend(fontsize=8)
    ax.set_xlabel(f"neuron of {report.layer}")
    ax.set_ylabel("sum |W_after - W_before|")
    ax.set_title("ULRL: weight change during unlearning")
    _save(fig, path)


def plot_curves(report: DefenseReport, path: str | Path) -> None:
    """Accuracy (and ASR, when the harness monitored it) per epoch of both phases."""
    phases = [(report.unlearn_history, "unlearning"), (report.relearn_history, "relearning")]
    if report.defense != "ulrl":  # other defenses: one panel, their final fine-tuning
        phases = [(report.relearn_history, f"{report.defense}: fine-tuning")]
    fig, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 3.2), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, (hist, title) in zip(axes, phases, strict=True):
        epochs = [r["epoch"] for r in hist]
        for key, label in (("train_acc", "clean-set accuracy (running)"), ("heldout_acc", "held-out accuracy"),
                           ("test_acc", "test ACC"), ("test_asr", "test ASR")):
            if hist and key in hist[0]:
                ax.plot(epochs, [r[key] for r in hist], marker="o", ms=3, label=label)
        if title == "unlearning":
            ax.axhline(report.config.get("clean_threshold", 0.2), color="gray", ls=":", lw=1, label="clean threshold")
        if title == "relearning" and report.selected_epoch:
            ax.axvline(report.selected_epoch, color="gray", ls="--", lw=1, label="selected epoch")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylim(-0.02, 1.02)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes, color="gray")
    axes[0].set_ylabel("fraction")
    _save(fig, path)


def plot_scan(result, path: str | Path) -> None:
    """Per-class evidence of a scan: each signal's -log10 p (and the reference test's, if a profile applied), the
    combined evidence, the verdict's line."""
    import math

    k = result.num_classes
    series = [(name, ev.p) for name, ev in result.signals.items()]
    if result.reference:
        series.append(("reference test", result.reference["p"]))
    names = [n for n, _ in series]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * k), 3.4))
    width = 0.8 / (len(names) + 1)
    for i, (name, ps) in enumerate(series):
        ax.bar([c + (i - len(names) / 2) * width for c in range(k)], [-math.log10(max(p, 1e-300)) for p in ps],
               width, label=name, alpha=0.6, hatch="//" if name == "reference test" else None)
    colors = ["tab:red" if c in result.suspected else "black" for c in range(k)]
    ax.bar([c + len(names) / 2 * width for c in range(k)], result.combined, width, color=colors, label="combined")
    ax.axhline(-math.log10(result.alpha / k), color="tab:red", ls="--", lw=1, label=f"alpha/K (alpha = {result.alpha})")
    ax.set_xticks(range(k))
    ax.set_xlabel("class")
    ax.set_ylabel("-log10 p (per class)")
    ax.set_title(f"scan: {result.verdict} (p = {result.p_value:.2g})"
                 + (f", suspected {result.suspected}" if result.suspected else ""))
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)
