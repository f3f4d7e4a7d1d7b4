"""The attack zoo on one dataset: one poisoned model per attack (plus a clean one), ULRL on each,
a table for ``docs/attacks.md`` and a picture grid of every trigger.

It is a benchmark grid (attacks x ``ulrl``) run with :mod:`ulrl.bench`, so it resumes, and its
models can be shared with a larger grid in the same results directory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .attacks import ATTACKS, build_attack
from .bench import Grid, ModelJob, collect, run_grid
from .checkpoints import atomic_write, load_checkpoint, read_meta
from .data import load_dataset
from .errors import UserError

BEGIN, END = "<!-- zoo-table:begin -->", "<!-- zoo-table:end -->"


def zoo_grid(dataset: str, arch: str, attacks: list[str] | None, seed: int, epochs: int, defense: str = "ulrl",
             data_dir: str | None = None) -> Grid:
    names = attacks or sorted(ATTACKS)
    return Grid(datasets=[dataset], data_dirs={dataset: data_dir} if data_dir else {}, models=[arch],
                attacks=["none", *[a for a in names if a != "none"]], defenses=[defense], seeds=[seed], epochs=epochs)


def zoo_rows(root: str | Path, grid: Grid) -> list[dict[str, Any]]:
    """One row per attack: the poisoned model's numbers and ULRL's before/after."""
    cells = {(r["attack"], r["seed"]): r for r in collect(root) if r["dataset"] == grid.datasets[0]
             and r["model"] == grid.models[0] and r["defense"] == grid.defense_specs[0].label}
    rows = []
    for a in grid.attacks:
        job = ModelJob(grid.datasets[0], grid.models[0], None if a == "none" else a, grid.seeds[0])
        path = job.path(Path(root))
        if not path.with_suffix(".json").is_file():
            continue
        meta = read_meta(path)
        spec = meta.get("attack") or {}
        cell = cells.get((a, grid.seeds[0]))
        cls = ATTACKS.get(spec.get("name", ""))
        rows.append({
            "attack": a,
            "rate": spec.get("rate"),
            "clean_label": bool(cls and cls.clean_label),
            "poisoned_samples": meta.get("poisoned_samples"),
            **{k: meta["test_metrics"].get(k) for k in ("acc", "asr", "ra")},
            "train_seconds": meta.get("train_seconds"),
            "after": cell["after"] if cell else None,
            "der": cell["der"] if cell else None,
            "flagged": cell["report"].get("flagged") if cell else None,
            "defense_seconds": cell["defense_seconds"] if cell else None,
        })
    return rows


def table_markdown(rows: list[dict[str, Any]], defense: str = "ulrl") -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    def secs(v):
        return "-" if v is None else f"{v:.0f}"

    clean = next((r["acc"] for r in rows if r["attack"] == "none"), None)
    lines = [f"| attack | poison rate | clean ACC % | ΔACC vs clean (points) | ASR % | RA % | train s | "
             f"{defense}: ACC % | {defense}: ASR % | {defense}: RA % | DER % | flagged | {defense} s |",
             "|---" * 13 + "|"]
    for r in rows:
        rate = "-" if r["rate"] is None else f"{r['rate']:g}" + (" (clean-label)" if r["clean_label"] else "")
        d_acc = "-" if clean is None or r["attack"] == "none" else f"{100 * (r['acc'] - clean):+.1f}"
        after = r["after"] or {}
        lines.append(
            f"| {r['attack']} | {rate} | {pct(r['acc'])} | {d_acc} | {pct(r['asr'])} | {pct(r['ra'])} | "
            f"{secs(r['train_seconds'])} | {pct(after.get('acc'))} | {pct(after.get('asr'))} | {pct(after.get('ra'))} | "
            f"{pct(r['der'])} | {r['flagged'] if r['flagged'] is not None else '-'} | "
            f"{secs(r['defense_seconds'])} |")
    return "\n".join(lines)


def write_table(doc: str | Path, table: str, command: str) -> None:
    """Put ``table`` (with the command that made it) between the zoo markers of ``doc``."""
    doc = Path(doc)
    block = f"{BEGIN}\nProduced by:\n\n```bash\n{command}\n```\n\n{table}\n{END}"
    text = doc.read_text() if doc.is_file() else "# Attacks\n\n"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write(doc, lambda tmp: Path(tmp).write_text(text))


def trigger_grid(root: str | Path, grid: Grid, path: str | Path, index: int = 0) -> Path:
    """A picture: for each attack, a clean test image, its triggered copy and the amplified difference.

    Fitted triggers are taken from the zoo's checkpoints, so the picture shows the very trigger tested.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = load_dataset(grid.datasets[0], grid.data_dirs.get(grid.datasets[0]))
    attacks = [a for a in grid.attacks if a != "none"]
    # a test image that is not of the (default) target class, so every attack applies
    x = data.test_x[(data.test_y != 0).nonzero()[index, 0]].unsqueeze(0)
    fig, axes = plt.subplots(3, len(attacks), figsize=(1.25 * len(attacks), 4.1), squeeze=False)
    for j, a in enumerate(attacks):
        job = ModelJob(grid.datasets[0], grid.models[0], a, grid.seeds[0])
        if not job.path(Path(root)).is_file():
            raise UserError(f"no trained model for attack {a} in {root}; run the zoo first")
        _, meta, tensors = load_checkpoint(job.path(Path(root)))
        attack = build_attack(meta["attack"], data.num_classes)
        attack.load_state_tensors(tensors)
        clean = x.float() / 255
        trig = attack.trigger_uint8(x).float() / 255
        diff = (trig - clean).abs()
        gain = 1.0 / max(diff.max().item(), 1e-6)
        for i, (img, title) in enumerate(((clean, "clean"), (trig, a), (diff * gain, f"|diff| x{gain:.0f}"))):
            ax = axes[i, j]
            show = img[0].permute(1, 2, 0).squeeze(-1).clamp(0, 1).numpy()
            ax.imshow(show, cmap="gray" if show.ndim == 2 else None, vmin=0, vmax=1)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return Path(path)


def run_zoo(out: str | Path, doc: str | Path | None, image: str | Path | None, dataset: str = "fashion-mnist",
            arch: str = "cnn-small", attacks: list[str] | None = None, seed: int = 0, epochs: int = 5,
            data_dir: str | None = None, command: str = "", executor: str = "local",
            progress: bool = True) -> list[dict[str, Any]]:
    grid = zoo_grid(dataset, arch, attacks, seed, epochs, data_dir=data_dir)
    summary = run_grid(grid, out, executor=executor, progress=progress)
    if summary.failures:
        raise UserError("some attacks failed: " + "; ".join(summary.failures) + f" (tracebacks in {out}/**/*.error.txt)")
    rows = zoo_rows(out, grid)
    if doc:
        write_table(doc, table_markdown(rows), command)
    if image:
        trigger_grid(out, grid, image)
    return rows
