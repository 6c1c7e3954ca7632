"""`launch.py tune`: a Ray Tune search whose trials are whole Ray Train runs.

Each trial is a function trainable that resolves its config (the base config, the space's `base`, then
the sampled params) and calls `run_training`, which builds a TorchTrainer whose rank-0 reports reach Tune
through `TuneReportCallback`. Every trial has its own run folder under SEARCH/trials and its own MLflow
run, nested under the search's parent run. A failing trial is retried up to `max_trial_failures` times
and never stops the search; `--resume` restores the search and runs only the unfinished trials.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import posixpath
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray.train
import ray.tune
import yaml
from ray.util.queue import Empty, Queue

from rn50_ray.config import Config, flatten, load_config
from rn50_ray.errors import ConfigError, UserError
from rn50_ray.tracking import RUN_FILE
from rn50_ray.tune.spaces import Space

PARENT_FILE = "mlflow_parent.json"
POINTER = "train_checkpoint.json"  # in a Tune checkpoint: where the trial's Train checkpoint is
SEGMENT_FILE = "pbt_segment"  # in a trial's first run folder: the Train run it trains in now


def trial_config(
    base: dict[str, Any], params: dict[str, Any], trial_dir: str, trial_name: str, parent: str, init_from: str = ""
) -> Config:
    overrides = {**flatten(base), **params}
    overrides.update({"run.storage": trial_dir, "run.name": trial_name, "tracking.parent_run_id": parent})
    overrides["run.init_from"] = init_from
    overrides.update({"scale.check_resources": False, "data.screen_images": False})  # the search checked both once
    return load_config([], overrides)


def train_trial(config: dict[str, Any]) -> None:
    """One trial: a full Train run, whose epoch ends reach Tune as results with a Tune checkpoint that
    points at the Train checkpoint (a small file, not a copy of the weights).

    Under PBT a trial can be restarted from another trial's Tune checkpoint with new hyperparameters.
    It then trains on as a new segment of itself (its own Train run folder, `trial_<id>.pbt-<hash>`),
    starting from that checkpoint with its own LR schedule and momentum (`run.init_from`), and the
    same MLflow run, where the change shows as `hp/<key>` metrics and a tag."""
    from rn50_ray.ray_app import has_checkpoint, run_training

    trial_id = ray.tune.get_context().get_trial_id()
    segment, init_from = _segment(config, trial_id, _tune_start())
    cfg = trial_config(config["base"], config["params"], config["trials_dir"], segment, config["parent_run"], init_from)
    if init_from and not has_checkpoint(cfg):  # once per exploit, not again when its segment restarts
        _note_exploit(cfg, config, trial_id, init_from)
    callback = ReportToTrial()
    outcome: dict[str, Any] = {}

    def train() -> None:
        try:
            run_training(cfg, callbacks=[callback], bad_files=config["bad_files"])
        except BaseException as e:  # raised again in the trial's own thread, where Tune sees it
            outcome["error"] = e

    thread = threading.Thread(target=train, name="train-run", daemon=True)
    thread.start()
    while True:
        try:
            metrics, where = callback.queue.get(timeout=1.0)
        except Empty:
            if thread.is_alive() or not callback.queue.empty():
                continue
            break
        with tempfile.TemporaryDirectory(prefix="rn50-tune-ckpt-") as tmp:
            (Path(tmp) / POINTER).write_text(json.dumps({"path": where}))
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(tmp) if where else None)
    if "error" in outcome:
        raise outcome["error"]


class ReportToTrial(ray.train.UserCallback):
    """Runs in the Train controller: hands rank 0's epoch records and where their checkpoint lies to the
    trial's driver (mid-epoch checkpoints stay Train's business: Tune counts an iteration per epoch)."""

    def __init__(self):
        self.queue = Queue(actor_options={"num_cpus": 0})

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if "val/loss" not in metrics[0]:
            return
        where = None
        if checkpoint is not None:
            kind = checkpoint.filesystem.type_name
            where = checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"
        self.queue.put((dict(metrics[0]), where))


def _tune_start() -> str | None:
    """The Train checkpoint that the trial's Tune checkpoint points at, if Tune (re)started it from one."""
    ckpt = ray.tune.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as path:
        return json.loads((Path(path) / POINTER).read_text())["path"]


def _segment(config: dict[str, Any], trial_id: str, start: str | None) -> tuple[str, str]:
    """(the Train run name this start trains in, the checkpoint it starts from if not its own)."""
    from rn50_ray.ray_app import read_run_file, write_run_file

    trials, first = config["trials_dir"], f"trial_{trial_id}"
    current = _current_segment(trials, trial_id)
    if start is None or _run_name(start) == current:
        return current, ""  # a first start, or a restart of its own: Train resumes its own latest checkpoint
    segment = f"{first}.pbt-{hashlib.sha1(start.encode()).hexdigest()[:8]}"
    if segment != current:
        write_run_file(f"{trials}/{first}", SEGMENT_FILE, segment)
        mlflow_run = read_run_file(f"{trials}/{first}", RUN_FILE)
        if mlflow_run:  # the segment continues the trial's MLflow run
            write_run_file(f"{trials}/{segment}", RUN_FILE, mlflow_run)
    return segment, _existing_checkpoint(start)


def _current_segment(trials_dir: str, trial_id: str) -> str:
    """The Train run a trial trains in now: its first, or the PBT segment it was last restarted into."""
    from rn50_ray.ray_app import read_run_file

    first = f"trial_{trial_id}"
    return read_run_file(f"{trials_dir}/{first}", SEGMENT_FILE) or first


def _run_name(checkpoint: str) -> str:
    """The run folder's name of a checkpoint path (.../trial_x/checkpoint_... -> trial_x)."""
    return posixpath.basename(posixpath.dirname(checkpoint.rstrip("/")))


def _existing_checkpoint(path: str) -> str:
    """`path`, or if its run has pruned it since (newest-K), that run's newest checkpoint."""
    from rn50_ray.ray_app import run_filesystem

    run = posixpath.dirname(path.rstrip("/"))
    fs, base = run_filesystem(run)
    names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(base)) if i.base_name.startswith("checkpoint_"))
    if posixpath.basename(path.rstrip("/")) in names or not names:
        return path
    print(f"tune: {path} was pruned; starting from the newest checkpoint of that trial, {names[-1]}", flush=True)
    return f"{run}/{names[-1]}"


def _note_exploit(cfg: Config, config: dict[str, Any], trial_id: str, init_from: str) -> None:
    """Record a PBT exploit on the trial's MLflow run: the new values as `hp/<key>` metrics at the step they
    start from (MLflow params cannot change, which is what breaks Ray's MLflowLoggerCallback under PBT)."""
    from rn50_ray import tracking
    from rn50_ray.ray_app import checkpoint_step, read_run_file, run_uri

    known = read_run_file(run_uri(cfg), RUN_FILE)
    step = checkpoint_step(init_from)
    donor = _run_name(init_from)
    print(f"tune: trial {trial_id} continues from {donor} at step {step} with {config['params']}", flush=True)
    if not known:
        return
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    tracked = tracking.TrackedRun.from_json(known)
    try:
        client = MlflowClient(tracked.uri)
        exploits = int(client.get_run(tracked.run_id).data.tags.get("rn50.pbt_exploits", 0)) + 1
        now = int(time.time() * 1000)
        client.log_batch(
            tracked.run_id,
            metrics=[Metric(f"hp/{k}", float(v), now, step) for k, v in config["params"].items() if _is_number(v)],
            tags=[RunTag("rn50.pbt_exploits", str(exploits)), RunTag("rn50.pbt_last", f"from {donor} at step {step}")],
        )
    except Exception as e:  # tracking never stops a trial
        print(f"tracking: could not record the exploit ({type(e).__name__}: {e})", flush=True)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class CloseStoppedTrials(ray.tune.Callback):
    """Ends the MLflow runs of trials whose driver Tune killed.

    A trial that a scheduler stops (ASHA below its rung's cutoff) has its driver killed mid-`fit`, before
    it can end its MLflow run. This runs on the search's driver instead: it logs what the trial's run
    folder holds (config, epoch records, plots) and ends the run: KILLED with the epoch it stopped at,
    FINISHED with its model if that was its last epoch, or FAILED for a trial that crashed. A trial that
    ended its run itself is left alone.
    """

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._close(trial, "KILLED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._close(trial, "FAILED")

    def _close(self, trial, status: str) -> None:
        try:
            self._end_run(trial, status)
        except Exception as e:  # never the search's end; the trial's metrics are in its run folder either way
            print(f"tracking: could not close the MLflow run of trial {trial.trial_id} ({type(e).__name__}: {e})", flush=True)

    @staticmethod
    def _end_run(trial, status: str) -> None:
        from mlflow import MlflowClient

        from rn50_ray import tracking
        from rn50_ray.ray_app import best_checkpoint, log_run_results, read_run_file, run_uri

        config = trial.config
        segment = _current_segment(config["trials_dir"], trial.trial_id)
        try:
            cfg = trial_config(config["base"], config["params"], config["trials_dir"], segment, "")
        except ConfigError:
            return  # its params make no valid config: it failed before it had a run
        known = read_run_file(run_uri(cfg), tracking.RUN_FILE)
        if not known:
            return
        tracked = tracking.TrackedRun.from_json(known)
        client = MlflowClient(tracked.uri)
        if client.get_run(tracked.run_id).info.status != "RUNNING":
            return
        epoch = (trial.last_result or {}).get("epoch", 0)
        if status == "KILLED" and epoch >= config["epochs"]:  # stopped at its last rung: it did finish
            log_run_results(cfg, tracked, best_checkpoint(run_uri(cfg)))
            client.set_terminated(tracked.run_id, "FINISHED")
            return
        log_run_results(cfg, tracked, None)
        client.set_tag(tracked.run_id, "rn50.stopped", f"by the search at epoch {epoch}" if status == "KILLED" else "crashed")
        client.set_terminated(tracked.run_id, status)


def _scheduler(space: Space, epochs: int):
    from ray.tune.schedulers import ASHAScheduler

    kind = space.scheduler["type"]
    if kind == "fifo":
        return None
    if kind == "asha":
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=epochs,
            grace_period=space.scheduler["grace_period"],
            reduction_factor=space.scheduler["reduction_factor"],
            stop_last_trials=False,  # a trial at max_t ends on its own, so its driver logs its model
        )
    from ray.tune.schedulers import PopulationBasedTraining

    return PopulationBasedTraining(
        time_attr="training_iteration",
        perturbation_interval=space.scheduler["perturbation_interval"],
        hyperparam_mutations={"params": dict(space.scheduler["mutations"])},
        quantile_fraction=space.scheduler["quantile_fraction"],
        resample_probability=space.scheduler["resample_probability"],
    )


def _searcher(space: Space):
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if space.search in ("random", "grid"):
        # Its own max_concurrent: Tune ignores TuneConfig.max_concurrent_trials for a SearchGenerator we pass in.
        return BasicVariantGenerator(random_state=0, max_concurrent=space.max_concurrent_trials)

    if space.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=0)
    else:
        from ray.tune.search.hyperopt import HyperOptSearch

        searcher = HyperOptSearch(random_state_seed=0)
    return ConcurrencyLimiter(searcher, max_concurrent=space.max_concurrent_trials)


def check_cluster(space: Space) -> None:
    """More than the cluster has for one trial is an error now, not a search that never starts."""
    import ray

    have = ray.cluster_resources()
    n = int(space.workers.split(":")[0])
    need = {"CPU": n * space.cpus_per_worker, "GPU": n * space.gpus_per_worker}
    short = {k: v for k, v in need.items() if v > have.get(k, 0)}
    if short:
        raise UserError(
            f"{space.source}: resources: one trial needs {need['CPU']:g} CPUs and {need['GPU']:g} GPUs "
            f"({space.workers} workers), but the Ray cluster has {have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs"
        )


def results_table(results, space: Space) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        metrics = r.metrics or {}
        rows.append(
            {
                "trial": metrics.get("trial_id") or (r.path or "?").rstrip("/").split("/")[-1],
                **{k: (r.config or {}).get("params", {}).get(k) for k in space.params},
                space.metric: metrics.get(space.metric),
                "epochs": metrics.get("training_iteration", 0),
                "status": "ERROR" if r.error else ("STOPPED" if metrics.get("epoch", 0) < r.config["epochs"] else "FINISHED"),
            }
        )
    reverse = space.mode == "max"
    have = [r for r in rows if r[space.metric] is not None]
    return sorted(have, key=lambda r: r[space.metric], reverse=reverse) + [r for r in rows if r[space.metric] is None]


def to_csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def run_search(space: Space, cfg: Config, *, name: str, storage: str, resume: bool = False) -> dict[str, Any]:
    import ray.tune

    from rn50_ray.ray_app import connect, precheck_data, read_run_file, resolve, write_run_file

    trial_scale = {
        "scale.workers": space.workers,
        "scale.cpus_per_worker": space.cpus_per_worker,
        "scale.gpus_per_worker": space.gpus_per_worker,
    }
    cfg = load_config([], {**flatten(cfg.to_dict()), **flatten(space.base), **trial_scale})
    cfg = resolve(cfg)
    if cfg.tracking.mode != "off":  # one store for the parent and every trial, even the embedded one
        from rn50_ray.tracking import resolve_uri

        cfg = load_config([], {**flatten(cfg.to_dict()), "tracking.uri": resolve_uri(cfg)[0]})
    search_dir = os.path.abspath(os.path.join(storage, name)) if "://" not in storage else f"{storage.rstrip('/')}/{name}"
    if not resume and read_run_file(search_dir, "space.yaml") is not None:
        raise UserError(f"tune: a search named {name!r} exists in {storage}; pass --resume {name}, or a new --name")
    saved = read_run_file(search_dir, "base_config.yaml") if resume else None
    if saved:  # the search's own config (data, tracking store), whatever this command line says
        cfg = Config.from_dict(yaml.safe_load(saved), source=f"{search_dir}/base_config.yaml")
    bad_files = precheck_data(cfg)
    connect(cfg)
    check_cluster(space)
    parent = _parent_run(cfg, space, name, search_dir, read_run_file, write_run_file)
    trainable = ray.tune.with_resources(train_trial, {"CPU": 0.01})  # the trial's driver; Train asks for the workers
    if resume:
        if not ray.tune.Tuner.can_restore(f"{search_dir}/tuner"):
            raise UserError(f"tune --resume: no search to resume at {search_dir}/tuner")
        tuner = ray.tune.Tuner.restore(f"{search_dir}/tuner", trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        write_run_file(search_dir, "space.yaml", Path(space.source).read_text())
        write_run_file(search_dir, "base_config.yaml", cfg.to_yaml())
        tuner = ray.tune.Tuner(
            trainable,
            param_space={
                "params": space.to_tune(),
                "base": cfg.to_dict(),
                "trials_dir": f"{search_dir}/trials",
                "parent_run": parent.run_id if parent else "",
                "bad_files": bad_files,
                "epochs": cfg.schedule.epochs,
            },
            tune_config=ray.tune.TuneConfig(
                trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",  # not the whole config in a name
                metric=space.metric,
                mode=space.mode,
                num_samples=space.num_samples,
                scheduler=_scheduler(space, cfg.schedule.epochs),
                search_alg=_searcher(space),
            ),
            run_config=ray.tune.RunConfig(
                name="tuner",
                storage_path=search_dir,
                failure_config=ray.tune.FailureConfig(max_failures=space.max_trial_failures),
                callbacks=[CloseStoppedTrials()],
                verbose=1,
            ),
        )
    results = tuner.fit()
    rows = results_table(results, space)
    write_run_file(search_dir, "results.csv", to_csv(rows))
    summary: dict[str, Any] = {"search_dir": search_dir, "rows": rows, "errors": results.num_errors}
    # Tune returns normally after Ctrl-C; trials missing or cut short (no scheduler stops a FIFO trial) say so.
    expected = space.num_samples * math.prod(len(args) for dist, args in space.params.values() if dist == "grid")
    cut_short = [r for r in rows if space.scheduler["type"] == "fifo" and r["status"] == "STOPPED"]
    summary.update(interrupted=len(rows) < expected or bool(cut_short), done=len(rows) - len(cut_short), expected=expected)
    finished = [r for r in rows if r[space.metric] is not None]
    if finished:
        best = results.get_best_result(space.metric, space.mode, scope="last")
        best_cfg = trial_config(cfg.to_dict(), best.config["params"], f"{search_dir}/trials", "", "")
        best_yaml = yaml.safe_dump({k: v for k, v in best_cfg.to_dict().items() if k not in ("run", "tracking")}, sort_keys=False)
        write_run_file(search_dir, "best_config.yaml", best_yaml)
        summary.update(
            best=rows[0], best_config=f"{search_dir}/best_config.yaml", best_checkpoint=best.metrics.get("checkpoint_path")
        )
    if parent:
        _close_parent(parent, rows, summary, space, "KILLED" if summary["interrupted"] else "FINISHED")
    return summary


def _parent_run(cfg: Config, space: Space, name: str, search_dir: str, read_file, write_file):
    """The search's MLflow run: its trials' runs nest under it."""
    from rn50_ray import tracking

    parent_cfg = load_config([], {**flatten(cfg.to_dict()), "run.name": f"search-{name}"})
    known = json.loads(read_file(search_dir, PARENT_FILE) or "{}")
    tracked = tracking.open_run(parent_cfg, search_dir, lambda n: json.dumps(known) if known else None,
                                lambda n, text: write_file(search_dir, PARENT_FILE, text))  # fmt: skip
    if tracked and not tracked.resumed:
        from mlflow import MlflowClient

        client = MlflowClient(tracked.uri)
        client.set_tag(tracked.run_id, "rn50.search_space", Path(space.source).name)
        for key in ("metric", "mode", "num_samples", "search"):
            client.set_tag(tracked.run_id, f"search.{key}", str(getattr(space, key)))
        client.set_tag(tracked.run_id, "search.scheduler", space.scheduler["type"])
    return tracked


def _close_parent(parent, rows: list[dict[str, Any]], summary: dict[str, Any], space: Space, status: str) -> None:
    import tempfile

    from mlflow import MlflowClient

    client = MlflowClient(parent.uri)
    if summary.get("best"):
        best = summary["best"]
        client.set_tag(parent.run_id, "best_trial", best["trial"])
        client.log_metric(parent.run_id, f"best_{space.metric}", best[space.metric])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "results.csv").write_text(to_csv(rows))
        client.log_artifact(parent.run_id, str(Path(tmp) / "results.csv"))
        plot = _trials_plot(rows, space, Path(tmp) / "trials.png")
        if plot:
            client.log_artifact(parent.run_id, str(plot))
    client.set_terminated(parent.run_id, status)  # KILLED when interrupted: --resume reopens it


def _trials_plot(rows: list[dict[str, Any]], space: Space, out: Path) -> Path | None:
    done = [r for r in rows if r[space.metric] is not None]
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, len(done) * 0.8), 4))
    ax.bar([r["trial"][-12:] for r in done], [r[space.metric] for r in done])
    ax.set(ylabel=space.metric, title="Trials")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
