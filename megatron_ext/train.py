"""Per-rank entry point: ``python -m megatron_ext.train <run_dir>/config.yaml``.

The loop reads top to bottom; each cross-cutting concern is one call in plain sight.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from launch.config import derive_layout, load, to_yaml
from launch.schema import Layout, RunConfig
from megatron_ext import alerts as alert_kinds
from megatron_ext import parallel
from megatron_ext.alerts import Alerts
from megatron_ext.checkpoint import Checkpointer
from megatron_ext.cpu import cpu_mode
from megatron_ext.data import BatchPlan, build_train_dataset, microbatches
from megatron_ext.env import RunEnv
from megatron_ext.init_from import has_checkpoint, load_pretrained
from megatron_ext.metrics import MetricsLogger, format_progress
from megatron_ext.model import build_model, init_layout_independent
from megatron_ext.optim import build_optimizer, wrap_ddp
from megatron_ext.signals import StopSignals
from megatron_ext.step import StepResult, train_step
from megatron_ext.straggler import StragglerDetector
from megatron_ext.watchdog import Watchdog
from tools.flops import flops_per_token

log = logging.getLogger("megatron_ext.train")


def _setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its set-up chatter drowns progress


def _metrics(r: StepResult, step_s: float, tflop_per_token: float) -> dict[str, float]:
    tokens_per_s = r.tokens / step_s
    return {"loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm, "step_time_s": step_s,
            "tokens": r.tokens, "tokens_per_s": tokens_per_s,
            "tflops_per_s": tokens_per_s * tflop_per_token / max(parallel.world_size(), 1)}


def train(cfg: RunConfig, env: RunEnv, layout: Layout, use_gpu: bool, alerts: Alerts) -> None:
    t, run_dir = cfg.train, Path(cfg.run_dir)
    parallel.init(layout, env, seed=t.seed, timeout_s=cfg.resilience.collective_timeout_s,
                  use_gpu=use_gpu)
    chunks, config = build_model(cfg.model, t, layout, use_gpu)
    if t.reproducible_init:
        init_layout_independent(chunks, cfg.model, t.seed)
    if t.init_from and not has_checkpoint(cfg.checkpoint.dir):  # CPT start; a resume wins
        load_pretrained(chunks, t.init_from, cfg.model)
    model = wrap_ddp(chunks, config, cfg)
    optimizer, scheduler = build_optimizer(model, config, cfg)
    dataset = build_train_dataset(cfg, cache_dir=str(run_dir / "data_cache"))
    plan = BatchPlan(t.global_batch_size, t.micro_batch_size, layout.dp, parallel.dp_rank())
    ckpt = Checkpointer(cfg.checkpoint, model=chunks, optimizer=optimizer, scheduler=scheduler,
                        layout=layout, config_yaml=to_yaml(cfg))
    resume = ckpt.load_latest()
    start_step, consumed = resume.step, resume.consumed_samples
    metrics = MetricsLogger.from_config(cfg, rank=env.rank, layout=layout, run_dir=run_dir)
    watchdog = Watchdog.from_config(cfg, rank=env.rank, run_dir=run_dir, on_hang=functools.partial(
        alerts.send_now, alert_kinds.HANG, rank=env.rank))
    straggler = StragglerDetector.from_config(cfg, group=None, rank=env.rank, hostname=env.hostname)
    stop = StopSignals(cfg.cluster.signal)
    tflop_per_token = flops_per_token(cfg.model, t.seq_length) / 1e12
    metrics_file = open(run_dir / "metrics.jsonl", "a") if env.rank == 0 else None
    log.info("training %s with %s on %d ranks (%s) from step %d", cfg.model.name,
             layout.describe(), env.world_size, "GPU" if use_gpu else "CPU, gloo", start_step)
    alerts.send(alert_kinds.START, f"{cfg.model.name}, {layout.describe()}", rank=env.rank)
    started = time.monotonic()
    for step in range(start_step + 1, t.steps + 1):
        step_start = time.monotonic()
        result = train_step(model, optimizer, scheduler, microbatches(dataset, plan, consumed),
                            num_microbatches=plan.num_microbatches, seq_length=t.seq_length,
                            micro_batch_size=t.micro_batch_size)
        consumed += t.global_batch_size
        step_s = time.monotonic() - step_start
        watchdog.beat()
        values = _metrics(result, step_s, tflop_per_token)
        metrics.log(step, values)
        if metrics_file:
            metrics_file.write(json.dumps({"step": step, **values}) + "\n")
            metrics_file.flush()
        for report in straggler.step(step_s):
            log.warning("straggler: %s", report.describe())
            alerts.send(alert_kinds.STRAGGLER, report.describe(), rank=env.rank)
        if not math.isfinite(result.loss):  # every rank sees the same global loss
            alerts.send_now(alert_kinds.NAN_LOSS, f"loss {result.loss} at step {step}", rank=env.rank)
            raise FloatingPointError(f"loss is {result.loss} at step {step}; stopping (the last "
                                     f"committed checkpoint is step {ckpt.last_committed_step})")
        ckpt.maybe_save(step, consumed)
        if step % t.log_interval == 0 or step == t.steps:
            eta = (time.monotonic() - started) / (step - start_step) * (t.steps - step)
            log.info(format_progress(step, t.steps, result.loss, result.lr, result.grad_norm,
                                     step_s, values["tokens_per_s"], eta))
        if stop.requested(device="cuda" if use_gpu else "cpu"):
            log.warning("stop signal: saving step %d, then exiting for requeue", step)
            ckpt.save(step, consumed, blocking=True)
            raise SystemExit(stop.exit_code)
    ckpt.close(max(start_step, t.steps), consumed)
    watchdog.close()
    metrics.close(0)
    if metrics_file:
        metrics_file.close()
    alerts.send(alert_kinds.COMPLETE, f"finished {t.steps} steps", rank=env.rank)
    log.info("finished %d steps", t.steps)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m megatron_ext.train <run_dir>/config.yaml", file=sys.stderr)
        return 2
    cfg = load(args[0])
    env = RunEnv.from_env()
    _setup_logging(env.rank)
    use_gpu = torch.cuda.is_available()
    if not use_gpu:
        torch.set_num_threads(cfg.cluster.cpus_per_task)  # ranks share the cores; don't oversubscribe
    alerts = Alerts.from_config(cfg, rank=env.rank)
    with contextlib.nullcontext() if use_gpu else cpu_mode():
        try:
            train(cfg, env, derive_layout(cfg), use_gpu, alerts)
        except Exception as err:  # the alert names the rank and the error, then the rank dies
            alerts.send_now(alert_kinds.FAILURE, f"{type(err).__name__}: {err}", rank=env.rank)
            raise
        finally:
            alerts.close()
            parallel.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
