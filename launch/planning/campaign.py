"""A whole training campaign from the planner's best layout: days, GPU-hours, cost, goodput.

Pure arithmetic over ``planner.step_time``'s prediction (uncalibrated on GPUs) and
``time_limit.save_time_s``. Wall time W of the campaign, first order in the failure rate:
  compute  C = steps x step time, steps = train.tokens / (global_batch_size x seq_length);
  saves    every tau seconds of compute (checkpoint.save_interval steps or interval_minutes,
           whichever comes first; the final save only when neither is set), each blocking
           training for delta seconds: blocking B = (C / tau) x delta;
  failures the job fails every M = cluster.node_mtbf_hours / nodes hours; each failure loses
           the work since the last save (tau / 2 on average) and the restart R
           (cluster.restart_time_s): W = C + B + (W / M) (tau / 2 + R), so
           W = (C + B) / (1 - (tau / 2 + R) / M);
  goodput  C / W.
The lost share delta / tau + tau / (2 M) is least at Young's interval tau* = sqrt(2 delta M)
(J. W. Young, "A first order approximation to the optimum checkpoint interval", CACM 17(9),
1974; J. T. Daly, FGCS 22(3), 2006, shows it is the first-order term of the exact optimum).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from launch.planning.planner import PlannedLayout
from launch.planning.time_limit import rank_checkpoint_gb, save_time_s
from launch.schema import RunConfig

HOST_COPY_GB_S = 25.0
"""GB/s a GPU copies its checkpoint shard to host memory at, the part of an asynchronous save
that blocks training: PCIe Gen5 x16 is 64 GB/s per direction, device-to-host copies reach
about 40% of it. An assumption until a save is measured (set cluster.save_time_s)."""


@dataclass(frozen=True)
class Campaign:
    """One node count's schedule (module docstring); times in hours unless named otherwise."""

    nodes: int
    layout: str
    tokens_per_s_per_gpu: float
    step_time_s: float
    steps: int
    compute_hours: float
    checkpoint_interval_s: float
    save_blocking_s: float
    """Seconds one save blocks training (delta)."""
    checkpoint_blocking_hours: float
    failures: float
    """Expected failures over the campaign."""
    lost_work_hours: float
    """Work redone after failures (the time since the last save)."""
    restart_hours: float
    wall_hours: float
    days: float
    gpu_hours: float
    cost: Optional[float]
    """None when ``cluster.node_hour_price`` is 0 (not known)."""
    goodput: float
    optimal_interval_s: float
    """Young's interval for this failure rate and save cost."""
    optimal_save_interval: int
    """The same in steps, for ``checkpoint.save_interval``."""


def young_interval_s(save_blocking_s: float, mtbf_s: float) -> float:
    """The checkpoint interval that minimises expected lost time, sqrt(2 delta M) (Young 1974)."""
    return math.sqrt(2.0 * save_blocking_s * mtbf_s)


def save_blocking_s(cfg: RunConfig, best: PlannedLayout) -> float:
    """Seconds a save blocks training: ``cluster.save_time_s`` when measured; else the whole
    predicted write for a synchronous save, or the copy of the rank's shard to host memory
    (``HOST_COPY_GB_S``) for an asynchronous one."""
    if cfg.cluster.save_time_s:
        return cfg.cluster.save_time_s
    if not cfg.checkpoint.async_save:
        return save_time_s(cfg, best.layout)
    return rank_checkpoint_gb(cfg, best.layout) / HOST_COPY_GB_S


def checkpoint_interval_s(cfg: RunConfig, step_s: float, compute_s: float) -> float:
    """Seconds of compute between saves: the first of ``save_interval`` steps and
    ``interval_minutes``; the whole campaign when neither is set (only the final save)."""
    intervals = [compute_s]
    if cfg.checkpoint.save_interval:
        intervals.append(cfg.checkpoint.save_interval * step_s)
    if cfg.checkpoint.interval_minutes:
        intervals.append(cfg.checkpoint.interval_minutes * 60.0)
    return min(intervals)


def campaign(cfg: RunConfig, best: PlannedLayout) -> Campaign:
    """The schedule of ``train.tokens`` on ``cfg.cluster`` with layout ``best`` (module
    docstring), at ``cluster.step_time_s`` when measured, else the planner's step time. Failures that come faster than the work they lose make W infinite (goodput 0)."""
    c = cfg.cluster
    step_tokens = cfg.train.global_batch_size * cfg.train.seq_length
    steps = math.ceil(cfg.train.tokens / step_tokens)
    step_s = c.step_time_s or best.step_time_s  # a measured step time wins over the model
    compute_s = steps * step_s
    tau = checkpoint_interval_s(cfg, step_s, compute_s)
    delta = save_blocking_s(cfg, best)
    blocking_s = math.ceil(compute_s / tau) * delta
    mtbf_s = c.node_mtbf_hours * 3600.0 / c.nodes
    lost_share = (tau / 2 + c.restart_time_s) / mtbf_s
    wall_s = (compute_s + blocking_s) / (1 - lost_share) if lost_share < 1 else math.inf
    failures = wall_s / mtbf_s
    optimal = young_interval_s(delta, mtbf_s)
    wall_h = wall_s / 3600.0
    return Campaign(
        nodes=c.nodes, layout=best.describe(), tokens_per_s_per_gpu=step_tokens / step_s
        / c.world_size, step_time_s=step_s, steps=steps, compute_hours=compute_s / 3600.0,
        checkpoint_interval_s=tau, save_blocking_s=delta,
        checkpoint_blocking_hours=blocking_s / 3600.0, failures=failures,
        lost_work_hours=failures * tau / 2 / 3600.0,
        restart_hours=failures * c.restart_time_s / 3600.0, wall_hours=wall_h,
        days=wall_h / 24.0, gpu_hours=wall_h * c.world_size,
        cost=wall_h * c.nodes * c.node_hour_price if c.node_hour_price else None,
        goodput=compute_s / wall_s, optimal_interval_s=optimal,
        optimal_save_interval=max(1, round(optimal / step_s)))
