"""Asynchronous distributed checkpoints with an atomic commit and exact resume.

Every rank writes its own shards with megatron-core's ``dist_checkpointing`` (torch_dist
format): the state is planned while training waits, then a forked process writes it while
training goes on (``AsyncCallsQueue``); on CPU the fork itself is the snapshot (copy on
write), on GPU megatron first copies the tensors to host memory. When every rank finished,
rank 0 commits (``launch.ckpt_commit``): manifest marker, rename ``.tmp`` -> final,
``latest`` pointer, retention. Each rank's writer also records the SHA-256 of its shards;
resume re-checks them, split over the ranks (``checkpoint.verify``, ``ckpt_files``).

What a checkpoint holds: model chunks (``model``, or ``model0``.. with virtual pipeline
stages), the optimizer (``checkpoint.optimizer_format``), the lr
scheduler, step, consumed samples (the data order is a pure function of it, see data.py),
every rank's RNG states and the resolved config.yaml.

Resharding on load: the model loads into any TP/PP/DP(/VPP) layout of the same model
(torch_dist stores global tensors). The optimizer follows ``checkpoint.optimizer_format``:
``dp_reshardable`` (default, every rank writes its own shard) reloads only where DP alone
changed, anything else stops with ``LayoutMismatch``; ``fully_reshardable`` reloads into any
layout. RNG states are per rank, restored only when the layout is unchanged; with dropout 0
(the default) that does not change the losses.
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from launch.schema import CheckpointConfig, Layout
from launch import ckpt_commit as commit
from megatron_ext.ckpt_files import (fresh_dir, listing, publish, remove, verify,
                                      verify_shards, with_shard_digests)
from megatron_ext.rng import rng_state, set_rng_state
from megatron_ext.replicate import S3Replicator

log = logging.getLogger("megatron_ext.checkpoint")


class CheckpointCorrupt(RuntimeError):
    """No intact committed checkpoint to resume from, and starting over would be wrong."""


class LayoutMismatch(RuntimeError):
    """The checkpoint is intact but its optimizer format cannot follow this layout change."""


@dataclass(frozen=True)
class Resume:
    """Where training continues: step 0 and no path when there was nothing to load."""

    step: int = 0
    consumed_samples: int = 0
    path: str | None = None


def _sharding_metadata(optimizer_format: str) -> dict[str, Any]:
    """As Megatron-LM builds it; replica groups of the shards include the CP ranks."""
    return ensure_metadata_has_dp_cp_group(
        {"distrib_optim_sharding_type": optimizer_format, "chained_optim_avoid_prefix": True})


def _differs_in_dp_only(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    return all(saved[k] == current[k] for k in saved if k != "dp")


def _device() -> torch.device:
    """Where small control tensors live: NCCL needs the GPU, gloo the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


class Checkpointer:
    """Saves and loads this rank's part of the training state; every method is collective."""

    def __init__(self, cfg: CheckpointConfig, *, model: list[torch.nn.Module],
                 optimizer: MegatronOptimizer, scheduler: OptimizerParamScheduler,
                 layout: Layout, config_yaml: str,
                 on_failure: Callable[[str], object] | None = None,  # S3 copy failures
                 ddp: Sequence[torch.nn.Module] = ()) -> None:
        self.cfg, self.model, self.optimizer, self.scheduler = cfg, model, optimizer, scheduler
        self.ddp = list(ddp)  # megatron's DDP wrappers, for overlap_param_gather (see save)
        self.root = Path(cfg.dir)
        self.layout = dataclasses.asdict(layout)
        self.config_yaml = config_yaml
        self.rank = dist.get_rank()
        self.last_committed_step: int | None = None
        self._queue = AsyncCallsQueue() if cfg.async_save else None
        self._in_flight: int | None = None
        self._requested = False
        self._last_save = time.monotonic()
        self.last_save_s: float | None = None
        """Seconds from the start of the last save to its commit (noticed at a step boundary,
        so up to a step more than the write): the time budget's save time (deadline.py)."""
        self._replica = S3Replicator.from_config(cfg, rank=self.rank, on_failure=on_failure)
        warm_up_writer()

    # -- what is saved -------------------------------------------------------------------
    def _model_keys(self) -> list[str]:
        return ["model"] if len(self.model) == 1 else [f"model{i}" for i in range(len(self.model))]

    def _sharded_state(self, optimizer_format: str, *, is_loading: bool,
                       with_rng: bool = True) -> dict[str, Any]:
        metadata = _sharding_metadata(optimizer_format)
        state: dict[str, Any] = {key: chunk.sharded_state_dict(metadata=metadata)
                                 for key, chunk in zip(self._model_keys(), self.model)}
        state["optimizer"] = self.optimizer.sharded_state_dict(state, is_loading=is_loading,
                                                               metadata=metadata)
        if with_rng:
            world = dist.get_world_size()
            state["rng_state"] = ShardedObject("rng_state", rng_state(), (world,), (self.rank,),
                                               replica_id=0)
        return state

    def _common_state(self, step: int, consumed_samples: int) -> dict[str, Any]:
        """Identical on every rank; megatron checks that and rank 0 writes it to common.pt."""
        return {"step": step, "consumed_samples": consumed_samples, "layout": self.layout,
                "optimizer_format": self.cfg.optimizer_format,
                "scheduler": self.scheduler.state_dict()}

    # -- saving --------------------------------------------------------------------------
    def request_save(self) -> None:
        """Signal-safe: the next ``maybe_save`` saves on every rank and waits for the commit.

        For the Slurm pre-timeout signal: the handler only sets a flag; the ranks agree on
        it at the step boundary, so a signal that reaches ranks at different steps is fine.
        """
        self._requested = True

    def maybe_save(self, step: int, consumed_samples: int) -> None:
        """Call after every step on every rank: commits finished writes, saves when due."""
        self._finalize(blocking=False)
        on_interval = self.on_interval(step)
        minutes = self.cfg.interval_minutes
        clock_due = minutes > 0 and time.monotonic() - self._last_save >= minutes * 60
        flags = torch.tensor([int(self._requested), int(clock_due)], device=_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # clocks and signals differ per rank
        requested, clock_due = bool(flags[0]), bool(flags[1])
        if on_interval or clock_due or requested:
            self.save(step, consumed_samples, blocking=requested)

    def on_interval(self, step: int) -> bool:
        """``maybe_save(step)`` saves for ``checkpoint.save_interval``."""
        return self.cfg.save_interval > 0 and step % self.cfg.save_interval == 0

    def save(self, step: int, consumed_samples: int, *, blocking: bool = False) -> None:
        """Start a checkpoint of the state after ``step``; ``blocking`` returns once committed."""
        self._requested = False
        if step in (self.last_committed_step, self._in_flight):
            self._finalize(blocking=blocking)
            return
        self._finalize(blocking=True)  # one save in flight: commits stay in step order
        self._last_save = time.monotonic()
        tmp = self.root / commit.tmp_dir(step)
        if self.rank == 0:
            fresh_dir(tmp)
        dist.barrier()
        fmt = self.cfg.optimizer_format
        strategy = FullyParallelSaveStrategyWrapper(  # spreads replicated writes over DP ranks
            TorchDistSaveShardedStrategy("torch_dist", 1), _sharding_metadata(fmt)["dp_cp_group"])
        for chunk in self.ddp:  # overlapped, this step's weights arrive in the next forward
            if chunk.ddp_config.overlap_param_gather:
                chunk.start_param_sync(force_sync=True)
        state = self._sharded_state(fmt, is_loading=False) | self._common_state(step,
                                                                                consumed_samples)
        request = with_shard_digests(
            dist_checkpointing.save(state, str(tmp), strategy, async_sharded_save=True),
            tmp, self.rank)
        request.add_finalize_fn(partial(self._commit, step))
        self._in_flight = step
        if self._queue is None:
            request.execute_sync()
            return
        self._queue.schedule_async_request(request)
        if blocking:
            self._finalize(blocking=True)

    def wait_for_commits(self) -> None:
        """Block until the save in flight (if any) is committed; for stops without a save."""
        self._finalize(blocking=True)

    def _finalize(self, *, blocking: bool) -> None:
        if self._queue is not None and self._in_flight is not None:
            self._queue.maybe_finalize_async_calls(blocking=blocking)

    def _commit(self, step: int) -> None:
        """Runs on every rank after all of them wrote their shards (megatron's finalize)."""
        if self.rank == 0:
            publish(self.root, step, self.config_yaml)
            self._replica.upload(self.root / commit.step_dir(step))
            retention = partial(commit.to_delete, keep_last=self.cfg.keep_last,
                                keep_every=self.cfg.keep_every, newest=step)
            for name in retention(listing(self.root)):
                remove(self.root / name)
            self._replica.prune(retention)  # by the copies S3 holds, after this upload
            log.info("checkpoint %s committed", self.root / commit.step_dir(step))
        dist.barrier()  # nobody sees the step as saved before it is visible
        self.last_committed_step, self._in_flight = step, None
        self.last_save_s = time.monotonic() - self._last_save

    @property
    def saving(self) -> bool:
        """A save is being written: a stop save would wait for it first."""
        return self._in_flight is not None

    def close(self, step: int, consumed_samples: int, *,
              s3_timeout_s: float | None = None) -> None:
        """After the last step: the exit save (``save_on_exit``), then wait for every commit.

        S3 copies still running may hold the exit ``s3_timeout_s`` more seconds (default
        ``checkpoint.s3_exit_timeout_s``; a stop signal passes the time left before the limit).
        """
        if self.cfg.save_on_exit:
            self.save(step, consumed_samples, blocking=True)
        self._finalize(blocking=True)
        if self._queue is not None:
            self._queue.close()
        self._replica.close(self.cfg.s3_exit_timeout_s if s3_timeout_s is None else s3_timeout_s)

    # -- loading -------------------------------------------------------------------------
    def load_latest(self) -> Resume:
        """Load the newest intact committed checkpoint of ``checkpoint.dir``, if any; when none
        is intact, of the complete S3 copies it lacks (each downloaded when its turn comes)."""
        found = self._from_rank0(lambda: listing(self.root))
        for name in commit.incomplete(found):
            self._warn("skipping incomplete checkpoint %s: no commit marker (its save was "
                       "interrupted)", self.root / name)
        local, tried = commit.load_order(found), []
        resume = self._first_intact(local, tried, download=False)
        if resume is None:
            copies = self._from_rank0(self._replica.complete_copies)[::-1]
            resume = self._first_intact([s for s in copies if s not in local], tried,
                                        download=True)
        if resume is not None:
            self._copy_kept(resume.step)
            return resume
        if tried:
            raise CheckpointCorrupt(f"no intact committed checkpoint in {self.root} (corrupt: "
                                    f"{', '.join(map(str, tried))}); refusing to start over")
        return Resume()

    def _first_intact(self, steps: list[int], tried: list[Path], *,
                      download: bool) -> Resume | None:
        """Load the first of ``steps`` that verifies (rank 0 first downloads each from S3 with
        ``download``; the others wait, within ``resilience.collective_timeout_s``); the
        corrupt ones are appended to ``tried``."""
        for step in steps:
            path = self.root / commit.step_dir(step)
            if download:
                self._from_rank0(lambda: self._replica.restore(step, self.root))
            problems = self._from_rank0(lambda: verify(path)) or self._verify_checksums(path)
            if not problems:
                return self._load(path)
            tried.append(path)
            message = f"checkpoint {path} is corrupt: {'; '.join(problems)}"
            if self.cfg.on_corrupt == "error":
                raise CheckpointCorrupt(f"{message} (checkpoint.on_corrupt=error; move it "
                                        "away to resume from an older one)")
            self._warn("%s; falling back to the previous committed checkpoint", message)
        return None

    def _copy_kept(self, resumed: int) -> None:
        """Rank 0 queues the S3 copies an earlier job was ended before finishing: the loaded
        checkpoint and the older committed ones, each re-hashed before it goes up (a corrupt
        folder is reported, never copied). Newer folders failed to load: none goes up."""
        if self.rank == 0:
            for step in commit.load_order(listing(self.root)):
                if step <= resumed:
                    self._replica.upload(self.root / commit.step_dir(step), check=True)

    def _verify_checksums(self, path: Path) -> list[str]:
        """``shard_problems`` under ``checkpoint.verify=checksums``, with the time it cost."""
        if self.cfg.verify != "checksums":
            return []
        start = time.monotonic()
        problems = shard_problems(path)
        if not problems and self.rank == 0:  # the resume time it costs (checkpoint.verify)
            log.info("checksums of %s verified in %.1f s", path, time.monotonic() - start)
        return problems

    @torch.no_grad()  # fp32 runs: the optimizer's main params are views of the weights
    def _load(self, path: Path) -> Resume:
        """Load a verified checkpoint. An error here ends the run on the rank that hit it
        (its peers may be inside one of the load's collectives, and the job ends at once on a
        dead rank): a checkpoint whose every byte matched its manifest is not corrupt, and a
        requeue tries it again (a transient I/O error must not condemn it). No fallback
        follows a failed load, so no rank keeps half of one (megatron's scheduler adds the
        loaded step count to its own)."""
        common = dist_checkpointing.load_common_state_dict(str(path))
        # Saved before uneven pipeline stages existed: those split evenly (Layout's defaults).
        common["layout"] = {**dataclasses.asdict(Layout(1, 1, 1, 1)), **common["layout"]}
        same_layout = common["layout"] == self.layout
        fmt = common["optimizer_format"]
        if fmt == "dp_reshardable" and not _differs_in_dp_only(common["layout"], self.layout):
            raise LayoutMismatch(
                f"{path} was saved with layout {common['layout']} and "
                "checkpoint.optimizer_format=dp_reshardable, which loads only into layouts that "
                f"differ in DP; this run has {self.layout}. Resume once with the saved layout "
                "and checkpoint.optimizer_format=fully_reshardable, then change the layout")
        state = dist_checkpointing.load(
            self._sharded_state(fmt, is_loading=True, with_rng=same_layout), str(path))
        for key, chunk in zip(self._model_keys(), self.model):
            chunk.load_state_dict(state[key])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if same_layout:
            set_rng_state(state["rng_state"])
        else:
            self._warn("%s was saved with layout %s; loaded into %s (model and optimizer "
                       "resharded, RNG states not restored)", path, common["layout"], self.layout)
        self.last_committed_step = common["step"]
        log.info("resumed from %s: step %d, %d samples consumed", path, common["step"],
                 common["consumed_samples"])
        return Resume(common["step"], common["consumed_samples"], str(path))

    def _from_rank0(self, fn):  # type: ignore[no-untyped-def]
        """Rank 0 looks at the filesystem once and every rank acts on the same answer."""
        box = [fn() if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _warn(self, fmt: str, *args: Any) -> None:
        if self.rank == 0:
            log.warning(fmt, *args)


def shard_problems(path: Path) -> list[str]:
    """Every rank re-hashes its share of the shards of ``path`` against their SHA-256 in the
    manifest: the checkpoint is read once, in parallel, and every rank gets the same verdict."""
    world = dist.get_world_size()
    found: list[Any] = [None] * world
    dist.all_gather_object(found, verify_shards(path, part=dist.get_rank(), parts=world))
    return [problem for problems in found for problem in problems]


# -- the writer process ------------------------------------------------------------------
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def warm_up_writer() -> None:
    """Start megatron's result-queue manager now, deaf to the signals that ask for a save.

    It is a spawned process that re-imports the training module (seconds); megatron starts
    it lazily on the first save, which would then block training for that long. Slurm sends
    SIGTERM (requeue, preemption) to every process of the job step: with default handlers the
    manager would die and the save that SIGTERM asks for would fail. An ignored signal stays
    ignored across the spawn's exec (a blocked one does not: Python unblocks it), so the
    manager starts with these ignored; SIGKILL still ends it with the job.
    """
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in _STOP_SIGNALS}
    try:
        filesystem_async._get_write_results_queue()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
