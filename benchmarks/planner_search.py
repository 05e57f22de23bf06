"""Time the planner's full search: llama3_70b on 256 H100s (32 p5 nodes), every candidate.

The issue's bar: under 1 second on a 2-core machine. Run from the repository root:
    .venv/bin/python benchmarks/planner_search.py [--repeats N] [extra overrides]
Prints one row per repeat and writes benchmarks/results/planner_search.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from launch.config import compose, to_run_config
from launch.planning.planner import search

OVERRIDES = ["model=llama3_70b", "train=pretrain", "cluster=hyperpod_p5", "cluster.nodes=32"]
RESULT = Path(__file__).resolve().parent / "results" / "planner_search.json"
LIMIT_S = 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = OVERRIDES + args.overrides
    cfg = to_run_config(compose(overrides))
    seconds, ranked = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        ranked = search(cfg)
        seconds.append(time.perf_counter() - start)
    fitting = [c for c in ranked if c.fits]
    print(f"{'repeat':>6} {'seconds':>9}")
    for i, s in enumerate(seconds, 1):
        print(f"{i:>6} {s:>9.4f}")
    summary = {
        "overrides": overrides, "gpu": cfg.cluster.gpu, "candidates": len(ranked),
        "fitting": len(fitting),
        "best": fitting[0].describe() if fitting else None,
        "seconds": seconds, "median_s": statistics.median(seconds), "max_s": max(seconds),
        "limit_s": LIMIT_S, "cpus": os.cpu_count(), "python": platform.python_version(),
        "machine": platform.machine(),
    }
    print(f"median {summary['median_s']:.4f} s, max {summary['max_s']:.4f} s over "
          f"{len(ranked)} candidates ({len(fitting)} fit) on {os.cpu_count()} CPUs; "
          f"limit {LIMIT_S} s: {'PASS' if summary['max_s'] < LIMIT_S else 'FAIL'}")
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
