"""``python -m tools.planner [--json] [overrides]``: every valid layout ranked, and the choice.

The command line over ``launch.planning.planner`` (the pure search ``parallel=auto`` uses):
compose the config, search, print the ranked table or its JSON; exit 1 when nothing fits.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, Mapping, Optional

from launch.planning.planner import PlannedLayout, describe_pinned, pinned, search
from launch.schema import RunConfig
from tools.report import load_config, progress_after

TABLE_ROWS = 15  # fitting layouts the CLI prints
USAGE = """usage: python -m tools.planner [--json] [key=value ...]

Rank every valid parallel layout (TP/PP/VPP/CP/DP/SP x micro-batch x recompute) by predicted
step time, keep those that fit in GPU memory, and name the best. Settings given on the command
line (parallel.tp=8, train.micro_batch_size=2...) are kept; the rest is searched. E.g.
  python -m tools.planner model=llama3_70b cluster=hyperpod_p5 cluster.nodes=32 train=pretrain

options:
  --json      {"layouts": [...], "best": {...}}; exit 1 when no layout fits
  -h, --help  print this and exit"""


def planner_table(cfg: RunConfig, ranked: list[PlannedLayout], pins: Mapping[str, Any]) -> str:
    """The fitting candidates, best first (at most TABLE_ROWS), and the chosen layout."""
    fitting = [c for c in ranked if c.fits]
    header = (f"{'#':>3}  {'tp':>2} {'pp':>3} {'vpp':>3} {'cp':>3} {'dp':>4} {'sp':>3} "
              f"{'mbs':>3} {'recompute':<9} {'GiB/GPU':>8} {'step s':>8} {'tok/s/GPU':>10}")
    lines = [f"{cfg.model.name} on {cfg.cluster.world_size} {cfg.cluster.gpu} "
             f"{cfg.cluster.gpu_memory_gib:g} GiB{describe_pinned(pins)}: {len(ranked)} "
             f"candidates, {len(fitting)} fit", header]
    for i, c in enumerate(fitting[:TABLE_ROWS], 1):
        lines.append(f"{i:>3}  {c.tp:>2} {c.pp:>3} {c.vpp:>3} {c.cp:>3} {c.dp:>4} "
                     f"{'on' if c.sp else 'off':>3} {c.micro_batch_size:>3} {c.recompute:<9} "
                     f"{c.required_gib:>8.1f} {c.step_time_s:>8.3g} {c.tokens_per_s_per_gpu:>10.0f}")
    if fitting:
        best = fitting[0]
        lines.append(f"chosen: {best.describe()} ({best.required_gib:.1f} GiB/GPU, "
                     f"{best.step_time_s:.3g} s/step)")
    elif ranked:
        least = min(ranked, key=lambda c: c.required_gib)
        lines.append(f"no layout fits; the smallest needs {least.required_gib:.1f} GiB/GPU "
                     f"({least.describe()})")
    else:
        lines.append("no valid layout: check the batch size and divisibility rules")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m tools.planner [--json] [overrides]``: the ranked table and the choice."""
    args = sys.argv[1:] if argv is None else argv
    cfg, as_json, explicit = load_config(args, auto_ok=True, usage=USAGE)
    pins = pinned(cfg, explicit)
    with progress_after(1.0, f"searching layouts for {cfg.cluster.world_size} GPUs..."):
        ranked = search(cfg, pins)
    fitting = [c for c in ranked if c.fits]
    if as_json:
        best = dataclasses.asdict(fitting[0]) if fitting else None
        print(json.dumps({"layouts": [dataclasses.asdict(c) for c in fitting], "best": best}))
    else:
        print(planner_table(cfg, ranked, pins))
    if not fitting:
        sys.exit(1)


if __name__ == "__main__":
    main()
