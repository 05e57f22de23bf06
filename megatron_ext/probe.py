"""A probe run's record: its steady-state step time, layout and cluster, in ``probe.json``.

Rank 0 writes it after the last step of a run with ``train.probe_warmup_steps`` > 0, from the
step times it logged to ``metrics.jsonl``; ``python -m tools.calibrate`` fits the planner's
step-time model to a set of them. The median of the steps after the warm-up, not the mean:
one step slowed by another process on the node (a log flush, a neighbour's job) moves a mean
of a few dozen steps but not the median.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

from launch.schema import Layout, RunConfig

PROBE_FILE = "probe.json"


def probe_record(cfg: RunConfig, layout: Layout, step_times_s: list[float], device: str) -> dict:
    """What ``probe.json`` holds: the median step time of the steps after the warm-up, their
    spread (10th and 90th percentile), and what the planner needs to predict the same run."""
    warmup = cfg.train.probe_warmup_steps
    steady = step_times_s[warmup:]
    if len(steady) < 2:
        raise ValueError(f"a probe needs steps after its {warmup} warm-up steps; got "
                         f"{len(step_times_s)} step times")
    deciles = statistics.quantiles(steady, n=10)
    c = cfg.cluster
    return {
        "step_time_s": statistics.median(steady), "p10_s": deciles[0], "p90_s": deciles[-1],
        "steady_steps": len(steady), "warmup_steps": warmup, "step_times_s": step_times_s,
        "layout": dataclasses.asdict(layout), "micro_batch_size": cfg.train.micro_batch_size,
        "recompute": cfg.train.recompute, "global_batch_size": cfg.train.global_batch_size,
        "seq_length": cfg.train.seq_length, "model": cfg.model.name, "device": device,
        "cluster": {"name": c.name, "nodes": c.nodes, "gpus_per_node": c.gpus_per_node,
                    "gpu": c.gpu, "interconnect": c.interconnect}}


def write_probe(cfg: RunConfig, layout: Layout, metrics_file: Path, device: str) -> dict:
    """Write ``probe.json`` beside ``metrics_file`` (rank 0's per-step rows of this run) and
    return what it holds."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    times = [row["step_time_s"] for row in sorted(rows, key=lambda r: r["step"])]
    record = probe_record(cfg, layout, times, device)
    (metrics_file.parent / PROBE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return record
