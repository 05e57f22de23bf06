"""benchmarks/prepare_data.py runs (on its small corpus), measures every curation stage off and
on side by side, and the JSON committed under benchmarks/results/ is the one it writes."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "prepare_data.py"
COMMITTED = REPO / "benchmarks" / "results" / "prepare_data.json"


def variants() -> list[str]:
    """The VARIANTS the script measures, read from its source (it is a script, not a module)."""
    tree = ast.parse(SCRIPT.read_text())
    node = next(n.value for n in tree.body if isinstance(n, ast.Assign)
                and getattr(n.targets[0], "id", "") == "VARIANTS")
    return [ast.literal_eval(k) for k in node.keys]


@pytest.mark.slow
def test_the_benchmark_runs_and_the_committed_json_is_what_it_writes(tmp_path: Path) -> None:
    out = tmp_path / "prepare_data.json"
    printed = subprocess.run([sys.executable, str(SCRIPT), "--copies", "1", "--workers", "1",
                              "--output", str(out)], cwd=tmp_path, capture_output=True,
                             text=True, check=True).stdout
    small, committed = json.loads(out.read_text()), json.loads(COMMITTED.read_text())
    names = variants()
    assert [r["options"] for r in small["rows"]] == names
    assert all(name in printed for name in names) and "input MB/s" in printed
    rows = {r["options"]: r for r in small["rows"]}
    assert rows["plain"]["kept"] == rows["plain"]["documents"] and not rows["plain"][
        "retention_pct"]
    assert rows["+paragraph-dup"]["paragraph_chars_removed_pct"] > 0
    assert rows["+paragraph-dup"]["retention_pct"]["paragraph dedup"] < 100
    assert rows["+near-dup"]["retention_pct"]["near dedup"] < 100
    # the committed run: the script's defaults (16 copies, 1 and 2 workers), the same fields
    assert set(committed) == set(small) and committed["copies"] == 16
    assert [(r["options"], r["workers"]) for r in committed["rows"]] == [
        (name, n) for name in names for n in (1, 2)]
    assert all(set(r) == set(small["rows"][0]) for r in committed["rows"])
    assert committed["pii"] == small["pii"]
