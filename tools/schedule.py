"""``python -m tools.schedule [--json] [overrides] train.tokens=N``: the campaign per node count.

The command line over ``launch.planning.campaign``: for each ``cluster.nodes`` value (one, or
several comma-separated, each composed on its own, no Hydra multirun), plan the best layout,
then print days, GPU-hours, cost, checkpoint blocking, failures and goodput.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Optional

from launch.planning.campaign import Campaign, campaign
from launch.planning.planner import configure, describe_pinned, pinned, plan
from launch.schema import RunConfig
from tools.report import load_config, refuse

USAGE = """usage: python -m tools.schedule [--json] [key=value ...] train.tokens=N

Plan a whole campaign of train.tokens tokens on each node count given (cluster.nodes=8,16,32):
the planner's best layout, tokens/s/GPU, days, GPU-hours, cost (cluster.node_hour_price per
node-hour; none built in), checkpoint blocking, expected failures (cluster.node_mtbf_hours)
with the work they lose and the restarts (cluster.restart_time_s), goodput, and the checkpoint
interval that minimises lost time (Young's sqrt(2 x save x MTBF)). E.g.
  python -m tools.schedule model=llama3_70b cluster=hyperpod_p5 cluster.nodes=16,32,64 \\
      train.tokens=2000000000000 cluster.node_hour_price=98.32

options:
  --json      a list of rows, one per node count (layout null where nothing fits)
  -h, --help  print this and exit"""
UNCALIBRATED = ("step times are the planner's nominal model, not measured on these GPUs: "
                "probe (train=probe), fit it (python -m tools.calibrate) and pass "
                "cluster.calibration=<file>, or set cluster.step_time_s, before you book")


def node_counts(args: list[str]) -> tuple[list[str], list[int]]:
    """The arguments without ``cluster.nodes=...`` and the node counts it lists ([] if absent)."""
    rest, counts = [], []
    for arg in args:
        if arg.startswith("cluster.nodes="):
            values = arg.split("=", 1)[1].split(",")
            if not all(v.strip().isdigit() and int(v) > 0 for v in values):
                refuse([f"error: {arg} must be one or more positive node counts, e.g. "
                       "cluster.nodes=8,16,32"])
            counts += [int(v) for v in values]
        else:
            rest.append(arg)
    return rest, counts


def step_time_note(cfg: RunConfig) -> str:
    """Where the step times come from: measured, calibrated, or the nominal model."""
    if cfg.cluster.step_time_s:
        return f"step times: cluster.step_time_s={cfg.cluster.step_time_s:g}, as measured"
    if cfg.cluster.calibration:
        return f"step times: the planner's model calibrated by {cfg.cluster.calibration}"
    return UNCALIBRATED


def schedule_table(rows: list[Campaign], unfit: list[str], title: str,
                   note: str = UNCALIBRATED) -> str:
    """One block per node count, then the nodes nothing fits on and the calibration caveat."""
    lines = [title]
    for r in rows:
        cost = f"{r.cost:,.0f}" if r.cost is not None else "- (set cluster.node_hour_price)"
        lines += [f"{r.nodes} nodes: {r.layout}",
                  f"  {r.tokens_per_s_per_gpu:,.0f} tok/s/GPU, {r.step_time_s:.3g} s/step x "
                  f"{r.steps:,} steps = {r.compute_hours:,.0f} h of compute",
                  f"  days {r.days:,.1f}  GPU-hours {r.gpu_hours:,.0f}  cost {cost}  "
                  f"goodput {r.goodput:.1%}",
                  f"  checkpoint blocking {r.checkpoint_blocking_hours:,.1f} h "
                  f"({r.save_blocking_s:.1f} s per save, one per "
                  f"{r.checkpoint_interval_s / 60:,.0f} min)",
                  f"  failures {r.failures:,.1f}: {r.lost_work_hours:,.1f} h of lost work, "
                  f"{r.restart_hours:,.1f} h restarting",
                  f"  least lost time: a save every {r.optimal_interval_s / 60:,.0f} min "
                  f"(checkpoint.save_interval={r.optimal_save_interval})"]
    lines += [f"{nodes} nodes: no layout fits" for nodes in unfit]
    return "\n".join(lines + [f"note: {note}"])


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m tools.schedule``: one schedule per node count, as a table or JSON."""
    args = sys.argv[1:] if argv is None else argv
    rest, counts = node_counts(args)
    rows, unfit, out = [], [], []
    for nodes in counts or [None]:
        given = rest + ([f"cluster.nodes={nodes}"] if nodes else [])
        cfg, as_json, explicit = load_config(given, auto_ok=True, usage=USAGE)
        if cfg.train.tokens <= 0:
            refuse(["error: train.tokens must be > 0: the campaign's total tokens, e.g. "
                   "train.tokens=2000000000000"])
        pins = pinned(cfg, explicit)
        fitting = plan(cfg, pins)
        if not fitting:
            unfit.append(str(cfg.cluster.nodes))
            out.append({"nodes": cfg.cluster.nodes, "layout": None})
            continue
        rows.append(campaign(configure(cfg, fitting[0]), fitting[0]))
        out.append(dataclasses.asdict(rows[-1]))
    if as_json:
        print(json.dumps(out))
    else:
        print(schedule_table(rows, unfit, f"{cfg.model.name}, {cfg.train.tokens:,} tokens on "
                                          f"{cfg.cluster.gpu}{describe_pinned(pins)}",
                             step_time_note(cfg)))
    if not rows:
        sys.exit(1)


if __name__ == "__main__":
    main()
