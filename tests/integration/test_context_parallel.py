"""Context parallelism on CPU ranks through the real ``python -m launch``.

Each CP rank trains on its two load-balanced chunks of every sequence (megatron's
``get_batch_on_this_cp_rank``), attends over the gathered K/V (megatron_ext/cp_attention.py)
and contributes its tokens' loss; the math is that of CP=1, so the loss curves must agree.
A checkpoint saved under CP=2 resumes into CP=1 and back (fully_reshardable).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from launch import ckpt_commit as commit
from tests.conftest import run_launch
from tests.integration.conftest import read_metrics

pytestmark = pytest.mark.slow

STEPS, SAVED = 20, 10
TRAIN = ("data=synthetic", f"train.steps={STEPS}", "train.warmup_steps=2",
         f"checkpoint.save_interval={SAVED}", "checkpoint.optimizer_format=fully_reshardable")
CP1, CP2 = ("parallel=dp",), ("parallel=dp", "parallel.cp=2", "parallel.dp=1")


def _train(workdir: Path, name: str, *overrides: str) -> dict[int, float]:
    result = run_launch(f"name={name}", *TRAIN, *overrides, cwd=workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {row["step"]: row["loss"] for row in read_metrics(workdir, name)}


def _close(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want)
    assert [got[s] for s in sorted(got)] == pytest.approx([want[s] for s in sorted(got)], abs=1e-5)


@pytest.fixture(scope="module")
def cp1(workdir: Path) -> dict[int, float]:
    losses = _train(workdir, "cp-ref", *CP1)
    assert len(losses) == STEPS and losses[STEPS] < losses[1] - 0.5  # it learns: not trivial
    return losses


def test_context_parallel_gives_the_cp1_loss_curve(workdir: Path, cp1) -> None:
    _close(_train(workdir, "cp2", *CP2), cp1)


def test_context_parallel_with_pipeline_stages_gives_the_cp1_loss_curve(workdir: Path,
                                                                       cp1) -> None:
    """PP=2 x CP=2 on 4 ranks: stage boundaries carry seq/CP activations."""
    _close(_train(workdir, "pp2-cp2", "parallel=pp2", "parallel.cp=2", "parallel.dp=1",
                  "cluster.gpus_per_node=4"), cp1)


@pytest.mark.parametrize("saved_as, resumed_as", [("cp2", CP1), ("cp-ref", CP2)],
                         ids=["cp2-into-cp1", "cp1-into-cp2"])
def test_a_checkpoint_resumes_across_context_parallel_layouts(workdir: Path, cp1, saved_as,
                                                              resumed_as) -> None:
    """Needs the CP=2 run above (its saves); step 10 of one layout continues in the other."""
    runs = workdir / "runs"
    if not (runs / saved_as / "checkpoints").exists():
        _train(workdir, saved_as, *CP2)
    name = f"resume-{saved_as}"
    shutil.copytree(runs / saved_as / "checkpoints" / commit.step_dir(SAVED),
                    runs / name / "checkpoints" / commit.step_dir(SAVED))
    result = run_launch(f"name={name}", *TRAIN, *resumed_as, cwd=workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "model and optimizer resharded" in result.stdout
    _close({row["step"]: row["loss"] for row in read_metrics(workdir, name)},
           {s: loss for s, loss in cp1.items() if s > SAVED})
