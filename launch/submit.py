"""Turn a validated run into a submitit job: local processes (default) or a Slurm allocation.

``rank_command`` and ``executor_params`` are pure; ``submit`` and ``follow`` do the I/O.
Every rank runs ``python -m megatron_ext.train <run_dir>/config.yaml`` as an argv list, so
no user value ever passes through a shell.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import submitit
from submitit.helpers import CommandFunction

from launch.schema import RunConfig


def rank_command(config_path: Path, python: str = sys.executable) -> list[str]:
    return [python, "-m", "megatron_ext.train", str(config_path)]


def executor_params(cfg: RunConfig) -> dict[str, Any]:
    """submitit parameters: one task per rank; on a GPU node one task per GPU."""
    c = cfg.cluster
    return {"nodes": c.nodes, "tasks_per_node": c.gpus_per_node, "timeout_min": c.timeout_min,
            "name": cfg.name}


def make_executor(cfg: RunConfig, folder: Path) -> submitit.Executor:
    if cfg.cluster.debug:
        executor: submitit.Executor = submitit.DebugExecutor(folder=folder)
    else:
        executor = submitit.LocalExecutor(folder=folder)
    params = executor_params(cfg)
    params.pop("name")  # the local executors take no job name
    executor.update_parameters(**params)
    return executor


def submit(cfg: RunConfig, config_path: Path) -> submitit.Job:
    executor = make_executor(cfg, Path(cfg.run_dir) / "logs")
    return executor.submit(CommandFunction(rank_command(config_path), cwd=str(Path.cwd())))


def follow(job: submitit.Job, poll_s: float = 0.5) -> int:
    """Stream rank 0's output while the job runs; the exit code says whether every rank finished."""
    stdout = job.task(0).paths.stdout
    offset = 0
    while True:
        done = job.done()
        if stdout.exists():
            with stdout.open() as f:
                f.seek(offset)
                chunk = f.read()
                offset = f.tell()
            sys.stdout.write(chunk)
            sys.stdout.flush()
        if done:
            break
        time.sleep(poll_s)
    failed = [t for t in range(job.num_tasks) if job.task(t).exception() is not None]
    for task in failed:
        print(f"rank {task} failed; its log: {job.task(task).paths.stderr}", file=sys.stderr)
    return 1 if failed else 0
