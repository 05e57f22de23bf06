"""Shared test helpers: compose configs exactly as ``python -m launch`` does."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.config import compose, to_run_config
from launch.schema import RunConfig

REPO = Path(__file__).resolve().parent.parent


def make_config(*overrides: str, run_dir: str = "/tmp/unused") -> RunConfig:
    return to_run_config(compose(list(overrides), run_dir=run_dir))


def run_launch(*overrides: str, cwd: Path, timeout: float = 600,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real user command, in a scratch working directory (runs/ lands there)."""
    return subprocess.run([sys.executable, "-m", "launch", *overrides], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def config_factory():
    return make_config
