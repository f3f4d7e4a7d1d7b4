"""The ``ulrl`` command: demo, train, purify, evaluate.

A user mistake (bad path, name or value) prints one line on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (plus exit code 2), like every other mistake."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _ratio(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return v


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= v < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {text}")
    return v


def _device(text: str) -> str:
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu or cuda") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r}: use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine (no GPU or a CPU build of torch); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} GPU(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError("MPS is not available on this machine; use --device cpu")
    return text


def _overrides(items: list[str] | None, defense: str = "ulrl") -> dict[str, Any]:
    """``--set alpha=0.1 --set freeze_bn=false`` -> typed overrides of the defense's config."""
    from .defenses.base import parse_overrides

    return parse_overrides(items or [], defense)


ARCH_HELP = ("architecture: a registered name (ulrl models), or your own network as package.module:factory or "
             "path/to/file.py:factory (the factory gets num_classes, in_channels, image_size if it takes them). Your "
             "module is imported, and its code runs, only because you name it here; never because a checkpoint says so.")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint: .safetensors with its .json sidecar, a .pt/.pth state dict "
                   "(with --arch), or a BackdoorBench record folder (record/NAME/) or its attack_result.pt")
    p.add_argument("--arch", default=None, help=ARCH_HELP + " Needed for a checkpoint without a sidecar; classes, channels, size "
                   "and normalisation then come from --data.")


def _load_model(args, data):
    """The checkpoint named by --model, checked against the data before any weight is read;
    (model, meta, attack tensors)."""
    from .checkpoints import load_checkpoint, read_meta, sidecar
    from .pipeline import check_compatible, model_meta

    meta = None
    if args.arch:  # the named architecture; the rest from the sidecar if there is one, else from the data
        has_sidecar = sidecar(args.model).exists()
        meta = {**read_meta(args.model), "arch": args.arch} if has_sidecar else model_meta(args.arch, data, None, None)
    return load_checkpoint(args.model, meta, check=lambda m: check_compatible(m, data))


def _load_inputs(args, want_attack: bool = True):
    """--data, then --model (our checkpoint, a plain state dict with --arch, or a BackdoorBench record
    folder / attack_result.pt), each validated before the next; then what ASR is measured with
    (--poisoned-test, --attack, the sidecar's attack, or the record's own poisoned test images).
    Returns (data, model, meta, attack)."""
    from .io.backdoorbench import is_record, load_record_model, poisoned_test, read_record
    from .pipeline import check_compatible

    if is_record(args.model):
        rec = read_record(args.model)
        args.data = args.data or rec.meta["dataset"]
        data = _load_data(args)
        check_compatible(rec.meta, data)
        model, meta, attack_tensors = load_record_model(rec), rec.meta, {}
        own = poisoned_test(rec) if want_attack and args.attack is None and not getattr(args, "poisoned_test", None) else None
    else:
        data = _load_data(args)
        model, meta, attack_tensors = _load_model(args, data)
        own = None
    if not want_attack:
        return data, model, meta, None
    attack = own if own is not None else _attack_for(args.attack, meta, data.num_classes, attack_tensors, args)
    return data, model, meta, attack


def _check_outputs(args, names: list[str]) -> None:
    """Before any work: --out can hold ``names`` without replacing an input (model, sidecar, data)."""
    from .data import DATASETS, _canonical
    from .io import check_outputs

    name = args.data or "fashion-mnist"
    data_dirs = [args.data_dir, DATASETS.get(_canonical(name), (None, None))[1], name if Path(name).is_dir() else None,
                 getattr(args, "poisoned_test", None)]
    check_outputs(args.out, names, inputs=[args.model], overwrite=args.overwrite, input_dirs=data_dirs)


def _add_poisoned_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--poisoned-test", default=None, metavar="DIR",
                   help="your own triggered images, DIR/<true label>/*.png, to measure ASR and RA with (needs --target)")
    p.add_argument("--target", type=int, default=None, help="with --poisoned-test: the class the trigger sends images to")


def _add_common(p: argparse.ArgumentParser, data: bool = True) -> None:
    if data:
        p.add_argument("--data", default=None, help="dataset name (fashion-mnist, mnist, cifar10, cifar100, gtsrb, tiny-imagenet, "
                       "synthetic) or a directory (default: fashion-mnist, or a BackdoorBench record's clean_data)")
        p.add_argument("--data-dir", default=None, help="where the dataset's files are (default: its standard place)")
    p.add_argument("--device", default="cpu", type=_device, help="cpu or cuda")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--overwrite", action="store_true", help="allow replacing existing outputs (never inputs)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="ulrl", description="Remove backdoors from image classifiers with a few clean samples (ULRL).")
    parser.add_argument("--version", action="version", version=f"ulrl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every epoch")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("demo", help="train a backdoored small CNN on Fashion-MNIST, purify it, report")
    p.add_argument("--attack", default="badnets", help="badnets, blended, or an attack spec like badnets:patch_size=4")
    p.add_argument("--out", default=None, help="output directory (default runs/demo, or runs/demo-N if that holds a result)")
    p.add_argument("--epochs", type=int, default=5, help="poisoned-training epochs (default 5)")
    p.add_argument("--preset", default="default", help="ULRL preset: default or paper")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a ULRL option, e.g. --set alpha=0.1")
    _add_common(p)

    p = sub.add_parser("train", help="train a (poisoned) model and save a checkpoint")
    p.add_argument("--arch", default="cnn-small", help=ARCH_HELP)
    p.add_argument("--attack", default="none", help="attack spec, e.g. badnets:patch_size=3,target=0,rate=0.1; 'none' for a clean model")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "step", "constant"])
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    p.add_argument("--out", required=True, help="checkpoint path ending in .safetensors")
    _add_common(p)

    p = sub.add_parser("purify", help="remove a backdoor from a checkpoint with ULRL (or another defense)")
    _add_model_args(p)
    p.add_argument("--defense", default="ulrl", help="defense name (see ulrl defenses); default ulrl")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--clean-ratio", type=_ratio, default=None, help="fraction of the training split used as clean data (default 0.01)")
    group.add_argument("--clean-count", type=int, default=None, help="number of clean samples instead of a ratio")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--preset", default="default", help="defense preset (ULRL: default or paper)")
    p.add_argument("--layer", default=None, help="ULRL: name of the examined linear layer (default: the last nn.Linear)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a defense option, e.g. --set alpha=0.1")
    p.add_argument("--attack", default=None, help="attack spec to measure ASR with (default: the one in the checkpoint's sidecar, if any)")
    _add_poisoned_args(p)
    p.add_argument("--export", choices=["backdoorbench"], default=None,
                   help="also write the repaired model as BackdoorBench's defense_result.pt")
    _add_common(p)

    p = sub.add_parser("scan", help="does the model carry a backdoor, and which class does it serve? (per-class evidence, p-value, verdict)",
                       description="Scan a checkpoint for a backdoor with a few clean images: per-class evidence of each "
                       "detection signal, a calibrated p-value and a verdict. Writes scan.json and scan.png to --out. "
                       "Exit code 0, or 1 with --fail-on-detect when a backdoor is found; 2 on bad input.")
    _add_model_args(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--clean-ratio", type=_ratio, default=None, help="fraction of the training split used as clean data (default 0.01)")
    group.add_argument("--clean-count", type=int, default=None, help="number of clean samples instead of a ratio")
    p.add_argument("--out", required=True, help="output directory (scan.json, scan.png)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scan option, e.g. --set alpha=0.01 (see ScanConfig)")
    p.add_argument("--fail-on-detect", action="store_true", help="exit with code 1 when the verdict is 'backdoored' (for model-intake pipelines)")
    p.add_argument("--json", action="store_true", help="print scan.json instead of the table")
    p.add_argument("--reference", default=None, metavar="PROFILE",
                   help="profile of clean reference models ('ulrl profile'), builtin:NAME, auto (default: the shipped "
                   "profile whose reference models were trained as this checkpoint was, if any) or none")
    _add_common(p)

    p = sub.add_parser("profile", help="a reference profile from scans of clean models you trust (ulrl scan --reference)",
                       description="Build a reference profile: per class, the mean and spread of the scan's universal "
                       "and margin scores over clean models of one architecture, dataset and training recipe. 'ulrl scan "
                       "--reference PROFILE' then also compares each class with the same class on those models "
                       "(docs/detection.md, 'The reference test'). Give the scan.json of each clean model (several clean "
                       "sets of one model count as one model); at least 3 models.")
    p.add_argument("scans", nargs="+", metavar="SCAN_JSON", help="scan.json files written by 'ulrl scan'")
    p.add_argument("--out", required=True, help="the profile to write (.json)")
    p.add_argument("--name", default=None, help="the profile's name (default: the file name)")
    p.add_argument("--overwrite", action="store_true", help="allow replacing an existing profile (never an input)")
    p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("evaluate", help="ACC, and ASR/RA under an attack, of a checkpoint")
    _add_model_args(p)
    p.add_argument("--attack", default=None, help="attack spec (default: the one in the checkpoint's sidecar)")
    _add_poisoned_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_common(p)

    p = sub.add_parser("bench", help="run a resumable grid of datasets x models x attacks x defenses x ratios x seeds")
    p.add_argument("--config", default=None, help="grid file (YAML or JSON) with the axes datasets, models, attacks, defenses, clean_ratios, seeds")
    p.add_argument("--preset", default=None, help="a built-in grid, e.g. fashion-mnist-cpu")
    p.add_argument("--out", required=True, help="results directory (reused: finished cells are skipped)")
    for axis, help_ in (("datasets", "dataset names or directories"), ("models", "model names"),
                        ("attacks", "attack specs ('none' for a clean model)"),
                        ("defenses", "defense specs NAME[@PRESET][:key=value,...]")):
        p.add_argument(f"--{axis}", nargs="+", default=None, help=help_)
    p.add_argument("--clean-ratios", nargs="+", type=_ratio, default=None)
    p.add_argument("--seeds", nargs="+", type=_seed, default=None, help="training seeds of the models")
    p.add_argument("--clean-seeds", nargs="+", type=_seed, default=None,
                   help="clean-set seeds: every model is scanned and defended with each (default: its training seed)")
    p.add_argument("--no-scan", action="store_true", help="no detection scan of the grid's own (the ULRL default cells still scan; a scan they run anyway is never run twice, and `ulrl report` reads theirs)")
    p.add_argument("--epochs", type=int, default=None, help="poisoned-training epochs (default 5)")
    p.add_argument("--data-dir", default=None, help="directory of the (single) dataset, if not in its standard place")
    p.add_argument("--device", default=None, type=_device, help="cpu or cuda")
    p.add_argument("--executor", default="local", choices=["local", "ray"], help="in-process (default) or Ray tasks")
    p.add_argument("--ray-address", default=None, help="address of an existing Ray cluster (default: start a local instance)")
    p.add_argument("--cpus-per-cell", type=float, default=1.0, help="CPUs a Ray task asks for (GPU runs ask for one GPU)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    p = sub.add_parser("zoo", help="train one poisoned model per attack, run ULRL on each, write the attack table and trigger pictures")
    p.add_argument("--out", default="runs/zoo", help="results directory (resumable; default runs/zoo)")
    p.add_argument("--attacks", nargs="+", default=None, help="attack specs (default: every registered attack)")
    p.add_argument("--arch", default="cnn-small")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--doc", default=None, help="Markdown file whose zoo table to (re)write, e.g. docs/attacks.md")
    p.add_argument("--image", default=None, help="PNG of one clean and one triggered example per attack, e.g. docs/img/triggers.png")
    p.add_argument("--executor", default="local", choices=["local", "ray"])
    _add_common(p)

    p = sub.add_parser("report", help="tables and plots of a benchmark results directory")
    p.add_argument("results", help="results directory written by ulrl bench")
    p.add_argument("--out", default=None, help="where to write (default RESULTS/report)")
    p.add_argument("--name", default="report", help="name of the Markdown file and of its asset folder")
    p.add_argument("--header", default="", help="Markdown text put above the tables (e.g. the command and machine)")

    sub.add_parser("models", help="list model names")
    sub.add_parser("attacks", help="list attack names")
    sub.add_parser("defenses", help="list defense names")
    return parser


def _load_data(args):
    from .data import load_dataset

    return load_dataset(args.data or "fashion-mnist", args.data_dir)


def _attack_for(spec: str | None, meta: dict, num_classes: int, attack_tensors=None, args=None):
    """What ASR is measured with: --poisoned-test images, --attack, the sidecar's attack, or nothing."""
    from .attacks import build_attack

    if args is not None and getattr(args, "poisoned_test", None):
        from .io.poisoned import read_poisoned_folder

        if spec not in (None, ""):
            raise UserError("give either --attack or --poisoned-test, not both")
        return read_poisoned_folder(args.poisoned_test, args.target, num_classes, int(meta["in_channels"]),
                                    int(meta["image_size"]))
    if args is not None and getattr(args, "target", None) is not None:
        raise UserError("--target goes with --poisoned-test DIR")
    if spec in (None, "") and meta.get("attack"):
        attack = build_attack(meta["attack"], num_classes)
        try:
            attack.load_state_tensors(attack_tensors or {})
        except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as e:
            raise UserError(f"the checkpoint's {attack.name} component cannot be loaded "
                            f"({str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__})") from None
    elif spec in (None, "", "none"):
        return None
    else:
        attack = build_attack(spec, num_classes)
    attack.check_fits(int(meta["in_channels"]), int(meta["image_size"]))
    return attack


def cmd_demo(args) -> int:
    from .pipeline import demo, format_table

    if args.out is None:  # never over an earlier result: take the next free runs/demo[-N]
        args.out = next(d for d in (f"runs/demo{'' if i == 1 else f'-{i}'}" for i in range(1, 10_000))
                        if not (Path(d) / "results.json").exists())
    data = _load_data(args)
    r = demo(data, args.attack, args.out, args.seed, args.epochs, args.preset, _overrides(args.set),
             args.overwrite, args.device, not args.no_progress)
    print(f"\nULRL demo: cnn-small on {data.name}, {r['attack']['name']} attack, {r['clean_samples']} clean samples, seed {args.seed}\n")
    print(format_table([("poisoned", r["before"], r["train_seconds"]),
                        ("after ULRL", {**r["after"], "der": r["der"]}, r["defense_seconds"])]))
    if r.get("scan"):
        sc = r["scan"]
        print(f"\nscan: {sc['verdict']} (p = {sc['p_value']:.2g}, {sc['kind']}); suspected {sc['suspected']}")
    print(f"flagged neurons: {r['flagged_neurons']}  unlearning epochs: {r['unlearn_epochs']}")
    print(f"results, plots and checkpoints in {args.out}/")
    return 0


def cmd_train(args) -> int:
    from .attacks import build_attack
    from .checkpoints import check_output, ensure_dir, save_checkpoint
    from .pipeline import format_table, train_model
    from .train import TrainConfig

    check_output(args.out, overwrite=args.overwrite)
    if not args.out.endswith(".safetensors"):
        raise UserError(f"--out {args.out} must end in .safetensors")
    ensure_dir(Path(args.out).parent)
    data = _load_data(args)
    attack = None if args.attack in ("", "none") else build_attack(args.attack, data.num_classes)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, schedule=args.schedule,
                      milestones=(args.epochs // 2, 3 * args.epochs // 4), augment=not args.no_augment,
                      hflip=data.hflip, amp=args.amp, seed=args.seed, device=args.device)
    model, meta = train_model(data, args.arch, attack, cfg, progress=not args.no_progress)
    save_checkpoint(args.out, model, meta, attack.state_tensors() if attack else None, overwrite=args.overwrite)
    print(format_table([(args.arch, meta["test_metrics"], meta["train_seconds"])]))
    print(f"saved {args.out} and {Path(args.out).with_suffix('.json')}")
    return 0


PURIFY_OUTPUTS = ["model.safetensors", "model.json", "clean_indices.json", "report.json", "results.json",
                  "neuron_scores.png", "curves.png"]


def cmd_purify(args) -> int:
    from .pipeline import format_table, run_defense, select_clean, write_defense_outputs

    out = Path(args.out)
    if args.clean_count is not None and args.clean_count < 1:
        raise UserError(f"--clean-count must be >= 1, got {args.clean_count}")
    _check_outputs(args, PURIFY_OUTPUTS + (["defense_result.pt"] if args.export else []))
    data, model, meta, attack = _load_inputs(args)
    if args.export:
        from .io.backdoorbench import to_backdoorbench

        to_backdoorbench(meta["arch"], model, (meta.get("source") or {}).get("model_name"))  # exportable? before the work
    clean_idx = select_clean(data, args.clean_ratio, args.clean_count, args.seed)
    overrides = {"seed": args.seed, **_overrides(args.set, args.defense)}
    if args.layer:
        overrides["layer"] = args.layer
    repaired, report, results = run_defense(model, data, clean_idx, attack, args.defense, args.preset, overrides,
                                            args.device, not args.no_progress, monitor_size=0, meta=meta)
    write_defense_outputs(out, repaired, meta, report, results, clean_idx, inputs=[args.model], overwrite=args.overwrite)
    if args.export:
        import torch

        from .checkpoints import atomic_write
        from .io.backdoorbench import to_backdoorbench

        exported = to_backdoorbench(meta["arch"], repaired, (meta.get("source") or {}).get("model_name"))
        atomic_write(out / "defense_result.pt", lambda tmp: torch.save(exported, tmp))
    after = {**results["after"], "der": results["der"]} if results["der"] is not None else results["after"]
    print(format_table([("input", results["before"], None), (f"after {args.defense}", after, results["defense_seconds"])]))
    if "scan" in report.extra:
        sc = report.extra["scan"]
        print(f"scan: {sc['verdict']} (p = {sc['p_value']:.2g}, {sc['kind']}); suspected {sc['suspected']}")
    if report.layer:
        print(f"flagged neurons of {report.layer}: {report.flagged}")
    for note in report.notes:
        print(f"note: {note}")
    print(f"wrote {out}/model.safetensors, report.json, results.json, plots")
    return 0


def cmd_profile(args) -> int:
    from .checkpoints import write_json
    from .detection import reference
    from .io.paths import input_file
    from .io.sidecar import read_sidecar

    out = Path(args.out)
    if out.suffix != ".json":
        raise UserError(f"--out {out}: a profile is a .json file")
    if any(out.resolve() == Path(s).resolve() for s in args.scans):
        raise UserError(f"--out {out} is one of the input scans; write the profile elsewhere")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; choose another --out or pass --overwrite")
    from .detection import SCHEMA_VERSION

    scans, metas = [], []
    for f in dict.fromkeys(str(Path(s).resolve()) for s in args.scans):  # a file given twice counts once
        try:
            s = json.loads(input_file(f, "scan", 16 << 20).read_text())
            ok = isinstance(s, dict) and s.get("schema_version") == SCHEMA_VERSION and isinstance(s.get("signals"), dict)
        except (ValueError, RecursionError):
            ok = False
        if not ok:
            raise UserError(f"{f} is not a scan.json written by 'ulrl scan' (schema version {SCHEMA_VERSION})")
        model = s.get("model") if isinstance(s.get("model"), dict) else {}
        scans.append((model.get("sha256") or model.get("path") or f, s))
        try:
            metas.append(reference.match_key(read_sidecar(model["path"])) if isinstance(model.get("path"), str) else None)
        except UserError:
            metas.append(None)
    match = metas[0] if metas[0] is not None and all(m == metas[0] for m in metas) else {}
    prof = reference.build_profile(scans, args.name or out.stem, match, source="ulrl profile " + " ".join(args.scans))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, prof)
    print(f"wrote {out}: {prof['models']} models, {prof['scans']} scans, {prof['num_classes']} classes"
          + ("" if match else " (the models' descriptions differ or are missing: use it with --reference, it is "
             "never picked automatically)"))
    return 0


def cmd_scan(args) -> int:
    from .checkpoints import write_json
    from .defenses.base import parse_fields
    from .detection import ScanConfig
    from .pipeline import scan_model, scan_record, select_clean
    from .plots import plot_scan

    out = Path(args.out)
    if args.clean_count is not None and args.clean_count < 1:
        raise UserError(f"--clean-count must be >= 1, got {args.clean_count}")
    _check_outputs(args, ["scan.json", "scan.png"])
    overrides = {"seed": args.seed, **parse_fields(args.set or [], ScanConfig, "scan")}
    if args.reference is not None:
        overrides["reference"] = args.reference
    data, model, meta, _ = _load_inputs(args, want_attack=False)
    clean_idx = select_clean(data, args.clean_ratio, args.clean_count, args.seed)
    result = scan_model(model, data, clean_idx, overrides, args.device, not args.no_progress, meta)
    ratio = args.clean_ratio if args.clean_count is None else None
    record = scan_record(result, data, args.model, clean_idx, 0.01 if ratio is None and args.clean_count is None else ratio)
    write_json(out / "scan.json", record)
    plot_scan(result, out / "scan.png")
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(format_scan(result, Path(args.model).name))
        print(f"wrote {out}/scan.json and scan.png")
    return 1 if args.fail_on_detect and result.backdoored else 0


def format_scan(result, label: str) -> str:
    """The short verdict table ``ulrl scan`` prints: per class, each signal's z and the combined p."""
    names = list(result.signals)
    ref = result.reference
    head = f"{'class':>5}" + "".join(f"{n + ' z':>17}" for n in names) + f"{'combined p':>12}" \
        + (f"{'reference p':>13}" if ref else "") + "  "
    lines = [head, "-" * len(head)]
    for c in range(result.num_classes):
        zs = "".join(f"{result.signals[n].z[c]:17.1f}" for n in names)
        mark = "  <- suspected" if c in result.suspected else ""
        lines.append(f"{c:>5}{zs}{result.p_class[c]:12.2g}" + (f"{ref['p'][c]:13.2g}" if ref else "") + mark)
    verdict = result.verdict.upper() if result.backdoored else result.verdict
    target = f"; suspected target(s): {result.suspected}" if result.suspected else ""
    if result.decided_by == "warp":
        target += f" (the warp test, p = {result.p_warp:.2g}: a warping trigger)"
    elif result.decided_by == "reference":
        target += f" (the reference test: class {ref['top']} far from its place on {ref['models']} clean models)"
    if ref:
        target += f"; reference profile {ref['profile']}"
    lines.append(f"\n{label}: {verdict} (p = {result.p_value:.2g}, alpha = {result.alpha}){target}; "
                 f"{result.seconds['total']:.1f} s")
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def cmd_evaluate(args) -> int:
    from .metrics import evaluate
    from .pipeline import format_table

    data, model, meta, attack = _load_inputs(args)
    m = evaluate(model, data.test_x, data.test_y, attack, args.device)
    print(json.dumps(m) if args.json else format_table([(Path(args.model).name, m, None)]))
    return 0


def cmd_bench(args) -> int:
    from .bench import load_grid, run_grid

    if args.config and args.preset:
        raise UserError("give either --config FILE or --preset NAME, not both")
    overrides = {"datasets": args.datasets, "models": args.models, "attacks": args.attacks, "defenses": args.defenses,
                 "clean_ratios": args.clean_ratios, "seeds": args.seeds, "clean_seeds": args.clean_seeds,
                 "epochs": args.epochs, "device": args.device, "scan": False if args.no_scan else None}
    grid = load_grid(args.config, args.preset, **overrides)
    if args.data_dir:
        grid.data_dirs = {**grid.data_dirs, **{d: args.data_dir for d in grid.datasets}}
    s = run_grid(grid, args.out, args.executor, args.ray_address, args.cpus_per_cell, not args.no_progress)
    print(f"bench: {s.models_trained} models trained, {s.scans_run} scans and {s.cells_run} cells run, {s.cells_skipped} already done, "
          f"{len(s.failures)} failed, {s.seconds:.0f} s; results in {args.out}/cells (ulrl report {args.out})")
    for f in s.failures:
        print(f"  failed: {f}", file=sys.stderr)
    if s.stale:
        what = ", ".join(f"{k} ({n})" for k, n in sorted(s.stale.items()))
        print(f"warning: finished cells kept as they were ran with other defense options than this version's: {what}; "
              f"move those cells away to run them again", file=sys.stderr)
    return 1 if s.failures else 0


def cmd_zoo(args) -> int:
    from .zoo import run_zoo, table_markdown

    command = "ulrl " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["zoo"] else "ulrl zoo"
    rows = run_zoo(args.out, args.doc, args.image, args.data or "fashion-mnist", args.arch, args.attacks, args.seed, args.epochs,
                   args.data_dir, command, args.executor, not args.no_progress)
    print(table_markdown(rows))
    return 0


def cmd_report(args) -> int:
    from .bench import benchmark_scans, collect
    from .report import write_report

    records = collect(args.results)
    scans = benchmark_scans(args.results, records)  # the grid's scans, and the ones its ULRL cells ran
    md = write_report(records, args.out or Path(args.results) / "report", args.name, args.header, scans)
    print(f"{len(records)} cells, {len(scans)} scans; wrote {md} with its tables and plots in {md.with_suffix('')}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "models":
        from .models import list_models
        print("\n".join(list_models()))
        print("\nAdd one: a file src/ulrl/models/<family>.py with a builder (num_classes, in_channels, image_size) -> "
              "nn.Module decorated with @register_model('name'); or, without touching ulrl, pass your own network as "
              "--arch package.module:factory (or path/to/file.py:factory). docs/interop.md has the details.")
        return 0
    if args.command == "attacks":
        from .attacks import ATTACKS
        print("\n".join(sorted(ATTACKS)))
        return 0
    if args.command == "defenses":
        from .defenses import DEFENSES
        print("\n".join(sorted(DEFENSES)))
        return 0
    handlers = {"demo": cmd_demo, "train": cmd_train, "purify": cmd_purify, "scan": cmd_scan, "profile": cmd_profile,
                "evaluate": cmd_evaluate,
                "bench": cmd_bench, "report": cmd_report, "zoo": cmd_zoo}
    try:
        if getattr(args, "arch", None) and ":" in args.arch:  # the user's own network, named on the command line
            from .io.user_arch import import_user_arch
            args.arch = import_user_arch(args.arch)
        return handlers[args.command](args)
    except UserError as e:
        print(f"ulrl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ulrl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
