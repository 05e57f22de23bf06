"""Per-rank entry point: ``python -m megatron_ext.train <run_dir>/config.yaml``.

The loop reads top to bottom; each cross-cutting concern is one call in plain sight.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from launch.config import derive_layout, load, to_yaml
from launch.eval_schema import describe as describe_validation
from launch.schema import EXIT_TRANSIENT, REQUEUE_REQUEST, Layout, RunConfig, TrainConfig
from megatron_ext import alerts as alert_kinds
from megatron_ext import nccl_net, node_check, parallel
from megatron_ext.alerts import Alerts
from megatron_ext.checkpoint import Checkpointer
from megatron_ext.cpu import cpu_mode
from megatron_ext.deadline import TimeBudget
from megatron_ext.data import BatchPlan, GlobalBatch, build_train_dataset, samples_to_read
from megatron_ext.env import RunEnv
from megatron_ext.exits import caused_by_a_peer, refuse_restart, transient
from megatron_ext.init_from import has_checkpoint, load_pretrained, vocab_rows
from megatron_ext.model import build_model, init_layout_independent
from megatron_ext.optim import build_optimizer, wrap_ddp
from megatron_ext.probe import PROBE_FILE, write_probe
from megatron_ext.reporting import METRICS_FILE, StepReporter
from megatron_ext.signals import StopSignals
from megatron_ext.spikes import NullSpikeDetector, SpikeDetector
from megatron_ext.step import StepResult, train_step
from megatron_ext.straggler import NullStragglerDetector, StragglerDetector, pipeline_position
from megatron_ext.validation import NullValidator, Validator
from megatron_ext.watchdog import EXIT_CODE_HANG, NullWatchdog, Watchdog, record_collectives
from launch.planning.memory import predict

log = logging.getLogger("megatron_ext.train")


def _setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its set-up chatter drowns progress


_MAX_NAN_SKIPS = 10
"""Consecutive non-finite steps after which ``train.on_nan=skip`` stops anyway: by then the
weights, not a bad batch, are the problem, and skipping on would burn the allocation."""
_FLUSH_TIMEOUT_S = 30.0  # a hung rank waits at most this for W&B to write its last records
# (exceptions and SystemExit need nothing: wandb's own atexit hook finishes the run; os._exit
# skips it)


class NonFiniteLoss(FloatingPointError):
    """Raised on every rank at once; rank 0 already alerted, so no failure alert follows."""


@dataclass
class Training:
    """Everything a step touches, built once per launch."""

    model: list[torch.nn.Module]
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    dataset: Any
    plan: BatchPlan
    ckpt: Checkpointer
    validation: Validator | NullValidator


def build(cfg: RunConfig, env: RunEnv, layout: Layout, use_gpu: bool, alerts: Alerts
          ) -> Training:
    """Process groups, model (random, reproducible or pretrained), optimizer, data, checkpointer."""
    t, run_dir = cfg.train, Path(cfg.run_dir)
    parallel.init(layout, env, seed=t.seed, timeout_s=cfg.resilience.collective_timeout_s,
                  use_gpu=use_gpu)
    chunks, config = build_model(cfg.model, t, layout, use_gpu,
                                 vocab_rows(cfg.checkpoint.dir, cfg.model, layout.tp),
                                 kernels=cfg.kernels)
    if t.reproducible_init:
        init_layout_independent(chunks, cfg.model, t.seed)
    if t.init_from and not has_checkpoint(cfg.checkpoint.dir):  # CPT start; a resume wins
        load_pretrained(chunks, t.init_from, cfg.model, verify=cfg.checkpoint.verify)
    model = wrap_ddp(chunks, config, cfg)
    optimizer, scheduler = build_optimizer(model, config, cfg)
    dataset = build_train_dataset(cfg, cache_dir=str(run_dir / "data_cache"))
    plan = BatchPlan(t.global_batch_size, t.micro_batch_size, layout.dp, parallel.dp_rank())
    validation = Validator.from_config(cfg, plan, cache_dir=str(run_dir / "data_cache"))
    ckpt = Checkpointer(cfg.checkpoint, model=chunks, optimizer=optimizer, scheduler=scheduler,
                        layout=layout, config_yaml=to_yaml(cfg),
                        on_failure=functools.partial(alerts.send, alert_kinds.CHECKPOINT_FAILURE,
                                                     rank=env.rank), ddp=model)
    return Training(model, optimizer, scheduler, dataset, plan, ckpt, validation)


def _start_fields(cfg: RunConfig, layout: Layout, env: RunEnv, use_gpu: bool) -> dict[str, str]:
    fields = {"model": cfg.model.name, "layout": layout.describe(),
              "ranks": f"{env.world_size} on {cfg.cluster.name}",
              "validation": describe_validation(cfg)}
    if use_gpu:  # the prediction is for GPU memory
        memory = predict(cfg, layout)
        fields["predicted memory"] = (f"{memory.peak_gib:.1f} GiB allocated, "
                                      f"{memory.required_gib:.1f} GiB needed per GPU "
                                      f"of {cfg.cluster.gpu_memory_gib:g}")
    return fields


def _check_loss(result: StepResult, step: int, streak: int, cfg: RunConfig, env: RunEnv,
                alerts: Alerts, ckpt: Checkpointer) -> int:
    """The new count of consecutive non-finite steps (loss or gradient); raises
    ``NonFiniteLoss`` to stop."""
    if math.isfinite(result.loss) and result.grads_finite:
        return 0
    streak += 1
    on_nan = cfg.train.on_nan
    what = f"loss {result.loss} at step {step}" if not math.isfinite(result.loss) else \
        f"non-finite gradient (loss {result.loss:.4f}) at step {step}"
    stop = on_nan == "stop" or streak >= _MAX_NAN_SKIPS
    if env.rank == 0:  # every rank sees the same global loss; one alert is enough
        kind = alert_kinds.NAN_LOSS if stop else alert_kinds.NAN_SKIPPED
        action = "stopping" if stop else "step skipped (train.on_nan=skip), no update applied"
        alerts.send(kind, f"{what} ({streak} in a row); {action}", rank=env.rank)
        if stop:
            alerts.flush(timeout_s=10.0)
    if stop:
        ckpt.wait_for_commits()  # a save still being written holds pre-NaN weights: keep it
        raise NonFiniteLoss(f"{what}, {streak} in a row; stopping (train.on_nan={on_nan}); the "
                            f"last committed checkpoint is step {ckpt.last_committed_step}")
    log.warning("%s: step skipped, no update applied (train.on_nan=skip)", what)
    return streak


def train_batch(run: Training, t: TrainConfig, consumed: int) -> StepResult:
    """One optimizer step on the global batch that starts after ``consumed`` samples."""
    batch = GlobalBatch(run.dataset, run.plan, consumed, counts=parallel.reads_for_replica())
    return train_step(run.model, run.optimizer, run.scheduler, iter(batch),
                      num_microbatches=run.plan.num_microbatches, seq_length=t.seq_length,
                      micro_batch_size=t.micro_batch_size, data_digest=batch.digest)


@dataclass
class Loop:
    """The body of the training loop: a step and, in order, every concern that follows it.

    ``train()`` calls ``step`` for each step; benchmarks/throughput.py times the same call,
    once as built here and once with null watchdog and straggler detector (``replace``).
    """

    cfg: RunConfig
    env: RunEnv
    run: Training
    alerts: Alerts
    report: StepReporter
    watchdog: Watchdog | NullWatchdog
    straggler: StragglerDetector | NullStragglerDetector
    spikes: SpikeDetector | NullSpikeDetector
    stop: StopSignals
    use_gpu: bool
    nan_streak: int = 0

    @classmethod
    def start(cls, cfg: RunConfig, env: RunEnv, layout: Layout, use_gpu: bool, alerts: Alerts,
              run: Training, start_step: int, watchdog: Watchdog | NullWatchdog) -> "Loop":
        report = StepReporter(cfg, env, layout, use_gpu, start_step)
        watchdog.context = lambda: f"last committed checkpoint: step {run.ckpt.last_committed_step}"
        watchdog.before_exit = functools.partial(report.close, EXIT_CODE_HANG, _FLUSH_TIMEOUT_S)
        straggler = StragglerDetector.from_config(
            cfg, group=None, rank=env.rank, hostname=env.hostname,
            role=pipeline_position(parallel.pp_rank(), layout.pp))
        budget = TimeBudget.agreed(cfg.cluster, rank=env.rank,
                                   device="cuda" if use_gpu else "cpu")
        return cls(cfg, env, run, alerts, report, watchdog, straggler,
                   SpikeDetector.from_config(cfg, rank=env.rank),
                   StopSignals(cfg.cluster.signal, budget), use_gpu)

    def step(self, step: int, consumed: int) -> int:
        """Run ``step`` and what follows it; the samples consumed after it."""
        run, env, t = self.run, self.env, self.cfg.train
        step_start = time.monotonic()
        result = train_batch(run, t, consumed)
        consumed += t.global_batch_size  # a skipped batch is consumed too, never retried
        step_s = time.monotonic() - step_start
        self.watchdog.beat(step)
        check = self.straggler.step(result.forward_s)
        for straggler_report in check.reports if check and env.rank == 0 else []:
            log.warning("straggler: %s", straggler_report.describe())  # the same on every rank
            self.alerts.send(alert_kinds.STRAGGLER, straggler_report.describe(), rank=env.rank,
                             about=straggler_report.who)
        self.nan_streak = _check_loss(result, step, self.nan_streak, self.cfg, env, self.alerts,
                                      run.ckpt)
        for spike in self.spikes.step(result.loss, result.grad_norm, result.applied):
            log.warning("spike: %s", spike.describe(step))
            self.alerts.send(alert_kinds.SPIKE, spike.describe(step), rank=env.rank)
        save_start = time.monotonic()
        save_bound = self.cfg.resilience.watchdog.save_timeout_s
        with self.watchdog.section("a checkpoint save", save_bound):
            run.ckpt.maybe_save(step, consumed)
        blocking_s = time.monotonic() - save_start
        self.report.step(step, result, step_s, consumed, checkpoint_blocking_s=blocking_s,
                         straggler=check, val=self.validate(step))
        if self.stop.requested(device="cuda" if self.use_gpu else "cpu", step_s=step_s,
                               save_s=run.ckpt.last_save_s,  # a stop save waits for these:
                               save_pending=run.ckpt.saving or run.ckpt.on_interval(step + 1)):
            log.warning("%s: saving step %d, then exiting for requeue", self.stop.reason, step)
            with self.watchdog.section("the stop save", save_bound):
                run.ckpt.save(step, consumed, blocking=True)
            # rank 0's S3 copy of it may use the time left before the limit
            run.ckpt.close(step, consumed, s3_timeout_s=self.stop.seconds_left())
            self.watchdog.close()  # no step follows; waiting for the copy is not a hang
            if self.stop.wants_requeue and env.rank == 0:
                (Path(self.cfg.run_dir) / REQUEUE_REQUEST).touch()
            raise SystemExit(self.stop.exit_code)
        return consumed

    def validate(self, step: int) -> dict[str, float]:
        """The validation pass when ``step`` is due one (after the save, so an async write
        overlaps it), with its rising-loss alerts; its time is no step's."""
        validation = self.run.validation
        if not validation.due(step):
            return {}
        with self.watchdog.section("validation", validation.timeout_s):
            val = validation.run(self.run.model, step)
        for rise in validation.rising if self.env.rank == 0 else []:
            log.warning("validation: %s", rise)
            self.alerts.send(alert_kinds.VAL_RISE, rise, rank=self.env.rank)
        return val

    def close(self, step: int, consumed: int) -> None:
        """After the last step: the exit save and pending commits, then the watchdog. The
        reporter closes last (``train``), after the completion alert went through its run."""
        with self.watchdog.section("the exit save", self.cfg.resilience.watchdog.save_timeout_s
                                   + self.cfg.checkpoint.s3_exit_timeout_s):  # and the S3 copies
            self.run.ckpt.close(step, consumed)
        self.watchdog.close()


def train(cfg: RunConfig, env: RunEnv, layout: Layout, use_gpu: bool, alerts: Alerts) -> None:
    t = cfg.train
    watchdog = Watchdog.from_config(cfg, rank=env.rank, run_dir=Path(cfg.run_dir),
                                    on_hang=functools.partial(alerts.send_now, alert_kinds.HANG,
                                                              rank=env.rank))
    with watchdog.section("start-up (process groups, model, checkpoint load)",
                          cfg.resilience.watchdog.first_step_timeout_s):
        run = build(cfg, env, layout, use_gpu, alerts)
        if use_gpu:
            nccl_net.confirm(cfg, env.rank)  # the transport NCCL chose; not EFA: stop
        resume = run.ckpt.load_latest()
        to_read = samples_to_read(resume.consumed_samples, resume.step, t.steps,
                                  t.global_batch_size)
        if to_read > len(run.dataset):  # saved at a larger train.global_batch_size
            run.dataset = build_train_dataset(cfg, str(Path(cfg.run_dir) / "data_cache"),
                                              to_read)
    start_step, consumed = resume.step, resume.consumed_samples
    loop = Loop.start(cfg, env, layout, use_gpu, alerts, run, start_step, watchdog)
    log.info("training %s with %s on %d ranks (%s) from step %d", cfg.model.name,
             layout.describe(), env.world_size, "GPU" if use_gpu else "CPU, gloo", start_step)
    if env.rank == 0:
        alerts.send(alert_kinds.START, f"from step {start_step} of {t.steps}", rank=env.rank,
                    fields=_start_fields(cfg, layout, env, use_gpu))
        if loop.report.wandb_offline_fallback:
            alerts.send(alert_kinds.WANDB_OFFLINE, loop.report.wandb_offline_fallback,
                        rank=env.rank)
    for step in range(start_step + 1, t.steps + 1):
        consumed = loop.step(step, consumed)
    loop.close(max(start_step, t.steps), consumed)
    if env.rank == 0:
        alerts.send(alert_kinds.COMPLETE, f"finished {t.steps} steps", rank=env.rank)
        alerts.flush(timeout_s=10.0)  # W&B alerts go through the W&B run, which closes next
    loop.report.close()
    if env.rank == 0 and t.probe_warmup_steps:
        probe = write_probe(cfg, layout, Path(cfg.run_dir) / METRICS_FILE,
                            "gpu" if use_gpu else "cpu")
        log.info("probe: median step %.4f s over the %d steps after %d warm-up steps (%s)",
                 probe["step_time_s"], probe["steady_steps"], t.probe_warmup_steps, PROBE_FILE)
    log.info("finished %d steps", t.steps)


def _failed(err: Exception, cfg: RunConfig, env: RunEnv, alerts: Alerts) -> int:
    """The exit of a rank that failed: ``EXIT_TRANSIENT`` when a restart may cure it (the
    batch script requeues), else the error is re-raised and no restart is allowed."""
    what = f"{type(err).__name__}: {err}"
    if caused_by_a_peer(err):  # claiming the job's failure alert would blame this rank
        log.exception("exiting %d: a peer rank went away; it, or the launcher, says why",
                      EXIT_TRANSIENT)
        return EXIT_TRANSIENT
    if transient(err):
        alerts.send_now(alert_kinds.FAILURE, f"{what} (a restart may cure it)", rank=env.rank)
        log.exception("exiting %d: a restart may cure this", EXIT_TRANSIENT)
        return EXIT_TRANSIENT
    refuse_restart(cfg.run_dir, what)
    alerts.send_now(alert_kinds.FAILURE, f"{what} (not restarted: a rerun would fail the same "
                    "way)", rank=env.rank)
    raise err


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m megatron_ext.train <run_dir>/config.yaml", file=sys.stderr)
        return 2
    cfg = load(args[0])
    env = RunEnv.from_env()
    _setup_logging(env.rank)
    use_gpu = torch.cuda.is_available()
    if use_gpu:
        nccl_net.prepare(cfg, env.rank)
        record_collectives()  # before the NCCL group exists, for the watchdog's hang dump
    else:
        torch.set_num_threads(cfg.cluster.cpus_per_task)  # ranks share the cores; don't oversubscribe
    alerts = Alerts.from_config(cfg, rank=env.rank)
    if env.rank == 0:
        alert_kinds.clear_claims(cfg)
    if node_check.failed_in_step(cfg.cluster, env.local_rank, env.rank, alerts):
        alerts.close()
        return EXIT_TRANSIENT
    with contextlib.nullcontext() if use_gpu else cpu_mode():
        try:
            train(cfg, env, derive_layout(cfg), use_gpu, alerts)
        except NonFiniteLoss as err:  # alerted already; a traceback would add nothing
            log.error("%s", err)
            refuse_restart(cfg.run_dir, str(err))
            return 1
        except Exception as err:  # the alert names the rank and the error, then the rank dies
            return _failed(err, cfg, env, alerts)
        finally:
            alerts.close()
            parallel.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
