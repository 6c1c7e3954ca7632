"""`launch.py` subcommands: train, tune, evaluate, bench, ui, prepare-sample, prepare-imagenet.

Flags are shortcuts for config keys; `--set key=value` reaches every key. Bad input ends
with one line on stderr and exit status 2, never a traceback. Slightly over 300 lines: each subcommand's
handler sits beside its parser, thin calls into the modules that do the work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from rn50_ray import __version__
from rn50_ray.errors import UserError
from rn50_ray.flags import add_config_args, add_rescan_arg, config_from_args


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and status 2, as for every other bad input
        raise UserError(f"{self.prog}: {message}")


def cmd_train(args: argparse.Namespace) -> int:
    from rn50_ray.config import resolve

    cfg = resolve(config_from_args(args))  # read and resolved once for the whole command
    if args.dry_run:
        from rn50_ray.dry_run import describe

        print(f"dry run (nothing started): run {cfg.run.name!r}")
        print(describe(cfg, rescan=args.rescan))
        return 0
    from rn50_ray.driver import run_training

    summary = run_training(cfg, rescan=args.rescan)
    line = (
        f"summary: {summary.get('epoch', 0)} epochs, {summary.get('step', 0)} steps, val top1 "
        f"{summary.get('val/top1', float('nan')):.2f}% top5 {summary.get('val/top5', float('nan')):.2f}% "
        f"(best top1 {summary.get('best_top1', 0):.2f}%), resizes {summary.get('resizes', 0)}"
    )
    print(line)
    if summary.get("worst_classes"):
        print(f"worst classes by val top-1: {summary['worst_classes']} (all of them: per_class.csv in the run folder)")
    if summary.get("startup_s"):
        print(f"startup: {summary['startup_s']:.1f} s from launch to the first finished training step")
    print(f"run folder: {summary['run_uri']}")
    if summary.get("checkpoint"):
        print(f"latest checkpoint: {summary['checkpoint']}")
    if summary.get("mlflow_url"):
        print(f"MLflow: {summary['mlflow']}: {summary['mlflow_url']}")
    elif summary.get("mlflow"):
        print(f"MLflow: {summary['mlflow']} (python launch.py ui --storage {cfg.run.storage} to browse)")
    if summary.get("best_checkpoint"):
        print(f"best checkpoint: {summary['best_checkpoint']} (val top1 {summary.get('best_top1', 0):.2f}%)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rn50_ray.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint,
        data=args.data,
        batch_size=args.batch_size,
        device=args.device,
        workers=args.loader_workers,
        flip_tta=args.flip_tta,
        image_size=args.image_size,
        rescan=args.rescan,
    )
    rows = result.pop("per_class")
    if args.per_class:
        from rn50_ray.core.per_class import rows_to_csv

        Path(args.per_class).write_text(rows_to_csv(rows))
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(
            f"top1 {result['top1']:.2f}%  top5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
            f"({result['images']} images at {result['image_size']} px, epoch {result['epoch']})"
        )
        if "ema_top1" in result:
            print(f"EMA: top1 {result['ema_top1']:.2f}%  top5 {result['ema_top5']:.2f}%  loss {result['ema_loss']:.4f}")
        from rn50_ray.core.per_class import worst

        print(f"worst classes: {worst(rows)}" + (f" (all of them: {args.per_class})" if args.per_class else ""))
    return 0


def cmd_prepare_sample(args: argparse.Namespace) -> int:
    from rn50_ray.data.sample import prepare_sample

    out = prepare_sample(
        args.out,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        size=args.size,
        source=args.source,
        force=args.force,
    )
    print(f"wrote {out} ({args.train_per_class} train and {args.val_per_class} val images per class, {args.size} px)")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from rn50_ray import run_folder
    from rn50_ray.tune.spaces import load_space

    cfg = config_from_args(args)
    if args.resume:
        name = args.resume
        search = run_folder.join(run_folder.absolute(cfg.run.storage), name)
        text = run_folder.read_file(search, "space.yaml")
        if text is None:
            raise UserError(f"tune --resume: no search {name!r} in {cfg.run.storage}")
        space = load_space(text=text, source=run_folder.join(search, "space.yaml"))
    else:
        if not args.space:
            raise UserError("tune: --space FILE is required (see tune_spaces/), or --resume NAME")
        space = load_space(args.space)
        name = cfg.run.name or f"search-{Path(args.space).stem}"
    space = dataclasses.replace(space, **{k: v for k in ("log_models", "log_checkpoints") if (v := getattr(args, k))})
    if args.dry_run:
        from rn50_ray.config import resolve
        from rn50_ray.dry_run import describe
        from rn50_ray.tune.runner import trial_base

        print(f"dry run (nothing started): search {name!r} of {space.num_samples} sample(s) over {', '.join(space.params)}")
        print(describe(resolve(trial_base(space, cfg)), rescan=args.rescan))
        return 0
    from rn50_ray.tune.runner import run_search

    summary = run_search(space, cfg, name=name, storage=cfg.run.storage, resume=bool(args.resume), rescan=args.rescan)
    rows = summary["rows"]
    if rows:
        cols = list(rows[0])
        print(" | ".join(f"{c:>16}" for c in cols))
        for r in rows:
            print(" | ".join(f"{r[c]:>16.4g}" if isinstance(r[c], float) else f"{r[c]!s:>16}" for c in cols))
    print(f"search folder: {summary['search_dir']} (results.csv)")
    if summary.get("best"):
        print(f"best trial: {summary['best']['trial']} {space.metric} {summary['best'][space.metric]:.4g}")
        print(f"best config: {summary['best_config']} (python launch.py train --config {summary['best_config']} --data ...)")
        if summary.get("best_checkpoint"):
            print(f"best checkpoint: {summary['best_checkpoint']}")
    if summary["errors"]:
        print(f"{summary['errors']} trial(s) failed; see the table")
    if summary["interrupted"]:
        print(f"search interrupted: {summary['done']} of {summary['expected']} trials done; continue it with: "
              f"python launch.py tune --resume {name} --storage {cfg.run.storage}", flush=True)  # fmt: skip
        return 130
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from rn50_ray.processes import run_process_group
    from rn50_ray.tracking import embedded_store, ui_url
    from rn50_ray.tracking.run import make_store_folder

    uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):
        print(f"the runs are on the MLflow server {uri}: open {ui_url(uri)}")
        return 0
    uri, artifacts = (uri, None) if uri else embedded_store(args.storage)
    make_store_folder(uri)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    if artifacts:
        cmd += ["--default-artifact-root", artifacts]
    print(f"MLflow UI for {uri} at {ui_url(f'http://{args.host}:{args.port}')} (Ctrl-C stops it)", flush=True)
    return run_process_group(cmd)


def cmd_bench(args: argparse.Namespace) -> int:
    from rn50_ray.bench import BenchOptions, run_bench

    opts = BenchOptions(
        what=args.what,
        backends=tuple(b.strip() for b in args.backends.split(",")),
        image_sizes=tuple(args.image_sizes or ()),
        device=args.device,
        steps=args.steps,
        warmup=args.warmup,
        window=args.window,
        peak_tflops=args.peak_tflops,
        max_batch=args.max_batch,
        json=args.json,
    )
    return run_bench(config_from_args(args), opts, rescan=args.rescan)


def cmd_prepare_imagenet(args: argparse.Namespace) -> int:
    from rn50_ray.data.imagenet import prepare_imagenet

    report = prepare_imagenet(
        args.source, args.out, workers=args.workers, verify_md5=not args.no_md5, expect_full=not args.subset
    )
    print(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="launch.py", description="ResNet50 v1.5 with NVIDIA's recipe on Ray Train")
    parser.add_argument("--version", action="version", version=f"rn50-ray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train (or resume) a run through Ray Train")
    add_config_args(p)
    p.add_argument(
        "--dry-run", action="store_true", help="print the resolved run and its batch plan at every world size, start nothing"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="a Ray Tune search over config keys; each trial is a Ray Train run")
    p.add_argument("--space", help="a search space file (tune_spaces/*.yaml)")
    p.add_argument("--resume", metavar="NAME", help="continue the interrupted search NAME in --storage")
    p.add_argument(
        "--log-models",
        choices=("best", "all", "none"),
        help="trials whose model MLflow keeps (space file's log_models; default best)",
    )
    p.add_argument(
        "--log-checkpoints",
        choices=("uri", "copy"),
        help="a trial's best checkpoint in MLflow: its URI as a tag, or a copy (default uri)",
    )
    add_config_args(p)
    p.add_argument("--dry-run", action="store_true", help="print a trial's resolved run and batch plan, start nothing")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("evaluate", help="top-1/top-5/loss of a checkpoint on the val split, without Ray")
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder (or its state.pt), local or a storage URI")
    p.add_argument("--data", help="data folder; default: the one the checkpoint was trained on")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, help="val crop size; default: the run's (data.val_image_size)")
    p.add_argument("--flip-tta", action=argparse.BooleanOptionalAction, default=None, help="default: the run's eval.flip_tta")
    p.add_argument("--loader-workers", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--per-class", metavar="CSV", help="write each class's val top-1 (with its name) to this file")
    add_rescan_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("bench", help="throughput of the training step, of inference and of the input pipelines")
    p.add_argument("what", choices=("train", "infer", "data"))
    add_config_args(p)
    p.add_argument("--image-sizes", type=int, nargs="+", metavar="PX", help="one table per size (e.g. 160 192 224)")
    p.add_argument("--steps", type=int, default=20, help="measured steps after the warm-up")
    p.add_argument("--warmup", type=int, default=5, help="steps before measuring")
    p.add_argument("--window", type=int, default=5, help="steps between device syncs; one timing per window")
    p.add_argument("--peak-tflops", type=float, help="the device's peak for this precision, for the FLOP utilisation column")
    p.add_argument(
        "--max-batch",
        type=int,
        help="infer: double the batch from --batch-size up to this while it fits in memory, and report the "
        "largest's throughput (default: 1024 on a GPU, no search on a CPU)",
    )
    p.add_argument("--backends", default="synthetic,pytorch", help="comma-separated backends to compare")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for the runs' tracking store and print its URL")
    p.add_argument("--storage", default="./runs", help="run.storage of the runs (its embedded store is used)")
    p.add_argument("--mlflow-uri", default="", help="a tracking URI instead of the embedded store")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("prepare-sample", help="write a small ImageNet-style JPEG folder from Fashion-MNIST")
    p.add_argument("--out", required=True)
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--val-per-class", type=int, default=20)
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_prepare_sample)

    p = sub.add_parser(
        "prepare-imagenet", help="turn ImageNet's official archives (or Kaggle's layout) into train/ and val/ folders"
    )
    p.add_argument("--source", required=True, help="the folder with ILSVRC2012_img_{train,val}.tar and the devkit, or Kaggle's")
    p.add_argument("--out", required=True, help="the data folder to write (train/<wnid>/, val/<wnid>/, classes.json)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes extracting class archives")
    p.add_argument("--no-md5", action="store_true", help="skip the archives' MD5 checks (for subsets and tests)")
    p.add_argument("--subset", action="store_true", help="do not expect the full 1,281,167 / 50,000 images and 1,000 classes")
    p.set_defaults(func=cmd_prepare_imagenet)
    return parser


def _stop_log_forwarding() -> None:
    """Shut Ray down first, so that workers' late log lines come before the error, not after it."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


# Ray folds log lines that several workers print alike into one ("[repeated 6x across cluster]"). The training's
# own lines come from one rank at a time, and under --fault-tolerance replica that rank changes hands: never
# folded. Read by Ray when it is imported, so set before any command imports it.
PROGRESS_LINES = r"^(epoch \d+/\d+ |plan: |replica: |storage: |checkpoint |resumed from |resize: |first step )"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", PROGRESS_LINES)
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as e:
        _stop_log_forwarding()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
