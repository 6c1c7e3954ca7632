"""A search's results: one row per trial, ranked, as the terminal, results.csv and MLflow show them."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable
from typing import Any

from rn50_ray import run_folder


def trial_id_of(result) -> str:
    """A trial's own id, from its folder (`trial_<id>`, see trial_dirname_creator); never from its metrics,
    which PBT may have copied from the trial it exploited."""
    if result.path:
        return run_folder.basename(result.path).removeprefix("trial_")
    return (result.metrics or {}).get("trial_id", "?")


def results_table(
    results: Iterable, params: Iterable[str], metric: str, mode: str, epochs: int, last_record: Callable[[str], dict | None]
) -> list[dict[str, Any]]:
    """One row per trial, ranked: its id, its current hyperparameters (Tune's config of the trial), its own last
    epoch record (from its run folder, through `last_record(trial_id)`) and its status. Nothing comes from
    Tune's last result, which may be another trial's: PBT hands an exploiting trial the donor's last result."""
    rows = []
    for r in results:
        trial = trial_id_of(r)
        record = last_record(trial) or {}
        done = record.get("epoch", 0)
        status = "ERROR" if r.error else ("STOPPED" if done < epochs else "FINISHED")
        rows.append({"trial": trial, **{k: (r.config or {}).get(k) for k in params}, metric: record.get(metric), "epochs": done,
                     "status": status})  # fmt: skip
    have = sorted((r for r in rows if r[metric] is not None), key=lambda r: r[metric], reverse=mode == "max")
    return have + [r for r in rows if r[metric] is None]


def last_record(run: str) -> dict[str, Any] | None:
    """The last epoch record in a run folder's metrics.jsonl."""
    lines = (run_folder.read_file(run, "metrics.jsonl") or "").strip().splitlines()
    return json.loads(lines[-1]) if lines else None


def to_csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
