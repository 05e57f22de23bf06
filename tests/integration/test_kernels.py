"""megatron's fused kernels and uneven pipeline stages on CPU ranks, through ``python -m launch``.

The fusion that runs on fp32 CPU ranks (fused SwiGLU) and an uneven split of the layers (3 + 1
over PP=2) change how the math is done, not what it is: under TP=2 x PP=2 the loss curve must be
the plain, even one. NVIDIA's recipe also asks for CUDA-only kernels and the fused cross entropy
(bf16 gradients, launch/kernels_schema.py); the CPU ranks drop them and say so. A checkpoint of the uneven layout resumes into the even one.
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
         f"checkpoint.save_interval={SAVED}", "checkpoint.optimizer_format=fully_reshardable",
         "cluster.gpus_per_node=4", "parallel=tp2", "parallel.pp=2", "parallel.dp=1")
TUNED = ("recipe=nvidia", "parallel.num_layers_in_first_pipeline_stage=3")
"""All of NVIDIA's kernels (fused SwiGLU runs on CPU), and layers 3 + 1 instead of 2 + 2."""


def _train(workdir: Path, name: str, *overrides: str) -> tuple[dict[int, float], str]:
    result = run_launch(f"name={name}", *TRAIN, *overrides, cwd=workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = {row["step"]: row["loss"] for row in read_metrics(workdir, name)}
    return losses, result.stdout + result.stderr


def _close(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want)
    assert [got[s] for s in sorted(got)] == pytest.approx([want[s] for s in sorted(got)], abs=1e-5)


@pytest.fixture(scope="module")
def plain(workdir: Path) -> dict[int, float]:
    losses, _ = _train(workdir, "kernels-plain")
    assert len(losses) == STEPS and losses[STEPS] < losses[1] - 0.5  # it learns: not trivial
    return losses


def test_fused_kernels_and_uneven_stages_give_the_plain_loss_curve(workdir: Path, plain) -> None:
    losses, output = _train(workdir, "kernels-tuned", *TUNED)
    _close(losses, plain)
    dropped = [line for line in output.splitlines() if "runs without kernels." in line]
    assert dropped and all("kernels.apply_rope_fusion, kernels.gradient_accumulation_fusion, "
                           "kernels.masked_softmax_fusion, kernels.cross_entropy_loss_fusion "
                           "(CUDA-only" in line for line in dropped)
    assert "bias_activation_fusion" not in dropped[0]  # it runs on CPU: tested above


def test_an_uneven_stage_checkpoint_resumes_into_the_even_layout(workdir: Path, plain) -> None:
    runs = workdir / "runs"
    if not (runs / "kernels-tuned" / "checkpoints").exists():
        _train(workdir, "kernels-tuned", *TUNED)
    name = "kernels-resume-even"
    shutil.copytree(runs / "kernels-tuned" / "checkpoints" / commit.step_dir(SAVED),
                    runs / name / "checkpoints" / commit.step_dir(SAVED))
    losses, output = _train(workdir, name)
    assert "model and optimizer resharded" in output
    _close(losses, {s: loss for s, loss in plain.items() if s > SAVED})
