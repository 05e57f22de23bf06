from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One working directory for the session's runs, so the demo data is built once."""
    return tmp_path_factory.mktemp("work")


def read_metrics(workdir: Path, name: str) -> list[dict]:
    """Per-step metrics of every launch of run ``name``, in step order."""
    rows = []
    for path in sorted((workdir / "runs" / name / "launches").glob("*/metrics.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines()]
    return sorted(rows, key=lambda r: r["step"])
