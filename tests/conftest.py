"""Shared test helpers: compose configs exactly as ``python -m launch`` does."""
from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.config import compose, to_run_config
from launch.schema import RunConfig

REPO = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=None)
def _composed(overrides: tuple[str, ...], run_dir: str) -> RunConfig:
    return to_run_config(compose(list(overrides), run_dir=run_dir))


def make_config(*overrides: str, run_dir: str = "/tmp/unused") -> RunConfig:
    """Composed once per distinct arguments in a test session (a Hydra compose takes ~0.3 s
    and the same configs recur in many tests): the config is a pure function of ``conf/`` and
    the overrides (no env or time resolvers), and each caller gets its own copy to change."""
    return copy.deepcopy(_composed(overrides, run_dir))


def run_launch(*overrides: str, cwd: Path, timeout: float = 600,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real user command, in a scratch working directory (runs/ lands there)."""
    return subprocess.run([sys.executable, "-m", "launch", *overrides], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def config_factory():
    return make_config
