"""Command-line flags that stand for config keys, and the config a command line makes: recipe and config files,
then the flags (each checked under its own name), then `--set key=value` for any key."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rn50_ray.config import Config, check_consistency, choices_of, field_help, merge, parse_override, read_yaml

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

# flag -> (config key, argparse options)
TRAIN_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--data": ("data.path", {}),
    "--backend": ("data.backend", {}),
    "--image-size": ("data.image_size", {"type": int}),
    "--val-image-size": ("data.val_image_size", {"type": int}),
    "--loader-workers": ("data.loader_workers", {"type": int}),
    "--skip-bad-images": ("data.skip_bad_images", {"action": "store_const", "const": True}),
    "--arch": ("model.arch", {}),
    "--blurpool": ("model.blurpool", {"action": "store_const", "const": True}),
    "--epochs": ("schedule.epochs", {"type": int}),
    "--warmup-epochs": ("schedule.warmup_epochs", {"type": float}),
    "--lr-schedule": ("schedule.kind", {}),
    "--batch-size": ("batch.per_worker", {"type": int}),
    "--global-batch": ("batch.global_size", {"type": int}),
    "--lr-per-256": ("optim.lr_per_256", {"type": float}),
    "--momentum": ("optim.momentum", {"type": float}),
    "--mixup": ("optim.mixup_alpha", {"type": float}),
    "--ema": ("optim.ema_decay", {"type": float}),
    "--flip-tta": ("eval.flip_tta", {"action": "store_const", "const": True}),
    "--precision": ("system.precision", {}),
    "--compile": ("system.compile", {"action": "store_const", "const": True}),
    "--seed": ("system.seed", {"type": int}),
    "--workers": ("scale.workers", {}),
    "--gpus-per-worker": ("scale.gpus_per_worker", {"type": float}),
    "--cpus-per-worker": ("scale.cpus_per_worker", {"type": float}),
    "--max-failures": ("scale.max_failures", {"type": int}),
    "--fault-tolerance": ("scale.fault_tolerance", {}),
    "--address": ("scale.address", {}),
    "--no-resource-check": ("scale.check_resources", {"action": "store_const", "const": False}),
    "--resize-interval": ("scale.resize_interval_s", {"type": float}),
    "--worker-resources": ("scale.worker_resources", {}),
    "--mlflow-uri": ("tracking.uri", {}),
    "--tracking": ("tracking.mode", {}),
    "--experiment": ("tracking.experiment", {}),
    "--register-model": ("tracking.register_model", {}),
    "--name": ("run.name", {}),
    "--storage": ("run.storage", {}),
    "--log-every": ("run.log_every", {"type": int}),
    "--checkpoint-every-steps": ("run.checkpoint_every_steps", {"type": int}),
    "--keep-checkpoints": ("run.keep_checkpoints", {"type": int}),
    "--stop-after-epochs": ("run.stop_after_epochs", {"type": int}),
}


def _recipes() -> list[str]:
    return sorted(f.stem for f in RECIPES.glob("*.yaml"))


def add_config_args(p: argparse.ArgumentParser) -> None:
    helps = field_help()
    p.add_argument("--config", action="append", default=[], metavar="YAML", help="config file (repeatable; later files win)")
    p.add_argument("--recipe", choices=_recipes(), help=f"a recipe from {RECIPES.name}/")
    for flag, (key, opts) in TRAIN_FLAGS.items():
        choices = choices_of(key)
        p.add_argument(
            flag, dest=key, default=None, help=f"{key}: {helps[key]}", **({"choices": choices} if choices else {}), **opts
        )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key, e.g. optim.nesterov=true")
    add_rescan_arg(p)


def add_rescan_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rescan",
        action="store_true",
        help="list and screen the data folder again and rewrite its manifest (after files were rewritten in place)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults, then the recipe and config files, then the flags (each checked under its own name), then --set:
    each file read once. A recipe's warmup that no longer fits a shorter --epochs is scaled with it, and a line
    says so."""
    files = list(args.config)
    if args.recipe:
        files.insert(0, str(RECIPES / f"{args.recipe}.yaml"))
    cfg = Config()
    for path in files:
        cfg = merge(cfg, read_yaml(path, "config file"), str(path))
    files_cfg, overrides = cfg, {}
    for flag, (key, _) in TRAIN_FLAGS.items():
        value = getattr(args, key)
        if value is not None:
            cfg = merge(cfg, {key: value}, flag)  # checked, naming the flag
            overrides[key] = value
    sets = dict(parse_override(s) for s in args.set)
    cfg = merge(cfg, sets, "command line")
    overrides.update(sets)
    return check_consistency(_scale_warmup(files_cfg, cfg, overrides))


def _scale_warmup(files_cfg: Config, cfg: Config, overrides: dict[str, Any]) -> Config:
    """NVIDIA's recipes warm up for 8 of 90 epochs; asked for fewer epochs than that, the warmup shrinks in
    proportion (as if the recipe were written for that length), unless --warmup-epochs says otherwise.
    `files_cfg` is the config of the files alone, `cfg` with the command line's `overrides` on it."""
    epochs, warmup = overrides.get("schedule.epochs"), files_cfg.schedule.warmup_epochs
    if not isinstance(epochs, int) or "schedule.warmup_epochs" in overrides or not 0 < epochs <= warmup:
        return cfg
    scaled = round(warmup * epochs / files_cfg.schedule.epochs, 3)
    print(
        f"note: schedule.warmup_epochs: the recipe's {warmup:g} of {files_cfg.schedule.epochs} epochs is scaled to "
        f"{scaled:g} for {epochs} epochs; pass --warmup-epochs to choose",
        file=sys.stderr,
        flush=True,
    )
    return merge(cfg, {"schedule.warmup_epochs": scaled}, "--epochs")
