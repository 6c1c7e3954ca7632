"""The search's results table: one row per trial, with that trial's own identity, hyperparameters and metrics,
whatever PBT copied into Tune's view of it. No Ray cluster: Tune's results are plain records here."""

from dataclasses import dataclass, field
from typing import Any

from rn50_ray.tune.results import results_table, to_csv


@dataclass
class TuneResult:
    """The fields of ray.tune.Result that the table reads."""

    path: str | None
    config: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    error: Exception | None = None


def test_a_donors_result_copied_onto_the_exploiting_trial_stays_the_donors():
    # The shape of the failing PBT search: trial 00001 exploited 00000 at its last epoch, and Tune's result
    # for 00001 is 00000's last result (its trial_id, metrics and iteration), as PBT's _exploit copies it.
    donor_result = {"trial_id": "d21ef_00000", "val/top1": 61.0, "training_iteration": 3, "epoch": 3}
    results = [
        TuneResult("/s/tuner/trial_d21ef_00000", {"optim.lr_per_256": 0.05, "optim.momentum": 0.9},
                   dict(donor_result)),
        TuneResult("/s/tuner/trial_d21ef_00001", {"optim.lr_per_256": 0.06, "optim.momentum": 0.85},
                   dict(donor_result)),
        TuneResult("/s/tuner/trial_d21ef_00002", {"optim.lr_per_256": 0.2, "optim.momentum": 0.8},
                   {"trial_id": "d21ef_00002"}, RuntimeError("boom")),
    ]  # fmt: skip
    own = {  # each trial's last epoch record in its own run folder
        "d21ef_00000": {"epoch": 3, "val/top1": 61.0},
        "d21ef_00001": {"epoch": 3, "val/top1": 58.5},
        "d21ef_00002": None,
    }
    rows = results_table(results, ["optim.lr_per_256", "optim.momentum"], "val/top1", "max", 3, own.get)
    assert [r["trial"] for r in rows] == ["d21ef_00000", "d21ef_00001", "d21ef_00002"]  # ranked; one row each
    assert rows[1] == {
        "trial": "d21ef_00001", "optim.lr_per_256": 0.06, "optim.momentum": 0.85, "val/top1": 58.5, "epochs": 3,
        "status": "FINISHED",
    }  # fmt: skip
    assert rows[2]["status"] == "ERROR" and rows[2]["val/top1"] is None
    lines = to_csv(rows).splitlines()
    assert lines[0] == "trial,optim.lr_per_256,optim.momentum,val/top1,epochs,status" and len(lines) == 4


def test_a_trial_stopped_early_is_stopped_by_its_own_epochs():
    results = [TuneResult("/s/tuner/trial_a", {"optim.lr_per_256": 0.1}, {"trial_id": "b", "epoch": 2})]
    (row,) = results_table(results, ["optim.lr_per_256"], "val/top1", "max", 2, {"a": {"epoch": 1, "val/top1": 12.0}}.get)
    assert (row["trial"], row["epochs"], row["status"], row["val/top1"]) == ("a", 1, "STOPPED", 12.0)
