"""MLflow tracking: one MLflow run per training run, written from one place, exactly once.

The driver opens the MLflow run (or reopens it: its id is kept in the run folder as `mlflow.json`) and starts a
`MetricSink` actor on its own node; rank 0 sends metrics to it without waiting, so restarts, resizes and driver
restarts all continue the same MLflow run and no step is logged twice. Rooms:

- run.py        the run: tracking URI, reachability, open/reopen, provenance, results and delete
- sink.py       the MetricSink actor: buffered, retried, never stalls training
- artifacts.py  plots and the model (pt2)
- search.py     a Tune search's parent run and its trials' runs
- server.py     the cluster's supervised `mlflow server`
"""

from rn50_ray.tracking.run import (
    RUN_FILE,
    TrackedRun,
    check_tracking,
    delete_run,
    embedded_store,
    log_run_folder,
    open_run,
    resolve_uri,
    ui_url,
)

__all__ = [
    "RUN_FILE",
    "TrackedRun",
    "check_tracking",
    "delete_run",
    "embedded_store",
    "log_run_folder",
    "open_run",
    "resolve_uri",
    "ui_url",
]
