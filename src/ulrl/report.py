"""Tables and plots of a benchmark results directory (``ulrl report RESULTS_DIR``).

Everything here is computed from the cell files alone (``bench.collect``): per dataset/model a
Markdown and a CSV table (rows attacks, columns defenses, cells ACC/ASR/RA, a DER table, a mean
row), a per-defense summary, and three plots: ASR versus ACC per defense, DER per defense per
attack, and defense time per defense. Values over several seeds are averaged.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from .checkpoints import atomic_write, ensure_dir

NO_DEFENSE = "no defense"


def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def aggregate(records: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """Mean metrics per (dataset, model, clean_ratio, attack, defense) over seeds.

    The poisoned model's own numbers (``before``) appear as defense ``no defense``.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        base = (r["dataset"], r["model"], r["clean_ratio"], r["attack"])
        groups[base + (r["defense"],)].append(r)
    out: dict[tuple, dict[str, Any]] = {}
    befores: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for key, rs in groups.items():
        out[key] = {
            "acc": _mean([r["after"]["acc"] for r in rs]),
            "asr": _mean([r["after"].get("asr") for r in rs]),
            "ra": _mean([r["after"].get("ra") for r in rs]),
            "der": _mean([r.get("der") for r in rs]),
            "seconds": _mean([r["defense_seconds"] for r in rs]),
            "acc_drop": _mean([r["before"]["acc"] - r["after"]["acc"] for r in rs]),
            "seeds": sorted(r["seed"] for r in rs),
        }
        for r in rs:
            befores[key[:4]][r["seed"]] = r
    for base, by_seed in befores.items():
        rs = list(by_seed.values())
        out[base + (NO_DEFENSE,)] = {
            "acc": _mean([r["before"]["acc"] for r in rs]),
            "asr": _mean([r["before"].get("asr") for r in rs]),
            "ra": _mean([r["before"].get("ra") for r in rs]),
            "der": None,
            "seconds": _mean([r.get("train_seconds") for r in rs]),
            "acc_drop": 0.0,
            "seeds": sorted(by_seed),
        }
    return out


def _order(values, first: str | None = None) -> list:
    vals = sorted(set(values), key=lambda v: (v != first, str(v)))
    return vals


def tables(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One table per (dataset, model, clean ratio): its attacks, defenses and aggregated cells."""
    agg = aggregate(records)
    out = []
    for ds, model, ratio in sorted({k[:3] for k in agg}, key=str):
        keys = [k for k in agg if k[:3] == (ds, model, ratio)]
        attacks = _order([k[3] for k in keys], "none")
        defenses = _order([k[4] for k in keys], NO_DEFENSE)
        cells = {(k[3], k[4]): agg[k] for k in keys}
        mean_row = {}
        for d in defenses:
            col = [cells[(a, d)] for a in attacks if (a, d) in cells and a != "none"]
            mean_row[d] = {m: _mean([c[m] for c in col]) for m in ("acc", "asr", "ra", "der", "seconds", "acc_drop")}
        out.append({"dataset": ds, "model": model, "clean_ratio": ratio, "attacks": attacks,
                    "defenses": defenses, "cells": cells, "mean": mean_row})
    return out


def summary(table: dict[str, Any], max_drop: float = 0.03) -> list[dict[str, Any]]:
    """Per defense: mean ACC drop, ASR, RA, DER and seconds over the attacked models, and
    whether its mean clean-accuracy drop is within ``max_drop``; best DER first."""
    rows = []
    for d in table["defenses"]:
        if d == NO_DEFENSE:
            continue
        m = table["mean"][d]
        rows.append({"defense": d, **m, "within": m["acc_drop"] is not None and m["acc_drop"] <= max_drop})
    return sorted(rows, key=lambda r: -(r["der"] if r["der"] is not None else -1))


def markdown(table: dict[str, Any]) -> str:
    attacks, defenses, cells, mean = table["attacks"], table["defenses"], table["cells"], table["mean"]
    lines = [f"### {table['dataset']} / {table['model']} / clean ratio {table['clean_ratio']:g}", "",
             "ACC / ASR / RA in % (triggered test images of non-target classes for ASR and RA):", ""]
    lines.append("| attack | " + " | ".join(defenses) + " |")
    lines.append("|---" * (len(defenses) + 1) + "|")

    def trio(c):
        return "-" if c is None else f"{_pct(c['acc'])} / {_pct(c['asr'])} / {_pct(c['ra'])}"

    for a in attacks:
        lines.append(f"| {a} | " + " | ".join(trio(cells.get((a, d))) for d in defenses) + " |")
    lines.append("| **mean** | " + " | ".join(trio(mean[d]) for d in defenses) + " |")
    defs = [d for d in defenses if d != NO_DEFENSE]
    lines += ["", "DER in % (higher is better) and defense seconds:", ""]
    lines.append("| attack | " + " | ".join(defs) + " |")
    lines.append("|---" * (len(defs) + 1) + "|")
    for a in attacks:
        if a == "none":
            continue
        lines.append(f"| {a} | " + " | ".join(_pct(cells[(a, d)]["der"]) if (a, d) in cells else "-" for d in defs) + " |")
    lines.append("| **mean DER** | " + " | ".join(_pct(mean[d]["der"]) for d in defs) + " |")
    lines.append("| **mean seconds** | " + " | ".join("-" if mean[d]["seconds"] is None else f"{mean[d]['seconds']:.1f}"
                                                     for d in defs) + " |")
    rows = summary(table)
    if rows:
        lines += ["", "Per defense, means over the attacked models (ranked by DER):", "",
                  "| defense | ACC drop (points) | ASR % | RA % | DER % | seconds | ACC drop <= 3 points |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            drop = "-" if r["acc_drop"] is None else f"{100 * r['acc_drop']:.2f}"
            secs = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
            lines.append(f"| {r['defense']} | {drop} | {_pct(r['asr'])} | {_pct(r['ra'])} | {_pct(r['der'])} | {secs} | "
                         f"{'yes' if r['within'] else 'no'} |")
    return "\n".join(lines) + "\n"


def _target_of(spec: dict[str, Any] | None) -> str:
    if not spec:
        return "-"
    return "all-to-all" if spec.get("mode") == "all2all" else str(spec.get("target"))


def robustness_markdown(records: list[dict[str, Any]], max_asr: float = 0.05) -> str:
    """Per defense over every single run (attack x training seed x clean-set seed), not means of
    means: how many runs leave ASR above ``max_asr``, the worst ASR, the ACC drop, and on clean
    models (attack ``none``) how far ACC moved."""
    by_def: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_def[r["defense"]].append(r)
    lines = ["Per defense, over every run (each attack x training seed x clean-set seed):", "",
             f"| defense | attacked runs | ASR > {100 * max_asr:g}% | worst ASR % | mean ASR % | mean RA % | mean ACC drop | "
             "worst ACC drop | clean-model runs | mean / worst abs ACC change on clean models |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for d in sorted(by_def):
        att = [r for r in by_def[d] if r["attack"] != "none" and r["after"].get("asr") is not None]
        clean = [r for r in by_def[d] if r["attack"] == "none"]
        drops = [100 * (r["before"]["acc"] - r["after"]["acc"]) for r in att]
        changes = [100 * abs(r["before"]["acc"] - r["after"]["acc"]) for r in clean]
        asr = [r["after"]["asr"] for r in att]
        fails = [f"{r['attack']} (seed {r['seed']}, clean {r.get('clean_seed', r['seed'])}): {100 * r['after']['asr']:.1f}"
                 for r in att if r["after"]["asr"] > max_asr]
        lines.append(
            f"| {d} | {len(att)} | {len(fails)} | {_pct(max(asr) if asr else None)} | {_pct(_mean(asr))} | "
            f"{_pct(_mean([r['after'].get('ra') for r in att]))} | "
            + ("-" if not drops else f"{statistics.fmean(drops):.2f}") + " | "
            + ("-" if not drops else f"{max(drops):.2f}") + f" | {len(clean)} | "
            + ("-" if not changes else f"{statistics.fmean(changes):.2f} / {max(changes):.2f}") + " |")
    return "\n".join(lines) + "\n"


def _found(scan: dict[str, Any], target: str) -> bool:
    """The true target is among the suspected classes (all-to-all: the scan says all-to-all)."""
    if target == "all-to-all":
        return scan["kind"] == "all-to-all"
    return int(target) in scan["suspected"]


def detection_markdown(scans: list[dict[str, Any]]) -> str:
    """The detection scans: per attacked model whether the true target was suspected, with the
    p-values per clean set; over clean models, the false-positive rate of the verdict."""
    if not scans:
        return ""
    rows: dict[tuple, list[dict]] = defaultdict(list)
    for r in scans:
        rows[(r["dataset"], r["model"], r["clean_ratio"], r["attack"], _target_of(r.get("attack_spec")))].append(r)
    source = scans[0].get("scan_source")
    lines = [f"### Detection ({f'the scans the {source} cells ran' if source else 'ulrl scan'})", "",
             "Per model and clean set: the verdict's p-value and the suspected classes. *Found*: the true target "
             "is among the suspected classes (all-to-all: the scan says all-to-all).", "",
             "| attack | target | runs | found | clean class suspected | p-values | suspected |", "|---|---|---|---|---|---|---|"]
    found_total = runs_total = 0
    clean_runs = clean_fp = 0
    for key in sorted(rows, key=lambda k: (k[3] == "none", str(k))):
        rs = sorted(rows[key], key=lambda r: (r["seed"], r.get("clean_seed", r["seed"])))
        target = key[4]
        if key[3] == "none":
            clean_runs += len(rs)
            clean_fp += sum(r["scan"]["verdict"] == "backdoored" for r in rs)
            found, wrong = "-", str(sum(bool(r["scan"]["suspected"]) for r in rs))
        else:
            n_found = sum(_found(r["scan"], target) for r in rs)
            found_total += n_found
            runs_total += len(rs)
            found = f"{n_found}/{len(rs)}"
            wrong = str(sum(any(c != int(target) for c in r["scan"]["suspected"]) for r in rs)) if target != "all-to-all" else "-"
        ps = ", ".join(f"{r['scan']['p_value']:.2g}" for r in rs)
        sus = "; ".join(str(r["scan"]["suspected"]) for r in rs)
        lines.append(f"| {key[3]} | {target} | {len(rs)} | {found} | {wrong} | {ps} | {sus} |")
    lines.append("")
    if runs_total:
        lines.append(f"Backdoored models: target found in {found_total} of {runs_total} runs.")
    if clean_runs:
        lines.append(f"Clean models: verdict 'backdoored' in {clean_fp} of {clean_runs} runs "
                     f"(false-positive rate {100 * clean_fp / clean_runs:.0f}%; nominal alpha "
                     f"{rows and next(iter(rows.values()))[0]['scan']['alpha']}).")
    return "\n".join(lines) + "\n"


def csv_text(table: dict[str, Any]) -> str:
    """Wide CSV: one row per attack (and a mean row), per defense its acc, asr, ra, der, seconds."""
    buf = io.StringIO()
    w = csv.writer(buf)
    metrics = ("acc", "asr", "ra", "der", "seconds")
    w.writerow(["attack"] + [f"{d}:{m}" for d in table["defenses"] for m in metrics])

    def fmt(v):
        return "" if v is None else f"{v:.6g}"

    for a in table["attacks"]:
        row = [a]
        for d in table["defenses"]:
            c = table["cells"].get((a, d))
            row += [fmt(c[m]) if c else "" for m in metrics]
        w.writerow(row)
    w.writerow(["mean"] + [fmt(table["mean"][d][m]) for d in table["defenses"] for m in metrics])
    return buf.getvalue()


# --- plots -----------------------------------------------------------------------------------------
def _plots(table: dict[str, Any], out: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, path: Path) -> Path:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
        plt.close(fig)
        return path

    attacks = [a for a in table["attacks"] if a != "none"]
    defenses, cells = table["defenses"], table["cells"]
    defs = [d for d in defenses if d != NO_DEFENSE]
    paths = []

    fig, ax = plt.subplots(figsize=(7, 5))
    cmap = plt.get_cmap("tab20")
    for i, d in enumerate(defenses):
        pts = [(cells[(a, d)]["acc"], cells[(a, d)]["asr"]) for a in attacks
               if (a, d) in cells and cells[(a, d)]["asr"] is not None]
        if pts:
            ax.scatter([100 * p[0] for p in pts], [100 * p[1] for p in pts], label=d, s=28,
                       color="black" if d == NO_DEFENSE else cmap(i % 20), marker="x" if d == NO_DEFENSE else "o")
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel("attack success rate (%)")
    ax.set_title(f"ASR vs ACC per defense ({table['dataset']}, {table['model']}); one point per attack")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    paths.append(save(fig, out / f"{stem}-asr-vs-acc.png"))

    if attacks and defs:
        import numpy as np

        grid = np.array([[cells[(a, d)]["der"] if (a, d) in cells and cells[(a, d)]["der"] is not None else np.nan
                          for d in defs] for a in attacks], dtype=float)
        fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(defs), 1.0 + 0.42 * len(attacks)))
        im = ax.imshow(100 * grid, vmin=50, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(defs)), defs, rotation=45, ha="right")
        ax.set_yticks(range(len(attacks)), attacks)
        for i in range(len(attacks)):
            for j in range(len(defs)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{100 * grid[i, j]:.0f}", ha="center", va="center", fontsize=7)
        fig.colorbar(im, ax=ax, label="DER (%)")
        ax.set_title("DER per defense per attack")
        paths.append(save(fig, out / f"{stem}-der.png"))

        secs = [[cells[(a, d)]["seconds"] for a in attacks if (a, d) in cells] for d in defs]
        fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(defs), 3.5))
        ax.bar(range(len(defs)), [statistics.fmean(s) if s else 0 for s in secs],
               yerr=[statistics.pstdev(s) if len(s) > 1 else 0 for s in secs], color="tab:blue", capsize=3)
        ax.set_xticks(range(len(defs)), defs, rotation=45, ha="right")
        ax.set_ylabel("defense seconds (mean over attacks)")
        ax.set_title("Defense time per defense")
        paths.append(save(fig, out / f"{stem}-seconds.png"))
    return paths


def write_report(records: list[dict[str, Any]], out: str | Path, name: str = "report",
                 header: str = "", scans: list[dict[str, Any]] | None = None) -> Path:
    """Write ``out/<name>.md`` and, under ``out/<name>/``, the CSV tables and the plots."""
    out = ensure_dir(out)
    assets = ensure_dir(out / name)
    parts = [header.rstrip() + "\n"] if header else []
    if scans:
        parts.append(detection_markdown(scans))
    if records:
        parts.append(robustness_markdown(records))
    for t in tables(records):
        stem = f"{t['dataset']}-{t['model']}-r{t['clean_ratio']:g}"
        csv_path = assets / f"{stem}.csv"
        atomic_write(csv_path, lambda tmp, t=t: Path(tmp).write_text(csv_text(t)))
        parts.append(markdown(t))
        parts.append(f"CSV: [{name}/{csv_path.name}]({name}/{csv_path.name})\n")
        for p in _plots(t, assets, stem):
            parts.append(f"![{p.stem}]({name}/{p.name})\n")
    md = out / f"{name}.md"
    atomic_write(md, lambda tmp: Path(tmp).write_text("\n".join(parts)))
    return md
