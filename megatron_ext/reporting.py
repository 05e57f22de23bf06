"""Rank 0's record of every step: ``metrics.jsonl``, the W&B run and the progress line.

One flat dict of values per step feeds all three, so the file tests read, the dashboard and
the log never disagree. Other ranks keep no record (their W&B logger is a null object).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

from launch.schema import Layout, RunConfig
from megatron_ext.env import RunEnv
from megatron_ext.metrics import MetricsLogger, format_progress, format_validation
from megatron_ext.step import StepResult
from megatron_ext.straggler import StragglerCheck
from megatron_ext.throughput import Throughput, peak_memory

log = logging.getLogger("megatron_ext.train")
METRICS_FILE = "metrics.jsonl"


def rewind(path: Path, start_step: int) -> None:
    """Drop the rows of the steps after ``start_step`` from a run folder's metrics file.

    A requeued job resumes from its last checkpoint in the same run folder and runs the steps
    after it again; without this the file held those steps twice, the lost timeline first.
    """
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True)
            if line.strip() and json.loads(line)["step"] <= start_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


class StepReporter:
    def __init__(self, cfg: RunConfig, env: RunEnv, layout: Layout, use_gpu: bool,
                 start_step: int) -> None:
        self._steps, self._log_interval = cfg.train.steps, cfg.train.log_interval
        self._use_gpu = use_gpu
        self._throughput = Throughput.from_config(cfg, env.world_size, use_gpu)
        run_dir = Path(cfg.run_dir)
        self._wandb = MetricsLogger.from_config(cfg, env=env, layout=layout, run_dir=run_dir,
                                                start_step=start_step)
        if env.rank == 0:
            rewind(run_dir / METRICS_FILE, start_step)
        self._file = open(run_dir / METRICS_FILE, "a") if env.rank == 0 else None
        self._start_step, self._started = start_step, time.monotonic()

    @property
    def wandb_offline_fallback(self) -> Optional[str]:
        """Set when W&B could not be reached and rank 0 logs offline instead."""
        return self._wandb.offline_fallback

    def step(self, step: int, result: StepResult, step_s: float, consumed_samples: int, *,
             checkpoint_blocking_s: float, straggler: Optional[StragglerCheck],
             val: Optional[dict[str, float]] = None) -> None:
        """``val``: the validation values (``val/...``) when this step ended with a pass."""
        values = {"loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                  "update_applied": int(result.applied), "data_digest": result.data_digest,
                  **self._throughput.values(result.tokens, step_s, consumed_samples),
                  **peak_memory(self._use_gpu), "checkpoint_blocking_s": checkpoint_blocking_s}
        if straggler is not None:
            values["straggler_worst_slowdown"] = straggler.worst_slowdown
        values.update(val or {})
        self._wandb.log(step, values)
        if self._file:
            self._file.write(json.dumps({"step": step, **values}) + "\n")
            self._file.flush()
        if step % self._log_interval == 0 or step == self._steps or val:
            elapsed = time.monotonic() - self._started
            eta = elapsed / (step - self._start_step) * (self._steps - step)
            log.info(format_progress(step, self._steps, result.loss, result.lr, result.grad_norm,
                                     step_s, values["tokens_per_s"], eta)
                     + (format_validation(val) if val else ""))

    def close(self, exit_code: int = 0, timeout_s: Optional[float] = None) -> None:
        """After the last step, or bounded by ``timeout_s`` on the way out of a failed or
        stopped attempt, so W&B keeps every step the attempt ran."""
        self._wandb.close(exit_code, timeout_s)
        if self._file and not self._file.closed:
            self._file.close()
