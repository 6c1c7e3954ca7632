"""`launch.py tune`: a Ray Tune search whose trials are whole Ray Train runs (see trial.py).

A failing trial is retried up to `max_trial_failures` times and never stops the search; `--resume` restores
the search and runs only the unfinished trials. The search's MLflow parent run is tracking/search.py's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import ray.tune
import yaml

from rn50_ray import run_folder
from rn50_ray.config import Config, flatten
from rn50_ray.core.run_plan import plan_run
from rn50_ray.errors import ConfigError, UserError
from rn50_ray.tracking import search as search_tracking
from rn50_ray.tracking.credentials import for_server
from rn50_ray.tune.results import last_record, results_table, to_csv
from rn50_ray.tune.spaces import Space
from rn50_ray.tune.trial import SearchSetup, current_segment, train_trial, trial_config, trial_run


class CloseStoppedTrials(ray.tune.Callback):
    """Ends the MLflow runs of trials whose driver Tune killed (a scheduler's stop, a crash) before the
    trial could end it; the MLflow side is tracking.search.close_killed_trial."""

    def __init__(self, search: SearchSetup):
        self.search = search  # not `setup`: ray.tune.Callback has a method of that name

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._close(trial, "KILLED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._close(trial, "FAILED")

    def _close(self, trial, status: str) -> None:
        try:
            cfg = trial_config(self.search, trial.config, current_segment(self.search.trials_dir, trial.trial_id))
        except ConfigError:
            return  # its params make no valid config: it failed before it had a run
        try:
            epoch = (last_record(run_folder.run_uri(cfg)) or {}).get("epoch", 0)  # its own, not a copied result
            plan = plan_run(cfg, self.search.train_images)  # the trial's own: its params may set the batch
            search_tracking.close_killed_trial(cfg, plan, status, epoch, self.search.epochs)
        except Exception as e:  # never the search's end; the trial's metrics are in its run folder either way
            print(f"tracking: could not close the MLflow run of trial {trial.trial_id} ({type(e).__name__}: {e})", flush=True)


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
    return _pbt_class()(
        epochs,
        time_attr="training_iteration",
        perturbation_interval=space.scheduler["perturbation_interval"],
        hyperparam_mutations=dict(space.scheduler["mutations"]),
        quantile_fraction=space.scheduler["quantile_fraction"],
        resample_probability=space.scheduler["resample_probability"],
        synch=space.scheduler["synch"],
    )


def _pbt_class():
    """Ray's PBT, minus exploits that cannot pay off. Ray's PBT may exploit at a trial's last epoch: the
    trial then restarts from the donor's checkpoint with nothing left to train, and ends carrying the
    donor's last result. Here a trial's last epoch is never a perturbation point."""
    from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

    class FinalEpochSafePBT(PopulationBasedTraining):
        def __init__(self, epochs: int, **kwargs):
            super().__init__(**kwargs)
            self.epochs = epochs

        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            if result.get(self._time_attr, 0) >= self.epochs:
                return TrialScheduler.CONTINUE  # the trial ends with this result, its own
            return super().on_trial_result(tune_controller, trial, result)

    return FinalEpochSafePBT


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


def check_cluster(space: Space, cfg: Config) -> None:
    """More than the cluster has for one trial is an error now, not a search that never starts."""
    from rn50_ray.driver import cluster_shortfall

    short = cluster_shortfall(cfg.min_workers, cfg.scale)
    if short:
        raise UserError(f"{space.source}: resources: one trial's {short}")


def trial_base(space: Space, cfg: Config) -> Config:
    """The command line's config with the space's `base` overrides and its trials' resources."""
    trial_scale = {
        "scale.workers": space.workers,
        "scale.cpus_per_worker": space.cpus_per_worker,
        "scale.gpus_per_worker": space.gpus_per_worker,
    }
    return cfg.with_overrides({**flatten(space.base), **trial_scale}, f"{space.source} (base, resources)")


def run_search(
    space: Space, cfg: Config, *, name: str, storage: str, resume: bool = False, rescan: bool = False
) -> dict[str, Any]:
    from rn50_ray.config import resolve
    from rn50_ray.data.checks import usable_dataset
    from rn50_ray.driver import connect

    cfg = resolve(trial_base(space, cfg))
    if cfg.scale.fault_tolerance == "replica":  # Tune hears of an epoch through ray.train.report, a barrier of all
        print("tune: trials run with --fault-tolerance restart: Ray 2.60 passes a trial's results to Tune through "
              "ray.train.report, a barrier of every worker that replica groups cannot hold", flush=True)  # fmt: skip
        cfg = cfg.with_overrides({"scale.fault_tolerance": "restart"}, "tune")
    if cfg.tracking.mode != "off":  # one store for the parent and every trial, even the embedded one
        from rn50_ray.tracking import resolve_uri

        cfg = cfg.with_overrides({"tracking.uri": resolve_uri(cfg)[0]})
    search_dir = run_folder.join(run_folder.absolute(storage), name)
    if not resume and run_folder.read_file(search_dir, "space.yaml") is not None:
        raise UserError(f"tune: a search named {name!r} exists in {storage}; pass --resume {name}, or a new --name")
    saved = run_folder.read_file(search_dir, "base_config.yaml") if resume else None
    if saved:  # the search's own config (data, tracking store), whatever this command line says
        cfg = Config.from_dict(yaml.safe_load(saved), source=f"{search_dir}/base_config.yaml")
    dataset = usable_dataset(cfg, rescan=rescan)  # scanned and screened once for the search; each trial reads its manifest
    connect(cfg)
    check_cluster(space, cfg)
    parent = search_tracking.open_parent(cfg, space, name, search_dir)
    setup = SearchSetup(
        cfg.to_dict(), run_folder.join(search_dir, "trials"), parent.run_id if parent else "",
        log_models=space.log_models, log_checkpoints=space.log_checkpoints,
        credentials=for_server(cfg.tracking.uri) if cfg.tracking.mode != "off" else None,
        train_images=len(dataset.train) if dataset else None,
    )  # fmt: skip
    # The trial's driver takes a sliver of a CPU; Train asks for the workers.
    trainable = ray.tune.with_resources(ray.tune.with_parameters(train_trial, setup=setup), {"CPU": 0.01})
    tuner_dir = run_folder.join(search_dir, "tuner")
    if resume:
        if not ray.tune.Tuner.can_restore(tuner_dir):
            raise UserError(f"tune --resume: no search to resume at {tuner_dir}")
        tuner = ray.tune.Tuner.restore(tuner_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        run_folder.write_file(search_dir, "space.yaml", Path(space.source).read_text())
        run_folder.write_file(search_dir, "base_config.yaml", cfg.to_yaml())
        tuner = ray.tune.Tuner(
            trainable,
            param_space=space.to_tune(),
            tune_config=ray.tune.TuneConfig(
                trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",  # not the whole config in a name
                metric=space.metric,
                mode=space.mode,
                num_samples=space.num_samples,
                scheduler=_scheduler(space, setup.epochs),
                search_alg=_searcher(space),
            ),
            run_config=ray.tune.RunConfig(
                name="tuner",
                storage_path=search_dir,
                failure_config=ray.tune.FailureConfig(max_failures=space.max_trial_failures),
                callbacks=[CloseStoppedTrials(setup)],
                verbose=1,
            ),
        )
    results = tuner.fit()
    rows = results_table(
        results, space.params, space.metric, space.mode, setup.epochs, lambda t: last_record(trial_run(setup, t))
    )
    csv_text = to_csv(rows)
    run_folder.write_file(search_dir, "results.csv", csv_text)
    summary: dict[str, Any] = {"search_dir": search_dir, "rows": rows, "errors": results.num_errors}
    # Tune returns normally after Ctrl-C; trials missing or cut short (no scheduler stops a FIFO trial) say so.
    expected = space.num_samples * math.prod(len(args) for dist, args in space.params.values() if dist == "grid")
    cut_short = [r for r in rows if space.scheduler["type"] == "fifo" and r["status"] == "STOPPED"]
    summary.update(interrupted=len(rows) < expected or bool(cut_short), done=len(rows) - len(cut_short), expected=expected)
    if rows and rows[0][space.metric] is not None:
        best = rows[0]
        best_cfg = trial_config(setup, {k: best[k] for k in space.params}, "best")
        best_yaml = yaml.safe_dump({k: v for k, v in best_cfg.to_dict().items() if k not in ("run", "tracking")}, sort_keys=False)
        run_folder.write_file(search_dir, "best_config.yaml", best_yaml)
        best_run = trial_run(setup, best["trial"])
        best_checkpoint = run_folder.best_checkpoint(best_run)
        summary.update(best=best, best_config=run_folder.join(search_dir, "best_config.yaml"), best_checkpoint=best_checkpoint)
        if setup.log_models == "best" and best_checkpoint and parent:  # the one model of the search MLflow keeps
            search_tracking.log_model_of(best_cfg, best_run, best_checkpoint)
    if parent:
        search_tracking.close_parent(parent, rows, csv_text, space.metric, "KILLED" if summary["interrupted"] else "FINISHED")
    return summary
