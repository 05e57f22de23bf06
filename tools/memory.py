"""``python -m tools.memory [--json] [overrides]``: the predicted per-GPU memory of a layout.

The command line over ``launch.planning.memory`` (the pure predictor the login node and the
ranks use): compose the config, predict, print the breakdown or its JSON.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Optional

from launch.config import derive_layout
from launch.planning.memory import MemoryBreakdown, predict
from launch.schema import Layout, RunConfig
from tools.report import load_config

USAGE = """usage: python -m tools.memory [--json] [key=value ...]

Predict the per-GPU memory of one training step on the worst rank of the configured layout.
The overrides are Hydra's, as for python -m launch, e.g.
  python -m tools.memory model=llama3_70b cluster=hyperpod_p5 cluster.nodes=32 \\
      parallel.tp=8 parallel.pp=4 train=pretrain

options:
  --json      one JSON object: peak_gib, required_gib, fits, the layout and every term
  -h, --help  print this and exit"""


def memory_table(cfg: RunConfig, layout: Layout, memory: MemoryBreakdown) -> str:
    rows = [("weights", memory.weights_gib), ("gradients", memory.gradients_gib),
            ("optimizer", memory.optimizer_gib), ("activations", memory.activations_gib),
            ("opt. step", memory.optimizer_step_gib),
            ("workspace", memory.workspace_gib), ("peak alloc.", memory.peak_gib),
            ("fragment.", memory.fragmentation_gib), ("reserved", memory.reserved_gib),
            ("context", memory.context_gib)]
    verdict = "fits" if memory.fits else "DOES NOT FIT"
    lines = [f"{cfg.model.name}: {layout.describe()} micro_batch_size="
             f"{cfg.train.micro_batch_size} seq_length={cfg.train.seq_length} "
             f"recompute={cfg.train.recompute} precision={cfg.train.precision}",
             f"worst rank: {memory.stage} pipeline stage", ""]
    lines += [f"  {name:<12}{gib:>9.2f} GiB" for name, gib in rows]
    lines += [f"  {'required':<12}{memory.required_gib:>9.2f} GiB",
              f"  {'limit':<12}{memory.limit_gib:>9.2f} GiB  -> {verdict} "
              f"({cfg.cluster.gpu} {cfg.cluster.gpu_memory_gib:g} GiB)"]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m tools.memory [--json] [overrides]``: the breakdown for the config's layout."""
    args = sys.argv[1:] if argv is None else argv
    cfg, as_json, _ = load_config(args, auto_ok=False, usage=USAGE)
    layout = derive_layout(cfg)
    breakdown = predict(cfg, layout)
    if as_json:
        print(json.dumps({**breakdown.as_dict(), "layout": dataclasses.asdict(layout)}))
    else:
        print(memory_table(cfg, layout, breakdown))


if __name__ == "__main__":
    main()
