"""`--fault-tolerance replica`: per-step fault tolerance over torchft, through Ray Train 2.60's TorchftConfig.

Each worker is its own replica group. Every step starts with a quorum of the live replicas (torchft's
Lighthouse, started by Ray on the head); the step is planned for those that take part (`RunPlan.for_world`:
step t's images order[t·N:(t+1)·N] split among them by their participating rank, with the loss weights of that
many), its gradients are averaged over them (torchft's DDP), and it commits only if they all finished it
(`should_commit`); one that does not commit is trained again on the same images. A lost worker stops no one:
the others go on at the next step with one participant fewer, and Ray replaces only the lost replica group. The
replacement loads the last checkpoint, and at its first quorum copies the live state from a peer (torchft's
PGTransport): model, optimizer, LR schedule, grad scaler, EMA, progress (epoch, step, history) and RNG states.
A replica alone in its first quorum has no peer to copy from: the others have ended (Ray replaces a lost replica
even after the rest finished) or are all lost. It goes on from the run folder's newest checkpoint, which may be
newer than the one it loaded at its start, and ends at once where that is the run's last; so a late replacement
never trains the run again alone, nor writes over its checkpoints. (The peers stop heartbeating only after their
last checkpoint is stored, so a lone quorum sees it.)

What Ray 2.60 cannot do here, it does as in `restart` mode, and a line says so: a resize that changes the worker
count (elastic growth, a lost node that cannot be replaced) restarts the whole group from the last checkpoint.
Ray's `report` is a barrier of all workers, which a lost worker breaks: checkpoints are written to the run
folder by the step's participating rank 0 directly (atomically, newest K kept), and a start resumes from the
newest there. The core stays free of Ray and torchft: it sees a StepSync (core/sync.py) and a TrainContext.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from rn50_ray import run_folder
from rn50_ray.core.checkpoint import CHECKPOINT_PREFIX, load_first_readable, step_of
from rn50_ray.core.run_plan import RunPlan
from rn50_ray.ray_context import RayContext

TIMEOUT = timedelta(seconds=60)  # torchft's collectives and quorum; a quorum forms at once when replicas are alive


def torchft_config(gpus: bool):
    """Ray Train's TorchftConfig: the Lighthouse on the head; a quorum needs one replica (the others may be gone)."""
    from ray.train.v2.torch.torchft_config import TorchftConfig

    # A lost replica stops heartbeating: after 0.5 s the others form their quorum without it (the default, 5 s,
    # would hold them that long). The join timeout stays long, so a slow but live replica is waited for.
    lighthouse = {"min_replicas": 1, "heartbeat_timeout_ms": 500, "join_timeout_ms": 60_000}
    return TorchftConfig(lighthouse_kwargs=lighthouse, backend="nccl" if gpus else "gloo")


def _ddp_class():
    """torchft's DDP, with a comm hook that survives a peer lost mid-step. torchft 0.2.0's hook reads
    `work.get_future()._fut`; after a failed collective the manager hands out a dummy work whose future has no
    `_fut`, and the backward pass crashes instead of carrying on to a step that does not commit."""
    from torchft import DistributedDataParallel

    class SurvivingDDP(DistributedDataParallel):
        @staticmethod
        def _comm_hook(state, bucket):
            work = state.allreduce(bucket.buffer())
            work.wait()
            future = work.get_future()
            inner = getattr(future, "_fut", None)
            if inner is not None:
                return inner
            done = torch.futures.Future()  # this step will not commit: any gradient will do
            done.set_result(bucket.buffer())
            return done

    return SurvivingDDP


def quiet_torchft() -> None:
    """torchft logs every quorum and commit at INFO, from Python and from its Rust core (RUST_LOG): warnings only.
    Set before torchft is first used in the process (a worker; the driver, whose local Ray inherits it)."""
    os.environ.setdefault("RUST_LOG", "warn")
    for name in ("torchft", "torchft_quorums", "torchft_commits", "torchft_errors"):
        logging.getLogger(name).setLevel(logging.WARNING)


class ReplicaSync:
    """StepSync over a torchft Manager: the step's participants, its commit, and healing from a peer."""

    def __init__(self, trainer, plan: RunPlan, ctx: ReplicaContext):
        quiet_torchft()
        from torchft import Manager, ProcessGroupGloo, ProcessGroupNCCL
        from torchft.checkpointing.pg_transport import PGTransport

        self.trainer, self.plan, self.ctx, self.heals = trainer, plan, ctx, 0
        self.first = True
        device = trainer.device
        self.pg = ProcessGroupNCCL(timeout=TIMEOUT) if device.type == "cuda" else ProcessGroupGloo(timeout=TIMEOUT)
        transport = PGTransport(self.pg, timeout=TIMEOUT, device=device)
        self.manager = Manager(
            pg=self.pg,
            min_replica_size=1,
            load_state_dict=self._load,
            state_dict=trainer.state_dict,
            world_size=1,  # each worker is a replica group of its own
            rank=0,
            replica_id=f"rn50_{ctx.ray_rank}_{os.getpid()}",
            timeout=TIMEOUT,
            quorum_timeout=TIMEOUT,
            checkpoint_transport=transport,
            use_async_quorum=False,  # the step's plan depends on the quorum: know it before reading the batch
            init_sync=False,  # every replica builds the same initial weights (seeded); a heal brings later ones
        )
        progress = trainer.progress
        self.manager.load_state_dict({"step": progress.step, "batches_committed": progress.step * plan.global_batch})

    def _load(self, state: dict[str, Any]) -> None:
        """A heal: the peer's whole training state replaces this replica's."""
        self.trainer.load_state_dict(state)
        self.heals += 1
        p = self.trainer.progress
        self.ctx.log_always(f"replica: healed from a peer at step {p.step} (epoch {p.epoch + 1}, step {p.step_in_epoch} of it)")
        self.ctx.track_heal(p.step)

    def _catch_up(self) -> None:
        """Alone at this process's first step: the run folder's newest checkpoint, where it is ahead of this state."""
        names = self.ctx.storage("listing checkpoints", lambda: run_folder.checkpoints(self.ctx.run_uri))
        if not names or step_of(names[-1]) <= self.trainer.progress.step:
            return
        with self.ctx.open_checkpoint() as path:
            state, path, stack = load_first_readable(self.ctx, path)
            with stack:
                self.trainer.load_state_dict(state)
        p = self.trainer.progress
        self.manager.load_state_dict({"step": p.step, "batches_committed": p.step * self.plan.global_batch})
        self.heals += 1  # the loop reads its batches anew from this state
        self.ctx.log_always(
            f"replica: no live peer at this start; went on from the run's newest checkpoint {path} (step {p.step})"
        )

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        return _ddp_class()(self.manager, model)

    def begin_step(self) -> tuple[RunPlan, int]:
        self.manager.start_quorum()  # synchronous: heals before returning, where this replica is behind
        if self.first and not self.heals and self.manager.num_participants() == 1:
            self._catch_up()
        plan = self.plan.for_world(self.manager.num_participants())
        rank = self.manager.participating_rank()
        self.ctx.take_part(rank, plan.world_size)
        if self.first and not self.heals and self.trainer.progress.step and rank == 0:
            self.ctx.log(
                f"replica: the whole worker group started from the last checkpoint (step {self.trainer.progress.step}): "
                f"Ray 2.60 replaces single replicas only at a constant worker count, so this was a restart"
            )
        self.first = False
        return plan, rank

    def commit(self) -> bool:
        committed = self.manager.should_commit()
        if not committed:
            self.ctx.log(
                f"replica: step {self.trainer.progress.step + 1} did not commit (a replica dropped out); training it again"
            )
        return committed

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        from torch.distributed import ReduceOp

        t = t.to(torch.float64 if t.device.type == "cpu" else torch.float32).clone()
        self.manager.allreduce(t, reduce_op=ReduceOp.SUM).wait()
        return t

    def settle(self, model: nn.Module) -> None:
        """torchft's DDP does not broadcast buffers (its process group is a dummy of one): rank 0's BatchNorm
        statistics, sent to every participant as a sum in which the others put zeros."""
        buffers = list(self.trainer.model.buffers())
        flat = torch.cat([b.detach().reshape(-1).to(torch.float64) for b in buffers])  # one collective for all
        if self.manager.participating_rank() != 0:
            flat.zero_()
        flat = self.all_reduce_sum(flat)
        for b, part in zip(buffers, flat.split([b.numel() for b in buffers]), strict=True):
            b.copy_(part.reshape(b.shape).to(b.dtype))

    def close(self) -> None:
        self.manager.shutdown(wait=False)


class ReplicaContext(RayContext):
    """RayContext where each worker is a replica group: rank and world size are the step's participants', checkpoints
    bypass Ray's report barrier, and the tracker goes with participating rank 0."""

    def __init__(self, run_uri: str, tracker=None, init_from: str = "", storage_retry_s: float = 600.0, keep: int = 3):
        super().__init__(run_uri, tracker, init_from, storage_retry_s)
        self.ray_rank = self.world_rank  # the replica's id; world_rank becomes the step's participating rank
        self.tracker_handle, self.keep = tracker, keep
        self.preemption_poll_s = float("inf")  # Ray 2.60 registers no preemption watcher for replica groups

    def make_sync(self, trainer, plan: RunPlan) -> ReplicaSync:
        return ReplicaSync(trainer, plan, self)

    def take_part(self, rank: int, world_size: int) -> None:
        """The step's participating rank and their number: who logs, tracks and writes checkpoints."""
        self.world_rank, self.world_size = rank, world_size
        self.tracker = self.tracker_handle if rank == 0 else None

    def log_always(self, line: str) -> None:
        print(line, flush=True)

    def track_heal(self, step: int) -> None:
        if self.tracker_handle is not None:
            self.tracker_handle.healed.remote(step)

    @contextlib.contextmanager
    def open_checkpoint(self) -> Iterator[str | None]:
        """The newest complete checkpoint in the run folder (replica mode writes them without Ray's report)."""
        names = self.storage("listing checkpoints", lambda: run_folder.folders(self.run_uri, CHECKPOINT_PREFIX, strict=True))
        if not names:
            with super().open_checkpoint() as path:  # another run's (run.init_from), or none
                yield path
            return
        self.latest = names[-1]
        self.stored = run_folder.join(self.run_uri, names[-1])
        with run_folder.local_copy(self.stored) as path:
            yield path

    def preemption(self) -> dict[str, Any] | None:
        return None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str) -> None:
        if self.tracker is not None:
            import ray

            ray.get(self.tracker.settle.remote())
        if checkpoint_dir is None:
            return
        fs, base = run_folder.filesystem(self.run_uri)
        dir_name = f"{CHECKPOINT_PREFIX}{name}"
        self.storage(f"checkpoint {dir_name}", lambda: run_folder.put_folder(checkpoint_dir, fs, f"{base}/{dir_name}"))
        self.stored = run_folder.join(self.run_uri, dir_name)
        names = run_folder.checkpoints(self.run_uri)
        for old in names[: -self.keep]:
            self.storage(f"removing {old}", lambda old=old: fs.delete_dir(f"{base}/{old}"))
