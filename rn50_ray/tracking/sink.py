"""The one writer of an MLflow run's metrics: dedupes, buffers and retries; training waits for it only at a
report (a bounded `settle`), never through an outage.

A restart resumes from the last checkpoint and trains some steps again, so points at or below the
highest step already logged for a key are dropped: the run's history never holds a step twice. Writes
go out from a thread with exponential backoff; while the tracking server is away the points wait in
memory, and whatever is still unsent at `close` goes to `mlflow_unsent.jsonl` in the run folder, which
the next start replays. Plain Python: under Ray it runs as an actor on the driver's node.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

UNSENT = "mlflow_unsent.jsonl"
BATCH = 1000  # MLflow's log_batch limit on metrics per call


def quick_failing_http() -> None:
    """MLflow's client retries a request for minutes by default; the sink does its own backoff."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


class MetricSink:
    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        *,
        read_file: Callable[[str], str | None] | None = None,
        write_file: Callable[[str, str], None] | None = None,
        system_metrics: bool = False,
        flush_every_s: float = 2.0,
        rewind_to: int | None = None,
        credentials=None,
    ):
        """`credentials`: a tracking.credentials.Secret for a server with authentication on; this actor's
        process takes them into its environment (never a runtime_env, which the dashboard shows)."""
        quick_failing_http()
        if credentials is not None:
            credentials.apply()
        from mlflow import MlflowClient

        self.client, self.run_id = MlflowClient(tracking_uri), run_id
        self.tracking_uri = tracking_uri
        self.read_file, self.write_file = read_file, write_file
        self.lock = threading.Lock()
        self.send_lock = threading.Lock()  # one log_batch at a time: the thread's and settle()'s never send a point twice
        self.pending: list[tuple[str, float, int, int]] = []  # (key, value, timestamp ms, step)
        self.pending_tags: dict[str, str] = {}
        self.logged_max = self._logged_steps()
        if rewind_to is not None:  # training goes on from another run's checkpoint: its steps are new history
            self.logged_max = {k: min(v, rewind_to) for k, v in self.logged_max.items()}
        self.starts = 0
        self.down_since: float | None = None
        self.flush_every_s = flush_every_s
        self._replay_unsent()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="mlflow-sink", daemon=True)
        self.thread.start()
        self.monitor = self._start_system_metrics() if system_metrics else None

    def _logged_steps(self) -> dict[str, int]:
        try:
            keys = self.client.get_run(self.run_id).data.metrics
            return {k: max((m.step for m in self.client.get_metric_history(self.run_id, k)), default=-1) for k in keys}
        except Exception:  # unreachable now: nothing known, nothing dropped
            return {}

    def _replay_unsent(self) -> None:
        text = self.read_file(UNSENT) if self.read_file else None
        for line in (text or "").splitlines():
            key, value, ts, step = json.loads(line)
            self._add(key, value, ts, step)
        if text:
            print(f"tracking: replaying {len(text.splitlines())} metric points that an earlier run could not send", flush=True)
            if self.write_file:
                self.write_file(UNSENT, "")

    def _start_system_metrics(self):
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(self.run_id, sampling_interval=10, resume_logging=True, tracking_uri=self.tracking_uri)
            monitor.start()
            return monitor
        except Exception as e:  # psutil missing, or an old server: training goes on without them
            print(f"tracking: no system metrics ({type(e).__name__}: {e})", flush=True)
            return None

    def _add(self, key: str, value: float, ts: int, step: int) -> None:
        if step <= self.logged_max.get(key, -1):
            return  # trained again after a restart: this step is in the history already
        self.logged_max[key] = step
        self.pending.append((key, float(value), ts, step))

    # Called by rank 0 (through the actor), never waited on by training.
    def log(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        with self.lock:
            for key, value in metrics.items():
                self._add(key, value, ts, step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        with self.lock:
            self.pending_tags.update({k: str(v) for k, v in tags.items()})

    def started(self, world_size: int, step: int, tags: dict[str, Any]) -> None:
        """A worker group (re)started at `step`: count it, and chart the world size from there."""
        self.starts += 1
        self.set_tags({**tags, "world_size": world_size, "rn50.starts": self.starts})
        self.log({"world_size": world_size}, step)

    def healed(self, step: int) -> None:
        """A replica copied its state from a peer at `step` (--fault-tolerance replica): count it."""
        self.heals = getattr(self, "heals", 0) + 1
        self.set_tags({"rn50.heals": self.heals, "rn50.last_heal_step": step})

    def _send(self) -> bool:
        with self.send_lock:
            return self._send_batch()

    def _send_batch(self) -> bool:
        from mlflow.entities import Metric, RunTag

        with self.lock:
            batch, tags = self.pending[:BATCH], dict(self.pending_tags)
        if not batch and not tags:
            return True
        try:
            self.client.log_batch(
                self.run_id,
                metrics=[Metric(k, v, ts, step) for k, v, ts, step in batch],
                tags=[RunTag(k, v) for k, v in tags.items()],
            )
        except Exception as e:  # the server is away: keep everything and retry later
            if self.down_since is None:
                self.down_since = time.time()
                print(f"tracking: MLflow unreachable ({type(e).__name__}); buffering metrics and retrying", flush=True)
            return False
        with self.lock:
            del self.pending[: len(batch)]
            for k, v in tags.items():
                if self.pending_tags.get(k) == v:
                    del self.pending_tags[k]
        if self.down_since is not None:
            print(f"tracking: MLflow back after {time.time() - self.down_since:.0f} s; sending the buffered metrics", flush=True)
            self.down_since = None
        return True

    def _loop(self) -> None:
        delay = self.flush_every_s
        while not self.stop.wait(delay):
            ok = self._send()
            while ok and len(self.pending) >= BATCH:
                ok = self._send()
            delay = self.flush_every_s if ok else min(max(delay * 2, 1.0), 60.0)

    def flush(self, timeout_s: float = 30.0) -> int:
        """Try to send everything now; the number of points still unsent."""
        deadline = time.time() + timeout_s
        while (self.pending or self.pending_tags) and time.time() < deadline:
            if not self._send():
                time.sleep(1.0)
        return len(self.pending)

    def settle(self, timeout_s: float = 10.0) -> int:
        """Send what is queued now, before a report hands control to Ray Tune, whose schedulers may stop the
        trial right after it (PBT's exploit, ASHA's cut): points still queued would die with the trial. Returns
        at once while MLflow is away (the thread keeps retrying; training does not wait on an outage)."""
        deadline = time.time() + timeout_s
        while (self.pending or self.pending_tags) and self.down_since is None and time.time() < deadline:
            if not self._send():
                break
        return len(self.pending)

    def close(self, status: str = "FINISHED", timeout_s: float = 30.0) -> int:
        """Stop, flush, end the run. Unsent points go to the run folder with a warning."""
        self.stop.set()
        self.thread.join(timeout=5)
        if self.monitor is not None:
            self.monitor.finish()
        left = self.flush(timeout_s)
        if left and self.write_file:
            with self.lock:
                text = "".join(json.dumps(p) + "\n" for p in self.pending)
            self.write_file(UNSENT, text)
            print(f"tracking: warning: MLflow unreachable; {left} metric points saved to {UNSENT} in the run folder, "
                  "sent by the next start of this run", flush=True)  # fmt: skip
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as e:
            print(f"tracking: could not mark the MLflow run {status} ({type(e).__name__})", flush=True)
        return left
