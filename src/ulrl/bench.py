"""The benchmark grid: datasets x models x attacks x defenses x clean ratios x seeds.

A results directory holds::

    grid.json                                                  the grid as last run
    models/<dataset>/<model>/<attack>/seed<k>.safetensors|.json  poisoned models, trained once
    scans/<dataset>/<model>/<attack>/ratio<r>-seed<k>[-clean<c>].json  the detection scan of each model and clean set
    cells/<dataset>/<model>/<attack>/<defense>/ratio<r>-seed<k>[-clean<c>].json   one result per cell

``seed`` is the training seed of the model; the clean set (and the defense's randomness) is
drawn with the clean-set seed ``c``, by default the same (the file name then has no ``-clean``).
An attack entry may carry its own training seeds (``{name: none, seeds: [0, 1, 2, 3, 4]}``: five
clean models).

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
from .defenses.ulrl import scan_config
from .detection import ScanConfig
from .errors import UserError
from .models import MODELS
from .pipeline import run_defense, scan_model, scan_record, select_clean, train_model
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
    seeds: list[int] = field(default_factory=lambda: [0])  # training seeds (an attack entry may set its own)
    clean_seeds: list[int] | None = None  # clean-set seeds; None: each model's training seed
    scan: bool = True  # run the detection scan on every model and clean set (scans/)
    scan_set: dict[str, Any] = field(default_factory=dict)  # ScanConfig overrides for those scans
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
        if self.clean_seeds is not None and (not isinstance(self.clean_seeds, list) or not self.clean_seeds):
            raise UserError(f"grid key 'clean_seeds' must be a non-empty list, got {self.clean_seeds!r}")
        self.attack_entries = [_attack_entry(a, self.seeds) for a in self.attacks]
        self.defense_specs = [DefenseSpec.parse(d) for d in self.defenses]
        if not isinstance(self.scan_set, dict):
            raise UserError("grid key 'scan_set' must map scan options to values")
        unknown = sorted(set(self.scan_set) - {f.name for f in fields(ScanConfig)})
        if unknown:
            raise UserError(f"grid scan_set: unknown scan option(s) {', '.join(unknown)}")
        try:
            ScanConfig(**self.scan_set)  # validates the scan options now
        except UserError as e:
            raise UserError(f"grid scan_set: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def load_grid(path: str | Path | None = None, preset: str | None = None, **overrides: Any) -> Grid:
    """A grid from a YAML/JSON file or a named preset (``src/ulrl/presets/<name>.yaml``), with
    ``overrides`` (non-None values) on top. A file may start from a preset with ``extends: NAME``."""
    raw: dict[str, Any] = {}
    if preset is not None:
        path = _preset_path(preset)
    if path is not None:
        raw = _read_grid_file(Path(path))
    for _ in range(8):  # ``extends: PRESET``: start from that preset's keys
        if "extends" not in raw:
            break
        base = raw.pop("extends")
        raw = {**_read_grid_file(_preset_path(str(base))), **raw}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(Grid)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"unknown grid key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return Grid(**raw)


def _attack_entry(entry: Any, seeds: list[int]) -> tuple[str | None, list[int]]:
    """An attack axis entry -> (normalised spec text or None for a clean model, its training seeds)."""
    if isinstance(entry, dict):
        params = dict(entry)
        own = params.pop("seeds", None)
        if own is not None and (not isinstance(own, list) or not own):
            raise UserError(f"attack entry {entry}: 'seeds' must be a non-empty list")
        name = str(params.pop("name", "")).strip()
        if not name:
            raise UserError(f"attack entry {entry} must have a 'name'")
        spec = None if name.lower() == "none" else (f"{name}:{_params_text(params)}" if params else name)
        if spec is None and params:
            raise UserError(f"attack entry {entry}: a clean model ('none') takes no parameters")
        seeds = own or seeds
    else:
        spec = None if str(entry).strip().lower() == "none" else str(entry)
    if spec is not None:
        parse_attack_spec(spec)
    return spec, [int(s) for s in seeds]


def _preset_path(name: str) -> Path:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise UserError(f"unknown bench preset {name!r}; known: {known}")
    return path


def _read_grid_file(p: Path) -> dict[str, Any]:
    import yaml

    if not p.is_file():
        raise UserError(f"grid file {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"grid file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"grid file {p} must hold a mapping of axis names to lists")
    return raw


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


def _run_name(job: ModelJob, ratio: float, clean_seed: int) -> str:
    return f"ratio{ratio:g}-seed{job.seed}" + ("" if clean_seed == job.seed else f"-clean{clean_seed}")


@dataclass(frozen=True)
class ScanJob:
    """The detection scan of one model with one clean set."""

    job: ModelJob
    ratio: float
    clean_seed: int

    def path(self, root: Path) -> Path:
        j = self.job
        return root / "scans" / j.dataset / j.model / j.attack_key / f"{_run_name(j, self.ratio, self.clean_seed)}.json"


@dataclass(frozen=True)
class Cell:
    job: ModelJob
    defense: DefenseSpec
    ratio: float
    clean_seed: int

    def path(self, root: Path) -> Path:
        j = self.job
        return root / "cells" / j.dataset / j.model / j.attack_key / self.defense.key / f"{_run_name(j, self.ratio, self.clean_seed)}.json"


@dataclass
class Work:
    """One model to train, with the scans and cells that use it."""

    job: ModelJob
    scans: list[ScanJob]
    cells: list[Cell]


SCAN_CELL = "ulrl"  # the cells whose scans stand in for the grid's: the default preset, as given, no options


def cells_run_the_scan(grid: Grid, dataset: str, clean_seed: int) -> bool:
    """Whether the grid's plain ``ulrl`` cells run, on a model of ``dataset`` with clean set ``clean_seed``, the very
    scan the grid's own scan would (same options, on the same clean images: no holdout), whatever the dataset's
    horizontal flip: then the grid does not scan the model a second time, and the report reads those cells' scans
    (:func:`benchmark_scans`)."""
    if not any(d.label == SCAN_CELL for d in grid.defense_specs):
        return False
    for hflip in (True, False):  # the dataset's, set at run time for both
        base = {"hflip": hflip, "device": grid.device}
        cfg = make_defense_config("ulrl", "default", dataset=dataset, base=base, seed=clean_seed)
        if cfg.detect != "scan" or cfg.holdout or scan_config(cfg) != ScanConfig(**{**base, **grid.scan_set, "seed": clean_seed}):
            return False
    return True


def plan(grid: Grid) -> list[Work]:
    """Every model to train with the scans and cells that use it, in a stable order. A scan that a ULRL cell runs
    anyway is not planned (:func:`cells_run_the_scan`)."""
    out = []
    for ds in grid.datasets:
        scanned: dict[int, bool] = {}  # clean seed: does the grid scan with it
        for m in grid.models:
            for spec, seeds in grid.attack_entries:
                for seed in seeds:
                    job = ModelJob(ds, m, spec, int(seed))
                    runs = [(float(r), int(c)) for r in grid.clean_ratios for c in (grid.clean_seeds or [seed])]
                    for _, c in runs:
                        if c not in scanned:
                            scanned[c] = grid.scan and not cells_run_the_scan(grid, ds, c)
                    scans = [ScanJob(job, r, c) for r, c in runs if scanned[c]]
                    cells = [Cell(job, d, r, c) for d in grid.defense_specs for r, c in runs]
                    out.append(Work(job, scans, cells))
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


def _job_header(job: ModelJob, meta: dict[str, Any], ratio: float, clean_seed: int) -> dict[str, Any]:
    """What identifies a scan or a cell in the reports."""
    return {
        "dataset": job.dataset,
        "model": job.model,
        "attack": job.attack or "none",  # the spec as given in the grid: the label in reports
        "attack_key": job.attack_key,
        "attack_spec": meta.get("attack"),
        "clean_ratio": ratio,
        "seed": job.seed,
        "clean_seed": clean_seed,
    }


def run_scan(sj: ScanJob, grid: Grid, root: Path, progress: bool = False) -> dict[str, Any]:
    """Scan one model with one clean set and write the scan's file (its ``scan.json`` plus the header)."""
    out = sj.path(root)
    if out.is_file():
        return json.loads(out.read_text())
    job = sj.job
    data = _dataset(job.dataset, grid.data_dirs.get(job.dataset))
    model, meta, _ = load_checkpoint(job.path(root))
    clean_idx = select_clean(data, sj.ratio, None, sj.clean_seed)
    result = scan_model(model, data, clean_idx, {**grid.scan_set, "seed": sj.clean_seed}, grid.device, progress, meta)
    record = {**_job_header(job, meta, sj.ratio, sj.clean_seed), "scan": scan_record(result, data, None, clean_idx, sj.ratio),
              "host": socket.gethostname(), "threads": torch.get_num_threads(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    ensure_dir(out.parent)
    write_json(out, record)
    out.with_suffix(".error.txt").unlink(missing_ok=True)
    return record


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
    clean_idx = select_clean(data, cell.ratio, None, cell.clean_seed)
    t0 = time.perf_counter()
    _, report, results = run_defense(model, data, clean_idx, attack, d.name, d.preset,
                                     {"seed": cell.clean_seed, **dict(d.overrides)}, grid.device, progress,
                                     monitor_size=grid.monitor, before=meta.get("test_metrics"), meta=meta)
    record = {
        **_job_header(job, meta, cell.ratio, cell.clean_seed),
        "defense": d.label,
        "defense_key": d.key,
        **{k: results[k] for k in ("before", "after", "der", "defense_seconds", "monitor_seconds", "clean_samples",
                                   "config")},
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
    scans_run: int = 0
    cells_run: int = 0
    cells_skipped: int = 0
    scans_skipped: int = 0
    failures: list[str] = field(default_factory=list)
    stale: dict[str, int] = field(default_factory=dict)  # defense option -> finished cells run with another value
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_grid(grid: Grid, root: str | Path, executor: str = "local", address: str | None = None,
             cpus_per_cell: float = 1.0, progress: bool = True) -> Summary:
    """Run every unfinished model and cell of ``grid`` into results directory ``root``."""
    root = ensure_dir(root)
    write_json(root / "grid.json", grid.to_dict())
    work = plan(grid)
    if any(not model_done(w.job.path(root)) or any(not t.path(root).is_file() for t in w.scans + w.cells) for w in work):
        for name in grid.datasets:  # a missing dataset is one user error, not a failure per cell
            _dataset(name, grid.data_dirs.get(name))
    if executor == "local":
        return _run_local(work, grid, root, progress)
    if executor == "ray":
        return _run_ray(work, grid, root, address, cpus_per_cell, progress)
    raise UserError(f"unknown executor {executor!r}; use local or ray")


def _run_task(task: ScanJob | Cell, grid: Grid, root: Path, progress: bool = False) -> None:
    (run_scan if isinstance(task, ScanJob) else run_cell)(task, grid, root, progress)


def _label(task: ScanJob | Cell) -> str:
    what = "scan" if isinstance(task, ScanJob) else task.defense.key
    return f"{what} on {task.job.attack_key} seed{task.job.seed} clean{task.clean_seed}"


RUN_TIME_OPTIONS = ("device", "hflip", "scan_reference")  # set from the data, the machine or the checkpoint at run time


def stale_options(cell: Cell, root: Path) -> list[str]:
    """The defense options whose value in a finished cell's record differs from what this version would use (an
    option the record lacks is one this version added): a resumed bench keeps such a cell as it was."""
    try:
        stored = json.loads(cell.path(root).read_text()).get("config") or {}
    except (OSError, ValueError):
        return []
    d = cell.defense
    try:  # the dataset's name as the model's description has it (a grid may name a directory)
        dataset = json.loads(cell.job.path(root).with_suffix(".json").read_text()).get("dataset", cell.job.dataset)
    except (OSError, ValueError):
        dataset = cell.job.dataset
    try:
        now = asdict(make_defense_config(d.name, d.preset, dataset=dataset,
                                         **{"seed": cell.clean_seed, **dict(d.overrides)}))
    except UserError:
        return []
    # an option the record lacks ran as its default did (the option did not exist yet): stale only if it is not that
    default = {f.name: f.default for f in fields(defense_entry(d.name).config)}

    def plain(v: Any) -> Any:
        return json.loads(json.dumps(v, default=str))

    return sorted(k for k, v in now.items() if k not in RUN_TIME_OPTIONS
                  and plain(v) != (stored[k] if k in stored else plain(default.get(k))))


def _count(s: Summary, task: ScanJob | Cell, skipped: bool = False, root: Path | None = None) -> None:
    if isinstance(task, ScanJob):
        s.scans_skipped += skipped
        s.scans_run += not skipped
    else:
        s.cells_skipped += skipped
        s.cells_run += not skipped
        if skipped and root is not None:
            for k in stale_options(task, root):
                s.stale[k] = s.stale.get(k, 0) + 1


def _run_local(work: list[Work], grid: Grid, root: Path, progress: bool) -> Summary:
    s, t0 = Summary(), time.perf_counter()
    todo = sum((not model_done(w.job.path(root))) + len(w.scans) + len(w.cells) for w in work)
    bar = tqdm(total=todo, desc="bench", disable=not progress, unit="job")
    for w in work:
        job, tasks = w.job, w.scans + w.cells
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
                bar.update(1 + len(tasks))
                continue
            bar.update(1)
        for task in tasks:
            if task.path(root).is_file():
                _count(s, task, skipped=True, root=root)
            else:
                bar.set_postfix_str(_label(task))
                try:
                    _run_task(task, grid, root)
                    _count(s, task)
                except UserError:
                    raise
                except Exception as e:
                    s.failures.append(f"{_label(task)}: {_record_error(task.path(root), e)}")
            bar.update(1)
    bar.close()
    s.seconds = time.perf_counter() - t0
    return s


def _ray_train(job: ModelJob, grid: Grid, root: str, threads: int) -> str:
    torch.set_num_threads(threads)
    train_job(job, grid, Path(root))
    return str(job.path(Path(root)))


def _ray_task(task: ScanJob | Cell, grid: Grid, root: str, threads: int, _model_ready: Any = None) -> str:
    torch.set_num_threads(threads)
    _run_task(task, grid, Path(root))
    return str(task.path(Path(root)))


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
    other_task = ray.remote(max_retries=0, **resources)(_ray_task)
    pending: dict[Any, tuple[str, Path, Any]] = {}
    for w in work:
        dep = None
        if not model_done(w.job.path(root)):
            dep = train_task.remote(w.job, grid, str(root), threads)
            pending[dep] = (f"train {w.job.attack_key}", w.job.path(root), None)
        for task in w.scans + w.cells:
            if task.path(root).is_file():
                _count(s, task, skipped=True, root=root)
                continue
            ref = other_task.remote(task, grid, str(root), threads, dep)
            pending[ref] = (_label(task), task.path(root), task)
    bar = tqdm(total=len(pending), desc="bench (ray)", disable=not progress, unit="job")
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            what, path, task = pending.pop(done[0])
            try:
                ray.get(done[0])
                if task is None:
                    s.models_trained += 1
                else:
                    _count(s, task)
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


def collect_scans(root: str | Path) -> list[dict[str, Any]]:
    """Every finished scan's record under ``root`` (empty when the grid ran no scans)."""
    return _read_records(Path(root) / "scans")


def scans_from_cells(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The scans that ULRL cells ran themselves (``detect=scan``: the default preset), as scan records: what the
    report's detection table reads where the grid ran no scan of its own. One defense's cells: the plain ``ulrl``
    cells if any carry a scan, else the first label, in sorted order, whose cells do; each record names it in
    ``scan_source``."""
    scanned = [r for r in records if "scan" in r.get("report", {}).get("extra", {})]
    if not scanned:
        return []
    labels = {r["defense"] for r in scanned}  # a cell's record starts with the scan's header (_job_header)
    label = SCAN_CELL if SCAN_CELL in labels else min(labels)
    return [{**r, "scan": _as_scan_json(r["report"]["extra"]["scan"]), "scan_source": label}
            for r in scanned if r["defense"] == label]


def _as_scan_json(scan: dict[str, Any]) -> dict[str, Any]:
    """A scan as the defense report stores it (``ScanResult.to_dict``), keyed as ``scan.json`` is (``parameters``)."""
    out = dict(scan)
    if "config" in out:
        out["parameters"] = out.pop("config")
    return out


def benchmark_scans(root: str | Path, records: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The scans of a results directory: the grid's own, plus, for each model and clean set it did not scan, the scan
    its ULRL cells ran (``records``: the cells' records, read from ``root`` when not given)."""
    scans = collect_scans(root)
    have = {_run_key(r) for r in scans}
    from_cells = scans_from_cells(collect(root) if records is None else records)
    return scans + [r for r in from_cells if _run_key(r) not in have]


def _run_key(record: dict[str, Any]) -> tuple:
    return tuple(record[k] for k in ("dataset", "model", "attack_key", "seed", "clean_ratio", "clean_seed"))


def _read_records(folder: Path) -> list[dict[str, Any]]:
    records = []
    for p in sorted(folder.rglob("*.json")) if folder.is_dir() else []:
        try:
            records.append(json.loads(p.read_text()))
        except json.JSONDecodeError:
            raise UserError(f"result file {p} is corrupt; delete it and rerun `ulrl bench` to recompute it") from None
    return records


def collect(root: str | Path) -> list[dict[str, Any]]:
    """Every finished cell's record under ``root``, in a stable order. Reads the directory alone."""
    root = Path(root)
    if not (root / "cells").is_dir():
        raise UserError(f"{root} holds no benchmark results (no cells/ directory); run `ulrl bench --out {root}` first")
    return _read_records(root / "cells")


__all__ = ["Cell", "DefenseSpec", "Grid", "ModelJob", "ScanJob", "Summary", "Work", "collect", "collect_scans",
           "benchmark_scans", "defense_entry", "load_grid", "plan", "run_cell", "run_grid", "run_scan", "scans_from_cells", "train_job"]
