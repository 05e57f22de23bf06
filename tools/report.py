"""Command-line plumbing of ``tools.memory`` and ``tools.planner``: config loading, progress.

Kept apart from the predictors so they stay pure and short; this is the only tools module
that imports Hydra. Each predictor formats its own table.
"""
from __future__ import annotations

import dataclasses
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from launch.calibration_file import with_calibration
from launch.config import compose, explicit_keys, one_line_error, to_run_config, validate
from launch.schema import RunConfig


def load_config(args: list[str], *, auto_ok: bool,
                usage: str) -> tuple[RunConfig, bool, frozenset[str]]:
    """The typed config for ``[--json] [overrides]``, whether JSON was asked for, and the keys
    the overrides set (``launch.config.explicit_keys``). ``-h``/``--help`` prints ``usage`` and
    exits 0; any other option is refused (Hydra would read it as a malformed override).

    Exits 2 with one line per problem: a bad override names its field, and ``validate``'s
    cross-section rules apply (layout rules only where the layout is explicit). For the memory
    predictor (``auto_ok=False``) any ``parallel.*`` override makes the layout explicit, even
    under a GPU profile's ``parallel=auto``.
    """
    if "-h" in args or "--help" in args:
        print(usage)
        sys.exit(0)
    unknown = [a for a in args if a.startswith("-") and a != "--json"]
    if unknown:
        refuse([f"error: unknown option {unknown[0]}; the options are --json and --help"])
    as_json = "--json" in args
    overrides = [a for a in args if a != "--json"]
    try:
        cfg = to_run_config(compose(overrides))
        explicit = explicit_keys(overrides)
    except (HydraException, OmegaConfBaseException) as err:
        refuse([one_line_error(err)])
    layout_given = any(key.startswith("parallel.") for key in explicit)
    if cfg.parallel.auto and not auto_ok and not layout_given:
        refuse(["error: parallel.auto=true: the memory predictor needs an explicit layout "
               "(e.g. parallel.tp=8 parallel.pp=4); python -m tools.planner picks one"])
    if auto_ok or layout_given:  # the planner always plans; the predictor takes what is given
        cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, auto=auto_ok))
    cfg, problems = with_calibration(cfg)
    problems += validate(cfg)
    if problems:
        refuse([f"error: {p}" for p in problems])
    return cfg, as_json, explicit


def refuse(lines: list[str]) -> None:
    """Print one line per problem on stderr and exit 2, before anything runs."""
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
