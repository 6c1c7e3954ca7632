"""One trial of a search: a whole Ray Train run, whose epoch ends reach Tune as results.

Each trial resolves its config (the search's base config, then the sampled params), trains in its own run
folder under SEARCH/trials with its own MLflow run (nested under the search's), and reports each epoch to Tune
with a Tune checkpoint that holds only the path of the Train checkpoint (a small file, not the weights).

Under PBT a trial can be restarted from another trial's Tune checkpoint with new hyperparameters. It then
trains on as a new segment of itself (its own Train run folder, `trial_<id>.pbt-<hash>`), starting from that
checkpoint with its own LR schedule and momentum (`run.init_from`), in the same MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.tune
from ray.util.queue import Empty, Queue

from rn50_ray import run_folder
from rn50_ray.config import Config
from rn50_ray.core.checkpoint import run_name_of, step_of
from rn50_ray.tracking import RUN_FILE
from rn50_ray.tracking.credentials import Secret
from rn50_ray.tracking.search import note_exploit

POINTER = "train_checkpoint.json"  # in a Tune checkpoint: where the trial's Train checkpoint is
SEGMENT_FILE = "pbt_segment"  # in a trial's first run folder: the Train run it trains in now


@dataclass(frozen=True)
class SearchSetup:
    """What every trial of a search shares, handed to the trainable with tune.with_parameters (so Tune's status
    lines show the searched keys only)."""

    base: dict[str, Any]  # the search's resolved base config
    trials_dir: str
    parent_run: str  # the search's MLflow run id, or ""
    log_models: str = "best"  # best | all | none: which trials' models reach MLflow
    log_checkpoints: str = "uri"  # uri | copy: a trial's best checkpoint in MLflow as its URI, or a copy
    credentials: Secret | None = None  # for a tracking server with authentication on: the search's, handed on
    train_images: int | None = None  # the search's usable train images (None: synthetic), for a trial's plan

    @property
    def epochs(self) -> int:
        return self.base["schedule"]["epochs"]


def trial_config(setup: SearchSetup, params: dict[str, Any], segment: str, init_from: str = "") -> Config:
    overrides = {**params, "run.storage": setup.trials_dir, "run.name": segment, "tracking.parent_run_id": setup.parent_run}
    overrides.update({"run.init_from": init_from, "scale.check_resources": False})
    overrides.update(
        {"tracking.log_model": setup.log_models == "all", "tracking.log_checkpoint": setup.log_checkpoints == "copy"}
    )
    return Config.from_dict(setup.base, source="search base config").with_overrides(overrides, "search space params")


def train_trial(params: dict[str, Any], setup: SearchSetup) -> None:
    """The trainable: run the trial's Train run in a thread, passing each epoch's result on to Tune."""
    from rn50_ray.driver import run_training

    if setup.credentials is not None:  # a trial may run on a node without the head's credentials file
        setup.credentials.apply()
    trial_id = ray.tune.get_context().get_trial_id()
    segment, init_from = _segment(setup, trial_id, _tune_start())
    cfg = trial_config(setup, params, segment, init_from)
    if init_from and not run_folder.checkpoints(run_folder.run_uri(cfg)):  # once per exploit, not at its restarts
        print(
            f"tune: trial {trial_id} continues from {run_name_of(init_from)} at step {step_of(init_from)} with {params}",
            flush=True,
        )
        note_exploit(cfg, params, init_from)
    callback = ReportToTrial(run_folder.run_uri(cfg))
    outcome: dict[str, Any] = {}

    def train() -> None:
        try:
            run_training(cfg, callbacks=[callback])  # reads the manifest the search built: no scan
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
    """Runs in the Train controller: hands rank 0's epoch records and where their checkpoint lies (a URI in the
    run's storage, its query kept) to the trial's driver (mid-epoch checkpoints stay Train's business: Tune
    counts an iteration per epoch)."""

    def __init__(self, run_uri: str):
        self.queue, self.run_uri = Queue(actor_options={"num_cpus": 0}), run_uri

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if "val/loss" not in metrics[0]:
            return
        where = run_folder.join(self.run_uri, run_folder.basename(checkpoint.path)) if checkpoint is not None else None
        self.queue.put((dict(metrics[0]), where))


def _tune_start() -> str | None:
    """The Train checkpoint that the trial's Tune checkpoint points at, if Tune (re)started it from one."""
    ckpt = ray.tune.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as path:
        return json.loads((Path(path) / POINTER).read_text())["path"]


def _segment(setup: SearchSetup, trial_id: str, start: str | None) -> tuple[str, str]:
    """(the Train run name this start trains in, the checkpoint it starts from if not its own)."""
    first = f"trial_{trial_id}"
    current = current_segment(setup.trials_dir, trial_id)
    if start is None or run_name_of(start) == current:
        return current, ""  # a first start, or a restart of its own: Train resumes its own latest checkpoint
    segment = f"{first}.pbt-{hashlib.sha1(start.encode()).hexdigest()[:8]}"
    if segment != current:
        first_run = run_folder.join(setup.trials_dir, first)
        run_folder.write_file(first_run, SEGMENT_FILE, segment)
        mlflow_run = run_folder.read_file(first_run, RUN_FILE)
        if mlflow_run:  # the segment continues the trial's MLflow run
            run_folder.write_file(run_folder.join(setup.trials_dir, segment), RUN_FILE, mlflow_run)
    return segment, _existing_checkpoint(start)


def current_segment(trials_dir: str, trial_id: str) -> str:
    """The Train run a trial trains in now: its first, or the PBT segment it was last restarted into."""
    first = f"trial_{trial_id}"
    return run_folder.read_file(run_folder.join(trials_dir, first), SEGMENT_FILE) or first


def _existing_checkpoint(path: str) -> str:
    """`path`, or if its run has pruned it since (newest-K), that run's newest checkpoint."""
    run = run_folder.parent(path)
    names = run_folder.checkpoints(run)
    if run_folder.basename(path) in names or not names:
        return path
    print(f"tune: {path} was pruned; starting from the newest checkpoint of that trial, {names[-1]}", flush=True)
    return run_folder.join(run, names[-1])


def trial_run(setup: SearchSetup, trial_id: str) -> str:
    """The run folder a trial trains in now."""
    return run_folder.join(setup.trials_dir, current_segment(setup.trials_dir, trial_id))
