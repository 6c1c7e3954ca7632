"""An MLflow run of a training run: the tracking URI (an embedded SQLite store by default), whether it is
reachable, creating or reopening the run with its params and provenance tags, the results at the end (files,
plots, checkpoint, model), and deleting a run that bad input stopped before it trained."""

from __future__ import annotations

import importlib.metadata
import json
import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rn50_ray import run_folder
from rn50_ray.config import Config, flatten
from rn50_ray.core.run_plan import RunPlan
from rn50_ray.errors import UserError
from rn50_ray.tracking.credentials import PASSWORD_VAR, USER_VAR, Secret, for_server
from rn50_ray.tracking.sink import quick_failing_http

RUN_FILE = "mlflow.json"
PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent


def embedded_store(storage: str) -> tuple[str, str]:
    """The laptop default: a SQLite store and an artifact folder beside the runs. SQLite cannot live on an
    object store, so with remote storage the store is ./runs on this machine (open_run says so)."""
    root = Path("runs" if run_folder.is_remote(storage) else storage).resolve()
    return f"sqlite:///{root / 'mlflow.db'}", (root / "mlartifacts").as_uri()


def sqlite_file(uri: str) -> Path | None:
    """The database file of a SQLite tracking URI; None for any other store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def make_store_folder(uri: str) -> None:
    """A SQLite store's folder, made where the store is first used, not where it is only named or checked."""
    if db := sqlite_file(uri):
        db.parent.mkdir(parents=True, exist_ok=True)


def resolve_uri(cfg: Config) -> tuple[str, str | None]:
    """(tracking URI, artifact root for a new experiment or None for the server's default). A SQLite store
    keeps its artifacts beside it (mlartifacts/), wherever the command runs: never MLflow's ./mlruns."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return embedded_store(cfg.run.storage)
    if db := sqlite_file(uri):
        return uri, (db.parent / "mlartifacts").as_uri()
    return uri, None


def unreachable(uri: str) -> str | None:
    """Why the tracking store cannot be used now, or None."""
    quick_failing_http()
    try:
        if uri.startswith(("http://", "https://")):
            import requests

            r = requests.get(uri.rstrip("/") + "/health", timeout=5)
            return None if r.ok else f"HTTP {r.status_code} from {uri}/health"
        if (db := sqlite_file(uri)) and not db.exists():
            # Made by the run's start, not by this check: a command refused later leaves no store behind.
            folder = next(p for p in db.parents if p.exists())
            return None if os.access(folder, os.W_OK) else f"{folder} is not writable"
        from mlflow import MlflowClient

        MlflowClient(uri).search_experiments(max_results=1)
        return None
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


def refused(uri: str) -> str | None:
    """For a tracking server: why it refuses this process's credentials (HTTP 401 or 403), or None. /health
    answers anyone, so an authenticated request tells."""
    if not uri.startswith(("http://", "https://")):
        return None
    import requests

    auth = (os.environ[USER_VAR], os.environ.get(PASSWORD_VAR, "")) if os.environ.get(USER_VAR) else None
    r = requests.get(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search", params={"max_results": 1}, auth=auth, timeout=10)
    return f"HTTP {r.status_code} {r.reason}" if r.status_code in (401, 403) else None


def authenticate(uri: str) -> Secret | None:
    """Take the credentials for the server at `uri` into this process (credentials.for_server), and check that
    the server accepts them: a UserError naming the URI and what to set where it does not, whatever
    tracking.mode says (a run must never go on untracked because of a password)."""
    secret = for_server(uri)
    if secret is not None:
        secret.apply()
    problem = refused(uri)
    if problem:
        who = f"the credentials of {secret.username!r}" if secret else "a request without credentials"
        raise UserError(
            f"tracking.uri: MLflow at {uri} refused {who} ({problem}); set {USER_VAR} and {PASSWORD_VAR}, or get the "
            f'cluster\'s with `eval "$(ssh HEAD python -m rn50_ray.tracking.server credentials --export)"`'
        )
    return secret


def _git_commit() -> str:
    """The checkout's commit; or RN50_GIT_COMMIT, which a client sets where the code travels without .git
    (`ray job submit --working-dir .` leaves it out: the README's submit command passes the commit)."""
    if os.environ.get("RN50_GIT_COMMIT"):
        return os.environ["RN50_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _version(*dists: str) -> str:
    """The installed version of the first of `dists` that is installed (read from its metadata: no import)."""
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def provenance_tags(cfg: Config, run_uri: str) -> dict[str, str]:
    return {
        "git_commit": _git_commit(),
        "ray_version": _version("ray"),
        "torch_version": _version("torch"),
        "torchvision_version": _version("torchvision"),
        "dali_version": _version("nvidia-dali-cuda120", "nvidia-dali-cuda130", "nvidia-dali-cuda110"),
        "mlflow_version": _version("mlflow"),
        "driver_host": socket.gethostname(),
        "rn50.run_uri": run_uri,
        "rn50.workers": cfg.scale.workers,
        "rn50.gpus_per_worker": str(cfg.scale.gpus_per_worker),
        "data_path": cfg.data.path,
    }


@dataclass
class TrackedRun:
    uri: str
    run_id: str
    experiment_id: str
    resumed: bool

    def to_json(self) -> str:
        return json.dumps({"uri": self.uri, "run_id": self.run_id, "experiment_id": self.experiment_id})

    @classmethod
    def from_json(cls, text: str) -> TrackedRun:
        known = json.loads(text)
        return cls(known["uri"], known["run_id"], known["experiment_id"], True)


def check_tracking(cfg: Config) -> str | None:
    """The tracking URI where MLflow answers and accepts this process's credentials; None where tracking is off or
    (under --tracking optional) unreachable. Bad credentials are a UserError in every mode. The driver calls it
    before Ray starts; open_run calls it again."""
    if cfg.tracking.mode == "off":
        return None
    uri, artifact_root = resolve_uri(cfg)
    if artifact_root and run_folder.is_remote(cfg.run.storage):
        print(
            f"tracking: an MLflow store cannot live on {cfg.run.storage}; this run's is {uri} on this machine "
            f"(pass --mlflow-uri to use a tracking server)",
            flush=True,
        )
    problem = unreachable(uri)
    if problem:
        message = f"tracking.uri: MLflow at {uri} is unreachable ({problem})"
        if cfg.tracking.mode == "required":
            raise UserError(f"{message}; start it, fix --mlflow-uri, or pass --tracking optional to train without it")
        print(f"tracking: warning: {message}; training without MLflow (--tracking optional)", flush=True)
        return None
    authenticate(uri)
    return uri


def open_run(cfg: Config, run_uri: str, read_file, write_file) -> TrackedRun | None:
    """Create the MLflow run of this training run, or reopen the one it already has."""
    uri = check_tracking(cfg)
    if uri is None:
        return None
    make_store_folder(uri)
    artifact_root = resolve_uri(cfg)[1]
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient(uri)
    known = json.loads(read_file(RUN_FILE) or "{}")
    if known.get("uri") == uri and known.get("run_id"):
        try:
            client.update_run(known["run_id"], status="RUNNING")
            print(f"tracking: continuing MLflow run {known['run_id']} at {uri}", flush=True)
            return TrackedRun(uri, known["run_id"], known["experiment_id"], True)
        except Exception as e:  # deleted, or another store: start a new one, and say so
            print(f"tracking: MLflow run {known['run_id']} not found ({type(e).__name__}); starting a new one", flush=True)
    exp_id = experiment_id(client, cfg.tracking.experiment, artifact_root)
    tags = provenance_tags(cfg, run_uri)
    if cfg.tracking.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id  # the UI nests the run under it
    run = client.create_run(exp_id, run_name=cfg.run.name, tags=tags)
    params = [Param(k, str(v)[:6000]) for k, v in flatten(cfg.to_dict()).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    tracked = TrackedRun(uri, run.info.run_id, exp_id, False)
    write_file(RUN_FILE, tracked.to_json())
    print(f"tracking: MLflow run {run.info.run_id} in experiment {cfg.tracking.experiment!r} at {uri}", flush=True)
    return tracked


# MLflow 3's UI has a GenAI view (traces, prompts) and a model-training view. It reads this tag where its
# GenAI/Model-training switch is off; where the switch is on (3.17's default), the view comes from the switch's
# per-browser setting (GenAI at first) or the `workflowType` URL parameter, so the links this project prints
# carry TRAINING_VIEW.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
TRAINING_VIEW = "workflowType=machine_learning"


def ui_url(server: str, experiment_id: str = "", run_id: str = "") -> str:
    """A link into the MLflow UI at `server` (http://...), opening in the model-training view."""
    path = "/#/experiments" + (f"/{experiment_id}" if experiment_id else "") + (f"/runs/{run_id}" if run_id else "")
    return f"{server.rstrip('/')}{path}?{TRAINING_VIEW}"


def experiment_id(client, name: str, artifact_root: str | None) -> str:
    """The experiment's id, made if it does not exist yet (with its artifacts under `artifact_root`), and tagged
    as model training either way."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_root, tags=EXPERIMENT_KIND)
    for key, value in EXPERIMENT_KIND.items():
        if experiment.tags.get(key) != value:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def log_results(
    tracked: TrackedRun, cfg: Config, plan, files: dict[str, str], history: list[dict[str, Any]], best: str | None
) -> None:
    """The end of a run: config and log files, plots, the best checkpoint and the model."""
    import tempfile

    from mlflow import MlflowClient

    from rn50_ray.tracking.artifacts import log_model, plots

    client = MlflowClient(tracked.uri)
    with tempfile.TemporaryDirectory(prefix="rn50-mlflow-") as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text)
            client.log_artifact(tracked.run_id, str(Path(tmp) / name))
        for path in plots(cfg, plan, history, Path(tmp) / "plots", files):
            client.log_artifact(tracked.run_id, str(path), "plots")
    if best and not cfg.tracking.log_checkpoint:  # where it lies, instead of a copy (a search's trials)
        client.set_tag(tracked.run_id, "rn50.best_checkpoint", best)
    if best and (cfg.tracking.log_checkpoint or cfg.tracking.log_model):
        with run_folder.local_copy(best) as local:
            if cfg.tracking.log_checkpoint:
                client.log_artifacts(tracked.run_id, local, "checkpoints/best")
            if cfg.tracking.log_model:
                log_model(tracked, cfg, local)


def log_run_folder(cfg: Config, plan: RunPlan, tracked: TrackedRun, run: str, best: str | None) -> None:
    """The run folder's config, epoch records and per-class val top-1, their plots (the confusion matrix's too,
    and the LR schedule of the run's plan), and (given `best`) the checkpoint and model."""
    from rn50_ray.core.per_class import CONFUSION_FILE, PER_CLASS_FILE

    text = run_folder.read_file(run, "metrics.jsonl") or ""
    history = [json.loads(line) for line in text.splitlines()]
    files = {"config.yaml": cfg.to_yaml(), "metrics.jsonl": text}
    for name in (PER_CLASS_FILE, CONFUSION_FILE):
        if found := run_folder.read_file(run, name):
            files[name] = found
    try:
        log_results(tracked, cfg, plan, files, history, best)
    except Exception as e:  # MLflow's artifact store (its own S3, a full disk) fails in many types: one line
        from mlflow import MlflowClient

        from rn50_ray.errors import StorageError
        from rn50_ray.storage import describe

        _, happened, todo = describe(e)
        where = MlflowClient(tracked.uri).get_run(tracked.run_id).info.artifact_uri
        raise StorageError(
            f"{where}: MLflow's artifact store: {happened}; {todo}, then run the same command again (the run trained to "
            f"its end in {run}; the rerun logs its results)"
        ) from None


def delete_run(tracked: TrackedRun) -> None:
    """Bad input stopped the run before its first checkpoint: leave no MLflow run behind either."""
    from mlflow import MlflowClient

    try:
        MlflowClient(tracked.uri).delete_run(tracked.run_id)
    except Exception as e:
        print(f"tracking: could not delete MLflow run {tracked.run_id} ({type(e).__name__})", flush=True)
