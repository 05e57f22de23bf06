"""Per-rank entry point: ``python -m megatron_ext.train <run_dir>/config.yaml``.

The loop reads top to bottom; each cross-cutting concern is one call in plain sight.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path

import torch

from launch.config import derive_layout, load
from launch.schema import Layout, RunConfig
from megatron_ext import parallel
from megatron_ext.cpu import cpu_mode
from megatron_ext.data import BatchPlan, build_train_dataset, microbatches
from megatron_ext.env import RunEnv
from megatron_ext.model import build_model, init_layout_independent
from megatron_ext.optim import build_optimizer, wrap_ddp
from megatron_ext.step import StepResult, train_step

log = logging.getLogger("megatron_ext.train")


def _setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its set-up chatter drowns progress


def _progress_line(step: int, steps: int, r: StepResult, step_s: float, eta_s: float) -> str:
    return (f"step {step:>6}/{steps} | loss {r.loss:.4f} | lr {r.lr:.3e} | grad norm "
            f"{r.grad_norm:.3f} | {step_s * 1000:.0f} ms/step | {r.tokens / step_s:,.0f} tokens/s"
            f" | eta {eta_s / 60:.1f} min")


def train(cfg: RunConfig, env: RunEnv, layout: Layout, use_gpu: bool) -> None:
    t = cfg.train
    parallel.init(layout, env, seed=t.seed, timeout_s=cfg.resilience.collective_timeout_s,
                  use_gpu=use_gpu)
    chunks, config = build_model(cfg.model, t, layout, use_gpu)
    if t.reproducible_init:
        init_layout_independent(chunks, cfg.model, t.seed)
    model = wrap_ddp(chunks, config, cfg)
    optimizer, scheduler = build_optimizer(model, config, cfg)
    run_dir = Path(cfg.run_dir)
    dataset = build_train_dataset(cfg, cache_dir=str(run_dir / "data_cache"))
    plan = BatchPlan(t.global_batch_size, t.micro_batch_size, layout.dp, parallel.dp_rank())
    log.info("training %s with %s on %d ranks (%s)", cfg.model.name, layout.describe(),
             env.world_size, "GPU" if use_gpu else "CPU, gloo")
    start_step, consumed = 0, 0
    metrics_file = open(run_dir / "metrics.jsonl", "a") if env.rank == 0 else None
    started = time.monotonic()
    for step in range(start_step + 1, t.steps + 1):
        step_start = time.monotonic()
        result = train_step(model, optimizer, scheduler, microbatches(dataset, plan, consumed),
                            num_microbatches=plan.num_microbatches, seq_length=t.seq_length,
                            micro_batch_size=t.micro_batch_size)
        consumed += t.global_batch_size
        step_s = time.monotonic() - step_start
        if metrics_file:
            metrics_file.write(json.dumps({"step": step, "loss": result.loss, "lr": result.lr,
                                           "grad_norm": result.grad_norm, "step_time_s": step_s,
                                           "tokens": result.tokens}) + "\n")
            metrics_file.flush()
        if step % t.log_interval == 0 or step == t.steps:
            eta = (time.monotonic() - started) / (step - start_step) * (t.steps - step)
            log.info(_progress_line(step, t.steps, result, step_s, eta))
    if metrics_file:
        metrics_file.close()
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
    with contextlib.nullcontext() if use_gpu else cpu_mode():
        try:
            train(cfg, env, derive_layout(cfg), use_gpu)
        finally:
            parallel.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
