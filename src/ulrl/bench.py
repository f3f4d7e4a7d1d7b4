"""The benchmark grid: datasets x models x attacks x defenses x clean ratios x seeds.

A results directory holds::

    grid.json                                                  the grid as last run
    models/<dataset>/<model>/<attack>/seed<k>.safetensors|.json  poisoned models, trained once
    cells/<dataset>/<model>/<attack>/<defense>/ratio<r>-seed<k>.json   one result per cell

Every file is written atomically (temporary file + rename), and a file that exists is finished:
a rerun skips it, so an interrupted grid resumes where it stopped and loses nothing. Poisoned
models are trained once per (dataset, model, attack, seed) and shared by every defense and ratio.
A cell that fails leaves ``<cell>.error.txt`` (with the traceback) instead of a result and is
retried on the next run; the other cells go on.

Execution is in-process by default (model by model, then its cells). ``executor="ray"`` runs the
same work as Ray tasks on a local Ray instance or an existing cluster (``address``); each cell
waits for its model's training task, and asks for one GPU (``device="cuda"``) or
``cpus_per_cell`` CPUs. On a cluster the results directory must be on a shared filesystem.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import __version__
from .attacks import build_attack, parse_attack_spec
from .checkpoints import (
    atomic_write,
    ensure_dir,
    load_checkpoint,
    read_meta,
    save_checkpoint,
    write_json,
)
from .data import Dataset, load_dataset
from .defenses.base import defense_entry, make_defense_config, parse_overrides
from .errors import UserError
from .models import MODELS
from .pipeline import run_defense, select_clean, train_model
from .train import TrainConfig

log = logging.getLogger(__name__)

PRESETS_DIR = Path(__file__).parent / "presets"


# --- what to run ---------------------------------------------------------------------------------
def _params_text(params: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items())


def _slug(name: str, params: dict[str, Any]) -> str:
    """A readable, filesystem-safe key: the name, plus a short hash of any parameters."""
    if not params:
        return name
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:6]
    return f"{name}-{digest}"


@dataclass(frozen=True)
class DefenseSpec:
    """``NAME[@PRESET][:key=value,...]``, e.g. ``ulrl``, ``ulrl@paper``, ``ft:epochs=10``."""

    name: str
    preset: str = "default"
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        base = self.name if self.preset == "default" else f"{self.name}@{self.preset}"
        return _slug(base, dict(self.overrides))

    @property
    def label(self) -> str:
        base = self.name if self.preset == "default" else f"{self.name}@{self.preset}"
        return f"{base}:{_params_text(dict(self.overrides))}" if self.overrides else base

    @classmethod
    def parse(cls, item: str | dict) -> DefenseSpec:
        if isinstance(item, dict):
            unknown = set(item) - {"name", "preset", "set"}
            if unknown or "name" not in item:
                raise UserError(f"defense entry {item} must have 'name' and optionally 'preset' and 'set'")
            name, preset, overrides = str(item["name"]), str(item.get("preset", "default")), dict(item.get("set") or {})
        else:
            head, _, rest = str(item).strip().partition(":")
            name, _, preset = head.partition("@")
            preset = preset or "default"
            overrides = parse_overrides([s for s in rest.split(",") if s], name.strip().lower())
        name = name.strip().lower()
        make_defense_config(name, preset, **overrides)  # validates name, preset and options now
        return cls(name, preset, tuple(sorted(overrides.items())))


@dataclass
class Grid:
    """A benchmark grid; every list is one axis. Loaded from YAML/JSON or built from CLI flags."""

    datasets: list[str] = field(default_factory=lambda: ["fashion-mnist"])
    data_dirs: dict[str, str] = field(default_factory=dict)  # dataset name -> directory, where not standard
    models: list[str] = field(default_factory=lambda: ["cnn-small"])
    attacks: list[Any] = field(default_factory=lambda: ["badnets"])  # attack specs; "none" = a clean model
    defenses: list[Any] = field(default_factory=lambda: ["ulrl"])  # DefenseSpec strings or dicts
    clean_ratios: list[float] = field(default_factory=lambda: [0.01])
    seeds: list[int] = field(default_factory=lambda: [0])
    epochs: int = 5  # poisoned-training epochs
    lr: float = 0.01
    batch_size: int = 128
    amp: bool = False
    device: str = "cpu"
    monitor: int = 0  # test images evaluated after each defense epoch (0: none, fastest)
    description: str = ""

    def __post_init__(self) -> None:
        for axis in ("datasets", "models", "attacks", "defenses", "clean_ratios", "seeds"):
            value = getattr(self, axis)
            if not isinstance(value, list) or not value:
                raise UserError(f"grid axis {axis!r} must be a non-empty list, got {value!r}")
        for m in self.models:
            if m not in MODELS:
                raise UserError(f"unknown model {m!r} in the grid; known: {', '.join(sorted(MODELS))}")
        for r in self.clean_ratios:
            if not 0.0 < float(r) <= 1.0:
                raise UserError(f"clean ratio {r} must be in (0, 1]")
        for a in self.attacks:
            if str(a).strip().lower() != "none":
                parse_attack_spec(a)
        self.defense_specs = [DefenseSpec.parse(d) for d in self.defenses]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def load_grid(path: str | Path | None = None, preset: str | None = None, **overrides: Any) -> Grid:
    """A grid from a YAML/JSON file or a named preset (``src/ulrl/presets/<name>.yaml``), with
    ``overrides`` (non-None values) on top."""
    import yaml

    raw: dict[str, Any] = {}
    if preset is not None:
        path = PRESETS_DIR / f"{preset}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
            raise UserError(f"unknown bench preset {preset!r}; known: {known}")
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"grid file {p} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"grid file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise UserError(f"grid file {p} must hold a mapping of axis names to lists")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(Grid)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"unknown grid key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return Grid(**raw)


@dataclass(frozen=True)
class ModelJob:
    dataset: str
    model: str
    attack: str | None  # normalised spec text, None for a clean model
    seed: int

    @property
    def attack_key(self) -> str:
        if self.attack is None:
            return "none"
        params = parse_attack_spec(self.attack)
        return _slug(str(params.pop("name")), params)

    def path(self, root: Path) -> Path:
        return root / "models" / self.dataset / self.model / self.attack_key / f"seed{self.seed}.safetensors"


@dataclass(frozen=True)
class Cell:
    job: ModelJob
    defense: DefenseSpec
    ratio: float

    def path(self, root: Path) -> Path:
        j = self.job
        return root / "cells" / j.dataset / j.model / j.attack_key / self.defense.key / f"ratio{self.ratio:g}-seed{j.seed}.json"


def plan(grid: Grid) -> list[tuple[ModelJob, list[Cell]]]:
    """Every model to train with the cells that use it, in a stable order."""
    out = []
    for ds in grid.datasets:
        for m in grid.models:
            for a in grid.attacks:
                spec = None if str(a).strip().lower() == "none" else a
                if isinstance(spec, dict):
                    params = dict(spec)
                    spec = f"{params.pop('name')}:{_params_text(params)}"
                for seed in grid.seeds:
                    job = ModelJob(ds, m, spec, int(seed))
                    cells = [Cell(job, d, float(r)) for d in grid.defense_specs for r in grid.clean_ratios]
                    out.append((job, cells))
    return out


def model_done(path: Path) -> bool:
    return path.is_file() and path.with_suffix(".json").is_file()


# --- the work of one model / one cell (run in-process or as a Ray task) ----------------------------
@lru_cache(maxsize=2)
def _dataset(name: str, data_dir: str | None) -> Dataset:
    return load_dataset(name, data_dir)


def train_job(job: ModelJob, grid: Grid, root: Path, progress: bool = False) -> dict[str, Any]:
    """Train (or reuse) the poisoned model of ``job``; returns its sidecar metadata."""
    path = job.path(root)
    if model_done(path):
        return read_meta(path)
    data = _dataset(job.dataset, grid.data_dirs.get(job.dataset))
    attack = build_attack(job.attack, data.num_classes) if job.attack else None
    if attack is not None:
        attack.seed = job.seed
    cfg = TrainConfig(epochs=grid.epochs, lr=grid.lr, batch_size=grid.batch_size, schedule="cosine",
                      hflip=data.hflip, amp=grid.amp, seed=job.seed, device=grid.device)
    model, meta = train_model(data, job.model, attack, cfg, progress=progress)
    ensure_dir(path.parent)
    save_checkpoint(path, model, meta, attack.state_tensors() if attack else None, overwrite=True)
    return meta


def run_cell(cell: Cell, grid: Grid, root: Path, progress: bool = False) -> dict[str, Any]:
    """Run one defense on one poisoned model and write the cell's result file."""
    out = cell.path(root)
    if out.is_file():
        return json.loads(out.read_text())
    job, d = cell.job, cell.defense
    data = _dataset(job.dataset, grid.data_dirs.get(job.dataset))
    model, meta, attack_tensors = load_checkpoint(job.path(root))
    attack = None
    if meta.get("attack"):
        attack = build_attack(meta["attack"], data.num_classes)
        attack.load_state_tensors(attack_tensors)
    clean_idx = select_clean(data, cell.ratio, None, job.seed)
    t0 = time.perf_counter()
    _, report, results = run_defense(model, data, clean_idx, attack, d.name, d.preset,
                                     {"seed": job.seed, **dict(d.overrides)}, grid.device, progress,
                                     monitor_size=grid.monitor, before=meta.get("test_metrics"))
    record = {
        "dataset": job.dataset,
        "model": job.model,
        "attack": job.attack or "none",  # the spec as given in the grid: the label in reports
        "attack_key": job.attack_key,
        "attack_spec": meta.get("attack"),
        "defense": d.label,
        "defense_key": d.key,
        "clean_ratio": cell.ratio,
        "seed": job.seed,
        **{k: results[k] for k in ("before", "after", "der", "defense_seconds", "clean_samples", "config")},
        "cell_seconds": time.perf_counter() - t0,
        "train_seconds": meta.get("train_seconds"),
        "poisoned_samples": meta.get("poisoned_samples"),
        "report": report.to_dict(),
        "host": socket.gethostname(),
        "threads": torch.get_num_threads(),
        "ulrl_version": __version__,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    ensure_dir(out.parent)
    write_json(out, record)
    out.with_suffix(".error.txt").unlink(missing_ok=True)
    return record


def _record_error(path: Path, err: BaseException | str) -> str:
    text = err if isinstance(err, str) else "".join(traceback.format_exception(err))
    ensure_dir(path.parent)
    atomic_write(path.with_suffix(".error.txt"), lambda tmp: Path(tmp).write_text(text))
    return text.strip().splitlines()[-1] if text.strip() else "error"


# --- executors -------------------------------------------------------------------------------------
@dataclass
class Summary:
    models_trained: int = 0
    cells_run: int = 0
    cells_skipped: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_grid(grid: Grid, root: str | Path, executor: str = "local", address: str | None = None,
             cpus_per_cell: float = 1.0, progress: bool = True) -> Summary:
    """Run every unfinished model and cell of ``grid`` into results directory ``root``."""
    root = ensure_dir(root)
    write_json(root / "grid.json", grid.to_dict())
    work = plan(grid)
    if any(not model_done(j.path(root)) or any(not c.path(root).is_file() for c in cells) for j, cells in work):
        for name in grid.datasets:  # a missing dataset is one user error, not a failure per cell
            _dataset(name, grid.data_dirs.get(name))
    if executor == "local":
        return _run_local(work, grid, root, progress)
    if executor == "ray":
        return _run_ray(work, grid, root, address, cpus_per_cell, progress)
    raise UserError(f"unknown executor {executor!r}; use local or ray")


def _run_local(work, grid: Grid, root: Path, progress: bool) -> Summary:
    s, t0 = Summary(), time.perf_counter()
    todo = sum((not model_done(j.path(root))) + len(cells) for j, cells in work)
    bar = tqdm(total=todo, desc="bench", disable=not progress, unit="job")
    for job, cells in work:
        if not model_done(job.path(root)):
            bar.set_postfix_str(f"train {job.model} {job.attack_key} seed{job.seed}")
            try:
                train_job(job, grid, root, progress=False)
                s.models_trained += 1
            except UserError:
                raise
            except Exception as e:  # a crash in one attack must not lose the rest of the grid
                msg = _record_error(job.path(root), e)
                s.failures.append(f"train {job.attack_key}: {msg}")
                bar.update(1 + len(cells))
                continue
            bar.update(1)
        for cell in cells:
            if cell.path(root).is_file():
                s.cells_skipped += 1
            else:
                bar.set_postfix_str(f"{cell.defense.key} on {job.attack_key}")
                try:
                    run_cell(cell, grid, root, progress=False)
                    s.cells_run += 1
                except UserError:
                    raise
                except Exception as e:
                    s.failures.append(f"{cell.defense.key} on {job.attack_key}: {_record_error(cell.path(root), e)}")
            bar.update(1)
    bar.close()
    s.seconds = time.perf_counter() - t0
    return s


def _ray_train(job: ModelJob, grid: Grid, root: str, threads: int) -> str:
    torch.set_num_threads(threads)
    train_job(job, grid, Path(root))
    return str(job.path(Path(root)))


def _ray_cell(cell: Cell, grid: Grid, root: str, threads: int, _model_ready: Any = None) -> str:
    torch.set_num_threads(threads)
    run_cell(cell, grid, Path(root))
    return str(cell.path(Path(root)))


def _run_ray(work, grid: Grid, root: Path, address: str | None, cpus_per_cell: float, progress: bool) -> Summary:
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'ulrl[ray]' (or pip install ray)") from None
    s, t0 = Summary(), time.perf_counter()
    started_here = not ray.is_initialized()
    if started_here:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address:
            kwargs["address"] = address
        else:
            kwargs["num_cpus"] = os.cpu_count()
        ray.init(**kwargs)
    gpu = grid.device.startswith("cuda")
    resources = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": cpus_per_cell}
    threads = max(1, int(cpus_per_cell))
    train_task = ray.remote(max_retries=0, **resources)(_ray_train)
    cell_task = ray.remote(max_retries=0, **resources)(_ray_cell)
    pending: dict[Any, tuple[str, Path]] = {}
    for job, cells in work:
        dep = None
        if not model_done(job.path(root)):
            dep = train_task.remote(job, grid, str(root), threads)
            pending[dep] = (f"train {job.attack_key}", job.path(root))
        for cell in cells:
            if cell.path(root).is_file():
                s.cells_skipped += 1
                continue
            ref = cell_task.remote(cell, grid, str(root), threads, dep)
            pending[ref] = (f"{cell.defense.key} on {job.attack_key}", cell.path(root))
    bar = tqdm(total=len(pending), desc="bench (ray)", disable=not progress, unit="job")
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            what, path = pending.pop(done[0])
            try:
                ray.get(done[0])
                if what.startswith("train "):
                    s.models_trained += 1
                else:
                    s.cells_run += 1
            except Exception as e:  # the task's error (or its model's) is recorded, the rest go on
                cause = getattr(e, "cause", None) or e
                if isinstance(cause, UserError):
                    msg = str(cause)
                else:
                    msg = _record_error(path, cause if isinstance(cause, BaseException) else str(e))
                s.failures.append(f"{what}: {msg}")
            bar.update(1)
    finally:
        bar.close()
        if started_here:
            ray.shutdown()
    s.seconds = time.perf_counter() - t0
    return s


def collect(root: str | Path) -> list[dict[str, Any]]:
    """Every finished cell's record under ``root``, in a stable order. Reads the directory alone."""
    root = Path(root)
    if not (root / "cells").is_dir():
        raise UserError(f"{root} holds no benchmark results (no cells/ directory); run `ulrl bench --out {root}` first")
    records = []
    for p in sorted((root / "cells").rglob("*.json")):
        try:
            records.append(json.loads(p.read_text()))
        except json.JSONDecodeError:
            raise UserError(f"result file {p} is corrupt; delete it and rerun `ulrl bench` to recompute that cell") from None
    return records


__all__ = ["Cell", "DefenseSpec", "Grid", "ModelJob", "Summary", "collect", "defense_entry", "load_grid", "plan",
           "run_cell", "run_grid", "train_job"]
