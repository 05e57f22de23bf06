"""Command-line plumbing of ``tools.memory`` and ``tools.planner``: config loading, tables.

Kept apart from the predictors so they stay pure and short; this is the only tools module
that imports Hydra.
"""
from __future__ import annotations

import dataclasses
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from launch.config import compose, explicit_keys, one_line_error, to_run_config, validate
from launch.schema import Layout, RunConfig
from tools.memory import MemoryBreakdown
from tools.planner import PlannedLayout, describe_pinned

TABLE_ROWS = 15


def load_config(args: list[str], *, auto_ok: bool) -> tuple[RunConfig, bool, frozenset[str]]:
    """The typed config for ``[--json] [overrides]``, whether JSON was asked for, and the keys
    the overrides set (``launch.config.explicit_keys``).

    Exits 2 with one line per problem: a bad override names its field, and ``validate``'s
    cross-section rules apply (layout rules only where the layout is explicit). For the memory
    predictor (``auto_ok=False``) any ``parallel.*`` override makes the layout explicit, even
    under a GPU profile's ``parallel=auto``.
    """
    as_json = "--json" in args
    overrides = [a for a in args if a != "--json"]
    try:
        cfg = to_run_config(compose(overrides))
        explicit = explicit_keys(overrides)
    except (HydraException, OmegaConfBaseException) as err:
        _exit([one_line_error(err)])
    layout_given = any(key.startswith("parallel.") for key in explicit)
    if cfg.parallel.auto and not auto_ok and not layout_given:
        _exit(["error: parallel.auto=true: the memory predictor needs an explicit layout "
               "(e.g. parallel.tp=8 parallel.pp=4); python -m tools.planner picks one"])
    if auto_ok or layout_given:  # the planner always plans; the predictor takes what is given
        cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, auto=auto_ok))
    problems = validate(cfg)
    if problems:
        _exit([f"error: {p}" for p in problems])
    return cfg, as_json, explicit


def _exit(lines: list[str]) -> None:
    print("\n".join(lines), file=sys.stderr)
    sys.exit(2)


@contextmanager
def progress_after(seconds: float, message: str) -> Iterator[None]:
    """Print ``message`` on stderr only if the block is still running after ``seconds``."""
    timer = threading.Timer(seconds, lambda: print(message, file=sys.stderr, flush=True))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def memory_table(cfg: RunConfig, layout: Layout, memory: MemoryBreakdown) -> str:
    rows = [("weights", memory.weights_gib), ("gradients", memory.gradients_gib),
            ("optimizer", memory.optimizer_gib), ("activations", memory.activations_gib),
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
