"""MLflow for a search: the parent run its trials nest under, PBT exploits on a trial's run, and the runs of
trials that Tune killed.

MLflow params cannot change, which is what crashes Ray's MLflowLoggerCallback under PBT: a trial's params stay
its first config, and the values PBT gives it later are `hp/<key>` metrics from the step they took effect.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from rn50_ray import run_folder, tracking
from rn50_ray.config import Config
from rn50_ray.core.checkpoint import run_name_of, step_of
from rn50_ray.core.run_plan import RunPlan

PARENT_FILE = "mlflow_parent.json"  # in the search's folder: its MLflow run


def open_parent(cfg: Config, space, name: str, search_dir: str) -> tracking.TrackedRun | None:
    """The search's MLflow run (created, or reopened on --resume): its trials' runs nest under it."""
    parent_cfg = cfg.with_overrides({"run.name": f"search-{name}"})
    tracked = tracking.open_run(
        parent_cfg,
        search_dir,
        lambda _: run_folder.read_file(search_dir, PARENT_FILE),
        lambda _, text: run_folder.write_file(search_dir, PARENT_FILE, text),
    )
    if tracked and not tracked.resumed:
        from mlflow import MlflowClient

        client = MlflowClient(tracked.uri)
        client.set_tag(tracked.run_id, "rn50.search_space", Path(space.source).name)
        for key in ("metric", "mode", "num_samples", "search"):
            client.set_tag(tracked.run_id, f"search.{key}", str(getattr(space, key)))
        client.set_tag(tracked.run_id, "search.scheduler", space.scheduler["type"])
    return tracked


def close_parent(parent: tracking.TrackedRun, rows: list[dict[str, Any]], csv_text: str, metric: str, status: str) -> None:
    """The ranked table and a plot of the trials, the best trial as a tag, and the run's end (KILLED when
    interrupted: --resume reopens it)."""
    from mlflow import MlflowClient

    client = MlflowClient(parent.uri)
    done = [r for r in rows if r[metric] is not None]
    if done:
        client.set_tag(parent.run_id, "best_trial", done[0]["trial"])
        client.log_metric(parent.run_id, f"best_{metric}", done[0][metric])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "results.csv").write_text(csv_text)
        client.log_artifact(parent.run_id, str(Path(tmp) / "results.csv"))
        if done:
            client.log_artifact(parent.run_id, str(_trials_plot(done, metric, Path(tmp) / "trials.png")))
    client.set_terminated(parent.run_id, status)


def _trials_plot(done: list[dict[str, Any]], metric: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, len(done) * 0.8), 4))
    ax.bar([r["trial"][-12:] for r in done], [r[metric] for r in done])
    ax.set(ylabel=metric, title="Trials")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def log_model_of(cfg: Config, run: str, checkpoint: str) -> None:
    """Log a trial's model (the search's best) into that trial's MLflow run, found through its run folder."""
    from rn50_ray.tracking import artifacts

    known = run_folder.read_file(run, tracking.RUN_FILE)
    if known:
        with run_folder.local_copy(checkpoint) as local:
            artifacts.log_model(tracking.TrackedRun.from_json(known), cfg, local)


def note_exploit(cfg: Config, params: dict[str, Any], init_from: str) -> None:
    """Record a PBT exploit on the trial's MLflow run: the new values as `hp/<key>` metrics at the step they
    start from, and tags saying what was copied."""
    known = run_folder.read_file(run_folder.run_uri(cfg), tracking.RUN_FILE)
    if not known:
        return
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    tracked = tracking.TrackedRun.from_json(known)
    step, donor = step_of(init_from), run_name_of(init_from)
    try:
        client = MlflowClient(tracked.uri)
        exploits = int(client.get_run(tracked.run_id).data.tags.get("rn50.pbt_exploits", 0)) + 1
        now = int(time.time() * 1000)
        client.log_batch(
            tracked.run_id,
            metrics=[Metric(f"hp/{k}", float(v), now, step) for k, v in params.items() if _is_number(v)],
            tags=[RunTag("rn50.pbt_exploits", str(exploits)), RunTag("rn50.pbt_last", f"from {donor} at step {step}")],
        )
    except Exception as e:  # tracking never stops a trial
        print(f"tracking: could not record the exploit ({type(e).__name__}: {e})", flush=True)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def close_killed_trial(cfg: Config, plan: RunPlan, status: str, epoch: int, epochs: int) -> None:
    """End the MLflow run of a trial whose driver Tune killed before it could: log what its run folder holds
    and end it KILLED with the epoch it stopped at, FINISHED with its model if that was its last epoch, or
    FAILED for a trial that crashed. A run that its trial ended itself is left alone."""
    from mlflow import MlflowClient

    run = run_folder.run_uri(cfg)
    known = run_folder.read_file(run, tracking.RUN_FILE)
    if not known:
        return
    tracked = tracking.TrackedRun.from_json(known)
    client = MlflowClient(tracked.uri)
    if client.get_run(tracked.run_id).info.status != "RUNNING":
        return
    if status == "KILLED" and epoch >= epochs:  # stopped at its last rung: it did finish
        tracking.log_run_folder(cfg, plan, tracked, run, run_folder.best_checkpoint(run))
        client.set_terminated(tracked.run_id, "FINISHED")
        return
    tracking.log_run_folder(cfg, plan, tracked, run, None)
    client.set_tag(tracked.run_id, "rn50.stopped", f"by the search at epoch {epoch}" if status == "KILLED" else "crashed")
    client.set_terminated(tracked.run_id, status)
