"""Predicted step and save time of a Slurm job, and the pre-timeout signal's lead (pure).

The ranks watch the time limit themselves (megatron_ext/deadline.py) with measured step and
save times; until they have measured any, they use the predictions written here into the
config. The signal stays as a backstop, so its lead must cover the step in flight, a second
one whose boundary the signal just missed, the stop save and the requeue.
"""
from __future__ import annotations

import dataclasses
import math

from launch.planning.memory import predict
from launch.planning.planner import step_time
from launch.schema import Layout, RunConfig

REQUEUE_SLACK_S = 60.0
""""A minute" after the stop save: the batch script requeues, and slurmctld checks time limits
and signals only every 30 s (its PERIODIC_TIMEOUT)."""

_GB = 1e9
_GIB = 2 ** 30


def rank_checkpoint_gb(cfg: RunConfig, layout: Layout) -> float:
    """GB one rank writes per checkpoint: its optimizer shard and, the fully parallel save
    spreading replicated tensors over the data-parallel ranks, 1/DP of its stage's weights
    (memory.py's per-GPU terms)."""
    memory = predict(cfg, layout)
    return (memory.weights_gib / layout.dp + memory.optimizer_gib) * _GIB / _GB


def save_time_s(cfg: RunConfig, layout: Layout) -> float:
    """Seconds one node takes to write its share of a checkpoint at ``storage_write_gbs``."""
    per_node_gb = rank_checkpoint_gb(cfg, layout) * cfg.cluster.gpus_per_node
    return per_node_gb / cfg.cluster.storage_write_gbs


def signal_lead_s(step_s: float, save_s: float) -> int:
    """Two steps (the one in flight and the next, when the signal just missed a boundary), a
    save and ``REQUEUE_SLACK_S``, in whole seconds as ``--signal`` takes them."""
    return math.ceil(2 * step_s + save_s + REQUEUE_SLACK_S)


def with_time_limit(cfg: RunConfig, layout: Layout) -> RunConfig:
    """A Slurm run's config with ``cluster.step_time_s`` / ``save_time_s`` predicted where
    unset and ``cluster.signal``'s lead raised to ``signal_lead_s``; local runs unchanged."""
    c = cfg.cluster
    if c.kind != "slurm":
        return cfg
    step_s = c.step_time_s or step_time(cfg, layout, cfg.train.micro_batch_size,
                                        cfg.train.recompute)
    save_s = c.save_time_s or save_time_s(cfg, layout)
    name, _, lead = c.signal.partition("@")
    signal = f"{name}@{max(int(lead), signal_lead_s(step_s, save_s))}"
    cluster = dataclasses.replace(c, step_time_s=round(step_s, 3), save_time_s=round(save_s, 3),
                                  signal=signal)
    return dataclasses.replace(cfg, cluster=cluster)


def describe(cfg: RunConfig) -> str:
    """The dry run's line: what the lead was derived from."""
    c = cfg.cluster
    return (f"time limit: {c.timeout_min} min; --signal={c.signal} (at least two steps of "
            f"{c.step_time_s:.0f} s, a save of {c.save_time_s:.0f} s and "
            f"{REQUEUE_SLACK_S:.0f} s); ranks stop on their own when the next step, a save and "
            f"{c.time_limit_margin_s:.0f} s no longer fit")
