"""The shape rules of STYLE.md that keep the data path one-way and the modules small."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("launch", "megatron_ext", "tools")
MODULES = sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))
SCHEMA = ["launch/schema.py", "launch/cluster_schema.py", "launch/watch_schema.py",
          "launch/parallel_schema.py", "launch/kernels_schema.py", "launch/eval_schema.py",
          "launch/problems.py", "launch/run_folder.py", "launch/ckpt_commit.py"]
SHARED = {"launch.schema", "launch.cluster_schema", "launch.watch_schema", "launch.problems",
          "launch.parallel_schema", "launch.kernels_schema", "launch.eval_schema",
          "launch.run_folder", "launch.planning", "launch.tokenizer", "launch.ckpt_commit"}
"""The bottom layer inside ``launch``: what the login node, the ranks and the tools all use."""
MAY_IMPORT = {"launch": set(), "megatron_ext": {"launch"}, "tools": {"launch", "megatron_ext"}}
"""Which of our packages each may import (README, "Project layout"): one way, no circle."""


def imported(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_modules_and_functions_stay_small(path: Path) -> None:
    lines = path.read_text().splitlines()
    assert len(lines) <= 400, f"{path.name}: {len(lines)} lines; split it by concern"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= 60, f"{path.name}:{node.lineno} {node.name} is {length} lines"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_packages_import_one_way() -> None:
    """launch at the bottom, the rank code above it, the command-line tools on top."""
    wrong = []
    for path in MODULES:
        package = path.relative_to(REPO).parts[0]
        for name in imported(path):
            target = name.split(".")[0]
            if target in PACKAGES and target != package and target not in MAY_IMPORT[package]:
                wrong.append(f"{module_name(path)} imports {name}")
    assert wrong == []


def test_the_shared_layer_stands_on_nothing_above_it() -> None:
    """The schema, the estimators and the tokenizer rule never reach Hydra or the login-node
    modules, so the ranks and the tools can use them without the launcher."""
    shared = [p for p in MODULES if module_name(p).startswith(tuple(SHARED))]
    assert len(shared) >= 8
    for path in shared:
        above = {m for m in imported(path)
                 if m.split(".")[0] in PACKAGES and not m.startswith(tuple(SHARED))}
        assert not above, f"{module_name(path)} imports {above}"


def test_the_schema_is_stdlib_only() -> None:
    for name in SCHEMA:
        outside = {m for m in imported(REPO / name)
                   if m.split(".")[0] not in sys.stdlib_module_names and not m.startswith("launch.")}
        assert not outside, f"{name} imports {outside}"


def test_launch_never_imports_the_rank_side() -> None:
    for path in (REPO / "launch").glob("*.py"):
        assert not {m for m in imported(path) if m.startswith(("megatron_ext", "megatron", "torch"))}, path


def test_planning_is_pure_python() -> None:
    """The planner answers in a second on a login node: no torch, no megatron, no Hydra."""
    code = ("import sys, launch.planning.planner, launch.planning.memory, launch.tokenizer; "
            "print(sorted(m for m in ('torch', 'megatron', 'hydra') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_only_run_env_reads_slurm_variables_on_the_ranks() -> None:
    readers = [p.name for p in (REPO / "megatron_ext").glob("*.py")
               if "SLURM_" in p.read_text() and p.name != "env.py"]
    assert readers == []
